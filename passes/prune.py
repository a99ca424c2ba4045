"""Structured channel pruning: ``prune-channels`` (selection) and ``fold-prune`` (physical
removal). Selection and folding are separate steps: prune-channels only records masks, fold-prune
removes the channels from every member of each group. The dependency groups come from
``channels.analyze`` and the channel scores from ``importance``."""


from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np

from graphopt.errors import GraphOptError
from graphopt.geometry import geometry
from graphopt.ir import Graph
from graphopt.masks import Mask, channel_masks, set_channel_masks
from graphopt.passmanager import Context, Pass, PassResult, option, register_pass

from . import _layers as L
from .canonicalize import bypass, is_zero_pad
from .channels import Space, _channels, analyze  # noqa: F401  (analyze: the dependency groups, re-exported)
from .importance import _importance, taylor_scores  # noqa: F401  (taylor_scores re-exported)

log = logging.getLogger("graphopt.passes.prune")

@register_pass("prune-channels")
@dataclass(kw_only=True)
class PruneChannels(Pass):
    """Choose channels to remove and record them as masks (fold-prune removes them).

    A group of coupled channels (see the dependency analysis) is scored as a whole: the
    importance of all its members is summed (L1 or L2 of every weight that touches a channel,
    or |BN scale|, or random). ``ratio`` removes that fraction of each prunable group. With
    ``global_ranking`` scores are normalised per group and one threshold picks channels across
    all groups. Kept channel counts are rounded to multiples of ``round_to``; layers whose name
    matches a ``skip`` pattern keep all their channels."""

    before = ("quantize", "fold-prune")  # fold-prune consumes the masks this pass makes

    ratio: float = option(0.3, "fraction of channels to remove from each prunable group, in [0, 1)", minimum=0.0,
                          maximum=0.999999)
    criterion: Literal["l1", "l2", "bn_scale", "taylor", "random"] = option(
        "l1", "channel importance (taylor: gradient x weight on the calibration data)")
    round_to: Optional[int] = option(None, "keep a multiple of this many channels: the runtime's channel block "
                                           "(onnxruntime: 16 on AVX-512, 8 on AVX2); none: this CPU's, detected "
                                           "(see graphopt.util.channel_block)", minimum=1)
    skip: list[str] = option([], "layer name/source patterns (fnmatch) whose groups are not pruned; "
                                 "in a channel-padded tree, that member keeps its own channels")
    global_ranking: bool = option(False, "one threshold across groups instead of the same ratio in each")
    target_macs: Optional[float] = option(None, "instead of ratio: reach this fraction of the MACs, with per-group "
                                                "ratios chosen by a sensitivity scan on the calibration data",
                                          minimum=0.05, maximum=1.0)
    seed: int = option(0, "seed for criterion=random")

    def run(self, graph: Graph, ctx: Context) -> PassResult:
        if self.round_to is None:  # the default is safe for speed: this CPU's channel block
            from graphopt.util import channel_block

            block, why = channel_block()
            log.info("prune-channels: round_to=%d (%s)", block, why)
            r = dataclasses.replace(self, round_to=block)._run(graph, ctx)
            r.stats["round_to"] = f"{block} ({why})"
            return r
        return self._run(graph, ctx)

    def _run(self, graph: Graph, ctx: Context) -> PassResult:
        if not 0.0 <= self.ratio < 1.0:
            raise GraphOptError(f"ratio must be in [0, 1), got {self.ratio}")
        rng = np.random.default_rng(self.seed)
        spaces = analyze(graph)
        candidates, reasons = [], {}
        for sp in spaces:
            if sp.parent is not None:
                continue  # pruned as part of the space it is padded into
            if not sp.prunable:
                for name in sp.names or [v.name for v in sp.values[:1]]:
                    reasons[name] = "; ".join(sp.reasons) or "no producing layer"
                continue
            if _skipped(sp, self.skip):
                continue
            candidates.append(sp)
        masks: dict[str, list[int]] = {}
        taylor = None
        if self.criterion == "taylor":
            if ctx.calib is None:
                raise GraphOptError("prune-channels{criterion=taylor} needs calibration data (--calib)")
            taylor = taylor_scores(graph, [m for sp in candidates for m, _ in sp.tree()], ctx.calib)
        if self.target_macs is not None:
            return self._by_target(graph, ctx, candidates, reasons, rng, taylor)
        scores = {sp.id: _importance(graph, sp, self.criterion, rng, taylor) for sp in candidates}
        threshold = None
        if self.global_ranking and candidates:
            allnorm = np.concatenate([scores[sp.id] / max(scores[sp.id].mean(), 1e-12) for sp in candidates])
            threshold = np.quantile(allnorm, self.ratio) if self.ratio > 0 else -np.inf
        for sp in candidates:
            sc = scores[sp.id]
            if threshold is not None:
                n_remove = int((sc / max(sc.mean(), 1e-12) < threshold).sum())
            else:
                n_remove = int(np.floor(sp.channels * self.ratio))
            if sp.children:
                keep = _select_tree(sp, sc, n_remove / sp.channels, self.round_to, self.skip)
                if len(keep) < sp.channels:
                    masks[sp.key] = Mask.channel(keep, sp.channels)
                continue
            keep_n = _round_keep(sp, sp.channels - n_remove, self.round_to)
            if keep_n <= 0:
                raise GraphOptError(f"pruning would remove every channel of {sp.names}")
            if keep_n == sp.channels:
                continue
            masks[sp.key] = Mask.channel(_select(sp, sc, keep_n), sp.channels)
        prev = channel_masks(graph)
        set_channel_masks(graph, masks)
        for name, why in reasons.items():
            log.info("prune-channels: '%s' not prunable: %s", name, why)
        removed = sum(sp.channels - len(masks[sp.key].indices()) for sp in candidates if sp.key in masks)
        return PassResult(graph, masks != prev, {"groups": len(candidates), "pruned_groups": len(masks),
                                                 "channels_removed": removed, "unprunable": reasons})


    def _by_target(self, graph: Graph, ctx: Context, candidates: list[Space], reasons, rng, taylor) -> PassResult:
        if ctx.calib is None:
            raise GraphOptError("prune-channels{target_macs=...} needs calibration data for its sensitivity scan")
        by_key = {sp.key: sp for sp in candidates}
        rows = [r for r in sensitivity(graph, ctx.calib, ratios=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8),
                                       criterion=self.criterion, round_to=self.round_to, progress=ctx.show_progress,
                                       taylor=taylor)
                if r["group"] in by_key]
        from graphopt.allocate import allocate_to_target
        from graphopt.analysis import total_macs

        # Savings of neighbouring groups are not additive (a conv losing inputs and outputs keeps
        # (1-a)(1-b) of its MACs): the allocator measures each plan and asks for more until it holds.
        macs0 = total_macs(graph)
        groups, ratios, saved, err = ratio_table(rows)

        memo: dict[tuple, dict] = {}  # one draw per plan (criterion=random), reused for the final masks

        def plan_masks(choice) -> dict:
            key = tuple(int(k) for k in choice)
            if key in memo:
                return memo[key]
            masks = memo[key] = {}
            for g, k in zip(groups, choice):
                if k > 0:
                    sp = by_key[g]
                    keep = _keep_top(graph, sp, ratios[int(k)], self.criterion, self.round_to, rng, taylor, self.skip)
                    if keep is not None:
                        masks[sp.key] = Mask.channel(keep, sp.channels)
            return masks

        def measured(choice) -> float:  # minus the MACs really saved by the folded plan
            masks = plan_masks(choice)
            trial = graph.copy()
            set_channel_masks(trial, masks)
            return -(1.0 - (total_macs(FoldPrune()(trial).graph) / macs0 if masks else 1.0))

        choice, _ = allocate_to_target(-saved, err, -(1.0 - self.target_macs), measured)
        masks = plan_masks(choice)
        plan = {g: ratios[int(k)] for g, k in zip(groups, choice) if k > 0}
        prev = channel_masks(graph)
        set_channel_masks(graph, masks)
        return PassResult(graph, masks != prev, {"groups": len(candidates), "pruned_groups": len(masks),
                                                 "ratios": plan, "unprunable": reasons})


