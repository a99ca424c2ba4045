"""SmoothQuant (passes/smooth.py): function-preserving, folded into LayerNorm where it can be,
an explicit Mul where it cannot (with the reason), idempotent, and it helps int8."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from nets import rel_err, run_ort
from torch import nn

import graphopt
from graphopt.backends.lowering import export
from graphopt.errors import GraphOptError
from graphopt.passmanager import Context, PassManager


class Block(nn.Module):
    """LN -> q, k, v (its only readers: foldable); LN2 -> fc1 and a residual (not foldable); GELU -> fc2."""

    def __init__(self, c=16):
        super().__init__()
        self.ln, self.q, self.k, self.v = nn.LayerNorm(c), nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
        self.ln2, self.fc1, self.fc2 = nn.LayerNorm(c), nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        with torch.no_grad():  # outlier channels, as in trained transformers
            self.ln.weight[3] = 40.0
            self.ln2.weight[5] = 30.0

    def forward(self, x):
        h = self.ln(x)
        a = torch.softmax(self.q(h) @ self.k(h).transpose(1, 2) / 4, -1) @ self.v(h)
        h2 = self.ln2(a)
        y = self.fc1(h2)
        return self.fc2(torch.nn.functional.gelu(y)) + h2


def _graph():
    torch.manual_seed(0)
    x = torch.randn(32, 8, 16)
    return graphopt.from_torch(Block().eval(), x[:1]), x.numpy()


def test_smooth_preserves_the_function_and_says_where_each_factor_went():
    g, x = _graph()
    ref = graphopt.to_onnx(g)
    r = PassManager("canonicalize,smooth{alpha=0.5}").run(g, Context(calib=x))
    st = r.stats["smooth"][0]
    assert r.modified and st["smoothed"] == 3
    assert list(st["folded"].values()) == ["into LayerNormalization 'ln'"]  # q, k, v read the LN alone
    why = " ".join(st["explicit"].values())
    assert "it also feeds Add" in why and "its producer is" in why  # the residual, and the GELU before fc2
    assert rel_err(run_ort(graphopt.to_onnx(r.graph), x), run_ort(ref, x)) < 1e-5


def test_smooth_is_idempotent_and_refuses_bad_options():
    g, x = _graph()
    once = PassManager("canonicalize,smooth{alpha=auto}").run(g, Context(calib=x)).graph
    again = PassManager("smooth{alpha=auto}").run(once.copy(), Context(calib=x))
    assert not again.modified and again.stats["smooth"][0]["smoothed"] == 0
    for bad, words in (("2", "in \\[0, 1\\]"), ("abc", "a number in \\[0, 1\\] or auto")):
        with pytest.raises(GraphOptError, match=words):
            PassManager(f"smooth{{alpha={bad}}}").run(g.copy(), Context(calib=x))
    with pytest.raises(GraphOptError, match="needs calibration data"):
        PassManager("smooth").run(g.copy(), Context())


def test_smoothing_makes_static_int8_closer_to_float():
    g, x = _graph()
    ref = run_ort(graphopt.to_onnx(g), x)
    q = "quantize{weights=int8:channel,acts=uint8:tensor,act_outputs=false}"
    errs = {}
    for name, pre in (("plain", "canonicalize"), ("smooth", "canonicalize,smooth{alpha=auto}")):
        out = PassManager(f"{pre},{q}").run(g.copy(), Context(calib=x)).graph
        errs[name] = rel_err(run_ort(export(out, "qdq")[0], x), ref)
    assert errs["smooth"] < 0.7 * errs["plain"], errs


def test_gptq_with_block_scales_beats_rounding_and_stays_on_the_block_grid():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 16)).eval()
    mix = torch.randn(64, 64) / 8  # correlated inputs: where GPTQ's error feedback pays
    x = (torch.randn(256, 4, 64) @ mix).numpy()
    g = graphopt.from_torch(m, torch.from_numpy(x[:1]))
    ref = run_ort(graphopt.to_onnx(g), x)
    errs = {}
    for method in ("minmax", "gptq"):
        q = PassManager(f"canonicalize,quantize{{weights=int4:block16,acts=float,weight_method={method}}}").run(
            g.copy(), Context(calib=x[:128])).graph
        proto = export(q, "qdq")[0]
        # onnxruntime fuses DequantizeLinear (int4 blocks) + MatMul into MatMulNBits; at its default
        # accuracy level 4 that kernel quantizes the activations to int8; level 0 computes the file
        so = ort.SessionOptions()
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
        s = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
        got = s.run(None, {s.get_inputs()[0].name: x[128:]})[0]
        errs[method] = rel_err(got, ref[128:])
        with torch.no_grad():  # the file computes what the fake-quant model computes
            sim = graphopt.to_torch(q)(torch.from_numpy(x[128:])).numpy()
        assert rel_err(got, sim) < 1e-5
        fq = [n for n in q.nodes if n.op_type == "FakeQuant"]
        for n in fq:  # every weight is a whole number of its block's steps
            w, s = q.const_value(n.inputs[0]), np.asarray(q.const_value(n.inputs[1]))
            step = np.repeat(s, 16, axis=n.attr("axis"))[:w.shape[0]] if n.attr("axis") == 0 else np.repeat(s, 16, 1)
            codes = w / step
            assert method == "minmax" or np.abs(codes - np.round(codes)).max() < 1e-3
    assert errs["gptq"] < 0.8 * errs["minmax"], errs


def test_qoperator_writes_matmulnbits_that_computes_the_fake_quant_model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 16)).eval()
    x = torch.randn(16, 4, 64).numpy()
    g = graphopt.from_torch(m, torch.from_numpy(x[:1]))
    q = PassManager("canonicalize,quantize{weights=int4:block16,acts=float,weight_method=gptq}").run(
        g.copy(), Context(calib=x)).graph
    proto, rep = export(q, "qoperator")
    nbits = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 2 and rep.fused == 2 and not any(n.op_type == "DequantizeLinear" for n in proto.graph.node)
    assert {a.name: a.i for a in nbits[0].attribute}["accuracy_level"] == 0
    with torch.no_grad():
        sim = graphopt.to_torch(q)(torch.from_numpy(x)).numpy()
    assert rel_err(run_ort(proto, x), sim) < 1e-5  # default session options: the file says float activations
    # a block MatMulNBits cannot take stays a DequantizeLinear + MatMul, with the reason
    q8 = PassManager("canonicalize,quantize{weights=int4:block8,acts=float}").run(g.copy(), Context(calib=x)).graph
    _, rep8 = export(q8, "qoperator")
    assert rep8.fused == 0 and all("block of at least 16" in why for why in rep8.not_fused.values())


# ---------------------------------------------------------------- AWQ (weight-only 4-bit)
class Mlp(nn.Module):
    """LN (two outlier channels) -> fc1 -> GELU -> fc2, plus a residual: the FFN of a transformer."""

    def __init__(self, c=32):
        super().__init__()
        self.ln, self.fc1, self.fc2 = nn.LayerNorm(c), nn.Linear(c, 2 * c), nn.Linear(2 * c, c)
        with torch.no_grad():
            self.ln.weight[3], self.ln.weight[7] = 40.0, -25.0

    def forward(self, x):
        h = self.ln(x)
        return self.fc2(torch.nn.functional.gelu(self.fc1(h))) + h


def _mlp():
    torch.manual_seed(0)
    x = torch.randn(96, 8, 32)
    return graphopt.from_torch(Mlp().eval(), x[:1]), x.numpy()


def _sim(g, x):
    with torch.no_grad():
        return graphopt.to_torch(g)(torch.from_numpy(x)).numpy()


def test_awq_preserves_the_function_says_where_and_runs_once():
    g, x = _graph()
    r = PassManager("canonicalize,awq{weights=int4:block16}").run(g.copy(), Context(calib=x))
    st = r.stats["awq"][0]
    assert r.modified and st["scaled"] == 3 and st["weights"] == "int4:block16"
    assert list(st["folded"].values()) == ["into LayerNormalization 'ln'"]
    assert all(0 < a <= 1 for a in st["alpha"].values()) and all(d >= 0.01 for d in st["error_drop"].values())
    assert rel_err(_sim(r.graph, x), run_ort(graphopt.to_onnx(g), x)) < 1e-5
    again = PassManager("awq{weights=int4:block16}").run(r.graph.copy(), Context(calib=x))
    assert not again.modified and again.stats["awq"][0]["already_scaled"] == ["fc1", "fc2", "k", "q", "v"]
    # min_gain: an input is scaled only when its output error drops by that much
    none = PassManager("canonicalize,awq{weights=int4:block16,min_gain=0.99}").run(g.copy(), Context(calib=x))
    assert not none.modified and none.stats["awq"][0]["scaled"] == 0


def test_awq_refuses_bad_input():
    g, x = _graph()
    with pytest.raises(GraphOptError, match="awq needs calibration data"):
        PassManager("canonicalize,awq").run(g.copy(), Context())
    with pytest.raises(GraphOptError, match="int4:blok32"):
        PassManager("canonicalize,awq{weights=int4:blok32}").run(g.copy(), Context(calib=x))
    with pytest.raises(GraphOptError, match="min_gain must be below 1"):
        PassManager("canonicalize,awq{min_gain=1.5}").run(g.copy(), Context(calib=x))


@pytest.mark.parametrize("method", ["minmax", "gptq"])
def test_awq_makes_int4_weights_closer_to_float_on_held_out_data(method):
    g, x = _mlp()
    calib, test = x[:32], x[32:]
    ref = _sim(g, test)
    errs = {}
    for awq in ("", "awq{weights=int4:block16},"):
        q = PassManager(f"canonicalize,{awq}quantize{{weights=int4:block16,acts=float,weight_method={method}}}").run(
            g.copy(), Context(calib=calib)).graph
        errs[bool(awq)] = rel_err(_sim(q, test), ref)
    assert errs[True] < 0.8 * errs[False], errs


def test_awq_then_matmulnbits_computes_the_fake_quant_model():
    g, x = _mlp()
    q = PassManager("canonicalize,awq{weights=int4:block16},quantize{weights=int4:block16,acts=float}").run(
        g.copy(), Context(calib=x[:32])).graph
    proto, rep = export(q, "qoperator")
    assert rep.fused == 2 and sum(n.op_type == "Mul" for n in proto.graph.node) >= 1  # the explicit 1/s
    assert rel_err(run_ort(proto, x[32:]), _sim(q, x[32:])) < 1e-5


@pytest.mark.parametrize("spec", ["int4:block16", "int4:block16:asym", "uint4:block16", "int8:block16",
                                  "uint8:block16", "int2:block16"])
def test_matmulnbits_takes_asymmetric_blocks_and_a_k_that_is_not_a_multiple_of_the_block(spec):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(40, 32), nn.GELU(), nn.Linear(32, 16)).eval()  # K = 40: the last block is padded
    x = torch.randn(8, 4, 40).numpy()
    g = graphopt.from_torch(m, torch.from_numpy(x[:1]))
    q = PassManager(f"canonicalize,quantize{{weights={spec},acts=float,weight_method=gptq}}").run(
        g.copy(), Context(calib=x)).graph
    proto, rep = export(q, "qoperator")
    nbits = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 2 and rep.fused == 2
    symmetric = spec.startswith("int") and not spec.endswith("asym")
    assert all(len(n.input) == (3 if symmetric else 4) for n in nbits)  # zero points when asymmetric
    bits = {a.name: a.i for a in nbits[0].attribute}["bits"]
    assert bits == (8 if "8" in spec else 4)  # 2-bit codes live in an int4 container
    assert rel_err(run_ort(proto, x), _sim(q, x)) < 1e-5


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_with_bias_lowers_to_matmulnbits(trans_b):
    """GPT-2's Conv1D exports as Gemm (transB=0), torch Linear in some exporters as Gemm (transB=1)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 48) if trans_b else (48, 32)).astype(np.float32)
    node = helper.make_node("Gemm", ["x", "w", "c"], ["y"], transB=trans_b)
    model = helper.make_model(helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 48])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 32])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(rng.standard_normal(32).astype(np.float32), "c")]),
        opset_imports=[helper.make_opsetid("", 17)])
    from graphopt.frontends.onnx_file import from_model_proto

    x = rng.standard_normal((16, 48)).astype(np.float32)
    spec = "int4:block16:asym" if trans_b else "int4:block16"  # with and without zero points before the bias
    q = PassManager(f"canonicalize,quantize{{weights={spec},acts=float}}").run(from_model_proto(model),
                                                                              Context(calib=x)).graph
    proto, rep = export(q, "qoperator")
    assert [n.op_type for n in proto.graph.node] == ["MatMulNBits"] and rep.fused == 1
    assert rel_err(run_ort(proto, x), _sim(q, x)) < 1e-5


