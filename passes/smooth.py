"""Per-input-channel scaling of linear layers, folded where the function allows: SmoothQuant
for int8 activations (``smooth``) and AWQ for low-bit weights (``awq``).

SmoothQuant (Xiao et al., ICML 2023): move activation outliers into the weights.

A few input channels of a transformer's linear layers carry values 10-100x the rest, so one
per-tensor activation scale wastes most of its codes on them. For the linear layers reading one
activation X (q, k, v share theirs), SmoothQuant divides X's channel j by

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

(max|X_j| over the calibration data, max|W_j| over row j of every reader's weight) and
multiplies row j of each weight by s_j: X W = (X / s)(s W), so the function is unchanged and
the outliers now sit in the weights, which are quantized per output channel.

Where the division goes:

* into the LayerNormalization that produces X (its scale and bias divided by s), when every
  reader of X is one of the linear layers: free at run time;
* otherwise (X also feeds a residual Add, as in every post-LN encoder such as BERT, or X comes
  from a non-linear op) an explicit per-channel ``Mul`` by 1/s in front of the linear layers
  only; the summary says which layers got one and why. In the integer export it runs in float
  before the activation's QuantizeLinear (one elementwise multiply per smoothed input).

``alpha`` is the migration strength (the paper: 0.5 for most models; higher moves more into the
weights). ``alpha=auto`` chooses per input, on the calibration data, the alpha in
{0.3, ..., 0.8} whose smoothed input and weights lose the least in a simulated int8
quantize-dequantize of the layers' outputs (never on the data that scores the model).

AWQ (Lin et al., MLSys 2024), for weight-only quantization (activations stay float): the input
channels that carry the largest activations matter most, so their weight rows are scaled *up*
by s_j = mean|X_j|^alpha (normalised so that max(s) min(s) = 1) before the weights are rounded,
which gives them finer steps relative to their size, and X is divided by s as above. ``alpha``
is searched per input on a grid in [0, 1], minimising the layers' output error
E||X W - (X / s) Q(s W)||^2 under the weight quantizer the later ``quantize`` pass uses
(``weights=``, the same spec text), computed from the calibration data's X^T X and mean|X| in
one pass over it. alpha = 0 is plain rounding, so the chosen scaling never does worse on the
calibration data; an input whose best alpha gains less than ``min_gain`` is left alone (this
also makes a second run a no-op).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from graphopt.errors import GraphOptError
from graphopt.ir import Graph, Node, Value
from graphopt.meta import AWQ_SCALE
from graphopt.passbase import Context, Pass, PassResult, option, register_pass

from . import _layers as L

ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


def _weight_rows(graph: Graph, n: Node) -> np.ndarray | None:
    """The weight of a linear layer as [in, out] (rows = input channels), or None."""
    if n.op_type == "MatMul":
        w = graph.const_value(n.inputs[1])
        return None if w is None or np.asarray(w).ndim != 2 else np.asarray(w)
    if n.op_type == "Gemm" and not n.attr("transA", 0):
        w = graph.const_value(n.inputs[1])
        if w is None:
            return None
        return np.asarray(w).T if n.attr("transB", 0) else np.asarray(w)
    return None


def _scale_rows(graph: Graph, n: Node, s: np.ndarray) -> None:
    """Multiply input channel j of ``n``'s weight by s_j (a new constant: weights are shared)."""
    w = np.asarray(graph.const_value(n.inputs[1]))
    new = w * s[None, :] if n.op_type == "Gemm" and n.attr("transB", 0) else w * s[:, None]
    graph.set_input(n, 1, graph.add_const(new.astype(w.dtype), n.inputs[1].name + "_smooth"))


def _groups(graph: Graph, skip) -> dict[Value, list[Node]]:
    """Activation value -> the linear layers (const weights) that read it as input 0."""
    out: dict[Value, list[Node]] = {}
    for n in graph.nodes:
        if n.op_type not in ("MatMul", "Gemm") or L.matches(n, skip):
            continue
        x = n.inputs[0]
        if x.const is not None or _weight_rows(graph, n) is None:
            continue
        out.setdefault(x, []).append(n)
    return out


