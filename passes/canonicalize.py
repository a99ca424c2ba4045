"""Canonicalization passes: remove-identity, explicit-pads, fold-constants, eliminate-dead,
canonicalize, simplify. All preserve the function exactly."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from onnx import helper

from graphopt.errors import GraphError, UnsupportedOpError
from graphopt.geometry import WINDOW_OPS, window
from graphopt.ir import Graph, Node
from graphopt.meta import SOURCE
from graphopt.passmanager import Context, Pass, PassResult, option, register_pass

log = logging.getLogger("graphopt.passes.canonicalize")


def bypass(graph: Graph, node: Node) -> bool:
    """Route users of node.outputs[0] to node.inputs[0] and drop the node, if names allow."""
    src, out = node.inputs[0], node.outputs[0]
    if src is None:
        return False
    try:
        graph.replace_all_uses(out, src)
    except GraphError as e:
        log.debug("keeping %s: %s", node.name, e)
        return False
    graph.remove_node(node)
    return True


def is_zero_pad(graph: Graph, n: Node) -> bool:
    """A Pad (opset >= 11: pads is an input) whose pads are a constant of all zeros: an identity."""
    if n.op_type != "Pad" or n.domain != "" or len(n.inputs) < 2 or n.inputs[1] is None:
        return False
    pads = graph.const_value(n.inputs[1])
    return pads is not None and not np.asarray(pads).any()


@register_pass("remove-identity")
@dataclass(kw_only=True)
class RemoveIdentity(Pass):
    """Remove Identity nodes, Pads that pad nothing, and inference-mode Dropout nodes.
    Preserves the function exactly.

    A Dropout is removed only when its mask output is unused and its training_mode input is
    absent or a constant false. An Identity that separates a graph input from a graph output
    is kept (both names are the user's interface)."""

    preserves_function = True

    dropout: bool = option(True, "also remove inference-mode Dropout")

    def run(self, graph: Graph, ctx: Context) -> PassResult:
        removed = 0
        for node in graph.nodes:
            if node.domain != "":
                continue
            if node.op_type == "Identity" or is_zero_pad(graph, node):
                removed += bypass(graph, node)
            elif node.op_type == "Dropout" and self.dropout:
                if len(node.outputs) > 1 and (node.outputs[1].uses or node.outputs[1].is_graph_output):
                    continue
                if len(node.inputs) > 2 and node.inputs[2] is not None:
                    tm = graph.const_value(node.inputs[2])
                    if tm is None or bool(np.asarray(tm).item()):
                        continue
                removed += bypass(graph, node)
        return PassResult(graph, removed > 0, {"removed": removed})


# Ops never folded: randomness, and Q/DQ (folding a DequantizeLinear of int8 weights would
# turn a quantized model back into float weights; onnxruntime keeps them for the same reason).
_NO_FOLD = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli",
            "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "If", "Loop", "Scan", "SequenceConstruct",
            "Constant"}


def _evaluate(graph: Graph, node: Node) -> list[np.ndarray]:
    from onnx.reference import ReferenceEvaluator

    from graphopt.serialize import node_to_proto

    p = node_to_proto(node)
    ins = [helper.make_tensor_value_info(v.name, v.dtype or 0, None) for v in node.inputs if v is not None]
    outs = [helper.make_tensor_value_info(v.name, 0, None) for v in node.outputs]
    g = helper.make_graph([p], "fold", ins, outs)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid(d, v) for d, v in graph.opset_imports.items()])
    feeds = {v.name: np.asarray(graph.const_value(v)) for v in node.inputs if v is not None}
    return [np.asarray(r) for r in ReferenceEvaluator(m).run(None, feeds)]


@register_pass("explicit-pads")
@dataclass(kw_only=True)
class ExplicitPads(Pass):
    """Rewrite ``auto_pad`` (SAME_UPPER, SAME_LOWER, VALID) on Conv and pooling nodes as the
    explicit ``pads`` ONNX defines for it (``graphopt.geometry.window``), so every pass and back end
    reads one form. Preserves the function exactly. A node whose input's spatial shape is not
    static, and a ConvTranspose with SAME padding, keep their ``auto_pad`` (counted in ``kept``,
    the reason logged at -v)."""

    preserves_function = True

    def run(self, graph: Graph, ctx: Context) -> PassResult:
        done, kept = 0, []
        for n in graph.nodes:
            if n.domain != "" or n.op_type not in WINDOW_OPS or n.attr("auto_pad", "NOTSET") in ("NOTSET", b"NOTSET"):
                continue
            try:
                pads = window(n).pads
            except UnsupportedOpError as e:
                log.info("explicit-pads keeps %s", e)
                kept.append(n.name)
                continue
            del n.attrs["auto_pad"]
            n.attrs["pads"] = list(pads)
            done += 1
        return PassResult(graph, done > 0, {"rewritten": done, "kept": len(kept)})


