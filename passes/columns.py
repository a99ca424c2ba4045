"""``column-combine``: column combining for systolic arrays (Kung, McDanel & Zhang, ASPLOS 2019).

Groups each layer's sparse filter-matrix columns (at most ``alpha`` per group, at most
floor(gamma * rows) conflicts pruned per group) and prunes the conflicts, keeping the largest |w|
in every row of every group, as a ``column`` Mask: training keeps the pruned weights at zero and
the ONNX back end writes them as zeros. The plan (which column joins which group) is pass data in
``graph.scratch[COLUMN_PLANS]``; the systolic back end, ``graphopt analyze columns`` and the
packed file read it. The grouping itself lives in ``graphopt.columns``.

* One shot: combine the sparsity the model has (``sparsity=`` prunes by magnitude first).
* Joint optimization (``events=N``, the paper's schedule): the ``finetune`` step that follows
  prunes by magnitude at N events spread over [begin, end] of its steps, the sparsity rising as
  sparsity * (1 - (1 - i/N)^3), and re-packs every layer after each event; the masks only grow.

A layer without any zero is left alone and listed (``dense``: no sparsity is not an error); a
layer the array cannot take (a ConvTranspose) is listed with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np

from graphopt import columns as C
from graphopt.errors import GraphOptError
from graphopt.geometry import geometry
from graphopt.ir import Graph
from graphopt.masks import Mask, get_mask, set_mask
from graphopt.meta import COLUMN_PLANS, MASK, SPARSITY_SCHEDULE
from graphopt.passmanager import Context, Pass, PassResult, option, register_pass

from . import _layers as L
from .sparsity import check_sparsity, magnitude_masks, prunable_layers


def column_plans(graph: Graph) -> dict[str, C.Plan]:
    """{weight name: plan} that column-combine left (empty: none)."""
    return dict(graph.scratch.get(COLUMN_PLANS) or {})


@register_pass("column-combine")
@dataclass(kw_only=True)
class ColumnCombine(Pass):
    """Column combining: group sparse filter-matrix columns for a systolic array and prune the
    conflicts (the largest |w| per row and group stays). ``events=N`` instead schedules the
    paper's joint optimization in the ``finetune`` that follows. Changes the function on purpose."""

    preserves_function = False

    alpha: int = option(8, "most columns combined into one group", minimum=1)
    gamma: float = option(0.5, "conflicts a group may prune, per row of the layer (floor(gamma * rows) in all)")
    window: int = option(256, "columns grouped together (consecutive windows)", minimum=1)
    sparsity: Optional[float] = option(None, "prune by magnitude to this sparsity first (events > 0: the final "
                                             "sparsity of the schedule)")
    scope: Literal["global", "layer"] = option("layer", "sparsity=: the same per layer, or one global threshold")
    events: int = option(0, "0: combine now; N: N pruning events in the following finetune, re-packed after "
                            "each", minimum=0)
    begin: float = option(0.0, "events: the first event, as a fraction of the training steps", minimum=0.0,
                          maximum=1.0)
    end: float = option(0.5, "events: the last event (the paper: half way)", minimum=0.0, maximum=1.0)
    skip: list[str] = option([], "layers (fnmatch patterns) to leave as they are")
    only: Literal["all", "pointwise"] = option("all", "pack every layer, or only 1x1 convs (group 1) and Gemm/MatMul")
    correct_bias: bool = option(False, "one shot: subtract the mean output shift the pruning causes from each bias "
                                       "(E[x] measured on the calibration data, as correct-bias does for quantization)")

    def run(self, graph: Graph, ctx: Context) -> PassResult:
        C.check_options(self.alpha, self.gamma, self.window)
        layers = prunable_layers(graph, self.skip)
        if self.only == "pointwise":
            layers = [n for n in layers if C.pointwise(n, L.weight(graph, n).shape)]
        if self.correct_bias and (self.events or ctx.calib is None):
            raise GraphOptError("column-combine{correct_bias=true} is for one shot (events=0) and needs calibration "
                                "data (--calib)")
        before = {n: np.asarray(L.weight(graph, n), np.float64).copy() for n in layers} if self.correct_bias else {}
        dense: dict[str, str] = {}
        for n in graph.nodes:  # layers with a constant weight that the array cannot take
            if n.op_type == "ConvTranspose" and len(n.inputs) > 1 and graph.const_value(n.inputs[1]) is not None:
                dense[n.source] = C.packable(n)
        if not layers:
            return PassResult(graph, False, {"layers": 0, "dense": dense, "reason": "no layer with constant weights"})
        if self.events:
            return self._schedule(graph, layers, dense)
        changed = 0
        if self.sparsity is not None:
            masks = magnitude_masks(graph, layers, check_sparsity(self.sparsity), self.scope)
            for n, m in masks.items():
                if np.count_nonzero(np.asarray(n.inputs[1].const)[~m.keep]):  # it zeroes weights (not a re-run)
                    set_mask(graph, n.inputs[1], Mask.column(m.keep))
                    changed += 1
        plans = column_plans(graph)
        rows, pruned = [], 0
        for n in layers:
            v = n.inputs[1]
            w = np.asarray(L.weight(graph, n))
            if np.count_nonzero(w) == w.size:
                dense[n.source] = "no zero weights: nothing to combine (prune first: sparsity= or prune-weights)"
                continue
            keep, plan = C.combine_weight(n, w, self.alpha, self.gamma, self.window, plans.get(v.name))
            lost = int(np.count_nonzero(w[~keep]))
            old = get_mask(v)
            if lost or old is None or old.kind != "column" or not np.array_equal(old.keep, keep):
                set_mask(graph, v, Mask.column(keep))
                changed += 1
            if plans.get(v.name) != plan:
                plans[v.name] = plan
                changed += 1
            pruned += lost
            rows.append(C.layer_report(n, L.weight(graph, n), plan))
        if plans:
            graph.scratch[COLUMN_PLANS] = plans
        corrected = _correct_bias(graph, ctx, before) if before else 0
        stats = {"layers": len(rows), "conflicts_pruned": pruned, "dense": dense, "bias_corrected": corrected,
                 "per_layer": {r["layer"]: {"columns": r["columns"], "groups": r["groups"]} for r in rows}}
        if rows:
            stats["tiles"] = {n: {k: v["tiles"] for k, v in C.totals(rows, n).items()} for n in C.ARRAY_SIZES}
        if not rows:
            stats["reason"] = "the model has no sparsity: nothing to combine (prune first)"
        return PassResult(graph, changed > 0, stats)

    def _schedule(self, graph: Graph, layers, dense) -> PassResult:
        if self.sparsity is None:
            raise GraphOptError("column-combine{events=N} needs sparsity= (the final sparsity of the schedule)")
        fin = check_sparsity(self.sparsity)
        if self.end <= self.begin:
            raise GraphOptError(f"column-combine: end ({self.end}) must come after begin ({self.begin})")
        zeroed = 0
        for n in layers:  # every layer gets a mask now, so training can tighten it
            v = n.inputs[1]
            if get_mask(v) is None:
                set_mask(graph, v, Mask.column(np.asarray(v.const) != 0))
                zeroed += 1
        sched = {"final": fin, "initial": 0.0, "begin": self.begin, "end": self.end, "events": self.events,
                 "frequency": 1, "power": 3.0, "scope": self.scope, "weights": [n.inputs[1].name for n in layers],
                 "columns": {"alpha": self.alpha, "gamma": self.gamma, "window": self.window,
                             "geometry": {n.inputs[1].name: geometry(n) for n in layers}}}
        before = graph.scratch.get(SPARSITY_SCHEDULE)
        graph.scratch[SPARSITY_SCHEDULE] = sched
        changed = zeroed > 0 or repr(before) != repr(sched)
        return PassResult(graph, changed, {"layers": len(layers), "events": self.events, "final": fin,
                                           "dense": dense})


