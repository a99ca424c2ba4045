"""Column combining (graphopt.columns, the column-combine pass, the systolic back end, the packed
file and `graphopt analyze columns`): the grouping keeps its promises, the packed array computes
exactly what the sparse layer computes, and the packed file rebuilds the weights bit for bit."""

import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from nets import build

import graphopt
from graphopt import columns as C
from graphopt.backends import systolic as S
from graphopt.errors import GraphOptError, PassError
from graphopt.geometry import Geometry, geometry
from graphopt.masks import get_mask
from graphopt.meta import COLUMN_PLANS
from graphopt.passmanager import Context, PassManager, TrainingData

RNG = np.random.default_rng(0)


def _sparse(shape, density, rng=RNG, dtype=np.float64):
    w = rng.standard_normal(shape)
    w[rng.random(shape) >= density] = 0
    return w.astype(dtype)


# ------------------------------------------------------------------ the owner
@pytest.mark.parametrize("groups,shape", [(1, (8, 4, 3, 3)), (2, (8, 2, 3, 3)), (4, (4, 1, 3, 3)), (3, (6, 2, 1, 1))])
def test_filter_matrix_is_the_block_diagonal_gemm_and_inverts(groups, shape):
    geo = Geometry("Conv", 0, 1, groups)
    w = RNG.standard_normal(shape)
    f = geo.filter_matrix(w)
    cin, k = shape[1] * groups, int(np.prod(shape[2:]))
    assert f.shape == (shape[0], cin * k)
    assert np.count_nonzero(f) == w.size  # off-block entries are zero
    assert np.array_equal(geo.from_filter_matrix(f, shape), w)
    # row o, column c*K + k is w[o, c - group offset, k]
    o = shape[0] - 1
    g = o // (shape[0] // groups)
    c = g * shape[1]
    assert f[o, c * k] == w[o, 0].reshape(-1)[0]


def test_conv_transpose_has_no_filter_matrix():
    with pytest.raises(GraphOptError, match="ConvTranspose"):
        Geometry("ConvTranspose", 1, 0, 1).filter_matrix(np.ones((4, 2, 3, 3)))


