"""The quantizer zoo: each scheme's defining property, its integer-kernel lowering, and its
errors. The property tests call the public ``graphopt.quantizers.apply`` and the schemes'
own row maths; the references here are written independently (plain loops over tiny cases)."""

import itertools

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from nets import build, run_ort

import graphopt
from graphopt import from_torch
from graphopt.backends.lowering import lower, ort_kernel_report, to_model
from graphopt.errors import GraphOptError, PassError
from graphopt.passmanager import Context, PassManager
from graphopt.quantizers import apply, apply_node, parse
from graphopt.quantizers.packing import codes_of

arrays = st.integers(0, 10_000).map(lambda seed: np.random.default_rng(seed).standard_normal((6, 40)).astype(np.float32))


# ------------------------------------------------------------------ uniform, textbook form
@settings(max_examples=25, deadline=None)
@given(arrays, st.sampled_from([3, 4, 8]))
def test_uniform_is_the_textbook_formula(w, bits):
    """sf = L / (2^(b-1) - 1), x_c = clamp(x, -L, L), x_q = floor(x_c / sf + 0.5) * sf (away from
    exact ties, where graphopt rounds half to even as QuantizeLinear does); error <= sf/2."""
    y = apply(f"int{bits}:channel", w, axis=0)
    L = np.abs(w).max(axis=1, keepdims=True)
    sf = (L / (2 ** (bits - 1) - 1)).astype(np.float32)
    u = np.clip(w, -L, L) / sf
    ref = np.floor(u + 0.5) * sf
    away = np.abs(u - np.floor(u) - 0.5) > 1e-3
    np.testing.assert_allclose(y[away], ref[away], rtol=0, atol=1e-6)
    assert np.all(np.abs(y - w) <= sf / 2 * (1 + 1e-5))


# ------------------------------------------------------------------ power of two
@settings(max_examples=25, deadline=None)
@given(arrays, st.sampled_from(["nearest", "msb", "log"]), st.sampled_from([2, 3, 4]))
def test_every_power_of_two_level_is_zero_or_a_signed_power_of_two(w, mode, bits):
    q = parse(f"pow2:b{bits}:channel:{mode}")
    params, axis = q.weight_params(w, 0, 1, "minmax")
    y = q.apply_np(w, params, axis)
    alpha = params["alpha"][:, None]
    n_exp = 2 ** (bits - 1) - 1
    ratio = np.abs(y) / alpha
    nonzero = ratio > 0
    k = -np.log2(ratio[nonzero])
    assert np.allclose(k, np.round(k), atol=0) and k.min() >= 0 and k.max() <= n_exp - 1
    assert np.all(np.sign(y[nonzero]) == np.sign(w[nonzero]))


def test_pow2_modes_differ_as_documented():
    u = np.array([0.7, 0.74, 0.72, 0.1, 0.01], np.float32)  # alpha = 1 via a 1.0 entry
    x = np.concatenate([u, [1.0]]).astype(np.float32)
    near = apply("pow2:b3:tensor:nearest", x)[:5]
    msb = apply("pow2:b3:tensor:msb", x)[:5]
    log = apply("pow2:b3:tensor:log", x)[:5]
    assert near[0] == 0.5 and near[1] == 0.5 and near[2] == 0.5  # 0.75 is the linear midpoint
    assert log[1] == 1.0 and log[0] == 0.5  # the log midpoint is 2^-0.5 = 0.707
    assert msb[1] == 0.5 and msb[3] == 0.0  # top bit of the 3-level uniform code: round(0.1*4)=0


# ------------------------------------------------------------------ APoT
def test_apot_levels_match_the_papers_construction():
    # Li et al. (2020), b = 4 unsigned (m = 4 magnitude bits), k = 2: n = 2 terms,
    # p0 in {0, 2^0, 2^-2, 2^-4}, p1 in {0, 2^-1, 2^-3, 2^-5}
    p0, p1 = [0, 1, 2 ** -2, 2 ** -4], [0, 2 ** -1, 2 ** -3, 2 ** -5]
    mags = sorted({a + b for a, b in itertools.product(p0, p1)})
    lv = parse("apot5:k2").unit_levels()  # 5 bits signed = 4 magnitude bits
    np.testing.assert_array_equal(lv[lv >= 0], mags)
    # k = 1 is one term per magnitude bit: m = 2, n = 2: {0, 1} + {0, 1/2}
    np.testing.assert_array_equal(parse("apot3:k1").unit_levels(), [-1.5, -1, -0.5, 0, 0.5, 1, 1.5])
    # k = m: a single term, power-of-two levels
    np.testing.assert_array_equal(parse("apot3:k2").unit_levels(), [-1, -0.5, -0.25, 0, 0.25, 0.5, 1])
    assert parse("apot4").level_count() == 15  # 4 bits hold at most 16 levels


