"""Mixed precision: per-layer bit widths chosen from measured sensitivity under a budget.

* ``bit_sensitivity``: for every quantizable layer and every candidate weight width, the output
  error with only that layer's weights quantized (one forward pass per (layer, width) on the
  calibration data: the float module is built once and the layer's weight parameter is swapped
  in place), or with labels the top-1. ``method="hessian"`` is HAWQ-V2's proxy instead: the
  average Hessian trace of each layer's weights (Hutchinson's estimator, one Hessian-vector
  product per probe) times the squared quantization error of its weights at each width.
* ``allocate``: the exact minimum of the summed sensitivities under a budget, by dynamic
  programming over the discrete widths, kept as a Pareto front of (cost, error) states (every
  state no other state beats on both), so the whole accuracy/size front comes out too.
* ``choose-bits``: the pass. It writes the chosen widths on the layers (``meta.CHOSEN_BITS``),
  which ``quantize`` uses in place of its default weight bits; ``override=`` still wins.

Budgets (``budget=``): ``size:R`` total weight bits at most R x the FP32 size; ``avg:B`` at most
B bits per weight on average; ``bops:wXaY`` at most the bit operations (MACs x weight bits x
activation bits) of uniform WX AY; ``bops:R`` at most R x the BOPs of W8A8.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np

from graphopt.allocate import allocate, pareto_front  # noqa: F401  (re-exported: the owner is graphopt.allocate)
from graphopt.analysis import node_macs
from graphopt.errors import GraphOptError
from graphopt.geometry import LINEAR_OPS, geometry, linear_layers
from graphopt.ir import Graph, Node
from graphopt.meta import CHOSEN_BITS
from graphopt.passmanager import Context, Pass, PassResult, option, register_pass

from . import _layers as L

log = logging.getLogger("graphopt.passes.bits")

COMPUTE_OPS = LINEAR_OPS  # the layer ops quantize gives weights (owned by graphopt.geometry)


def quantizable_layers(graph: Graph, skip=()) -> list[Node]:
    """The layers ``quantize`` gives quantized weights, in graph order. A ``skip`` pattern that
    matches none of them gets a warning."""
    layers = linear_layers(graph)
    L.warn_unmatched(layers, list(skip))
    return [n for n in layers if not L.matches(n, list(skip))]


# --------------------------------------------------------------------------- budgets
@dataclass(frozen=True)
class Budget:
    kind: str  # size | avg | bops
    value: float
    text: str

    @classmethod
    def parse(cls, text: str) -> "Budget":
        kind, _, arg = str(text).partition(":")
        kind = kind.strip().lower()
        try:
            if kind in ("size", "avg"):
                v = float(arg)
            elif kind == "bops":
                a = arg.strip().lower()
                if a.startswith("w") and "a" in a:
                    wb, ab = a[1:].split("a", 1)
                    v = -float(int(wb) * int(ab))  # negative: "as uniform wXaY" (resolved against the model)
                else:
                    v = float(a)
            else:
                raise ValueError
        except ValueError:
            raise GraphOptError(f"bad budget '{text}': expected size:RATIO (of FP32), avg:BITS, bops:wXaY or "
                                f"bops:RATIO (of W8A8)") from None
        if not math.isfinite(v) or v == 0 or (v < 0 and kind != "bops"):
            raise GraphOptError(f"bad budget '{text}': the value must be a positive number")
        return cls(kind, v, str(text))

    def limit(self, params: np.ndarray, macs: np.ndarray, act_bits: float) -> float:
        """The budget in the units of ``layer_costs``: weight bits (size, avg) or BOPs."""
        if self.kind == "size":
            return self.value * 32.0 * float(params.sum())
        if self.kind == "avg":
            return self.value * float(params.sum())
        if self.value < 0:  # as uniform wXaY
            return -self.value * float(macs.sum())
        return self.value * 64.0 * float(macs.sum())


def stored_bits(bits: int) -> int:
    """The bits a weight of ``bits`` bits takes in the ONNX file: 2-4-bit codes are packed as
    INT4 (or a UINT4 index), 5-8-bit ones as INT8 (graphopt.quantizers.packing)."""
    return 4 if bits <= 4 else 8 if bits <= 8 else 16


def layer_costs(kind: str, params: np.ndarray, macs: np.ndarray, widths, act_bits: float,
                stored: bool = False) -> np.ndarray:
    """[layers, widths] cost of each choice: its weight bits (``stored``: as the file holds
    them), or its BOPs."""
    w = np.asarray([stored_bits(b) if stored and kind != "bops" else b for b in widths], np.float64)[None, :]
    if kind == "bops":
        return macs.astype(np.float64)[:, None] * w * act_bits
    return params.astype(np.float64)[:, None] * w


def budget_limit(graph: Graph, budget: Budget, widths, act_bits: float, skip=()) -> tuple[float, np.ndarray,
                                                                                        np.ndarray]:
    """(limit, params, MACs per layer) for ``budget`` on ``graph``'s quantizable layers. Raises,
    before any measurement, when even the narrowest width everywhere does not fit."""
    layers = quantizable_layers(graph, skip)
    p = np.array([L.weight(graph, n).size for n in layers], np.float64)
    m = np.array([node_macs(n) or 0 for n in layers], np.float64)
    limit = budget.limit(p, m, act_bits)
    lo = float(layer_costs(budget.kind, p, m, [min(widths)], act_bits).sum())
    if lo > limit * (1 + 1e-12):
        unit = {"size": lo / (32 * p.sum()), "avg": lo / p.sum(), "bops": lo / (64 * max(m.sum(), 1))}[budget.kind]
        what = {"size": "x FP32 size", "avg": "bits per weight", "bops": "x W8A8 BOPs"}[budget.kind]
        raise GraphOptError(f"budget {budget.text} is below the smallest achievable with widths {sorted(widths)}: "
                            f"{unit:.4g} {what}")
    return limit, p, m


# --------------------------------------------------------------------------- sensitivity
def _weight_spec(base: str, bits: int):
    """Weight scheme ``base`` at ``bits`` bits, or a one-line error when it has no such form."""
    from graphopt.quantizers import parse

    return parse(base, "weights").at_bits(bits)


def quantized_weight(graph: Graph, n: Node, spec, method: str) -> np.ndarray:
    """Layer ``n``'s weight as ``spec`` quantizes it (float values)."""
    w = L.weight(graph, n)
    geo = geometry(n)
    params, axis = spec.weight_params(w, geo.out_axis, geo.in_axis, method)
    params = spec.effective_params(w, params, axis)
    return spec.apply_np(w, params, axis).astype(w.dtype)


