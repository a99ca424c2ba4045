"""Quantization: quantizer properties, placement, lowering parity with onnxruntime, fusion,
bias correction, options and errors."""

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from nets import build, rel_err, run_ort

import graphopt
from graphopt import GraphOptError, PassError, from_torch
from graphopt.backends.lowering import lower, ort_kernel_report, to_model
from graphopt.passmanager import Context, PassManager
from graphopt.quantizers import Uniform, parse
from graphopt.quantizers.uniform import fake_quant, fake_quant_np, scale_zp, weight_qparams

# ------------------------------------------------------------------ quantizer properties
specs = st.builds(Uniform, bits=st.integers(2, 8), signed=st.booleans(), symmetric=st.booleans())


@settings(max_examples=200, deadline=None)
@given(spec=specs, lo=st.floats(-100, 0), width=st.floats(1e-3, 200), seed=st.integers(0, 2**31 - 1))
def test_error_at_most_half_a_step_inside_the_range(spec, lo, width, seed):
    if spec.symmetric and not spec.signed:
        lo = 0.0
    hi = lo + width
    s, z = scale_zp(np.array(lo), np.array(hi), spec)
    rep_lo, rep_hi = (spec.qmin - z) * s, (spec.qmax - z) * s  # what the grid really covers
    x = np.random.default_rng(seed).uniform(max(lo, rep_lo), min(hi, rep_hi), 256).astype(np.float32)
    y = fake_quant_np(x, s, z, spec.qmin, spec.qmax)
    assert np.all(np.abs(y - x) <= s / 2 * (1 + 1e-5) + 1e-6)


@settings(max_examples=100, deadline=None)
@given(spec=specs, hi=st.floats(0.1, 50), seed=st.integers(0, 2**31 - 1))
def test_clamps_outside_the_range(spec, hi, seed):
    lo = 0.0 if (spec.symmetric and not spec.signed) else -hi / 3
    s, z = scale_zp(np.array(lo), np.array(hi), spec)
    top, bottom = (spec.qmax - z) * s, (spec.qmin - z) * s
    rng = np.random.default_rng(seed)
    above = (top + rng.uniform(0.01, 100, 64)).astype(np.float32)
    below = (bottom - rng.uniform(0.01, 100, 64)).astype(np.float32)
    np.testing.assert_allclose(fake_quant_np(above, s, z, spec.qmin, spec.qmax), top, rtol=1e-6)
    np.testing.assert_allclose(fake_quant_np(below, s, z, spec.qmin, spec.qmax), bottom, rtol=1e-6)


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), bits=st.sampled_from([4, 8]), method=st.sampled_from(["minmax", "mse"]))
def test_per_channel_scales_are_independent(seed, bits, method):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((6, 4, 3, 3)).astype(np.float32) * rng.uniform(0.01, 10, (6, 1, 1, 1)).astype(np.float32)
    spec = Uniform(bits, True, "channel")
    s1, _ = weight_qparams(w, spec, 0, method)
    w2 = w.copy()
    w2[3] *= 100  # change one channel only
    s2, _ = weight_qparams(w2, spec, 0, method)
    assert np.array_equal(np.delete(s1, 3), np.delete(s2, 3)) and s2[3] > s1[3]


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), spec=specs)
def test_torch_fake_quant_equals_numpy(seed, spec):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((3, 5, 4)).astype(np.float32) * 4
    lo, hi = rng.uniform(-5, 0, 5), rng.uniform(0.1, 5, 5)
    s, z = scale_zp(lo, hi, spec)
    ref = fake_quant_np(x, s.reshape(1, 5, 1), z.reshape(1, 5, 1), spec.qmin, spec.qmax)
    got = fake_quant(torch.from_numpy(x), torch.from_numpy(s), torch.from_numpy(z), spec.qmin, spec.qmax, 1, 0)
    np.testing.assert_array_equal(got.numpy(), ref)


def test_ste_gradient():
    x = torch.tensor([-10.0, 0.3, 10.0], requires_grad=True)
    y = fake_quant(x, torch.tensor(0.1), torch.tensor(0.0), -8, 7, None, 0)
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 0.0]


