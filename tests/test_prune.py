"""Dependency analysis, prune-channels and fold-prune."""

import numpy as np
import onnx
import pytest
import torch
from graphopt.passes import _layers as L
from graphopt.passes.prune import analyze
from nets import build, rel_err, run_ort
from torch import nn

from graphopt import GraphOptError, PassError, from_torch, load_onnx, to_onnx
from graphopt.analysis import total_macs
from graphopt.masks import channel_keep
from graphopt.passmanager import Context, PassManager


class GroupedNet(nn.Module):
    """a -> grouped conv g -> b. The default is 2 groups of 4 channels; ``GroupedNet(4, 8, 4)`` has
    group == in_channels but 2 outputs per group: not depthwise, one input channel per group."""

    def __init__(self, cin: int = 8, cout: int = 8, groups: int = 2, out: int = 4):
        super().__init__()
        self.a = nn.Conv2d(3, cin, 1)
        self.g = nn.Conv2d(cin, cout, 3, padding=1, groups=groups)
        self.b = nn.Conv2d(cout, out, 1)

    def forward(self, x):
        return self.b(torch.relu(self.g(torch.relu(self.a(x)))))


class OneChannel(nn.Module):
    """A conv with one output channel is not depthwise (Torch-Pruning #179)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.one = nn.Conv2d(6, 1, 1)
        self.b = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        return self.b(y) * torch.sigmoid(self.one(y))  # [N,1,H,W] broadcast: does not couple


def masked_model(g):
    """The masked model: the same graph where every pruned channel is multiplied by 0 wherever it
    leaves its group (independent of fold-prune's index mapping)."""
    m = g.copy()
    masks = channel_keep(m)
    keeps = {}
    for sp in analyze(m):
        if sp.key in masks:  # a space padded into this one keeps the channels in its range
            k = np.asarray(masks[sp.key])
            for member, off in sp.tree():
                keeps[member.id] = k[(k >= off) & (k < off + member.channels)] - off
    for sp in analyze(m):
        if sp.id not in keeps:
            continue
        keep = np.zeros(sp.channels, np.float32)
        keep[keeps[sp.id]] = 1.0
        members = set(sp.values)
        for v in list(sp.values):
            for u, i in list(v.uses):
                if i < 0 or (u.outputs and u.outputs[0] in members):
                    continue
                rank = len(v.shape)
                c = m.add_const(keep.reshape((sp.channels,) + (1,) * (rank - 2)), v.name + "_mask")
                mul = m.add_node("Mul", [v, c], [v.name + "_masked"])
                m.set_input(u, i, mul.outputs[0])
    return m


@pytest.mark.parametrize("name", ["resnet", "mobilenetv2", "concat", "split", "se", "mlp"])
@pytest.mark.parametrize("bn", [True, False])
def test_folded_model_equals_masked_model(name, bn):
    model, x = build(name)
    g = from_torch(model, torch.from_numpy(x))
    if bn:
        g = PassManager("canonicalize,fold-bn").run(g).graph
    p0, m0 = g.num_params(), total_macs(g)
    r = PassManager("prune-channels{ratio=0.3}", verify_each=True).run(g)
    masked = to_onnx(masked_model(r.graph))
    folded = PassManager("fold-prune", verify_each=True).run(r.graph)
    out = to_onnx(folded.graph)
    onnx.checker.check_model(out, full_check=True)
    assert rel_err(run_ort(out, x), run_ort(masked, x)) <= 1e-5
    if r.stats["prune-channels"][0]["pruned_groups"]:
        assert folded.graph.num_params() < p0 and total_macs(folded.graph) < m0
    assert not PassManager("fold-prune").run(folded.graph).modified  # masks are consumed


def test_params_and_macs_drop_as_predicted():
    model = nn.Sequential(nn.Conv2d(3, 10, 3, padding=1), nn.ReLU(), nn.Conv2d(10, 6, 1))
    x = torch.randn(2, 3, 8, 8)
    g = from_torch(model, x)
    r = PassManager("prune-channels{ratio=0.5},fold-prune").run(g)
    # 5 of 10 channels go: conv1 loses 5*(27+1) params, conv2 loses 5*6; MACs per position likewise
    assert r.graph.num_params() == (10 * 28 + 6 * 11) - (5 * 28 + 5 * 6)
    assert total_macs(r.graph) == 64 * (5 * 27) + 64 * (6 * 5)


def test_residual_add_couples_all_branches():
    model, x = build("resnet")
    g = PassManager("canonicalize,fold-bn").run(from_torch(model, torch.from_numpy(x))).graph
    spaces = analyze(g)
    l1 = next(sp for sp in spaces if any(n.source == "l1.conv2" for n in sp.producers))
    assert {"conv", "l1.conv2"} <= {n.source for n in l1.producers}  # stem and residual branch share channels


def test_broadcast_mul_and_one_channel_conv_do_not_couple():
    g = from_torch(OneChannel(), torch.randn(2, 3, 8, 8))
    spaces = analyze(g)
    a = next(sp for sp in spaces if any(n.source == "a" for n in sp.producers))
    assert a.prunable and [n.source for n in a.producers] == ["a"]
    assert not a.depthwise  # the 1-output-channel conv reads the channels, it does not pass them through
    assert {n.source for n, _ in a.consumers} == {"one", "b"}


def test_unknown_op_makes_its_group_unprunable_and_says_so():
    model, x = build("resnet")
    proto = to_onnx(PassManager("canonicalize,fold-bn").run(from_torch(model, torch.from_numpy(x))).graph)
    g = load_onnx(proto)
    relu = next(n for n in g.nodes if n.op_type == "Relu" and n.source.startswith("l1"))
    relu.op_type, relu.domain = "MysteryAct", "vendor.ops"
    g.opset_imports["vendor.ops"] = 1
    r = PassManager("prune-channels{ratio=0.5}").run(g)
    reasons = r.stats["prune-channels"][0]["unprunable"]
    assert any("vendor.ops::MysteryAct" in why for why in reasons.values())


@pytest.mark.parametrize("round_to", [1, 4])
def test_grouped_conv_loses_channels_equally_per_group(round_to):
    x = torch.randn(2, 3, 8, 8)
    g = from_torch(GroupedNet(), x)
    r = PassManager(f"prune-channels{{ratio=0.5,round_to={round_to}}}").run(g)
    masks = channel_keep(r.graph)
    assert len(masks) == 2  # the grouped conv's input and output groups
    for keep in masks.values():
        keep = np.asarray(keep)
        assert (keep < 4).sum() == (keep >= 4).sum() == 2  # 2 of the 4 channels of each group
    masked = to_onnx(masked_model(r.graph))
    folded = PassManager("fold-prune", verify_each=True).run(r.graph).graph
    out = to_onnx(folded)
    onnx.checker.check_model(out, full_check=True)
    assert rel_err(run_ort(out, x.numpy()), run_ort(masked, x.numpy())) <= 1e-5
    conv = next(n for n in folded.nodes if n.op_type == "Conv" and n.attr("group", 1) > 1)
    assert conv.attr("group") == 2 and list(L.weight(folded, conv).shape) == [4, 2, 3, 3]


def test_grouped_conv_with_one_input_channel_per_group_is_reported():
    g = from_torch(GroupedNet(4, 8, groups=4, out=2), torch.randn(2, 3, 8, 8))
    r = PassManager("prune-channels{ratio=0.5}").run(g)
    reasons = r.stats["prune-channels"][0]["unprunable"]
    assert any("reads one channel per group" in why for why in reasons.values())
    keep = channel_keep(r.graph)
    assert len(keep) == 1 and len(next(iter(keep.values()))) == 4  # dm's output: one of 2 per group
    folded = PassManager("fold-prune").run(r.graph).graph
    assert next(n for n in folded.nodes if n.source == "g").attr("group") == 4


def test_round_to_and_skip():
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 24, 1), nn.ReLU(), nn.Conv2d(24, 4, 1))
    g = from_torch(model, torch.randn(1, 3, 8, 8))
    r = PassManager("prune-channels{ratio=0.3,round_to=8,skip=[2]},fold-prune").run(g)
    convs = r.graph.find_nodes("Conv")
    assert L.weight(r.graph, convs[0]).shape[0] == 24  # 32 * 0.7 = 22.4 -> 24
    assert L.weight(r.graph, convs[1]).shape[0] == 24  # skipped