@register_pass("fold-prune")
@dataclass(kw_only=True)
class FoldPrune(Pass):
    """Physically remove the channels prune-channels masked: weight rows of producers and depthwise
    convs (``group`` shrinks), weight columns of every consumer (flatten -> Gemm columns in
    blocks; grouped convs per group), per-channel constants (BN, PReLU, Min/Mul/Add), Concat/Split
    offsets, Split sizes and the channel pads of zero-padding Pads (a Pad left padding nothing is
    removed). The result is a smaller dense graph, exactly equal to the masked model."""

    before = ("quantize",)

    def run(self, graph: Graph, ctx: Context) -> PassResult:
        masks = channel_masks(graph)
        if not masks:
            return PassResult(graph, False, {"groups": 0})
        spaces = {sp.key: sp for sp in analyze(graph)}
        keep_of: dict[int, np.ndarray] = {}
        for key, mask in masks.items():
            sp = spaces.get(key)
            if sp is None or not sp.prunable:
                raise GraphOptError(f"mask for '{key}' no longer matches a prunable group (re-run prune-channels)")
            _assign_tree(graph, sp, np.asarray(mask.indices(), np.int64), keep_of)
        # a channel Pad left with nothing to pad (all its zero channels pruned) is an identity
        zero_pads = [n for n in graph.nodes if is_zero_pad(graph, n)]
        dropped_pads = sum(bypass(graph, n) for n in zero_pads)
        by_value = {v: sp for sp in spaces.values() for v in sp.values}
        for sp in spaces.values():
            for n in sp.producers:
                by_value.setdefault(n.outputs[0], sp)
        # derived spaces: concat outputs and split outputs get mapped keep lists
        for n in graph.nodes:
            if n.op_type == "Concat" and n.outputs[0] in by_value and by_value[n.outputs[0]].id not in keep_of:
                parts, off, touched = [], 0, False
                for v in n.inputs:
                    sp = by_value.get(v)
                    k = keep_of.get(sp.id) if sp is not None else None
                    touched |= k is not None
                    parts.append(off + (k if k is not None else np.arange(_channels(v))))
                    off += _channels(v)
                if touched:
                    keep_of[by_value[n.outputs[0]].id] = np.concatenate(parts)
            if n.op_type == "Split" and n.inputs[0] in by_value and by_value[n.inputs[0]].id in keep_of:
                k = keep_of[by_value[n.inputs[0]].id]
                off, sizes = 0, []
                for o in n.outputs:
                    c = _channels(o)
                    seg = k[(k >= off) & (k < off + c)] - off
                    if seg.size == 0:
                        raise GraphOptError(f"pruning would empty output '{o.name}' of Split '{n.name}'")
                    if o in by_value:
                        keep_of[by_value[o].id] = seg
                    sizes.append(seg.size)
                    off += c
                L.set_input_const(graph, n, 1, np.asarray(sizes, np.int64))
        changed = 0
        for sp in spaces.values():
            k = keep_of.get(sp.id)
            if k is None:
                continue
            for n in sp.producers:
                w = L.weight(graph, n)
                geo = geometry(n)
                L.set_input_const(graph, n, 1, geo.from_out_view(geo.out_view(w)[k], geo.resized(w.shape, out=len(k))))
                b = L.bias(graph, n)
                if b is not None:
                    L.set_input_const(graph, n, 2, b[k])
            for n in sp.depthwise:
                w = L.weight(graph, n)
                L.set_input_const(graph, n, 1, w[k])
                b = L.bias(graph, n)
                if b is not None:
                    L.set_input_const(graph, n, 2, b[k])
                n.attrs["group"] = int(len(k))
            for n, s in sp.consumers:
                cols = np.concatenate([np.arange(c * s, (c + 1) * s) for c in k]) if s > 1 else k
                w = L.weight(graph, n)
                view = geometry(n).in_view(w)[cols]
                L.set_input_const(graph, n, 1, geometry(n).from_in_view(view, geometry(n).resized(w.shape, inp=len(cols))))
            for n, i in sp.params:
                c = np.asarray(graph.const_value(n.inputs[i]))
                # BN parameters are 1-D per channel; other constants broadcast right-aligned
                axis = 0 if n.op_type == "BatchNormalization" else 1 - (len(n.outputs[0].shape) - c.ndim)
                L.set_input_const(graph, n, i, np.take(c, k, axis=axis))
            changed += 1
        for v in graph.values.values():  # shapes change: infer them again
            if v.const is None and v.producer is not None:
                v.shape = None
        graph.infer_shapes()
        set_channel_masks(graph, {})
        graph.remove_unused_constants()
        return PassResult(graph, changed > 0 or dropped_pads > 0, {"groups": changed, "pads_removed": dropped_pads})