def test_block_quantization_groups_along_input_axis():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 70)).astype(np.float32)
    w[:, 32:64] *= 50  # the second block of every row is larger
    spec = parse("int4:block32", "weights")
    s, _ = weight_qparams(w, spec, 1)
    assert s.shape == (4, 3) and np.all(s[:, 1] > 10 * s[:, 0])


def test_spec_parsing_errors():
    assert str(parse("int4:block32", "w")) == "int4:block32"
    for bad in ("int1", "int8:row", "float8", "int4:block", "int8:channel4", "int17"):
        with pytest.raises(GraphOptError, match="bad w spec"):
            parse(bad, "w")


# ------------------------------------------------------------------ quantize + lowering
NETS = ["mobilenetv2", "resnet", "concat", "mlp"]


def quantized(name, pipeline="canonicalize,fold-bn,quantize", n=64):
    model, x = build(name)
    rng = np.random.default_rng(1)
    calib = rng.standard_normal((n,) + x.shape[1:]).astype(np.float32)
    g = from_torch(model, torch.from_numpy(x))
    r = PassManager(pipeline, verify_each=True).run(g, Context(calib=calib))
    return model, r.graph, calib, r


def output_step(g) -> float:
    """Scale of the FakeQuant on the graph output (one quantization step of the output)."""
    out = g.outputs[0]
    assert out.producer.op_type == "FakeQuant"
    return float(np.asarray(g.const_value(out.producer.inputs[1])).max())


@pytest.mark.parametrize("fmt", ["qdq", "qoperator"])
@pytest.mark.parametrize("name", NETS)
def test_lowering_matches_simulation_and_fuses(name, fmt):
    model, g, calib, _ = quantized(name)
    lowered, rep = lower(g, fmt)
    proto = to_model(lowered, rep.opset)
    onnx.checker.check_model(proto, full_check=True)
    x = calib[:16]
    with torch.no_grad():
        sim = graphopt.to_torch(g)(torch.from_numpy(x)).numpy()
    got = run_ort(proto, x)
    step = output_step(g)
    assert np.abs(got - sim).max() <= step * 1.001, (np.abs(got - sim).max(), step)
    report = ort_kernel_report(proto)
    assert report["float"] == [], report  # every Conv/Gemm/MatMul runs as an integer kernel
    assert sum(report["integer"].values()) >= 1


def test_quantized_model_is_close_to_float():
    model, g, calib, r = quantized("resnet")
    st_ = r.stats["quantize"][0]
    assert st_["weights"] == 7 and st_["activations"] >= 7
    with torch.no_grad():
        ref = model(torch.from_numpy(calib)).numpy()
    assert rel_err(run_ort(to_model(*lower(g, "qdq")[:1], 13), calib), ref) < 0.1


def test_placement_after_relu_not_between():
    _, g, _, _ = quantized("resnet")
    for n in g.find_nodes("Relu"):
        assert n.inputs[0].producer.op_type != "FakeQuant"  # never between a layer and its ReLU
    for n in g.find_nodes("Conv", "Gemm"):
        assert n.inputs[0].producer.op_type == "FakeQuant" and n.inputs[1].producer.op_type == "FakeQuant"


def test_concat_inputs_share_one_scale():
    _, g, _, _ = quantized("concat")
    (cat,) = g.find_nodes("Concat")
    scales = {float(np.asarray(g.const_value(v.producer.inputs[1]))) for v in cat.inputs}
    assert len(scales) == 1


def _stored_types(proto) -> set[int]:
    return {t.data_type for t in proto.graph.initializer}


@pytest.mark.parametrize("bits", [3, 4, 6])
def test_low_bit_weights_run_on_int8_kernels_and_store_packed(bits):
    _, g, calib, _ = quantized("mobilenetv2", f"canonicalize,fold-bn,quantize{{weights=int{bits}:channel}}")
    lowered, rep = lower(g, "qdq")
    proto = to_model(lowered, rep.opset)
    assert not rep.simulated
    onnx.checker.check_model(proto, full_check=True)
    # at most 4 bits: INT4 codes that onnxruntime casts to int8 at load; 6 bits: int8 codes
    assert (onnx.TensorProto.INT4 in _stored_types(proto)) == (bits <= 4)
    assert (rep.opset >= 21) == (bits <= 4)  # INT4 initializers exist from opset 21
    with torch.no_grad():
        sim = graphopt.to_torch(g)(torch.from_numpy(calib[:8])).numpy()
    assert np.abs(run_ort(proto, calib[:8]) - sim).max() <= output_step(g) * 1.001
    report = ort_kernel_report(proto)
    assert report["float"] == [] and sum(report["integer"].values()) >= 1, report


