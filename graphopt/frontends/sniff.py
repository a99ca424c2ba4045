"""What kind of model a path names, and the input errors that need no parsing: answered with the
standard library alone, so the CLI refuses a wrong input before it imports onnx or torch.

``model_kind(path)`` -> "torch" (a ``.pt``/TorchScript file or a ``MODULE:CALLABLE`` factory) or
"onnx"; ``precheck(path)`` raises the one-line ``FrontendError`` a file that cannot be a model
gets (missing, a folder or device, empty, an unknown suffix, bytes that cannot start an ONNX
``ModelProto``). The ONNX front end parses for real afterwards; this only answers early.
"""

from __future__ import annotations

import os
from pathlib import Path

from graphopt.errors import FrontendError

TORCH_SUFFIXES = (".pt", ".pth", ".ts", ".torchscript")
# ModelProto's fields (onnx.proto): number -> protobuf wire type (0 varint, 2 length-delimited)
_MODEL_FIELDS = {1: 0, 2: 2, 3: 2, 4: 2, 5: 0, 6: 2, 7: 2, 8: 2, 14: 2, 20: 2, 25: 2, 26: 2}


def is_factory_spec(spec: str) -> bool:
    """``MODULE:CALLABLE`` or ``FILE.py:CALLABLE`` (and not an existing file or an .onnx path)."""
    return ":" in spec and not Path(spec).exists() and not spec.lower().endswith(".onnx")


def model_kind(path: str | os.PathLike) -> str:
    p = str(path)
    return "torch" if is_factory_spec(p) or Path(p).suffix.lower() in TORCH_SUFFIXES else "onnx"


def _first_field(head: bytes) -> tuple[int, int] | None:
    """(field number, wire type) of the protobuf tag at the start of ``head``, or None."""
    tag, shift = 0, 0
    for b in head[:5]:
        tag |= (b & 0x7F) << shift
        if not b & 0x80:
            return tag >> 3, tag & 7
        shift += 7
    return None


def check_file(path: str | os.PathLike) -> Path:
    """``path`` as a Path, refused in one line unless it is an existing regular file (the one
    place that says so for every model reader)."""
    p = Path(path)
    if not p.exists():
        raise FrontendError(f"{p}: no such file")
    if p.is_dir():
        raise FrontendError(f"{p}: is a folder, not an ONNX file")
    if not p.is_file():
        raise FrontendError(f"{p}: not a regular file (a device, pipe or socket cannot be read as a model)")
    return p


def precheck(path: str | os.PathLike) -> None:
    """Refuse, in one line, a path that cannot hold an ONNX model (see the module doc)."""
    p = check_file(path)
    if p.suffix.lower() == ".gdc":
        raise FrontendError(f"{p}: a Deep Compression file (.gdc); this command reads an ONNX file "
                            "(graphopt decompress turns it back into one)")
    if p.suffix.lower() != ".onnx":
        raise FrontendError(f"{p}: unsupported model type '{p.suffix or '(none)'}'; expected .onnx, .pt or "
                            "MODULE:CALLABLE")
    with open(p, "rb") as fh:
        head = fh.read(8)
    if not head:
        raise FrontendError(f"{p}: not a valid ONNX file (it is empty)")
    first = _first_field(head)
    if first is None or _MODEL_FIELDS.get(first[0]) != first[1]:
        raise FrontendError(f"{p}: not a valid ONNX file (its first bytes {head[:4]!r} cannot start an ONNX "
                            "ModelProto)")
