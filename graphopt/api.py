"""One call from a model to a deployable file, with a machine-readable report.

``graphopt.convert(model, output, preset=... | pipeline=..., calib=..., train=...)`` loads the
model (an ONNX path, an ``onnx.ModelProto``, a ``Graph``, or an ``nn.Module`` with example
inputs), runs the pipeline, lowers and writes the result atomically, and returns a ``Report``:
what ``graphopt convert`` prints, as data. ``Report.to_dict()`` / ``to_json()`` follow the schema
in docs/api.md (``schema: "graphopt.report/1"``; fields are only ever added within a version).
The CLI builds the same ``Report`` through ``run`` and prints ``Report.summary()``; with
``--report-json FILE`` it writes ``to_json()``, so the two never disagree.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graphopt.errors import GraphOptError, UsageError

SCHEMA = "graphopt.report/1"
FORMATS = ("float", "qdq", "qoperator")


# ------------------------------------------------------------------ the report
@dataclass
class Report:
    """What a conversion did. ``to_dict()`` is the documented JSON form; ``summary()`` the text
    the CLI prints. ``graph`` (the converted IR) is not part of the JSON."""

    input: str | None
    output: str | None
    format: str
    pipeline: str
    passes: list[dict] = field(default_factory=list)  # {"name", "modified", "seconds", "stats"}
    before: dict = field(default_factory=dict)  # {"nodes", "params", "weight_bytes", "macs"}
    after: dict = field(default_factory=dict)
    quantization: dict | None = None  # see docs/api.md; None for a float result
    sizes: dict = field(default_factory=dict)  # {"input_bytes", "output_bytes"}
    timings: dict = field(default_factory=dict)  # seconds: load, passes, write, report, total
    warnings: list[str] = field(default_factory=list)
    graph: Any = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        from graphopt import __version__

        d = {"schema": SCHEMA, "graphopt": __version__}
        for f in dataclasses.fields(self):
            if f.name != "graph":
                d[f.name] = _jsonable(getattr(self, f.name))
        return d

    def to_json(self, indent: int | None = 1) -> str:
        import json

        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def write_json(self, path: str | os.PathLike) -> None:
        """``to_json()`` written atomically to ``path``."""
        from graphopt.atomic import atomic_paths

        text = self.to_json()
        with atomic_paths(str(path)) as (tmp,):
            Path(tmp).write_text(text + "\n")

    def summary(self) -> str:
        """The text ``graphopt convert`` prints."""
        from graphopt.analysis import human

        lines = [f"{self.input or '<model>'} -> {self.output or '(not written)'}", f"pipeline: {self.pipeline}"]
        for p in self.passes:
            extra = ", ".join(f"{k}={_stat(v)}" for k, v in p["stats"].items())
            lines.append(f"  {p['name']:<20} {'modified' if p['modified'] else 'unchanged':<9} {extra}")
        b, a = self.before, self.after
        if b and a:
            lines.append(f"nodes {b['nodes']} -> {a['nodes']}, params {human(b['params'])} -> {human(a['params'])}, "
                         f"weights {human(b['weight_bytes'], 'B')} -> {human(a['weight_bytes'], 'B')}, "
                         f"MACs {human(b['macs'])} -> {human(a['macs'])}")
        q = self.quantization
        if q is not None:
            lines.append(f"format {self.format}: {q['activation_quantizers']} activation quantizers, "
                         f"{q['quantized_initializers']} quantized initializers, opset {q['opset']}"
                         + (f", {q['qoperator_layers']} layers as QOperator" if q["qoperator_layers"] else ""))
            if q["schemes"]:
                lines.append("  quantizers: " + "; ".join(f"{k} x{v}" for k, v in q["schemes"].items()))
            lines += _why_lines("layers left in float by quantize", q["float_layers"])
            lines += _why_lines("biases left in float", q["float_biases"])
            lines += _why_lines("quantizers simulated in float", q["simulated"])
            lines += _why_lines("layers not lowered to QOperator", q["not_fused"])
            lines += _why_lines("per-channel bounds (Min) left in float", q.get("bounds_kept") or {})
        ins, outs = self.sizes.get("input_bytes"), self.sizes.get("output_bytes")
        if q is not None and outs is not None:
            lines.append(f"  size {ins / 1e6:.2f} MB -> {outs / 1e6:.2f} MB" if ins else f"  size {outs / 1e6:.2f} MB")
        k = (q or {}).get("ort_kernels")
        if k is not None:
            ints = ", ".join(f"{op} x{n}" for op, n in sorted(k["integer"].items())) or "none"
            lines.append(f"  onnxruntime integer kernels: {ints}")
            if k["float"]:
                lines.append(f"  onnxruntime runs {len(k['float'])} Conv/Gemm/MatMul in FLOAT: "
                             + ", ".join(f"{op} {name}" for op, name in k["float"]))
            else:
                lines.append("  every Conv/Gemm/MatMul runs as an integer kernel")
        sq = (q or {}).get("sqnr_db")
        if sq:
            worst = sorted(sq.items(), key=lambda kv: kv[1])[:10]
            lines.append(f"  worst layers by SQNR vs float ({q['sqnr_samples']} calibration samples; "
                         "--report-samples, --no-report):")
            lines += [f"    {db:6.1f} dB  {name}" for name, db in worst]
        if self.warnings:
            lines.append(f"warnings: {len(self.warnings)}")
            lines += [f"  {w}" for w in self.warnings[:20]]
            if len(self.warnings) > 20:
                lines.append(f"  and {len(self.warnings) - 20} more (in the JSON report)")
        t = self.timings
        if t:
            rep = f", report {t['report']:.2f}" if t.get("report") else ""
            lines.append(f"total {t['total']:.2f} s: load {t['load']:.2f}, passes {t['passes']:.2f}, "
                         f"write {t['write']:.2f}{rep}")
        return "\n".join(lines)

    __str__ = summary


def _jsonable(v):
    """Pass statistics and friends as JSON values: numpy scalars and arrays to numbers and lists,
    sets and tuples to lists, keys to strings, non-finite floats to None."""
    import numpy as np

    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, set, frozenset)):
        items = sorted(v, key=str) if isinstance(v, (set, frozenset)) else v
        return [_jsonable(x) for x in items]
    if isinstance(v, np.ndarray):
        return _jsonable(v.tolist())
    if isinstance(v, np.generic):
        return _jsonable(v.item())
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if v is None or isinstance(v, (bool, int, str)):
        return v
    return str(v)


def _stat(v) -> str:
    """A pass statistic for one summary line: numbers rounded, collections as their size."""
    if isinstance(v, bool) or v is None:
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple, dict, set)):
        return f"{len(v)} entr{'y' if len(v) == 1 else 'ies'}"
    return str(v)


def _why_lines(title: str, reasons: dict[str, str], limit: int = 12) -> list[str]:
    """Every fall-back with its reason (grouped by reason)."""
    if not reasons:
        return []
    out = [f"  {title}: {len(reasons)}"]
    by_reason: dict[str, list[str]] = {}
    for name, why in reasons.items():
        by_reason.setdefault(why, []).append(name)
    for why, names in by_reason.items():
        shown = ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")
        out.append(f"    {why}: {shown}")
    return out


class _Collect(logging.Handler):
    """Keeps every warning graphopt logs (and Python warnings) during a conversion."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        msg = record.getMessage()
        if msg not in self.messages:
            self.messages.append(msg)


