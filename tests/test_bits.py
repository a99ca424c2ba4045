"""Mixed precision: the allocation is exact (brute force agrees), the sensitivity sweep measures
what it says, choose-bits feeds quantize, and bad input is refused in one line."""

import itertools
import subprocess
import sys

import numpy as np
import pytest
import torch
from graphopt.passes.bits import Budget, allocate, bit_sensitivity, layer_costs, pareto_front, quantized_weight
from nets import build

from graphopt import from_torch
from graphopt.errors import GraphOptError, PassError
from graphopt.passmanager import Context, PassManager
from graphopt.training.calibration import collect


def _brute(costs, errors, limit):
    best = (np.inf, None)
    for combo in itertools.product(range(costs.shape[1]), repeat=costs.shape[0]):
        c = sum(costs[i, k] for i, k in enumerate(combo))
        e = sum(errors[i, k] for i, k in enumerate(combo))
        if c <= limit and e < best[0]:
            best = (e, combo)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_allocation_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n_layers, widths = 5, [2, 3, 4, 8]
    params = rng.integers(10, 500, n_layers).astype(float)
    costs = layer_costs("size", params, params, widths, 8)
    errors = np.sort(rng.random((n_layers, len(widths))), axis=1)[:, ::-1] * rng.random((n_layers, 1)) * 10
    c, e, ch = pareto_front(costs, errors)
    assert np.all(np.diff(c) > 0) and np.all(np.diff(e) < 0)  # a front: dearer is strictly better
    for frac in (0.1, 0.3, 0.5, 0.7, 1.0):
        limit = costs[:, 0].sum() + frac * (costs[:, -1].sum() - costs[:, 0].sum())
        want_e, want = _brute(costs, errors, limit)
        got, cost, err = allocate(costs, errors, limit)
        assert cost <= limit and err == pytest.approx(want_e)
        assert sum(errors[i, k] for i, k in enumerate(got)) == pytest.approx(want_e)
    with pytest.raises(GraphOptError, match="below the smallest achievable"):
        allocate(costs, errors, costs[:, 0].sum() * 0.99)


def _model():
    model, x = build("resnet", 0)
    g = PassManager("canonicalize,fold-bn").run(from_torch(model, torch.from_numpy(x))).graph
    xs = np.random.default_rng(0).standard_normal((48,) + x.shape[1:]).astype(np.float32)
    return g, xs


def test_sweep_measures_the_output_error_of_one_quantized_layer():
    g, xs = _model()
    rows = bit_sensitivity(g, xs, (2, 4, 8), weights="int8:channel")
    assert len(rows) == 7 and all(r["error"][0] > r["error"][1] > r["error"][2] >= 0 for r in rows)
    # independent check of one cell: quantize that layer's weights in a copy and measure
    from graphopt.quantizers import parse

    r = rows[2]
    h = g.copy()
    n = next(n for n in h.nodes if n.name == r["name"])
    h.set_const(n.inputs[1], quantized_weight(h, n, parse("int4:channel", "weights"), "mse"))
    out = g.outputs[0].name
    ref, got = collect(g, xs, [out])[out], collect(h, xs, [out])[out]
    assert r["error"][1] == pytest.approx(float(np.mean((got - ref) ** 2) / np.mean(ref ** 2)), rel=1e-3)


def test_hessian_trace_of_a_linear_layer():
    lin = torch.nn.Linear(6, 3)
    x = np.random.default_rng(0).standard_normal((64, 6)).astype(np.float32)
    g = from_torch(lin, torch.from_numpy(x[:1]))
    from graphopt.passes.bits import _hessian_traces
    from graphopt.passes.bits import quantizable_layers as ql

    module = __import__("graphopt").to_torch(g).eval()
    xb = [torch.from_numpy(x)]
    with torch.no_grad():
        ref = [module(xb[0])]
    tr = _hessian_traces(module, g, ql(g), xb, ref, None, probes=400)
    # 0.5 * mean ||(W - W0) x||^2: the Hessian is I (x) mean(x x^T); Tr / n = mean ||x||^2 / in
    want = float((x.astype(np.float64) ** 2).sum(1).mean() / 6)
    assert next(iter(tr.values())) == pytest.approx(want, rel=0.1)


def test_choose_bits_feeds_quantize_meets_the_budget_and_keeps_the_function():
    g, xs = _model()
    ctx = Context(calib=xs)
    r = PassManager("choose-bits{budget=avg:4,widths=[2,4,8],max_samples=32}").run(g.copy(), ctx)
    st = r.stats["choose-bits"][0]
    assert st["avg_bits"] <= 4 + 1e-9 and set(st["bits"].values()) <= {2, 4, 8} and len(set(st["bits"].values())) > 1
    out = g.outputs[0].name
    np.testing.assert_array_equal(collect(r.graph, xs, [out])[out], collect(g, xs, [out])[out])
    assert not r.modified and st["annotations_changed"]  # metadata only: the graph itself is unchanged
    again = PassManager("choose-bits{budget=avg:4,widths=[2,4,8],max_samples=32}").run(r.graph, ctx)
    st2 = again.stats["choose-bits"][0]
    assert not st2["annotations_changed"] and st2["bits"] == st["bits"]  # idempotent
    q = PassManager("quantize{weights=int8:channel,override=[fc=8]}").run(r.graph, ctx).graph
    got = {n.source: n.inputs[1].producer.attr("bits") for n in q.nodes if n.op_type in ("Conv", "Gemm")}
    want = dict(st["bits"], fc=8)  # override= still wins
    assert got == want
    pinned = PassManager("choose-bits{budget=avg:3,widths=[2,4,8],pin=[conv=8],max_samples=32}").run(g.copy(), ctx)
    assert pinned.stats["choose-bits"][0]["bits"]["conv"] == 8
    size = PassManager("choose-bits{budget=size:0.1,widths=[2,4,8],max_samples=32}").run(g.copy(), ctx)
    assert size.stats["choose-bits"][0]["avg_bits"] <= 3.2 + 1e-9
    bops = PassManager("choose-bits{budget=bops:w4a8,widths=[2,4,8],max_samples=32}").run(g.copy(), ctx)
    st_b = bops.stats["choose-bits"][0]
    assert st_b["cost"] <= st_b["limit"]