class Embed(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.fc = nn.Embedding(50, 64), nn.Linear(64, 16)

    def forward(self, ids):
        return self.fc(self.emb(ids))


@pytest.mark.parametrize("table", ["int4:block32", "uint4:block16"])
def test_a_4bit_embedding_table_lowers_to_gather_block_quantized(table):
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (8, 12))
    g = graphopt.from_torch(Embed().eval(), ids[:1])
    q = PassManager(f"canonicalize,quantize{{weights=int4:block16,acts=float,embeddings={table}}}").run(
        g.copy(), Context(calib=ids.numpy())).graph
    proto, rep = export(q, "qoperator")
    ops = [n.op_type for n in proto.graph.node]
    assert "GatherBlockQuantized" in ops and "Gather" not in ops and "DequantizeLinear" not in ops, ops
    table_bytes = sum(len(t.raw_data) or len(t.int32_data) for t in proto.graph.initializer if list(t.dims) == [50, 64])
    assert 0 < table_bytes <= 50 * 64 // 2  # 4 bits per entry
    assert rel_err(run_ort(proto, ids.numpy()), _sim(q, ids.numpy())) < 1e-5
    with pytest.raises(GraphOptError, match="int4:blk32"):
        PassManager("canonicalize,quantize{weights=int4:block16,acts=float,embeddings=int4:blk32}").run(
            g.copy(), Context(calib=ids.numpy()))