def _assign_tree(graph: Graph, sp: Space, keep: np.ndarray, keep_of: dict[int, np.ndarray]) -> None:
    """Give ``sp`` its kept channels, map them into every space padded into it, and shrink the
    channel pads of those Pads to the zero channels that are kept."""
    keep_of[sp.id] = keep
    for ch in sp.children:
        _, off, pad = ch.parent
        inner = keep[(keep >= off) & (keep < off + ch.channels)] - off
        if inner.size == 0:
            raise GraphOptError(f"pruning would remove every channel that Pad '{pad.name}' pads")
        pads = np.asarray(graph.const_value(pad.inputs[1])).copy()
        rank = pads.size // 2
        pads[1], pads[1 + rank] = int((keep < off).sum()), int((keep >= off + ch.channels).sum())
        L.set_input_const(graph, pad, 1, pads)
        _assign_tree(graph, ch, inner, keep_of)


# ---------------------------------------------------------------------------- sensitivity
def _round_keep(sp: Space, keep_n: int, round_to: int) -> int:
    """``keep_n`` rounded to a multiple of ``round_to`` (and of the group count of grouped convs)."""
    unit = int(np.lcm(round_to, sp.blocks[0])) if sp.blocks else round_to
    return min(sp.channels, max(unit, int(round(keep_n / unit)) * unit))