@pytest.mark.parametrize("bits", [4, 6])
def test_low_bit_activations_lower_exactly_in_an_8_bit_container(bits):
    _, g3, calib, _ = quantized("mlp", f"quantize{{acts=uint{bits}:tensor}}")
    lowered, rep = lower(g3, "qdq")
    assert not rep.simulated  # Clip to the low-bit range, then uint8 Q/DQ: the same codes
    assert sum(n.op_type == "Clip" for n in lowered.nodes) >= 3
    proto = to_model(lowered, rep.opset)
    assert not any(t.data_type == onnx.TensorProto.UINT4 for t in proto.graph.initializer)
    with torch.no_grad():
        sim = graphopt.to_torch(g3)(torch.from_numpy(calib[:8])).numpy()
    assert np.abs(run_ort(proto, calib[:8]) - sim).max() <= output_step(g3) * 1.001


def test_qoperator_takes_low_bit_weights_but_not_4_bit_activations():
    _, g, _, _ = quantized("mlp", "quantize{weights=int4:channel}")
    lowered, rep = lower(g, "qoperator")
    assert rep.fused >= 1
    _, g, _, _ = quantized("mlp", "quantize{acts=uint4:tensor}")
    with pytest.raises(GraphOptError, match="qoperator needs weights and activations on 8-bit"):
        lower(g, "qoperator")


def test_skip_and_overrides():
    _, g, _, r = quantized("resnet", "canonicalize,fold-bn,quantize{skip=[fc],override=[l1.*=4],first_last_bits=6}")
    fc = next(n for n in g.nodes if n.source == "fc")
    assert fc.inputs[1].producer is None  # skipped: float weights
    bits = {n.source: n.inputs[1].producer.attr("bits") for n in g.find_nodes("Conv")}
    assert bits["conv"] == 6 and bits["l1.conv1"] == 4 and bits["l2.conv1"] == 8
    assert r.stats["quantize"][0]["skipped"] == ["fc"]


def test_quantize_errors():
    model, x = build("mlp")
    g = from_torch(model, torch.from_numpy(x))
    with pytest.raises(PassError, match="needs calibration data"):
        PassManager("quantize").run(g.copy(), Context())
    with pytest.raises(PassError, match="calibration samples have shape"):
        PassManager("quantize").run(g.copy(), Context(calib=np.zeros((4, 7), np.float32)))
    q = PassManager("quantize").run(g.copy(), Context(calib=x)).graph
    with pytest.raises(PassError, match="already quantized"):
        PassManager("quantize").run(q, Context(calib=x))
    with pytest.raises(PassError, match="acts must be per tensor"):
        PassManager("quantize{acts=uint8:channel}").run(g.copy(), Context(calib=x))


# ------------------------------------------------------------------ bias correction
def _mean_layer_error(g_float, g_q, data, name):
    from graphopt.training.calibration import collect

    a = collect(g_float, data, [name])[name]
    b = collect(g_q, data, [name])[name]
    axes = (0, 2, 3) if a.ndim == 4 else (0,)
    return np.abs((b - a).mean(axis=axes)).mean()


def test_correct_bias_removes_mean_shift():
    model, x = build("mobilenetv2")
    calib = np.random.default_rng(2).standard_normal((64,) + x.shape[1:]).astype(np.float32)
    g = PassManager("canonicalize,fold-bn").run(from_torch(model, torch.from_numpy(x))).graph
    f = g.copy()
    q = PassManager("quantize{weights=int4:tensor}").run(g, Context(calib=calib)).graph
    name = next(n for n in q.find_nodes("Conv") if n.source == "b1.pwl").outputs[0].name  # a 1x1 conv
    before = _mean_layer_error(f, q, calib, name)
    r = PassManager("correct-bias{mode=empirical}").run(q.copy(), Context(calib=calib))
    assert r.modified and r.stats["correct-bias"][0]["empirical"] >= 1
    after = _mean_layer_error(f, r.graph, calib, name)
    assert after < before / 2, (before, after)
    again = PassManager("correct-bias{mode=empirical}").run(r.graph, Context(calib=calib))
    assert not again.modified


