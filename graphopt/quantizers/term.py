"""Term quantization (Kung et al.): a group of values keeps only its largest power-of-two terms."""

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
class Term(ZooScheme):
    """Term quantization (Kung, McDanel & Zhang): the b-bit uniform code of each value is
    written as a sum of power-of-two terms (binary, or signed digits with ``sd``: the
    non-adjacent form, fewest nonzero digits); a group of ``g<G>`` consecutive values along a
    row shares a budget of ``t<T>`` terms, and only the T largest terms of the group are kept
    (ties: the earlier value). T >= G*(b-1) keeps every term (the uniform code); T = G keeps
    about one term per value (logarithmic). Groups run along each output channel's row."""

    scheme = "term"
    param_names = ("scale",)
    scale_params = ("scale",)
    doc = "term<bits>[:g<group>][:t<budget>][:sd][:tensor|channel]: a group keeps its largest power-of-two terms; int8"
    words = {"sd": ("signed_digits", True)}
    numbers = {"g": "group", "t": "budget"}
    default_bits = 8
    bit_range = (2, 8)
    elementwise = False

    bits: int = 8
    group: int = 8
    budget: int = 16
    signed_digits: bool = False

    def invalid(self):
        if self.group < 1:
            return "group size g must be at least 1"
        if self.budget < self.group:
            return (f"term budget t{self.budget} is below the group size g{self.group}: every value of a group "
                    "needs at least one term (use t >= g)")
        return ""

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    def initial_params(self, r):
        return {"scale": (np.maximum(np.abs(r).max(axis=1), 1e-12) / self.qmax).astype(np.float32)}

    def rows(self, r, params):
        s = params["scale"]
        code = torch.clamp(torch.round(r / s), -self.qmax, self.qmax)
        return keep_terms(code, self.group, self.budget, self.bits, self.signed_digits) * s

    def integer_step(self, params):
        return np.asarray(params["scale"], np.float32).reshape(-1), ""

    def kernel_bits(self, kind="weight"):
        return 8

    def true_bits(self) -> float:
        return float(self.bits)

    def describe(self) -> str:
        return f"term {self} ({self.bits}-bit codes, {self.budget / self.group:g} terms/value)"


def keep_terms(code: torch.Tensor, group: int, budget: int, bits: int, signed_digits: bool) -> torch.Tensor:
    """The integer ``code`` ([rows, n]) with, in each group of ``group`` consecutive values,
    only its ``budget`` largest power-of-two terms. Batched over all groups."""
    rows, n = code.shape
    pad = (-n) % group
    c = torch.nn.functional.pad(code, (0, pad)).reshape(rows, -1, group)  # [rows, groups, g]
    nd = bits + 1  # digit positions (signed digits may carry one past the top bit)
    if signed_digits:
        digits = naf_digits(c.to(torch.int64), nd)  # [..., nd] in {-1, 0, 1}
    else:
        mag = c.abs().to(torch.int64)
        digits = ((mag[..., None] >> torch.arange(nd)) & 1) * torch.sign(c).to(torch.int64)[..., None]
    # rank terms within a group: exponent descending, then position ascending (stable)
    exps = torch.arange(nd).expand_as(digits)
    key = torch.where(digits != 0, exps, torch.full_like(exps, -1))
    flat_key = key.reshape(rows, c.shape[1], -1)  # [rows, groups, g*nd], position-major
    order = torch.argsort(-flat_key, dim=-1, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(order.shape[-1]).expand_as(order))
    keep = (rank < budget) & (flat_key >= 0)
    kept = digits.reshape_as(flat_key) * keep * (2 ** exps).reshape_as(flat_key)
    out = kept.reshape(rows, c.shape[1], group, nd).sum(-1).reshape(rows, -1)[:, :n]
    return out.to(code.dtype)


def naf_digits(c: torch.Tensor, nd: int) -> torch.Tensor:
    """Non-adjacent form digits (least significant first) of integers ``c``: one loop over
    digit positions, each step on the whole tensor."""
    v = c.clone()
    out = []
    for _ in range(nd):
        odd = (v & 1) != 0
        d = torch.where(odd, 2 - torch.remainder(v, 4), torch.zeros_like(v))  # 1 or -1 where odd
        out.append(d)
        v = (v - d) // 2
    return torch.stack(out, -1)
