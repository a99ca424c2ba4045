import os
import subprocess
import sys

import numpy as np
import pytest
from nets import build, export, rel_err, run_ort

from graphopt import load_onnx


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "graphopt.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("m")
    model, x = build("mobilenetv2")
    proto = export(model, x, fold=False)
    p = d / "m.onnx"
    p.write_bytes(proto.SerializeToString())
    np.save(d / "calib.npy", x)
    return p, proto, x


def test_convert_ok(model_file, tmp_path):
    p, proto, x = model_file
    out = tmp_path / "o.onnx"
    r = cli("convert", p, "-o", out, "--pipeline", "canonicalize", "--verify-each", "--timing")
    assert r.returncode == 0, r.stderr
    assert "pipeline: canonicalize" in r.stdout and "nodes" in r.stdout
    assert rel_err(run_ort(str(out), x), run_ort(proto, x)) <= 1e-5
    assert len(load_onnx(out)) < len(load_onnx(p))


def test_convert_preset_and_calib(model_file, tmp_path):
    p, proto, x = model_file
    r = cli("convert", p, "-o", tmp_path / "o.onnx", "--preset", "clean", "--calib", p.parent / "calib.npy")
    assert r.returncode == 0, r.stderr


def _one_line_error(r, pattern, rc=1):
    """One line on stderr naming the cause; rc 2 for a usage error (a wrong command line)."""
    assert r.returncode == rc, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr and pattern in lines[0], lines[0]


def test_missing_file(tmp_path):
    out = tmp_path / "o.onnx"
    _one_line_error(cli("convert", tmp_path / "nope.onnx", "-o", out), "no such file")
    assert not out.exists()


