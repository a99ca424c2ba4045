"""Fine-grained sparsity: magnitude pruning (one shot, layer-wise or global), N:M
semi-structured masks, and the gradual schedule that ``finetune`` runs.

Every mask is a ``graphopt.masks.Mask`` on the weight constant: the torch back end keeps masked
weights exactly zero through training (no gradient reaches them), and the ONNX back end writes
them as zeros. Selection is vectorized: one sort over all the weights in scope.

* ``prune-weights``: magnitude masks at a target given as a sparsity, a count of nonzero
  parameters, or a share of nonzero MACs. ``scope=global`` is one threshold over every layer
  (Han et al. 2015 applied network-wide); ``layer`` gives every layer the same sparsity.
* ``prune-nm``: in every group of M consecutive weights along a layer's reduction (input)
  axis, keep the N largest (2:4 by default).
* ``prune-gradual``: records a polynomial schedule (Zhu & Gupta 2017) from an initial to a final
  sparsity between two points of the training that follows; ``finetune`` re-selects the masks
  by magnitude at every ``frequency`` steps in that range, and masks only ever grow.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np

from graphopt import storage
from graphopt.analysis import node_macs
from graphopt.errors import GraphOptError
from graphopt.geometry import geometry
from graphopt.ir import Graph, Node
from graphopt.masks import Mask, get_mask, global_keep, scheduled_sparsity, set_mask  # noqa: F401  (owners)
from graphopt.meta import SPARSITY_SCHEDULE
from graphopt.passmanager import Context, Pass, PassResult, option, register_pass

from . import _layers as L
from .bits import quantizable_layers

log = logging.getLogger("graphopt.passes.sparsity")


def prunable_layers(graph: Graph, skip=()) -> list[Node]:
    """The Conv/Gemm/MatMul layers with a constant weight (the quantizable ones), in order."""
    return quantizable_layers(graph, skip)


def check_sparsity(s: float, what: str = "sparsity") -> float:
    s = float(s)
    if not 0.0 <= s < 1.0:
        raise GraphOptError(f"{what} must be in [0, 1), not {s}")
    return s


def magnitude_masks(graph: Graph, layers: list[Node], sparsity: float, scope: str,
                    target: str = "sparsity") -> dict[Node, Mask]:
    """Magnitude masks for ``layers`` at ``sparsity`` (of parameters, or of MACs with
    ``target="macs"``). A weight that already has a mask keeps its zeros (they are the smallest)."""
    ws = [np.asarray(get_mask(n.inputs[1]).apply(L.weight(graph, n)) if get_mask(n.inputs[1]) else L.weight(graph, n))
          for n in layers]
    if scope == "layer":
        return {n: Mask.magnitude(w, sparsity) for n, w in zip(layers, ws)}
    cost = None
    if target == "macs":
        cost = [(node_macs(n) or 0) / max(np.size(w), 1) for n, w in zip(layers, ws)]
    return {n: Mask.element(k) for n, k in zip(layers, global_keep(ws, sparsity, cost))}


def sensitivity_masks(graph: Graph, layers: list[Node], data, sparsity: float | None, target: str, levels,
                      max_samples: int, labels=None, progress=None) -> tuple[dict[Node, Mask], list[dict]]:
    """Per-layer sparsities from a scan: each layer alone pruned by magnitude at each level
    (``graphopt.scan.Scan``: one forward pass per layer and level), then the allocation with the least
    summed output error whose nonzero parameters (or MACs) meet the target, by the exact
    Pareto-front dynamic program that choose-bits uses. ``sparsity=None``: the scan only (no
    masks). With ``labels`` the error is the top-1 drop in points."""
    from graphopt.allocate import allocate
    from graphopt.scan import Scan

    levels = sorted({0.0, *(check_sparsity(v, "a scan level") for v in levels)})
    sweep = Scan(graph, data, labels=labels, max_samples=max_samples)
    ws = [np.asarray(L.weight(graph, n)) for n in layers]
    pairs = list(zip(layers, ws))
    it = progress(pairs, total=len(pairs), desc="sparsity scan") if progress else pairs
    errors = np.array([[0.0 if lv == 0 else sweep.swap(n.inputs[1].name, Mask.magnitude(w, lv).apply(w))["error"]
                        for lv in levels]
                       for n, w in it])
    if sparsity is None:
        return {}, [{"layer": n.source, "params": int(w.size), "levels": levels, "error": errors[i].tolist(),
                     "chosen": None} for i, (n, w) in enumerate(pairs)]
    unit = np.array([(node_macs(n) or 0) if target == "macs" else w.size for n, w in zip(layers, ws)], np.float64)
    size = np.array([w.size for w in ws], np.float64)[:, None]
    kept = size - np.floor(size * np.array(levels)[None, :])  # exactly what Mask.magnitude keeps
    costs = unit[:, None] * kept / size
    limit = (1.0 - sparsity) * unit.sum()
    if costs[:, -1].sum() > limit * (1 + 1e-12):
        raise GraphOptError(f"a sparsity of {sparsity} needs more than the largest scan level ({levels[-1]}) in some "
                            f"layers: add higher levels")
    choice, _, _ = allocate(costs, np.maximum(errors, 0.0), limit)
    masks = {n: Mask.magnitude(w, levels[int(k)]) for n, w, k in zip(layers, ws, choice)}
    scan = [{"layer": n.source, "params": int(w.size), "levels": levels, "error": errors[i].tolist(),
             "chosen": levels[int(choice[i])]} for i, (n, w) in enumerate(zip(layers, ws))]
    return masks, scan


def plot_scan(path, scan: list[dict], metric: str) -> None:
    """PNG of each layer's error against its sparsity (``sensitivity_masks``' scan), one curve
    per layer, the first and last layers drawn bold: they are the sensitive ones."""
    from graphopt.scan import plot_units

    rows = [{"unit": r["layer"], "level": lv, "error": e} for r in scan for lv, e in zip(r["levels"][1:], r["error"][1:])]
    plot_units(path, rows, xlabel="sparsity of the layer alone (%)", ylabel=metric, x_scale=100,
               title="magnitude-pruning sensitivity per layer (gray: the others)",
               log_y=not metric.startswith("top-1"),  # points can be 0 or negative: a linear axis
               highlight=(scan[0]["layer"], scan[-1]["layer"]) if scan else ())


def _apply_masks(graph: Graph, masks: dict[Node, Mask]) -> int:
    changed = 0
    for n, m in masks.items():
        old = get_mask(n.inputs[1])
        if old is not None and old == m:
            continue
        if old is None and m.kind == "element" and m.keep.all():
            continue
        set_mask(graph, n.inputs[1], m)
        changed += 1
    return changed


def sparsity_report(graph: Graph) -> list[dict]:
    """Per prunable layer: weights, zeros, nonzero MACs, the compressed encodings' sizes and the
    smallest of them with dense (``stored``, ``stored_bits``: what a file of this layer costs).
    Before, a detected N:M pattern was charged even where the relative form was smaller (very
    sparse layers match 4:8 by chance)."""
    from graphopt.quantizers import apply_node, is_fake_quant

    rows = []
    for n in graph.nodes:
        if n.op_type not in ("Conv", "Gemm", "MatMul") or n.domain or len(n.inputs) < 2:
            continue
        v, fq = n.inputs[1], None
        if is_fake_quant(v.producer):  # a quantized graph: the values the export writes
            fq, v = v.producer, v.producer.inputs[0]
        if graph.const_value(v) is None:
            continue
        w = np.asarray(graph.const_value(v))
        m = get_mask(v)
        if m is not None:
            w = m.apply(w)
        if fq is not None:
            w = apply_node(graph, fq, w)
        nnz = int(np.count_nonzero(w))
        macs = int(node_macs(n) or 0)
        if m is None or m.kind != "nm":  # a file read back has no mask: recognise the N:M pattern from its zeros
            m = _nm_pattern(w, geometry(n).in_axis)
        sizes = {"dense": int(w.size) * 32, "relative": encoded_bits(w, "relative")}
        if m is not None:
            sizes["nm"] = encoded_bits(w, "nm", m)
        stored = min(sizes, key=sizes.get)  # a layer is stored in its smallest form
        rows.append({"layer": n.source, "params": int(w.size), "nonzero": nnz, "sparsity": 1 - nnz / max(w.size, 1),
                     "macs": macs, "nonzero_macs": int(round(macs * nnz / max(w.size, 1))),
                     "csr_bits": sizes["relative"], "nm": None if m is None else f"{m.n}:{m.m}",
                     "nm_bits": sizes.get("nm"), "stored": stored, "stored_bits": sizes[stored]})
    return rows


def _nm_pattern(w: np.ndarray, axis: int) -> Mask | None:
    """The tightest N:M pattern (2:4, 1:4, 4:8) that ``w``'s zeros satisfy along ``axis``."""
    if np.count_nonzero(w) == w.size:
        return None
    for n, m in ((1, 4), (2, 4), (4, 8)):
        if w.shape[axis] % m == 0 and np.moveaxis(w != 0, axis, -1).reshape(-1, m).sum(1).max() <= n:
            return Mask("nm", w != 0, axis, n, m)
    return None