def smooth_factors(amax: np.ndarray, wmax: np.ndarray, alpha: float) -> np.ndarray:
    """s_j = amax_j^alpha / wmax_j^(1 - alpha), 1 where either is zero, within [1e-5, 1e5]."""
    ok = (amax > 0) & (wmax > 0)
    s = np.ones_like(amax, dtype=np.float64)
    s[ok] = amax[ok] ** alpha / wmax[ok] ** (1 - alpha)
    return np.clip(s, 1e-5, 1e5)


def _int8_error(xs: np.ndarray, ws: list[np.ndarray], s: np.ndarray) -> float:
    """Output error of per-tensor int8 X / s times per-column int8 s W, summed over the readers."""
    xq = xs / s
    step = np.abs(xq).max() / 127 or 1.0
    xq = np.round(xq / step) * step
    err = 0.0
    for w in ws:
        ww = w * s[:, None]
        ws_ = np.abs(ww).max(0, keepdims=True) / 127
        ws_[ws_ == 0] = 1.0
        wq = np.round(ww / ws_) * ws_
        err += float(np.sum((xq @ wq - xs @ w) ** 2))
    return err


@register_pass("smooth")
@dataclass(kw_only=True)
class Smooth(Pass):
    """SmoothQuant: per-channel factors move activation outliers of linear layers' inputs into
    their weights (folded into the LayerNorm before them where it feeds only them, else an
    explicit Mul); function-preserving. Calibrated on --calib. See the module doc."""

    after = ("canonicalize",)
    before = ("quantize",)
    preserves_function = True

    alpha: str = option("0.5", "migration strength in [0, 1], or auto (chosen per input on the calibration data)")
    skip: list[str] = option([], "layer name patterns to leave alone")
    min_outlier: float = option(1.0, "smooth an input only if max|X| over its channels / their median exceeds this")
    samples: Optional[int] = option(64, "calibration samples used", minimum=1)

    def run(self, graph: Graph, ctx: Context) -> PassResult:
        if self.alpha != "auto":
            try:
                a = float(self.alpha)
            except ValueError:
                raise GraphOptError(f"smooth: alpha must be a number in [0, 1] or auto, not '{self.alpha}'") from None
            if not 0.0 <= a <= 1.0:
                raise GraphOptError(f"smooth: alpha must be in [0, 1], not {a}")
        groups = _groups(graph, self.skip)
        if not groups:
            return PassResult(graph, False, {"smoothed": 0, "reason": "no linear layer reads an activation"})
        if ctx.calib is None:
            raise GraphOptError("smooth needs calibration data (--calib) for the activations' channel ranges")
        from graphopt.training.calibration import CalibrationData, MinMax, observe

        data = CalibrationData(ctx.calib, limit=self.samples)
        auto = self.alpha == "auto"  # one pass over the data: channel ranges, and token rows to choose alpha
        res = observe(graph, data, {x.name: [MinMax(axis=-1)] + ([_Rows()] if auto else []) for x in groups},
                      progress=ctx.show_progress, desc="calibrating (smooth)")
        samples = {k: v[1] for k, v in res.items()} if auto else {}
        res = {k: v[0] for k, v in res.items()}
        folded: dict[str, str] = {}
        explicit: dict[str, str] = {}
        alphas: dict[str, float] = {}
        for x, layers in groups.items():
            r = res[x.name]
            amax = np.maximum(np.abs(r["min"]), np.abs(r["max"])).astype(np.float64)
            ws = [_weight_rows(graph, n).astype(np.float64) for n in layers]
            if any(w.shape[0] != amax.size for w in ws):
                continue
            med = float(np.median(amax)) or 1.0
            if amax.max() / med <= self.min_outlier:
                continue
            wmax = np.max([np.abs(w).max(1) for w in ws], axis=0)
            if self.alpha == "auto":
                xs = samples[x.name]
                errs = {a: _int8_error(xs, ws, smooth_factors(amax, wmax, a)) for a in ALPHAS}
                a = min(errs, key=errs.get)
            else:
                a = float(self.alpha)
            s = smooth_factors(amax, wmax, a).astype(np.float32)
            if np.all(np.abs(s - 1) < 1e-3):  # already balanced (a smoothed graph): nothing to move
                continue
            names = ", ".join(n.source for n in layers)
            where = _apply(graph, x, layers, s)
            (folded if where.startswith("into") else explicit)[names] = where
            alphas[names] = a
        return PassResult(graph, bool(folded or explicit),
                          {"smoothed": len(folded) + len(explicit), "folded": folded, "explicit": explicit,
                           "alpha": alphas})


