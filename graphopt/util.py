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


def tune_allocator(mmap_threshold: int = 256 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Make glibc malloc keep large freed blocks for reuse (Linux/glibc only; else a no-op).

    Batched CPU inference allocates and frees tensors of many MB per layer. With glibc's
    default dynamic thresholds, some of those blocks go back to the OS and are faulted in
    again on the next batch. How often depends only on allocation order, so the same ops can
    run 5-25% slower in one Python form than in another (measured on ResNet-56 at batch 256:
    the nn.Module, its torch.fx trace and graphopt's torch back end all run at the same speed
    once this is set, and about 25% faster than the default). This is process-wide and keeps
    freed memory reserved. graphopt's CLI calls it for its own process; a library user opts in.
    Returns True if the setting was applied.
    """
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_MMAP_THRESHOLD, int(mmap_threshold))) and bool(mallopt(M_TRIM_THRESHOLD, int(trim_threshold)))


def channel_block() -> tuple[int, str]:
    """The channel block of onnxruntime's blocked (NCHWc) convolutions on this CPU, and why: a
    pruned layer whose channel count is a multiple of it keeps the kernels efficient. 16 with
    AVX-512, 8 with AVX2, else 4. ``GRAPHOPT_CHANNEL_BLOCK`` overrides the detection (e.g. to
    prune for a deployment CPU other than this one)."""
    import os
    import platform

    env = os.environ.get("GRAPHOPT_CHANNEL_BLOCK")
    if env:
        try:
            v = int(env)
        except ValueError:
            v = 0
        if v < 1:
            from graphopt.errors import GraphOptError

            raise GraphOptError(f"GRAPHOPT_CHANNEL_BLOCK must be a positive integer, not '{env}'")
        return v, "GRAPHOPT_CHANNEL_BLOCK"
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    if "avx512f" in flags:
        return 16, "this CPU has AVX-512"
    if "avx2" in flags:
        return 8, "this CPU has AVX2"
    return 4, f"no AVX2/AVX-512 found ({platform.machine()})"
