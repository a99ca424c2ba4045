"""The Lottery Ticket Hypothesis (Frankle & Carbin, ICLR 2019): iterative magnitude pruning with
rewinding, and its two controls.

``lottery_ticket(graph, x, y, ...)`` runs ``rounds`` rounds. Each round trains the graph under
its current mask (``graphopt.training.finetune``), scores it, prunes ``rate`` of the surviving
weights by global magnitude, and rewinds the survivors to their values at step ``rewind_step``
of the first training (0: the initial weights, as the paper; k > 0: the late rewinding of
Frankle et al. 2020). The controls train the same schedule with:

* ``reinit``: the ticket's mask, but freshly drawn initial weights (torch's default
  initialization, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), from another seed);
* ``random_mask``: the initial weights under a random mask with the ticket's per-layer sparsity.

The state after every round (round, masks, rewind weights, results) is saved atomically to
``state``, so an interrupted run continues from its last completed round with the same call.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Callable

import numpy as np

from graphopt.errors import GraphOptError
from graphopt.ir import Graph
from graphopt.masks import Mask, get_mask, global_keep, set_mask

log = logging.getLogger("graphopt.training.lottery")
CONTROLS = ("ticket", "reinit", "random_mask")


def _weights(graph: Graph):
    from graphopt.geometry import linear_layers

    return [n.inputs[1] for n in linear_layers(graph)]


def _fresh_init(shape, rng) -> np.ndarray:
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else int(shape[0])
    bound = 1.0 / np.sqrt(max(fan_in, 1))
    return rng.uniform(-bound, bound, shape).astype(np.float32)


def _save_state(path: Path, state: dict, arrays: dict[str, np.ndarray]) -> None:
    from graphopt.atomic import atomic_paths

    with atomic_paths(str(path) + ".npz", str(path) + ".json") as (tnpz, tjson):
        with open(tnpz, "wb") as f:
            np.savez(f, **arrays)
        Path(tjson).write_text(json.dumps(state, indent=1))


def lottery_ticket(graph: Graph, x: np.ndarray, y: np.ndarray | None, *, rounds: int = 5, rate: float = 0.2,
                   rewind_step: int = 0, control: str = "ticket", config=None,
                   evaluate: Callable[[Graph], float] | None = None, seed: int = 0,
                   state: str | os.PathLike | None = None) -> list[dict]:
    """Iterative magnitude pruning with rewinding (see the module doc). Returns one row per
    round: the share of weights remaining, the score ``evaluate(graph)`` after training, and
    the training loss. ``graph`` ends as the last round's trained, pruned network."""
    from dataclasses import replace

    from graphopt.training.finetune import FinetuneConfig, finetune

    if control not in CONTROLS:
        raise GraphOptError(f"control must be one of {', '.join(CONTROLS)}, not '{control}'")
    if not 0.0 < rate < 1.0:
        raise GraphOptError(f"the pruning rate per round must be in (0, 1), not {rate}")
    if rounds < 1:
        raise GraphOptError(f"rounds must be at least 1, not {rounds}")
    cfg = config or FinetuneConfig()
    steps_per_epoch = len(x) // cfg.batch_size
    if rewind_step < 0 or rewind_step > steps_per_epoch * cfg.epochs:
        raise GraphOptError(f"cannot rewind to step {rewind_step}: a round trains {steps_per_epoch * cfg.epochs} "
                            "steps, and only steps 0 to that are saved")
    ws = _weights(graph)
    if not ws:
        raise GraphOptError("the model has no layer with constant weights to prune")
    init = {v.name: np.asarray(v.const).copy() for v in graph.constants.values() if v.const is not None}
    rng = np.random.default_rng(seed + 7919)
    if control == "reinit":  # the control's own starting point: fresh weights, same shapes
        for v in ws:
            init[v.name] = _fresh_init(v.const.shape, rng)
    results: list[dict] = []
    rewind = dict(init)
    start = 0
    spath = Path(state) if state is not None else None
    if spath is not None and Path(str(spath) + ".json").is_file():
        meta = json.loads(Path(str(spath) + ".json").read_text())
        if meta.get("control") != control or meta.get("rate") != rate or meta.get("rewind_step") != rewind_step:
            raise GraphOptError(f"{spath}.json was written by another run (control {meta.get('control')}, rate "
                                f"{meta.get('rate')}, rewind {meta.get('rewind_step')}); delete it or use another path")
        with np.load(str(spath) + ".npz") as d:
            rewind = {k[7:]: d[k] for k in d.files if k.startswith("rewind/")}
            for v in ws:  # the last completed round's trained weights and masks: the next round prunes them
                graph.set_const(v, d[f"trained/{v.name}"])
                if f"mask/{v.name}" in d.files:
                    set_mask(graph, v, Mask.element(d[f"mask/{v.name}"]))
        results, start = meta["results"], meta["round"]
        log.info("lottery: resuming at round %d", start + 1)
    for r in range(start, rounds):
        if r > 0:  # prune the previous round's trained weights, then rewind the survivors
            _prune_round(graph, ws, rate, control, rng)
        for name, arr in rewind.items():  # rewind every weight; the masks zero the pruned ones
            v = graph.values.get(name)
            if v is not None and v.const is not None and v.const.shape == arr.shape:
                m = get_mask(v)
                graph.set_const(v, m.apply(arr) if m is not None else arr)
        run_cfg = replace(cfg, checkpoint=None, resume=False, seed=cfg.seed + r,
                          snapshot_step=rewind_step if (r == 0 and rewind_step > 0) else None)
        stats = finetune(graph, x, y, None, run_cfg)
        if r == 0 and rewind_step > 0:
            rewind = {**rewind, **stats["snapshot"]}
        kept = sum(int(get_mask(v).keep.sum()) if get_mask(v) is not None else v.const.size for v in ws)
        total = sum(v.const.size for v in ws)
        row = {"round": r + 1, "remaining": kept / total, "score": None if evaluate is None else float(evaluate(graph)),
               "loss": stats["loss"][-1] if stats["loss"] else None}
        results.append(row)
        log.info("lottery round %d: %.1f%% remaining, score %s", r + 1, 100 * row["remaining"], row["score"])
        if spath is not None:
            arrays = {f"rewind/{k}": v for k, v in rewind.items()}
            arrays.update({f"trained/{v.name}": np.asarray(v.const) for v in ws})
            arrays.update({f"mask/{v.name}": get_mask(v).keep for v in ws if get_mask(v) is not None})
            _save_state(spath, {"round": r + 1, "results": results, "control": control, "rate": rate,
                                "rewind_step": rewind_step}, arrays)
    return results


