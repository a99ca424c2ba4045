"""Exception types. Every error graphopt raises for bad input is a ``GraphOptError``.

The CLI turns a ``GraphOptError`` into one line on stderr and exit code 1; anything
else is a bug: the CLI calls it an internal error (naming the pass it happened in, see
``mark_internal``) and ``--debug`` shows its traceback. A bug is never wrapped in a
``GraphOptError``: that would report it as the user's fault.
"""


class GraphOptError(Exception):
    """Base class of every error caused by the user's input or a failed pass."""


class UsageError(GraphOptError):
    """The command line was used wrongly (a flag without the flag it needs, a bad value): the CLI
    exits with code 2, as for argparse's own usage errors."""


class GraphError(GraphOptError):
    """The graph is malformed, or a mutation would make it so."""


class FrontendError(GraphOptError):
    """A model could not be read into the IR (corrupt file, unsupported feature)."""


class UnsupportedOpError(GraphOptError):
    """An op that a component cannot handle; the message names the op and the node."""


class PipelineError(GraphOptError):
    """A pipeline string could not be parsed; ``column`` is 1-based."""

    def __init__(self, message: str, text: str = "", column: int | None = None):
        self.text = text
        self.column = column
        where = f"pipeline error at column {column}: " if column is not None else "pipeline error: "
        super().__init__(where + message)


class PassError(GraphOptError):
    """A pass failed. Names the pass and the passes that ran before it."""

    def __init__(self, pass_name: str, before: list[str], cause: BaseException):
        self.pass_name = pass_name
        self.before = list(before)
        ran = ", ".join(before) if before else "none"
        super().__init__(f"pass '{pass_name}' failed (passes run before it: {ran}): {cause}")


class PreconditionError(GraphOptError):
    """A pass's ``requires`` check failed on its input graph."""


class PostconditionError(GraphOptError):
    """A pass's ``ensures`` check failed on its result."""


def mark_internal(e: BaseException, pass_name: str, before: list[str]) -> None:
    """Record on a bug (any exception that is not a ``GraphOptError``) the pass it escaped from,
    keeping its type and traceback: ``e.graphopt_pass`` for the CLI, and a note in the traceback."""
    e.graphopt_pass = pass_name  # type: ignore[attr-defined]
    ran = ", ".join(before) if before else "none"
    note = f"internal error in graphopt pass '{pass_name}' (passes run before it: {ran})"
    if hasattr(e, "add_note"):  # Python >= 3.11
        e.add_note(note)