def test_correct_bias_analytical_uses_bn_statistics():
    model, x = build("mobilenetv2")
    calib = np.random.default_rng(2).standard_normal((32,) + x.shape[1:]).astype(np.float32)
    g = PassManager("canonicalize,fold-bn").run(from_torch(model, torch.from_numpy(x))).graph
    q = PassManager("quantize{weights=int4:tensor}").run(g, Context(calib=calib)).graph
    r = PassManager("correct-bias{mode=analytical}").run(q, Context())
    st_ = r.stats["correct-bias"][0]
    assert st_["analytical"] >= 1 and st_["empirical"] == 0 and r.modified
    assert "stem" in st_["skipped"]  # the stem reads the graph input: no BN statistics upstream


def test_correct_bias_nothing_to_do():
    model, x = build("mlp")
    r = PassManager("correct-bias").run(from_torch(model, torch.from_numpy(x)), Context())
    assert not r.modified


def test_presets_parse():
    from graphopt.pipeline import parse_pipeline, presets

    for name in ("int8", "dfq", "w4a8"):
        text = presets()[name][0]
        assert str(parse_pipeline(text)) == text or parse_pipeline(str(parse_pipeline(text))) == parse_pipeline(text)


def test_gptq_beats_round_to_nearest_on_layer_output():
    from graphopt.quantizers.gptq import HessianObserver, gptq, uniform_rounding
    from graphopt.quantizers.uniform import fake_quant_np

    rng = np.random.default_rng(0)
    mix = rng.standard_normal((16, 16))
    x = torch.from_numpy((rng.standard_normal((256, 16)) @ mix).astype(np.float32))  # correlated inputs
    w = rng.standard_normal((8, 16)).astype(np.float32)
    spec = Uniform(3, True, "channel")
    s, z = weight_qparams(w, spec, 0)
    h = HessianObserver("Gemm")
    h.update(x)
    q_gptq = gptq(w[None], h.result(), uniform_rounding(s[None], z[None], spec.qmin, spec.qmax, (1, 8)))[0]
    q_rtn = fake_quant_np(w, s[:, None], z[:, None], spec.qmin, spec.qmax)
    on_grid = np.round(q_gptq / s[:, None])
    np.testing.assert_allclose(q_gptq / s[:, None], on_grid, atol=1e-6)  # GPTQ output stays on the grid
    xn = x.numpy()
    err = lambda q: float(np.sum((xn @ (q - w).T) ** 2))  # noqa: E731
    assert err(q_gptq) < 0.8 * err(q_rtn)


def test_gptq_pass_option():
    _, g, calib, r = quantized("mobilenetv2", "canonicalize,fold-bn,quantize{weights=int4:channel,weight_method=gptq}")
    fq = next(n for n in g.nodes if n.op_type == "FakeQuant" and n.attr("kind") == "weight")
    assert "float_weight" in fq.meta
    lowered, rep = lower(g, "qdq")
    with torch.no_grad():
        sim = graphopt.to_torch(g)(torch.from_numpy(calib[:8])).numpy()
    assert np.abs(run_ort(to_model(lowered, rep.opset), calib[:8]) - sim).max() <= output_step(g) * 1.001


class _Relu6Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = torch.nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.c2(torch.nn.functional.relu6(self.c1(x)))


