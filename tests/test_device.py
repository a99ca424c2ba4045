"""The device and amp options of training steps (graphopt.training.device), tested on the CPU."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from nets import build, export
from test_qat import _export_vs_training, _qat

from graphopt.backends.torch_module import as_float32
from graphopt.errors import GraphOptError
from graphopt.training.device import check_amp, resolve_device, to_cpu

NO_CUDA = not torch.cuda.is_available()


def test_auto_is_cuda_when_torch_sees_a_gpu_else_the_cpu():
    assert resolve_device("auto").type == ("cpu" if NO_CUDA else "cuda")
    assert resolve_device("CPU") == torch.device("cpu") and resolve_device(None).type in ("cpu", "cuda")


@pytest.mark.skipif(not NO_CUDA, reason="this machine has a GPU: the refusal needs one without")
def test_a_device_this_machine_lacks_is_refused_in_one_line():
    for spec, words in (("cuda", "has no CUDA device here"), ("cuda:3", "has no CUDA device here"),
                        ("mps", "no Apple-silicon")):
        with pytest.raises(GraphOptError, match=words):
            resolve_device(spec)
    with pytest.raises(GraphOptError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    with pytest.raises(GraphOptError, match="amp=fp16 needs a GPU"):
        check_amp("fp16", torch.device("cpu"))
    with pytest.raises(GraphOptError, match="unknown amp"):
        check_amp("fp8", torch.device("cpu"))


def test_fake_quant_inputs_are_float32_under_autocast():
    x = torch.randn(4, dtype=torch.bfloat16)
    assert as_float32(x).dtype == torch.float32 and as_float32(torch.arange(3)).dtype == torch.int64
    assert to_cpu({"a": torch.ones(2), "b": 3})["a"].device.type == "cpu"
    nested = to_cpu({"state": {0: {"momentum_buffer": torch.ones(2)}}, "param_groups": [{"params": [0]}]})
    assert isinstance(nested["state"][0]["momentum_buffer"], torch.Tensor) and nested["param_groups"][0]["params"] == [0]


def test_qat_under_bf16_autocast_trains_and_exports_what_it_trained():
    pipe = ("canonicalize,fold-bn,quantize{weights=int4:channel,acts=uint8:tensor,qat=lsq},"
            "finetune{epochs=2,batch_size=32,lr=0.01,teacher=none,kd_weight=0,device=cpu,amp=%s}")
    g16, xs, r16 = _qat(pipe % "bf16")
    g32, _, r32 = _qat(pipe % "off")
    st = r16.stats["finetune"][0]
    assert r16.stats["finetune"][0]["modified"] and st.get("amp", "bf16") == "bf16"
    # bf16 forward passes: the weights train, but not along exactly the float32 path
    w16 = [g16.const_value(n.inputs[0]) for n in g16.nodes if n.op_type == "FakeQuant" and n.attr("kind") == "weight"]
    w32 = [g32.const_value(n.inputs[0]) for n in g32.nodes if n.op_type == "FakeQuant" and n.attr("kind") == "weight"]
    assert any(not np.array_equal(a, b) for a, b in zip(w16, w32))
    got, sim = _export_vs_training(g16, xs)  # the export equals the trained model (evaluated in float32)
    assert (got.argmax(1) == sim.argmax(1)).mean() >= 0.999


def test_cli_finetune_refuses_a_missing_device_before_training(tmp_path):
    if not NO_CUDA:
        pytest.skip("this machine has a GPU")
    model, x = build("mlp")
    p = tmp_path / "m.onnx"
    p.write_bytes(export(model, x).SerializeToString())
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", np.zeros(len(x), np.int64))
    r = subprocess.run([sys.executable, "-m", "graphopt.cli", "finetune", str(p), "-o", str(tmp_path / "o.onnx"),
                        "--data", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "y.npy"), "--device", "cuda",
                        "--batch-size", "2"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "has no CUDA device here" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o.onnx").exists()


def test_fake_quant_rounds_in_float32_inside_autocast():
    import graphopt

    g, xs, _ = _qat("canonicalize,fold-bn,quantize{weights=int4:channel,acts=uint8:tensor,qat=lsq}")
    fq = g.outputs[0].producer  # the output's activation quantizer
    step = float(np.asarray(g.const_value(fq.inputs[1])).reshape(-1)[0])
    zp = float(np.asarray(g.const_value(fq.inputs[2])).reshape(-1)[0]) if len(fq.inputs) > 2 else 0.0
    m = graphopt.to_torch(g)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(torch.from_numpy(xs[:64]))
    assert out.dtype == torch.float32
    codes = out.numpy() / step + zp
    assert np.abs(codes - np.round(codes)).max() < 1e-3  # on the grid: the rounding ran in float32


def test_the_context_device_is_where_calibration_runs(monkeypatch):
    from graphopt.training import calibration, device

    seen = []
    real = calibration.calibration_device if hasattr(calibration, "calibration_device") else device.calibration_device

    def spy():
        d = real()
        seen.append(d)
        return d

    monkeypatch.setattr(device, "calibration_device", spy)
    g, xs, _ = _qat("canonicalize,fold-bn")
    from graphopt.passmanager import Context, PassManager

    PassManager("quantize").run(g.copy(), Context(calib=xs[:32], device="cpu"))
    assert seen and all(d.type == "cpu" for d in seen)
    if NO_CUDA:
        with pytest.raises(GraphOptError, match="has no CUDA device here"):
            PassManager("quantize").run(g.copy(), Context(calib=xs[:32], device="cuda"))


def test_scans_run_where_the_calibration_device_says(monkeypatch, tmp_path):
    """analyze's sweeps (graphopt.scan) follow --device: tensors on that device, the refusal
    of a device this machine lacks in one line."""
    from graphopt.scan import Scan
    from graphopt.training import device

    model, x = build("resnet", 0)
    g, _, _ = _qat("canonicalize,fold-bn")
    xs = np.random.default_rng(0).standard_normal((8,) + tuple(x.shape[1:])).astype(np.float32)
    with device.calibrating_on("cpu"):
        scan = Scan(g, xs)
    assert scan.device.type == "cpu" and all(b[0].device.type == "cpu" for b in scan.batches)
    seen = []
    monkeypatch.setattr(device, "_CALIBRATION", [torch.device("cpu")])
    real = device.calibration_device
    monkeypatch.setattr(device, "calibration_device", lambda: seen.append(1) or real())
    Scan(g, xs)
    assert seen  # the scan asked the owner where to run
    path = tmp_path / "m.onnx"
    path.write_bytes(export(model, x, fold=False).SerializeToString())
    np.save(tmp_path / "c.npy", xs)
    if NO_CUDA:
        r = subprocess.run([sys.executable, "-m", "graphopt.cli", "analyze", "blocks", str(path), "--calib",
                            str(tmp_path / "c.npy"), "--device", "cuda"], capture_output=True, text=True, timeout=300)
        assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1 and "no CUDA device" in r.stderr


def test_the_gpu_check_script_runs_every_step_on_the_cpu(tmp_path):
    """tools/gpu_check.py is what a GPU machine runs as is; here it runs on the CPU, small, so an
    API it calls cannot drift away from it unseen. Every step must print PASS and the run exit 0."""
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "tools" / "gpu_check.py"
    r = subprocess.run([sys.executable, str(script), "--device", "cpu", "--images", "256", "--cpu-steps", "2"],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith(("PASS", "FAIL"))]
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # finetune and QAT at amp off and bf16, gradual, columns, lottery, resume, sweeps, timing
    assert len(lines) == 10 and all(ln.startswith("PASS") for ln in lines), r.stdout
    assert r.stdout.rstrip().splitlines()[-1] == "10 of 10 passed"