# ------------------------------------------------------------------ term quantization
def _terms(v: int) -> list[int]:
    return [1 << j for j in range(8) if abs(v) >> j & 1]


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from([2, 4, 8]), st.integers(0, 6))
def test_term_keeps_at_most_budget_terms_and_the_largest(seed, g, extra):
    t = g + extra
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((3, 24)).astype(np.float32)
    q = parse(f"term5:g{g}:t{t}:channel")
    params, axis = q.weight_params(w, 0, 1, "minmax")
    codes = np.round(q.apply_np(w, params, axis) / params["scale"][:, None]).astype(int)
    full = np.clip(np.round(w / params["scale"][:, None]), -15, 15).astype(int)
    for r in range(3):
        for s in range(0, 24, g):
            kept = [x for v in codes[r, s:s + g] for x in _terms(v)]
            allt = sorted((x for v in full[r, s:s + g] for x in _terms(v)), reverse=True)
            assert len(kept) <= t
            assert sorted(kept, reverse=True) == allt[:t]  # the largest terms, as a multiset
            # each kept code is a sub-sum of its own code's terms, with its sign
            for v, f in zip(codes[r, s:s + g], full[r, s:s + g]):
                assert set(_terms(v)) <= set(_terms(f)) and (v == 0 or np.sign(v) == np.sign(f))


def test_term_with_a_large_budget_is_the_uniform_code():
    w = np.random.default_rng(3).standard_normal((4, 30)).astype(np.float32)
    np.testing.assert_array_equal(apply("term6:g8:t40:channel", w, axis=0), apply("int6:channel", w, axis=0))


def test_term_signed_digits_use_fewer_terms():
    w = np.array([[7, 7, 7, 7, 1, 0, 0, 0]], np.float32) / 7 * 0.7  # code 7 = 8 - 1 in signed digits
    b = apply("term4:g4:t4:tensor", w)
    sd = apply("term4:g4:t4:tensor:sd", w)
    assert np.abs(sd - w).sum() < np.abs(b - w).sum()


# ------------------------------------------------------------------ PWLQ
@settings(max_examples=20, deadline=None)
@given(arrays, st.sampled_from([3, 4, 6]))
def test_pwlq_with_its_breakpoint_at_m_is_uniform(w, bits):
    q = parse(f"pwlq{bits}:channel:at1")
    params, axis = q.weight_params(w, 0, 1)
    np.testing.assert_allclose(q.apply_np(w, params, axis), apply(f"int{bits}:channel", w, axis=0), atol=1e-6)


@settings(max_examples=10, deadline=None)
@given(arrays)
def test_pwlq_regions_are_uniform_with_their_own_step(w):
    q = parse("pwlq3:channel:at0.4")
    params, axis = q.weight_params(w, 0, 1)
    y = q.apply_np(w, params, axis)
    m, p = params["alpha"][:, None], params["breaks"][:, :1]
    centre = np.abs(y) <= p * (1 + 1e-6)
    k_c = np.abs(y) / (p / 3)
    k_t = (np.abs(y) - p) / ((m - p) / 3)
    assert np.allclose(k_c[centre], np.round(k_c[centre]), atol=1e-4)
    assert np.allclose(k_t[~centre], np.round(k_t[~centre]), atol=1e-4)


def test_pwlq_mse_search_beats_the_closed_form_and_more_breakpoints_help():
    w = np.random.default_rng(0).laplace(size=(8, 300)).astype(np.float32)

    def err(spec):
        return float(((apply(spec, w, axis=0) - w) ** 2).sum())
    assert err("pwlq4:bp1:mse") <= err("pwlq4:gauss") * 1.0001
    assert err("pwlq4:bp2:mse") < err("pwlq4:bp1:mse")
    assert err("pwlq4:gauss") < err("int4:channel")


# ------------------------------------------------------------------ binary / ternary
@settings(max_examples=20, deadline=None)
@given(arrays)
def test_binary_and_ternary_use_two_and_three_levels_per_channel(w):
    b = apply("binary:channel", w, axis=0)
    t = apply("ternary:channel", w, axis=0)
    for r in range(w.shape[0]):
        assert len(np.unique(b[r])) == 2
        assert set(np.unique(t[r])) <= {-np.abs(t[r]).max(), 0.0, np.abs(t[r]).max()} and len(np.unique(t[r])) == 3
    np.testing.assert_allclose(np.abs(b).max(1), np.abs(w).mean(1), rtol=1e-5)  # XNOR-Net's alpha
    delta = 0.7 * np.abs(w).mean(1, keepdims=True)
    assert np.all((t == 0) == (np.abs(w) <= delta))  # TWN's threshold