def test_bad_ratio_and_empty_groups():
    model, x = build("mlp")
    g = from_torch(model, torch.from_numpy(x))
    with pytest.raises(Exception, match=r"must be <"):
        PassManager("prune-channels{ratio=1.0}").run(g)
    with pytest.raises(PassError, match="ratio must be in"):
        from graphopt.passes.prune import PruneChannels
        PassManager([PruneChannels(ratio=-0.1)]).run(g)


def test_effnet_prune_and_fold_runs(effnet_path):
    g = load_onnx(effnet_path)
    pruned = PassManager("canonicalize,prune-channels{ratio=0.3}").run(g, Context()).graph
    masked = to_onnx(masked_model(pruned))
    r = PassManager("fold-prune").run(pruned, Context())
    out = to_onnx(r.graph)
    onnx.checker.check_model(out, full_check=True)
    assert total_macs(r.graph) < 0.8 * total_macs(load_onnx(effnet_path))
    x = np.random.default_rng(0).uniform(-1, 1, (1, 3, 224, 224)).astype(np.float32)
    assert rel_err(run_ort(out, x), run_ort(masked, x)) <= 1e-5


class PadShortcut(nn.Module):
    """A shortcut that pads channels with ones: not a zero padding, so not understood."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.c = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        z = self.b(y) + torch.nn.functional.pad(y[:, :, ::2, ::2], (0, 0, 0, 0, 2, 2), value=1.0)
        return self.c(torch.relu(z))


def test_channels_made_by_an_unknown_op_are_not_pruned():
    g = from_torch(PadShortcut(), torch.randn(2, 3, 8, 8))
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    before = to_onnx(g)
    pruned = PassManager("prune-channels{ratio=0.5}", verify_each=True).run(g)
    reasons = pruned.stats["prune-channels"][0]["unprunable"]
    assert any("Pad" in why for why in reasons.values())
    masked = to_onnx(masked_model(pruned.graph))
    # every group touches the Pad (a, b through the Add) or the output (c): nothing may change
    assert rel_err(run_ort(masked, x), run_ort(before, x)) <= 1e-5
    r = PassManager("fold-prune", verify_each=True).run(pruned.graph)
    b = next(n for n in r.graph.nodes if n.source == "b")
    assert L.weight(r.graph, b).shape[0] == 8  # coupled to the Pad output by the Add: untouched
    out = to_onnx(r.graph)
    onnx.checker.check_model(out, full_check=True)
    assert rel_err(run_ort(out, x), run_ort(masked, x)) <= 1e-5


def test_sensitivity_and_target_macs():
    from graphopt.passes.prune import allocate_ratios, sensitivity

    model, x = build("mobilenetv2")
    g = PassManager("canonicalize,fold-bn").run(from_torch(model, torch.from_numpy(x))).graph
    data = np.random.default_rng(0).standard_normal((16,) + x.shape[1:]).astype(np.float32)
    ref = run_ort(to_onnx(g), data)
    labels = ref.argmax(1)  # the unpruned model's own predictions: it scores 100% on them
    rows = sensitivity(g, data, ratios=(0.25, 0.75), labels=labels)
    assert rows and all({"group", "ratio", "rel_error", "macs_saved", "top1"} <= set(r) for r in rows)
    # top-1 is measured against the labels: 100% where the output is unchanged, never outside [0, 100],
    # and pruning three quarters of a group changes some prediction somewhere
    assert all(0 <= r["top1"] <= 100 and r["rel_error"] > 0 for r in rows)
    assert all(r["top1"] == 100 for r in rows if r["rel_error"] < 1e-6)
    assert min(r["top1"] for r in rows) < 100
    for grp in {r["group"] for r in rows}:  # more pruning of one group never saves fewer MACs
        rs = sorted((r for r in rows if r["group"] == grp), key=lambda r: r["ratio"])
        assert all(a["macs_saved"] <= b["macs_saved"] for a, b in zip(rs, rs[1:]))
    plan = allocate_ratios(rows, 0.2)
    assert plan and sum(next(r["macs_saved"] for r in rows if r["group"] == k and r["ratio"] == v)
                        for k, v in plan.items()) >= 0.2 - 1e-9
    m0 = total_macs(g)
    r = PassManager("prune-channels{target_macs=0.8},fold-prune").run(g, Context(calib=data))
    assert total_macs(r.graph) <= 0.8 * m0 + 1
    with pytest.raises(PassError, match="needs calibration data"):
        PassManager("prune-channels{target_macs=0.8}").run(g)


def test_cli_analyze_sensitivity(tmp_path):
    import subprocess
    import sys

    model, x = build("mobilenetv2")
    p = tmp_path / "m.onnx"
    p.write_bytes(to_onnx(from_torch(model, torch.from_numpy(x))).SerializeToString())
    np.save(tmp_path / "c.npy", np.random.default_rng(0).standard_normal((8,) + x.shape[1:]).astype(np.float32))
    r = subprocess.run([sys.executable, "-m", "graphopt.cli", "analyze", "sensitivity", str(p), "--calib",
                        str(tmp_path / "c.npy"), "--ratios", "0.25,0.5", "--plot", str(tmp_path / "s.png")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "r=0.25" in r.stdout and (tmp_path / "s.png").stat().st_size > 1000
    r = subprocess.run([sys.executable, "-m", "graphopt.cli", "analyze", "sensitivity", str(p), "--calib",
                        str(tmp_path / "c.npy"), "--ratios", "1.5"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "--ratios must lie in (0, 1)" in r.stderr


class TwoConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.b = nn.Conv2d(6, 5, 3, padding=1)

    def forward(self, x):
        return self.b(torch.relu(self.a(x))).mean((2, 3))


def test_taylor_scores_equal_gradient_times_weight_by_hand():
    """One batch: score[c] = (sum of grad*weight over conv a's row c, bias c and conv b's column c)^2,
    computed here with plain torch autograd on the original module."""
    from graphopt.passes.prune import taylor_scores

    torch.manual_seed(0)
    model = TwoConv()
    x = torch.randn(8, 3, 6, 6)
    g = from_torch(model, x)
    sp = next(sp for sp in analyze(g) if [n.source for n in sp.producers] == ["a"])
    got = taylor_scores(g, [sp], x.numpy())[sp.key]
    out = model(x)
    torch.nn.functional.cross_entropy(out, out.detach().argmax(1)).backward()
    a, b = model.a, model.b
    t = ((a.weight.grad * a.weight).sum((1, 2, 3)) + a.bias.grad * a.bias
         + (b.weight.grad * b.weight).sum((0, 2, 3))).detach().double().numpy()
    np.testing.assert_allclose(got, t * t, rtol=1e-4, atol=1e-12)
    assert got.std() > 0  # channels differ


def test_taylor_criterion_prunes_and_needs_calibration():
    model, x = build("resnet")
    g = PassManager("canonicalize,fold-bn").run(from_torch(model, torch.from_numpy(x))).graph
    with pytest.raises(PassError, match="criterion=taylor. needs calibration data"):
        PassManager("prune-channels{criterion=taylor}").run(g.copy())
    data = np.random.default_rng(0).standard_normal((16,) + x.shape[1:]).astype(np.float32)
    r = PassManager("prune-channels{ratio=0.5,criterion=taylor}").run(g.copy(), Context(calib=data))
    l1 = PassManager("prune-channels{ratio=0.5,criterion=l1}").run(g.copy())
    masks_t, masks_l1 = (channel_keep(p.graph) for p in (r, l1))
    assert masks_t.keys() == masks_l1.keys() and masks_t != masks_l1  # same groups, its own choice
    folded = PassManager("fold-prune").run(r.graph).graph
    assert total_macs(folded) < total_macs(g)


def test_recalibrate_bn_matches_data_statistics():
    """The first BN's new statistics are the mean and (unbiased) variance of its input over the
    calibration data, computed here with numpy; a second run changes nothing; no data: an error."""
    from graphopt.training.calibration import CalibrationData, collect

    model, x = build("resnet")
    g = PassManager("canonicalize").run(from_torch(model, torch.from_numpy(x))).graph
    g = PassManager("prune-channels{ratio=0.5},fold-prune").run(g).graph
    data = np.random.default_rng(0).standard_normal((16,) + x.shape[1:]).astype(np.float32) * 2 + 0.5
    calib = CalibrationData(data, batch_size=16)  # one batch: the average over batches is exact
    bn = next(n for n in g.nodes if n.op_type == "BatchNormalization")
    act = collect(g, calib, [bn.inputs[0].name])[bn.inputs[0].name].astype(np.float64)
    with pytest.raises(PassError, match="recalibrate-bn needs calibration data"):
        PassManager("recalibrate-bn").run(g.copy())
    r = PassManager("recalibrate-bn", verify_each=True).run(g, Context(calib=calib))
    assert r.modified and r.stats["recalibrate-bn"][0]["recalibrated"] == len(g.find_nodes("BatchNormalization"))
    np.testing.assert_allclose(g.const_value(bn.inputs[3]), act.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(g.const_value(bn.inputs[4]), act.transpose(1, 0, 2, 3).reshape(act.shape[1], -1)
                               .var(1, ddof=1), rtol=1e-4, atol=1e-5)
    assert not PassManager("recalibrate-bn").run(g, Context(calib=calib)).modified  # idempotent
    folded = PassManager("fold-bn").run(g.copy()).graph
    assert not PassManager("recalibrate-bn").run(folded, Context(calib=calib)).modified  # nothing to do


def test_cli_taylor_prune_recalibrate_then_fold(tmp_path):
    import subprocess
    import sys

    model, x = build("resnet")
    p = tmp_path / "m.onnx"
    g = PassManager("canonicalize").run(from_torch(model, torch.from_numpy(x))).graph  # BN kept
    p.write_bytes(to_onnx(g).SerializeToString())
    np.save(tmp_path / "c.npy", np.random.default_rng(0).standard_normal((16,) + x.shape[1:]).astype(np.float32))
    pipe = "prune-channels{ratio=0.5,criterion=taylor},fold-prune,recalibrate-bn,fold-bn"
    out = tmp_path / "small.onnx"
    r = subprocess.run([sys.executable, "-m", "graphopt.cli", "convert", str(p), "-o", str(out), "--pipeline", pipe,
                        "--calib", str(tmp_path / "c.npy")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Warning" not in r.stderr, r.stderr  # a read-only memmapped .npy must not make torch warn
    small = load_onnx(out)
    onnx.checker.check_model(to_onnx(small), full_check=True)
    assert not small.find_nodes("BatchNormalization") and total_macs(small) < total_macs(g)
    r = subprocess.run([sys.executable, "-m", "graphopt.cli", "convert", str(p), "-o", str(tmp_path / "x.onnx"),
                        "--pipeline", pipe], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "needs calibration data" in r.stderr and not (tmp_path / "x.onnx").exists()


def test_allocation_steps_over_ratios_that_round_to_the_same_count():
    """With round_to, neighbouring ratios can keep the same channels (zero gain); the greedy
    allocation must step over them rather than stop there."""
    from graphopt.passes.prune import allocate_ratios

    rows = [{"group": "a", "ratio": r, "macs_saved": s, "rel_error": e}
            for r, s, e in ((0.2, 0.1, 0.01), (0.3, 0.1, 0.01), (0.5, 0.3, 0.05))]
    rows += [{"group": "b", "ratio": 0.5, "macs_saved": 0.05, "rel_error": 0.9}]
    assert allocate_ratios(rows, 0.25) == {"a": 0.5}  # b is far costlier per MAC saved


class OptionA(nn.Module):
    """A CIFAR ResNet with option-A shortcuts: subsample and zero-pad the channels."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.a1, self.a2 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.b1, self.b2 = nn.Conv2d(8, 16, 3, 2, 1), nn.Conv2d(16, 16, 3, padding=1)
        self.c1, self.c2 = nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = torch.relu(x + self.a2(torch.relu(self.a1(x))))
        short = torch.nn.functional.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 4, 4))
        x = torch.relu(short + self.b2(torch.relu(self.b1(x))))
        x = torch.relu(x + self.c2(torch.relu(self.c1(x))))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("round_to", [1, 4])
