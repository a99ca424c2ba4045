"""Dynamic activation quantization (acts=dynamic): the scheme equals DynamicQuantizeLinear +
DequantizeLinear, quantize places it as onnxruntime's quantize_dynamic does, the lowering runs on
integer kernels, and embedding tables quantize per row."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

import graphopt
from graphopt import GraphOptError
from graphopt.backends.lowering import lower, ort_kernel_report, to_model
from graphopt.passmanager import Context, PassManager
from graphopt.quantizers import parse
from graphopt.quantizers.dynamic import dynamic_fake_quant


def _ort_dynamic(x: np.ndarray) -> np.ndarray:
    g = helper.make_graph([helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"]),
                           helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("kind", ["mixed", "positive", "negative", "zeros", "tiny"])
def test_scheme_equals_dynamic_quantize_linear(kind):
    rng = np.random.default_rng(0)
    x = {"mixed": rng.standard_normal((4, 33)) * 3, "positive": rng.random((4, 33)) + 0.5,
         "negative": -rng.random((4, 33)) - 0.1, "zeros": np.zeros((4, 33)),
         "tiny": rng.standard_normal((4, 33)) * 1e-6}[kind].astype(np.float32)
    q = parse("dynamic", "acts")
    want = _ort_dynamic(x)
    np.testing.assert_array_equal(q.apply_np(x, {}, None), want)
    t = torch.from_numpy(x).requires_grad_()
    y = dynamic_fake_quant(t)
    np.testing.assert_array_equal(y.detach().numpy(), want)
    y.sum().backward()
    np.testing.assert_array_equal(t.grad.numpy(), np.ones_like(x))  # straight through


VOCAB = 200


def _encoder(seed=0):
    """Embedding -> Linear -> GELU -> Linear on [N, T, d], with a shared input read by two layers."""
    torch.manual_seed(seed)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(VOCAB, 64)
            self.a, self.b = torch.nn.Linear(64, 96), torch.nn.Linear(64, 96)
            self.out = torch.nn.Linear(96, 8)

        def forward(self, ids):
            h = self.emb(ids)
            return self.out(torch.nn.functional.gelu(self.a(h)) * self.b(h))

    net = Net().eval()
    ids = torch.randint(0, VOCAB, (4, 6))
    return net, ids


def _quantized(pipeline):
    net, ids = _encoder()
    g = graphopt.from_torch(net, ids)
    return net, ids, PassManager(pipeline).run(g, Context()).graph


def test_quantize_places_one_shared_quantizer_per_layer_input_and_needs_no_calibration():
    net, ids, q = _quantized("canonicalize,quantize{acts=dynamic}")
    fqs = [n for n in q.nodes if n.op_type == "FakeQuant"]
    acts = [n for n in fqs if n.attr("kind") == "act"]
    assert len(acts) == 2  # the embedding output (shared by a and b) and out's input: no chained copies
    assert all(n.attr("scheme") == "dynamic" for n in acts)
    assert not [n for n in fqs if n.attr("kind") == "bias"]  # biases stay float


def test_lowering_runs_dynamic_integer_kernels_and_matches_the_simulation():
    net, ids, q = _quantized("canonicalize,quantize{acts=dynamic,embeddings=true}")
    low, rep = lower(q, "qdq")
    model = to_model(low, rep.opset)
    onnx.checker.check_model(model, full_check=True)
    ops = {n.op_type for n in model.graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops
    kernels = ort_kernel_report(model)
    assert not kernels["float"] and sum(kernels["integer"].values()) == 3, kernels
    # the embedding table is stored as int8 codes and gathered before it is dequantized
    table = [i for i in model.graph.initializer if list(i.dims) == [VOCAB, 64]]
    assert table and table[0].data_type == TensorProto.INT8
    with torch.no_grad():
        sim = graphopt.to_torch(q)(ids).numpy()
        ref = net(ids).numpy()
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for batch in (ids, torch.randint(0, VOCAB, (7, 6))):
        got = s.run(None, {s.get_inputs()[0].name: batch.numpy()})[0]
        with torch.no_grad():
            want = graphopt.to_torch(q)(batch).numpy()
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    assert 0 < np.abs(sim - ref).max() < 0.05 * np.abs(ref).max()  # quantized, and close to float


def test_preset_int8_dynamic_through_the_cli(tmp_path):
    from graphopt.cli import main

    net, ids = _encoder()
    g = graphopt.from_torch(net, ids)
    src, out = tmp_path / "enc.onnx", tmp_path / "enc_int8.onnx"
    graphopt.save_onnx(g, str(src))
    assert main(["convert", str(src), "-o", str(out), "--preset", "int8-dynamic", "--format", "qdq"]) == 0
    assert out.stat().st_size < 0.5 * src.stat().st_size  # int8 weights and table
    m = onnx.load(str(out))
    assert sum(n.op_type == "MatMulInteger" for n in m.graph.node) == 3


@pytest.mark.parametrize("pipeline, msg", [
    ("quantize{acts=dynamic,qat=lsq}", "acts=dynamic takes no qat"),
    ("quantize{acts=dynamic,weights=int4:block32}", "MatMulInteger, which takes symmetric int8"),
    ("quantize{acts=dynamic:int8}", "expected dynamic or dynamic:uint8"),
    ("quantize{weights=dynamic}", "dynamic quantization is for activations"),
    ("quantize{acts=dynamic,weight_method=gptq}", "weight_method=gptq needs calibration data"),
])
def test_bad_dynamic_options_are_one_line_errors(pipeline, msg):
    net, ids = _encoder()
    g = graphopt.from_torch(net, ids)
    with pytest.raises(GraphOptError, match=msg.replace("(", r"\(")) as e:
        PassManager("canonicalize," + pipeline).run(g, Context())
    assert "\n" not in str(e.value)


def test_static_int8_with_embeddings_keeps_the_table_small():
    net, ids = _encoder()
    g = graphopt.from_torch(net, ids)
    calib = torch.randint(0, VOCAB, (16, 6)).numpy()
    q = PassManager("canonicalize,quantize{embeddings=true}").run(g, Context(calib=calib)).graph
    tables = [n for n in q.nodes if n.op_type == "FakeQuant" and n.outputs[0].uses and
              n.outputs[0].uses[0][0].op_type == "Gather"]
    assert len(tables) == 1 and tables[0].attr("axis") == 0
    low, rep = lower(q, "qdq")
    model = to_model(low, rep.opset)
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = s.run(None, {s.get_inputs()[0].name: ids.numpy()})[0]
    out_fq = q.outputs[0].producer
    step = float(np.asarray(q.const_value(out_fq.inputs[1])))
    with torch.no_grad():  # integer kernels requantize: at most one output step apart
        assert np.abs(got - graphopt.to_torch(q)(ids).numpy()).max() <= step * 1.001