def _select(sp: Space, scores: np.ndarray, keep_n: int) -> list[int]:
    """The ``keep_n`` most important channels; with grouped convs, the same number from each group."""
    if not sp.blocks:
        return np.sort(np.argsort(-scores, kind="stable")[:keep_n]).tolist()
    g = sp.blocks[0]
    per, size = keep_n // g, sp.channels // g
    blocks = scores.reshape(g, size)
    top = np.sort(np.argsort(-blocks, axis=1, kind="stable")[:, :per], axis=1)
    return (top + (np.arange(g) * size)[:, None]).reshape(-1).tolist()


def _skipped(sp: Space, patterns: list[str]) -> bool:
    return any(L.matches(n, patterns) for n in sp.producers + sp.depthwise)


def _select_tree(sp: Space, scores: np.ndarray, ratio: float, round_to: int, skip: list[str] = ()) -> list[int]:
    """Selection for a space with channel-padded spaces inside it. Every member of the tree keeps
    ``1 - ratio`` of its channels, rounded to ``round_to`` (at least ``round_to``): first the
    inner spaces choose theirs, then each outer space tops up from its own channels (the ones
    not padded in) by importance. A member whose layers match ``skip`` keeps all its own."""
    keep: list[np.ndarray] = []

    def visit(m: Space, off: int) -> int:
        inner = sum(visit(ch, off + ch.parent[1]) for ch in m.children)
        own = np.ones(m.channels, bool)
        for ch in m.children:
            own[ch.parent[1]:ch.parent[1] + ch.channels] = False
        idx = off + np.flatnonzero(own)
        if m is not sp and _skipped(m, skip):
            k = idx.size
        else:
            target = min(m.channels, max(round_to, int(round(m.channels * (1.0 - ratio) / round_to)) * round_to))
            k = int(np.clip(target - inner, 0, idx.size))
        keep.append(idx[np.argsort(-scores[idx], kind="stable")[:k]])
        return inner + k

    visit(sp, 0)
    return np.sort(np.concatenate(keep)).tolist()