def test_option_a_shortcut_prunes_the_residual_stream(round_to):
    x = torch.randn(2, 3, 8, 8)
    g = from_torch(OptionA().eval(), x)
    stream = next(sp for sp in analyze(g) if any(n.source == "c2" for n in sp.producers))
    assert stream.prunable and [c.channels for c in stream.children] == [8]  # stage 1 padded into stage 2
    assert {n.source for n in stream.children[0].producers} == {"stem", "a2"}
    r = PassManager(f"prune-channels{{ratio=0.5,round_to={round_to}}}").run(g)
    assert not r.stats["prune-channels"][0]["unprunable"].get("stem")
    masked = to_onnx(masked_model(r.graph))
    folded = PassManager("fold-prune", verify_each=True).run(r.graph).graph
    out = to_onnx(folded)
    onnx.checker.check_model(out, full_check=True)
    assert rel_err(run_ort(out, x.numpy()), run_ort(masked, x.numpy())) <= 1e-5
    widths = {n.source: L.weight(folded, n).shape[0] for n in folded.nodes if n.op_type == "Conv"}
    assert widths["stem"] == widths["a2"] == 4 and widths["b2"] == widths["c2"] == 8  # half of every stream
    assert all(w % round_to == 0 for w in widths.values())
    pad = next(n for n in folded.nodes if n.op_type == "Pad")
    pads = folded.const_value(pad.inputs[1]).tolist()
    assert pads[1] + pads[5] == 4  # of the 8 zero channels, the kept ones remain as padding