def test_cli_writes_the_accuracy_level_asked_for(tmp_path):
    import subprocess
    import sys

    import onnx

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 16)).eval()
    src, out = tmp_path / "m.onnx", tmp_path / "q.onnx"
    graphopt.save_onnx(graphopt.from_torch(m, torch.randn(1, 4, 64)), src)
    pipe = "canonicalize,quantize{weights=int4:block32,acts=float}"
    cmd = [sys.executable, "-m", "graphopt.cli", "convert", str(src), "-o", str(out), "--pipeline", pipe,
           "--format", "qoperator", "--no-report"]
    r = subprocess.run(cmd + ["--accuracy-level", "4"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    levels = [{a.name: a.i for a in n.attribute}["accuracy_level"] for n in onnx.load(out).graph.node
              if n.op_type == "MatMulNBits"]
    assert levels == [4, 4]
    bad = subprocess.run(cmd + ["--accuracy-level", "7"], capture_output=True, text=True)
    assert bad.returncode != 0 and "accuracy-level" in bad.stderr
    with pytest.raises(graphopt.GraphOptError, match="accuracy_level must be one of"):
        graphopt.convert(str(src), str(tmp_path / "x.onnx"), pipeline=pipe, format="qoperator", accuracy_level=9)
    assert not (tmp_path / "x.onnx").exists()
