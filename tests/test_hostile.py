"""Hostile and malformed input: each case gets a one-line error that names the cause, a non-zero
exit, no output file, and its inputs untouched. Ends with a bounded fuzz test."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt import FrontendError, GraphOptError, PassError, PipelineError
from graphopt.passmanager import Context, PassManager
from graphopt.pipeline import parse_pipeline


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "graphopt.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def one_line_error(r, *needles):
    assert r.returncode != 0, r.stdout
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    assert "internal error" not in lines[0] and "Traceback" not in r.stderr


def _conv_model(**conv_attrs) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    attrs = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], **conv_attrs}
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="conv", **attrs)], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "C", "H", "W"])], [w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _save(model, path):
    path.write_bytes(model.SerializeToString())
    return path


def _external(t: onnx.TensorProto, location: str, offset="0", length=None):
    t.data_location = TensorProto.EXTERNAL
    t.ClearField("raw_data")
    t.ClearField("float_data")
    for k, v in (("location", location), ("offset", offset)) + ((("length", length),) if length else ()):
        t.external_data.append(onnx.StringStringEntryProto(key=k, value=v))
    return t


# ------------------------------------------------------------------ 1. external data is confined
def _constant_model(location: str) -> onnx.ModelProto:
    val = _external(numpy_helper.from_array(np.zeros(4, np.float32), "c"), location)
    g = helper.make_graph([helper.make_node("Constant", [], ["c"], name="k", value=val),
                           helper.make_node("Add", ["x", "c"], ["y"], name="add")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_constant_external_data_is_confined_to_the_model_folder(tmp_path, monkeypatch):
    secret = np.arange(4, dtype=np.float32) + 42
    (tmp_path / "secret.bin").write_bytes(secret.tobytes())
    folder = tmp_path / "model"
    folder.mkdir()
    monkeypatch.chdir(tmp_path)  # the secret sits in the current directory: it must not be read
    p = _save(_constant_model("secret.bin"), folder / "m.onnx")
    with pytest.raises(FrontendError, match="does not exist"):
        graphopt.load_onnx(p)
    p = _save(_constant_model("../secret.bin"), folder / "m.onnx")
    with pytest.raises(FrontendError, match="escapes the model folder"):
        graphopt.load_onnx(p)
    (folder / "ok.bin").write_bytes(secret.tobytes())  # inside the folder: read, and the output is whole
    g = graphopt.load_onnx(_save(_constant_model("ok.bin"), folder / "m.onnx"))
    (k,) = [n for n in g.nodes if n.op_type == "Constant"]
    np.testing.assert_array_equal(k.attrs["value"], secret)


def test_subgraph_and_sparse_external_data_are_confined(tmp_path):
    inner_init = _external(numpy_helper.from_array(np.zeros(2, np.float32), "t"), "../../etc/passwd")
    then_g = helper.make_graph([helper.make_node("Identity", ["t"], ["o"])], "then", [],
                               [helper.make_tensor_value_info("o", TensorProto.FLOAT, [2])], [inner_init])
    else_g = helper.make_graph([helper.make_node("Constant", [], ["o"], value=numpy_helper.from_array(
        np.ones(2, np.float32), "v"))], "else", [], [helper.make_tensor_value_info("o", TensorProto.FLOAT, [2])])
    g = helper.make_graph([helper.make_node("If", ["b"], ["y"], name="if", then_branch=then_g, else_branch=else_g)],
                          "g", [helper.make_tensor_value_info("b", TensorProto.BOOL, [])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    p = _save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "if.onnx")
    with pytest.raises(FrontendError, match="escapes the model folder"):
        graphopt.load_onnx(p)
    sp = helper.make_sparse_tensor(_external(numpy_helper.from_array(np.ones(1, np.float32), "sv"), "/etc/passwd"),
                                   numpy_helper.from_array(np.array([0], np.int64), "si"), [3])
    g = helper.make_graph([helper.make_node("Constant", [], ["y"], name="sc", sparse_value=sp)], "g", [],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])])
    p = _save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "sp.onnx")
    with pytest.raises(FrontendError, match="absolute path"):
        graphopt.load_onnx(p)


# ------------------------------------------------------------------ 2-4. outputs never clobber inputs
def test_outputs_never_overwrite_inputs(tmp_path):
    m = _save(_conv_model(), tmp_path / "m.onnx")
    before = m.read_bytes()
    one_line_error(cli("convert", m, "-o", m), "refusing to write -o over the input model", "--overwrite")
    link = tmp_path / "link.onnx"
    link.symlink_to(m)
    one_line_error(cli("convert", m, "-o", link), "refusing to write -o over the input model")
    hard = tmp_path / "hard.onnx"
    os.link(m, hard)
    one_line_error(cli("convert", hard, "-o", m), "refusing to write -o over the input model")
    assert m.read_bytes() == before
    calib = tmp_path / "c.npy"
    np.save(calib, np.zeros((2, 3, 8, 8), np.float32))
    cbytes = calib.read_bytes()
    one_line_error(cli("convert", m, "-o", calib, "--preset", "int8", "--calib", calib), "over --calib")
    assert calib.read_bytes() == cbytes
    r = cli("convert", m, "-o", m, "--overwrite")  # explicit: allowed
    assert r.returncode == 0, r.stderr
    one_line_error(cli("finetune", m, "-o", calib, "--data", calib), "over --data")


def test_external_data_output_is_all_or_nothing(tmp_path):
    m = _save(_conv_model(), tmp_path / "m.onnx")
    (tmp_path / "out.onnx").mkdir()
    one_line_error(cli("convert", m, "-o", tmp_path / "out.onnx", "--external-data"), "is a folder")
    assert not (tmp_path / "out.onnx.data").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "out.onnx"]  # no temp files either


def test_atomic_paths_undo_earlier_renames(tmp_path, monkeypatch):
    from graphopt import atomic

    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("old a")
    real = os.replace
    calls = []

    def flaky(src, dst):
        calls.append(dst)
        if str(dst) == str(b):
            raise OSError("disk full")
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", flaky)
    with pytest.raises(OSError, match="disk full"):
        with atomic.atomic_paths(a, b) as (ta, tb):
            open(ta, "w").write("new a")
            open(tb, "w").write("new b")
    monkeypatch.setattr(atomic.os, "replace", real)
    assert a.read_text() == "old a" and not b.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero")
def test_non_regular_files_are_refused(tmp_path):
    one_line_error(cli("convert", "/dev/zero", "-o", tmp_path / "o.onnx"), "not a regular file")
    m = _save(_conv_model(), tmp_path / "m.onnx")
    one_line_error(cli("convert", m, "-o", "/dev/null"), "not a regular file")


# ------------------------------------------------------------------ 5. invalid models are refused
@pytest.mark.parametrize("model,needle", [
    (lambda: _conv_model(group=0), "group must be a positive integer"),
    (lambda: _conv_model(group=2), "group"),
    (lambda: _conv_model(kernel_shape=[5, 5]), "kernel_shape [5, 5] does not match"),
    (lambda: _conv_model(strides=[0, 0]), "strides"),
    (lambda: _conv_model(auto_pad="FOO"), "auto_pad"),
])
def test_invalid_conv_attributes(model, needle, tmp_path):
    with pytest.raises(FrontendError, match=None) as e:
        graphopt.load_onnx(_save(model(), tmp_path / "m.onnx"))
    assert needle in str(e.value) and "\n" not in str(e.value)


def _conv_with(**kw):
    m = _conv_model()
    if "weight" in kw:
        m.graph.initializer[0].CopyFrom(numpy_helper.from_array(kw["weight"], "w"))
    if "dims" in kw:
        del m.graph.initializer[0].dims[:]
        m.graph.initializer[0].dims.extend(kw["dims"])
    if "input_type" in kw:
        m.graph.input[0].type.tensor_type.elem_type = kw["input_type"]
    if "dilations" in kw:
        m.graph.node[0].attribute.append(helper.make_attribute("dilations", kw["dilations"]))
    return m


@pytest.mark.parametrize("kw,needle", [
    ({"weight": np.ones((4, 3, 3, 3), np.int32)}, "invalid ONNX model"),
    ({"dilations": [1.0, 1.0]}, "dilations must be a list of integers"),
    ({"input_type": 99}, "data type 99"),
    ({"dims": [-1, 3, 3, 3]}, "negative dimension"),
    ({"weight": np.ones((4, 27), np.float32)}, "2-D weight"),
])
def test_invalid_models_are_refused_by_name(kw, needle, tmp_path):
    with pytest.raises(FrontendError) as e:
        graphopt.load_onnx(_save(_conv_with(**kw), tmp_path / "m.onnx"))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_invalid_models_checker_and_opset(tmp_path):
    g = helper.make_graph([helper.make_node("Frobnicate", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    p = _save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "u.onnx")
    with pytest.raises(FrontendError, match="No Op registered for Frobnicate"):
        graphopt.load_onnx(p)
    g = helper.make_graph([helper.make_node("Relu", ["x", "x", "x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    p = _save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "r.onnx")
    with pytest.raises(FrontendError, match="invalid ONNX model: .*input size 3"):
        graphopt.load_onnx(p)
    g = helper.make_graph([helper.make_node("Concat", ["x", "x"], ["y"], axis="1")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    p = _save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "c.onnx")
    with pytest.raises(FrontendError, match="Mismatched attribute type"):
        graphopt.load_onnx(p)
    m = _conv_model()
    m.opset_import[0].version = 1000000
    with pytest.raises(FrontendError, match="opset 1000000 is newer"):
        graphopt.load_onnx(_save(m, tmp_path / "o.onnx"))


# ------------------------------------------------------------------ 6-7. data, options, malformed tensors
def test_malformed_tensors_name_the_cause(tmp_path):
    m = _conv_model()
    m.graph.initializer[0].data_type = 999
    with pytest.raises(FrontendError, match="unknown data_type 999"):
        graphopt.load_onnx(_save(m, tmp_path / "a.onnx"))
    m = _conv_model()
    del m.graph.initializer[0].dims[:]
    m.graph.initializer[0].dims.extend([2 ** 40, 3, 3, 3])
    with pytest.raises(FrontendError, match="malformed|too short"):
        graphopt.load_onnx(_save(m, tmp_path / "b.onnx"))
    m = _conv_model()
    (tmp_path / "w.bin").write_bytes(np.zeros(108, np.float32).tobytes())
    _external(m.graph.initializer[0], "w.bin", offset="abc")
    with pytest.raises(FrontendError, match="non-integer offset"):
        graphopt.load_onnx(_save(m, tmp_path / "c.onnx"))


def test_bad_data_and_options(tmp_path):
    m = _save(_conv_model(), tmp_path / "m.onnx")
    nan = tmp_path / "nan.npy"
    np.save(nan, np.full((2, 3, 8, 8), np.nan, np.float32))
    one_line_error(cli("convert", m, "-o", tmp_path / "o.onnx", "--preset", "int8", "--calib", nan), "NaN or Inf")
    cplx = tmp_path / "c.npy"
    np.save(cplx, np.zeros((2, 3, 8, 8), np.complex64))
    one_line_error(cli("convert", m, "-o", tmp_path / "o.onnx", "--preset", "int8", "--calib", cplx), "complex64")
    good = tmp_path / "g.npy"
    np.save(good, np.zeros((2, 3, 8, 8), np.float32))
    for flags, needle in ((["--std", "0"], "--std must be positive"), (["--mean", "nan"], "finite"),
                          (["--mean", "0.5,0.5"], "takes 1 or 3 numbers")):
        r = cli("convert", m, "-o", tmp_path / "o.onnx", "--calib", tmp_path, *flags)
        one_line_error(r, needle)
        assert r.returncode == 2
    for flags in (["--calib-limit", "-1"], ["--resize", "0"]):
        r = cli("convert", m, "-o", tmp_path / "o.onnx", "--calib", good, *flags)
        assert r.returncode == 2 and "must be at least 1" in r.stderr
    one_line_error(cli("convert", m, "-o", tmp_path / "o.onnx", "--preset", ""), "unknown preset ''")
    r = cli("inspect", m, "--plot", "conv")
    one_line_error(r, "--plot goes with --ranges")
    assert r.returncode == 2
    one_line_error(cli("convert", m, "-o", tmp_path / "o.onnx", "--pipeline", "fold-bn,absorb-bias{source=data}"),
                   "needs calibration data")
    for bad in ("equalize{tol=nan}", "prune-blocks{target_macs=nan}", "quantize{percentile=nan}",
                "quantize{skip=" + "[" * 500 + "]}"):
        with pytest.raises(PipelineError):
            parse_pipeline(bad)
    r = cli("finetune", m, "-o", tmp_path / "o.onnx", "--data", good, "--epochs", "0")
    assert r.returncode == 2 and "must be at least 1" in r.stderr
    assert not (tmp_path / "o.onnx").exists()


def test_image_folders_are_searched_recursively(tmp_path):
    from PIL import Image

    from graphopt.training.data import list_images

    for sub, name in (("b", "2.png"), ("a", "1.png"), ("a/deeper", "0.jpg")):
        (tmp_path / sub).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4)).save(tmp_path / sub / name)
    assert [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)] == ["a/1.png", "a/deeper/0.jpg",
                                                                                   "b/2.png"]


# ------------------------------------------------------------------ fuzz
def test_fuzz_models_and_pipelines():
    """Seeded mutations, about 30 s: loading a mutated model and parsing a mutated pipeline either
    work or raise a GraphOptError; never another exception."""
    rng = np.random.default_rng(1234)
    base = _conv_model().SerializeToString()
    seeds = ["canonicalize,fold-bn,quantize{weights=int8:channel,skip=[a,b]}", "dfq", "prune-channels{ratio=0.3}"]
    deadline = time.monotonic() + 15
    n_models = n_pipes = 0
    while time.monotonic() < deadline:
        b = bytearray(base)
        for _ in range(int(rng.integers(1, 6))):
            i = int(rng.integers(0, len(b)))
            b[i] = int(rng.integers(0, 256))
        try:
            model = onnx.load_model_from_string(bytes(b))
        except Exception:
            continue  # not even protobuf: the CLI's reader turns this into an error of its own
        try:
            graphopt.load_onnx(model)
        except GraphOptError as e:
            assert str(e)
        n_models += 1
    deadline = time.monotonic() + 10
    alphabet = list("{}[],=\" abcdefxyz019.-") + ["nan", "inf", "int4", "quantize", "fold-bn"]
    while time.monotonic() < deadline:
        s = list(seeds[int(rng.integers(0, len(seeds)))])
        for _ in range(int(rng.integers(1, 5))):
            i = int(rng.integers(0, len(s) + 1))
            op = rng.integers(0, 3)
            tok = alphabet[int(rng.integers(0, len(alphabet)))]
            if op == 0:
                s.insert(i, tok)
            elif op == 1 and s:
                del s[min(i, len(s) - 1)]
            elif s:
                s[min(i, len(s) - 1)] = tok
        try:
            parse_pipeline("".join(s))
        except GraphOptError:
            pass
        n_pipes += 1
    assert n_models > 50 and n_pipes > 500


def test_debug_and_verbose_after_the_subcommand(tmp_path):
    m = _save(_conv_model(), tmp_path / "m.onnx")
    r = cli("convert", m, "-o", tmp_path / "o.onnx", "--pipeline", "quantize", "--debug")
    assert r.returncode == 1 and "Traceback" in r.stderr  # --debug after convert shows the traceback
    r = cli("convert", m, "-o", tmp_path / "o.onnx", "-v")
    assert r.returncode == 0 and "INFO" in r.stderr
    helptext = " ".join(cli("convert", "--help").stdout.split())
    assert "resize the short side to this (default: 256)" in helptext  # --help shows defaults
    assert "(default: None)" not in helptext


@pytest.mark.parametrize("dim", [-4, 0])
def test_non_positive_input_dimension_is_refused_before_any_work(dim, tmp_path):
    m = _conv_model()
    m.graph.input[0].type.tensor_type.shape.dim[1].dim_value = dim
    src = _save(m, tmp_path / "m.onnx")
    with pytest.raises(FrontendError, match=f"graph input 'x' has dimension {dim} at axis 1"):
        graphopt.load_onnx(src)
    out = tmp_path / "o.onnx"
    r = cli("convert", src, "-o", out, "--pipeline", "prune-channels{ratio=0.5},fold-prune")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"dimension {dim} at axis 1" in r.stderr and "internal error" not in r.stderr
    assert not out.exists()


@pytest.mark.parametrize("method", ["percentile", "minmax", "entropy"])
def test_calibration_that_overflows_inside_the_model_is_refused(method):
    """Finite inputs of 1e38 overflow float32 inside the network: a refusal naming the value, never a
    torch.histc crash or inf/NaN scales written into the graph."""
    m = _conv_model()
    w = np.full((4, 3, 3, 3), 10.0, np.float32)
    m.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "w"))
    g = graphopt.load_onnx(m)
    calib = np.full((4, 3, 8, 8), 1e38, np.float32)
    with pytest.raises(PassError, match="value '.*' overflows float32 .* on calibration sample 0") as e:
        PassManager(f"quantize{{act_method={method}}}").run(g, Context(calib=calib))
    assert "\n" not in str(e.value)