@register_pass("fold-constants")
@dataclass(kw_only=True)
class FoldConstants(Pass):
    """Fold Constant nodes, nodes with only constant inputs, and Shape/Size of static shapes
    into graph constants. Preserves the function exactly.

    Nodes are evaluated with ONNX's reference implementation. Q/DQ and random ops are never
    folded; a result larger than ``max_elements`` is left as a node (folding would bloat the file)."""

    preserves_function = True

    max_elements: int = option(1 << 20, "largest folded result, in elements", minimum=1)
    shapes: bool = option(True, "fold Shape/Size of values whose shape is static")

    def run(self, graph: Graph, ctx: Context) -> PassResult:
        folded = 0
        graph.toposort()
        for node in graph.nodes:
            if node.domain != "" or node.has_subgraphs():
                continue
            outs = node.outputs
            if any(o.is_graph_output for o in outs):
                continue
            arrays: list[np.ndarray] | None = None
            if node.op_type == "Constant":
                arrays = self._constant(node)
            elif node.op_type in ("Shape", "Size") and self.shapes and node.inputs[0] is not None:
                shape = node.inputs[0].static_shape
                if shape is not None:
                    if node.op_type == "Size":
                        arrays = [np.array(int(np.prod(shape, dtype=np.int64)), dtype=np.int64)]
                    else:
                        start, end = node.attr("start", 0), node.attr("end", None)
                        arrays = [np.array(shape[start:end], dtype=np.int64)]
            elif node.op_type not in _NO_FOLD and node.inputs and all(
                    v is None or graph.const_value(v) is not None for v in node.inputs):
                if all(o.static_shape is not None and int(np.prod(o.static_shape)) > self.max_elements for o in outs):
                    continue
                try:
                    arrays = _evaluate(graph, node)
                except Exception as e:  # the reference evaluator lacks some ops: leave the node
                    log.debug("not folding %s (%s): %s", node.name, node.op_type, e)
                    continue
                if any(a.size > self.max_elements for a in arrays):
                    continue
            if arrays is None:
                continue
            for out, arr in zip(outs, arrays):
                c = graph.add_const(arr, out.name + "_const")
                graph.replace_all_uses(out, c)
            graph.remove_node(node)
            folded += 1
        removed = graph.remove_unused_constants() if folded else 0
        return PassResult(graph, folded > 0, {"folded": folded, "constants_dropped": removed})

    @staticmethod
    def _constant(node: Node) -> list[np.ndarray] | None:
        a = node.attrs
        if "value" in a and isinstance(a["value"], np.ndarray):
            return [a["value"]]
        if "value_float" in a:
            return [np.array(a["value_float"], dtype=np.float32)]
        if "value_floats" in a:
            return [np.array(a["value_floats"], dtype=np.float32)]
        if "value_int" in a:
            return [np.array(a["value_int"], dtype=np.int64)]
        if "value_ints" in a:
            return [np.array(a["value_ints"], dtype=np.int64)]
        return None  # sparse or string constants stay as nodes


@register_pass("eliminate-dead")
@dataclass(kw_only=True)
class EliminateDead(Pass):
    """Remove nodes whose outputs are never used, and unused constants. ONNX ops are pure, so
    this preserves the function; graph inputs are kept (they are the model's interface)."""

    preserves_function = True

    def run(self, graph: Graph, ctx: Context) -> PassResult:
        removed, consts = graph.eliminate_dead()
        return PassResult(graph, removed + consts > 0, {"nodes": removed, "constants": consts})


@register_pass("canonicalize")
@dataclass(kw_only=True)
class Canonicalize(Pass):
    """remove-identity, explicit-pads, fold-constants and eliminate-dead, repeated to a fixed point."""

    preserves_function = True

    max_rounds: int = option(8, "most rounds before giving up on a fixed point", minimum=1)

    def run(self, graph: Graph, ctx: Context) -> PassResult:
        parts: list[Pass] = [RemoveIdentity(), ExplicitPads(), FoldConstants(), EliminateDead()]
        stats: dict[str, int] = {}
        modified = False
        for rounds in range(1, self.max_rounds + 1):  # noqa: B007 - read after the loop
            changed = False
            for p in parts:
                r = p(graph, ctx)
                graph = r.graph
                changed |= r.modified
                for k, v in r.stats.items():
                    stats[f"{p.name}.{k}"] = stats.get(f"{p.name}.{k}", 0) + int(v)
            modified |= changed
            if not changed:
                break
        stats["rounds"] = rounds
        return PassResult(graph, modified, stats)


def _signature(graph: Graph) -> list:
    graph.toposort()
    sig = []
    for n in graph.nodes:
        sig.append((n.op_type, n.domain, tuple(sorted((k, repr(v)) for k, v in n.attrs.items())),
                    tuple(None if v is None else (v.shape if v.const is None else ("c", v.const.shape)) for v in n.inputs)))
    return sig


@register_pass("simplify")
@dataclass(kw_only=True)
class Simplify(Pass):
    """Whole-graph simplification by onnxsim (shape subgraphs, constant folding, fusions it
    knows). Preserves the function; node provenance is kept where onnxsim keeps node names.

    Use it for exported models with dynamic-shape plumbing that ``canonicalize`` cannot fold.
    The model passes through a serialized ModelProto, so it is limited to models < 2 GB."""

    preserves_function = True

    def run(self, graph: Graph, ctx: Context) -> PassResult:
        import onnxsim

        from graphopt.frontends.onnx_file import from_model_proto
        from graphopt.serialize import to_onnx

        model = to_onnx(graph)
        try:
            simplified, ok = onnxsim.simplify(model)
        except Exception as e:
            raise GraphError(f"onnxsim failed: {str(e).splitlines()[0]}") from e
        if not ok:
            raise GraphError("onnxsim could not validate the simplified model")
        new = from_model_proto(simplified)
        if _signature(new) == _signature(graph):
            return PassResult(graph, False, {})
        sources = {n.name: n.meta.get(SOURCE) for n in graph.nodes}
        for n in new.nodes:
            if sources.get(n.name):
                n.meta[SOURCE] = sources[n.name]
        return PassResult(new, True, {"nodes_before": len(graph), "nodes_after": len(new)})