def encoded_bits(w: np.ndarray, kind: str, mask: Mask | None = None, value_bits: int = 32, index_bits: int = 4) -> int:
    """Bits of a compressed encoding of ``w``, as the weight storage owner (``graphopt.storage``)
    counts them: ``relative`` (Deep Compression's value + gap form, ``index_bits`` per gap) or
    ``nm`` (N values per group of M plus log2(M) bits of position each, after ``mask``)."""
    if kind == "nm":
        return storage.NM(mask.n, mask.m, mask.axis, value_bits).size_bits(w)
    return storage.Relative(index_bits, value_bits).size_bits(w)


# --------------------------------------------------------------------------- passes
@register_pass("prune-weights")
@dataclass(kw_only=True)
class PruneWeights(Pass):
    """Magnitude pruning of individual weights: the smallest |w| become exactly zero, under an
    element mask that training keeps (``finetune`` after it recovers the accuracy). ``scope``:
    one global threshold, or the same sparsity in every layer. The target is a sparsity of the
    parameters (``sparsity``), a count of nonzero parameters (``nonzero_params``), or a share of
    nonzero MACs (``nonzero_macs``, global scope weighs each weight by its layer's MACs per
    weight). Changes the function on purpose."""

    preserves_function = False

    sparsity: Optional[float] = option(None, "share of the weights to remove, in [0, 1)")
    nonzero_params: Optional[int] = option(None, "instead: keep this many nonzero weights", minimum=1)
    nonzero_macs: Optional[float] = option(None, "instead: keep this share of the MACs nonzero (0, 1]")
    scope: Literal["global", "layer", "sensitivity"] = option(
        "global", "one threshold over all layers; the same sparsity per layer; or per-layer sparsities chosen "
                  "from a sensitivity scan on the calibration data (needs --calib)")
    levels: list[float] = option([0.3, 0.5, 0.7, 0.8, 0.9, 0.95], "scope=sensitivity: the per-layer sparsities "
                                                                  "the scan measures")
    max_samples: int = option(64, "scope=sensitivity: calibration samples the scan runs", minimum=1)
    skip: list[str] = option([], "layers (fnmatch patterns on name/source) to leave dense")

    def run(self, graph: Graph, ctx: Context) -> PassResult:
        given = [x is not None for x in (self.sparsity, self.nonzero_params, self.nonzero_macs)]
        if sum(given) != 1:
            raise GraphOptError("prune-weights needs exactly one of sparsity=, nonzero_params=, nonzero_macs=")
        layers = prunable_layers(graph, self.skip)
        if not layers:
            return PassResult(graph, False, {"pruned": 0, "reason": "no layer with constant weights"})
        total = sum(L.weight(graph, n).size for n in layers)
        target = "sparsity"
        if self.sparsity is not None:
            s = check_sparsity(self.sparsity)
        elif self.nonzero_params is not None:
            if self.nonzero_params > total:
                raise GraphOptError(f"nonzero_params={self.nonzero_params} is more than the {total} prunable weights")
            s = 1.0 - self.nonzero_params / total
        else:
            if not 0.0 < self.nonzero_macs <= 1.0:
                raise GraphOptError(f"nonzero_macs must be in (0, 1], not {self.nonzero_macs}")
            s, target = 1.0 - float(self.nonzero_macs), "macs"
        scan = None
        if self.scope == "sensitivity":
            if ctx.calib is None:
                raise GraphOptError("prune-weights{scope=sensitivity} needs calibration data (--calib) for its scan")
            masks, scan = sensitivity_masks(graph, layers, ctx.calib, s, target, self.levels, self.max_samples)
        else:
            masks = magnitude_masks(graph, layers, s, self.scope, target)
        changed = _apply_masks(graph, masks)
        per = {n.source: round(m.sparsity, 4) for n, m in masks.items()}
        kept = sum(int(m.keep.sum()) for m in masks.values())
        stats = {"pruned": changed, "sparsity": 1 - kept / total, "per_layer": per}
        if scan is not None:
            stats["scan"] = scan
        return PassResult(graph, changed > 0, stats)