def _apply(graph: Graph, x: Value, layers: list[Node], s: np.ndarray) -> str:
    """X W = (X / s)(s W): divide ``x``'s channels by s for ``layers`` and scale their weight
    rows by s. Returns where the division went, for the summary."""
    where = _divide(graph, x, layers, s)
    for n in layers:
        _scale_rows(graph, n, s)
    return where


def _divide(graph: Graph, x: Value, layers: list[Node], s: np.ndarray) -> str:
    """Divide channel j of ``x`` by s_j for ``layers``: into its LayerNormalization when only
    they read it, else an explicit Mul in front of them. Returns where, for the summary."""
    p = x.producer
    readers = set(x.users()) | ({None} if x in graph.outputs else set())
    only_layers = readers == set(layers)
    if p is not None and p.op_type == "LayerNormalization" and only_layers and len(p.outputs) == 1:
        gamma, beta = graph.const_value(p.inputs[1]), graph.const_value(p.inputs[2]) if len(p.inputs) > 2 else None
        axis = p.attr("axis", -1)
        if gamma is not None and np.asarray(gamma).shape == s.shape and axis in (-1, len(x.shape or [0]) - 1):
            graph.set_input(p, 1, graph.add_const((np.asarray(gamma) / s).astype(np.float32), p.inputs[1].name + "_smooth"))
            if beta is not None:
                graph.set_input(p, 2, graph.add_const((np.asarray(beta) / s).astype(np.float32),
                                                      p.inputs[2].name + "_smooth"))
            return f"into LayerNormalization '{p.source}'"
    others = sorted({"the graph output" if n is None else n.op_type for n in readers - set(layers)})
    why = (f"it also feeds {', '.join(others)}" if not only_layers
           else f"its producer is {p.op_type if p is not None else 'a graph input'}, not a LayerNormalization")
    inv = graph.add_const((1.0 / s).astype(np.float32), x.name + "_smooth_inv")
    mul = graph.add_node("Mul", [x, inv], [x.name + "_smoothed"], source=layers[0].source,
                         name=graph.unique_node_name(x.name + "_smooth"))
    mul.outputs[0].dtype, mul.outputs[0].shape = x.dtype, x.shape
    for n in layers:
        graph.set_input(n, 0, mul.outputs[0])
    return f"explicit per-channel Mul ({why})"


