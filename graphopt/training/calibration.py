"""Calibration runner: feed data through the torch back end and observe intermediate values.

Data sources (``CalibrationData``):
* a numpy array or torch tensor ``[N, ...]``;
* a ``.npy`` file (memory-mapped, read a batch at a time);
* an image folder, preprocessed as documented in ``graphopt.training.data`` (resize short side,
  center crop, scale to [0, 1], normalize with mean/std), decoded a batch at a time;
* any iterable of arrays/tensors (each item is one batch);
* for a model with several inputs: a dict ``{input name: array}`` or an ``.npz`` file with one
  array per input name, each in the dtype the model declares (``input_ids`` int64, ...).

``data.tensors(batch)`` gives a batch as the torch tensors the model takes, in its input order
and dtypes (``check_against(graph)`` learns them).

Observers see each batch of a value and keep *streaming* statistics, so memory is bounded
by the statistics, never by the data. ``Collect`` is the one exception: it keeps tensors, and
is meant for small probes and tests.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from graphopt.errors import GraphOptError
from graphopt.ir import Graph, format_shape, numpy_dtype
from graphopt.training.data import list_images, load_image_batch


class CalibrationData:
    """A re-iterable source of input batches (an array per batch, or a dict of arrays per batch
    for a model with several inputs)."""

    def __init__(self, source: Any, batch_size: int = 32, limit: int | None = None, resize: int = 256,
                 crop: int = 224, mean: Sequence[float] = (0.485, 0.456, 0.406),
                 std: Sequence[float] = (0.229, 0.224, 0.225)):
        self.batch_size = batch_size
        self.pre = dict(resize=resize, crop=crop, mean=tuple(mean), std=tuple(std))
        self._files: list[Path] | None = None
        self._array: np.ndarray | None = None
        self._iterable: Iterable | None = None
        self._named: dict[str, np.ndarray] | None = None
        self._order: list[str] | None = None  # the model's input names, learnt by check_against
        self._dtypes: list[Any] | None = None
        if isinstance(source, CalibrationData):
            self.__dict__.update(source.__dict__)
        elif isinstance(source, torch.Tensor):
            self._array = source.detach().cpu().numpy()
        elif isinstance(source, np.ndarray):
            self._array = source
        elif isinstance(source, dict):
            self._set_named({str(k): np.asarray(v) for k, v in source.items()}, "calibration data")
        elif isinstance(source, (str, os.PathLike)):
            p = Path(source)
            if p.is_dir():
                self._files = list_images(p)
            elif p.suffix == ".npz":
                if not p.is_file():
                    raise GraphOptError(f"calibration file not found: {p}")
                try:
                    with np.load(p, allow_pickle=False) as z:
                        named = {k: z[k] for k in z.files}
                except Exception as e:
                    raise GraphOptError(f"{p}: not a readable .npz archive ({str(e).splitlines()[0]})") from None
                self._set_named(named, str(p))
            elif p.suffix == ".npy":
                if not p.is_file():
                    raise GraphOptError(f"calibration file not found: {p}")
                try:
                    self._array = np.load(p, mmap_mode="r", allow_pickle=False)
                except Exception as e:
                    raise GraphOptError(f"{p}: not a readable .npy array ({str(e).splitlines()[0]})") from None
            elif not p.exists():
                raise GraphOptError(f"calibration data not found: {p}")
            else:
                raise GraphOptError(f"calibration data must be a .npy or .npz file or an image folder, got {p}")
        elif isinstance(source, Iterable):
            self._iterable = source
        else:
            raise GraphOptError(f"unsupported calibration data of type {type(source).__name__}")
        if self._array is not None:
            check_numeric(self._array, str(source) if isinstance(source, (str, os.PathLike)) else "calibration data")
        if limit is not None:
            if limit < 0:
                raise GraphOptError(f"calibration limit must be >= 0, not {limit}")
            if self._array is not None:
                self._array = self._array[:limit]
            if self._named is not None:
                self._named = {k: v[:limit] for k, v in self._named.items()}
            if self._files is not None:
                self._files = self._files[:limit]

    def _set_named(self, named: dict[str, np.ndarray], what: str) -> None:
        if not named:
            raise GraphOptError(f"{what}: no arrays")
        for k, v in named.items():
            check_numeric(v, f"{what}['{k}']")
        lengths = {k: len(v) for k, v in named.items()}
        if len(set(lengths.values())) != 1:
            raise GraphOptError(f"{what}: the arrays have different sample counts {lengths}")
        self._named = named

    def __len__(self) -> int:
        if self._named is not None:
            return len(next(iter(self._named.values())))
        if self._array is not None:
            return len(self._array)
        if self._files is not None:
            return len(self._files)
        raise TypeError("an iterable calibration source has no length")

    @property
    def sample_shape(self) -> tuple[int, ...] | None:
        if self._named is not None:
            return None  # one per input: see check_against
        if self._array is not None:
            return tuple(self._array.shape[1:])
        if self._files is not None:
            return (3, self.pre["crop"], self.pre["crop"])
        return None

    def num_batches(self) -> int | None:
        try:
            return -(-len(self) // self.batch_size)
        except TypeError:
            return None

    def __iter__(self) -> Iterator[Any]:
        for i, b in enumerate(self._batches()):
            for name, arr in (b.items() if isinstance(b, dict) else [("", b)]):
                if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                    bad = int(np.flatnonzero(~np.isfinite(arr.reshape(len(arr), -1)).all(1))[0]) + i * self.batch_size
                    raise GraphOptError(f"calibration sample {bad}{f' of input {name!r}' if name else ''} "
                                        "contains NaN or Inf")
            yield b

    def tensors(self, batch) -> tuple[torch.Tensor, ...]:
        """A batch as the model's input tensors, in its input order and declared dtypes."""
        if isinstance(batch, dict):
            order = self._order or list(batch)
            arrays = [batch[k] for k in order]
        else:
            arrays = [batch]
        out = []
        for i, a in enumerate(arrays):
            dt = self._dtypes[i] if self._dtypes and i < len(self._dtypes) and self._dtypes[i] is not None else (
                a.dtype if isinstance(batch, dict) else np.float32)
            out.append(torch.from_numpy(np.require(a, dt, ["C", "W"])))
        return tuple(out)

    def _batches(self) -> Iterator[Any]:
        if self._named is not None:
            n = len(self)
            for i in range(0, n, self.batch_size):
                yield {k: np.require(v[i:i + self.batch_size], v.dtype, ["C", "W"]) for k, v in self._named.items()}
        elif self._array is not None:
            for i in range(0, len(self._array), self.batch_size):
                # a memmapped .npy is read-only; torch.from_numpy warns on (and may not write) such arrays
                yield np.require(self._array[i:i + self.batch_size], np.float32, ["C", "W"])
        elif self._files is not None:
            for i in range(0, len(self._files), self.batch_size):
                yield load_image_batch(self._files[i:i + self.batch_size], **self.pre)
        else:
            for b in self._iterable:
                yield b.detach().cpu().numpy() if isinstance(b, torch.Tensor) else np.require(b, np.float32, ["C", "W"])

    def check_against(self, graph: Graph) -> None:
        """Raise a clear error if the samples do not fit the graph's inputs; learn their order
        and dtypes."""
        self._dtypes = [numpy_dtype(v.dtype) for v in graph.inputs]
        if self._named is not None:
            want = [v.name for v in graph.inputs]
            missing = [k for k in want if k not in self._named]
            extra = [k for k in self._named if k not in want]
            if missing or extra:
                raise GraphOptError(f"calibration arrays {sorted(self._named)} do not match the model inputs {want}"
                                    + (f" (missing {missing})" if missing else "") + (f" (unknown {extra})" if extra else ""))
            for v in graph.inputs:
                check_sample_shape(f"samples of calibration array '{v.name}'", self._named[v.name].shape[1:], v)
            self._order = want
            return
        if len(graph.inputs) != 1:
            raise GraphOptError(f"calibration feeds one input, but the model has {len(graph.inputs)}: give a .npz "
                                f"(or a dict) with one array per input name ({', '.join(v.name for v in graph.inputs)})")
        if self.sample_shape is not None:
            check_sample_shape("calibration samples", self.sample_shape, graph.inputs[0])