# ------------------------------------------------------------------ the shared core
def _measure(graph) -> dict:
    from graphopt.analysis import total_macs

    return {"nodes": len(graph), "params": int(graph.num_params()),
            "weight_bytes": int(sum(v.const.nbytes for v in graph.constants.values())),
            "macs": int(total_macs(graph))}


class _KeepBeforeQuantize:
    """Instrument: keeps a copy of the float graph as it was just before ``quantize``."""

    def __init__(self):
        self.graph = None

    def before(self, p, graph, index):
        if p.name == "quantize":
            self.graph = graph.copy()

    def after(self, p, result, index, seconds):
        pass


def _merged(stats: dict, key: str) -> dict[str, str]:
    """``key`` (a {layer: reason} stat) merged over every run of ``quantize``."""
    out: dict[str, str] = {}
    for st in stats.get("quantize", []):
        out.update(st.get(key) or {})
    return out


def _own_dirs() -> tuple[str, ...]:
    import importlib.util

    import graphopt

    lib = importlib.util.find_spec("graphopt.passes")  # the pass library's folder (passes/), not imported here
    dirs = [os.path.dirname(graphopt.__file__), *(lib.submodule_search_locations or [] if lib else [])]
    return tuple(os.path.abspath(d) + os.sep for d in dirs)