def _keep_top(graph: Graph, sp: Space, ratio: float, criterion: str, round_to: int, rng,
              taylor: dict[str, np.ndarray] | None = None, skip: list[str] = ()) -> list[int] | None:
    if sp.children:
        keep = _select_tree(sp, _importance(graph, sp, criterion, rng, taylor), ratio, round_to, skip)
        return keep if len(keep) < sp.channels else None
    keep_n = _round_keep(sp, sp.channels - int(np.floor(sp.channels * ratio)), round_to)
    if keep_n >= sp.channels:
        return None
    return _select(sp, _importance(graph, sp, criterion, rng, taylor), keep_n)


def sensitivity(graph: Graph, data, ratios=(0.1, 0.3, 0.5, 0.7), labels: np.ndarray | None = None,
                criterion: str = "l1", round_to: int = 1, progress: bool = False,
                taylor: dict[str, np.ndarray] | None = None) -> list[dict]:
    """Prune each prunable group alone at each ratio and measure the damage on ``data`` (a
    ``graphopt.scan.Scan`` transform trial: the pruned, folded copy): the output's relative L2
    error against the unpruned graph, and top-1 accuracy if ``labels``. Returns one row per
    (group, ratio) in the scan schema (unit = group, level = ratio, cost = the share of MACs left,
    error = the scan's metric) with the MACs saved."""
    from graphopt.analysis import total_macs
    from graphopt.scan import Scan, row
    from graphopt.training.calibration import CalibrationData

    data = data if isinstance(data, CalibrationData) else CalibrationData(data)
    scan = Scan(graph, data, labels)
    macs0 = total_macs(graph)
    rng = np.random.default_rng(0)
    rows = []
    spaces = [sp for sp in analyze(graph) if sp.prunable]
    if criterion == "taylor" and taylor is None:
        taylor = taylor_scores(graph, [m for sp in spaces for m, _ in sp.tree()], data)
    jobs = [(sp, r) for sp in spaces for r in ratios]
    it = jobs
    if progress:
        from tqdm import tqdm

        it = tqdm(jobs, desc="sensitivity", leave=False)
    for sp, r in it:
        keep = _keep_top(graph, sp, r, criterion, round_to, rng, taylor)
        if keep is None:
            continue
        g = graph.copy()
        set_channel_masks(g, {sp.key: Mask.channel(keep, sp.channels)})
        g = FoldPrune()(g).graph
        trial = scan.transform(g)
        left = total_macs(g) / macs0
        rows.append(row(sp.key, r, left, trial, group=sp.key, layers=", ".join(sp.names), ratio=r,
                        channels=sp.channels, kept=len(keep), macs_saved=1.0 - left,
                        rel_error=float(np.sqrt(trial["rel_mse"])),
                        **({"top1": trial["top1"]} if labels is not None else {})))
    return rows


def ratio_table(rows: list[dict]) -> tuple[list[str], list[float], np.ndarray, np.ndarray]:
    """The sensitivity rows as the allocator's tables: (groups, ratios with 0 first, MACs saved
    [G, K], relative MSE [G, K] (the square of the rows' relative L2 error); inf where a group has
    no row at that ratio)."""
    groups = list(dict.fromkeys(r["group"] for r in rows))
    ratios = [0.0] + sorted({r["ratio"] for r in rows})
    saved = np.zeros((len(groups), len(ratios)))
    err = np.full((len(groups), len(ratios)), np.inf)
    err[:, 0] = 0.0
    gi, ri = {g: i for i, g in enumerate(groups)}, {v: j for j, v in enumerate(ratios)}
    for r in rows:
        saved[gi[r["group"]], ri[r["ratio"]]] = r["macs_saved"]
        err[gi[r["group"]], ri[r["ratio"]]] = r["rel_error"] ** 2  # the relative MSE (the scan's metric)
    return groups, ratios, saved, err


def allocate_ratios(rows: list[dict], target_saving: float) -> dict[str, float]:
    """The ratio per group with the least summed output error (relative MSE) whose summed MACs
    saved reach ``target_saving``: ``graphopt.allocate``'s exact dynamic program, with cost =
    minus the MACs saved. Groups left unpruned are omitted."""
    from graphopt.allocate import allocate

    groups, ratios, saved, err = ratio_table(rows)
    choice = allocate(-saved, err, -target_saving)[0]
    return {g: ratios[int(k)] for g, k in zip(groups, choice) if k > 0}
