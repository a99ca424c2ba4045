"""The quantizer registry: spec parsing and dispatch, FakeQuant attributes round-trip, gradients
to learnable parameters, and a scheme added from outside the package working end to end
(torch back end, float ONNX, report line) without touching a back end."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from nets import run_ort

import graphopt
from graphopt import GraphOptError
from graphopt.backends.lowering import lower, to_model
from graphopt.ir import Graph
from graphopt.quantizers import Lowered, Quantizer, Uniform, add_fake_quant, from_node, get, parse, register, schemes
from graphopt.quantizers.uniform import fake_quant


def _graph_with_fq(q: Quantizer, params, kind="act", axis=None, shape=(2, 3, 4)):
    g = Graph()
    x = g.add_input("x", onnx.TensorProto.FLOAT, list(shape))
    y = g.add_node("Relu", [x], ["y"]).outputs[0]
    y.dtype, y.shape = onnx.TensorProto.FLOAT, list(shape)
    g.set_outputs([y])
    add_fake_quant(g, y, q, params, kind, axis)
    return g


def test_parse_dispatches_by_keyword_and_names_unknown_schemes():
    assert isinstance(parse("int8:channel"), Uniform) and parse("uint8").signed is False
    assert "uniform" in schemes() and get("uniform") is Uniform
    with pytest.raises(GraphOptError, match="unknown quantizer 'flot'.*did you mean 'float'|unknown quantizer 'flot'"):
        parse("flot8", "weights")
    with pytest.raises(GraphOptError, match="unknown quantizer scheme 'unifrom'.*uniform"):
        get("unifrom")


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(2, 16), signed=st.booleans(), gran=st.sampled_from(["tensor", "channel", "block"]),
       sym=st.booleans(), learnable=st.booleans())
def test_attrs_round_trip_through_the_node(bits, signed, gran, sym, learnable):
    q = Uniform(bits, signed, gran, 4 if gran == "block" else 0, sym, learnable=learnable)
    axis = None if gran == "tensor" else 1
    n = 3 if gran == "channel" else (1 if gran == "block" else 1)
    g = _graph_with_fq(q, {"scale": np.full(n, 0.1, np.float32), "zero_point": np.zeros(n, np.float32)}, axis=axis)
    (fq,) = [m for m in g.nodes if m.op_type == "FakeQuant"]
    assert from_node(fq) == q and fq.attr("scheme") == "uniform"
    assert parse(str(q)) == Uniform(bits, signed, gran, q.block_size, sym)


def test_a_node_without_scheme_is_uniform():
    g = _graph_with_fq(Uniform(8, False, symmetric=False), {"scale": np.float32(0.1), "zero_point": np.float32(3)})
    (fq,) = [m for m in g.nodes if m.op_type == "FakeQuant"]
    del fq.attrs["scheme"]
    assert isinstance(from_node(fq), Uniform)


def test_gradients_reach_scale_and_zero_point():
    """dy/dx is the clipped STE; dy/ds and dy/dz are their exact values given the rounding."""
    x = torch.tensor([-10.0, -0.26, 0.04, 0.31, 10.0], requires_grad=True)
    s = torch.tensor(0.1, requires_grad=True)
    z = torch.tensor(1.0, requires_grad=True)
    y = fake_quant(x, s, z, -8, 7, None, 0)
    y.sum().backward()
    u = x.detach() / 0.1
    inside = ((torch.round(u) + 1 >= -8) & (torch.round(u) + 1 <= 7))
    ds = torch.where(inside, torch.round(u) - u, torch.where(u < 0, torch.tensor(-8.0 - 1), torch.tensor(7.0 - 1)))
    assert x.grad.tolist() == inside.float().tolist()
    assert s.grad.item() == pytest.approx(float(ds.sum()), rel=1e-5)
    assert z.grad.item() == pytest.approx(-0.1 * float((~inside).sum()), rel=1e-5)
    # forward value is exactly the gradient-free formula
    with torch.no_grad():
        ref = fake_quant(x.detach(), s.detach(), z.detach(), -8, 7, None, 0)
    assert torch.equal(y.detach(), ref)


def test_learnable_scale_is_a_parameter_that_trains_and_writes_back():
    g = _graph_with_fq(Uniform(4, True, learnable=True), {"scale": np.float32(0.05), "zero_point": np.float32(0)})
    m = graphopt.to_torch(g)
    assert len(list(m.parameters())) == 1  # the scale; the zero point stays a buffer
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    x = torch.randn(64, 3, 4) * 3
    for _ in range(20):  # clipping hurts a lot at s=0.05: the scale must grow
        opt.zero_grad()
        ((m(x) - torch.relu(x)) ** 2).mean().backward()
        opt.step()
    graphopt.ir.Graph.update_from(g, m)
    (fq,) = [n for n in g.nodes if n.op_type == "FakeQuant"]
    assert float(np.asarray(g.const_value(fq.inputs[1]))) > 0.06
    frozen = _graph_with_fq(Uniform(4, True), {"scale": np.float32(0.05), "zero_point": np.float32(0)})
    assert len(list(graphopt.to_torch(frozen).parameters())) == 0


# ------------------------------------------------------------------ a scheme from outside
def sign_torch(x, scale, *_):
    y = torch.where(x >= 0, scale, -scale)
    return y if not x.requires_grad else y.detach() + (x - x.detach()) * (x.abs() <= 1).to(x.dtype)


@register
@dataclass(frozen=True)
class SignForTest(Quantizer):
    """Binary: y = scale * sign(x). One file's worth of scheme, as the README shows."""

    scheme = "test-sign"
    keywords = ("testsign",)
    param_names = ("scale",)

    @classmethod
    def parse(cls, text, what):
        return cls()

    def to_attrs(self):
        return {}

    @classmethod
    def from_attrs(cls, attrs):
        return cls()

    def act_params(self, lo, hi):
        return {"scale": np.float32(max(-lo, hi) / 2)}

    def apply_np(self, x, params, axis):
        return np.where(np.asarray(x) >= 0, params["scale"], -params["scale"]).astype(np.float32)

    def torch_function(self, axis):
        return sign_torch, ()

    def lower(self, graph, node, fmt):
        x, out = node.inputs[0], node.outputs[0]
        s = graph.add_const(np.asarray(graph.const_value(node.inputs[1]), np.float32), "sign_scale")
        zero = graph.add_const(np.zeros((), np.float32), "sign_zero")
        ge = graph.add_node("GreaterOrEqual", [x, zero], ["sign_ge"], source=node.source).outputs[0]
        neg = graph.add_node("Neg", [s], ["sign_neg"], source=node.source).outputs[0]
        y = graph.add_node("Where", [ge, s, neg], ["sign_y"], source=node.source).outputs[0]
        y.dtype, y.shape = out.dtype, out.shape
        graph.replace_all_uses(out, y)
        graph.remove_node(node)
        return Lowered(False, 13, "binary codes have no ONNX integer kernel")

    def describe(self):
        return "test sign (binary)"