def test_pad_with_a_value_or_two_pads_of_one_group_are_refused():
    class TwoPads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 6, 1), nn.Conv2d(4, 8, 1)

        def forward(self, x):
            y = torch.relu(self.a(x))
            f = torch.nn.functional.pad
            return self.b(y) + f(y, (0, 0, 0, 0, 1, 1)), self.c(y) + f(y, (0, 0, 0, 0, 2, 2), value=1.0)

    g = from_torch(TwoPads(), torch.randn(2, 3, 4, 4))
    a = next(sp for sp in analyze(g) if [n.source for n in sp.producers] == ["a"])
    assert not a.prunable and any("Pad" in why for why in a.reasons)


def test_skip_keeps_one_member_of_a_padded_tree():
    x = torch.randn(2, 3, 8, 8)
    g = from_torch(OptionA().eval(), x)
    r = PassManager("prune-channels{ratio=0.5,skip=[stem]}").run(g)
    masked = to_onnx(masked_model(r.graph))
    assert len(r.graph.find_nodes("Pad")) == 1
    fp = PassManager("fold-prune").run(r.graph)
    folded = fp.graph
    assert rel_err(run_ort(to_onnx(folded), x.numpy()), run_ort(masked, x.numpy())) <= 1e-5
    widths = {n.source: L.weight(folded, n).shape[0] for n in folded.nodes if n.op_type == "Conv"}
    assert widths["stem"] == widths["a2"] == 8  # stage 1 kept whole
    assert widths["b2"] == widths["c2"] == 8  # stage 2 keeps half of 16: stage 1's 8, none of its own
    # no zero channels are left to add, so the Pad pads nothing and is gone
    assert not folded.find_nodes("Pad") and fp.stats["fold-prune"][0]["pads_removed"] == 1
    assert widths["a1"] == 4 and widths["b1"] == widths["c1"] == 8  # inner groups are pruned as usual