# ------------------------------------------------------------------ the public apply
def test_apply_api_errors_and_shapes():
    w = np.random.default_rng(0).standard_normal((4, 5)).astype(np.float32)
    assert apply("apot4:tensor", w).shape == (4, 5)
    assert apply("pow2:b3:channel", w, axis=1).shape == (4, 5)
    with pytest.raises(GraphOptError, match="give the channel axis"):
        apply("apot4:channel", w)
    with pytest.raises(GraphOptError, match="out of range"):
        apply("apot4:channel", w, axis=3)


@pytest.mark.parametrize("spec,msg", [
    ("wibble4", "unknown quantizer 'wibble'"),
    ("apot9", "apot takes 2..8 bits, not 9"),
    ("term4:g8:t6", "term budget t6 is below the group size g8"),
    ("pwlq4:at0.6/0.3", "PWLQ breakpoints 0.6/0.3 must be increasing"),
    ("pwlq4:bp2:gauss", "closed form gives one breakpoint"),
    ("pow2:b3:e5", "3 bits hold at most 3 exponents"),
    ("binary4", "binary takes no bit count"),
    ("pow2:b4:sideways", "unknown option 'sideways' for pow2"),
])
def test_impossible_specs_name_the_spec(spec, msg):
    with pytest.raises(GraphOptError, match=msg) as e:
        parse(spec)
    assert spec in str(e.value) and "\n" not in str(e.value)


def test_spec_text_round_trips():
    for spec in ["pow2:b4:channel:log", "apot4:tensor:k1", "term8:channel:g4:t6:sd", "pwlq4:channel:bp2:mse",
                 "binary:tensor", "ternary:channel", "pwlq3:channel:at0.2/0.5"]:
        q = parse(spec)
        assert parse(str(q)) == q


# ------------------------------------------------------------------ lowering
def _quantized(spec: str, name: str = "mobilenetv2", extra: str = ""):
    model, x = build(name)
    calib = np.random.default_rng(1).standard_normal((32,) + x.shape[1:]).astype(np.float32)
    g = from_torch(model, torch.from_numpy(x))
    r = PassManager(f"canonicalize,fold-bn,quantize{{weights={spec},weight_method=mse}}{extra}").run(
        g, Context(calib=calib))
    return r.graph, calib


def _out_step(g) -> float:
    return float(np.asarray(g.const_value(g.outputs[0].producer.inputs[1])).max())


@pytest.mark.parametrize("spec", ["pow2:b4", "apot4", "apot3", "term6:g4:t8", "binary", "ternary", "pow2:b3:msb"])
def test_integer_lowered_schemes_run_on_integer_kernels_with_exact_weights(spec):
    g, calib = _quantized(spec)
    weights = {n.inputs[0].name: (n, apply_node(g, n, g.const_value(n.inputs[0])))
               for n in g.nodes if n.op_type == "FakeQuant" and n.attr("kind") == "weight"}
    lowered, rep = lower(g, "qdq")
    assert not rep.simulated, rep.simulated_why
    proto = to_model(lowered, rep.opset)
    onnx.checker.check_model(proto, full_check=True)
    # every DequantizeLinear of a weight reproduces the simulated weight bit for bit
    from graphopt.frontends.onnx_file import from_model_proto
    lg = from_model_proto(proto, infer_shapes=False)
    for n in lg.nodes:
        if n.op_type != "DequantizeLinear" or not n.outputs[0].uses:
            continue
        user = n.outputs[0].uses[0][0]
        if n.outputs[0].uses[0][1] != 1 or user.op_type not in ("Conv", "Gemm"):
            continue
        codes = codes_of(lg, n.inputs[0]).astype(np.float32)
        s = np.asarray(lg.const_value(n.inputs[1]), np.float32)
        shape = [1] * codes.ndim
        if s.size > 1:
            shape[n.attr("axis", 1)] = -1
        deq = (codes * s.reshape(shape)).astype(np.float32)
        matches = [k for k, (_, sim) in weights.items() if sim.shape == deq.shape and np.array_equal(sim, deq)]
        assert matches, f"no simulated weight equals the lowered weight of {user.name}"
    with torch.no_grad():
        sim = graphopt.to_torch(g)(torch.from_numpy(calib[:8])).numpy()
    assert np.abs(run_ort(proto, calib[:8]) - sim).max() <= _out_step(g) * 1.001
    report = ort_kernel_report(proto)
    assert report["float"] == [] and sum(report["integer"].values()) >= 1, report


@pytest.mark.parametrize("spec", ["pwlq4", "pow2:b5", "apot7"])
def test_schemes_off_the_int8_grid_are_exact_float_and_say_why(spec):
    g, calib = _quantized(spec, "resnet")
    lowered, rep = lower(g, "qdq")
    assert rep.simulated and all(rep.simulated_why.values())
    proto = to_model(lowered, rep.opset)
    with torch.no_grad():
        sim = graphopt.to_torch(g)(torch.from_numpy(calib[:8])).numpy()
    # onnxruntime must not re-quantize the float weights on its own: the result is exact
    assert np.abs(run_ort(proto, calib[:8]) - sim).max() <= _out_step(g) * 1e-3
    assert ort_kernel_report(proto)["float"]


