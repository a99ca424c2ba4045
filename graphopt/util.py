"""Small shared helpers."""

from __future__ import annotations

import contextlib
import functools
import gc


@contextlib.contextmanager
def gc_paused():
    """Pause Python's cyclic GC while building or walking a large IR.

    The IR allocates many linked objects; generational GC would rescan the growing heap
    again and again, making a 100k-node load grow faster than linearly. Nesting is safe."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def with_gc_paused(fn):
    @functools.wraps(fn)
    def wrapper(*a, **k):
        with gc_paused():
            return fn(*a, **k)

    return wrapper
