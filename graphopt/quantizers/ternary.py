"""Ternary weights (TWN, Li et al. 2016): {−α, 0, α} with threshold Δ = 0.7·mean|w|."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from graphopt.quantizers.base import register
from graphopt.quantizers.zoo import (  # the shared row views and base classes
    DerivedLevels,
)


@register
@dataclass(frozen=True)
class Ternary(DerivedLevels):
    """Ternary weights (TWN, Li & Liu 2016): threshold delta = 0.7 * mean |w| per row; values
    beyond it become +-alpha, alpha = mean |w| over them; the rest 0."""

    scheme = "ternary"
    doc = "ternary[:tensor|channel]: {-a, 0, a}, threshold 0.7 mean|w| (TWN); int8 kernels"
    param_names = ("alpha", "delta")
    scale_params = ("alpha", "delta")
    bit_range = (2, 2)
    default_bits = 2

    bits: int = 2

    def unit_levels(self):
        return np.array([-1.0, 0.0, 1.0])

    def rows(self, r, params):
        keep = r.abs() > params["delta"]
        return params["alpha"] * torch.where(keep, torch.sign(r), torch.zeros_like(r))

    def row_params(self, r, params):  # TWN's threshold and scale from the current weights
        a = r.detach().abs()
        delta = 0.7 * a.mean(1, keepdim=True)
        big = (a > delta).to(a.dtype)
        alpha = (a * big).sum(1, keepdim=True) / big.sum(1, keepdim=True).clamp_min(1)
        return {"alpha": alpha.clamp_min(1e-12), "delta": delta}


    def true_bits(self) -> float:
        return round(math.log2(3), 2)
