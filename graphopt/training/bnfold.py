"""Folding a BatchNorm trained on batch statistics back into its layer (QAT's two-phase BN).

During QAT, a layer whose BN was folded gets it back as a module that normalizes with batch
statistics (torch.ao's ConvBn schedule); afterwards the trained BN folds into the layer again:
the weight and its quantizer's scale parameters scale by g = gamma / sqrt(var + eps), so the
integer codes do not move, and the bias absorbs the shift. The torch back end builds the module
and asks ``refoldable``; ``write_back`` calls ``refold`` with the trained statistics.
"""

from __future__ import annotations

import numpy as np

from graphopt.errors import GraphOptError
from graphopt.ir import Graph, Node
from graphopt.meta import BN_STATS


def refoldable(graph: Graph, n: Node) -> str | None:
    """Why the BatchNorm folded into layer ``n`` cannot be trained as batch statistics and folded
    back (no folded BN, a computed bias, a weight quantizer that cannot follow a per-channel
    rescaling, ...), or None when it can."""
    from graphopt.geometry import geometry
    from graphopt.quantizers.base import from_node, is_fake_quant, params_of

    stats = n.outputs[0].meta.get(BN_STATS)
    if stats is None:
        return "no folded BN"
    if n.op_type == "Gemm" and (n.attr("transA", 0) or n.attr("alpha", 1.0) != 1.0 or n.attr("beta", 1.0) != 1.0):
        return "Gemm with transA or alpha/beta"
    w_fq = n.inputs[1].producer
    if not is_fake_quant(w_fq) or graph.const_value(w_fq.inputs[0]) is None:
        return "the weight is not a fake-quantized constant"
    geo = geometry(n)
    w = np.asarray(graph.const_value(w_fq.inputs[0]))
    c = geo.out_channels(w.shape)
    if np.asarray(stats["gamma"]).size != c:
        return "its BN statistics do not match its channels"
    if len(n.inputs) < 3 or n.inputs[2] is None:
        return "no bias"
    bias = n.inputs[2]
    if is_fake_quant(bias.producer):
        bias = bias.producer.inputs[0]
    if graph.const_value(bias) is None:
        return "the bias is computed"
    q, axis = from_node(w_fq), w_fq.attr("axis")
    if axis is None or axis != geo.out_axis:
        return "the weight quantizer is not per output channel"
    params = params_of(graph, w_fq)
    g = np.random.default_rng(0).uniform(0.5, 2.0, c)
    moved = q.rescaled(params, g, axis)
    if moved is None:
        return f"the {q.scheme} weight quantizer cannot follow a per-channel rescaling"
    shape = [1] * w.ndim
    shape[axis] = c
    lhs = q.apply_np(w * g.reshape(shape), moved, axis)
    rhs = q.apply_np(w, params, axis) * g.reshape(shape)
    if not np.allclose(lhs, rhs, rtol=1e-4, atol=1e-6 * float(np.abs(rhs).max() or 1.0)):
        return f"the {q.scheme} weight quantizer is not scale-equivariant"
    return None


def refold(graph: Graph, n: Node, weight: np.ndarray, shift_b: np.ndarray, mean: np.ndarray, var: np.ndarray,
           eps: float, fixed: dict[str, np.ndarray] | None = None) -> None:
    """Fold a trained BatchNorm (``weight``, bias ``shift_b``, running ``mean`` and ``var``, as
    float64 arrays) back into layer ``n``: with g = weight / sqrt(var + eps) and shift = shift_b -
    g * mean, the weight and its quantizer's scale parameters
    scale by g (the integer codes do not change) and the bias becomes g * bias + shift. The
    graph then computes what the module computes in ``eval()``. ``fixed``: the quantizer's
    parameters as the module was built, for those that do not train (the graph's may already
    have been scaled by an earlier refold)."""
    from graphopt.geometry import geometry
    from graphopt.meta import BN_STATS as _BN
    from graphopt.quantizers.base import from_node, is_fake_quant, params_of

    g = weight / np.sqrt(var + eps)
    if not np.all(np.isfinite(g)) or np.any(g <= 0):
        raise GraphOptError(f"cannot fold the trained BatchNorm back into '{n.source}': its scale is not positive "
                            f"and finite in every channel")
    shift = shift_b - g * mean
    w_fq = n.inputs[1].producer
    q, axis = from_node(w_fq), w_fq.attr("axis")
    w_v = w_fq.inputs[0]
    w = np.asarray(graph.const_value(w_v))
    geo = geometry(n)
    graph.set_const(w_v, geo.from_out_view(geo.out_view(w) * g[:, None], w.shape).astype(w.dtype))
    moved = q.rescaled({**params_of(graph, w_fq), **(fixed or {})}, g, axis)
    for i, name in enumerate(q.param_names, start=1):
        if name in q.scale_params:
            v = w_fq.inputs[i]
            graph.set_const(v, np.asarray(moved[name], np.asarray(graph.const_value(v)).dtype))
    bias = n.inputs[2]
    if is_fake_quant(bias.producer):
        bias = bias.producer.inputs[0]
    old = np.asarray(graph.const_value(bias))
    graph.set_const(bias, (g * old.astype(np.float64) + shift).astype(old.dtype))
    n.outputs[0].meta[_BN] = {"gamma": weight.astype(np.float32), "beta": shift_b.astype(np.float32)}
