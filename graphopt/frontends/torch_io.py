"""Reading PyTorch models for the CLI, without silently unpickling untrusted files.

* ``module:callable`` or ``path/to/file.py:callable``: imports the module you name (running
  your code, as any import does), calls ``callable()`` to build the ``nn.Module``, and
  optionally loads ``--weights FILE`` as a *state dict* with ``torch.load(weights_only=True)``
  (tensors and plain containers only; no arbitrary objects).
* A TorchScript archive (``torch.jit.save``): loaded with ``torch.jit.load``, which does not
  run pickled Python code. fx cannot trace TorchScript, so it is converted through
  ``torch.onnx.export`` and the ONNX front end; node provenance is then the exporter's scope names.
* A pickled ``nn.Module`` (``torch.save(model)``) is refused: loading one runs arbitrary code.
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import sys
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from graphopt.errors import FrontendError, GraphOptError, UsageError
from graphopt.frontends.sniff import is_factory_spec  # noqa: F401  (its owner)
from graphopt.ir import Graph


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.replace("x", ",").split(",") if d.strip())
    except ValueError:
        raise UsageError(f"--input-shape must be comma-separated integers like 1,3,224,224, got '{text}'") from None
    if not dims or any(d <= 0 for d in dims):
        raise UsageError(f"--input-shape must be positive integers, got '{text}'")
    return dims


_EXAMPLE_DTYPES = {"float32": torch.float32, "int64": torch.int64, "int32": torch.int32, "bool": torch.bool}


def example_input(text: str) -> torch.Tensor:
    """``SHAPE[:DTYPE]`` -> an example tensor: float32 from N(0, 1); int64, int32 and bool filled
    with ones (a valid token id and a full attention mask)."""
    shape_text, _, dtype = text.partition(":")
    dtype = dtype.strip() or "float32"
    if dtype not in _EXAMPLE_DTYPES:
        raise UsageError(f"--input-shape dtype must be one of {', '.join(_EXAMPLE_DTYPES)}, got '{dtype}'")
    shape = parse_shape(shape_text)
    if dtype == "float32":
        return torch.randn(*shape)
    return torch.ones(*shape, dtype=_EXAMPLE_DTYPES[dtype])


def load_factory(spec: str) -> torch.nn.Module:
    mod_name, _, fn_name = spec.rpartition(":")
    if not mod_name or not fn_name:
        raise GraphOptError(f"expected MODULE:CALLABLE or FILE.py:CALLABLE, got '{spec}'")
    try:
        if mod_name.endswith(".py"):
            path = Path(mod_name)
            if not path.is_file():
                raise GraphOptError(f"{path}: no such file")
            folder = str(path.resolve().parent)
            if folder not in sys.path:  # the file's sibling modules import as they do when it runs
                sys.path.insert(0, folder)
            spec_ = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(spec_)
            sys.modules.setdefault(path.stem, module)
            spec_.loader.exec_module(module)
        else:
            module = importlib.import_module(mod_name)
    except GraphOptError:
        raise
    except Exception as e:
        raise GraphOptError(f"cannot import '{mod_name}': {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    fn = getattr(module, fn_name, None)
    if fn is None or not callable(fn):
        raise GraphOptError(f"'{mod_name}' has no callable '{fn_name}'")
    model = fn()
    if not isinstance(model, torch.nn.Module):
        raise GraphOptError(f"{spec}() returned {type(model).__name__}, not an nn.Module")
    return model


def _plain(text: str) -> str:
    """Text without terminal escape codes (torch colours some of its messages)."""
    import re

    return re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text)


def _read_weights(p: Path) -> dict:
    """A state dict from .safetensors (the ecosystem's standard), .npz (numpy arrays) or a torch
    file read with weights_only=True; none of them runs pickled code."""
    if p.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise GraphOptError(f"{p}: reading .safetensors needs the safetensors package "
                                "(pip install safetensors)") from None
        try:
            return load_file(str(p))
        except Exception as e:
            raise GraphOptError(f"{p}: not a readable .safetensors file ({_plain(str(e).splitlines()[0])})") from None
    if p.suffix == ".npz":
        try:
            with np.load(p, allow_pickle=False) as z:
                return {k: torch.from_numpy(np.array(z[k])) for k in z.files}
        except Exception as e:
            raise GraphOptError(f"{p}: not a readable .npz of arrays ({str(e).splitlines()[0]})") from None
    return torch.load(p, map_location="cpu", weights_only=True)


def load_state_dict(model: torch.nn.Module, path: str) -> None:
    p = Path(path)
    if not p.is_file():
        raise GraphOptError(f"weights file not found: {p}")
    try:
        state = _read_weights(p)
    except GraphOptError:
        raise
    except Exception as e:
        why = "it holds pickled Python objects (e.g. a whole nn.Module saved with torch.save(model)), which are " \
              "never unpickled" if "weights only" in str(e).lower() or "weights_only" in str(e).lower() else \
              _plain(str(e).splitlines()[0] if str(e) else type(e).__name__)
        raise GraphOptError(f"{p}: not a state dict of tensors: {why}; save model.state_dict() instead") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise GraphOptError(f"{p}: expected a state dict, got {type(state).__name__}")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise GraphOptError(f"{p}: weights do not fit the model: {str(e).splitlines()[0]} ...") from e


def load_torch_model(spec: str, input_shape: str | Sequence[str] | None, weights: str | None = None,
                     exporter: str = "auto") -> Graph:
    """``input_shape``: one ``SHAPE[:DTYPE]`` per input of ``forward``, in order (see
    ``example_input``); ``exporter``: ``from_torch``'s (auto, fx, export)."""
    from graphopt.frontends.torch_fx import from_torch

    if not input_shape:
        raise UsageError("--input-shape is required for PyTorch models (e.g. --input-shape 1,3,224,224)")
    shapes = [input_shape] if isinstance(input_shape, str) else list(input_shape)
    examples = tuple(example_input(t) for t in shapes)
    example = examples[0]
    if is_factory_spec(spec):
        model = load_factory(spec)
        if weights:
            load_state_dict(model, weights)
        return from_torch(model, examples, exporter=exporter)
    if len(examples) > 1:
        raise UsageError("a TorchScript file takes one --input-shape")
    if weights:
        raise GraphOptError("--weights goes with a MODULE:CALLABLE model, not with a TorchScript file")
    p = Path(spec)
    if not p.is_file():
        raise FrontendError(f"{p}: no such file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit's Deprecation/FutureWarnings are not the user's concern
            scripted = torch.jit.load(str(p), map_location="cpu")
    except Exception as e:
        raise FrontendError(f"{p}: not a TorchScript archive. For a state dict use MODULE:CALLABLE --weights {p} "
                            "(loaded with weights_only=True); pickled nn.Modules are never loaded") from e
    from graphopt.frontends.onnx_file import load_onnx

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(scripted, (example,), buf, dynamo=False, opset_version=17, input_names=["input"],
                              output_names=["output"], dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
        except Exception as e:
            raise FrontendError(f"{p}: TorchScript model could not be converted: {str(e).splitlines()[0]}") from e
    return load_onnx(buf.getvalue())
