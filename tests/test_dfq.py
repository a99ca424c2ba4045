"""fold-bn, equalize, absorb-bias: function preservation, properties, modified flags, negatives."""

import logging

import numpy as np
import onnx
import pytest
import torch
from graphopt.passes import _layers as L
from nets import build, rel_err, run_ort
from torch import nn

from graphopt import from_torch, load_onnx, to_onnx
from graphopt.geometry import geometry
from graphopt.meta import BN_STATS
from graphopt.passmanager import Context, PassManager
from graphopt.pipeline import parse_pipeline
from graphopt.training.calibration import collect

ACTS = {"relu": nn.ReLU, "relu6": nn.ReLU6, "leaky": lambda: nn.LeakyReLU(0.1), "prelu": lambda: nn.PReLU(8),
        "none": nn.Identity}


class Chain(nn.Module):
    """conv -> BN -> act -> grouped conv -> act -> depthwise conv -> act -> 1x1 conv -> GAP -> linear -> act -> linear"""

    def __init__(self, act="relu", bias=True):
        super().__init__()
        a = ACTS[act]
        self.c1 = nn.Conv2d(3, 8, 3, 1, 1, bias=bias)
        self.bn1 = nn.BatchNorm2d(8)
        self.a1 = a()
        self.c2 = nn.Conv2d(8, 8, 3, 1, 1, groups=2, bias=bias)
        self.a2 = a()
        self.c3 = nn.Conv2d(8, 8, 3, 1, 1, groups=8, bias=bias)
        self.bn3 = nn.BatchNorm2d(8)
        self.a3 = a()
        self.c4 = nn.Conv2d(8, 16, 1, bias=bias)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(16, 12)
        self.a4 = nn.ReLU()
        self.fc2 = nn.Linear(12, 5)

    def forward(self, x):
        x = self.a1(self.bn1(self.c1(x)))
        x = self.a3(self.bn3(self.c3(self.a2(self.c2(x)))))
        x = torch.flatten(self.pool(self.c4(x)), 1)
        return self.fc2(self.a4(self.fc1(x)))


class Residual(nn.Module):
    """A residual add with a fan-out and a concat: couplings that must not be scaled alone."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 1, 1)
        self.b1 = nn.Conv2d(8, 8, 3, 1, 1)
        self.b2 = nn.Conv2d(8, 8, 1)
        self.side = nn.Conv2d(8, 4, 1)
        self.head = nn.Conv2d(12, 6, 1)
        self.tail = nn.Conv2d(6, 6, 1)

    def forward(self, x):
        s = torch.relu(self.stem(x))  # fans out: b1 and the residual add
        y = s + self.b2(torch.relu(self.b1(s)))
        z = torch.cat([y, torch.relu(self.side(y))], 1)
        return self.tail(torch.relu(self.head(z)))


def scramble(model, seed=0):
    """Spread the per-channel weight ranges over decades, as in real depthwise layers."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                scale = 10 ** (torch.rand(m.weight.shape[0], generator=g) * 3 - 1.5)
                m.weight.mul_(scale.view(-1, *([1] * (m.weight.dim() - 1))))
                if m.bias is not None:
                    m.bias.normal_(0, 1, generator=g)
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 1, generator=g)
                m.running_var.uniform_(0.5, 2, generator=g)
                m.weight.data.normal_(0, 1, generator=g)
                m.bias.data.normal_(2, 1, generator=g)  # high biases, as absorb-bias expects
    return model.eval()


def graph_of(model, shape=(4, 3, 8, 8), seed=0):
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return from_torch(model, torch.from_numpy(x)), x


def run(g, text, calib=None):
    return PassManager(text, verify_each=True).run(g, Context(calib=calib))


def check_equal(g_before_proto, g_after, x, tol=1e-5):
    out = to_onnx(g_after)
    onnx.checker.check_model(out, full_check=True)
    assert rel_err(run_ort(out, x), run_ort(g_before_proto, x)) <= tol


# ------------------------------------------------------------------ fold-bn
@pytest.mark.parametrize("name", ["mobilenetv2", "resnet", "se"])
def test_fold_bn_preserves_function(name):
    model, x = build(name)
    g = from_torch(model, torch.from_numpy(x))
    before = to_onnx(g)
    n_bn = len(g.find_nodes("BatchNormalization"))
    r = run(g, "fold-bn")
    assert r.modified and r.stats["fold-bn"][0]["folded"] == n_bn
    assert not r.graph.find_nodes("BatchNormalization")
    check_equal(before, r.graph, x)
    assert not run(r.graph, "fold-bn").modified


