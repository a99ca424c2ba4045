"""The one-call API (graphopt.convert) and its Report: what the CLI prints and --report-json writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from nets import build, export, rel_err, run_ort

import graphopt
from graphopt.api import SCHEMA, Report
from graphopt.errors import GraphOptError, UsageError


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("api")
    net, x = build("mobilenetv2")
    proto = export(net, x, fold=False)
    p = d / "m.onnx"
    p.write_bytes(proto.SerializeToString())
    np.save(d / "calib.npy", x)
    return p, proto, x, net


def _stable(d: dict) -> dict:
    """A report's dict without what differs from run to run (times, paths)."""
    d = json.loads(json.dumps(d))
    for k in ("timings", "input", "output"):
        d.pop(k)
    for p in d["passes"]:
        p.pop("seconds")
    return d


def test_convert_onnx_path_writes_a_model_and_a_report(model, tmp_path):
    p, proto, x, _ = model
    before = p.read_bytes()
    out = tmp_path / "q.onnx"
    rep = graphopt.convert(str(p), out, preset="int8", calib=x)
    assert isinstance(rep, Report) and p.read_bytes() == before  # the input is untouched
    assert out.is_file() and rel_err(run_ort(onnx.load(out), x), run_ort(proto, x)) < 0.1
    d = rep.to_dict()
    assert d["schema"] == SCHEMA and d["graphopt"] == graphopt.__version__
    assert [s["name"] for s in d["passes"]] == ["canonicalize", "fold-bn", "quantize"]
    assert d["before"]["nodes"] > 0 and d["after"]["params"] > 0
    assert d["sizes"]["output_bytes"] == out.stat().st_size and d["sizes"]["input_bytes"] == len(before)
    q = d["quantization"]
    assert q["quantized_initializers"] > 0 and q["activation_quantizers"] > 0
    assert q["ort_kernels"]["float"] == [] and sum(q["ort_kernels"]["integer"].values()) > 0
    assert q["sqnr_samples"] == len(x) and all(v > 10 for v in q["sqnr_db"].values())
    assert json.loads(rep.to_json()) == d  # JSON as such: no NaN, no numpy
    text = rep.summary()
    assert "every Conv/Gemm/MatMul runs as an integer kernel" in text and "worst layers by SQNR" in text