def test_target_macs_selection_honours_skip_inside_a_padded_tree():
    """target_macs selects through _keep_top; a skipped member of a tree keeps its channels there too."""
    from graphopt.passes.prune import _keep_top

    g = from_torch(OptionA().eval(), torch.randn(2, 3, 8, 8))
    stream = next(sp for sp in analyze(g) if any(n.source == "c2" for n in sp.producers))
    off = stream.children[0].parent[1]  # stage 1's 8 channels sit at [off, off + 8) of the stream
    rng = np.random.default_rng(0)
    stage1 = lambda keep: [k for k in keep if off <= k < off + 8]  # noqa: E731
    assert len(stage1(_keep_top(g, stream, 0.5, "l1", 1, rng))) == 4
    assert len(stage1(_keep_top(g, stream, 0.5, "l1", 1, rng, skip=["stem"]))) == 8


def test_target_macs_and_taylor_on_a_padded_tree():
    x = torch.randn(2, 3, 8, 8)
    g = from_torch(OptionA().eval(), x)
    data = np.random.default_rng(0).standard_normal((8, 3, 8, 8)).astype(np.float32)
    m0 = total_macs(g)
    r = PassManager("prune-channels{target_macs=0.6,criterion=taylor},fold-prune", verify_each=True).run(
        g.copy(), Context(calib=data))
    assert total_macs(r.graph) <= 0.6 * m0 + 1
    onnx.checker.check_model(to_onnx(r.graph), full_check=True)


