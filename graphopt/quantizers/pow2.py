"""Power-of-two weights: levels {0, ±2^-j·α} (Miyashita et al. 2016; rounding in the log or the linear domain)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from graphopt.quantizers.base import register
from graphopt.quantizers.zoo import (  # the shared row views and base classes
    LevelScheme,
)


@register
@dataclass(frozen=True)
class Pow2(LevelScheme):
    """Power-of-two (logarithmic) weights: levels {0, +-2^-j * alpha}, j = 0..2^(b-1)-2, so a
    multiply becomes a shift. ``round``: ``nearest`` level (least squared error, the default),
    ``msb`` (keep the most significant bit of the uniform code on the same grid, i.e. round
    down in the log domain after uniform rounding) or ``log`` (round log2|x| to the nearest
    integer). ``e<N>`` caps the number of exponents."""

    scheme = "pow2"
    doc = "pow2[:b<bits>][:e<N>][:nearest|msb|log][:tensor|channel]: power-of-two levels (shifts); int8 kernels"
    words = {"nearest": ("mode", "nearest"), "msb": ("mode", "msb"), "log": ("mode", "log")}
    numbers = {"e": "exponents"}

    mode: str = "nearest"
    exponents: int = 0  # 0: 2^(b-1) - 1

    def invalid(self):
        if self.exponents and self.exponents > (1 << (self.bits - 1)) - 1:
            return f"{self.bits} bits hold at most {(1 << (self.bits - 1)) - 1} exponents, not {self.exponents}"
        return ""

    @property
    def n_exp(self) -> int:
        return self.exponents or (1 << (self.bits - 1)) - 1

    def unit_levels(self):
        mags = 2.0 ** -np.arange(self.n_exp, dtype=np.float64)
        return np.concatenate([-mags, [0.0], mags[::-1]])

    def rows(self, r, params):
        if self.mode == "nearest":
            return super().rows(r, params)
        a = params["alpha"]
        u = torch.clamp(r.abs() / a, 0.0, 1.0)
        emin = -(self.n_exp - 1)
        if self.mode == "msb":  # uniform code on the grid of the smallest level, then its top bit
            code = torch.round(u * 2.0 ** (-emin))
            _, e = torch.frexp(code)  # code = mantissa * 2^e, mantissa in [0.5, 1): top bit 2^(e-1)
            mag = torch.where(code >= 1, torch.ldexp(torch.ones_like(code), e - 1), torch.zeros_like(code))
            mag = mag * 2.0 ** emin
        else:  # log: nearest exponent in the log domain; below half the smallest level -> 0
            e = torch.clamp(torch.round(torch.log2(u.clamp_min(1e-30))), emin, 0)
            mag = torch.where(u >= 2.0 ** emin / 2, torch.exp2(e), torch.zeros_like(u))
        return a * (torch.sign(r) * mag)