def run(graph, pipeline, ctx, output: str | os.PathLike | None, fmt: str = "qdq", *, input_name: str | None = None,
        input_bytes: int | None = None, load_s: float = 0.0, report_samples: int = 32, kernels: bool = True,
        verify_each: bool = False, instruments: list | None = None, external_data: bool | None = None,
        writer: bool = True, accuracy_level: int = 0) -> Report:
    """Run ``pipeline`` (a parsed pipeline) over ``graph`` and write ``output`` (None: lowered to
    a temporary file for the report, then dropped); the core of ``convert`` and of the CLI. The
    warnings graphopt logs or raises meanwhile go into the report."""
    collect = _Collect()
    glog = logging.getLogger("graphopt")
    glog.addHandler(collect)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rep = _run(graph, pipeline, ctx, output, fmt, input_name, input_bytes, load_s, report_samples, kernels,
                       verify_each, instruments or [], external_data, writer, accuracy_level)
        ours = _own_dirs()
        for w in caught:  # re-issued, so a caller's own filters still see them
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            text = str(w.message).splitlines()[0]
            if os.path.abspath(w.filename).startswith(ours) and text not in collect.messages:
                collect.messages.append(text)  # graphopt's own; a library's deprecation notes stay out
    finally:
        glog.removeHandler(collect)
    rep.warnings = collect.messages
    return rep


def _run(graph, pipeline, ctx, output, fmt, input_name, input_bytes, load_s, report_samples, kernels, verify_each,
         instruments, external_data, writer, accuracy_level=0) -> Report:
    from graphopt.backends.lowering import export_file
    from graphopt.passmanager import PassManager

    t0 = time.perf_counter()
    before = _measure(graph)
    keeper = _KeepBeforeQuantize()
    result = PassManager(pipeline, verify_each=verify_each, instruments=[keeper] + instruments).run(graph, ctx)
    graph = result.graph
    t_passes = time.perf_counter()
    rep = Report(input=input_name, output=None if output is None else str(output), format=fmt, pipeline=str(pipeline),
                 passes=[{"name": name, "modified": bool(st["modified"]), "seconds": float(st.get("seconds", 0.0)),
                          "stats": {k: v for k, v in st.items() if k not in ("modified", "seconds")}}
                         for name, runs in result.stats.items() for st in runs],
                 before=before, graph=graph)
    if not writer:  # under torchrun only rank 0 writes
        return rep
    tmpdir = None
    path = output
    if path is None:
        tmpdir = tempfile.TemporaryDirectory(prefix="graphopt-")
        path = os.path.join(tmpdir.name, "model.onnx")
    try:
        low = export_file(graph, path, fmt, external_data=external_data, accuracy_level=accuracy_level)
        t_write = time.perf_counter()
        rep.after = _measure(graph)
        rep.sizes = {"input_bytes": input_bytes, "output_bytes": _file_bytes(path)}
        if low is not None:
            rep.quantization = _quantization(low, graph, keeper.graph, ctx, result.stats, path, report_samples,
                                             kernels)
        t_end = time.perf_counter()
    finally:
        if tmpdir is not None:
            tmpdir.cleanup()
    rep.timings = {"load": round(load_s, 4), "passes": round(t_passes - t0, 4), "write": round(t_write - t_passes, 4),
                   "report": round(t_end - t_write, 4), "total": round(load_s + t_end - t0, 4)}
    return rep


def _file_bytes(path) -> int:
    """The model file plus its external-data file, if any."""
    n = os.path.getsize(path)
    ext = str(path) + ".data"
    return n + (os.path.getsize(ext) if os.path.isfile(ext) else 0)