def bit_sensitivity(graph: Graph, data, widths=(2, 3, 4, 6, 8), *, weights: str = "int8:channel",
                    method: Literal["sweep", "hessian"] = "sweep", weight_method: str = "mse",
                    labels: np.ndarray | None = None, skip=(), probes: int = 8, progress: bool = False,
                    max_samples: int | None = None) -> list[dict]:
    """One row per quantizable layer: name, params, MACs and ``error`` (a list, one per width).

    ``sweep``: a ``graphopt.scan.Scan`` trial with only this layer's weights quantized at that width.
    ``hessian``: HAWQ-V2's Tr(H)/n x ||Q(W) - W||^2 with H the Hessian of the output error
    (Gauss-Newton at the float weights) or of the cross-entropy with ``labels``."""
    layers = quantizable_layers(graph, skip)
    if not layers:
        raise GraphOptError("the model has no layer with quantizable weights")
    specs = [_weight_spec(weights, b) for b in widths]
    from graphopt.scan import Scan

    sweep = Scan(graph, data, labels, max_samples)
    qw = {(n.name, j): quantized_weight(graph, n, s, weight_method) for n in layers for j, s in enumerate(specs)}
    traces = _hessian_traces(sweep.module, graph, layers, [b[0] for b in sweep.batches], sweep.ref, sweep.labels, probes) \
        if method == "hessian" else None
    jobs = [(n, j) for n in layers for j in range(len(widths))]
    it = jobs
    if progress and method == "sweep":
        from tqdm import tqdm

        it = tqdm(jobs, desc="bit sensitivity", leave=False)
    err: dict[str, list[float]] = {n.name: [0.0] * len(widths) for n in layers}
    for n, j in it:
        if method == "hessian":
            w0 = L.weight(graph, n)
            err[n.name][j] = float(traces[n.name] * np.sum((qw[(n.name, j)].astype(np.float64) - w0) ** 2))
        else:
            err[n.name][j] = sweep.swap(n.inputs[1].name, qw[(n.name, j)])["error"]
    return [{"layer": n.source, "name": n.name, "params": int(L.weight(graph, n).size),
             "macs": int(node_macs(n) or 0), "error": err[n.name]} for n in layers]