def _prune_round(graph: Graph, ws, rate: float, control: str, rng) -> None:
    """Prune ``rate`` of the surviving weights: by global magnitude of the trained weights, or
    (random_mask) at random with the per-layer counts the magnitude rule would give."""
    cur = [get_mask(v).apply(v.const) if get_mask(v) is not None else np.asarray(v.const) for v in ws]
    total = sum(w.size for w in cur)
    alive = sum(int(np.count_nonzero(get_mask(v).keep)) if get_mask(v) is not None else v.const.size for v in ws)
    target = 1.0 - alive * (1.0 - rate) / total
    keeps = global_keep(cur, target)
    if control == "random_mask":
        out = []
        for v, k in zip(ws, keeps):
            old = get_mask(v).keep if get_mask(v) is not None else np.ones(v.const.shape, bool)
            idx = np.flatnonzero(old.reshape(-1))
            n_keep = int(k.sum())
            new = np.zeros(old.size, bool)
            new[rng.permutation(idx)[:n_keep]] = True
            out.append(new.reshape(old.shape))
        keeps = out
    for v, k in zip(ws, keeps):
        set_mask(graph, v, Mask.element(k))


def format_table(runs: dict[str, list[dict]]) -> str:
    """Markdown table of ``lottery_ticket`` results: one row per share of weights remaining, one
    column per run (e.g. per control). A run without scores shows its training loss."""
    rems = sorted({round(r["remaining"], 4) for rows in runs.values() for r in rows}, reverse=True)
    lines = ["| weights remaining | " + " | ".join(runs) + " |", "|---|" + "---|" * len(runs)]
    for rem in rems:
        cells = []
        for rows in runs.values():
            r = next((r for r in rows if round(r["remaining"], 4) == rem), None)
            if r is None:
                cells.append("-")
            elif r.get("score") is not None:
                cells.append(f"{r['score']:.2f}")
            else:
                cells.append("-" if r.get("loss") is None else f"loss {r['loss']:.4f}")
        lines.append(f"| {100 * rem:.1f}% | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(path, runs: dict[str, list[dict]], title: str = "winning ticket vs controls",
                ylabel: str = "score") -> None:
    """PNG of score (or, without scores, training loss) against the share of weights
    remaining, one curve per run, on a log axis that runs from dense to sparse."""
    from graphopt.plotting import pyplot, save_png

    plt = pyplot("plotting")

    scored = all(r.get("score") is not None for rows in runs.values() for r in rows)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, rows in runs.items():
        ax.plot([100 * r["remaining"] for r in rows], [r["score"] if scored else r["loss"] for r in rows], "-o",
                label=name)
    ax.set_xscale("log")
    ticks = sorted({round(100 * r["remaining"], 1) for rows in runs.values() for r in rows}, reverse=True)
    ax.set_xticks(ticks[::max(1, len(ticks) // 8)])
    ax.set_xticklabels([f"{t:g}" for t in ticks[::max(1, len(ticks) // 8)]])
    ax.minorticks_off()
    ax.invert_xaxis()
    ax.set_xlabel("weights remaining (%)")
    ax.set_ylabel(ylabel if scored else "training loss (last epoch)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_png(fig, path)
