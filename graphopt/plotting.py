"""The one way graphopt draws a PNG: matplotlib on the Agg back end (no display needed), a
one-line error naming the extra to install when matplotlib is missing, and an atomic write."""

from __future__ import annotations

import os

from graphopt.errors import GraphOptError


def pyplot(what: str = "plotting"):
    """``matplotlib.pyplot`` on the Agg back end, or a GraphOptError that says how to install it;
    ``what`` names the feature in that error (``--plot``, say)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise GraphOptError(f"{what} needs matplotlib: pip install 'graphopt[plot]'") from e
    return plt


def save_png(fig, path: str | os.PathLike, dpi: int = 100) -> None:
    """Write ``fig`` to ``path`` as a PNG, atomically (never a half-written file), then close it."""
    import matplotlib.pyplot as plt

    from graphopt.atomic import atomic_paths

    with atomic_paths(path) as (tmp,):
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)
