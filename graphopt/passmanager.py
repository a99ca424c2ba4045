"""The instruments and the PassManager, which runs passes in order.

The pass contract itself (``Pass``, ``PassResult``, ``Context``, ``option``, ``register_pass``,
``registry``) lives in ``graphopt.passbase`` and is re-exported here, where passes and users
import it from.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from graphopt.errors import GraphOptError, PassError, mark_internal
from graphopt.ir import Graph
from graphopt.passbase import (  # noqa: F401  re-exported: passes and users import the contract from here
    Context,
    Pass,
    PassResult,
    TrainingData,
    get_pass,
    option,
    pass_library,
    register_pass,
    registry,
)
from graphopt.pipeline import Pipeline, check_order, parse_pipeline
from graphopt.util import gc_paused

log = logging.getLogger("graphopt.passes")


class Instrument:
    """Hooks around each pass (TVM's pass instruments)."""

    def before(self, p: Pass, graph: Graph, index: int) -> None:
        pass

    def after(self, p: Pass, result: PassResult, index: int, seconds: float) -> None:
        pass


class TimingInstrument(Instrument):
    """Records wall time per pass: ``timings`` is a list of (pass string, seconds)."""

    def __init__(self) -> None:
        self.timings: list[tuple[str, float]] = []

    def after(self, p, result, index, seconds):
        self.timings.append((str(p), seconds))

    def report(self) -> str:
        total = sum(s for _, s in self.timings) or 1e-12
        lines = [f"{'pass':40s} {'ms':>9s} {'%':>6s}"]
        lines += [f"{n[:40]:40s} {s * 1e3:9.1f} {100 * s / total:6.1f}" for n, s in self.timings]
        return "\n".join(lines)


class DumpIRInstrument(Instrument):
    """Writes the IR text dump after each pass to ``folder/NN-<pass>.txt``."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def before(self, p, graph, index):
        if index == 0:
            (self.folder / "00-input.txt").write_text(graph.dump() + "\n")

    def after(self, p, result, index, seconds):
        (self.folder / f"{index + 1:02d}-{p.name}.txt").write_text(result.graph.dump() + "\n")


# ---------------------------------------------------------------------- manager
class PassManager:
    """Runs passes in order.

    * ``verify_each``: ``graph.verify()`` after every pass (on in tests).
    * ``instruments``: timing, IR dumps, or your own ``Instrument``.
    * ``fixed_point``: repeat the whole list until no pass modifies the graph
      (at most ``max_iterations`` rounds).
    """

    def __init__(self, passes: "list[Pass] | Any", *, verify_each: bool = False,
                 instruments: list[Instrument] | None = None, fixed_point: bool = False, max_iterations: int = 10):
        if isinstance(passes, str):
            passes = parse_pipeline(passes)  # checks the passes' order itself, with columns
        if isinstance(passes, Pipeline):
            passes = list(passes.passes)
        else:
            check_order(list(passes))
        self.passes: list[Pass] = list(passes)
        self.verify_each = verify_each
        self.instruments = list(instruments or [])
        self.fixed_point = fixed_point
        self.max_iterations = max_iterations

    def run(self, graph: Graph, ctx: Context | None = None) -> PassResult:
        ctx = ctx or Context()
        from graphopt.training.device import calibrating_on  # torch: imported when a pipeline runs

        if ctx.input_graph is None and any(p.needs_input_graph for p in self.passes):
            ctx.input_graph = graph.copy()  # constants are shared, so this costs the structure only
        ran: list[str] = []
        any_modified = False
        stats: dict[str, Any] = {}
        index = 0
        for _round in range(self.max_iterations if self.fixed_point else 1):
            round_modified = False
            for p in self.passes:
                for ins in self.instruments:
                    ins.before(p, graph, index)
                t0 = time.perf_counter()
                try:
                    with gc_paused(), calibrating_on(ctx.device):
                        result = p(graph, ctx)
                    if self.verify_each:
                        result.graph.verify()
                except GraphOptError as e:
                    raise PassError(p.name, ran, e) from e
                except Exception as e:  # a bug in a pass: it stays a bug, with the pass name added
                    mark_internal(e, p.name, ran)
                    raise
                dt = time.perf_counter() - t0
                graph = result.graph
                if result.modified:
                    ctx.invalidate()
                    round_modified = any_modified = True
                log.info("%s: modified=%s %s (%.1f ms)", p, result.modified, result.stats or "", dt * 1e3)
                stats.setdefault(p.name, []).append(dict(result.stats, modified=result.modified, seconds=dt))
                for ins in self.instruments:
                    ins.after(p, result, index, dt)
                ran.append(p.name)
                index += 1
            if not round_modified:
                break
        return PassResult(graph, any_modified, stats)