def test_qoperator_fuses_relu6_whose_top_code_is_six_and_says_why_not_elsewhere():
    """A uint8 range of [0, 6] has a top code of 6 plus float32 rounding: the ReLU6 is still
    implied (same codes), so the Conv becomes QLinearConv. A skipped layer is listed with why."""
    torch.manual_seed(0)
    model = _Relu6Net().eval()
    calib = (np.random.default_rng(0).standard_normal((32, 3, 8, 8)) * 50).astype(np.float32)  # saturates ReLU6
    g = from_torch(model, torch.from_numpy(calib[:2]))
    q = PassManager("quantize", verify_each=True).run(g.copy(), Context(calib=calib)).graph
    lowered, rep = lower(q, "qoperator")
    assert rep.fused == 2 and rep.not_fused == {}
    proto = to_model(lowered, rep.opset)
    assert [n.op_type for n in proto.graph.node].count("Conv") == 0
    with torch.no_grad():
        sim = graphopt.to_torch(q)(torch.from_numpy(calib[:8])).numpy()
    assert np.abs(run_ort(proto, calib[:8]) - sim).max() <= output_step(q) * 1.001
    r = PassManager("quantize{skip=[c2]}").run(g.copy(), Context(calib=calib))
    assert r.stats["quantize"][0]["float_layers"] == {"c2": "matches skip"}
    _, rep = lower(r.graph, "qoperator")
    assert rep.not_fused == {"Conv 'c2'": "its weight is not a quantized constant"}
    assert any("c2" in line and "not lowered to QOperator" in line for line in rep.lines())


def test_effnet_int8_qoperator_leaves_no_conv_in_float(effnet_path):
    """EfficientNet-Lite0's ReLU6 layers fuse: every Conv becomes QLinearConv (it used to leave 33)."""
    g = graphopt.load_onnx(effnet_path)
    calib = np.random.default_rng(0).standard_normal((4, 3, 224, 224)).astype(np.float32)
    from graphopt.pipeline import presets

    q = PassManager(presets()["int8"][0]).run(g, Context(calib=calib)).graph
    lowered, rep = lower(q, "qoperator")
    assert rep.not_fused == {} and rep.fused == 50
    ops = [n.op_type for n in to_model(lowered, rep.opset).graph.node]
    assert ops.count("Conv") == 0 and ops.count("QLinearConv") == 49 and ops.count("MatMulInteger") == 1


class _MaskedAttentionish(torch.nn.Module):
    """q = x W; scores = q q^T + mask (a huge negative where masked); a residual Add of a LayerNorm."""

    def __init__(self):
        super().__init__()
        self.q = torch.nn.Linear(8, 8)
        self.ln = torch.nn.LayerNorm(8)
        self.o = torch.nn.Linear(8, 8)

    def forward(self, x):
        q = self.q(x)
        mask = torch.clamp(x[:, :, :1], max=0.0) * 1e9  # a huge negative where x < 0, as attention masks are
        s = torch.softmax(q @ q.transpose(1, 2) + mask, -1) @ q
        h = self.ln(s)
        return self.o(h) + h


def test_adds_with_float_operands_stay_float():
    """Only Adds whose operands all come from integer kernels are quantized: the mask Add and the
    LayerNorm residual stay float (their ranges would ruin a per-tensor grid); the layers are int8."""
    model = _MaskedAttentionish().eval()
    x = np.random.default_rng(0).standard_normal((16, 5, 8)).astype(np.float32)
    g = from_torch(model, torch.from_numpy(x[:2]))
    q = PassManager("quantize", verify_each=True).run(g, Context(calib=x)).graph
    def fq_in(n):
        return [v.producer is not None and v.producer.op_type == "FakeQuant" for v in n.inputs]

    mask_add = next(n for n in q.nodes if n.op_type == "Add" and n.source == "add")
    assert fq_in(mask_add) == [False, False]  # scores + mask: float
    residual = next(n for n in q.nodes if n.op_type == "Add" and n.source == "add_1")
    assert not any(u.op_type == "FakeQuant" for u in residual.outputs[0].users())  # its output stays float
    bias_adds = [n for n in q.nodes if n.op_type == "Add" and n.source in ("q", "o")]
    assert all(any(fq_in(n)) for n in bias_adds)  # a layer's bias Add reads the layer's quantized output
    assert sum(n.op_type == "FakeQuant" and n.attr("kind") == "weight" for n in q.nodes) == 2
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
        got = graphopt.to_torch(q)(torch.from_numpy(x)).numpy()
    assert rel_err(got, ref) < 0.05