def test_default_round_to_is_this_cpus_channel_block(monkeypatch):
    """No round_to: the channel block of this CPU (or GRAPHOPT_CHANNEL_BLOCK), stated in the stats."""
    from graphopt.util import channel_block

    monkeypatch.delenv("GRAPHOPT_CHANNEL_BLOCK", raising=False)
    block, why = channel_block()
    assert block in (4, 8, 16) and why
    monkeypatch.setenv("GRAPHOPT_CHANNEL_BLOCK", "4")
    model, x = build("resnet")
    g = PassManager("canonicalize,fold-bn").run(from_torch(model, torch.from_numpy(x))).graph
    r = PassManager("prune-channels{ratio=0.5}").run(g.copy())
    st = r.stats["prune-channels"][0]
    assert st["round_to"] == "4 (GRAPHOPT_CHANNEL_BLOCK)"
    assert all(len(k) % 4 == 0 for k in channel_keep(r.graph).values())
    explicit = PassManager("prune-channels{ratio=0.5,round_to=1}").run(g.copy()).stats["prune-channels"][0]
    assert "round_to" not in explicit  # an explicit value is used as given
    monkeypatch.setenv("GRAPHOPT_CHANNEL_BLOCK", "x")
    with pytest.raises(GraphOptError, match="GRAPHOPT_CHANNEL_BLOCK must be a positive integer"):
        PassManager("prune-channels{ratio=0.5}").run(g.copy())