def test_fold_bn_gemm_matmul_convtranspose_and_meta():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.ConvTranspose2d(3, 4, 2, stride=2, groups=1)
            self.bn0 = nn.BatchNorm2d(4)
            self.fc = nn.Linear(4 * 16 * 16, 6, bias=False)
            self.bn1 = nn.BatchNorm1d(6)

        def forward(self, x):
            return self.bn1(self.fc(torch.flatten(self.bn0(self.up(x)), 1)))

    model = scramble(M())
    for bn in (model.bn0, model.bn1):
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
    g, x = graph_of(model)
    before = to_onnx(g)
    r = run(g, "fold-bn")
    assert r.stats["fold-bn"][0]["folded"] == 2
    check_equal(before, r.graph, x)
    gemm = r.graph.find_nodes("Gemm")[0]
    meta = gemm.outputs[0].meta[BN_STATS]
    np.testing.assert_allclose(meta["gamma"], model.bn1.weight.detach().numpy(), rtol=1e-6)
    np.testing.assert_allclose(meta["beta"], model.bn1.bias.detach().numpy(), rtol=1e-6)


def test_fold_bn_negative_cases():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn_in = nn.BatchNorm2d(3)  # BN on the graph input: no producer
            self.conv = nn.Conv2d(3, 4, 1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(self.bn_in(x))
            return self.bn(y) + y  # the conv output has another user: not foldable

    g, x = graph_of(scramble(M()))
    before = to_onnx(g)
    r = run(g, "fold-bn")
    assert not r.modified and len(r.stats["fold-bn"][0]["unfolded"]) == 2
    check_equal(before, r.graph, x)


# ------------------------------------------------------------------ equalize
@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("bias", [True, False])
def test_equalize_preserves_function_and_balances(act, bias):
    g, x = graph_of(scramble(Chain(act, bias)))
    before = to_onnx(g)
    r = run(g, "fold-bn,equalize")
    st = r.stats["equalize"][0]
    assert r.stats["equalize"][0]["modified"] and st["pairs"] >= 3
    check_equal(before, r.graph, x)
    # property: each pair's per-channel ranges agree (r1 == r2 per channel)
    for chain in L.find_chains(r.graph).chains:
        r1 = np.abs(geometry(chain.l1).out_view(L.weight(r.graph, chain.l1))).max(1)
        r2 = np.abs(geometry(chain.l2).in_view(L.weight(r.graph, chain.l2))).max(1)
        np.testing.assert_allclose(r1, r2, rtol=2e-3)
    assert not run(r.graph, "equalize").modified  # idempotent
    if act == "relu6":
        assert not r.graph.find_nodes("Clip") and r.graph.find_nodes("Min")  # rewritten, not replaced


def test_equalize_spreads_fall():
    g, x = graph_of(scramble(Chain("relu6")))
    r = run(g, "fold-bn,equalize")
    for p in r.stats["equalize"][0]["pair_spreads"]:
        assert p["spread1_after"] <= p["spread1_before"] * 1.01


def test_equalize_never_scales_coupled_channels():
    model = scramble(Residual())
    g, x = graph_of(model)
    before = to_onnx(g)
    coupled = ["stem", "b2", "side"]  # outputs that feed a fan-out, an Add, a Concat
    values_before = collect(g, x, coupled)
    r = run(g, "equalize")
    check_equal(before, r.graph, x)
    reasons = r.stats["equalize"][0]["skipped_reasons"]
    assert "fans out" in reasons["stem"] and "Add" in reasons["b2"] and "Concat" in reasons["side"]
    values_after = collect(r.graph, x, coupled)
    for k in coupled:  # no branch of a coupled group was rescaled
        assert rel_err(values_after[k], values_before[k]) <= 1e-5, k
    assert r.stats["equalize"][0]["pairs"] == 2  # b1 -> b2 and head -> tail


def test_equalize_nothing_to_do():
    g, x = graph_of(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sigmoid(), nn.Conv2d(4, 2, 1)))
    r = run(g, "equalize")
    assert not r.modified and r.stats["equalize"][0]["pairs"] == 0


def test_equalize_relu6_modes(caplog):
    g, x = graph_of(scramble(Chain("relu6")))
    g = run(g, "fold-bn").graph
    before = to_onnx(g)
    skip = run(g.copy(), "equalize{relu6=skip}").graph
    assert len(skip.find_nodes("Clip")) == 3  # the Clip pairs were left alone
    check_equal(before, skip, x)
    with caplog.at_level(logging.WARNING):
        relu = run(g.copy(), "equalize{relu6=relu}").graph
    assert "changes the model's function" in caplog.text
    assert not relu.find_nodes("Clip") and not relu.find_nodes("Min")