def _quantization(low, graph, float_graph, ctx, stats, path, report_samples, kernels) -> dict:
    q = {"activation_quantizers": low.qdq_pairs, "quantized_initializers": low.weights, "opset": low.opset,
         "qoperator_layers": low.fused, "schemes": dict(low.schemes),
         "float_layers": _merged(stats, "float_layers"), "float_biases": _merged(stats, "float_biases"),
         "simulated": dict(low.simulated_why), "not_fused": dict(low.not_fused),
         "bounds_kept": _merged(stats, "bounds_kept"),
         "ort_kernels": None, "sqnr_db": None, "sqnr_samples": 0}
    if not kernels:
        return q
    from graphopt.backends.lowering import ort_kernel_report

    kr = ort_kernel_report(str(path))
    q["ort_kernels"] = {"integer": dict(kr["integer"]), "float": [list(x) for x in kr["float"]]}
    if float_graph is not None and ctx.calib is not None and report_samples > 0:
        from graphopt.training.calibration import CalibrationData, compare

        names = [n.outputs[0].name for n in graph.nodes if n.op_type in ("Conv", "Gemm", "MatMul")]
        sample = CalibrationData(ctx.calib, limit=report_samples)
        sq = compare(float_graph, graph, sample, names, progress=ctx.show_progress)
        src = {n.outputs[0].name: n.source for n in graph.nodes}
        q["sqnr_db"] = {src.get(k, k): round(float(v), 2) for k, v in sq.items()}
        try:
            q["sqnr_samples"] = len(sample)
        except TypeError:
            q["sqnr_samples"] = None
    return q


# ------------------------------------------------------------------ the one call
def _graph_of(model, example_inputs):
    """The input model as a Graph (a copy: the caller's model is never changed)."""
    from graphopt.ir import Graph

    if isinstance(model, Graph):
        return model.copy(), None, None
    if isinstance(model, (str, os.PathLike)):
        p = str(model)
        from graphopt.frontends.sniff import model_kind, precheck

        if model_kind(p) == "torch":
            from graphopt.frontends.torch_io import load_torch_model

            if example_inputs is None:
                raise UsageError(f"{p}: a PyTorch model needs example_inputs (a tensor, or a tuple of tensors)")
            shape = tuple(_first(example_inputs).shape)
            return load_torch_model(p, shape, None, "auto"), p, None
        from graphopt.frontends.onnx_file import load_onnx

        precheck(p)
        return load_onnx(p), p, os.path.getsize(p)
    try:
        import onnx

        if isinstance(model, onnx.ModelProto):
            from graphopt.frontends.onnx_file import load_onnx

            return load_onnx(model), None, model.ByteSize()
    except ImportError:  # pragma: no cover - onnx is a dependency
        pass
    try:
        import torch

        if isinstance(model, torch.nn.Module):
            if example_inputs is None:
                raise UsageError("an nn.Module needs example_inputs (a tensor, or a tuple of tensors)")
            from graphopt.frontends.torch_fx import from_torch

            return from_torch(model, example_inputs), None, None
    except ImportError:  # pragma: no cover
        pass
    raise UsageError(f"convert takes an ONNX path, onnx.ModelProto, graphopt Graph or torch nn.Module, "
                     f"not {type(model).__name__}")


def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


def check_format(pipeline, fmt: str) -> None:
    """Refuse a pipeline/format pair that cannot work, before any work is done."""
    from graphopt.backends.lowering import check_format as format_takes

    quant = [p for p in pipeline if p.name == "quantize"]
    try:
        planned = [(f"the pipeline's {what}", q, kind) for p in quant for what, q, kind in p.planned_quantizers()]
    except GraphOptError as e:  # a spec string that does not parse is a bad option value
        raise UsageError(str(e)) from None
    format_takes(fmt, bool(quant), planned)


def _pipeline_text(pipeline, preset) -> str:
    from graphopt.pipeline import presets

    if pipeline is not None and preset is not None:
        raise UsageError("give pipeline= or preset=, not both")
    if preset is not None:
        pre = presets()
        if preset not in pre:
            import difflib

            near = difflib.get_close_matches(preset, list(pre), n=1)
            hint = f"; did you mean '{near[0]}'?" if near else f"; presets: {', '.join(pre)}"
            raise UsageError(f"unknown preset '{preset}'{hint}")
        return pre[preset][0]
    return pipeline if pipeline is not None else presets()["default"][0]