def _hessian_traces(module, graph, layers, batches, ref, y, probes: int) -> dict[str, float]:
    """Tr(H)/n per layer weight by Hutchinson's estimator: E[v^T H v] over Rademacher v, one
    Hessian-vector product (double backward) per probe for all layers at once."""
    import torch
    import torch.nn.functional as F

    params = dict(module.named_parameters())
    ws = [params[module.param_names[n.inputs[1].name]] for n in layers]
    gen = torch.Generator().manual_seed(0)
    acc = torch.zeros(len(ws), dtype=torch.float64)
    total = sum(len(b) for b in batches)
    for b, r, start in zip(batches, ref, np.cumsum([0] + [len(b) for b in batches[:-1]])):
        out = module(b)
        if y is None:
            loss = 0.5 * (out - r).pow(2).sum() / total
        else:
            loss = F.cross_entropy(out, y[start:start + len(b)], reduction="sum") / total
        grads = torch.autograd.grad(loss, ws, create_graph=True)
        for _ in range(probes):
            vs = [torch.randint(0, 2, w.shape, generator=gen).to(w.device, w.dtype) * 2 - 1 for w in ws]
            hv = torch.autograd.grad(sum((g * v).sum() for g, v in zip(grads, vs)), ws, retain_graph=True)
            acc += torch.tensor([float((h * v).sum()) for h, v in zip(hv, vs)], dtype=torch.float64) / probes
    return {n.name: float(acc[i]) / ws[i].numel() for i, n in enumerate(layers)}


def plan_bits(errors, kind: str, params: np.ndarray, macs: np.ndarray, widths, act_bits: int, limit: float | None,
              stored: bool = False):
    """The allocation step choose-bits and ``graphopt analyze bits`` share: per-layer costs of
    each width under the budget kind, the errors clamped at 0 (a width that happens to help on
    this data counts as free, not as a gain), and ``allocate``'s (choice, cost, error), or None
    without a ``limit``."""
    errors = np.maximum(np.asarray(errors, np.float64), 0.0)
    costs = layer_costs(kind, params, macs, widths, act_bits, stored)
    return costs, errors, (allocate(costs, errors, limit) if limit is not None else None)


# --------------------------------------------------------------------------- the pass
@register_pass("choose-bits")
@dataclass(kw_only=True)
class ChooseBits(Pass):
    """Choose each layer's weight bits from measured sensitivity under a budget (needs
    calibration data); ``quantize`` then uses them. The sensitivity is the output error with
    only that layer quantized at each width (or HAWQ-V2's Hessian-trace proxy); the allocation
    is the exact minimum of the summed errors under the budget (dynamic programming over the
    widths). Run it after fold-bn/equalize and before quantize, with quantize's weight scheme.
    Writes no weights: the function is unchanged."""

    before = ("quantize",)
    preserves_function = True

    budget: str = option("size:0.125", "size:RATIO of FP32 weight bits, avg:BITS per weight, bops:wXaY or "
                                       "bops:RATIO of W8A8")
    widths: list[int] = option([2, 3, 4, 6, 8], "candidate weight bit widths")
    weights: str = option("int8:channel", "the weight scheme quantize will use (its bit width is replaced)")
    act_bits: int = option(8, "activation bits (for a BOPs budget)", minimum=1, maximum=16)
    method: Literal["sweep", "hessian"] = option("sweep", "sweep: output error with one layer quantized at a time; "
                                                          "hessian: HAWQ-V2 trace proxy")
    weight_method: Literal["minmax", "mse"] = option("mse", "weight range for the sensitivity sweep")
    skip: list[str] = option([], "layers (fnmatch patterns) that quantize will leave in float")
    pin: list[str] = option([], "PATTERN=BITS: layers whose width is fixed (e.g. the first layer at 8)")
    max_samples: Optional[int] = option(256, "calibration samples the sweep uses", minimum=1)
    size_bits: Literal["nominal", "stored"] = option(
        "nominal", "size and avg budgets count each weight's bits (nominal) or the bits the ONNX file stores it in "
                   "(stored: 2-4 bits -> 4, 5-8 -> 8)")

    def run(self, graph: Graph, ctx: Context) -> PassResult:
        if ctx.calib is None:
            raise GraphOptError("choose-bits needs calibration data (--calib) for its sensitivity scan")
        budget = Budget.parse(self.budget)
        widths = sorted(set(int(b) for b in self.widths))
        if not widths or any(not 1 <= b <= 16 for b in widths):
            raise GraphOptError(f"choose-bits widths must be bit counts in 1..16, not {self.widths}")
        for b in widths:
            _weight_spec(self.weights, b)
        pins = {}
        for item in self.pin:
            pat, _, b = item.rpartition("=")
            if not pat or not b.isdigit() or int(b) not in widths:
                raise GraphOptError(f"bad pin '{item}': expected PATTERN=BITS with BITS one of {widths}")
            pins[pat] = int(b)
        limit, p, m = budget_limit(graph, budget, widths, self.act_bits, self.skip)
        rows = bit_sensitivity(graph, ctx.calib, widths, weights=self.weights, method=self.method,
                               weight_method=self.weight_method, skip=self.skip, progress=ctx.show_progress,
                               max_samples=self.max_samples)
        layers = {n.name: n for n in quantizable_layers(graph, self.skip)}
        errors = np.array([r["error"] for r in rows], np.float64)
        for i, r in enumerate(rows):
            pinned = next((b for p_, b in pins.items() if L.matches(layers[r["name"]], [p_])), None)
            if pinned is not None:
                errors[i] = np.where(np.array(widths) == pinned, errors[i], np.inf)
        try:
            costs, errors, (choice, cost, err) = plan_bits(errors, budget.kind, p, m, widths, self.act_bits, limit,
                                                           self.size_bits == "stored")
        except GraphOptError:  # only pins can make it infeasible here
            raise GraphOptError(f"budget {budget.text} cannot be met with the pinned widths {self.pin}") from None
        chosen = {}
        changed = False
        for r, k in zip(rows, choice):
            changed |= layers[r["name"]].meta.get(CHOSEN_BITS) != widths[int(k)]
            layers[r["name"]].meta[CHOSEN_BITS] = widths[int(k)]
            chosen[r["layer"]] = widths[int(k)]
            r["bits"] = widths[int(k)]
        table = [{"layer": r["layer"], "bits": r["bits"], "params": r["params"], "macs": r["macs"],
                  "sensitivity": r["error"][widths.index(r["bits"])],
                  "share": float(costs[i, widths.index(r["bits"])] / max(cost, 1e-30))} for i, r in enumerate(rows)]
        sens = {"widths": widths, "layers": [{k: r[k] for k in ("layer", "params", "macs", "error")} for r in rows]}
        return PassResult(graph, False, {"bits": chosen, "annotations_changed": changed, "sensitivity": sens, "cost": cost, "limit": limit, "error": err,
                                           "size_bits": self.size_bits,
                                         "avg_bits": float((p * [widths[int(k)] for k in choice]).sum() / p.sum()),
                                         "table": table, "budget": budget.text})