def test_corrupt_file(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(os.urandom(2048))
    out = tmp_path / "o.onnx"
    _one_line_error(cli("convert", bad, "-o", out), "not a valid ONNX file")
    assert sorted(x.name for x in tmp_path.iterdir()) == ["bad.onnx"]


def test_unknown_pass(model_file, tmp_path):
    out = tmp_path / "o.onnx"
    _one_line_error(cli("convert", model_file[0], "-o", out, "--pipeline", "canonicalize,fold-constant"),
                    "unknown pass 'fold-constant'; did you mean 'fold-constants'", rc=2)
    assert not out.exists()


def test_bad_option_value(model_file, tmp_path):
    out = tmp_path / "o.onnx"
    _one_line_error(cli("convert", model_file[0], "-o", out, "--pipeline", "fold-constants{max_elements=lots}"),
                    "expects an integer, got 'lots'", rc=2)
    assert not out.exists()


def test_missing_and_mismatched_calib(model_file, tmp_path):
    p = model_file[0]
    _one_line_error(cli("convert", p, "-o", tmp_path / "o.onnx", "--calib", tmp_path / "c.npy"),
                    "calibration file not found")
    np.save(tmp_path / "wrong.npy", np.zeros((2, 3, 8, 8), np.float32))
    _one_line_error(cli("convert", p, "-o", tmp_path / "o.onnx", "--calib", tmp_path / "wrong.npy"),
                    "calibration samples have shape [3, 8, 8] (batch excluded), but model input 'input' is [batch,3,16,16]")
    assert not (tmp_path / "o.onnx").exists()


def test_unknown_preset_and_qdq_without_quantize(model_file, tmp_path):
    _one_line_error(cli("convert", model_file[0], "-o", tmp_path / "o.onnx", "--preset", "defualt"),
                    "did you mean 'default'", rc=2)
    _one_line_error(cli("convert", model_file[0], "-o", tmp_path / "o.onnx", "--format", "qdq"),
                    "needs a quantized graph: add 'quantize' to the pipeline")


def test_usage_errors_exit_2(tmp_path):
    r = cli("convert", "x.onnx")  # no -o
    assert r.returncode == 2 and "usage error" in r.stderr
    r = cli("frobnicate")
    assert r.returncode == 2
    r = cli("convert", "a.onnx", "-o", "b.onnx", "--format", "int3")
    assert r.returncode == 2


def test_debug_shows_traceback(tmp_path):
    r = cli("--debug", "convert", tmp_path / "nope.onnx", "-o", tmp_path / "o.onnx")
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_passes_inspect_version(model_file):
    r = cli("passes")
    assert r.returncode == 0
    for name in ("canonicalize", "fold-constants", "remove-identity", "eliminate-dead", "simplify", "presets:"):
        assert name in r.stdout
    assert "max_elements: int = 1048576" in r.stdout
    r = cli("inspect", model_file[0])
    assert r.returncode == 0 and "Conv" in r.stdout and "total:" in r.stdout and "MACs" in r.stdout
    r = cli("--version")
    assert r.returncode == 0 and r.stdout.startswith("graphopt ")


def test_effnet_cli_convert_matches_on_real_images(effnet_path, tmp_path):
    folder = effnet_path.parents[1] / "data" / "imagenet-sample"
    files = sorted(folder.glob("*.JPEG"))[:8]
    if not files:
        pytest.skip("imagenet-sample not present")
    from graphopt.training.data import load_image_batch
    x = load_image_batch(files, resize=256, crop=224, mean=(0.5,) * 3, std=(0.5,) * 3)
    out = tmp_path / "out.onnx"
    r = cli("convert", effnet_path, "-o", out)
    assert r.returncode == 0, r.stderr
    assert rel_err(run_ort(str(out), x), run_ort(str(effnet_path), x)) <= 1e-5


FACTORY = '''
import torch
from torch import nn

def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU6(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))

def not_a_module():
    return 3
'''


def test_convert_torch_factory_with_weights(tmp_path):
    import torch

    (tmp_path / "mymodel.py").write_text(FACTORY)
    ns: dict = {}
    exec(FACTORY, ns)
    model = ns["make"]()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    out = tmp_path / "o.onnx"
    r = cli("convert", f"{tmp_path / 'mymodel.py'}:make", "--input-shape", "1,3,8,8", "--weights", tmp_path / "w.pt",
            "-o", out)
    assert r.returncode == 0, r.stderr
    x = np.random.default_rng(0).standard_normal((3, 3, 8, 8)).astype(np.float32)
    with torch.no_grad():
        ref = model.eval()(torch.from_numpy(x)).numpy()
    assert rel_err(run_ort(str(out), x), ref) <= 1e-5
    # errors
    _one_line_error(cli("convert", f"{tmp_path / 'mymodel.py'}:make", "-o", out), "--input-shape is required", rc=2)
    _one_line_error(cli("convert", f"{tmp_path / 'mymodel.py'}:not_a_module", "--input-shape", "1,3,8,8", "-o", out),
                    "not an nn.Module")
    _one_line_error(cli("convert", f"{tmp_path / 'mymodel.py'}:nope", "--input-shape", "1,3,8,8", "-o", out),
                    "has no callable 'nope'")
    _one_line_error(cli("convert", f"{tmp_path / 'mymodel.py'}:make", "--input-shape", "1,5,8,8", "-o", out),
                    "rejects example input")


def test_convert_torchscript_and_refuse_pickled_module(tmp_path):
    import torch

    model, x = build("resnet")
    torch.jit.save(torch.jit.trace(model, torch.from_numpy(x)), tmp_path / "m.pt")
    out = tmp_path / "o.onnx"
    r = cli("convert", tmp_path / "m.pt", "--input-shape", "2,3,16,16", "-o", out)
    assert r.returncode == 0, r.stderr
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    assert rel_err(run_ort(str(out), x), ref) <= 1e-5
    torch.save(model, tmp_path / "pickled.pt")  # a whole pickled module: must not be unpickled
    _one_line_error(cli("convert", tmp_path / "pickled.pt", "--input-shape", "2,3,16,16", "-o", tmp_path / "p.onnx"),
                    "not a TorchScript archive")
    assert not (tmp_path / "p.onnx").exists()


def test_demo_runs_end_to_end(tmp_path):
    r = cli("demo", "-o", tmp_path / "demo.onnx")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "demo.onnx").is_file() and (tmp_path / "demo.int8.onnx").is_file()
    assert "0 Conv/Gemm left in float" in r.stdout and "relative error" in r.stdout


def test_prune_then_quantize_in_one_pipeline(tmp_path):
    """The issue's composition: prune, fold, then quantize, written as integer QDQ ONNX."""
    import onnx

    model, x = build("mobilenetv2")
    p = tmp_path / "m.onnx"
    p.write_bytes(export(model, x, fold=False).SerializeToString())
    calib = np.random.default_rng(0).standard_normal((32,) + x.shape[1:]).astype(np.float32)
    np.save(tmp_path / "c.npy", calib)
    prune = "canonicalize,fold-bn,prune-channels{ratio=0.25,round_to=4},fold-prune"
    r = cli("convert", p, "-o", tmp_path / "f.onnx", "--pipeline", prune)
    assert r.returncode == 0, r.stderr
    r = cli("convert", p, "-o", tmp_path / "q.onnx", "--pipeline", prune + ",quantize{weights=int8:channel}",
            "--calib", tmp_path / "c.npy", "--format", "qdq")
    assert r.returncode == 0, r.stderr
    q = onnx.load(tmp_path / "q.onnx")
    int8_weights = sum(int(np.prod(t.dims)) for t in q.graph.initializer if t.data_type == onnx.TensorProto.INT8)
    assert 0 < int8_weights < load_onnx(p).num_params() * 0.9  # the integer weights are the pruned ones
    assert rel_err(run_ort(str(tmp_path / "q.onnx"), calib), run_ort(str(tmp_path / "f.onnx"), calib)) <= 0.1