def test_cli_report_json_equals_the_api_report(model, tmp_path):
    p, _, x, _ = model
    js, out = tmp_path / "r.json", tmp_path / "c.onnx"
    r = subprocess.run([sys.executable, "-m", "graphopt.cli", "convert", str(p), "-o", str(out), "--preset", "int8",
                        "--calib", str(p.parent / "calib.npy"), "--format", "qdq", "--report-json", str(js)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    cli = json.loads(js.read_text())
    api = graphopt.convert(p, tmp_path / "a.onnx", preset="int8", calib=x).to_dict()
    assert _stable(cli) == _stable(api)
    assert cli["input"] == str(p) and cli["output"] == str(out)
    # the printed summary is the report's text
    assert r.stdout.strip().splitlines()[1] == f"pipeline: {cli['pipeline']}"


def test_convert_module_without_output_writes_nothing(model, tmp_path, monkeypatch):
    _, _, x, net = model
    monkeypatch.chdir(tmp_path)
    rep = graphopt.convert(net, preset="int8", calib=x, example_inputs=torch.from_numpy(x[:1]), kernels=False)
    assert list(tmp_path.iterdir()) == [] and rep.output is None
    assert rep.sizes["output_bytes"] > 0 and rep.quantization["ort_kernels"] is None
    assert rep.graph is not None and rep.graph.num_params() == rep.after["params"]


def test_convert_graph_and_modelproto_leave_the_caller_s_model_alone(model, tmp_path):
    p, proto, x, _ = model
    g = graphopt.load_onnx(str(p))
    n = len(g)
    snapshot = proto.SerializeToString()
    r1 = graphopt.convert(g, tmp_path / "g.onnx", pipeline="canonicalize,fold-bn", format="float")
    r2 = graphopt.convert(proto, tmp_path / "p.onnx", pipeline="canonicalize,fold-bn", format="float")
    assert len(g) == n and proto.SerializeToString() == snapshot
    assert r1.quantization is None and r1.after["nodes"] == r2.after["nodes"] < n
    assert rel_err(run_ort(onnx.load(tmp_path / "g.onnx"), x), run_ort(proto, x)) < 1e-4


def test_warnings_are_in_the_report(model, tmp_path):
    p, _, x, _ = model
    rep = graphopt.convert(p, tmp_path / "w.onnx", pipeline="canonicalize,fold-bn,quantize{skip=[nosuchlayer]}",
                           calib=x, kernels=False)
    assert any("nosuchlayer" in w for w in rep.warnings), rep.warnings
    assert "nosuchlayer" in rep.summary()


@pytest.mark.parametrize("kw, exc, words", [
    ({"preset": "int9"}, UsageError, "did you mean 'int8'"),
    ({"preset": "int8", "pipeline": "canonicalize"}, UsageError, "not both"),
    ({"pipeline": "canonicalize,nosuchpass"}, GraphOptError, "nosuchpass"),
    ({"format": "int3"}, UsageError, "unknown format"),
    ({"preset": "int8", "calib": np.zeros((2, 5), np.float32)}, GraphOptError, "shape"),
])
def test_bad_arguments_fail_with_one_line_and_write_nothing(model, tmp_path, kw, exc, words):
    p, _, _, _ = model
    out = tmp_path / "bad.onnx"
    with pytest.raises(exc) as e:
        graphopt.convert(p, out, **kw)
    assert words in str(e.value) and "\n" not in str(e.value)
    assert not out.exists()


def test_bad_models_and_outputs(model, tmp_path):
    p, _, x, net = model
    with pytest.raises(UsageError, match="example_inputs"):
        graphopt.convert(net, tmp_path / "m.onnx")
    with pytest.raises(UsageError, match="not int"):
        graphopt.convert(3, tmp_path / "m.onnx")
    with pytest.raises(GraphOptError, match="no such file"):
        graphopt.convert(tmp_path / "missing.onnx", tmp_path / "m.onnx")
    with pytest.raises(UsageError, match="refusing to overwrite"):
        graphopt.convert(p, p)
    with pytest.raises(GraphOptError, match="does not exist"):
        graphopt.convert(p, tmp_path / "nodir" / "m.onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model at all")
    with pytest.raises(GraphOptError):
        graphopt.convert(garbage, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_the_deployment_example_ships_or_refuses(model, tmp_path):
    p, proto, x, _ = model
    xe = np.random.default_rng(1).normal(size=(32,) + x.shape[1:]).astype(np.float32)
    np.save(tmp_path / "xe.npy", xe)
    np.save(tmp_path / "ye.npy", run_ort(proto, xe).argmax(1))  # labels: FP32's own answers (top-1 100)
    example = os.path.join(os.path.dirname(__file__), "..", "examples", "deploy_step.py")

    def step(out, *gates):
        return subprocess.run([sys.executable, example, str(p), "--calib", str(p.parent / "calib.npy"), "--eval",
                               str(tmp_path / "xe.npy"), str(tmp_path / "ye.npy"), "--out", str(out), *gates],
                              capture_output=True, text=True, timeout=300)

    ok = step(tmp_path / "dist", "--max-drop", "60")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    rep = json.loads((tmp_path / "dist" / "report.json").read_text())
    assert rep["schema"] == SCHEMA and all(g["ok"] for g in rep["gates"].values())
    assert rep["gates"]["top1_drop"]["fp32"] == 100.0
    assert (tmp_path / "dist" / "model.onnx").stat().st_size == rep["sizes"]["output_bytes"]
    refused = step(tmp_path / "refused", "--max-mb", "0.0001", "--max-drop", "60")
    assert refused.returncode == 1 and "FAIL size_mb" in refused.stdout
    assert not (tmp_path / "refused").exists()