# --------------------------------------------------------------------------- picture
def plot_front(path, costs: np.ndarray, errors: np.ndarray, widths, params: np.ndarray, kind: str, metric: str,
               marks: dict[str, np.ndarray] | None = None, measured: dict[str, tuple[float, float]] | None = None
               ) -> None:
    """PNG of the predicted error/size Pareto front, the uniform widths, and ``marks`` (label ->
    choice per layer). ``measured``: label -> (x, top-1) points drawn on a second axis."""
    from graphopt.plotting import pyplot, save_png

    plt = pyplot("plotting")

    c, e, _ = pareto_front(costs, errors)
    norm = {"size": 32 * params.sum(), "avg": params.sum()}.get(kind) or costs[:, -1].sum()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    ax.step(c / norm, e, where="post", label="mixed precision: predicted Pareto front")
    for k, b in enumerate(widths):
        x, y = costs[:, k].sum() / norm, errors[:, k].sum()
        ax.scatter([x], [y], marker="s", color="gray")
        ax.annotate(f"uniform {b}-bit", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    idx = np.arange(costs.shape[0])
    for i, (label, choice) in enumerate((marks or {}).items()):
        ch = np.asarray(choice, np.int64)
        ax.scatter([costs[idx, ch].sum() / norm], [errors[idx, ch].sum()], marker="*", s=150, zorder=3,
                   color=f"C{i + 1}", label=label)
    ax.set_yscale("symlog", linthresh=1e-4)
    ax.set_xlabel({"size": "weight size / FP32", "avg": "bits per weight", "bops": "BOPs / widest"}[kind])
    ax.set_ylabel(f"predicted {metric} (sum over layers)")
    if measured:
        ax2 = ax.twinx()
        for label, (x, top1) in measured.items():
            ax2.scatter([x], [top1], marker="o", facecolors="none", edgecolors="k")
            ax2.annotate(label, (x, top1), fontsize=7, xytext=(3, -9), textcoords="offset points")
        ax2.set_ylabel("measured top-1 % (circles)")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    save_png(fig, path)
