"""Quantizer maths: specs, scale/zero-point selection, fake quantization.

A ``FakeQuant`` node (domain ``ai.graphopt``) carries one uniform affine quantizer:
inputs ``(x, scale, zero_point)``, attributes ``bits``, ``signed``, ``narrow`` (symmetric
range without the most negative code), ``axis`` (per channel or per block; absent means per
tensor), ``block_size`` (0 = none) and ``kind`` (``weight``, ``act`` or ``bias``). Its value is

    y = (clamp(round_half_even(x / scale) + zero_point, qmin, qmax) - zero_point) * scale

which is, operation for operation, ONNX's QuantizeLinear followed by DequantizeLinear. So the
torch simulation and onnxruntime's integer model agree to the last code, except where the
integer kernels accumulate in a different order.

All maths is vectorized over channels (numpy for static weights, torch for data).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from graphopt.errors import GraphOptError

DOMAIN = "ai.graphopt"
FAKE_QUANT = "FakeQuant"


def qrange(bits: int, signed: bool, narrow: bool = False) -> tuple[int, int]:
    """Integer range of a quantizer: [-2^(b-1) (+1 if narrow), 2^(b-1) - 1] or [0, 2^b - 1]."""
    if signed:
        return -(1 << (bits - 1)) + (1 if narrow else 0), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def fq_range(node) -> tuple[int, int]:
    """qmin, qmax of a FakeQuant node from its attributes."""
    return qrange(node.attr("bits", 8), bool(node.attr("signed", 1)), bool(node.attr("narrow", 0)))


@dataclass(frozen=True)
class QSpec:
    """What a quantizer is: bits, signedness, granularity, symmetry."""

    bits: int = 8
    signed: bool = True
    granularity: str = "tensor"  # tensor | channel | block
    block_size: int = 0
    symmetric: bool = True
    narrow: bool = False

    @property
    def qmin(self) -> int:
        return qrange(self.bits, self.signed, self.narrow)[0]

    @property
    def qmax(self) -> int:
        return qrange(self.bits, self.signed, self.narrow)[1]

    def __str__(self) -> str:
        s = f"{'int' if self.signed else 'uint'}{self.bits}:{self.granularity}"
        if self.granularity == "block":
            s += str(self.block_size)
        return s


_SPEC_RE = re.compile(r"^(u?int)(\d+)(?::(tensor|channel|block)(\d*))?(?::(sym|asym))?$")


def parse_spec(text: str, what: str, default_symmetric: bool) -> QSpec:
    """``int8:channel``, ``uint8:tensor``, ``int4:block32``, ``int8:tensor:asym`` ..."""
    m = _SPEC_RE.match(text.strip().lower())
    if not m:
        raise GraphOptError(f"bad {what} spec '{text}': expected e.g. int8:channel, uint8:tensor, int4:block32")
    kind, bits, gran, block, sym = m.groups()
    bits = int(bits)
    if not 2 <= bits <= 16:
        raise GraphOptError(f"bad {what} spec '{text}': bits must be 2..16")
    gran = gran or "tensor"
    block_size = int(block) if block else 0
    if gran == "block" and block_size <= 0:
        raise GraphOptError(f"bad {what} spec '{text}': block needs a size, e.g. block32")
    if gran != "block" and block:
        raise GraphOptError(f"bad {what} spec '{text}': only block takes a size")
    symmetric = default_symmetric if sym is None else sym == "sym"
    return QSpec(bits, kind == "int", gran, block_size, symmetric, narrow=False)


# ------------------------------------------------------------------ scale selection
def scale_zp(lo: np.ndarray, hi: np.ndarray, spec: QSpec) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point that make [lo, hi] representable (0 always exactly representable)."""
    lo = np.minimum(np.asarray(lo, np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, np.float64), 0.0)
    if spec.symmetric:
        amax = np.maximum(-lo, hi)
        if spec.signed:
            half = min(-spec.qmin, spec.qmax)
            scale = amax / half
            zp = np.zeros_like(scale)
        else:  # symmetric unsigned (non-negative data): zero point at qmin
            scale = hi / (spec.qmax - spec.qmin)
            zp = np.full_like(scale, spec.qmin)
    else:
        scale = (hi - lo) / (spec.qmax - spec.qmin)
        safe = np.where(scale > 0, scale, 1.0)
        zp = np.clip(np.round(spec.qmin - lo / safe), spec.qmin, spec.qmax)
    scale = np.where(scale > 0, scale, 1.0)  # all-zero channels: any scale is exact
    return scale.astype(np.float32), zp.astype(np.float32)


