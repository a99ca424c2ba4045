"""Allocation under a budget: the one owner of "choose one level per unit".

``pareto_front`` and ``allocate`` are the exact dynamic program over per-unit (cost, error)
options that choose-bits, ``prune-weights{scope=sensitivity}`` and ``prune-channels{target_macs}``
share. ``allocate_to_target`` wraps it for costs that are not additive (the MACs left after
pruning neighbouring channel groups: a conv losing inputs and outputs keeps (1-a)(1-b) of its
MACs): it measures each plan and tightens the limit until the measured cost meets the target.
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np

from graphopt.errors import GraphOptError

log = logging.getLogger("graphopt.allocate")


def pareto_front(costs: np.ndarray, errors: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every non-dominated allocation of one choice per layer: ``costs``/``errors`` are [L, K]
    (inf error = not allowed). Returns (cost [S], error [S], choice [S, L]) sorted by cost.

    Exact dynamic programming: layer by layer, combine the front so far with the layer's K
    options and keep the states that no cheaper state beats on error (an additive objective
    and an additive cost make this the whole Pareto front, not an approximation)."""
    n_layers, _ = costs.shape
    f_cost, f_err = np.zeros(1), np.zeros(1)
    f_choice = np.zeros((1, 0), np.int16)
    for i in range(n_layers):
        ok = np.isfinite(errors[i])
        ks = np.flatnonzero(ok)
        if ks.size == 0:
            raise GraphOptError(f"layer {i} has no allowed width")
        c = (f_cost[:, None] + costs[i, ks][None, :]).reshape(-1)
        e = (f_err[:, None] + errors[i, ks][None, :]).reshape(-1)
        src = np.repeat(np.arange(f_cost.size), ks.size)
        k = np.tile(ks, f_cost.size)
        order = np.lexsort((-k, e, c))  # by cost, then error, then the wider width (ties: more bits for free)
        c, e, src, k = c[order], e[order], src[order], k[order]
        best_before = np.minimum.accumulate(np.concatenate([[np.inf], e[:-1]]))
        keep = e < best_before  # strictly better than every cheaper (or equal-cost earlier) state
        f_cost, f_err = c[keep], e[keep]
        f_choice = np.concatenate([f_choice[src[keep]], k[keep][:, None].astype(np.int16)], axis=1)
    return f_cost, f_err, f_choice


def allocate(costs: np.ndarray, errors: np.ndarray, limit: float) -> tuple[np.ndarray, float, float]:
    """The allocation with the least summed error whose cost is at most ``limit``:
    (choice per layer, its cost, its error). Raises when even the cheapest one is over."""
    c, e, ch = pareto_front(costs, errors)
    fits = np.flatnonzero(c <= limit + 1e-12 * abs(limit))
    if fits.size == 0:
        raise GraphOptError(f"the budget is below the smallest achievable: {limit:.6g} < {c[0]:.6g}")
    best = fits[np.argmin(e[fits])]
    return ch[best], float(c[best]), float(e[best])


def allocate_to_target(costs: np.ndarray, errors: np.ndarray, target: float,
                       measure: Callable[[np.ndarray], float], max_rounds: int = 20) -> tuple[np.ndarray, float]:
    """The least-error choice whose *measured* cost ``measure(choice)`` is at most ``target``,
    where ``costs`` (additive per unit) only estimate it: allocate under ``target``, measure,
    and lower the limit by the overshoot until the measurement fits (at most ``max_rounds``).
    Returns (choice, measured cost); logs a warning when the target was not reached."""
    limit = target
    choice, got = None, np.inf
    for _ in range(max_rounds):
        try:
            choice = allocate(costs, errors, limit)[0]
        except GraphOptError:  # the limit is below the cheapest plan: the cheapest plan is the closest
            if choice is not None:
                break
            choice = np.argmin(np.where(np.isfinite(errors), costs, np.inf), axis=1)
            got = measure(choice)
            break
        got = measure(choice)
        if got <= target + 1e-9 * abs(target):
            return choice, got
        limit -= got - target
    log.warning("allocation reached a cost of %.6g, not the %.6g asked for", got, target)
    return choice, got
