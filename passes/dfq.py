"""Function-preserving float passes of data-free quantization (Nagel et al., ICCV 2019):
fold-bn, equalize (cross-layer equalization, DFQ section 4.1), absorb-bias (section 4.2.2)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np

from graphopt.errors import GraphOptError
from graphopt.geometry import geometry, pads_input
from graphopt.ir import Graph, Node
from graphopt.meta import BN_STATS
from graphopt.passmanager import Context, Pass, PassResult, option, register_pass

from . import _layers as L

log = logging.getLogger("graphopt.passes.dfq")



# ============================================================================ fold-bn
@register_pass("fold-bn")
@dataclass(kw_only=True)
class FoldBatchNorm(Pass):
    """Fold BatchNormalization into the Conv / ConvTranspose / Gemm / MatMul that feeds it.
    Preserves the function; keeps the BN's gamma and beta as metadata on the layer's output.

    A BN is folded when its producer has a constant weight and no other user. A MatMul becomes
    a Gemm with the folded bias (rank-2 inputs only). A BN with no foldable producer stays and
    is listed in the stats as ``unfolded``."""

    before = ("quantize",)  # quantized weights are no longer constants to fold into
    preserves_function = True

    def run(self, graph: Graph, ctx: Context) -> PassResult:
        folded, unfolded = 0, []
        for bn in graph.find_nodes("BatchNormalization"):
            why = self._fold(graph, bn)
            if why is None:
                folded += 1
            else:
                unfolded.append(bn.source)
                log.info("fold-bn: BN '%s' left in place: %s", bn.source, why)
        if folded:
            graph.remove_unused_constants()
        return PassResult(graph, folded > 0, {"folded": folded, "unfolded": unfolded})

    @staticmethod
    def _fold(graph: Graph, bn: Node) -> str | None:
        if bn.domain != "" or bn.attr("training_mode", 0):
            return "training-mode BN"
        if len(bn.outputs) > 1 and any(o.uses or o.is_graph_output for o in bn.outputs[1:]):
            return "its running statistics outputs are used"
        params = [graph.const_value(v) for v in bn.inputs[1:5]]
        if any(p is None for p in params):
            return "computed BN parameters"
        gamma, beta, mean, var = (np.asarray(p, np.float64) for p in params)
        x = bn.inputs[0]
        p = x.producer
        if p is None or p.domain != "":
            return "no producer layer"
        if len(x.uses) != 1 or x.is_graph_output:
            return f"the output of '{p.source}' has other users"
        w = graph.const_value(p.inputs[1]) if len(p.inputs) > 1 else None
        if w is None or p.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            return f"producer {p.op_type} '{p.source}' is not a layer with constant weights"
        w = np.asarray(w)
        eps = float(bn.attr("epsilon", 1e-5))
        scale = gamma / np.sqrt(var + eps)
        shift = beta - mean * scale
        if p.op_type == "Gemm":
            if p.attr("transA", 0) or x.shape is None or len(x.shape) != 2:
                return "Gemm with transA or not rank 2"
            alpha, beta_g = float(p.attr("alpha", 1.0)), float(p.attr("beta", 1.0))
            if alpha != 1.0 or beta_g != 1.0:
                return "Gemm with alpha/beta != 1"
        elif p.op_type == "MatMul":
            if x.shape is None or len(x.shape) != 2 or w.ndim != 2 or p.inputs[0].shape is None \
                    or len(p.inputs[0].shape) != 2:
                return "MatMul whose input is not rank 2 (BN channels would not be its columns)"
        geo = geometry(p)
        new_w = geo.from_out_view(geo.out_view(w) * scale[:, None], w.shape)
        old_b = L.bias(graph, p) if p.op_type != "MatMul" else None
        if old_b is not None and old_b.shape != scale.shape:
            return "bias that is not per output channel"
        b = (np.zeros_like(scale) if old_b is None else old_b.astype(np.float64)) * scale + shift
        L.set_input_const(graph, p, 1, new_w.astype(w.dtype))
        if p.op_type == "MatMul":
            p.op_type = "Gemm"
            p.attrs.clear()
        if len(p.inputs) >= 3 and p.inputs[2] is not None:
            L.set_input_const(graph, p, 2, b.astype(w.dtype))
        else:
            L.set_input_const(graph, p, 2, b.astype(w.dtype), "_bias")
        out = x
        out.meta[BN_STATS] = {"gamma": gamma.astype(np.float32), "beta": beta.astype(np.float32)}
        bn_out = bn.outputs[0]
        graph.replace_all_uses(bn_out, out)
        _remove_bn(graph, bn)
        return None


@register_pass("recalibrate-bn")
@dataclass(kw_only=True)
class RecalibrateBatchNorm(Pass):
    """Re-estimate the statistics of every (unfolded) BatchNormalization from the calibration
    data: after pruning, a BN's stored mean and variance describe the unpruned network and no
    longer match its input (the "adaptive BN" of EagleEye, Li et al. 2020). The graph runs in
    torch training mode, so each BN normalizes with batch statistics, and the running
    statistics become the average over all batches (``torch.optim.swa_utils.update_bn``).
    Weights are not touched. Run it before fold-bn; a graph without BN is left alone."""

    before = ("fold-bn",)  # it needs the BatchNormalization nodes fold-bn removes

    def run(self, graph: Graph, ctx: Context) -> PassResult:
        bns = [n for n in graph.nodes if n.op_type == "BatchNormalization"]
        if not bns:
            return PassResult(graph, False, {"recalibrated": 0, "reason": "no BatchNormalization (folded already?)"})
        if ctx.calib is None:
            raise GraphOptError("recalibrate-bn needs calibration data (--calib)")
        import torch
        from torch.optim.swa_utils import update_bn

        from graphopt.backends.torch_module import to_torch
        from graphopt.training.calibration import CalibrationData

        data = ctx.calib if isinstance(ctx.calib, CalibrationData) else CalibrationData(ctx.calib)
        module = to_torch(graph, train_bn=True)
        if not module.buffer_names:
            return PassResult(graph, False, {"recalibrated": 0, "reason": "no BN with constant statistics"})
        before = {name: np.asarray(graph.const_value(graph.values[name])).copy() for name in module.buffer_names}
        with torch.no_grad():
            update_bn((torch.from_numpy(np.ascontiguousarray(b)) for b in data), module)
        module.eval()
        graph.update_from(module)
        changed = sum(not np.array_equal(np.asarray(graph.const_value(graph.values[k])), v) for k, v in before.items())
        return PassResult(graph, changed > 0, {"recalibrated": len(module.buffer_names) // 2})


def _remove_bn(graph: Graph, bn: Node) -> None:
    for o in bn.outputs[1:]:
        if o.uses or o.is_graph_output:
            raise GraphOptError(f"BN '{bn.name}' output '{o.name}' is still used")
    graph.remove_node(bn, safe=False)


# ============================================================================ equalize
def _rank(chain: L.Chain) -> int | None:
    shape = chain.l1.outputs[0].shape
    return len(shape) if shape is not None else None


def _scale_chain_ops(graph: Graph, chain: L.Chain, inv_s: np.ndarray, mode: str) -> None:
    """Apply 'channel c is multiplied by inv_s[c]' to the ops between the layers."""
    new_ops: list[Node] = []
    rank = _rank(chain)
    for op in chain.ops:
        if op.op_type == "Clip":
            lo, hi = L.clip_bounds(graph, op)
            if hi is None:
                new_ops.append(op)
                continue
            if mode == "relu":
                new_ops.extend(_clip_to_relu(graph, op, None))
                continue
            new_ops.extend(_clip_to_relu(graph, op, np.full(len(inv_s), hi, np.float32) * inv_s, rank, chain.channel_axis))
            continue
        if op.op_type == "Min":
            bound = L.per_channel_min_bound(graph, op)
            bound = _per_channel(bound, len(inv_s), rank, chain.channel_axis)
            L.set_input_const(graph, op, 1, (bound * inv_s.reshape(bound.shape)).astype(np.float32))
        new_ops.append(op)
    chain.ops = new_ops


def _per_channel(bound: np.ndarray, channels: int, rank: int | None, axis: int) -> np.ndarray:
    """A scalar or per-channel bound as a per-channel array shaped for broadcasting."""
    b = np.asarray(bound, np.float32).reshape(-1)
    if b.size == 1:
        b = np.full(channels, b[0], np.float32)
    elif b.size != channels:
        raise GraphOptError(f"Min bound of size {b.size} is not per channel ({channels} channels)")
    return b.reshape(L.channel_shape(rank, channels, axis)).copy()


def _clip_to_relu(graph: Graph, clip: Node, bound: np.ndarray | None, rank: int | None = None,
                  axis: int = 1) -> list[Node]:
    """Clip(x, 0, M) -> Relu(x) [-> Min(., bound per channel)]. Returns the new ops in order."""
    x = clip.inputs[0]
    relu = graph.add_node("Relu", [x], [clip.outputs[0].name + "_relu"], source=clip.source,
                          name=graph.unique_node_name(clip.name + "_relu"))
    out = relu.outputs[0]
    nodes = [relu]
    if bound is not None:
        c = graph.add_const(bound.reshape(L.channel_shape(rank, bound.size, axis)).astype(np.float32),
                            clip.name + "_bound")
        mn = graph.add_node("Min", [out, c], [clip.outputs[0].name + "_min"], source=clip.source,
                            name=graph.unique_node_name(clip.name + "_min"))
        out = mn.outputs[0]
        nodes.append(mn)
    out.dtype, out.shape = clip.outputs[0].dtype, clip.outputs[0].shape
    relu.outputs[0].dtype, relu.outputs[0].shape = x.dtype, x.shape
    graph.replace_all_uses(clip.outputs[0], out)
    graph.remove_node(clip)
    return nodes


def _has_bounded_clip(graph: Graph, chain: L.Chain) -> bool:
    return any(op.op_type == "Clip" and (L.clip_bounds(graph, op) or (None, None))[1] is not None for op in chain.ops)


def _ranges(graph: Graph, chain: L.Chain) -> tuple[np.ndarray, np.ndarray]:
    r1 = np.abs(geometry(chain.l1).out_view(L.weight(graph, chain.l1))).max(axis=1).astype(np.float64)
    r2 = np.abs(geometry(chain.l2).in_view(L.weight(graph, chain.l2))).max(axis=1).astype(np.float64)
    return r1, r2


def equalize_chain(graph: Graph, chain: L.Chain, s: np.ndarray, mode: str) -> None:
    """Layer 1's output channel c / s_c, layer 2's input channel c * s_c."""
    l1, l2 = chain.l1, chain.l2
    w1, w2 = L.weight(graph, l1), L.weight(graph, l2)
    g1 = geometry(l1)
    L.set_input_const(graph, l1, 1, g1.from_out_view(g1.out_view(w1) / s[:, None].astype(w1.dtype), w1.shape))
    b1 = L.bias(graph, l1)
    if b1 is not None:
        L.set_input_const(graph, l1, 2, (b1 / s).astype(b1.dtype))
    g2 = geometry(l2)
    L.set_input_const(graph, l2, 1, g2.from_in_view(g2.in_view(w2) * s[:, None].astype(w2.dtype), w2.shape))
    _scale_chain_ops(graph, chain, (1.0 / s).astype(np.float32), mode)
    meta = l1.outputs[0].meta.get(BN_STATS)
    if meta is not None:
        l1.outputs[0].meta[BN_STATS] = {"gamma": meta["gamma"] / s, "beta": meta["beta"] / s}


@register_pass("equalize")
@dataclass(kw_only=True)
class Equalize(Pass):
    """Cross-layer equalization (DFQ 4.1): rescale channels so paired layers have equal
    per-channel weight ranges. Preserves the function exactly by default.

    A pair is layer1 -> channel-wise ops -> layer2, where each layer is a Conv (grouped and
    depthwise too), a Gemm or a MatMul. The ops in between must act on each channel alone and
    be positively homogeneous: ReLU, LeakyReLU, PReLU, pooling, Flatten of a [N,C,1,1] value.
    Layer1's output channel c is divided by s_c = sqrt(r1_c r2_c) / r2_c, and layer2's input
    channel c is multiplied by it. Pairs are swept until every s is within ``tol`` of 1.
    Where an Add, a Concat or a fan-out couples a layer's channels, the pair is left alone.
    A ReLU6 / Clip(0, M) between the layers keeps the function. With ``relu6=rewrite`` it
    becomes Relu followed by Min(x, M/s_c per channel). ``relu6=skip`` leaves such pairs
    alone. ``relu6=relu`` replaces it by ReLU, as the paper does; that changes the function
    and is logged as a warning."""

    after = ("fold-bn",)  # equalizing through an unfolded BN is not exact
    before = ("quantize",)  # rescaling quantized weights would break their scales
    preserves_function = True

    max_iters: int = option(100, "most sweeps over all pairs", minimum=1)
    tol: float = option(1e-4, "converged when every scale is within tol of 1", minimum=0.0)
    relu6: Literal["rewrite", "skip", "relu"] = option("rewrite", "how to treat Clip(0, M) between a pair")

    def run(self, graph: Graph, ctx: Context) -> PassResult:
        search = L.find_chains(graph)
        chains = search.chains
        skipped = dict(search.skipped)
        if self.relu6 == "skip":
            for c in [c for c in chains if _has_bounded_clip(graph, c)]:
                skipped[c.l1.source] = "a bounded Clip between the pair (relu6=skip)"
                chains.remove(c)
        rank_ok = []
        for c in chains:
            if _has_bounded_clip(graph, c) and _rank(c) is None:
                skipped[c.l1.source] = "unknown rank (run shape inference)"
            else:
                rank_ok.append(c)
        chains = rank_ok
        before = {c.name: (L.spread(geometry(c.l1).out_view(L.weight(graph, c.l1)))[0],
                           L.spread(geometry(c.l2).in_view(L.weight(graph, c.l2)))[0]) for c in chains}
        if self.relu6 == "relu" and any(_has_bounded_clip(graph, c) for c in chains):
            log.warning("equalize{relu6=relu}: replacing Clip(0, M) by ReLU changes the model's function")
        iterations, changed = 0, False
        for it in range(self.max_iters):
            worst = 0.0
            for c in chains:
                r1, r2 = _ranges(graph, c)
                ok = (r1 > 0) & (r2 > 0)
                s = np.ones_like(r1)
                s[ok] = np.sqrt(r1[ok] * r2[ok]) / r2[ok]
                dev = float(np.abs(s - 1).max()) if s.size else 0.0
                if dev <= self.tol:
                    continue
                worst = max(worst, dev)
                equalize_chain(graph, c, s, self.relu6)
                changed = True
            iterations = it + 1
            if worst <= self.tol:
                break
        pairs = []
        for c in chains:
            after = (L.spread(geometry(c.l1).out_view(L.weight(graph, c.l1)))[0],
                     L.spread(geometry(c.l2).in_view(L.weight(graph, c.l2)))[0])
            pairs.append({"pair": c.name, "spread1_before": before[c.name][0], "spread1_after": after[0],
                          "spread2_before": before[c.name][1], "spread2_after": after[1]})
            log.info("equalize %s: layer1 spread %.1f -> %.1f, layer2 spread %.1f -> %.1f", c.name,
                     before[c.name][0], after[0], before[c.name][1], after[1])
        for name, why in skipped.items():
            log.info("equalize: no pair from '%s': %s", name, why)
        if changed:
            graph.remove_unused_constants()
        return PassResult(graph, changed, {"pairs": len(chains), "iterations": iterations if changed else 0,
                                           "skipped": len(skipped), "pair_spreads": pairs,
                                           "skipped_reasons": skipped})


# ============================================================================ absorb-bias
_ABSORB_OPS = ("Relu", "Clip", "Min", "Identity", "Dropout", "MaxPool", "AveragePool", "GlobalAveragePool",
               "GlobalMaxPool", "Flatten")


def _absorbable(graph: Graph, chain: L.Chain, padded: bool) -> str | None:
    if not any(op.op_type in ("Relu", "Clip") for op in chain.ops):
        return "no ReLU/ReLU6 between the layers"
    for op in chain.ops:
        if op.op_type not in _ABSORB_OPS:
            return f"{op.op_type} does not commute with a per-channel shift"
        if op.op_type in ("AveragePool", "MaxPool") and pads_input(op):
            return f"{op.op_type} with padding"
    l2 = chain.l2
    if l2.op_type == "MatMul":
        return "layer 2 is a MatMul (no bias to absorb into)"
    if l2.op_type == "Conv" and not padded and pads_input(l2):
        return "layer 2 pads with zeros (absorbing would be approximate at the borders; padded=true allows it)"
    return None


def _bias_delta(graph: Graph, l2: Node, c: np.ndarray) -> np.ndarray:
    """What layer 2 adds to its output when its input channel i carries the constant c_i."""
    return geometry(l2).mean_output(L.weight(graph, l2), c)


@register_pass("absorb-bias")
@dataclass(kw_only=True)
class AbsorbBias(Pass):
    """High-bias absorption (DFQ 4.2.2): move c = max(0, lower bound of layer1's output) through
    the ReLU into layer2's bias, so layer1's output range shrinks.

    c comes from one of two sources. From the BN that fold-bn folded: c = max(0, beta - sigmas*|gamma|).
    This is approximate: exact only on inputs above that bound. Or from calibration data, run
    through the torch back end: c = max(0, channel minimum). That is exact on the calibration
    data, and only there. An unseen input whose pre-activation falls below c is changed, so
    calibrate on data that covers deployment. Layer2's bias grows by W2 . c. A ReLU6 becomes
    ReLU then Min(x, 6 - c). Pairs whose layer2 pads with zeros are left alone unless
    ``padded=true``, because the border outputs would change."""

    after = ("fold-bn",)
    before = ("quantize",)

    source: Literal["auto", "bn", "data"] = option("auto", "auto: BN metadata if present, else calibration data")
    sigmas: float = option(3.0, "the k in beta - k*gamma for the BN rule", minimum=0.0)
    padded: bool = option(False, "also absorb into zero-padded convs (approximate at borders)")

    def run(self, graph: Graph, ctx: Context) -> PassResult:
        if self.source == "data" and ctx.calib is None:
            raise GraphOptError("absorb-bias{source=data} needs calibration data (--calib)")
        search = L.find_chains(graph)
        todo: list[tuple[L.Chain, str]] = []
        skipped = dict(search.skipped)
        for chain in search.chains:
            why = _absorbable(graph, chain, self.padded)
            if why:
                skipped[chain.l1.source] = why
                continue
            has_bn = BN_STATS in chain.l1.outputs[0].meta
            src = "bn" if (self.source == "bn" or (self.source == "auto" and has_bn)) else "data"
            if src == "bn" and not has_bn:
                skipped[chain.l1.source] = "no BN metadata (fold-bn did not fold a BN here)"
                continue
            if src == "data" and ctx.calib is None:
                skipped[chain.l1.source] = "no BN metadata and no calibration data (--calib)"
                continue
            todo.append((chain, src))
        mins = {}
        data_chains = [ch for ch, src in todo if src == "data"]
        if data_chains:
            from graphopt.training.calibration import MinMax, observe

            axis = {ch.l1.outputs[0].name: ch.channel_axis for ch in data_chains}
            res = observe(graph, ctx.calib, {name: MinMax(axis=ax) for name, ax in axis.items()},
                          progress=ctx.show_progress, desc="absorb-bias")
            mins = {k: (v["min"].astype(np.float64), np.maximum(np.abs(v["min"]), np.abs(v["max"])).astype(np.float64))
                    for k, v in res.items()}
        absorbed = 0
        total_shift = 0.0
        for chain, src in todo:
            out = chain.l1.outputs[0]
            if src == "bn":
                m = out.meta[BN_STATS]
                beta, gamma = m["beta"].astype(np.float64), np.abs(m["gamma"].astype(np.float64))
                c, scale = np.maximum(0.0, beta - self.sigmas * gamma), np.abs(beta) + self.sigmas * gamma
            else:
                lo, scale = mins[out.name]
                c = np.maximum(0.0, lo)
            b1 = L.bias(graph, chain.l1)
            scale = scale + (0.0 if b1 is None else np.abs(b1.astype(np.float64)))
            c[c <= 1e-5 * scale] = 0.0  # float rounding left by an earlier absorption is not a shift
            if not np.any(c > 0):
                continue
            self._apply(graph, chain, c)
            absorbed += 1
            total_shift += float(c.sum())
            log.info("absorb-bias %s: shifted %d channels (%s), max c %.3g", chain.name, int((c > 0).sum()), src, c.max())
        for name, why in skipped.items():
            log.info("absorb-bias: not from '%s': %s", name, why)
        if absorbed:
            graph.remove_unused_constants()
        return PassResult(graph, absorbed > 0, {"absorbed": absorbed, "skipped": len(skipped),
                                                "skipped_reasons": skipped})

    @staticmethod
    def _apply(graph: Graph, chain: L.Chain, c: np.ndarray) -> None:
        l1, l2 = chain.l1, chain.l2
        dtype = L.weight(graph, l1).dtype
        b1 = L.bias(graph, l1)
        b1 = np.zeros(len(c), np.float64) if b1 is None else b1.astype(np.float64)
        L.set_bias(graph, l1, (b1 - c).astype(dtype))
        rank = _rank(chain)
        new_ops = []
        for op in chain.ops:
            if op.op_type == "Clip":
                lo, hi = L.clip_bounds(graph, op)
                bound = None if hi is None else (hi - c).astype(np.float32)
                new_ops.extend(_clip_to_relu(graph, op, bound, rank, chain.channel_axis))
                continue
            if op.op_type == "Min":
                bound = _per_channel(L.per_channel_min_bound(graph, op), len(c), rank, chain.channel_axis)
                L.set_input_const(graph, op, 1, (bound - c.reshape(bound.shape)).astype(np.float32))
            new_ops.append(op)
        chain.ops = new_ops
        b2 = L.bias(graph, l2)
        delta = _bias_delta(graph, l2, c)
        b2 = delta if b2 is None else b2.astype(np.float64) + delta
        L.set_bias(graph, l2, b2.astype(dtype))
        meta = l1.outputs[0].meta.get(BN_STATS)
        if meta is not None:
            l1.outputs[0].meta[BN_STATS] = {"gamma": meta["gamma"], "beta": (meta["beta"] - c).astype(np.float32)}