def fake_quant_np(x: np.ndarray, scale: np.ndarray, zp: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
    """Broadcasted numpy fake quantization (scale/zp already shaped to broadcast)."""
    x = np.asarray(x, np.float32)
    q = np.clip(np.round(x / scale) + zp, qmin, qmax)
    return ((q - zp) * scale).astype(np.float32)


def quantize_np(x: np.ndarray, scale: np.ndarray, zp: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
    """Integer codes as float64 (exact for every bit width up to 32). The division is float32,
    as in QuantizeLinear; the clip is float64, where 2**31 - 1 is representable."""
    q = np.round(np.asarray(x, np.float32) / np.asarray(scale, np.float32)).astype(np.float64)
    return np.clip(q + np.asarray(zp, np.float64), qmin, qmax)


def broadcast_param(p: np.ndarray, ndim: int, axis: int | None, block: int = 0, dim_size: int | None = None) -> np.ndarray:
    """Shape a per-channel/per-block parameter to broadcast against a tensor of rank ndim."""
    p = np.asarray(p, np.float32)
    if axis is None or p.size == 1:
        return p.reshape(())
    if block:
        p = np.repeat(p, block, axis=axis)
        if dim_size is not None:
            p = np.take(p, np.arange(dim_size), axis=axis)
        return p
    shape = [1] * ndim
    shape[axis] = p.size
    return p.reshape(shape)


def weight_qparams(w: np.ndarray, spec: QSpec, axis: int, method: str = "minmax",
                   grid: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """Per-tensor / per-channel / per-block scale and zero point for a weight tensor.

    ``method=mse`` searches, per channel (or block) and in one batched computation, the
    clipping ratio in [0.3, 1] that minimises the squared quantization error."""
    w = np.asarray(w, np.float32)
    if spec.granularity == "tensor":
        groups = w.reshape(1, -1)
    elif spec.granularity == "channel":
        groups = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    else:  # block: blocks of block_size along the *input* axis, per output channel
        groups, _ = _blocks(w, axis, spec.block_size)
    lo, hi = groups.min(axis=1), groups.max(axis=1)
    if method == "minmax":
        scale, zp = scale_zp(lo, hi, spec)
    elif method == "mse":
        ratios = np.linspace(0.3, 1.0, grid, dtype=np.float32)
        best_err = np.full(groups.shape[0], np.inf, np.float64)
        scale, zp = scale_zp(lo, hi, spec)
        gt = torch.from_numpy(np.ascontiguousarray(groups))
        for r in ratios:  # grid points in sequence, all channels at once
            s, z = scale_zp(lo * r, hi * r, spec)
            st, zt = torch.from_numpy(s)[:, None], torch.from_numpy(z)[:, None]
            q = (torch.clamp(torch.round(gt / st) + zt, spec.qmin, spec.qmax) - zt) * st
            err = ((q - gt) ** 2).sum(1).double().numpy()
            better = err < best_err
            best_err = np.where(better, err, best_err)
            scale, zp = np.where(better, s, scale), np.where(better, z, zp)
    else:
        raise GraphOptError(f"unknown weight calibration method '{method}' (minmax, mse)")
    if spec.granularity == "block":
        nblocks = -(-w.shape[axis] // spec.block_size)
        # groups are ordered [out-channel, block]: reshape to the block-scale tensor layout
        scale = _block_param_layout(scale, w.shape, axis, nblocks)
        zp = _block_param_layout(zp, w.shape, axis, nblocks)
    return scale, zp


def _blocks(w: np.ndarray, axis: int, block: int) -> tuple[np.ndarray, int]:
    """[out_channels * nblocks, block] groups; the last block is padded with zeros."""
    wm = np.moveaxis(w, axis, -1)  # [..., K]
    k = wm.shape[-1]
    nblocks = -(-k // block)
    pad = nblocks * block - k
    if pad:
        wm = np.concatenate([wm, np.zeros(wm.shape[:-1] + (pad,), wm.dtype)], axis=-1)
    return wm.reshape(-1, block), nblocks


def _block_param_layout(p: np.ndarray, wshape, axis: int, nblocks: int) -> np.ndarray:
    """Block parameters laid out like the weight with ``axis`` shrunk to the block count
    (ONNX DequantizeLinear's blocked layout)."""
    moved = list(np.moveaxis(np.empty(wshape, np.int8), axis, -1).shape)
    moved[-1] = nblocks
    return np.moveaxis(np.asarray(p, np.float32).reshape(moved), -1, axis)


# ------------------------------------------------------------------ torch fake quant
def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
               axis: int | None, block_size: int) -> torch.Tensor:
    """QuantizeLinear + DequantizeLinear in float, with a straight-through gradient inside the
    range (zero outside it). Used by the torch back end for calibration, bias correction and QAT."""
    s, z = scale, zero_point
    if axis is not None and s.dim() > 0 and s.numel() > 1:
        ax = axis % x.dim()
        if block_size:
            s = torch.repeat_interleave(s, block_size, dim=ax).narrow(ax, 0, x.shape[ax])
            z = torch.repeat_interleave(z, block_size, dim=ax).narrow(ax, 0, x.shape[ax])
        else:
            shape = [1] * x.dim()
            shape[ax] = -1
            s, z = s.reshape(shape), z.reshape(shape)
    q = torch.round(x / s) + z
    y = (torch.clamp(q, qmin, qmax) - z) * s
    if not x.requires_grad:
        return y
    inside = ((q >= qmin) & (q <= qmax)).to(x.dtype)
    return y.detach() + (x - x.detach()) * inside  # STE: d y / d x = 1 inside the range


def sqnr_db(ref: np.ndarray, test: np.ndarray) -> float:
    noise = float(np.sum((np.asarray(ref, np.float64) - test) ** 2))
    sig = float(np.sum(np.asarray(ref, np.float64) ** 2))
    return float("inf") if noise == 0 else 10 * np.log10(max(sig, 1e-30) / noise)


# ------------------------------------------------------------------ activation ranges
def range_from_histogram(counts: np.ndarray, lo: float, hi: float, spec: QSpec, method: str,
                         percentile: float = 99.99, grid: int = 64) -> tuple[float, float]:
    """Pick the quantization range of one tensor from its histogram over [lo, hi].

    * ``minmax``: [lo, hi].
    * ``percentile``: the ``percentile`` and ``100 - percentile`` points of the distribution
      (the lower one only if the data goes negative).
    * ``mse``: of ``grid`` ranges shrunk from [lo, hi], the one whose quantization of the
      histogram's bin centres has the least expected squared error (clipping + rounding),
      evaluated for all candidates at once."""
    counts = np.asarray(counts, np.float64)
    if method == "minmax" or counts.sum() == 0 or hi <= lo:
        return lo, hi
    edges = np.linspace(lo, hi, len(counts) + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    if method == "percentile":
        cdf = np.cumsum(counts) / counts.sum()
        top = float(edges[1:][np.searchsorted(cdf, percentile / 100.0)]) if percentile < 100 else hi
        bottom = float(edges[:-1][np.searchsorted(cdf, 1 - percentile / 100.0)]) if lo < 0 else lo
        return min(bottom, 0.0) if lo < 0 else lo, max(top, 0.0)
    if method == "mse":
        ratios = np.linspace(1.0 / grid, 1.0, grid)
        cand_lo, cand_hi = lo * ratios, hi * ratios
        scale, zp = scale_zp(cand_lo, cand_hi, spec)  # [grid]
        s, z = scale[:, None].astype(np.float64), zp[:, None].astype(np.float64)
        q = (np.clip(np.round(centres[None, :] / s) + z, spec.qmin, spec.qmax) - z) * s
        err = ((q - centres[None, :]) ** 2 * counts[None, :]).sum(1)
        best = int(np.argmin(err))
        return float(cand_lo[best]), float(cand_hi[best])
    raise GraphOptError(f"unknown activation calibration method '{method}' (minmax, percentile, mse)")


# ------------------------------------------------------------------ GPTQ (optimal brain quantization)
class HessianObserver:
    """Streams H = sum x x^T of a linear layer's input, im2col-unfolded like the layer reads it,
    one K x K matrix per conv group (K = input channels per group x kernel elements)."""

    def __init__(self, op: str, kernel=None, strides=None, pads=None, dilations=None, groups: int = 1):
        self.op, self.kernel, self.strides, self.pads, self.dilations, self.groups = \
            op, kernel, strides, pads, dilations, groups
        self.H: torch.Tensor | None = None
        self.n = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float()  # products in float32, sums across batches in float64
        if self.op == "Conv":
            nd = len(self.kernel)
            if nd != 2:
                raise GraphOptError("GPTQ supports 2-D convolutions only")
            begin, end = self.pads[:nd], self.pads[nd:]
            if begin != end:
                x = torch.nn.functional.pad(x, [begin[1], end[1], begin[0], end[0]])
                begin = [0, 0]
            cols = torch.nn.functional.unfold(x, self.kernel, self.dilations, begin, self.strides)  # [B, C*k, L]
            b, ck, n_pos = cols.shape
            g = self.groups
            cols = cols.reshape(b, g, ck // g, n_pos).permute(1, 2, 0, 3).reshape(g, ck // g, b * n_pos)
        else:
            cols = x.reshape(-1, x.shape[-1]).T.unsqueeze(0)  # [1, K, M]
        h = (cols @ cols.transpose(1, 2)).double()
        self.H = h if self.H is None else self.H + h
        self.n += cols.shape[-1]

    def result(self):
        return (self.H / max(self.n, 1)).numpy()


def gptq(w_rows: np.ndarray, H: np.ndarray, scale: np.ndarray, zp: np.ndarray, qmin: int, qmax: int,
         damp: float = 0.01, act_order: bool = True) -> np.ndarray:
    """GPTQ rounding of weights ``w_rows`` [G, R, K] (G groups of R rows over K inputs) with
    per-row ``scale``/``zp`` [G, R] and input Hessians ``H`` [G, K, K]. Returns the dequantized
    weights (on the quantization grid). Columns are rounded in order; each rounding error is
    spread over the columns still to come through the inverse Hessian, which keeps
    E[(W_q x - W x)^2] small. With ``act_order`` the columns whose inputs carry the most energy
    (largest Hessian diagonal, summed over groups) go first."""
    W = torch.from_numpy(np.array(w_rows, np.float64))
    Hm = torch.from_numpy(np.array(H, np.float64))
    perm = None
    if act_order:
        perm = torch.argsort(torch.diagonal(Hm, dim1=1, dim2=2).sum(0), descending=True)
        W, Hm = W[:, :, perm], Hm[:, perm][:, :, perm]
    G, R, K = W.shape
    dead = torch.diagonal(Hm, dim1=1, dim2=2) == 0
    idx = torch.arange(K)
    Hm[:, idx, idx] += damp * torch.diagonal(Hm, dim1=1, dim2=2).mean(1, keepdim=True).clamp_min(1e-12) + dead.double()
    W = W.masked_fill(dead[:, None, :], 0.0)
    L = torch.linalg.cholesky(Hm)
    Hinv = torch.cholesky_inverse(L)
    U = torch.linalg.cholesky(Hinv, upper=True)  # [G, K, K]
    s = torch.from_numpy(np.array(scale, np.float64)).reshape(G, R)
    z = torch.from_numpy(np.array(zp, np.float64)).reshape(G, R)
    Q = torch.zeros_like(W)
    for j in range(K):  # columns in order; every op is batched over groups and rows
        w = W[:, :, j]
        q = (torch.clamp(torch.round(w / s) + z, qmin, qmax) - z) * s
        Q[:, :, j] = q
        err = (w - q) / U[:, j, j][:, None]
        if j + 1 < K:
            W[:, :, j + 1:] -= err[:, :, None] * U[:, j, j + 1:][:, None, :]
    if perm is not None:
        Q = Q[:, :, torch.argsort(perm)]
    return Q.numpy()