@pytest.mark.parametrize("fmt", ["npz", "safetensors"])
def test_weights_from_npz_and_safetensors(tmp_path, fmt):
    import torch

    (tmp_path / "mymodel.py").write_text("import torch\ndef make():\n    torch.manual_seed(1)\n"
                                         "    return torch.nn.Sequential(torch.nn.Linear(4, 3))\n")
    torch.manual_seed(7)
    trained = torch.nn.Sequential(torch.nn.Linear(4, 3))
    sd = {k: v.detach() for k, v in trained.state_dict().items()}
    w = tmp_path / f"w.{fmt}"
    if fmt == "npz":
        np.savez(w, **{k: v.numpy() for k, v in sd.items()})
    else:
        safetensors_torch = pytest.importorskip("safetensors.torch")
        safetensors_torch.save_file(sd, str(w))
    out = tmp_path / "o.onnx"
    r = cli("convert", f"{tmp_path / 'mymodel.py'}:make", "--input-shape", "2,4", "--weights", w, "-o", out)
    assert r.returncode == 0, r.stderr
    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    np.testing.assert_allclose(run_ort(str(out), x), trained(torch.from_numpy(x)).detach().numpy(), rtol=1e-5,
                               atol=1e-6)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    _one_line_error(cli("convert", f"{tmp_path / 'mymodel.py'}:make", "--input-shape", "2,4", "--weights",
                        tmp_path / "bad.npz", "-o", out), "not a readable .npz")


def test_zoo_schemes_from_the_cli(model_file, tmp_path):
    p, proto, x = model_file
    out = tmp_path / "apot.onnx"
    r = cli("convert", p, "-o", out, "--pipeline", "canonicalize,fold-bn,quantize{weights=apot4:channel}",
            "--calib", p.parent / "calib.npy", "--format", "qoperator")
    assert r.returncode == 0, r.stderr
    assert "apot" in r.stdout  # the report names the scheme
    assert rel_err(run_ort(str(out), x), run_ort(proto, x)) < 0.5
    r = cli("convert", p, "-o", tmp_path / "pw.onnx", "--pipeline", "quantize{weights=pwlq4}",
            "--calib", p.parent / "calib.npy", "--format", "qdq")
    assert r.returncode == 0, r.stderr
    assert "simulated in float" in r.stdout and "pwlq" in r.stdout
    bad = tmp_path / "bad.onnx"
    r = cli("convert", p, "-o", bad, "--pipeline", "quantize{weights=term4:g8:t3}", "--calib", p.parent / "calib.npy")
    _one_line_error(r, "term budget t3 is below the group size g8", rc=2)
    assert not bad.exists()


def test_eval_labels_are_validated_like_training_labels(model_file, tmp_path):
    """--eval goes through the CLI's one labels loader: 1-D integers, one per calibration sample used."""
    p, _, x = model_file
    calib = p.parent / "calib.npy"
    np.save(tmp_path / "short.npy", np.zeros(len(x) - 1, np.int64))
    _one_line_error(cli("analyze", "blocks", p, "--calib", calib, "--eval", tmp_path / "short.npy"),
                    f"has {len(x)} samples but {tmp_path / 'short.npy'} has {len(x) - 1} labels")
    np.save(tmp_path / "float.npy", np.zeros(len(x), np.float32))
    _one_line_error(cli("analyze", "sensitivity", p, "--calib", calib, "--eval", tmp_path / "float.npy"),
                    "labels must be a 1-D integer array, not float32")
    _one_line_error(cli("analyze", "bits", p, "--calib", calib, "--eval", tmp_path / "none.npy"),
                    "labels file not found")
    np.save(tmp_path / "long.npy", np.zeros(len(x) + 5, np.int64))  # more labels than samples: the first ones
    r = cli("analyze", "blocks", p, "--calib", calib, "--eval", tmp_path / "long.npy")
    assert r.returncode == 0 and "intact model: top-1" in r.stdout, r.stderr
