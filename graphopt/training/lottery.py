"""The Lottery Ticket Hypothesis (Frankle & Carbin, ICLR 2019): iterative magnitude pruning with
rewinding, and its two controls.

``lottery_ticket(graph, x, y, ...)`` runs ``rounds`` rounds. Each round trains the graph under
its current mask (``graphopt.training.finetune``), scores it, prunes ``rate`` of the surviving
weights by global magnitude, and rewinds the survivors to their values at step ``rewind_step``
of the first training (0: the initial weights, as the paper; k > 0: the late rewinding of
Frankle et al. 2020). The ticket run records its mask after every round. The controls are the
paper's: they do not prune by their own weights, they follow the ticket round by round, and so
need the ticket's state (``ticket=``):

* ``reinit``: round r trains under the *ticket's mask of round r* from freshly drawn weights
  (torch's default initialization, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), a new draw per round
  from another seed);
* ``random_mask``: round r trains the ticket's rewind weights under a *random* mask with the
  ticket's per-layer counts of round r (each round's mask drawn among the previous round's
  survivors).

The state after every round (round, masks, rewind weights, results; the ticket's masks of
every round) is saved atomically to ``state``, so an interrupted run continues from its last
completed round with the same call.
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


def ticket_masks(ticket: str | os.PathLike, rounds: int, ws) -> list[dict[str, np.ndarray] | None]:
    """The ticket run's mask of each of ``rounds`` rounds (None for the dense first round), read
    from its saved state. Refuses, in one line, a state that is missing, is not a ticket's, has
    fewer rounds, or was written for other layers."""
    path = Path(ticket)
    meta_p, arr_p = Path(str(path) + ".json"), Path(str(path) + ".npz")
    if not meta_p.is_file() or not arr_p.is_file():
        raise GraphOptError(f"the controls follow the ticket's masks round by round: no ticket state at {path} "
                            "(run control=ticket with that state first)")
    meta = json.loads(meta_p.read_text())
    if meta.get("control") != "ticket":
        raise GraphOptError(f"{path} is the state of a {meta.get('control')} run, not of the ticket")
    if meta["round"] < rounds:
        raise GraphOptError(f"the ticket's state {path} has {meta['round']} rounds; the control asks for {rounds}")
    out: list[dict[str, np.ndarray] | None] = [None]
    with np.load(arr_p) as d:
        for r in range(2, rounds + 1):
            masks = {}
            for v in ws:
                key = f"round{r}/{v.name}"
                if key not in d.files:
                    raise GraphOptError(f"the ticket's state {path} has no mask of round {r} for '{v.name}' "
                                        "(written by another model, or by a graphopt before per-round masks)")
                m = d[key]  # an npz member is read from the archive at every access: once
                if m.shape != v.const.shape:
                    raise GraphOptError(f"the ticket's mask of '{v.name}' is {list(m.shape)}, the model's weight "
                                        f"{list(v.const.shape)}")
                masks[v.name] = m
            out.append(masks)
    return out


def lottery_ticket(graph: Graph, x: np.ndarray, y: np.ndarray | None, *, rounds: int = 5, rate: float = 0.2,
                   rewind_step: int = 0, control: str = "ticket", config=None,
                   evaluate: Callable[[Graph], float | dict[str, float]] | None = None, seed: int = 0,
                   state: str | os.PathLike | None = None, ticket: str | os.PathLike | None = None) -> list[dict]:
    """Iterative magnitude pruning with rewinding (see the module doc). Returns one row per
    round: the share of weights remaining, the score ``evaluate(graph)`` after training, and
    the training loss. ``evaluate`` may return named scores (e.g. ``{"torch": .., "onnxruntime":
    ..}``): the row keeps them all under ``scores`` and its ``score`` is the first. ``graph`` ends as the last round's trained, pruned network. The controls
    need ``ticket``: the ``state`` path of the ticket run they follow."""
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
    follow = None
    if control != "ticket":
        if ticket is None:
            raise GraphOptError(f"control={control} follows the ticket's masks round by round: give the ticket run's "
                                "state (ticket=...)")
        follow = ticket_masks(ticket, rounds, ws)
    init = {v.name: np.asarray(v.const).copy() for v in graph.constants.values() if v.const is not None}
    history: dict[str, np.ndarray] = {}  # the ticket's mask of every round, saved with its state
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
            history = {k: d[k] for k in d.files if k.startswith("round")}
            for v in ws:  # the last completed round's trained weights and masks: the next round prunes them
                graph.set_const(v, d[f"trained/{v.name}"])
                if f"mask/{v.name}" in d.files:
                    set_mask(graph, v, Mask.element(d[f"mask/{v.name}"]))
        results, start = meta["results"], meta["round"]
        log.info("lottery: resuming at round %d", start + 1)
    for r in range(start, rounds):
        if control == "ticket" and r > 0:  # prune the previous round's trained weights, then rewind
            _prune_round(graph, ws, rate)
        elif control == "reinit" and r > 0:  # the ticket's mask of this round
            for v in ws:
                set_mask(graph, v, Mask.element(follow[r][v.name]))
        elif control == "random_mask" and r > 0:  # a random mask with the ticket's per-layer counts
            _random_round(graph, ws, follow[r], np.random.default_rng([seed + 7919, r]))
        start_w = dict(rewind)
        if control == "reinit":  # fresh weights for this round: same shapes and distribution, new seed
            fresh = np.random.default_rng([seed + 104729, r])
            start_w.update({v.name: _fresh_init(v.const.shape, fresh) for v in ws})
        for name, arr in start_w.items():  # rewind every weight; the masks zero the pruned ones
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
        got = None if evaluate is None else evaluate(graph)
        row = {"round": r + 1, "remaining": kept / total, "score": None, "loss": stats["loss"][-1] if stats["loss"] else None}
        if isinstance(got, dict):
            if not got:
                raise GraphOptError("evaluate returned no scores (an empty dict)")
            row["scores"] = {k: float(v) for k, v in got.items()}
            row["score"] = next(iter(row["scores"].values()))
        elif got is not None:
            row["score"] = float(got)
        results.append(row)
        log.info("lottery round %d: %.1f%% remaining, score %s", r + 1, 100 * row["remaining"], row["score"])
        if r > 0:
            history.update({f"round{r + 1}/{v.name}": get_mask(v).keep for v in ws if get_mask(v) is not None})
        from graphopt.training.finetune import is_writer

        if spath is not None and is_writer():  # every rank holds the same state: rank 0 writes it
            arrays = {f"rewind/{k}": v for k, v in rewind.items()}
            arrays.update(history)
            arrays.update({f"trained/{v.name}": np.asarray(v.const) for v in ws})
            arrays.update({f"mask/{v.name}": get_mask(v).keep for v in ws if get_mask(v) is not None})
            _save_state(spath, {"round": r + 1, "results": results, "control": control, "rate": rate,
                                "rewind_step": rewind_step}, arrays)
    return results


def _prune_round(graph: Graph, ws, rate: float) -> None:
    """Prune ``rate`` of the surviving weights by one global magnitude threshold over the
    trained weights."""
    cur = [get_mask(v).apply(v.const) if get_mask(v) is not None else np.asarray(v.const) for v in ws]
    total = sum(w.size for w in cur)
    alive = sum(int(np.count_nonzero(get_mask(v).keep)) if get_mask(v) is not None else v.const.size for v in ws)
    for v, k in zip(ws, global_keep(cur, 1.0 - alive * (1.0 - rate) / total)):
        set_mask(graph, v, Mask.element(k))


def _random_round(graph: Graph, ws, counts_of: dict[str, np.ndarray], rng) -> None:
    """A random mask per layer keeping as many weights as the ticket's mask ``counts_of`` does,
    drawn among the layer's current survivors (vectorised: a random score per weight, the
    survivors' top-k)."""
    for v in ws:
        old = get_mask(v).keep if get_mask(v) is not None else np.ones(v.const.shape, bool)
        n_keep = int(np.count_nonzero(counts_of[v.name]))
        if n_keep > int(old.sum()):
            raise GraphOptError(f"the ticket keeps {n_keep} weights of '{v.name}' in a later round than one where "
                                f"it kept {int(old.sum())}: not a ticket's masks")
        score = np.where(old.reshape(-1), rng.random(old.size), -1.0)
        new = np.zeros(old.size, bool)
        new[np.argsort(-score, kind="stable")[:n_keep]] = True
        set_mask(graph, v, Mask.element(new.reshape(old.shape)))


def format_table(runs: dict[str, list[dict]], key: str | None = None) -> str:
    """Markdown table of ``lottery_ticket`` results: one row per share of weights remaining, one
    column per run (e.g. per control). A run without scores shows its training loss. ``key``
    picks one of the named scores (``row["scores"][key]``); a round without it shows '-'."""
    rems = sorted({round(r["remaining"], 4) for rows in runs.values() for r in rows}, reverse=True)
    lines = ["| weights remaining | " + " | ".join(runs) + " |", "|---|" + "---|" * len(runs)]
    for rem in rems:
        cells = []
        for rows in runs.values():
            r = next((r for r in rows if round(r["remaining"], 4) == rem), None)
            if r is None:
                cells.append("-")
            elif key is not None:
                v = (r.get("scores") or {}).get(key)
                cells.append("-" if v is None else f"{v:.2f}")
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