def check_sample_shape(what: str, shape, inp) -> None:
    """Refuse samples (batch axis excluded) whose shape contradicts model input ``inp``'s static
    dimensions (symbolic ones match anything)."""
    if inp.shape is None:
        return
    want, shape = list(inp.shape)[1:], list(shape)
    if len(want) != len(shape) or any(isinstance(w, int) and w != s for w, s in zip(want, shape)):
        raise GraphOptError(f"{what} have shape {shape} (batch excluded), but model input '{inp.name}' is "
                            f"{format_shape(inp.shape)}")


def check_numeric(a: np.ndarray, what: str) -> None:
    """Refuse arrays that cannot be model inputs: complex, datetime, strings, objects."""
    if a.dtype.kind not in "fiub":
        raise GraphOptError(f"{what}: arrays of dtype {a.dtype} cannot be model inputs (need float or integer)")
    if a.ndim < 1:
        raise GraphOptError(f"{what}: a 0-d array has no samples")


# --------------------------------------------------------------------------- observers
def _channels_first(x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """[C, rest] view of x for per-channel statistics (or [1, all] for per-tensor)."""
    if axis is None:
        return x.reshape(1, -1)
    return x.movedim(axis, 0).reshape(x.shape[axis], -1)


class Observer:
    """Streaming statistic of one value. ``axis`` None = per tensor, else per channel."""

    def update(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def result(self) -> Any:
        raise NotImplementedError


class MinMax(Observer):
    def __init__(self, axis: int | None = None):
        self.axis = axis
        self.min: torch.Tensor | None = None
        self.max: torch.Tensor | None = None

    def update(self, x):
        v = _channels_first(x.detach().float(), self.axis)
        lo, hi = v.amin(1), v.amax(1)
        self.min = lo if self.min is None else torch.minimum(self.min, lo)
        self.max = hi if self.max is None else torch.maximum(self.max, hi)

    def result(self):
        return {"min": self.min.cpu().numpy(), "max": self.max.cpu().numpy()}


class Moments(Observer):
    """Count, mean and variance per channel (float64 sums: exact enough for any N here)."""

    def __init__(self, axis: int | None = 1):
        self.axis = axis
        self.n = 0
        self.s: torch.Tensor | None = None
        self.s2: torch.Tensor | None = None

    def update(self, x):
        v = _channels_first(x.detach().double(), self.axis)
        s, s2 = v.sum(1), (v * v).sum(1)
        self.s = s if self.s is None else self.s + s
        self.s2 = s2 if self.s2 is None else self.s2 + s2
        self.n += v.shape[1]

    def result(self):
        mean = self.s / self.n
        var = (self.s2 / self.n - mean * mean).clamp_min(0)
        return {"count": self.n, "mean": mean.cpu().numpy(), "var": var.cpu().numpy()}


class Histogram(Observer):
    """Per-tensor histogram with fixed ``bins`` over a known [lo, hi] (from a MinMax pass)."""

    def __init__(self, lo: float, hi: float, bins: int = 2048):
        self.lo, self.hi, self.bins = float(lo), float(hi), bins
        self.counts = torch.zeros(bins, dtype=torch.float64)

    def update(self, x):
        if self.hi > self.lo:
            self.counts += torch.histc(x.detach().float().reshape(-1), self.bins, self.lo, self.hi).double().cpu()

    def result(self):
        return {"counts": self.counts.numpy(), "lo": self.lo, "hi": self.hi}


class Collect(Observer):
    """Keeps the tensors themselves (up to ``max_items`` samples along dim 0)."""

    def __init__(self, max_items: int | None = None):
        self.max_items = max_items
        self.parts: list[torch.Tensor] = []
        self.count = 0

    def update(self, x):
        if self.max_items is not None and self.count >= self.max_items:
            return
        x = x.detach()
        if self.max_items is not None:
            x = x[: self.max_items - self.count]
        self.parts.append(x.clone())
        self.count += x.shape[0]

    def result(self):
        return torch.cat(self.parts).cpu().numpy() if self.parts else None


# --------------------------------------------------------------------------- runner
def observe(graph: Graph, data: Any, observers: dict[str, Observer | Sequence[Observer]], *,
            batch_size: int = 32, progress: bool = False, desc: str = "calibrating",
            device: str | None = None) -> dict[str, Any]:
    """Run ``data`` through ``graph`` (torch back end, no grad) and feed each named value's
    batches to its observers. Returns ``{name: result}`` (a list where a list was given).
    ``device``: where it runs (graphopt.training.device; None: the calibration device the
    running pipeline's Context set, else the CPU); results come back as NumPy arrays."""
    from graphopt.backends.torch_module import to_torch
    from graphopt.training.device import calibration_device, resolve_device

    dev = resolve_device(device) if device is not None else calibration_device()

    data = data if isinstance(data, CalibrationData) else CalibrationData(data, batch_size=batch_size)
    data.check_against(graph)
    names = list(observers)
    module = to_torch(graph, outputs=names).eval().to(dev)
    obs = {k: (list(v) if isinstance(v, (list, tuple)) else [v]) for k, v in observers.items()}
    it: Iterable = data
    if progress:
        from tqdm import tqdm

        it = tqdm(data, total=data.num_batches(), desc=desc, leave=False)
    with torch.no_grad():
        for i, batch in enumerate(it):
            outs = module(*[t.to(dev) for t in data.tensors(batch)])
            for name, t in zip(names, outs):
                check_finite_value(name, t, i * data.batch_size)
                for o in obs[name]:
                    o.update(t)
    out: dict[str, Any] = {}
    for k, v in observers.items():
        results = [o.result() for o in obs[k]]
        out[k] = results if isinstance(v, (list, tuple)) else results[0]
    return out


def check_finite_value(name: str, t: torch.Tensor, first_sample: int) -> None:
    """Refuse a model value that overflows float32 on the calibration data: finite inputs (say
    1e38) can still overflow inside the network, and statistics of inf/NaN (ranges, histograms,
    scales) are meaningless. Checked before any statistic is taken."""
    if not t.is_floating_point() or t.numel() == 0:
        return
    lo, hi = torch.aminmax(t.detach().reshape(-1))  # one pass; NaN and +-inf reach the extremes
    if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))):  # the slow search only on a refusal
        bad = first_sample + (int(torch.nonzero(~torch.isfinite(t.reshape(len(t), -1)).all(1))[0]) if t.ndim else 0)
        raise GraphOptError(f"value '{name}' overflows float32 (inf or NaN) on calibration sample {bad}: the "
                            "calibration data is out of range for this model")


