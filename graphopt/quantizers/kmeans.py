"""k-means weight sharing (Han, Mao & Dally, "Deep Compression", ICLR 2016, section 3).

A layer's weights are replaced by the nearest of k = 2^b shared values (its codebook), one
codebook per layer (``tensor``, the paper's), per output channel (``channel``) or per group of
``N`` consecutive output channels (``g<N>``). Spec: ``kmeans<b>[:tensor|channel|g<N>]
[:linear|density|kpp][:int8]``.

* **Clustering** is Lloyd's algorithm on the nonzero weights of every group at once (batched
  tensor maths: a sort and a ``searchsorted`` assign, an ``index_add`` updates; the only
  Python loop is over iterations). Zeros are pruned weights: they are not cluster members and
  stay exactly zero. Centroids start ``linear`` over [min, max] (the default, the paper's
  best), at the quantiles of the weights (``density``), or by k-means++ (``kpp``, seeded, one
  draw per centroid). A group with no more distinct nonzero values than k keeps each value as
  its own centroid (exact; the spare entries are never used) and a warning says so.
* **Parameters**: ``codebook`` ([groups, k] float) and ``index`` (the weight's shape: the
  centroid of each weight, -1 for a pruned zero). The FakeQuant's value is
  ``codebook[group, index]``, whatever the weight tensor holds.
* **Trained centroids**: the torch back end makes the codebook a parameter and keeps the index
  fixed; the value is a gather from the codebook, so each centroid's gradient is exactly the
  sum of its members' gradients (dL/dC_k = sum dL/dW_ij [I_ij = k], the paper's equation 3).
  The weight itself gets a zero gradient.
* ``int8``: the centroids sit on a symmetric int8 grid per group (step max|c| / 127, kept
  there while they train by a straight-through rounding), so the layer lowers to int8 codes
  and runs on QLinearConv/QGemm; the benchmark reports what that constraint costs.
* **ONNX**: float layers lower to a palettized weight (``packing.palette_weight``: a 4-bit or
  8-bit index and the codebook, expanded by a ``Gather`` in front of the layer); ``int8``
  layers to int8 codes + DequantizeLinear (``lower_weight``). ``graphopt.storage`` owns the
  stored forms and the Huffman-coded file (``graphopt compress``).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
import torch

from graphopt.errors import GraphOptError
from graphopt.quantizers.base import Lowered, register
from graphopt.quantizers.uniform import straight_through
from graphopt.quantizers.zoo import ZooScheme, from_rows, lower_weight, to_rows

log = logging.getLogger("graphopt.kmeans")

INITS = ("linear", "density", "kpp")
ITERATIONS = 60  # Lloyd iterations at most; they stop early once no centroid moves


# ------------------------------------------------------------------ clustering (batched)
def _groups(r: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``r`` ([rows, n]) as groups of ``size`` consecutive rows: ([groups, size*n] values,
    validity), the last group padded with invalid entries."""
    rows, n = r.shape
    g = -(-rows // size)
    pad = g * size - rows
    valid = torch.ones_like(r, dtype=torch.bool)
    if pad:
        r = torch.cat([r, r.new_zeros(pad, n)])
        valid = torch.cat([valid, valid.new_zeros(pad, n)])
    return r.reshape(g, size * n), valid.reshape(g, size * n)


def _assign(v: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of each group's sorted centroids ``c`` [G, k] for ``v`` [G, n]."""
    mids = (c[:, 1:] + c[:, :-1]) / 2
    return torch.searchsorted(mids.contiguous(), v.contiguous())


def _init(v: torch.Tensor, valid: torch.Tensor, k: int, how: str, seed: int) -> torch.Tensor:
    """Starting centroids [G, k] for the valid entries of ``v`` [G, n]."""
    big = torch.finfo(v.dtype).max
    lo = torch.where(valid, v, big).amin(1, keepdim=True)
    hi = torch.where(valid, v, -big).amax(1, keepdim=True)
    empty = ~valid.any(1, keepdim=True)
    lo, hi = torch.where(empty, 0.0, lo), torch.where(empty, 0.0, hi)
    if how == "linear":
        return lo + (hi - lo) * torch.linspace(0, 1, k, dtype=v.dtype)[None, :]
    if how == "density":  # equally spaced on the CDF: the quantiles (k + 1/2) / k of each group
        s = torch.where(valid, v, big).sort(1).values
        cnt = valid.sum(1, keepdim=True).clamp(min=1)
        q = (torch.arange(k, dtype=v.dtype) + 0.5) / k
        pos = torch.minimum((q[None, :] * cnt).long(), cnt - 1)
        return torch.where(empty, 0.0, s.gather(1, pos))
    # k-means++ (Arthur & Vassilvitskii 2007): each next centroid drawn with probability
    # proportional to the squared distance to the nearest one so far
    gen = torch.Generator().manual_seed(seed)
    w = valid.to(v.dtype) + 1e-30  # an empty group draws anything (its values are all 0)
    first = torch.multinomial(w, 1, generator=gen)
    cs = [v.gather(1, first)]
    d2 = (v - cs[0]) ** 2
    for _ in range(1, k):
        p = torch.where(valid, d2, 0.0) + 1e-30 * valid.to(v.dtype) + 1e-300
        nxt = v.gather(1, torch.multinomial(p, 1, generator=gen))
        cs.append(nxt)
        d2 = torch.minimum(d2, (v - nxt) ** 2)
    return torch.cat(cs, 1)


def _relocate(v: torch.Tensor, valid: torch.Tensor, at: torch.Tensor, c: torch.Tensor,
              empty: torch.Tensor) -> torch.Tensor:
    """Centroids ``c`` [G, k] with each empty one moved onto the weight worst served so far (the
    largest squared distance ``(v - at)^2`` to its centroid, one weight per empty centroid, the
    worst first), as k-means implementations do: a start that leaves centroids in empty ranges
    (linear over a heavy-tailed layer) would otherwise keep them dead."""
    e = int(empty.sum(1).max()) if empty.any() else 0
    if e == 0:
        return c
    err = torch.where(valid, (v - at) ** 2, -1.0)
    top = err.topk(min(e, v.shape[1]), dim=1)
    rank = (empty.cumsum(1) - 1).clamp(min=0, max=top.indices.shape[1] - 1)  # the i-th empty takes the i-th worst
    worst_err = top.values.gather(1, rank)
    worst_val = v.gather(1, top.indices.gather(1, rank))
    return torch.where(empty & (worst_err > 0), worst_val, c)


def cluster(r: np.ndarray, bits: int, group_rows: int, init: str = "linear", seed: int = 0,
            iterations: int = ITERATIONS) -> tuple[np.ndarray, np.ndarray, int]:
    """k-means of the nonzero values of ``r`` ([rows, n]), one codebook per ``group_rows``
    consecutive rows. Returns (codebook [groups, 2^bits] float32 sorted, index [rows, n] int64
    with -1 for zeros, how many groups had no more distinct values than centroids)."""
    k = 1 << bits
    rows, n = r.shape
    t = torch.from_numpy(np.ascontiguousarray(r, np.float64))
    v, valid = _groups(t, group_rows)
    valid &= v != 0
    G = v.shape[0]
    c = _init(v, valid, k, init, seed).sort(1).values
    offs = (torch.arange(G) * k)[:, None]
    flat_valid = valid.reshape(-1)
    vv = v.reshape(-1)[flat_valid]
    for _ in range(iterations):
        near = _assign(v, c)
        a = (near + offs).reshape(-1)[flat_valid]
        sums = torch.zeros(G * k, dtype=v.dtype).index_add_(0, a, vv)
        cnt = torch.bincount(a, minlength=G * k).to(v.dtype)
        new = torch.where(cnt > 0, sums / cnt.clamp(min=1), c.reshape(-1)).reshape(G, k)
        new = _relocate(v, valid, c.gather(1, near), new, cnt.reshape(G, k) == 0).sort(1).values
        if torch.equal(new, c):
            break
        c = new
    # groups with <= k distinct values keep them exactly: codebook = the values, padded with the last
    s = torch.where(valid, v, torch.inf).sort(1).values
    first = torch.cat([torch.ones(G, 1, dtype=torch.bool), s[:, 1:] != s[:, :-1]], 1) & torch.isfinite(s)
    distinct = first.sum(1)
    exact = (distinct <= k) & (distinct > 0)
    if exact.any():
        fin = torch.isfinite(s)
        rank = torch.where(fin, (first.cumsum(1) - 1).clamp(min=0, max=k - 1), k)  # level; k: the spare column
        levels = torch.zeros(G, k + 1, dtype=v.dtype).scatter_(1, rank, torch.where(fin, s, 0.0))[:, :k]
        last = levels.gather(1, (distinct - 1).clamp(min=0, max=k - 1)[:, None])  # only exact groups use it
        levels = torch.where(torch.arange(k)[None, :] < distinct[:, None], levels, last)
        c = torch.where(exact[:, None], levels, c)
    book = c.to(torch.float32)
    idx = torch.where(valid, _assign(v, book.to(v.dtype)), -1)
    idx = idx.reshape(-1, n)[:rows]  # back from groups to rows, without the padding
    return book.numpy(), idx.numpy().astype(np.int64), int(exact.sum())


def int8_grid(book: torch.Tensor) -> torch.Tensor:
    """Each group's centroids rounded onto its symmetric int8 grid (step max|c| / 127), with a
    straight-through gradient."""
    step = (book.detach().abs().amax(1, keepdim=True) / 127).clamp(min=1e-30)
    return straight_through(torch.round(book / step) * step, book)


# ------------------------------------------------------------------ the scheme
@register
@dataclass(frozen=True)
class KMeans(ZooScheme):
    """k-means weight sharing with trainable centroids (see the module doc)."""

    scheme = "kmeans"
    param_names = ("codebook", "index")
    scale_params = ()
    doc = ("kmeans<bits>[:tensor|channel|g<N>][:linear|density|kpp][:int8]: k-means shared weights, 2^bits "
           "centroids per layer/channel/group, trained in finetune (Deep Compression); palettized float, int8 "
           "kernels with :int8")
    words = {"linear": ("init", "linear"), "density": ("init", "density"), "kpp": ("init", "kpp"),
             "int8": ("grid", "int8")}
    numbers = {"g": "group"}
    default_bits = 4
    bit_range = (1, 8)
    elementwise = False  # a centroid is shared: GPTQ's one-weight-at-a-time rounding does not apply
    search_clip = False

    bits: int = 4
    granularity: str = "tensor"
    init: str = "linear"
    grid: str = "float"
    group: int = 0  # output channels per codebook (0: per granularity)

    def __post_init__(self):
        if self.group:
            object.__setattr__(self, "granularity", "channel")

    def invalid(self):
        if self.group < 0:
            return f"a group holds at least 1 channel, not {self.group}"
        return ""

    def __str__(self) -> str:
        toks = [f"kmeans{self.bits}", f"g{self.group}" if self.group > 1 else self.granularity]
        if self.init != "linear":
            toks.append(self.init)
        if self.grid != "float":
            toks.append(self.grid)
        return ":".join(toks)

    def with_bits(self, bits):
        return dataclasses.replace(self, bits=int(bits))

    def layer_at_bits(self, bits):
        """A layer given other bits (``override``, ``last_bits``) keeps k-means at those bits
        (the paper: 8-bit conv, 5-bit fully connected codebooks)."""
        return self.at_bits(bits)

    def rows_per_group(self, rows: int) -> int:
        return rows if self.granularity == "tensor" else max(self.group, 1)

    # -- parameters ----------------------------------------------------------
    def weight_params(self, w, out_axis, in_axis, method="minmax", start="paper"):
        if method not in ("minmax", "mse"):
            raise GraphOptError(f"k-means clusters the weights itself; weight_method={method} does not apply")
        axis = None if self.granularity == "tensor" else out_axis
        r = to_rows(torch.from_numpy(np.array(w, np.float32)), axis).numpy()
        book, idx, exact = cluster(r, self.bits, self.rows_per_group(r.shape[0]), self.init)
        if exact:
            n_groups = book.shape[0]
            log.warning("kmeans%d: %d of %d codebook group(s) of a %s weight have no more distinct nonzero values "
                        "than %d centroids: each value keeps its own centroid (exact), the spare entries stay unused",
                        self.bits, exact, n_groups, "x".join(map(str, np.shape(w))), 1 << self.bits)
        if self.grid == "int8":
            book = int8_grid(torch.from_numpy(book)).numpy()
        index = from_rows(torch.from_numpy(idx.astype(np.float32)), np.shape(w), axis).numpy()
        return {"codebook": book.astype(np.float32), "index": index.astype(np.float32)}, axis

    def trainable(self, param):
        return param == "codebook"

    # -- maths ---------------------------------------------------------------
    def value(self, x: torch.Tensor, book: torch.Tensor, index: torch.Tensor, axis: int | None) -> torch.Tensor:
        """``codebook[group, index]`` in ``x``'s layout (0 where index < 0); differentiable in
        the codebook."""
        idx = to_rows(index, axis).long()
        rows = idx.shape[0]
        book = book.to(torch.float32).reshape(-1, 1 << self.bits)
        if self.grid == "int8":
            book = int8_grid(book)
        gid = torch.arange(rows, device=idx.device) // self.rows_per_group(rows)
        flat = (gid[:, None] * (1 << self.bits) + idx.clamp(min=0)).reshape(-1)
        vals = book.reshape(-1).index_select(0, flat).reshape(idx.shape)
        y = from_rows(torch.where(idx >= 0, vals, torch.zeros_like(vals)), x.shape, axis)
        return y + x * 0 if x.requires_grad else y  # a zero gradient for the weight, so DDP sees it used

    def apply_np(self, x, params, axis):
        with torch.no_grad():
            y = self.value(torch.from_numpy(np.array(x, np.float32)), torch.from_numpy(np.array(params["codebook"])),
                           torch.from_numpy(np.array(params["index"], np.float32)), axis)
        return y.numpy().astype(np.float32)

    def torch_function(self, axis):
        return kmeans_fake_quant, (str(self), axis)

    def gptq_rounding(self, params, axis, shape):
        raise GraphOptError("weight_method=gptq rounds one weight at a time; k-means shares each centroid among "
                            "many weights: use minmax (the clustering is its own error minimisation)")

    # -- integer form --------------------------------------------------------
    def kernel_bits(self, kind="weight"):
        return 8 if self.grid == "int8" else None

    def integer_step(self, params):
        if self.grid != "int8":
            return None, "k-means centroids are free floats (add :int8 for an int8 grid)"
        book = np.asarray(params["codebook"], np.float32).reshape(-1, 1 << self.bits)
        return (np.maximum(np.abs(book).max(1), 1e-30) / np.float32(127)).astype(np.float32), ""

    def weight_codes(self, w, params, axis):
        step, why = self.integer_step(params)
        if step is None:
            return None, None, why
        y = self.apply_np(w, params, axis)
        yr = to_rows(torch.from_numpy(y), axis).numpy()
        rows = yr.shape[0]
        s = step[np.arange(rows) // self.rows_per_group(rows)].astype(np.float32)[:, None]
        codes = np.round(yr.astype(np.float64) / s)
        if not np.array_equal((codes.astype(np.float32) * s).astype(np.float32), yr):
            return None, None, "its centroids are not exact multiples of the int8 step in float32"
        return from_rows(torch.from_numpy(codes), w.shape, axis).numpy(), s.reshape(-1), ""

    def lower(self, graph, node, fmt):
        if self.grid == "int8" or fmt == "float":
            return lower_weight(self, graph, node, fmt)
        from graphopt.quantizers.base import params_of
        from graphopt.quantizers.packing import palette_weight

        x, out = node.inputs[0], node.outputs[0]
        if graph.const_value(x) is None:
            raise GraphOptError(f"FakeQuant '{node.name}': k-means quantizes constant weights only")
        p, axis = params_of(graph, node), node.attr("axis")
        y, opset = palette_weight(graph, np.asarray(p["codebook"], np.float32),
                                  np.asarray(p["index"]).astype(np.int64), axis, self.rows_per_group(
                                      1 if axis is None else np.shape(graph.const_value(x))[axis]),
                                  f"{x.name}_kmeans", node.source)
        graph.replace_all_uses(out, y)
        graph.remove_node(node)
        return Lowered(False, opset, "k-means centroids are floats: a palettized float weight (add :int8 for "
                                     "integer kernels)")

    # -- report --------------------------------------------------------------
    def true_bits(self) -> float:
        return float(self.bits)

    def describe(self) -> str:
        return f"kmeans {self} ({self.bits} bits)"


def kmeans_fake_quant(x: torch.Tensor, book: torch.Tensor, index: torch.Tensor, spec: str,
                      axis: int | None) -> torch.Tensor:
    from graphopt.quantizers.zoo import _parse_cached

    return _parse_cached(spec).value(x, book, index, axis)

