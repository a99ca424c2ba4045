"""Shared helpers for passes that rescale weights: per-channel views of linear layers and the
search for layer -> (channel-wise ops) -> layer chains; and the ``skip``-pattern match that
every pass with a ``skip`` option uses.

A *linear layer* is a Conv (any ``group``, depthwise included), a Gemm, or a MatMul whose
weight is a graph constant. For such a layer:
* ``out_view(W)`` is a [C_out, -1] array: row c holds every weight that produces output c;
* ``in_view(W)`` is a [C_in, -1] array: row c holds every weight that reads input channel c.
  A grouped conv's input channel c only meets the weights of its group, and a depthwise conv's
  input channel c is exactly the filter of output channel c.
Both views have inverses, so a pass can scale rows and put the weights back.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import numpy as np

from graphopt.analysis import spread  # noqa: F401 - the passes' view of it
from graphopt.geometry import LINEAR_OPS, bias, geometry, is_linear_layer, pads_input, weight  # noqa: F401
from graphopt.ir import (
    Graph,
    Node,
    Value,
    clip_bounds,  # noqa: F401
)


def matches(node: Node, patterns) -> bool:
    """True if the node's name or its source (ONNX node name, torch module path) matches one of
    the fnmatch ``patterns``."""
    return any(fnmatch.fnmatchcase(node.source, p) or fnmatch.fnmatchcase(node.name, p) for p in patterns)


def warn_unmatched(nodes, patterns, what: str = "skip") -> list[str]:
    """Log one warning per pattern that matches none of ``nodes`` (a typo such as 'conv' for
    'conv1' would otherwise silently skip nothing); returns those patterns."""
    import logging

    nodes = list(nodes)
    bad = [p for p in patterns if not any(matches(n, [p]) for n in nodes)]
    for p in bad:
        names = ", ".join(n.source for n in nodes[:4]) + (", ..." if len(nodes) > 4 else "")
        logging.getLogger("graphopt").warning("%s pattern '%s' matches no layer (layers: %s): it skips nothing",
                                              what, p, names)
    return bad





def out_channels(graph: Graph, n: Node) -> int:
    return geometry(n).out_channels(weight(graph, n).shape)


def set_input_const(graph: Graph, n: Node, i: int, array: np.ndarray, suffix: str = "") -> None:
    """Give input ``i`` of ``n`` a new constant array, without touching other users of a shared one."""
    v = n.inputs[i] if i < len(n.inputs) else None
    array = np.ascontiguousarray(array, dtype=np.asarray(graph.const_value(v)).dtype if v is not None else None)
    if v is not None and v.const is not None and len(v.uses) == 1 and not v.is_graph_output:
        graph.set_const(v, array)
        return
    base = v.name if v is not None else f"{n.name}_in{i}"
    c = graph.add_const(array, base + suffix)
    if i < len(n.inputs):
        graph.set_input(n, i, c)
    else:
        while len(n.inputs) < i:
            graph.append_input(n, None)
        graph.append_input(n, c)


def set_bias(graph: Graph, n: Node, b: np.ndarray) -> None:
    """Set a Conv/Gemm bias (adding the input if there was none)."""
    b = np.asarray(b, dtype=weight(graph, n).dtype)
    if len(n.inputs) >= 3 and n.inputs[2] is not None:
        set_input_const(graph, n, 2, b)
    else:
        set_input_const(graph, n, 2, b, "_bias")


# ---------------------------------------------------------------------------- chains
ELEMENTWISE_HOMOGENEOUS = ("Relu", "LeakyRelu", "PRelu", "Identity", "Dropout")
POOLING = ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool")


@dataclass
class Chain:
    """layer1 -> ops -> layer2, where every op acts on each channel on its own."""

    l1: Node
    ops: list[Node]
    l2: Node
    channel_axis: int = 1

    @property
    def name(self) -> str:
        return f"{self.l1.source} -> {self.l2.source}"


@dataclass
class ChainSearch:
    chains: list[Chain] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # l1 source -> reason



def per_channel_min_bound(graph: Graph, n: Node) -> np.ndarray | None:
    """For ``Min(x, const)`` (the per-channel upper bound our rewrites emit): the constant."""
    if n.op_type != "Min" or len(n.inputs) != 2 or n.inputs[1] is None:
        return None
    return None if graph.const_value(n.inputs[1]) is None else np.asarray(graph.const_value(n.inputs[1]))


def _channel_op_ok(graph: Graph, n: Node, v: Value, rank: int | None, axis: int, channels: int) -> str | None:
    """None if ``n`` (reading ``v`` as input 0) acts on each channel alone, else the reason."""
    if n.domain != "":
        return f"{n.op_type} is not a channel-wise op"
    op = n.op_type
    if n.inputs[0] is not v:
        return f"{op} reads the value in a position other than its first input"
    if op in ("Relu", "LeakyRelu", "Identity", "Dropout"):
        return None if op != "Dropout" or len(n.outputs) == 1 or not n.outputs[1].uses else "Dropout mask is used"
    if op == "PRelu":
        slope = graph.const_value(n.inputs[1])
        return None if slope is not None else "PRelu with a computed slope"
    if op == "Clip":
        b = clip_bounds(graph, n)
        if b is None:
            return "Clip with computed bounds"
        return None if (b[0] is None or b[0] == 0.0) else f"Clip with min={b[0]} (not positively homogeneous)"
    if op == "Min":
        b = per_channel_min_bound(graph, n)
        if b is None:
            return "Min with a computed operand"
        if b.size != 1 and b.shape != channel_shape(rank, channels, axis):
            return "Min whose bound is not a scalar or per channel"
        return None
    if op in POOLING:
        if axis != 1 or (rank is not None and rank < 3):
            return f"{op} on a value whose channel axis is not 1"
        if op == "AveragePool" and n.attr("count_include_pad", 0) and pads_input(n):
            return "AveragePool counting padded zeros"
        return None
    if op == "Flatten":
        shape = v.shape
        if n.attr("axis", 1) == 1 and shape is not None and len(shape) >= 2 and all(d == 1 for d in shape[2:]):
            return None
        return "Flatten that mixes spatial positions into channels"
    return f"{op} is not a channel-wise op"


def find_chains(graph: Graph, allow_pooling: bool = True) -> ChainSearch:
    """Every linear layer whose output reaches exactly one other linear layer through
    channel-wise ops only, with no fan-out, no graph output and no Add/Concat on the way."""
    result = ChainSearch()
    graph.toposort()
    for l1 in graph.nodes:
        if not is_linear_layer(graph, l1):
            continue
        v = l1.outputs[0]
        axis = 1 if l1.op_type == "Conv" else -1
        rank = len(v.shape) if v.shape is not None else None
        if axis == -1 and rank is not None and rank == 2:
            axis = 1
        channels = out_channels(graph, l1)
        ops: list[Node] = []
        reason = None
        while True:
            if v.is_graph_output:
                reason = "its output is a graph output"
                break
            users = v.users()
            if len(users) != 1 or len(v.uses) != 1:
                reason = f"its output fans out to {len(v.uses)} uses" if len(v.uses) != 1 else "no user"
                break
            (n,) = users
            if is_linear_layer(graph, n) and n.inputs[0] is v:
                if n.op_type != "Conv" and axis == 1 and rank is not None and rank > 2:
                    reason = f"{n.op_type} does not read channels on axis 1"
                    break
                if n.op_type == "Conv" and axis != 1:
                    reason = "Conv after a layer whose channels are on the last axis"
                    break
                result.chains.append(Chain(l1, ops, n, axis))
                break
            why = _channel_op_ok(graph, n, v, rank, axis, channels)
            if why is not None or (not allow_pooling and n.op_type in POOLING):
                reason = f"stopped at {n.op_type} '{n.source}': {why or 'pooling not allowed here'}"
                break
            ops.append(n)
            v = n.outputs[0]
            if n.op_type == "Flatten":
                rank = 2
        if reason is not None:
            result.skipped[l1.source] = reason
    return result


def channel_shape(rank: int | None, channels: int, axis: int) -> tuple[int, ...]:
    """Broadcast shape of a per-channel constant for a value of ``rank`` with channels on ``axis``."""
    if rank is None or axis == -1 or rank <= 2:
        return (channels,)
    return (channels,) + (1,) * (rank - 2)