@register_pass("prune-nm")
@dataclass(kw_only=True)
class PruneNM(Pass):
    """N:M semi-structured sparsity: in every group of M consecutive weights along each layer's
    reduction (input-channel) axis, keep the N largest |w| (2:4 by default; 1:4 and 4:8 too).
    A layer whose reduction axis is not a multiple of M stays dense and is listed under
    ``dense`` (``remainder=error`` refuses it instead); grouped and depthwise convolutions, whose
    per-group reduction has too few channels, likewise. Changes the function on purpose."""

    preserves_function = False

    n: int = option(2, "weights kept per group", minimum=1)
    m: int = option(4, "group size", minimum=2)
    skip: list[str] = option([], "layers (fnmatch patterns) to leave dense")
    remainder: Literal["dense", "error"] = option("dense", "a layer whose reduction axis M does not divide")

    def run(self, graph: Graph, ctx: Context) -> PassResult:
        if self.n >= self.m:
            raise GraphOptError(f"N:M sparsity needs N < M (got {self.n}:{self.m})")
        changed, dense = 0, {}
        masks = {}
        for n in prunable_layers(graph, self.skip):
            w = L.weight(graph, n)
            axis = geometry(n).in_axis
            if w.shape[axis] % self.m:
                why = f"its reduction axis has {w.shape[axis]} channels, not a multiple of {self.m}"
                if self.remainder == "error":
                    raise GraphOptError(f"prune-nm: layer '{n.source}': {why}")
                dense[n.source] = why
                continue
            old = get_mask(n.inputs[1])
            masks[n] = Mask.n_m(old.apply(w) if old is not None else w, self.n, self.m, axis)
        changed = _apply_masks(graph, masks)
        return PassResult(graph, changed > 0, {"pruned": changed, "pattern": f"{self.n}:{self.m}", "dense": dense})