def collect(graph: Graph, data: Any, names: Sequence[str], *, batch_size: int = 32,
            max_items: int | None = None) -> dict[str, np.ndarray]:
    """The values ``names`` for every sample (or the first ``max_items``), as arrays."""
    return observe(graph, data, {n: Collect(max_items) for n in names}, batch_size=batch_size)


def compare(reference: Graph, test: Graph, data: Any, names: Sequence[str], *, batch_size: int = 32,
            progress: bool = False) -> dict[str, float]:
    """SQNR in dB of each named value of ``test`` against the same value of ``reference``,
    from one pass of ``data`` through both (streaming sums, no tensors kept)."""
    from graphopt.backends.torch_module import to_torch

    data = data if isinstance(data, CalibrationData) else CalibrationData(data, batch_size=batch_size)
    data.check_against(reference)
    names = [n for n in names if n in reference.values and n in test.values]
    ma, mb = to_torch(reference, outputs=names).eval(), to_torch(test, outputs=names).eval()
    sig = torch.zeros(len(names), dtype=torch.float64)
    noise = torch.zeros(len(names), dtype=torch.float64)
    it: Iterable = data
    if progress:
        from tqdm import tqdm

        it = tqdm(data, total=data.num_batches(), desc="SQNR", leave=False)
    with torch.no_grad():
        for batch in it:
            xb = data.tensors(batch)
            for i, (a, b) in enumerate(zip(ma(*xb), mb(*xb))):
                a, b = a.double(), b.double()
                sig[i] += (a * a).sum()
                noise[i] += ((a - b) ** 2).sum()
    out = {}
    for i, n in enumerate(names):
        out[n] = float("inf") if noise[i] == 0 else float(10 * torch.log10(sig[i].clamp_min(1e-30) / noise[i]))
    return out


class AbsMean(Observer):
    """Mean absolute value of a whole tensor (LSQ's initial step), or per channel along ``axis``
    (AWQ's activation salience)."""

    def __init__(self, axis: int | None = None):
        self.axis = axis
        self.s, self.n = 0.0, 0

    def update(self, x):
        v = _channels_first(x.detach().double().abs(), self.axis)
        self.s = self.s + v.sum(1)
        self.n += v.shape[1]

    def result(self):
        m = self.s / max(self.n, 1)
        return {"abs_mean": float(m[0]) if self.axis is None else m.cpu().numpy()}
