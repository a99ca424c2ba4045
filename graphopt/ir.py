"""The graphopt IR: one graph of ``Node``\\ s and ``Value``\\ s with ONNX op semantics.

* A ``Value`` is an SSA edge. It has at most one producer (a node output, a graph input,
  or a constant tensor held by the graph) and a list of uses ``(node, input_index)``.
* A ``Node`` has an ONNX ``op_type``/``domain``, ordered ``inputs`` (``None`` for an
  omitted optional input), ``outputs`` and Python-valued ``attrs``. ``node.meta[SOURCE]``
  keeps where the node came from: the ONNX node name or the torch module's qualified name.
* Constants are ``numpy`` arrays held by the graph (``value.const``). They are treated as
  immutable: a pass that changes a weight assigns a new array (``graph.set_const``), it never
  writes into one in place. That lets ``Graph.copy`` share the arrays, and lets the ONNX
  front end memory-map external data without copying it.

Control-flow subgraphs (If/Loop/Scan bodies) are *kept intact*: the body stays an ONNX
``GraphProto`` attribute that round-trips byte for byte. The outer values a body captures by
name are recorded as the node's ``implicit_inputs`` so that use-def links, dead-code
elimination and ``verify`` see them, and a pass cannot rewire or rename them.
"""

from __future__ import annotations

import itertools
from collections import deque
from typing import Any, Iterator, Sequence

import numpy as np
import onnx
from onnx import AttributeProto, helper

from graphopt.errors import GraphError
from graphopt.meta import SOURCE

Shape = tuple  # tuple of int (static), str (symbolic) or None (unknown dim)

# Attribute types that graphopt keeps as raw AttributeProto and never interprets.
OPAQUE_ATTR_TYPES = {
    AttributeProto.GRAPH,
    AttributeProto.GRAPHS,
    AttributeProto.SPARSE_TENSOR,
    AttributeProto.SPARSE_TENSORS,
    AttributeProto.TYPE_PROTO,
    AttributeProto.TYPE_PROTOS,
}

_SHORT_DTYPE = {
    onnx.TensorProto.FLOAT: "f32",
    onnx.TensorProto.DOUBLE: "f64",
    onnx.TensorProto.FLOAT16: "f16",
    onnx.TensorProto.BFLOAT16: "bf16",
    onnx.TensorProto.INT8: "i8",
    onnx.TensorProto.UINT8: "u8",
    onnx.TensorProto.INT16: "i16",
    onnx.TensorProto.UINT16: "u16",
    onnx.TensorProto.INT32: "i32",
    onnx.TensorProto.UINT32: "u32",
    onnx.TensorProto.INT64: "i64",
    onnx.TensorProto.UINT64: "u64",
    onnx.TensorProto.BOOL: "bool",
    onnx.TensorProto.STRING: "str",
    onnx.TensorProto.INT4: "i4",
    onnx.TensorProto.UINT4: "u4",
}


def is_param(array: np.ndarray) -> bool:
    """Whether a constant counts as parameters: floating point, rank >= 1."""
    return array.ndim >= 1 and np.issubdtype(array.dtype, np.floating)


def dtype_name(elem_type: int | None) -> str:
    if not elem_type:
        return "?"
    return _SHORT_DTYPE.get(elem_type) or onnx.TensorProto.DataType.Name(elem_type).lower()


def elem_type_of(array: np.ndarray) -> int:
    """ONNX element type of a numpy array."""
    return helper.np_dtype_to_tensor_dtype(array.dtype)


def numpy_dtype(elem_type: int | None) -> np.dtype | None:
    """The numpy dtype of an ONNX element type; None when it is unset or has none."""
    if not elem_type:
        return None
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))
    except (KeyError, ValueError, TypeError):
        return None


def format_shape(shape: Shape | None) -> str:
    if shape is None:
        return "[?]"
    return "[" + ",".join("?" if d is None else str(d) for d in shape) + "]"


