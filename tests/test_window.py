"""A layer's sliding window (graphopt.geometry.window) and the explicit-pads pass: ONNX's
auto_pad rule against onnxruntime, and every reader (torch back end, GPTQ's Hessians, the
systolic back end) agreeing on it."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.backends.systolic import im2col
from graphopt.errors import GraphOptError, UnsupportedOpError
from graphopt.geometry import pads_input, window
from graphopt.passmanager import Context, PassManager


def _model(op, attrs, size=(10, 7), weight=True, cin=3, static=True):
    """x [1, cin, *size] -> op -> Relu, an ONNX model (bytes) and its input."""
    rng = np.random.default_rng(0)
    inits, inputs = [], ["x"]
    if weight:
        shape = (cin, 4, 3, 3) if op == "ConvTranspose" else (4, cin, 3, 3)
        inits.append(numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), "w"))
        inputs.append("w")
    nodes = [helper.make_node(op, inputs, ["y"], **attrs), helper.make_node("Relu", ["y"], ["z"])]
    xshape = ["n", cin, *size] if static else ["n", cin, "h", "w"]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, xshape)],
                          [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    m = onnx.shape_inference.infer_shapes(m)
    return m.SerializeToString(), rng.standard_normal((2, cin, *size)).astype(np.float32)


def _ort(model: bytes, x):
    """onnxruntime's output; ONNX's reference evaluator where onnxruntime lacks the case (it
    refuses dilations with SAME padding)."""
    m = onnx.load_from_string(model)
    if any(a.name == "dilations" for n in m.graph.node for a in n.attribute):
        from onnx.reference import ReferenceEvaluator

        return ReferenceEvaluator(m).run(None, {"x": x})[0]
    return ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def _load(model: bytes, tmp_path):
    p = tmp_path / "m.onnx"
    p.write_bytes(model)
    return graphopt.load_onnx(str(p))


WINDOWS = [
    ("Conv", dict(auto_pad="SAME_UPPER", strides=[2, 2])),
    ("Conv", dict(auto_pad="SAME_LOWER", strides=[2, 2])),
    ("Conv", dict(auto_pad="SAME_UPPER", dilations=[2, 2])),
    ("Conv", dict(auto_pad="VALID", strides=[2, 1])),
    ("MaxPool", dict(auto_pad="SAME_UPPER", kernel_shape=[3, 3], strides=[2, 2])),
    ("MaxPool", dict(auto_pad="SAME_LOWER", kernel_shape=[2, 2], strides=[1, 1])),
    ("AveragePool", dict(auto_pad="SAME_UPPER", kernel_shape=[3, 3], strides=[2, 2])),
    ("AveragePool", dict(auto_pad="SAME_LOWER", kernel_shape=[2, 2], strides=[1, 1], count_include_pad=1)),
    ("AveragePool", dict(pads=[0, 0, 1, 1], kernel_shape=[2, 2], strides=[2, 2])),  # asymmetric explicit pads
]


@pytest.mark.parametrize("op,attrs", WINDOWS)
def test_the_torch_back_end_runs_every_auto_pad_as_onnxruntime_does(op, attrs, tmp_path):
    model, x = _model(op, attrs, weight=op == "Conv")
    g = _load(model, tmp_path)
    import torch

    got = graphopt.to_torch(g)(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(got, _ort(model, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op,attrs", WINDOWS[:8])
def test_explicit_pads_preserves_the_function_flags_and_is_idempotent(op, attrs, tmp_path):
    model, x = _model(op, attrs, weight=op == "Conv")
    g = _load(model, tmp_path)
    r = PassManager("explicit-pads").run(g)
    assert r.modified and r.stats["explicit-pads"][0]["rewritten"] == 1
    node = next(n for n in r.graph.nodes if n.op_type == op)
    assert "auto_pad" not in node.attrs and len(node.attrs["pads"]) == 4
    out = tmp_path / "e.onnx"
    graphopt.save_onnx(r.graph, out)
    np.testing.assert_allclose(_ort(out.read_bytes(), x), _ort(model, x), rtol=1e-6, atol=1e-6)
    assert not PassManager("explicit-pads").run(r.graph).modified


def test_explicit_pads_keeps_what_it_cannot_resolve(tmp_path):
    """Negative cases: an input whose spatial size is not static, a ConvTranspose with SAME
    padding (its pads follow output_shape), a Conv with explicit pads already."""
    for op, attrs, static in [("Conv", dict(auto_pad="SAME_UPPER", strides=[2, 2]), False),
                              ("ConvTranspose", dict(auto_pad="SAME_UPPER", strides=[2, 2]), True),
                              ("Conv", dict(pads=[1, 1, 1, 1]), True)]:
        g = _load(_model(op, attrs, static=static)[0], tmp_path)
        r = PassManager("explicit-pads").run(g)
        assert not r.modified, (op, attrs)
        node = next(n for n in r.graph.nodes if n.op_type == op)
        assert node.attrs.get("auto_pad", "NOTSET") == attrs.get("auto_pad", "NOTSET")
        assert r.stats["explicit-pads"][0]["kept"] == ("auto_pad" in attrs)


def test_window_errors_name_the_node_and_the_cause(tmp_path):
    g = _load(_model("ConvTranspose", dict(auto_pad="SAME_UPPER", strides=[2, 2]))[0], tmp_path)
    with pytest.raises(UnsupportedOpError, match="ConvTranspose.*auto_pad=SAME_UPPER"):
        window(next(n for n in g.nodes if n.op_type == "ConvTranspose"))
    g = _load(_model("Conv", dict(auto_pad="SAME_LOWER"), static=False)[0], tmp_path)
    conv = next(n for n in g.nodes if n.op_type == "Conv")
    with pytest.raises(UnsupportedOpError, match="static spatial shape"):
        window(conv)
    assert pads_input(conv)  # unknown SAME padding counts as padding where a pass must be safe
    with pytest.raises(GraphOptError, match="no sliding window"):
        window(next(n for n in g.nodes if n.op_type == "Relu"))


def test_window_fills_onnx_defaults_and_reads_the_kernel_from_the_weight(tmp_path):
    g = _load(_model("Conv", {})[0], tmp_path)
    w = window(next(n for n in g.nodes if n.op_type == "Conv"))
    assert (w.kernel, w.strides, w.pads, w.dilations, w.padded) == ((3, 3), (1, 1), (0, 0, 0, 0), (1, 1), False)


def test_gptq_and_the_systolic_back_end_read_same_padding_as_explicit_pads(tmp_path):
    """GPTQ's Hessians (im2col over the padded input) and the systolic array's im2col see an
    auto_pad model exactly as its explicit-pads twin: the same quantized weights, the same columns."""
    model, x = _model("Conv", dict(auto_pad="SAME_UPPER", strides=[2, 2]), size=(10, 7))
    same = _load(model, tmp_path)
    explicit = PassManager("explicit-pads").run(same.copy()).graph
    node = next(n for n in explicit.nodes if n.op_type == "Conv")
    assert node.attrs["pads"] == [0, 1, 1, 1]  # onnx: total pad 1 (rows), 2 (cols); the odd one at the end
    cols_same, shape_same = im2col(next(n for n in same.nodes if n.op_type == "Conv"), x)
    cols_exp, shape_exp = im2col(node, x)
    assert shape_same == shape_exp
    np.testing.assert_array_equal(cols_same, cols_exp)
    pipe = "quantize{weights=int4:channel,acts=float,weight_method=gptq}"
    q = [PassManager(pipe).run(g, Context(calib=x)).graph for g in (same, explicit)]
    w = [[np.asarray(g.const_value(v)) for v in g.values.values() if g.const_value(v) is not None
          and np.asarray(g.const_value(v)).shape == (4, 3, 3, 3)] for g in q]
    assert w[0] and len(w[0]) == len(w[1])
    for a, b in zip(*w):
        np.testing.assert_array_equal(a, b)


def test_the_int8_preset_converts_a_same_padded_model_from_the_cli(tmp_path):
    """What a user with a TensorFlow-exported model runs: `graphopt convert --preset int8` on a
    model with auto_pad SAME, written as integer ONNX that onnxruntime runs close to the float model."""
    import subprocess
    import sys

    model, x = _model("Conv", dict(auto_pad="SAME_UPPER", strides=[2, 2]))
    src, out, calib = tmp_path / "same.onnx", tmp_path / "int8.onnx", tmp_path / "calib.npy"
    src.write_bytes(model)
    np.save(calib, np.random.default_rng(1).standard_normal((32, *x.shape[1:])).astype(np.float32))
    r = subprocess.run([sys.executable, "-m", "graphopt.cli", "convert", str(src), "-o", str(out), "--preset", "int8",
                        "--calib", str(calib), "--format", "qdq"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "explicit-pads.rewritten=1" in r.stdout
    ref, got = _ort(model, x), _ort(out.read_bytes(), x)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= 0.05 * np.abs(ref).max()
