"""The pass contract, the pass registry, the Context and the PassManager.

A pass is a keyword-only dataclass registered under a stable name::

    @register_pass("remove-identity")
    @dataclass(kw_only=True)
    class RemoveIdentity(Pass):
        '''Remove Identity and inference-mode Dropout nodes. Preserves the function.'''
        keep_outputs: bool = option(True, "never rename graph outputs")
        def run(self, graph, ctx): ...
            return PassResult(graph, modified=n > 0, stats={"removed": n})

Contract: ``modified`` is True only if the graph changed. ``__call__`` checks ``requires``
on the input, the result type, and ``ensures`` on the *result*.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

from graphopt.errors import GraphOptError, PassError, PostconditionError
from graphopt.ir import Graph
from graphopt.util import gc_paused

log = logging.getLogger("graphopt.passes")

_REGISTRY: dict[str, type["Pass"]] = {}


def option(default: Any, doc: str, *, choices: tuple | None = None, minimum: float | None = None,
           maximum: float | None = None) -> Any:
    """Declare a typed pass option with its documentation (and optional bounds/choices)."""
    meta = {"doc": doc, "choices": choices, "min": minimum, "max": maximum}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class PassResult:
    graph: Graph
    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)
class Pass:
    """Base class of every pass. Subclasses are keyword-only dataclasses."""

    name: ClassVar[str] = ""
    # Ordering contracts, checked when a pipeline is built (with the position in the error):
    # ``after``: passes that, if present, must run before this one; ``before``: passes that, if
    # present, must run after it.
    after: ClassVar[tuple[str, ...]] = ()
    before: ClassVar[tuple[str, ...]] = ()
    # True if the pass keeps the graph's outputs equal (within float32 rounding) on any input;
    # the registry-wide contract test then checks it on every test network.
    preserves_function: ClassVar[bool] = False
    # False for steps that by nature change the graph each time they run (training): the
    # contract test then does not ask a second run to be a no-op.
    idempotent: ClassVar[bool] = True
    # True if the pass reads ``ctx.input_graph`` (the pipeline's input, e.g. as a teacher).
    needs_input_graph: ClassVar[bool] = False

    def run(self, graph: Graph, ctx: "Context") -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def requires(self, graph: Graph) -> None:
        """Raise ``PreconditionError`` if ``graph`` is not a valid input for this pass."""

    def ensures(self, graph: Graph) -> None:
        """Raise ``PostconditionError`` if the result breaks this pass's promise."""

    def __call__(self, graph: Graph, ctx: "Context | None" = None) -> PassResult:
        ctx = ctx or Context()
        self.requires(graph)
        result = self.run(graph, ctx)
        if not isinstance(result, PassResult):
            raise PostconditionError(f"pass '{self.name}' returned {type(result).__name__}, not PassResult")
        if not isinstance(result.graph, Graph):
            raise PostconditionError(f"pass '{self.name}' returned a {type(result.graph).__name__}, not a Graph")
        if not isinstance(result.modified, bool):
            raise PostconditionError(f"pass '{self.name}' returned a non-bool modified flag")
        self.ensures(result.graph)
        return result

    # -- description ---------------------------------------------------------
    @classmethod
    def summary(cls) -> str:
        """The first paragraph of the docstring, on one line."""
        doc = (cls.__doc__ or "").strip()
        return " ".join(doc.split("\n\n")[0].split()) if doc else ""

    @classmethod
    def options(cls) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(cls) if f.init]

    @classmethod
    def option_types(cls) -> dict[str, Any]:
        return typing.get_type_hints(cls)

    def non_default_options(self) -> dict[str, Any]:
        out = {}
        for f in self.options():
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            val = getattr(self, f.name)
            if val != default:
                out[f.name] = val
        return out

    def __str__(self) -> str:
        from graphopt.pipeline import format_value

        opts = self.non_default_options()
        if not opts:
            return self.name
        return self.name + "{" + ",".join(f"{k}={format_value(v)}" for k, v in opts.items()) + "}"


def register_pass(name: str) -> Callable[[type[Pass]], type[Pass]]:
    """Register a pass class under a stable pipeline name."""

    def deco(cls: type[Pass]) -> type[Pass]:
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"pass {cls.__name__} must be a dataclass")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"pass name '{name}' is already registered by {_REGISTRY[name].__name__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def pass_library():
    """The pass library (``graphopt.passes``), imported on first use; importing it registers
    every pass and preset. This is the one place in the core that loads it: the core never
    imports the library at module level, so the library can import the core freely."""
    import graphopt.passes

    return graphopt.passes


def registry() -> dict[str, type[Pass]]:
    """Every registered pass by name (loads the pass library on first use)."""
    pass_library()
    return dict(sorted(_REGISTRY.items()))


def get_pass(name: str) -> type[Pass]:
    reg = registry()
    if name not in reg:
        raise KeyError(name)
    return reg[name]


# ---------------------------------------------------------------------- context
@dataclass
class TrainingData:
    """Labelled (or unlabelled) training inputs for pipeline steps that train (``finetune``,
    and QAT / lottery tickets next). ``x`` is [N, ...] float32 (an array or a memory-mapped
    .npy); ``y`` optional integer labels [N]; ``transform(batch, rng)`` optional augmentation."""

    x: Any
    y: Any = None
    transform: Any = None

    def __post_init__(self):
        if self.y is not None and len(self.y) != len(self.x):
            raise GraphOptError(f"{len(self.x)} training inputs but {len(self.y)} labels")


class Context:
    """What passes share: calibration data, training data (and a teacher), cached analyses,
    options and progress.

    Analyses are cached by key and dropped whenever a pass reports ``modified=True``.
    ``input_graph`` is the graph as the running pipeline received it (training steps distill
    from it when no teacher is given).
    """

    def __init__(self, calib: Any = None, options: dict[str, Any] | None = None, progress: bool | None = None,
                 train: TrainingData | None = None, teacher: Graph | None = None):
        self.calib = calib
        self.train = train
        self.teacher = teacher
        self.input_graph: Graph | None = None
        self.options = dict(options or {})
        self._analyses: dict[Any, Any] = {}
        if progress is None:
            progress = sys.stderr.isatty() and not os.environ.get("CI")
        self.show_progress = progress

    def analysis(self, key: Any, compute: Callable[[], Any]) -> Any:
        if key not in self._analyses:
            self._analyses[key] = compute()
        return self._analyses[key]

    def invalidate(self) -> None:
        self._analyses.clear()

    def progress(self, iterable, total: int | None = None, desc: str = ""):
        """Wrap an iterable in a progress bar on a TTY; plain iteration elsewhere (CI)."""
        if not self.show_progress:
            return iterable
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, leave=False, file=sys.stderr)


# ---------------------------------------------------------------------- instruments
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
        from graphopt.pipeline import Pipeline, check_order, parse_pipeline

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
                    with gc_paused():
                        result = p(graph, ctx)
                    if self.verify_each:
                        result.graph.verify()
                except GraphOptError as e:
                    raise PassError(p.name, ran, e) from e
                except Exception as e:  # a bug in a pass: keep the pass name in the message
                    raise PassError(p.name, ran, RuntimeError(f"{type(e).__name__}: {e}")) from e
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