class Value:
    """An SSA value: a graph input, a constant, or a node output."""

    __slots__ = ("name", "dtype", "shape", "producer", "index", "uses", "const", "meta", "graph")

    def __init__(self, name: str, dtype: int | None = None, shape: Shape | None = None,
                 const: np.ndarray | None = None):
        self.name = name
        self.dtype = dtype or None
        self.shape = tuple(shape) if shape is not None else None
        self.producer: Node | None = None
        self.index: int = -1
        self.uses: list[tuple[Node, int]] = []  # index -1: implicit (subgraph capture)
        self.const = const
        self.meta: dict[str, Any] = {}
        self.graph: Graph | None = None

    @property
    def is_const(self) -> bool:
        return self.const is not None

    @property
    def is_graph_input(self) -> bool:
        return self.graph is not None and self.producer is None and self.const is None and self in self.graph._input_set

    @property
    def is_graph_output(self) -> bool:
        return self.graph is not None and self.graph.outputs.count(self) > 0

    @property
    def has_implicit_uses(self) -> bool:
        return any(i < 0 for _, i in self.uses)

    def users(self) -> list[Node]:
        """The distinct nodes that use this value, in first-use order."""
        return list(dict.fromkeys(n for n, _ in self.uses))

    @property
    def static_shape(self) -> tuple[int, ...] | None:
        """The shape if every dim is a known integer, else None."""
        if self.shape is None or any(not isinstance(d, int) for d in self.shape):
            return None
        return self.shape

    def __repr__(self) -> str:
        return f"%{self.name}"


class Node:
    """One ONNX-semantics operation."""

    __slots__ = ("op_type", "domain", "name", "inputs", "outputs", "attrs", "attr_types", "meta", "graph",
                 "implicit_inputs", "doc_string")

    def __init__(self, op_type: str, domain: str = "", name: str = ""):
        self.op_type = op_type
        self.domain = domain or ""
        self.name = name
        self.inputs: list[Value | None] = []
        self.outputs: list[Value] = []
        self.attrs: dict[str, Any] = {}
        self.attr_types: dict[str, int] = {}
        self.meta: dict[str, Any] = {}
        self.graph: Graph | None = None
        self.implicit_inputs: list[Value] = []
        self.doc_string = ""

    @property
    def source(self) -> str:
        """Where this node came from: the ONNX node name or the torch module path."""
        return self.meta.get(SOURCE) or self.name

    @property
    def qualified_op(self) -> str:
        return f"{self.domain}::{self.op_type}" if self.domain not in ("", "ai.onnx") else self.op_type

    def attr(self, name: str, default: Any = None) -> Any:
        return self.attrs.get(name, default)

    def input_const(self, i: int) -> np.ndarray | None:
        """The constant array feeding input ``i``, or None if it is not constant."""
        if i >= len(self.inputs) or self.inputs[i] is None:
            return None
        return self.graph.const_value(self.inputs[i]) if self.graph else self.inputs[i].const

    def has_subgraphs(self) -> bool:
        return any(t in (AttributeProto.GRAPH, AttributeProto.GRAPHS) for t in self.attr_types.values())

    def __repr__(self) -> str:
        return f"<{self.qualified_op} {self.name or '?'}>"


def _free_names_of_graph(g: onnx.GraphProto) -> set[str]:
    """Names a subgraph reads from an enclosing scope (recursively)."""
    defined = {i.name for i in g.input} | {t.name for t in g.initializer} | {t.values.name for t in g.sparse_initializer}
    free: set[str] = set()
    for n in g.node:
        for name in n.input:
            if name and name not in defined:
                free.add(name)
        for a in n.attribute:
            subs = [a.g] if a.type == AttributeProto.GRAPH else list(a.graphs) if a.type == AttributeProto.GRAPHS else []
            for sg in subs:
                free |= {x for x in _free_names_of_graph(sg) if x not in defined}
        defined.update(o for o in n.output if o)
    return free


def _names_in_graph(g: onnx.GraphProto) -> Iterator[str]:
    yield from (i.name for i in g.input)
    yield from (t.name for t in g.initializer)
    for n in g.node:
        yield from n.output
        for a in n.attribute:
            for sg in ([a.g] if a.type == AttributeProto.GRAPH else a.graphs if a.type == AttributeProto.GRAPHS else []):
                yield from _names_in_graph(sg)