def test_choose_bits_errors():
    g, xs = _model()
    ctx = Context(calib=xs)
    with pytest.raises(PassError, match=r"budget size:0.01 is below the smallest achievable with widths \[2, 4, 8\]: "
                                         r"0.0625 x FP32 size"):
        PassManager("choose-bits{budget=size:0.01,widths=[2,4,8],max_samples=8}").run(g.copy(), ctx)
    with pytest.raises(PassError, match="choose-bits needs calibration data"):
        PassManager("choose-bits").run(g.copy(), Context())
    with pytest.raises(PassError, match="the ternary weight scheme has no 2-bit form"):
        PassManager("choose-bits{weights=ternary:channel,widths=[2,4]}").run(g.copy(), ctx)
    with pytest.raises(GraphOptError, match="bad budget 'speed:2'"):
        Budget.parse("speed:2")
    with pytest.raises(PassError, match="bad pin 'conv=5'"):
        PassManager("choose-bits{pin=[conv=5],widths=[2,4,8]}").run(g.copy(), ctx)


def test_analyze_bits_cli(tmp_path):
    model, x = build("resnet", 0)
    from nets import export

    path = tmp_path / "m.onnx"
    path.write_bytes(export(model, x, fold=False).SerializeToString())
    np.save(tmp_path / "c.npy", np.random.default_rng(0).standard_normal((16,) + x.shape[1:]).astype(np.float32))
    png = tmp_path / "front.png"
    r = subprocess.run([sys.executable, "-m", "graphopt.cli", "analyze", "bits", str(path), "--calib",
                        str(tmp_path / "c.npy"), "--widths", "2,4,8", "--budget", "size:0.1", "--plot", str(png)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "chosen" in r.stdout and "bits per weight on average" in r.stdout
    assert png.read_bytes()[:4] == b"\x89PNG"
    bad = subprocess.run([sys.executable, "-m", "graphopt.cli", "analyze", "bits", str(path), "--calib",
                          str(tmp_path / "c.npy"), "--widths", "2,4,8", "--budget", "size:0.01"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1 and "below the smallest" in bad.stderr


def test_stored_bits_budget_and_the_allocation_feeds_qat():
    from graphopt.passes.bits import stored_bits

    from graphopt.passmanager import TrainingData

    assert [stored_bits(b) for b in (2, 3, 4, 5, 6, 8)] == [4, 4, 4, 8, 8, 8]
    widths = [3, 4, 6, 8]
    p = np.array([100.0, 300.0, 50.0])
    costs = layer_costs("avg", p, p, widths, 8, stored=True)
    errors = np.array([[4.0, 2.0, 1.0, 0.5], [8.0, 3.0, 2.0, 1.0], [1.0, 0.5, 0.4, 0.3]])
    for avg in (4.0, 5.0, 6.5, 8.0):
        choice, _, _ = allocate(costs, errors, avg * p.sum())
        assert {widths[k] for k in choice} <= {4, 8}  # 3 costs what 4 does in the file, 6 what 8 does
    g, xs = _model()
    ctx = Context(calib=xs, train=TrainingData(xs, np.zeros(len(xs), np.int64)))
    r = PassManager("choose-bits{budget=avg:4,widths=[2,4,8],max_samples=16},"
                    "quantize{weights=int4:channel,qat=lsq},finetune{epochs=1,batch_size=16,teacher=none,kd_weight=0}"
                    ).run(g.copy(), ctx)
    chosen = r.stats["choose-bits"][0]["bits"]
    got = {n.source: n.inputs[1].producer.attr("bits") for n in r.graph.nodes if n.op_type in ("Conv", "Gemm")}
    assert got == chosen and len(set(chosen.values())) > 1  # the QAT graph trains at the allocated widths


def test_allocation_on_a_measured_model_matches_brute_force():
    g, xs = _model()
    widths = [2, 4, 8]
    rows = bit_sensitivity(g, xs[:16], widths)
    errors = np.array([r["error"] for r in rows])
    p = np.array([r["params"] for r in rows], float)
    m = np.array([r["macs"] for r in rows], float)
    for kind, limit in (("size", 4.0 * p.sum()), ("bops", 4 * 8 * m.sum() * 0.9)):
        costs = layer_costs(kind, p, m, widths, 8)
        want_e, want = _brute(costs, errors, limit)  # 3^7 allocations
        got, cost, err = allocate(costs, errors, limit)
        assert cost <= limit and err == pytest.approx(want_e, rel=1e-9)