@register_pass("awq")
@dataclass(kw_only=True)
class AWQ(Pass):
    """AWQ, activation-aware weight scaling for low-bit weight-only quantization: per input
    channel, s = mean|X|^alpha with alpha searched on the calibration data against the output
    error of the given weight quantizer; X / s is folded into the LayerNorm before or an
    explicit Mul, s W into the weights. Function-preserving; run it before quantize with the
    same weights spec. See the module doc."""

    after = ("canonicalize", "smooth")
    before = ("quantize",)
    preserves_function = True

    weights: str = option("int4:block32", "the weight quantizer of the quantize pass that follows (same spec text)")
    grid: int = option(20, "alpha is searched over grid + 1 points in [0, 1]", minimum=1)
    min_gain: float = option(0.01, "scale an input only if its output error drops by at least this fraction", minimum=0.0)
    skip: list[str] = option([], "layer name patterns to leave alone")
    samples: Optional[int] = option(64, "calibration samples used", minimum=1)

    def run(self, graph: Graph, ctx: Context) -> PassResult:
        from graphopt.quantizers.base import parse

        q = parse(self.weights, "weights")
        if not self.min_gain < 1:
            raise GraphOptError(f"awq: min_gain must be below 1, not {self.min_gain}")
        groups = _groups(graph, self.skip)
        if not groups:
            return PassResult(graph, False, {"scaled": 0, "reason": "no linear layer reads an activation"})
        already = sorted(n.source for ls in groups.values() for n in ls if AWQ_SCALE in n.meta)
        groups = {x: ls for x, ls in groups.items() if not any(AWQ_SCALE in n.meta for n in ls)}
        if not groups:  # every input was scaled by an earlier run: its search started from there
            return PassResult(graph, False, {"scaled": 0, "already_scaled": already})
        if ctx.calib is None:
            raise GraphOptError("awq needs calibration data (--calib): it weighs each weight row by its input's "
                                "activations")
        from graphopt.quantizers.gptq import HessianObserver
        from graphopt.training.calibration import AbsMean, CalibrationData, observe

        res = observe(graph, CalibrationData(ctx.calib, limit=self.samples),
                      {x.name: [AbsMean(axis=-1), HessianObserver("MatMul")] for x in groups},
                      progress=ctx.show_progress, desc="calibrating (awq)")
        folded: dict[str, str] = {}
        explicit: dict[str, str] = {}
        alphas: dict[str, float] = {}
        gains: dict[str, float] = {}
        for x, layers in groups.items():
            xm, H = res[x.name][0]["abs_mean"], res[x.name][1][0]
            ws = [_weight_rows(graph, n).astype(np.float64) for n in layers]
            if any(w.shape[0] != xm.size for w in ws) or not np.any(xm > 0):
                continue
            a, s, err, err0 = awq_search(xm, H, ws, q, self.grid)
            names = ", ".join(n.source for n in layers)
            if err0 <= 0 or err > (1 - self.min_gain) * err0:
                continue
            where = _apply(graph, x, layers, s.astype(np.float32))
            for n in layers:
                n.meta[AWQ_SCALE] = s.astype(np.float32)
            (folded if where.startswith("into") else explicit)[names] = where
            alphas[names], gains[names] = a, round(1 - err / err0, 4)
        return PassResult(graph, bool(folded or explicit),
                          {"scaled": len(folded) + len(explicit), "folded": folded, "explicit": explicit,
                           "alpha": alphas, "error_drop": gains, "weights": str(q),
                           **({"already_scaled": already} if already else {})})


def awq_search(xm: np.ndarray, H: np.ndarray, ws: list[np.ndarray], q, grid: int = 20):
    """AWQ's grid search for one input X read by the weights ``ws`` ([in, out] each).
    ``xm`` = mean|X_j|, ``H`` = E[X^T X]; ``q`` is the weight quantizer (any scheme: its own
    parameters and rounding). For alpha in {0, 1/grid, ..., 1}, s = xm^alpha / sqrt(max min)
    and the output error is sum_i tr(D_i^T H D_i), D_i = W_i - Q(s W_i) / s. Returns (alpha, s,
    its error, the error at alpha = 0)."""
    Ht = torch.from_numpy(np.asarray(H, np.float64))
    base = np.maximum(np.asarray(xm, np.float64), 1e-8)
    alphas = np.linspace(0.0, 1.0, grid + 1)
    errs, scales = [], []
    for a in alphas:  # grid points in sequence; every one is a batched computation
        s = np.clip(base ** a, 1e-4, None)
        s = s / np.sqrt(s.max() * s.min())
        err = 0.0
        for w in ws:
            sw = (w * s[:, None]).astype(np.float32)
            params, axis = q.weight_params(sw, 1, 0, "minmax")
            d = torch.from_numpy(w - np.asarray(q.apply_np(sw, params, axis), np.float64) / s[:, None])
            err += float(((Ht @ d) * d).sum())
        errs.append(err)
        scales.append(s)
    best = int(np.argmin(errs))
    return float(alphas[best]), scales[best], errs[best], errs[0]


class _Rows:
    """Observer: up to ``rows`` rows (tokens) of an activation, as [rows, channels] float64, for
    alpha=auto."""

    def __init__(self, rows: int = 512):
        self.rows, self.x = rows, []

    def update(self, t):
        if sum(len(a) for a in self.x) < self.rows:
            self.x.append(t.detach().float().reshape(-1, t.shape[-1]).cpu().numpy())

    def result(self):
        return np.concatenate(self.x)[:self.rows].astype(np.float64)
