"""Masks: which weights, or which channels, a pruned model keeps. One representation for all
kinds, so every pass and back end reads masks the same way.

A ``Mask`` is a boolean ``keep`` array plus its kind:

* ``element``: ``keep`` has the weight's shape (unstructured sparsity);
* ``nm``: ``keep`` has the weight's shape, and every group of ``m`` consecutive weights along
  ``axis`` (the layer's input / reduction axis) keeps at most ``n`` (2:4 semi-structured
  sparsity);
* ``channel``: ``keep`` is one flag per channel of a channel group (structured pruning);
* ``column``: ``keep`` has the weight's shape, and its filter matrix is conflict free under a
  column-combining plan (``graphopt.columns``): it applies, trains and folds like an element
  mask. The plan itself (group membership) is pass data in
  ``graph.scratch[graphopt.meta.COLUMN_PLANS]``, keyed by the weight's name.

Where masks live:

* element and N:M masks sit on the weight constant, ``value.meta[graphopt.meta.MASK]``
  (``set_mask``/``get_mask``). The torch back end multiplies the weight by its mask in the
  forward pass, so masked weights get no gradient and stay exactly zero through every optimizer
  step, and ``write_back`` stores the masked weights. The ONNX back end writes the masked
  weights (the mask folds into the constant).
* channel masks are a pruning plan: ``prune-channels`` stores them in
  ``graph.scratch[graphopt.meta.CHANNEL_MASKS]`` keyed by channel group, and ``fold-prune``
  removes the channels.

All selection is vectorized: a threshold or a top-k over whole tensors, never per element.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graphopt.errors import GraphOptError
from graphopt.meta import CHANNEL_MASKS, MASK

KINDS = ("element", "nm", "channel", "column")


@dataclass(frozen=True, eq=False)
class Mask:
    kind: str
    keep: np.ndarray  # bool
    axis: int | None = None  # nm: the axis the groups of m run along
    n: int = 0
    m: int = 0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise GraphOptError(f"unknown mask kind '{self.kind}' ({', '.join(KINDS)})")
        keep = np.asarray(self.keep)
        if keep.dtype != np.bool_:
            raise GraphOptError(f"a mask's keep array must be boolean, not {keep.dtype}")
        object.__setattr__(self, "keep", keep)
        if self.kind == "nm" and not (0 < self.n <= self.m):
            raise GraphOptError(f"an N:M mask needs 0 < N <= M (got {self.n}:{self.m})")

    def __eq__(self, other) -> bool:
        return (isinstance(other, Mask) and (self.kind, self.axis, self.n, self.m) ==
                (other.kind, other.axis, other.n, other.m) and np.array_equal(self.keep, other.keep))

    __hash__ = None  # type: ignore[assignment]

    # -- construction --------------------------------------------------------
    @classmethod
    def element(cls, keep) -> "Mask":
        return cls("element", np.asarray(keep, bool))

    @classmethod
    def column(cls, keep) -> "Mask":
        return cls("column", np.asarray(keep, bool))

    @classmethod
    def magnitude(cls, w: np.ndarray, sparsity: float) -> "Mask":
        """Keep the largest ``1 - sparsity`` share of ``|w|`` (ties broken by position)."""
        if not 0.0 <= sparsity < 1.0:
            raise GraphOptError(f"sparsity must be in [0, 1), not {sparsity}")
        a = np.abs(np.asarray(w, np.float64)).reshape(-1)
        n_zero = int(np.floor(a.size * sparsity))
        keep = np.ones(a.size, bool)
        keep[np.argsort(a, kind="stable")[:n_zero]] = False
        return cls("element", keep.reshape(np.shape(w)))

    @classmethod
    def n_m(cls, w: np.ndarray, n: int, m: int, axis: int) -> "Mask":
        """In every group of ``m`` consecutive weights along ``axis``, keep the ``n`` largest |w|.
        The axis length must be a multiple of ``m``."""
        w = np.asarray(w)
        axis = axis % w.ndim
        if not 0 < n <= m:
            raise GraphOptError(f"an N:M mask needs 0 < N <= M (got {n}:{m})")
        if w.shape[axis] % m:
            raise GraphOptError(f"{n}:{m} sparsity needs the reduction axis to be a multiple of {m} "
                                f"(it has {w.shape[axis]})")
        moved = np.moveaxis(np.abs(w), axis, -1)
        groups = moved.reshape(-1, m)
        order = np.argsort(-groups, axis=1, kind="stable")[:, :n]
        keep = np.zeros(groups.shape, bool)
        np.put_along_axis(keep, order, True, axis=1)
        keep = np.moveaxis(keep.reshape(moved.shape), -1, axis)
        return cls("nm", keep, axis, n, m)

    @classmethod
    def channel(cls, kept: list[int] | np.ndarray, channels: int) -> "Mask":
        idx = np.asarray(kept, np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= channels or np.unique(idx).size != idx.size):
            raise GraphOptError(f"channel mask indices must be distinct and in [0, {channels})")
        keep = np.zeros(channels, bool)
        keep[idx] = True
        return cls("channel", keep)

    # -- queries -------------------------------------------------------------
    def indices(self) -> list[int]:
        """Kept channel indices, ascending (channel masks)."""
        if self.kind != "channel":
            raise GraphOptError(f"a {self.kind} mask has no channel indices")
        return np.flatnonzero(self.keep).tolist()

    @property
    def density(self) -> float:
        return float(self.keep.mean()) if self.keep.size else 1.0

    @property
    def sparsity(self) -> float:
        return 1.0 - self.density

    def violations(self, w: np.ndarray) -> int:
        """How many weights break the mask's promise: nonzeros where the mask drops, and for N:M,
        groups of m with more than n nonzeros."""
        w = np.asarray(w)
        bad = int(np.count_nonzero(w[~self.keep])) if self.kind != "channel" else 0
        if self.kind == "nm":
            nz = np.moveaxis(w != 0, self.axis, -1).reshape(-1, self.m).sum(1)
            bad += int((nz > self.n).sum())
        return bad

    # -- application ---------------------------------------------------------
    def apply(self, w: np.ndarray) -> np.ndarray:
        """The weights with every dropped entry exactly zero (element / N:M masks)."""
        if self.kind == "channel":
            raise GraphOptError("a channel mask is folded by fold-prune, not applied to one weight")
        w = np.asarray(w)
        if w.shape != self.keep.shape:
            raise GraphOptError(f"mask of shape {list(self.keep.shape)} does not fit a weight of shape "
                                f"{list(w.shape)}")
        return np.where(self.keep, w, np.zeros((), w.dtype)).astype(w.dtype)

    def describe(self) -> str:
        what = {"element": "element-wise", "nm": f"{self.n}:{self.m}", "channel": "channel",
                "column": "column-combined"}[self.kind]
        return f"{what} mask, {self.sparsity:.1%} sparse"


def global_keep(weights: list[np.ndarray], sparsity: float, cost: list[float] | None = None) -> list[np.ndarray]:
    """Keep arrays for one magnitude threshold over all ``weights``: the smallest |w| go first
    until ``sparsity`` of the total ``cost`` is removed (``cost``: per layer, what one weight of
    it is worth, e.g. its MACs per weight; default 1, so sparsity counts parameters)."""
    a = np.concatenate([np.abs(np.asarray(w, np.float64)).reshape(-1) for w in weights])
    c = np.concatenate([np.full(np.size(w), 1.0 if cost is None else float(cost[i]))
                        for i, w in enumerate(weights)])
    order = np.argsort(a, kind="stable")
    removed = np.cumsum(c[order])
    n_drop = int(np.searchsorted(removed, sparsity * c.sum() * (1 + 1e-12), side="right"))
    keep = np.ones(a.size, bool)
    keep[order[:n_drop]] = False
    out, start = [], 0
    for w in weights:
        out.append(keep[start:start + np.size(w)].reshape(np.shape(w)))
        start += np.size(w)
    return out


# ------------------------------------------------------------------ where masks live
def set_mask(graph, value, mask: Mask) -> None:
    """Attach an element/N:M mask to a weight constant and zero the dropped weights now."""
    if value.const is None:
        raise GraphOptError(f"value '{value.name}' is not a constant: only weights take a mask")
    graph.set_const(value, mask.apply(value.const))
    value.meta[MASK] = mask


def get_mask(value) -> Mask | None:
    return value.meta.get(MASK) if value is not None else None


def masked_const(value) -> np.ndarray:
    """A constant's array with its mask folded in (what the ONNX back end writes)."""
    m = value.meta.get(MASK)
    return value.const if m is None else m.apply(value.const)


