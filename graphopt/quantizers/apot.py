"""Additive powers-of-two weights (APoT, Li et al. 2020): levels that are sums of powers of two."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graphopt.quantizers.base import register
from graphopt.quantizers.zoo import (  # the shared row views and base classes
    LevelScheme,
)


@register
@dataclass(frozen=True)
class APoT(LevelScheme):
    """Additive Powers-of-Two (Li, Dong & Wang, ICLR 2020): each magnitude level is a sum of
    n power-of-two terms, one from each of n disjoint sets. With m = b - 1 magnitude bits and
    base bits k (``k<K>``, default 2), n = ceil(m / k) and term i's set is
    {0, 2^-i, 2^-(i+n), ..., 2^-(i+(2^k-2)n)} (the paper's construction); when k does not
    divide m, the last term has the remaining bits and the exponents are dealt out in the
    same round-robin order. Levels are normalised so the largest is alpha (the clip)."""

    scheme = "apot"
    doc = "apot<bits>[:k<base bits>][:tensor|channel]: additive powers-of-two (Li et al. 2020); int8 kernels to 5 bits"
    numbers = {"k": "base"}
    bit_range = (2, 8)

    base: int = 2

    def invalid(self):
        if self.base < 1:
            return "base bits k must be at least 1"
        return ""

    def term_sets(self) -> list[list[float]]:
        m = self.bits - 1
        k = min(self.base, m)
        n = -(-m // k)
        sizes = [k] * (m // k) + ([m % k] if m % k else [])
        need = [(1 << s) - 1 for s in sizes]
        sets: list[list[float]] = [[0.0] for _ in sizes]
        e, i = 0, 0
        while any(len(s) - 1 < c for s, c in zip(sets, need)):
            if len(sets[i]) - 1 < need[i]:
                sets[i].append(2.0 ** -e)
                e += 1
            i = (i + 1) % n
        return sets

    def unit_levels(self):
        sums = np.zeros(1)
        for s in self.term_sets():
            sums = (sums[:, None] + np.asarray(s)[None, :]).reshape(-1)
        mags = np.unique(sums)  # the paper's levels before its normalisation (kept dyadic)
        return np.unique(np.concatenate([-mags, mags]))
