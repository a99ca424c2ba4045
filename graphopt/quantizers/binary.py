"""Binary weights (XNOR-Net, Rastegari et al. 2016): sign(w)·mean|w|, with a clipped straight-through estimator."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from graphopt.quantizers.base import register
from graphopt.quantizers.zoo import (  # the shared row views and base classes
    DerivedLevels,
)


@register
@dataclass(frozen=True)
class Binary(DerivedLevels):
    """Binary weights (XNOR-Net): sign(w) * alpha per row, alpha = mean |w| (the L2-optimal
    scale for sign). Zero maps to +alpha."""

    scheme = "binary"
    doc = "binary[:tensor|channel]: sign(w) * mean|w| (XNOR-Net); int8 kernels"
    bit_range = (1, 1)
    default_bits = 1

    bits: int = 1

    def unit_levels(self):
        return np.array([-1.0, 1.0])

    def rows(self, r, params):
        return params["alpha"] * torch.where(r >= 0, 1.0, -1.0)

    def row_params(self, r, params):  # alpha = mean|w| of the current weights (XNOR-Net)
        return {"alpha": r.detach().abs().mean(1, keepdim=True).clamp_min(1e-12)}

