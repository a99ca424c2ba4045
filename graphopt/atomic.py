"""Atomic file output: write to temporary files beside the targets, then rename.

A failure at any point removes the temporary files and leaves existing targets untouched,
so a user never finds a half-written output file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_paths(*targets: str | os.PathLike) -> Iterator[tuple[str, ...]]:
    """Yield one temp path per target; on success rename each onto its target, in order."""
    temps: list[str] = []
    try:
        for t in targets:
            t = Path(t)
            if t.parent and not t.parent.exists():
                raise FileNotFoundError(f"output folder does not exist: {t.parent}")
            fd, tmp = tempfile.mkstemp(prefix=f".{t.name}.", suffix=".tmp", dir=t.parent or ".")
            os.close(fd)
            temps.append(tmp)
        yield tuple(temps)
        for tmp, t in zip(temps, targets):
            os.chmod(tmp, 0o644)
            os.replace(tmp, t)
        temps = []
    finally:
        for tmp in temps:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
