"""Per-layer facts for reports: parameters and multiply-accumulates (MACs).

MACs are counted per sample (the batch dimension, if symbolic, is taken as 1) for the ops
that dominate compute: Conv, ConvTranspose, Gemm, MatMul. Other ops count 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graphopt.geometry import geometry
from graphopt.ir import Graph, Node, format_shape, is_param

COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _per_sample(shape) -> list[int] | None:
    if shape is None:
        return None
    dims = list(shape)
    if dims and not isinstance(dims[0], int):
        dims[0] = 1
    if any(not isinstance(d, int) for d in dims):
        return None
    return dims


def node_macs(node: Node) -> int | None:
    """MACs of one node for a batch of 1, or None when shapes are unknown."""
    op = node.op_type
    if node.domain != "" or op not in COMPUTE_OPS:
        return 0
    out = _per_sample(node.outputs[0].shape)
    if out is None:
        return None
    if op == "Conv":
        w = node.inputs[1].shape if node.inputs[1] is not None else None
        if w is None or any(not isinstance(d, int) for d in w):
            return None
        return int(np.prod(out, dtype=np.int64)) * int(np.prod(w[1:], dtype=np.int64))
    if op == "ConvTranspose":
        x = _per_sample(node.inputs[0].shape)
        w = node.inputs[1].shape
        if x is None or w is None or any(not isinstance(d, int) for d in w):
            return None
        return int(np.prod(x, dtype=np.int64)) * int(np.prod(w[1:], dtype=np.int64))
    a = node.inputs[0].shape
    if a is None or not isinstance(a[-1], int):
        return None
    k = a[-1]
    if op == "Gemm" and node.attr("transA", 0):
        k = a[0] if isinstance(a[0], int) else None
        if k is None:
            return None
    return int(np.prod(out, dtype=np.int64)) * int(k)


def node_params(graph: Graph, node: Node) -> int:
    consts = [graph.const_value(v) for v in node.inputs if v is not None]
    return int(sum(c.size for c in consts if c is not None and is_param(np.asarray(c))))


@dataclass
class LayerRow:
    name: str
    op: str
    inputs: str
    output: str
    params: int
    macs: int | None


def layer_table(graph: Graph) -> list[LayerRow]:
    graph.toposort()
    rows = []
    for n in graph.nodes:
        if n.op_type == "Constant":
            continue
        act_in = [v for v in n.inputs if v is not None and graph.const_value(v) is None]
        rows.append(LayerRow(n.source, n.qualified_op, " ".join(format_shape(v.shape) for v in act_in),
                             " ".join(format_shape(v.shape) for v in n.outputs), node_params(graph, n), node_macs(n)))
    return rows


def total_macs(graph: Graph) -> int:
    return int(sum(node_macs(n) or 0 for n in graph.nodes))


def human(n: float | None, unit: str = "") -> str:
    if n is None:
        return "?"
    for div, suf in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suf}{unit}"
    return f"{n:.0f}{unit}"


def weight_ranges(graph: Graph) -> list[dict]:
    """Per linear layer: the robust spread (p99/p1) of per-output-channel max|w|, ignoring
    all-zero channels (counted separately). A large spread means one per-tensor scale cannot
    serve every channel."""
    from graphopt import geometry as L

    rows = []
    graph.toposort()
    for n in graph.nodes:
        if not L.is_linear_layer(graph, n):
            continue
        view = geometry(n).out_view(L.weight(graph, n))
        r = np.abs(view).max(axis=1)
        sp, zeros = spread(view)
        kind = n.op_type
        if n.op_type == "Conv" and n.attr("group", 1) > 1:
            kind = "depthwise" if n.attr("group", 1) == view.shape[0] else "grouped"
        nz = r[r > 0]
        rows.append({"layer": n.source, "node": n.name, "kind": kind, "channels": view.shape[0], "spread": sp,
                     "max": float(r.max()), "min_nonzero": float(nz.min()) if nz.size else 0.0, "zero_channels": zeros})
    return rows


def plot_channel_ranges(graph: Graph, layer: str, path: str) -> None:
    """Box plot of each output channel's weights for one layer (DFQ Figure 2). Needs matplotlib."""
    from graphopt import geometry as L
    from graphopt.errors import GraphOptError

    node = next((n for n in graph.nodes if layer in (n.name, n.source)), None)
    if node is None or not L.is_linear_layer(graph, node):
        raise GraphOptError(f"no Conv/Gemm/MatMul layer named '{layer}'")
    from graphopt.plotting import pyplot, save_png

    plt = pyplot("--plot")

    view = geometry(node).out_view(L.weight(graph, node))
    fig, ax = plt.subplots(figsize=(max(6, min(24, view.shape[0] / 6)), 4))
    ax.boxplot(list(view), whis=(0, 100), showfliers=False)
    ax.set_xlabel("output channel")
    ax.set_ylabel("weight")
    ax.set_title(f"per-channel weight ranges: {node.source}")
    step = max(1, view.shape[0] // 16)
    ax.set_xticks(range(1, view.shape[0] + 1, step), [str(i) for i in range(0, view.shape[0], step)])
    fig.tight_layout()
    save_png(fig, path)


def spread(w_out_view: np.ndarray) -> tuple[float, int]:
    """Robust range spread: p99 / p1 of the per-channel max |w|, ignoring all-zero channels.
    Returns (spread, number of all-zero channels)."""
    r = np.abs(w_out_view).max(axis=1)
    nz = r[r > 0]
    zeros = int((r == 0).sum())
    if nz.size == 0:
        return float("nan"), zeros
    lo, hi = np.percentile(nz, [1, 99])
    return float(hi / lo), zeros