def test_a_new_scheme_runs_everywhere_without_touching_the_back_ends():
    q = parse("testsign", "acts")
    assert isinstance(q, SignForTest)
    g = _graph_with_fq(q, q.act_params(-2.0, 2.0))
    x = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)
    with torch.no_grad():
        got = graphopt.to_torch(g)(torch.from_numpy(x)).numpy()
    ref = np.where(np.maximum(x, 0) >= 0, 1.0, -1.0).astype(np.float32)
    np.testing.assert_array_equal(got, ref)
    lowered, rep = lower(g, "qdq")
    assert rep.simulated_why and "no ONNX integer kernel" in rep.lines()[0]
    assert rep.schemes == {"test sign (binary)": 1}
    proto = to_model(lowered, rep.opset)
    onnx.checker.check_model(proto, full_check=True)
    np.testing.assert_array_equal(run_ort(proto, x), ref)
    with pytest.raises(GraphOptError, match="8-bit integer kernels.*test sign"):
        lower(g, "qoperator")


def test_quantize_learn_scales_makes_every_scale_a_parameter():
    from nets import build

    from graphopt.passmanager import Context, PassManager

    model, x = build("mlp")
    g = graphopt.from_torch(model, torch.from_numpy(x))
    calib = np.random.default_rng(0).standard_normal((16, 16)).astype(np.float32)
    fixed = PassManager("quantize").run(g.copy(), Context(calib=calib)).graph
    learn = PassManager("quantize{learn_scales=true}").run(g.copy(), Context(calib=calib)).graph
    fqs = [n for n in learn.nodes if n.op_type == "FakeQuant" and n.attr("kind") != "bias"]
    assert fqs and all(from_node(n).learnable for n in fqs)
    n_fixed = len(list(graphopt.to_torch(fixed).parameters()))
    m = graphopt.to_torch(learn)
    assert len(list(m.parameters())) == n_fixed + len(fqs)
    out = m(torch.from_numpy(calib)).sum()
    out.backward()
    scale_params = [m.get_parameter(m.param_names[n.inputs[1].name]) for n in fqs]
    assert all(p.grad is not None for p in scale_params) and any(float(p.grad.abs()) > 0 for p in scale_params
                                                                  if p.numel() == 1)


def test_one_spec_grammar_for_every_scheme():
    """Uniform and the zoo read their specs with one grammar (base.parse_tokens): options in any
    order, each once, and the same one-line refusals."""
    assert parse("int8:sym:channel", "weights") == parse("int8:channel:sym", "weights")
    assert parse("uint4:lsq:tensor", "acts") == parse("uint4:tensor:lsq", "acts")
    assert parse("apot4:k2:tensor", "weights") == parse("apot4:tensor:k2", "weights")
    for spec, scheme in (("int8:diagonal", "uniform"), ("apot4:diagonal", "apot"), ("pwlq4:diagonal", "pwlq")):
        with pytest.raises(GraphOptError, match=f"bad weights spec '{spec}': unknown option 'diagonal' for {scheme}"):
            parse(spec, "weights")
    for spec in ("int8:channel:tensor", "pow2:b4:channel:tensor", "int4:block32:channel", "apot4:b3"):
        with pytest.raises(GraphOptError, match="given twice|not beside"):
            parse(spec, "weights")