def _training(train):
    if train is None:
        return None
    from graphopt.passmanager import TrainingData

    if isinstance(train, TrainingData):
        return train
    if isinstance(train, (tuple, list)) and len(train) == 2:
        return TrainingData(*train)
    raise UsageError("train= takes TrainingData or an (inputs, labels) pair of arrays")


def convert(model, output: str | os.PathLike | None = None, *, pipeline: str | None = None,
            preset: str | None = None, calib: Any = None, train: Any = None, teacher: Any = None,
            format: str | None = None, example_inputs: Any = None, report_samples: int = 32, kernels: bool = True,
            verify_each: bool = False, external_data: bool | None = None, progress: bool | None = None,
            device: str | None = None, accuracy_level: int = 0) -> Report:
    """Compress ``model`` with ``pipeline`` (a pipeline string) or ``preset`` (a preset name; the
    ``default`` preset when neither is given) and write it to ``output`` in ``format`` ("float",
    "qdq" or "qoperator"; by default "qdq" when the pipeline quantizes, else "float"); return the
    ``Report``.

    ``model``: an ONNX path, ``onnx.ModelProto``, ``Graph``, ``nn.Module`` (with
    ``example_inputs``), or a ``.pt``/``MODULE:CALLABLE`` path (with ``example_inputs``).
    ``calib``: calibration inputs (an array, a dict of arrays, a ``CalibrationData``, or a path
    to a .npy/.npz file or an image folder as the CLI takes). ``train``: ``TrainingData`` or an
    ``(inputs, labels)`` pair for training steps; ``teacher``: a model to distill from. With
    ``output=None`` nothing is written (the report still lowers the model to measure it).
    ``kernels=False`` skips the onnxruntime kernel check and the per-layer SQNR. ``device``:
    where calibration and training steps run (auto, cpu, cuda, cuda:N, mps). ``accuracy_level``:
    written into every ``MatMulNBits`` (qoperator; 0 = float activations, 4 = int8, faster).
    The input is never changed. Errors are ``GraphOptError`` subclasses with a one-line cause.
    """
    from graphopt.passmanager import Context
    from graphopt.pipeline import parse_pipeline

    parsed = parse_pipeline(_pipeline_text(pipeline, preset))  # a wrong pipeline fails before any work
    if format is None:
        format = "qdq" if any(p.name == "quantize" for p in parsed) else "float"
    if format not in FORMATS:
        raise UsageError(f"unknown format '{format}'; formats: {', '.join(FORMATS)}")
    check_format(parsed, format)
    from graphopt.backends.lowering import check_accuracy_level

    check_accuracy_level(accuracy_level)  # before any work
    if output is not None:
        _check_output(model, output)
    t0 = time.perf_counter()
    graph, name, nbytes = _graph_of(model, example_inputs)
    if isinstance(calib, (str, os.PathLike)):
        from graphopt.training.calibration import CalibrationData

        calib = CalibrationData(str(calib))
    if calib is not None:
        from graphopt.training.calibration import CalibrationData

        data = calib if isinstance(calib, CalibrationData) else CalibrationData(calib)
        data.check_against(graph)
    t_teacher = None
    if teacher is not None:
        t_teacher = _graph_of(teacher, example_inputs)[0]
    ctx = Context(calib=calib, train=_training(train), teacher=t_teacher, progress=progress, device=device)
    return run(graph, parsed, ctx, output, format, input_name=name, input_bytes=nbytes,
               load_s=time.perf_counter() - t0, report_samples=report_samples, kernels=kernels,
               verify_each=verify_each, external_data=external_data, accuracy_level=accuracy_level)


def _check_output(model, output) -> None:
    """Refuse to overwrite the input model or to write into a missing folder."""
    out = Path(output)
    if isinstance(model, (str, os.PathLike)) and Path(model).exists() and out.exists():
        if os.path.samefile(model, out):
            raise UsageError(f"output {out} is the input model; refusing to overwrite it")
    if not out.parent.exists():
        raise GraphOptError(f"{out}: folder {out.parent} does not exist")