@register_pass("prune-gradual")
@dataclass(kw_only=True)
class PruneGradual(Pass):
    """Gradual magnitude pruning during the ``finetune`` step that follows (Zhu & Gupta 2017,
    TF-MOT's PolynomialDecay): sparsity s_t = s_f + (s_i - s_f)(1 - (t - t0)/(t1 - t0))^power from
    ``begin`` to ``end`` (fractions of the training steps), re-selected by magnitude every
    ``frequency`` steps; masks only grow, pruned weights stay exactly zero, and masks are saved
    in checkpoints. This pass applies the initial sparsity and records the schedule."""

    preserves_function = False

    final: float = option(0.8, "sparsity at the end of the schedule, in [0, 1)")
    initial: float = option(0.0, "sparsity at the start of the schedule")
    begin: float = option(0.0, "where the schedule starts, as a fraction of the training steps", minimum=0.0,
                          maximum=1.0)
    end: float = option(0.75, "where it reaches the final sparsity (fraction of the steps)", minimum=0.0,
                        maximum=1.0)
    frequency: int = option(50, "steps between mask updates", minimum=1)
    power: float = option(3.0, "polynomial exponent", minimum=0.0)
    scope: Literal["global", "layer"] = option("global", "one threshold over all layers, or per layer")
    skip: list[str] = option([], "layers to leave dense")

    def run(self, graph: Graph, ctx: Context) -> PassResult:
        fin, ini = check_sparsity(self.final, "final sparsity"), check_sparsity(self.initial, "initial sparsity")
        if ini > fin:
            raise GraphOptError(f"prune-gradual: initial sparsity {ini} is above the final {fin}")
        if self.end <= self.begin:
            raise GraphOptError(f"prune-gradual: end ({self.end}) must come after begin ({self.begin})")
        layers = prunable_layers(graph, self.skip)
        if not layers:
            raise GraphOptError("prune-gradual: the model has no layer with constant weights")
        masks = magnitude_masks(graph, layers, ini, self.scope)
        zeroed = 0
        for n, m in masks.items():  # every pruned weight gets a mask now, so training can tighten it
            old = get_mask(n.inputs[1])
            zeroed += int(np.count_nonzero(np.asarray(n.inputs[1].const)[~m.keep]))
            if old is None or old != m:
                set_mask(graph, n.inputs[1], m)
        before = graph.scratch.get(SPARSITY_SCHEDULE)
        graph.scratch[SPARSITY_SCHEDULE] = {"final": fin, "initial": ini, "begin": self.begin, "end": self.end,
                                            "frequency": self.frequency, "power": self.power, "scope": self.scope,
                                            "weights": [n.inputs[1].name for n in layers]}
        changed = zeroed > 0 or before != graph.scratch[SPARSITY_SCHEDULE]
        return PassResult(graph, changed, {"layers": len(layers), "initial": ini, "final": fin, "zeroed": zeroed})
