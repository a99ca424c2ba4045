"""Where torch work runs, and in which precision: the one owner of the ``device`` and ``amp``
options every training step takes.

``device``: ``auto`` (CUDA when torch sees a GPU, else the CPU), ``cpu``, ``cuda``, ``cuda:N`` or
``mps``. A device this torch build or machine does not have is refused in one line naming what
is missing. ``Context(device=...)`` (``graphopt convert --device``) sets where a pipeline's
calibration runs (``observe``: ranges, histograms, GPTQ's Hessians, bias correction, SmoothQuant)
and the default of its training steps. ``amp``: ``off``, ``bf16`` or ``fp16``: the forward pass and the loss run under
``torch.autocast`` on that device; quantizer maths stays float32 (the torch back end casts a
FakeQuant's input to float32 first: rounding to the grid must be exact), parameters and
optimizer state stay float32, and fp16 scales the loss (``torch.amp.GradScaler``) so small
gradients do not flush to zero. Checkpoints are saved on the CPU, so a run resumes on any device.
"""

from __future__ import annotations

import contextlib
import re

import torch

from graphopt.errors import GraphOptError

AMP = ("off", "bf16", "fp16")
DEVICES = "auto, cpu, cuda, cuda:N, mps"


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """``spec`` as a ``torch.device`` this process can use (see the module doc)."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    m = re.fullmatch(r"cuda(?::(\d+))?", spec)
    if m:
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}, but no GPU is visible"
            raise GraphOptError(f"device '{spec}': torch {torch.__version__} has no CUDA device here ({build})")
        if m.group(1) is not None and int(m.group(1)) >= torch.cuda.device_count():
            raise GraphOptError(f"device '{spec}': only {torch.cuda.device_count()} CUDA device(s) visible")
        return torch.device(spec)
    if spec == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise GraphOptError("device 'mps': torch has no Apple-silicon (MPS) device here")
        return torch.device("mps")
    raise GraphOptError(f"unknown device '{spec}' ({DEVICES})")


_CALIBRATION: list[torch.device] = []  # the stack PassManager pushes a Context's device onto


@contextlib.contextmanager
def calibrating_on(spec: str | None):
    """Within it, ``observe`` (calibration, GPTQ's Hessians, bias correction, SmoothQuant's
    ranges) runs on ``spec``'s device; PassManager enters it with the Context's ``device``."""
    _CALIBRATION.append(resolve_device(spec or "cpu"))
    try:
        yield
    finally:
        _CALIBRATION.pop()


def calibration_device() -> torch.device:
    return _CALIBRATION[-1] if _CALIBRATION else torch.device("cpu")


def check_amp(amp: str, device: torch.device) -> None:
    if amp not in AMP:
        raise GraphOptError(f"unknown amp '{amp}' ({', '.join(AMP)})")
    if amp == "fp16" and device.type == "cpu":
        raise GraphOptError("amp=fp16 needs a GPU (fp16 autocast on the CPU is slower and unscaled); use amp=bf16")


def autocast(device: torch.device, amp: str):
    """The autocast context of ``amp`` on ``device`` (a no-op for ``off``)."""
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def grad_scaler(device: torch.device, amp: str):
    """A GradScaler for fp16 (None otherwise)."""
    return torch.amp.GradScaler(device.type) if amp == "fp16" else None


def to_cpu(state):
    """A state dict with every tensor copied to the CPU, nested dicts and lists included (an
    optimizer's state): device-independent checkpoints."""
    if isinstance(state, torch.Tensor):
        return state.detach().cpu().clone()
    if isinstance(state, dict):
        return {k: to_cpu(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(to_cpu(v) for v in state)
    return state
