"""The pass contract and the pass registry: ``Pass``, ``PassResult``, ``Context``, ``option``,
``register_pass`` and ``registry()``.

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

This module sits below both ``graphopt.pipeline`` (which parses pipeline text into passes) and
``graphopt.passmanager`` (which runs them): neither imports the other's dependents, so there is
no import cycle. ``pass_library()`` is the one place in the core that loads the pass library.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

from graphopt.errors import GraphOptError, PostconditionError
from graphopt.ir import Graph

_SPECIAL = set(',{}[]"= ')  # characters that make format_value quote a string


def format_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "none"
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(format_value(x) for x in v) + "]"
    s = str(v)
    if s == "" or any(c in _SPECIAL for c in s) or s.lower() == "none":
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return s



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
                 train: TrainingData | None = None, teacher: Graph | None = None, device: str | None = None):
        self.calib = calib
        self.device = device  # where calibration runs and training defaults to (None: CPU / auto)
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
