"""DoReFa weights (Zhou et al. 2016): tanh-normalized weights on a uniform grid in [-1, 1]."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from graphopt.quantizers.base import register
from graphopt.quantizers.zoo import (  # the shared row views and base classes
    ZooScheme,
)


@register
@dataclass(frozen=True)
class DoReFa(ZooScheme):
    """DoReFa-Net weights (Zhou et al. 2016): w_n = tanh(w) / (2 max|tanh(w)|) + 1/2 in [0, 1],
    quantized to k bits, then w_q = 2 quantize_k(w_n) - 1, scaled by alpha (max|w| at
    quantization time, since a folded-BN graph has no BatchNorm to restore the scale). In
    training the gradient flows through the tanh normalisation (the rounding is straight-
    through). The levels are the odd integers in [-(2^k - 1), 2^k - 1] times alpha / (2^k - 1):
    int8 kernels up to 7 bits."""

    scheme = "dorefa"
    scale_params = ()  # tanh normalisation: not scale-equivariant
    doc = "dorefa<bits>[:tensor|channel]: DoReFa-Net tanh-normalised weights, for QAT; int8 kernels to 7 bits"
    bit_range = (1, 8)
    search_clip = False

    granularity: str = "tensor"

    @property
    def n(self) -> int:
        return (1 << self.bits) - 1

    def _normalised(self, r: torch.Tensor) -> torch.Tensor:
        t = torch.tanh(r)
        return t / (2 * t.abs().amax(1, keepdim=True).clamp_min(1e-12)) + 0.5

    def rows(self, r, params):
        code = 2 * torch.round(self._normalised(r) * self.n) - self.n
        return code * (params["alpha"] / self.n)

    def surrogate(self, r, params):
        return params["alpha"].detach() * (2 * self._normalised(r) - 1)

    def integer_step(self, params):
        if self.n > 127:
            return None, f"{self.bits}-bit DoReFa codes reach {self.n}, beyond int8's 127"
        return (np.asarray(params["alpha"], np.float32).reshape(-1) / np.float32(self.n)).astype(np.float32), ""