@pytest.mark.parametrize("alpha,gamma", [(2, 0.0), (4, 0.25), (8, 0.5), (16, 1.0)])
def test_grouping_keeps_alpha_gamma_and_one_weight_per_row_and_group(alpha, gamma):
    f = _sparse((48, 300), 0.12)
    plan = C.group_columns(f != 0, alpha, gamma, window=128)
    mem = plan.members()
    assert (mem >= 0).sum(1).max() <= alpha
    limit = int(np.floor(gamma * f.shape[0]))
    nz = (f != 0)
    per_group = np.stack([nz[:, m[m >= 0]].sum(1) for m in mem])  # [G, B]
    assert np.maximum(per_group - 1, 0).sum(1).max() <= limit  # conflicts each group prunes
    keep = plan.keep(f)
    kept = np.stack([keep[:, m[m >= 0]].sum(1) for m in mem])
    assert kept.max() <= 1 and not keep[f == 0].any()
    # no group spans two windows
    assert all(len({int(c) // 128 for c in m[m >= 0]}) == 1 for m in mem)
    # every nonzero column is in a group, every empty one in none
    assert np.array_equal(plan.group >= 0, nz.any(0))
    # the pruned weights are the smaller ones of their (row, group)
    dropped = nz & ~keep
    r, c = np.nonzero(dropped)
    g = plan.group[c]
    sel_cols = np.full((f.shape[0], plan.n_groups), -1)
    kr, kc = np.nonzero(keep)
    sel_cols[kr, plan.group[kc]] = kc
    assert (np.abs(f[r, c]) <= np.abs(f[r, sel_cols[r, g]])).all()
    if alpha > 1:
        assert plan.n_groups < nz.any(0).sum()  # it did combine


def test_greedy_takes_the_densest_allowed_merge():
    # columns a, b are complementary (no conflict, no shared empty row); c conflicts with a
    nz = np.array([[1, 0, 1], [0, 1, 0], [1, 0, 0], [0, 1, 0]], bool)
    plan = C.group_columns(nz, alpha=2, gamma=0.0)
    assert plan.group[0] == plan.group[1] != plan.group[2]
    # gamma = 1/4 lets c join a's group too when alpha allows: one conflict (row 0) pruned
    plan = C.group_columns(nz, alpha=3, gamma=0.25)
    assert plan.n_groups == 1


def test_alpha_one_combines_nothing_and_bad_options_fail():
    f = _sparse((16, 40), 0.2)
    assert C.group_columns(f != 0, 1, 0.5).n_groups == int((f != 0).any(0).sum())
    for a, g, msg in [(0, 0.5, "alpha >= 1"), (8, -0.1, "gamma >= 0"), (2.5, 0.5, "alpha >= 1")]:
        with pytest.raises(GraphOptError, match=msg):
            C.group_columns(f != 0, a, g)


def test_pack_round_trips_bit_for_bit_and_refuses_conflicts():
    f = _sparse((40, 200), 0.1).astype(np.float32)
    keep, plan = C.combine(f, 8, 0.5)
    fk = np.where(keep, f, 0).astype(np.float32)
    p = C.pack(fk, plan)
    assert p.values.shape == (40, plan.n_groups) and p.select.dtype == np.uint8
    assert np.array_equal(p.unpack(), fk) and p.unpack().tobytes() == fk.tobytes()
    if (f != fk).any():
        with pytest.raises(GraphOptError, match="conflict"):
            C.pack(f, plan)


def test_layout_report_counts_tiles_utilization_and_cycles():
    f = np.zeros((64, 512))
    f[np.arange(64), np.arange(64) * 8] = 1.0  # one nonzero per row, each in its own column
    plan = C.group_columns(f != 0, 8, 0.0)
    rep = C.layout_report(f, plan, 32, positions=100)
    assert rep["dense"]["tiles"] == 2 * 16 and rep["sparse"]["tiles"] == 2 * 2
    assert plan.n_groups == 8 and rep["packed"]["tiles"] == 2
    assert rep["packed"]["utilization"] == pytest.approx(64 / (2 * 32 * 32))
    assert rep["packed"]["cycles"] == 2 * (100 + 3 * 32 - 2)


# ------------------------------------------------------------------ the systolic array is exact
class _Node:
    """The attributes of a Conv/Gemm the back end reads."""

    def __init__(self, op, w_shape, **attrs):
        self.op_type, self.domain, self.name, self.attrs = op, "", "n", attrs
        self.inputs = [None, type("V", (), {"shape": w_shape})()]

    def attr(self, k, d=None):
        return self.attrs.get(k, d)


def _int_layer(shape, groups=1, density=0.2, alpha=8, gamma=0.5, op="Conv"):
    w = RNG.integers(-127, 128, shape).astype(np.int8)
    w[RNG.random(shape) >= density] = 0
    geo = Geometry(op, 0, 1, groups)
    keep, plan = C.combine(geo.filter_matrix(w), alpha, gamma)
    f = np.where(keep, geo.filter_matrix(w), 0).astype(np.int8)
    return geo.from_filter_matrix(f, shape), C.pack(f, plan)


@pytest.mark.parametrize("cin,cout,k,stride,groups,pad,dil", [
    (16, 32, 1, 1, 1, 0, 1),  # pointwise
    (16, 32, 3, 1, 1, 1, 1),  # 3x3
    (16, 32, 3, 2, 1, 1, 1),  # strided
    (16, 32, 3, 1, 4, 1, 1),  # grouped
    (16, 16, 3, 1, 16, 1, 1),  # depthwise
    (8, 8, 3, 1, 1, 2, 2),  # dilated
])
@pytest.mark.parametrize("n", [4, 32])
def test_packed_array_equals_the_sparse_conv_exactly(cin, cout, k, stride, groups, pad, dil, n):
    w, packed = _int_layer((cout, cin // groups, k, k), groups)
    x = RNG.integers(-128, 128, (2, cin, 9, 9)).astype(np.int8)
    node = _Node("Conv", w.shape, strides=[stride] * 2, pads=[pad] * 4, group=groups, dilations=[dil] * 2)
    y = S.run_layer(node, packed, x, n=n)
    ref = F.conv2d(torch.from_numpy(x.astype(np.float64)), torch.from_numpy(w.astype(np.float64)), stride=stride,
                   padding=pad, groups=groups, dilation=dil).numpy()  # exact: int8 sums are far below 2^53
    assert y.dtype == np.int32 and np.array_equal(y, ref.astype(np.int64))


def test_packed_array_equals_the_sparse_gemm_exactly():
    w, packed = _int_layer((24, 100), op="Gemm")
    x = RNG.integers(-128, 128, (5, 100)).astype(np.int8)
    y = S.run_layer(_Node("Gemm", w.shape), packed, x, n=16)
    assert np.array_equal(y, x.astype(np.int64) @ w.astype(np.int64).T)


def test_packed_array_on_real_activations_matches_onnxruntime_conv_integer():
    """A trained-shape network's real activations, quantized to int8, through a packed layer; the
    reference is onnxruntime's ConvInteger on the same sparse int8 weights."""
    import onnx
    from onnx import TensorProto, helper

    model, x = build("resnet", 0)
    acts = {}
    model.l2.conv2.register_forward_hook(lambda m, i, o: acts.update(x=i[0].detach().numpy()))
    with torch.no_grad():
        model(torch.from_numpy(np.random.default_rng(1).standard_normal((4,) + x.shape[1:]).astype(np.float32)))
    a = acts["x"]
    xq = np.clip(np.round(a / (np.abs(a).max() / 127)), -128, 127).astype(np.int8)
    conv = model.l2.conv2
    wf = conv.weight.detach().numpy()
    wq = np.round(wf / (np.abs(wf).max() / 127)).astype(np.int8)
    wq[np.abs(wf) < np.quantile(np.abs(wf), 0.8)] = 0
    geo = Geometry("Conv", 0, 1, 1)
    keep, plan = C.combine(geo.filter_matrix(wq), 8, 0.5)
    f = np.where(keep, geo.filter_matrix(wq), 0).astype(np.int8)
    ws = geo.from_filter_matrix(f, wq.shape)
    y = S.run_layer(_Node("Conv", ws.shape, pads=[1] * 4, strides=[1, 1]), C.pack(f, plan), xq, n=32)
    g = helper.make_graph(
        [helper.make_node("ConvInteger", ["x", "w"], ["y"], pads=[1] * 4)], "g",
        [helper.make_tensor_value_info("x", TensorProto.INT8, list(xq.shape))],
        [helper.make_tensor_value_info("y", TensorProto.INT32, None)],
        [onnx.numpy_helper.from_array(ws, "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    ref = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": xq})[0]
    assert np.array_equal(y, ref)
    assert np.count_nonzero(xq) > xq.size // 4  # real activations, not zeros


def test_array_refuses_float_inputs_and_wrong_widths():
    w, packed = _int_layer((8, 20), op="Gemm")
    arr = S.SystolicArray(8)
    with pytest.raises(GraphOptError, match="int8"):
        arr.matmul(packed, np.zeros((20, 3), np.float32))
    with pytest.raises(GraphOptError, match="reads 20 input columns"):
        arr.matmul(packed, np.zeros((21, 3), np.int8))
    with pytest.raises(GraphOptError, match="positive"):
        S.SystolicArray(0)


# ------------------------------------------------------------------ the pass
def _graph(name="mobilenetv2"):
    model, x = build(name, 0)
    return PassManager("canonicalize,fold-bn").run(graphopt.from_torch(model, torch.from_numpy(x))).graph, x


def test_pass_prunes_only_conflicts_is_idempotent_and_keeps_masks_through_export(tmp_path):
    g, x = _graph()
    r = PassManager("column-combine{sparsity=0.8}").run(g.copy())
    st = r.stats["column-combine"][0]
    assert st["modified"] and st["layers"] == 8 and st["conflicts_pruned"] > 0
    plans = r.graph.scratch[COLUMN_PLANS]
    for n in r.graph.nodes:
        if len(n.inputs) > 1 and n.inputs[1] is not None and n.inputs[1].name in plans:
            w = np.asarray(n.inputs[1].const)
            f = geometry(n).filter_matrix(w)
            assert plans[n.inputs[1].name].conflicts(f) == 0
            assert get_mask(n.inputs[1]).kind == "column"
            assert (w == 0).mean() >= 0.8
    again = PassManager("column-combine{sparsity=0.8}").run(r.graph.copy())
    assert not again.stats["column-combine"][0]["modified"]
    assert again.graph.scratch[COLUMN_PLANS] == plans
    # the exported model holds the equivalent sparse weights and runs in onnxruntime
    path = tmp_path / "cc.onnx"
    from graphopt.backends.lowering import export_file

    export_file(r.graph, path)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = graphopt.to_torch(r.graph)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(sess.run(None, {sess.get_inputs()[0].name: x})[0], ref, rtol=1e-4, atol=1e-5)


def test_pass_on_a_dense_model_says_so_and_changes_nothing():
    g, _ = _graph("resnet")
    r = PassManager("column-combine").run(g.copy())
    st = r.stats["column-combine"][0]
    assert not st["modified"] and st["layers"] == 0
    assert "no sparsity" in st["reason"] and all("no zero weights" in v for v in st["dense"].values())


def test_pass_options_fail_in_one_line():
    g, _ = _graph("resnet")
    for spec, msg in [("column-combine{alpha=0}", "alpha"), ("column-combine{gamma=-1}", "gamma"),
                      ("column-combine{events=3}", "needs sparsity")]:
        with pytest.raises((GraphOptError, PassError), match=msg):
            PassManager(spec).run(g.copy())


def test_conv_transpose_is_left_dense_with_the_reason():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.ConvTranspose2d(8, 4, 2, 2))
    g = graphopt.from_torch(net, torch.zeros(1, 3, 8, 8))
    r = PassManager("canonicalize,column-combine{sparsity=0.7}").run(g)
    st = r.stats["column-combine"][0]
    assert st["layers"] == 1 and any("ConvTranspose" in v for v in st["dense"].values())


def test_joint_schedule_packs_after_every_event_and_resumes_with_its_plans(tmp_path):
    g, x = _graph()
    xs = np.random.default_rng(0).standard_normal((128,) + x.shape[1:]).astype(np.float32)
    ck = tmp_path / "cc.pt"
    pipe = ("column-combine{sparsity=0.75,events=4,alpha=4,gamma=0.25},"
            f"finetune{{epochs=2,batch_size=32,lr=0.01,checkpoint={ck}}}")
    r = PassManager(pipe).run(g.copy(), Context(train=TrainingData(xs, None), teacher=g.copy()))
    plans = r.graph.scratch[COLUMN_PLANS]
    assert plans
    total = nz = 0
    for n in r.graph.nodes:
        if len(n.inputs) > 1 and n.inputs[1] is not None and n.inputs[1].name in plans:
            w = np.asarray(n.inputs[1].const)
            assert plans[n.inputs[1].name].conflicts(geometry(n).filter_matrix(w)) == 0
            assert (plans[n.inputs[1].name].members() >= 0).sum(1).max() <= 4
            total, nz = total + w.size, nz + np.count_nonzero(w)
    assert 1 - nz / total >= 0.75
    state = torch.load(ck, weights_only=True)
    assert set(state["column_groups"]) == set(plans)
    # a resumed run (the checkpoint is finished) ends with the same plans and weights
    r2 = PassManager(pipe.replace(f"checkpoint={ck}}}", f"checkpoint={ck},resume=true}}")).run(
        g.copy(), Context(train=TrainingData(xs, None), teacher=g.copy()))
    assert r2.graph.scratch[COLUMN_PLANS] == plans


# ------------------------------------------------------------------ the packed file
def test_packed_file_round_trips_and_refuses_another_model(tmp_path):
    g, _ = _graph()
    r = PassManager("column-combine{sparsity=0.8}").run(g.copy())
    layers = S.packed_layers(r.graph)
    path = tmp_path / "m.packed.npz"
    S.save_packed(path, layers)
    back = S.load_packed(path)
    weights = {v.name: v.const for v in r.graph.values.values() if v.const is not None}
    for L in back:
        assert S.unpack_layer(L).tobytes() == np.asarray(weights[L.weight], np.float32).tobytes()
    S.check_packed(back, weights)
    other = {k: (v + 1.0 if k == back[0].weight else v) for k, v in weights.items()}
    with pytest.raises(GraphOptError, match="does not match"):
        S.check_packed(back, other)
    with pytest.raises(GraphOptError, match="no weight"):
        S.check_packed(back, {})
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(GraphOptError, match="not a readable packed-columns file"):
        S.load_packed(tmp_path / "bad.npz")


def test_quantized_packed_file_holds_int8_codes_and_steps(tmp_path):
    g, x = _graph()
    xs = np.random.default_rng(0).standard_normal((32,) + x.shape[1:]).astype(np.float32)
    r = PassManager("column-combine{sparsity=0.8},quantize{weights=int8:channel,acts=uint8:tensor}").run(
        g.copy(), Context(calib=xs))
    layers = S.packed_layers(r.graph)
    assert layers and all(L.packed.values.dtype == np.int8 and L.scales is not None for L in layers)
    S.save_packed(tmp_path / "q.npz", layers)
    back = S.load_packed(tmp_path / "q.npz")
    from graphopt.quantizers import is_fake_quant
    from graphopt.quantizers.base import apply_node

    fq = {n.inputs[0].name: n for n in r.graph.nodes if is_fake_quant(n) and n.attr("kind") == "weight"}
    for L in back:
        wq = apply_node(r.graph, fq[L.weight], np.asarray(r.graph.values[L.weight].const, np.float32))
        np.testing.assert_allclose(S.unpack_layer(L), wq, rtol=0, atol=1e-6)


# ------------------------------------------------------------------ the command
def test_analyze_columns_cli_reports_writes_the_packed_file_and_png(tmp_path):
    g, x = _graph("resnet")
    sparse = PassManager("prune-weights{sparsity=0.8,scope=layer}").run(g.copy()).graph
    src = tmp_path / "sparse.onnx"
    graphopt.save_onnx(sparse, src)
    before = src.read_bytes()
    out, comb, png = tmp_path / "p.npz", tmp_path / "comb.onnx", tmp_path / "cc.png"
    cmd = [sys.executable, "-m", "graphopt.cli", "analyze", "columns", str(src), "--array", "32", "-o", str(out),
           "--onnx-out", str(comb), "--plot", str(png)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "N=32: tiles" in p.stdout and "packed" in p.stdout and src.read_bytes() == before
    assert out.stat().st_size > 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the combined model and its packed file agree; the input model (conflicts not pruned) does not
    ok = subprocess.run(cmd[:5] + [str(comb), "--plans", str(out)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run(cmd[:5] + [str(src), "--plans", str(out)], capture_output=True, text=True)
    assert bad.returncode == 1 and "does not match" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    dense = tmp_path / "dense.onnx"
    graphopt.save_onnx(g, dense)
    d = subprocess.run(cmd[:5] + [str(dense)], capture_output=True, text=True)
    assert d.returncode == 0 and "no sparsity" in d.stdout
    a = subprocess.run(cmd[:5] + [str(dense), "--alpha", "0"], capture_output=True, text=True)
    assert a.returncode == 1 and "alpha >= 1" in a.stderr


def test_pointwise_only_and_bias_correction_of_the_pruning_shift():
    g, x = _graph()
    xs = np.random.default_rng(0).standard_normal((128,) + x.shape[1:]).astype(np.float32)
    with torch.no_grad():
        ref = graphopt.to_torch(g)(torch.from_numpy(xs)).numpy()
    errs = {}
    for cb in ("false", "true"):
        r = PassManager(f"column-combine{{sparsity=0.5,only=pointwise,correct_bias={cb}}}").run(
            g.copy(), Context(calib=xs[:64]))
        st = r.stats["column-combine"][0]
        packed = {n.source for n in r.graph.nodes if len(n.inputs) > 1 and n.inputs[1] is not None
                  and n.inputs[1].name in r.graph.scratch[COLUMN_PLANS]}
        assert packed and all(not s.endswith(".dw") and s != "stem" for s in packed)  # 1x1 convs and the fc only
        assert st["bias_corrected"] == (len(packed) if cb == "true" else 0)
        with torch.no_grad():
            y = graphopt.to_torch(r.graph)(torch.from_numpy(xs[64:])).numpy()  # scored on samples it did not see
        errs[cb] = float(((y - ref[64:]) ** 2).mean())
    assert errs["true"] < 0.5 * errs["false"]
    with pytest.raises((GraphOptError, PassError), match="one shot"):
        PassManager("column-combine{sparsity=0.5,events=2,correct_bias=true}").run(g.copy(), Context(calib=xs))


def test_a_skip_pattern_that_matches_no_layer_is_warned(caplog):
    """skip=[conv] on a model whose stem is 'conv1' skips nothing: say so (the column benchmark
    once pruned its stem this way)."""
    import torch

    import graphopt
    from graphopt.passmanager import PassManager

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 36, 4))
    g = graphopt.from_torch(m, torch.zeros(1, 3, 8, 8))
    with caplog.at_level("WARNING", logger="graphopt"):
        PassManager("column-combine{sparsity=0.5,skip=[conv,3]}").run(g)
    assert "skip pattern 'conv' matches no layer" in caplog.text
    assert "'3'" not in caplog.text  # the pattern that matched is not reported


def test_packed_qlinear_layer_equals_onnxruntime_qlinearconv():
    """uint8 activations with a zero point (borders padded with it), per-channel int8 weights and
    an int32 bias, requantized to uint8: the packed array equals onnxruntime's QLinearConv code
    for code."""
    import onnx
    from onnx import TensorProto, helper

    w, packed = _int_layer((32, 16, 3, 3))
    xq = RNG.integers(0, 256, (2, 16, 9, 9)).astype(np.uint8)
    sx, zx, sy, zy = np.float32(0.02), 37, np.float32(0.7), 11
    sw = (RNG.random(32) * 0.01 + 0.001).astype(np.float32)
    bq = RNG.integers(-5000, 5000, 32).astype(np.int32)
    node = _Node("Conv", w.shape, pads=[1] * 4, strides=[1, 1])
    y = S.run_qlinear(node, packed, xq, sx, zx, sw, bq, sy, zy, n=16)
    c = onnx.numpy_helper.from_array
    g = helper.make_graph(
        [helper.make_node("QLinearConv", ["x", "sx", "zx", "w", "sw", "zw", "sy", "zy", "b"], ["y"], pads=[1] * 4)],
        "g", [helper.make_tensor_value_info("x", TensorProto.UINT8, list(xq.shape))],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, None)],
        [c(np.array(sx), "sx"), c(np.array(zx, np.uint8), "zx"), c(w, "w"), c(sw, "sw"), c(np.zeros(32, np.int8), "zw"),
         c(np.array(sy), "sy"), c(np.array(zy, np.uint8), "zy"), c(bq, "b")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    ref = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": xq})[0]
    assert y.dtype == np.uint8 and 0 < (y == 255).mean() + (y == 0).mean() < 0.9  # saturation is exercised
    np.testing.assert_array_equal(y, ref)