def _correct_bias(graph: Graph, ctx: Context, before: dict) -> int:
    """Subtract E[(W_new - W_old) x] from each changed layer's bias (E[x] of the graph *before*
    this pass's pruning, measured on ctx.calib): DFQ's bias correction applied to pruning."""
    from graphopt.training.calibration import Moments, observe

    changed = [n for n, w in before.items() if not np.array_equal(w, L.weight(graph, n))]
    if not changed:
        return 0
    g0 = graph.copy()
    by_name = {n.name: n for n in g0.nodes}
    for n in changed:  # the float model before pruning
        m = by_name[n.name]
        m.inputs[1].meta.pop(MASK, None)  # the torch back end would re-apply the mask
        g0.set_const(m.inputs[1], before[n].astype(np.asarray(m.inputs[1].const).dtype))
    names = {n: by_name[n.name].inputs[0].name for n in changed}
    res = observe(g0, ctx.calib, {names[n]: Moments(axis=1 if n.op_type == "Conv" else -1) for n in changed},
                  progress=ctx.show_progress, desc="column-combine bias correction")
    for n in changed:
        shift = geometry(n).mean_output(np.asarray(L.weight(graph, n), np.float64) - before[n], res[names[n]]["mean"])
        b = L.bias(graph, n)
        if n.op_type == "MatMul":  # no bias input to correct
            continue
        new_b = ((np.zeros(shift.shape) if b is None else np.asarray(b, np.float64)) - shift).astype(np.float32)
        if b is None and n.op_type == "Gemm" and n.attr("beta", 1.0) != 1.0:
            continue
        L.set_input_const(graph, n, 2, new_b, "_bias")
    return len(changed)