def channel_masks(graph) -> dict[str, Mask]:
    """The pruning plan prune-channels left for fold-prune: {channel group: channel mask}."""
    return dict(graph.scratch.get(CHANNEL_MASKS) or {})


def channel_keep(graph) -> dict[str, list[int]]:
    """The same plan as kept channel indices."""
    return {k: m.indices() for k, m in channel_masks(graph).items()}


def set_channel_masks(graph, masks: dict[str, Mask]) -> None:
    if masks:
        graph.scratch[CHANNEL_MASKS] = dict(masks)
    else:
        graph.scratch.pop(CHANNEL_MASKS, None)


# ------------------------------------------------------------------ gradual schedule
def scheduled_sparsity(schedule: dict, step: int, total: int) -> float | None:
    """The sparsity the schedule asks for at ``step`` (0-based, of ``total``), or None when the
    masks are not updated at this step."""
    t0 = min(int(round(schedule["begin"] * total)), max(total - 1, 0))
    t1 = max(min(int(round(schedule["end"] * total)), total - 1), t0)  # a short run still ends at the final sparsity
    freq = schedule["frequency"]
    if schedule.get("events"):  # a count of pruning events (column combining) instead of a step frequency
        freq = max((t1 - t0) // int(schedule["events"]), 1)
    if step < t0 or step > t1 or (step - t0) % freq and step != t1:
        return None
    frac = min(max((step - t0) / max(t1 - t0, 1), 0.0), 1.0)
    return schedule["final"] + (schedule["initial"] - schedule["final"]) * (1 - frac) ** schedule["power"]