# ------------------------------------------------------------------ absorb-bias
def test_absorb_bias_bn_rule_moves_exactly_w2_c():
    g, x = graph_of(scramble(Chain("relu")))
    g = run(g, "fold-bn").graph
    chain = next(c for c in L.find_chains(g).chains if c.l2.op_type == "Gemm")  # c4? no: fc1 -> fc2
    chain = next(c for c in L.find_chains(g).chains if c.l1.source == "c3")  # c3 -> relu -> c4 (1x1, no pad)
    meta = chain.l1.outputs[0].meta[BN_STATS]
    c = np.maximum(0, meta["beta"].astype(np.float64) - 3 * np.abs(meta["gamma"]))
    assert (c > 0).any()
    w2 = L.weight(g, chain.l2).astype(np.float64)
    b2 = L.bias(g, chain.l2).astype(np.float64)
    b1 = L.bias(g, chain.l1).astype(np.float64)
    r = run(g, "absorb-bias{source=bn}")
    assert r.modified
    new_b2 = L.bias(r.graph, chain.l2)
    np.testing.assert_allclose(new_b2, b2 + w2[:, :, 0, 0] @ c, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(L.bias(r.graph, chain.l1), b1 - c, rtol=1e-5, atol=1e-5)
    # padded layer 2 (c1 -> c2, 3x3 with padding) is left alone by default
    assert "pads with zeros" in r.stats["absorb-bias"][0]["skipped_reasons"]["c1"]


def test_absorb_bias_data_is_exact_on_calibration_data():
    g, x = graph_of(scramble(Chain("relu6")), shape=(16, 3, 8, 8))
    g = run(g, "fold-bn,equalize").graph
    for n in g.nodes:  # forget the BN metadata: the data path must do the work
        for o in n.outputs:
            o.meta.pop(BN_STATS, None)
    before = to_onnx(g)
    r = run(g, "absorb-bias{source=data}", calib=x)
    assert r.modified and r.stats["absorb-bias"][0]["absorbed"] >= 1
    check_equal(before, r.graph, x)  # exact on the calibration data
    assert not run(r.graph, "absorb-bias{source=data}", calib=x).modified
    # without data or BN metadata there is nothing to do, and it says why
    r2 = run(load_onnx(before), "absorb-bias")
    assert not r2.modified
    assert any("no calibration data" in v for v in r2.stats["absorb-bias"][0]["skipped_reasons"].values())


def test_dfq_on_effnet(effnet_path):
    g = load_onnx(effnet_path)
    dw = [n for n in g.find_nodes("Conv") if n.attr("group", 1) > 1]
    before = np.median([L.spread(geometry(n).out_view(L.weight(g, n)))[0] for n in dw])
    r = PassManager("canonicalize,fold-bn,equalize").run(g)
    g2 = r.graph
    after = np.median([L.spread(geometry(n).out_view(L.weight(g2, n)))[0] for n in g2.find_nodes("Conv")
                       if n.attr("group", 1) > 1])
    assert after < before / 4
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 224, 224)).astype(np.float32)
    assert rel_err(run_ort(to_onnx(g2), x), run_ort(str(effnet_path), x)) <= 1e-5


def test_pipeline_names_registered():
    assert str(parse_pipeline("fold-bn,equalize{max_iters=50,relu6=skip},absorb-bias{sigmas=2.5}")) == \
        "fold-bn,equalize{max_iters=50,relu6=skip},absorb-bias{sigmas=2.5}"


def test_quantize_drops_bounds_its_quantizer_implies_and_says_why_it_keeps_the_others():
    g, x = graph_of(scramble(Chain("relu6")), shape=(16, 3, 8, 8))
    eq = run(g, "fold-bn,equalize").graph
    assert eq.find_nodes("Min")  # equalize turned the ReLU6 bounds into per-channel Mins
    kept = run(eq.copy(), "quantize", calib=x)
    st = kept.stats["quantize"][0]
    assert st["bounds_kept"] and all("channels reach it" in why for why in st["bounds_kept"].values())
    assert len(kept.graph.find_nodes("Min")) == len(st["bounds_kept"])
    # a low activation range (the 50th percentile): every bound is above the quantizer's top value,
    # so the Min changes nothing after quantization and goes; on any input, not only the calibration data
    q = "quantize{act_method=percentile,percentile=50"
    implied = run(eq.copy(), q + "}", calib=x)
    ref = run(eq.copy(), q + ",drop_inactive_bounds=false}", calib=x)
    st = implied.stats["quantize"][0]
    left = implied.graph.find_nodes("Min")
    assert st["bounds_implied"] > 0
    assert len(left) + st["bounds_implied"] + st["bounds_dropped"] == len(ref.graph.find_nodes("Min"))
    assert len(st["bounds_kept"]) == len(left)
    y = np.random.default_rng(5).standard_normal((8, 3, 8, 8)).astype(np.float32) * 3
    from graphopt.backends.lowering import export

    a, b = export(implied.graph, "qdq")[0], export(ref.graph, "qdq")[0]
    np.testing.assert_allclose(run_ort(a, y), run_ort(b, y), atol=1e-6)
