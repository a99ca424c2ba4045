"""Atomic file output: write to temporary files beside the targets, then rename.

Every target is checked before anything is written: its folder must exist, and it must not be
a folder or a special file (a device, a pipe). The files of one output (a model and its
external data, say) are renamed into place together: if a later rename fails, the earlier
ones are undone and the previous files come back. A failure at any point removes the
temporary files, so a user never finds a half-written output, nor half of a new one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Iterator

from graphopt.errors import GraphOptError


def check_target(t: str | os.PathLike) -> Path:
    """Raise a GraphOptError unless ``t`` can be written as a regular file."""
    t = Path(t)
    parent = t.parent if str(t.parent) else Path(".")
    if not parent.is_dir():
        raise GraphOptError(f"output folder does not exist: {parent}")
    if t.is_dir():
        raise GraphOptError(f"output {t} is a folder; give a file name")
    if t.exists() and not stat.S_ISREG(t.stat().st_mode):
        raise GraphOptError(f"output {t} is not a regular file (a device or pipe); refusing to replace it")
    return t


@contextlib.contextmanager
def atomic_paths(*targets: str | os.PathLike) -> Iterator[tuple[str, ...]]:
    """Yield one temp path per target; on success rename each onto its target, all or none."""
    paths = [check_target(t) for t in targets]
    temps: list[str] = []
    backups: list[tuple[Path, str | None]] = []
    try:
        for t in paths:
            fd, tmp = tempfile.mkstemp(prefix=f".{t.name}.", suffix=".tmp", dir=t.parent)
            os.close(fd)
            temps.append(tmp)
        yield tuple(temps)
        for t in paths:  # keep a hard link to each previous file until every rename is done
            bak = None
            if t.exists():
                fd, bak = tempfile.mkstemp(prefix=f".{t.name}.", suffix=".bak", dir=t.parent)
                os.close(fd)
                os.unlink(bak)
                try:
                    os.link(t, bak)
                except OSError:  # no hard links here: a copy does the same job
                    shutil.copy2(t, bak)
            backups.append((t, bak))
        done: list[int] = []
        try:
            for i, (tmp, t) in enumerate(zip(temps, paths)):
                os.chmod(tmp, 0o644)
                os.replace(tmp, t)
                done.append(i)
        except BaseException:
            for i in reversed(done):  # undo: put the previous file back, or remove the new one
                t, bak = backups[i]
                if bak is not None:
                    os.replace(bak, t)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(t)
            raise
        temps = []
    finally:
        for tmp in temps:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        for _, bak in backups:
            if bak is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(bak)