def test_four_bit_zoo_weights_are_stored_in_four_bits():
    g, _ = _quantized("apot4")
    lowered, rep = lower(g, "qdq")
    proto = to_model(lowered, rep.opset)
    types = {t.data_type for t in proto.graph.initializer}
    assert onnx.TensorProto.UINT4 in types  # a 4-bit index into a 16-entry int8 codebook
    big = [t for t in proto.graph.initializer if np.prod(t.dims) > 200]
    assert all(t.data_type in (onnx.TensorProto.UINT4, onnx.TensorProto.INT4) for t in big if t.name.endswith("index")
               or t.data_type != onnx.TensorProto.FLOAT)


@pytest.mark.parametrize("spec", ["pow2:b4", "apot4", "ternary", "pwlq4", "term4:g4:t6"])
def test_bias_correction_runs_after_every_scheme(spec):
    g, calib = _quantized(spec, "resnet")
    r = PassManager("correct-bias{mode=empirical}").run(g, Context(calib=calib))
    assert r.stats["correct-bias"][0]["corrected"] >= 1


def test_quantize_rejects_zoo_activations():
    model, x = build("mlp")
    g = from_torch(model, torch.from_numpy(x))
    with pytest.raises(PassError, match="quantizes weights only"):
        PassManager("quantize{acts=apot4}").run(g.copy(), Context(calib=x))


def test_entropy_calibration_clips_a_long_tail():
    from graphopt.quantizers import Uniform
    from graphopt.quantizers.uniform import range_from_histogram
    rng = np.random.default_rng(0)
    x = np.abs(rng.standard_normal(200_000))
    x[:20] = 40.0  # a few outliers
    counts, _ = np.histogram(x, bins=2048, range=(0, 40))
    lo, hi = range_from_histogram(counts, 0.0, 40.0, Uniform(8, False), "entropy")
    assert lo == 0.0 and 3.0 < hi < 20.0
    lo2, hi2 = range_from_histogram(np.ones(2048), -1.0, 1.0, Uniform(8, True), "entropy")
    assert hi2 > 0.9 and lo2 < -0.9  # a flat histogram keeps its range


@pytest.mark.parametrize("spec", ["apot3", "pwlq3", "ternary"])
def test_gptq_drives_the_zoo_grids_and_beats_nearest_rounding(spec):
    model, x = build("mobilenetv2")
    rng = np.random.default_rng(1)
    calib = rng.standard_normal((48,) + x.shape[1:]).astype(np.float32)
    held = rng.standard_normal((32,) + x.shape[1:]).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(held)).numpy()
    errs = {}
    for method in ("mse", "gptq"):
        g = from_torch(model, torch.from_numpy(x))
        r = PassManager(f"canonicalize,fold-bn,quantize{{weights={spec},weight_method={method}}}").run(
            g, Context(calib=calib))
        with torch.no_grad():
            y = graphopt.to_torch(r.graph)(torch.from_numpy(held)).numpy()
        errs[method] = float(((y - ref) ** 2).mean())
        if method == "gptq":  # the rounded weights sit on the scheme's grid: quantizing them again is a no-op
            for n in r.graph.nodes:
                if n.op_type == "FakeQuant" and n.attr("kind") == "weight":
                    w = r.graph.const_value(n.inputs[0])
                    np.testing.assert_allclose(apply_node(r.graph, n, w), w, atol=1e-6)
    assert errs["gptq"] < errs["mse"], errs


def test_gptq_refuses_group_rounding():
    model, x = build("mlp")
    g = from_torch(model, torch.from_numpy(x))
    with pytest.raises(PassError, match="rounds groups of weights together"):
        PassManager("quantize{weights=term4:g4:t6,weight_method=gptq}").run(g, Context(calib=x))


def test_float_simulated_weights_are_stored_as_an_index_and_a_codebook():
    g, calib = _quantized("pwlq4", "resnet")
    lowered, rep = lower(g, "qdq")
    proto = to_model(lowered, rep.opset)
    floats = sum(int(np.prod(t.dims)) for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT)
    index = sum(int(np.prod(t.dims)) for t in proto.graph.initializer if t.name.endswith("_index"))
    weights = sum(int(np.prod(g.const_value(n.inputs[0]).shape)) for n in g.nodes
                  if n.op_type == "FakeQuant" and n.attr("kind") == "weight")
    assert index == weights and floats < weights / 2  # one byte a weight, codebooks are small