class Graph:
    """A computation graph plus the model-level facts needed to write it back.

    Nodes are kept in insertion order in a dict (O(1) removal); ``toposort`` restores a
    topological order after rewrites, and the back ends always call it.
    """

    def __init__(self, name: str = "graph"):
        self.name = name
        self._nodes: dict[Node, None] = {}
        self.values: dict[str, Value] = {}
        self.inputs: list[Value] = []
        self._input_set: set[Value] = set()
        self.outputs: list[Value] = []
        self.constants: dict[str, Value] = {}
        self.opset_imports: dict[str, int] = {"": 17}
        # Model-level data the back end writes back: ir_version, producer, doc_string,
        # metadata_props, local functions, ...
        self.model_meta: dict[str, Any] = {}
        # Pass-to-pass data about the whole graph (keys in graphopt.meta); never serialized.
        self.scratch: dict[str, Any] = {}
        self._reserved: set[str] = set()  # names used inside kept-intact subgraphs
        self._counter = itertools.count()

    # ------------------------------------------------------------------ queries
    @property
    def nodes(self) -> list[Node]:
        return list(self._nodes)

    def __iter__(self) -> Iterator[Node]:
        return iter(list(self._nodes))

    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, node: Node) -> bool:
        return node in self._nodes

    def find_nodes(self, *op_types: str) -> list[Node]:
        return [n for n in self._nodes if n.op_type in op_types]

    def node_by_name(self, name: str) -> Node | None:
        for n in self._nodes:
            if n.name == name:
                return n
        return None

    def const_value(self, value: Value | None) -> np.ndarray | None:
        """The array of a constant value, or of a value produced by a ``Constant`` node."""
        if value is None:
            return None
        if value.const is not None:
            return value.const
        p = value.producer
        if p is not None and p.op_type == "Constant" and p.domain == "" and "value" in p.attrs:
            v = p.attrs["value"]
            return v if isinstance(v, np.ndarray) else None
        return None

    def num_params(self) -> int:
        """Elements of floating-point constants of rank >= 1 (weights, biases; not scalars)."""
        return int(sum(v.const.size for v in self.constants.values() if is_param(v.const)))

    # ------------------------------------------------------------------ creation
    def unique_name(self, base: str) -> str:
        base = base or "v"
        if base not in self.values and base not in self._reserved:
            return base
        while True:
            cand = f"{base}_{next(self._counter)}"
            if cand not in self.values and cand not in self._reserved:
                return cand

    def _register_value(self, v: Value) -> Value:
        if v.name in self.values or v.name in self._reserved:
            raise GraphError(f"duplicate value name '{v.name}'")
        v.graph = self
        self.values[v.name] = v
        return v

    def add_input(self, name: str, dtype: int | None = None, shape: Shape | None = None) -> Value:
        v = self._register_value(Value(name, dtype, shape))
        self.inputs.append(v)
        self._input_set.add(v)
        return v

    def add_const(self, array: np.ndarray, name: str | None = None, *, exact_name: bool = False) -> Value:
        """Add a constant tensor; ``name`` is made unique unless ``exact_name``."""
        array = np.asarray(array)
        if not exact_name:
            name = self.unique_name(name or "const")
        v = self._register_value(Value(name, elem_type_of(array), array.shape, const=array))
        self.constants[v.name] = v
        return v

    def set_const(self, value: Value, array: np.ndarray) -> None:
        """Replace the array of a constant (shape and dtype follow the new array)."""
        if value.const is None:
            raise GraphError(f"value '{value.name}' is not a constant")
        array = np.asarray(array)
        value.const = array
        value.dtype = elem_type_of(array)
        value.shape = array.shape

    def add_node(self, op_type: str, inputs: Sequence[Value | None], outputs: int | Sequence[str] = 1, *,
                 attrs: dict[str, Any] | None = None, domain: str = "", name: str | None = None,
                 source: str | None = None, attr_types: dict[str, int] | None = None) -> Node:
        """Create a node, link its inputs and create its output values.

        ``outputs`` is a count or a list of base names (made unique). The node's
        ``meta[SOURCE]`` is ``source`` (give the node it derives from, so reports keep the
        user's names).
        """
        node = Node(op_type, domain, "")
        node.graph = self
        node.name = name if name is not None else self.unique_node_name(op_type)
        for i, v in enumerate(inputs):
            self._check_owned(v)
            node.inputs.append(v)
            if v is not None:
                v.uses.append((node, i))
        names = [f"{node.name}_out{i}" for i in range(outputs)] if isinstance(outputs, int) else list(outputs)
        for i, base in enumerate(names):
            out = self._register_value(Value(self.unique_name(base)))
            out.producer, out.index = node, i
            node.outputs.append(out)
        if attrs:
            node.attrs.update(attrs)
        if attr_types:
            node.attr_types.update(attr_types)
        if source is not None:
            node.meta[SOURCE] = source
        self._nodes[node] = None
        return node

    def unique_node_name(self, base: str) -> str:
        return f"{base}_{next(self._counter)}"

    def _check_owned(self, v: Value | None) -> None:
        if v is not None and v.graph is not self:
            raise GraphError(f"value '{v.name}' does not belong to this graph")

    # ------------------------------------------------------------------ mutation
    def set_input(self, node: Node, index: int, value: Value | None) -> None:
        """Point input ``index`` of ``node`` at ``value``, keeping use lists right."""
        self._check_owned(value)
        old = node.inputs[index]
        if old is value:
            return
        if old is not None:
            old.uses.remove((node, index))
        node.inputs[index] = value
        if value is not None:
            value.uses.append((node, index))

    def append_input(self, node: Node, value: Value | None) -> None:
        self._check_owned(value)
        node.inputs.append(value)
        if value is not None:
            value.uses.append((node, len(node.inputs) - 1))

    def replace_all_uses(self, old: Value, new: Value) -> None:
        """Make every user of ``old`` (and the graph output list) use ``new`` instead.

        If ``old`` is a graph output its name is user-visible, so ``new`` takes that name;
        this is refused when ``new`` is itself a graph input or output, or when a kept-intact
        subgraph captures ``old`` by name.
        """
        if old is new:
            return
        self._check_owned(new)
        if old.has_implicit_uses:
            users = ", ".join(n.name for n, i in old.uses if i < 0)
            raise GraphError(f"value '{old.name}' is captured by the subgraph of node(s) {users}; it cannot be rewired")
        if old.is_graph_output:
            if new.is_graph_input or new.is_graph_output or new.has_implicit_uses:
                raise GraphError(f"cannot replace graph output '{old.name}' by '{new.name}': both names are user-visible")
        for node, i in list(old.uses):
            node.inputs[i] = new
            new.uses.append((node, i))
        old.uses.clear()
        if old.is_graph_output:
            self.outputs = [new if o is old else o for o in self.outputs]
            old_name = old.name
            self.rename_value(old, self.unique_name(old_name + "_replaced"))
            self.rename_value(new, old_name)

    def rename_value(self, value: Value, new_name: str) -> None:
        if value.name == new_name:
            return
        if new_name in self.values or new_name in self._reserved:
            raise GraphError(f"cannot rename '{value.name}' to '{new_name}': the name is taken")
        if value.has_implicit_uses:
            raise GraphError(f"value '{value.name}' is captured by a subgraph; it cannot be renamed")
        del self.values[value.name]
        if value.const is not None:
            del self.constants[value.name]
            self.constants[new_name] = value
        value.name = new_name
        self.values[new_name] = value

    def remove_node(self, node: Node, safe: bool = True) -> None:
        """Remove ``node``. With ``safe`` (the default) this is refused while any output is
        still used or is a graph output."""
        if node not in self._nodes:
            raise GraphError(f"node '{node.name}' is not in the graph")
        if safe:
            for out in node.outputs:
                if out.uses or out.is_graph_output:
                    who = "the graph outputs" if out.is_graph_output else ", ".join(n.name for n in out.users())
                    raise GraphError(f"cannot remove node '{node.name}': its output '{out.name}' is still used by {who}")
        for i, v in enumerate(node.inputs):
            if v is not None:
                v.uses.remove((node, i))
        for v in node.implicit_inputs:
            v.uses.remove((node, -1))
        for out in node.outputs:
            if self.values.get(out.name) is out:
                del self.values[out.name]
            out.producer = None
            out.graph = None
        del self._nodes[node]
        node.graph = None

    def remove_const(self, value: Value) -> None:
        if value.uses or value.is_graph_output:
            raise GraphError(f"cannot remove constant '{value.name}': it is still used")
        del self.constants[value.name]
        del self.values[value.name]
        value.graph = None

    def eliminate_dead(self) -> tuple[int, int]:
        """Remove nodes whose outputs are never used, then unused constants; graph inputs stay.
        Returns (nodes, constants) removed."""
        self.toposort()
        removed = 0
        for node in reversed(self.nodes):
            if all(not o.uses and not o.is_graph_output for o in node.outputs):
                self.remove_node(node)
                removed += 1
        return removed, self.remove_unused_constants()

    def remove_unused_constants(self) -> int:
        dead = [v for v in self.constants.values() if not v.uses and not v.is_graph_output]
        for v in dead:
            self.remove_const(v)
        return len(dead)

    def set_outputs(self, outputs: Sequence[Value]) -> None:
        for v in outputs:
            self._check_owned(v)
        self.outputs = list(outputs)

    # ------------------------------------------------------------------ order
    def toposort(self) -> None:
        """Reorder nodes topologically (stable: keeps the current order where it can).

        Linear in nodes + edges. Raises ``GraphError`` naming the nodes of a cycle."""
        nodes = list(self._nodes)
        indeg: dict[Node, int] = {}
        for n in nodes:
            preds = {v.producer for v in itertools.chain(n.inputs, n.implicit_inputs)
                     if v is not None and v.producer is not None and v.producer in self._nodes}
            indeg[n] = len(preds)
        order_index = {n: i for i, n in enumerate(nodes)}
        ready = deque(n for n in nodes if indeg[n] == 0)
        out: list[Node] = []
        while ready:
            n = ready.popleft()
            out.append(n)
            succ: dict[Node, None] = {}
            for v in n.outputs:
                for u, _ in v.uses:
                    succ[u] = None
            newly = []
            for u in succ:
                if u in indeg:
                    indeg[u] -= 1
                    if indeg[u] == 0:
                        newly.append(u)
            newly.sort(key=order_index.__getitem__)
            ready.extend(newly)
        if len(out) != len(nodes):
            left = [n for n in nodes if indeg[n] > 0]
            raise GraphError("the graph has a cycle through node(s): " + ", ".join(self._cycle_names(left)))
        self._nodes = dict.fromkeys(out)

    def _cycle_names(self, left: list[Node]) -> list[str]:
        import networkx as nx  # only on the error path

        g = nx.DiGraph()
        for n in left:
            for v in itertools.chain(n.inputs, n.implicit_inputs):
                if v is not None and v.producer in left:
                    g.add_edge(v.producer.name, n.name)
        try:
            return [a for a, _ in nx.find_cycle(g)]
        except nx.NetworkXNoCycle:  # pragma: no cover - indeg said there is one
            return [n.name for n in left[:10]]

    # ------------------------------------------------------------------ checks
    def verify(self, check_types: bool = True) -> None:
        """Check the graph's invariants; raise ``GraphError`` listing every problem found.

        Checks: every input is defined (graph input, constant, or output of a node in the
        graph); use lists agree with node inputs; value and node names are unique; the graph
        has no cycle; constants agree with their recorded dtype/shape; and (``check_types``)
        recorded dtypes/shapes agree with ONNX shape inference where both are known.
        """
        problems: list[str] = []
        defined: set[Value] = set(self.inputs) | set(self.constants.values())
        node_names: set[str] = set()
        for n in self._nodes:
            if n.graph is not self:
                problems.append(f"node '{n.name}' does not point back to this graph")
            if n.name:
                if n.name in node_names:
                    problems.append(f"duplicate node name '{n.name}'")
                node_names.add(n.name)
            for i, v in enumerate(n.inputs):
                if v is None:
                    continue
                if v.graph is not self or self.values.get(v.name) is not v:
                    problems.append(f"node '{n.name}' input {i} '{v.name}' is dangling (not a value of this graph)")
                elif v.producer is None and v not in defined:
                    problems.append(f"node '{n.name}' input {i} '{v.name}' has no producer")
                elif v.producer is not None and v.producer not in self._nodes:
                    problems.append(f"node '{n.name}' input {i} '{v.name}' comes from removed node '{v.producer.name}'")
                if (n, i) not in v.uses:
                    problems.append(f"value '{v.name}' does not list its use by node '{n.name}' input {i}")
            for j, out in enumerate(n.outputs):
                if out.producer is not n or out.index != j:
                    problems.append(f"output {j} '{out.name}' of node '{n.name}' has a wrong producer link")
                if self.values.get(out.name) is not out:
                    problems.append(f"output '{out.name}' of node '{n.name}' is not registered (duplicate name?)")
        for v in self.values.values():
            for u, i in v.uses:
                if u not in self._nodes:
                    problems.append(f"value '{v.name}' lists a use by node '{u.name}', which is not in the graph")
                elif i >= 0 and (i >= len(u.inputs) or u.inputs[i] is not v):
                    problems.append(f"value '{v.name}' lists a stale use by node '{u.name}' input {i}")
        for o in self.outputs:
            if self.values.get(o.name) is not o:
                problems.append(f"graph output '{o.name}' is dangling")
        for v in self.constants.values():
            if v.const is None:
                problems.append(f"constant '{v.name}' has no data")
                continue
            if v.dtype != elem_type_of(v.const) or tuple(v.shape or ()) != v.const.shape:
                problems.append(f"constant '{v.name}' is recorded as {dtype_name(v.dtype)}{format_shape(v.shape)} "
                                f"but holds {dtype_name(elem_type_of(v.const))}{format_shape(v.const.shape)}")
        try:
            self.toposort()
        except GraphError as e:
            problems.append(str(e))
        if check_types and not problems:
            problems.extend(self._type_problems())
        if problems:
            more = f" (and {len(problems) - 20} more)" if len(problems) > 20 else ""
            raise GraphError(f"graph '{self.name}' is invalid: " + "; ".join(problems[:20]) + more)

    def _type_problems(self) -> list[str]:
        from graphopt.shapes import infer_types

        problems = []
        try:
            inferred = infer_types(self)
        except Exception as e:  # onnx inference names the node
            return [f"ONNX shape inference failed: {str(e).splitlines()[0]}"]
        for name, (dtype, shape) in inferred.items():
            v = self.values.get(name)
            if v is None:
                continue
            if v.dtype and dtype and v.dtype != dtype:
                problems.append(f"value '{name}' is recorded as {dtype_name(v.dtype)} but inference gives {dtype_name(dtype)}")
            if v.shape is not None and shape is not None:
                if len(v.shape) != len(shape) or any(
                        isinstance(a, int) and isinstance(b, int) and a != b for a, b in zip(v.shape, shape)):
                    problems.append(f"value '{name}' is recorded as {format_shape(v.shape)} but inference gives {format_shape(shape)}")
        return problems

    def infer_shapes(self) -> None:
        """Fill in dtypes and shapes of every value that ONNX shape inference can tell."""
        from graphopt.shapes import infer_types

        for name, (dtype, shape) in infer_types(self).items():
            v = self.values.get(name)
            if v is None or v.const is not None:
                continue
            if dtype:
                v.dtype = dtype
            if shape is not None:
                v.shape = shape

    def update_from(self, module) -> int:
        """Write trained parameters of a ``to_torch`` module back into this graph's constants
        (the module does it: the IR does not depend on the torch back end)."""
        return module.write_back(self)

    # ------------------------------------------------------------------ copy / dump
    def copy(self) -> Graph:
        """A structural copy. Constant arrays are shared (they are immutable by contract)."""
        g = Graph(self.name)
        g.opset_imports = dict(self.opset_imports)
        g.model_meta = dict(self.model_meta)
        g.scratch = dict(self.scratch)
        g._reserved = set(self._reserved)
        g._counter = itertools.count(next(self._counter))
        vmap: dict[Value, Value] = {}

        def clone_value(v: Value) -> Value:
            c = Value(v.name, v.dtype, v.shape, v.const)
            c.meta = dict(v.meta)
            c.graph = g
            g.values[c.name] = c
            vmap[v] = c
            return c

        for v in self.inputs:
            c = clone_value(v)
            g.inputs.append(c)
            g._input_set.add(c)
        for name, v in self.constants.items():
            g.constants[name] = clone_value(v)
        for n in self._nodes:
            m = Node(n.op_type, n.domain, n.name)
            m.graph = g
            m.attrs = {k: (list(a) if isinstance(a, list) else a) for k, a in n.attrs.items()}
            m.attr_types = dict(n.attr_types)
            m.meta = dict(n.meta)
            m.doc_string = n.doc_string
            for i, v in enumerate(n.inputs):
                c = None if v is None else vmap.get(v) or clone_value(v)
                m.inputs.append(c)
                if c is not None:
                    c.uses.append((m, i))
            for v in n.implicit_inputs:
                c = vmap.get(v) or clone_value(v)
                m.implicit_inputs.append(c)
                c.uses.append((m, -1))
            for j, v in enumerate(n.outputs):
                c = vmap.get(v) or clone_value(v)
                c.producer, c.index = m, j
                m.outputs.append(c)
            g._nodes[m] = None
        g.outputs = [vmap.get(v) or clone_value(v) for v in self.outputs]
        return g

    def dump(self, max_attr_len: int = 60) -> str:
        """A readable text form of the graph (one line per node)."""

        def vt(v: Value) -> str:
            return f"%{v.name}: {dtype_name(v.dtype)}{format_shape(v.shape)}"

        opsets = ", ".join(f"{d or 'ai.onnx'}={v}" for d, v in self.opset_imports.items())
        lines = [f"graph {self.name} (opset {opsets})"]
        lines.append("  inputs: " + ", ".join(vt(v) for v in self.inputs))
        for v in self.constants.values():
            lines.append(f"  const {vt(v)}")
        for n in self._nodes:
            ins = ", ".join("_" if v is None else f"%{v.name}" for v in n.inputs)
            outs = ", ".join(vt(v) for v in n.outputs)
            attrs = ", ".join(f"{k}={_fmt_attr(a, max_attr_len)}" for k, a in n.attrs.items())
            line = f"  {outs} = {n.qualified_op}({ins})"
            if attrs:
                line += " {" + attrs + "}"
            if n.implicit_inputs:
                line += " captures(" + ", ".join(f"%{v.name}" for v in n.implicit_inputs) + ")"
            src = n.meta.get(SOURCE)
            if src and src != n.name:
                line += f"  # {n.name} <- {src}"
            elif n.name:
                line += f"  # {n.name}"
            lines.append(line)
        lines.append("  outputs: " + ", ".join(vt(v) for v in self.outputs))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.dump()


def _fmt_attr(a: Any, limit: int) -> str:
    if isinstance(a, np.ndarray):
        s = f"tensor<{a.dtype}{list(a.shape)}>" if a.size > 8 else f"tensor({a.tolist()})"
    elif isinstance(a, AttributeProto):
        s = f"<{AttributeProto.AttributeType.Name(a.type).lower()}>"
    elif isinstance(a, bytes):
        s = repr(a.decode(errors="replace"))
    else:
        s = repr(a)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def clip_bounds(graph: "Graph", n: Node) -> tuple[float | None, float | None] | None:
    """(min, max) of a Clip with constant scalar bounds, else None."""
    def scalar(i):
        if i >= len(n.inputs) or n.inputs[i] is None:
            return None, True
        c = graph.const_value(n.inputs[i])
        if c is None or np.asarray(c).size != 1:
            return None, False
        return float(np.asarray(c).reshape(())), True

    lo, ok1 = scalar(1)
    hi, ok2 = scalar(2)
    return (lo, hi) if ok1 and ok2 else None
