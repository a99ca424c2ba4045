"""The torch front end's fallback for what torch.fx cannot trace: ``torch.onnx.export(dynamo=True)``
(torch.export, then onnxscript's ATen-to-ONNX translation) into the ONNX front end.

torch.fx traces symbolically, so Python control flow on a traced value (``if x.shape[1] > 1``,
``assert x.shape[-1] == 8``, a loop over ``x.size(0)``) stops it, and so do libraries whose
modules take that kind of branch (Hugging Face transformers). torch.export traces with real
shapes and guards: it takes those branches on the example inputs, keeps the batch dimension
symbolic where the code allows (``Dim.AUTO``), and refuses control flow on tensor *values*
(that needs ``torch.cond``). graphopt does not write a second tracer; this module only adapts
torch's exporter to graphopt's conventions:

* provenance: each node's source is the module path torch recorded in its
  ``pkg.torch.onnx.name_scopes`` metadata (the fx path's convention);
* inputs keep ``forward``'s argument names, outputs are named ``output`` / ``output_<i>``, and a
  symbolic batch dimension is named ``batch``;
* non-tensor arguments (``constants``) are passed as keyword arguments and specialized.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import re
import warnings
from typing import Any, Sequence

import torch

from graphopt.errors import FrontendError
from graphopt.ir import Graph

log = logging.getLogger("graphopt.frontends.torch_export")
EXPORTER = "torch.onnx.export(dynamo=True)"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _reason(e: BaseException) -> str:
    """The informative line of an exporter error: torch wraps the cause in a generic
    'Failed to export ...' message, so use the innermost exception's first line."""
    while e.__cause__ is not None:
        e = e.__cause__
    lines = [ln.strip() for ln in _ANSI.sub("", str(e)).splitlines() if ln.strip()]
    hint = "; branching on tensor values needs torch.cond" if "data-dependent" in str(e) else ""
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300] + hint


def _rename_batch(model, names: Sequence[str]) -> None:
    """Name the symbolic dim 0 of the inputs ``batch`` wherever it appears."""
    syms = set()
    for vi in model.graph.input:
        dims = vi.type.tensor_type.shape.dim
        if vi.name in names and dims and dims[0].dim_param:
            syms.add(dims[0].dim_param)
    if not syms:
        return
    for vi in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param in syms:
                d.dim_param = "batch"


def _set_provenance(model) -> None:
    for n in model.graph.node:
        for p in n.metadata_props:
            if p.key == "pkg.torch.onnx.name_scopes":
                try:
                    scopes = [s for s in _scopes(p.value) if s and not s.startswith("_")]  # not torch's hooks
                except ValueError:
                    break
                if scopes:
                    src = scopes[-2] if len(scopes) >= 2 else scopes[-1]
                    n.metadata_props.add(key="graphopt.source", value=src)
                break


def _scopes(text: str) -> list[str]:
    """``"['', 'blocks', 'blocks.0']"`` -> its strings (no eval of arbitrary text)."""
    import ast

    v = ast.literal_eval(text)
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise ValueError(text)
    return v


@contextlib.contextmanager
def _quiet_torch():
    """Silence the exporter's own logging and printing (graph dumps on failure, progress lines):
    the reason goes into graphopt's one-line error instead. Restores everything afterwards."""
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)  # loggers the exporter creates while it runs included
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logging.disable(previous)


def export_graph(module: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...], constants: dict[str, Any],
                 *, opset: int, dynamic_batch: bool, infer_shapes: bool) -> Graph:
    """``module`` through torch.onnx.export(dynamo=True) and the ONNX front end (see the module
    doc). Raises FrontendError with the exporter's reason when it cannot export the module."""
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter's ATen-to-ONNX library)
    except ImportError:
        raise FrontendError(f"the fallback through {EXPORTER} needs onnxscript: pip install onnxscript") from None
    from torch.export import Dim

    from graphopt.frontends.onnx_file import from_model_proto

    try:
        params = [p.name for p in inspect.signature(module.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    names = params[:len(example_inputs)] if len(params) >= len(example_inputs) else \
        [f"input_{i}" for i in range(len(example_inputs))]
    specs = [{0: Dim.AUTO} if dynamic_batch and x.dim() > 0 else None for x in example_inputs]
    if dynamic_batch:  # torch.export specializes a dimension of size 1 (its 0/1 rule) and would bake batch 1
        example_inputs = tuple(torch.cat([x, x]) if x.dim() > 0 and x.shape[0] == 1 else x  # into shapes (a
                               for x in example_inputs)  # causal mask's Expand) of a graph that says 'batch'
    if len(params) >= len(example_inputs):  # by name, so the specialized keyword arguments can be listed too
        dyn: Any = {**dict(zip(names, specs)), **{k: None for k in constants}}
    else:
        dyn = tuple(specs)
    with warnings.catch_warnings(), _quiet_torch():
        warnings.simplefilter("ignore")
        try:
            prog = torch.onnx.export(module, example_inputs, kwargs=dict(constants) or None, dynamo=True,
                                     opset_version=max(opset, 18), dynamic_shapes=dyn, input_names=names,
                                     verbose=False, report=False, optimize=True)
        except Exception as e:
            raise FrontendError(f"{EXPORTER} cannot export {type(module).__name__} either ({_reason(e)})") from e
    model = prog.model_proto
    _rename_batch(model, names)
    _set_provenance(model)
    graph = from_model_proto(model, label=f"{type(module).__name__} (exported by {EXPORTER})", infer_shapes=infer_shapes)
    outs = list(graph.outputs)
    for i, o in enumerate(outs):
        name = "output" if len(outs) == 1 else f"output_{i}"
        if o.name != name and name not in graph.values:
            graph.rename_value(o, name)
    graph.model_meta["producer_name"] = f"graphopt.frontends.torch_export ({EXPORTER})"
    return graph
