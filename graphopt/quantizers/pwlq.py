"""Piecewise-linear quantization (PWLQ, Fang et al. 2020): a dense centre and sparse tails with their own steps."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from graphopt.errors import GraphOptError
from graphopt.quantizers.base import register
from graphopt.quantizers.zoo import (  # the shared row views and base classes
    ZooScheme,
)

# The closed forms of Fang et al. (ECCV 2020) for the breakpoint of a normalised
# (unit-variance) Gaussian or Laplacian with |x| <= m:  p = ln(0.8614 m + 0.6079) and
# p = 0.8030 sqrt(m) - 0.3167.
_GAUSS = (0.86143114, 0.607901097496529)
_LAPLACE = (0.80304483, -0.3166785508381478)


@register
@dataclass(frozen=True)
class PWLQ(ZooScheme):
    """Piecewise-linear quantization (Fang et al., ECCV 2020). [-m, m] is split at breakpoints
    0 < p1 < ... < pk < m (``bp1``..``bp3``): the centre [-p1, p1] is uniform with b bits
    (signed, symmetric) and each band [p_i, p_(i+1)] on either side is uniform with b-1 bits,
    its own step, offset p_i. The region index costs ceil(log2(k+1)) bits more, as in the
    paper (its "b-bit PWLQ"). Breakpoints from the Gaussian (``gauss``, default) or Laplacian
    (``laplace``) closed form (one breakpoint), by a batched squared-error search (``mse``, the
    default for 2-3), or fixed (``at0.3``, ``at0.2/0.5``: fractions of m), per channel. With p1 = m it is the uniform scheme exactly."""

    scheme = "pwlq"
    param_names = ("alpha", "breaks")
    scale_params = ("alpha", "breaks")
    doc = "pwlq<bits>[:bp1|bp2|bp3][:gauss|laplace|mse][:tensor|channel]: piecewise-linear (Fang et al. 2020); float"
    words = {"bp1": ("breakpoints", 1), "bp2": ("breakpoints", 2), "bp3": ("breakpoints", 3),
             "gauss": ("fit", "gauss"), "laplace": ("fit", "laplace"), "mse": ("fit", "mse")}
    bit_range = (2, 8)
    search_clip = False

    breakpoints: int = 1
    fit: str = "auto"  # gauss for one breakpoint, mse for more
    at: tuple[float, ...] = ()  # fixed breakpoints as fractions of m (``at0.3`` or ``at0.2/0.5``)

    @classmethod
    def special_token(cls, tok, text, what):
        if not tok.startswith("at"):
            return None
        try:
            ratios = tuple(float(r) for r in tok[2:].split("/"))
        except ValueError:
            raise GraphOptError(f"bad {what} spec '{text}': '{tok}' is not at<r1>[/<r2>...] with fractions of "
                                "the range") from None
        return "at", ratios

    def __post_init__(self):
        if self.at:
            object.__setattr__(self, "breakpoints", len(self.at))

    def invalid(self):
        if self.at:
            r = np.asarray(self.at)
            if len(r) > 3:
                return f"at most 3 breakpoints, not {len(r)}"
            if not (np.all(r > 0) and np.all(r <= 1) and np.all(np.diff(r) > 0)):
                return (f"PWLQ breakpoints {'/'.join(f'{v:g}' for v in r)} must be increasing fractions of the range "
                        "in (0, 1]")
        elif self.fit in ("gauss", "laplace") and self.breakpoints != 1:
            return f"the {self.fit} closed form gives one breakpoint; use mse for {self.breakpoints}"
        return ""

    def __str__(self) -> str:
        base = super().__str__()
        if self.at:
            base = ":".join(t for t in base.split(":") if not t.startswith("bp")) + ":at" + "/".join(
                f"{v:g}" for v in self.at)
        return base

    def rows(self, r, params):
        m = params["alpha"]  # [rows, 1]
        bp = params["breaks"].reshape(r.shape[0], -1)  # [rows, k]
        edges = torch.cat([torch.zeros_like(m), bp, m], 1)  # [rows, k+2]
        a = torch.minimum(r.abs(), m)
        region = (a[:, :, None] > edges[:, None, 1:-1]).sum(-1)  # 0 = centre
        lo = torch.gather(edges, 1, region)
        hi = torch.gather(edges, 1, region + 1)
        step = (hi - lo) / float((1 << (self.bits - 1)) - 1)  # b bits signed in the centre, b-1 unsigned in a band
        safe = torch.where(step > 0, step, torch.ones_like(step))
        q = torch.where(step > 0, lo + torch.round((a - lo) / safe) * step, lo)
        return torch.sign(r) * q

    def initial_params(self, r):
        r64 = r.astype(np.float64)
        m = np.maximum(np.abs(r64).max(axis=1), 1e-12)
        if self.at:
            breaks = m[:, None] * np.asarray(self.at, np.float64)[None, :]
        elif self.fit in ("gauss", "laplace") or (self.fit == "auto" and self.breakpoints == 1):
            sd = np.maximum(r64.std(axis=1), 1e-12)
            mn = m / sd
            gauss = self.fit != "laplace"
            c, i = _GAUSS if gauss else _LAPLACE
            p = (np.log(c * mn + i) if gauss else c * np.sqrt(mn) + i) * sd
            breaks = np.clip(p, 0.02 * m, m)[:, None]
        else:
            breaks = self._search(r, m)
        return {"alpha": m.astype(np.float32), "breaks": breaks.astype(np.float32)}

    def _search(self, r: np.ndarray, m: np.ndarray, grid: int = 24) -> np.ndarray:
        """Breakpoint ratios on a grid, every ordered k-tuple tried for all rows at once."""
        import itertools

        ratios = np.linspace(0.05, 0.95, grid if self.breakpoints == 1 else (14 if self.breakpoints == 2 else 9))
        cands = np.array(list(itertools.combinations(ratios, self.breakpoints)))  # [C, k]
        rt = torch.from_numpy(r.astype(np.float32))
        mt = torch.from_numpy(m.astype(np.float32))[:, None]
        best_err = torch.full((r.shape[0],), float("inf"))
        best = torch.from_numpy(np.broadcast_to(cands[0], (r.shape[0], self.breakpoints)).copy().astype(np.float32))
        with torch.no_grad():
            for c in cands:  # one candidate tuple at a time, all rows and weights at once
                bp = mt * torch.from_numpy(c.astype(np.float32))[None, :]
                err = ((self.rows(rt, {"alpha": mt, "breaks": bp}) - rt) ** 2).sum(1)
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best = torch.where(better[:, None], bp, best)
        return best.numpy()

    def kernel_bits(self, kind="weight"):
        return None

    def true_bits(self) -> float:
        return float(self.bits + math.ceil(math.log2(self.breakpoints + 1)))

    def describe(self) -> str:
        return f"pwlq {self} ({self.bits}-bit regions + {self.true_bits() - self.bits:g} region bit(s))"
