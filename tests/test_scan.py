"""The scan owner (graphopt.scan) and the allocator (graphopt.allocate): one baseline, one
metric, two kinds of trial; the adapters (choose-bits' sweep, prune-weights' sparsity scan,
prune-channels' sensitivity, prune-blocks' block scan) report the same error for the same trial."""

import numpy as np
import pytest
import torch
from graphopt.passes import _layers as L
from graphopt.passes.bits import bit_sensitivity, quantizable_layers, quantized_weight
from graphopt.passes.sparsity import sensitivity_masks
from nets import build, rel_err, run_ort

from graphopt import from_torch, to_onnx
from graphopt.allocate import allocate, allocate_to_target
from graphopt.masks import Mask
from graphopt.passmanager import PassManager
from graphopt.quantizers import parse
from graphopt.scan import Scan


@pytest.fixture(scope="module")
def setup():
    model, x = build("mobilenetv2")
    g = PassManager("canonicalize,fold-bn").run(from_torch(model, torch.from_numpy(x))).graph
    data = np.random.default_rng(0).standard_normal((24,) + x.shape[1:]).astype(np.float32)
    return g, data


def _with_weight(g, n, w):
    h = g.copy()
    m = h.node_by_name(n.name)
    L.set_input_const(h, m, 1, w)
    return h


def test_the_baseline_is_the_graph_and_a_no_op_trial_costs_nothing(setup):
    g, data = setup
    scan = Scan(g, data, max_samples=20)
    assert scan.n_samples == 20
    ref = np.concatenate([r.numpy() for r in scan.ref])
    assert rel_err(ref, run_ort(to_onnx(g), data[:20])) < 1e-5
    n = quantizable_layers(g)[0]
    assert scan.swap(n.inputs[1].name, L.weight(g, n))["error"] == 0.0
    assert scan.transform(g.copy())["error"] < 1e-12


def test_swap_and_transform_agree_and_the_adapters_report_the_scan_error(setup):
    g, data = setup
    scan = Scan(g, data)
    layers = quantizable_layers(g)
    rows = bit_sensitivity(g, data, (2, 4), weights="int8:channel")
    for n, r in zip(layers[:3], rows[:3]):
        for j, bits in enumerate((2, 4)):
            qw = quantized_weight(g, n, parse("int8:channel").at_bits(bits), "mse")
            by_swap = scan.swap(n.inputs[1].name, qw)["error"]
            by_copy = scan.transform(_with_weight(g, n, qw))["error"]
            assert by_swap > 0 and by_copy == pytest.approx(by_swap, rel=1e-4)
            assert r["error"][j] == pytest.approx(by_swap, rel=1e-9)  # choose-bits' sweep: the same trial
    # prune-weights{scope=sensitivity}'s scan: the same metric for a magnitude mask
    _, srows = sensitivity_masks(g, layers[:2], data, None, "params", [0.5], max_samples=None)
    for n, r in zip(layers[:2], srows):
        w = L.weight(g, n)
        want = scan.transform(_with_weight(g, n, Mask.magnitude(w, 0.5).apply(w)))["error"]
        assert r["error"][1] == pytest.approx(want, rel=1e-4)


def test_with_labels_the_error_is_the_top1_drop(setup):
    g, data = setup
    labels = np.random.default_rng(1).integers(0, 10, len(data))
    scan = Scan(g, data, labels)
    n = quantizable_layers(g)[-1]
    t = scan.swap(n.inputs[1].name, np.zeros_like(L.weight(g, n)))  # the classifier zeroed: all logits = bias
    assert t["error"] == pytest.approx(scan.ref_top1 - t["top1"]) and 0 <= t["top1"] <= 100


def test_allocate_to_target_tightens_until_the_measured_cost_fits():
    costs = np.array([[10.0, 6.0, 3.0], [10.0, 5.0, 2.0]])
    errors = np.array([[0.0, 1.0, 4.0], [0.0, 1.5, 3.0]])
    measure = lambda ch: 1.2 * costs[np.arange(2), ch].sum()  # noqa: E731 - the estimate is 20% low
    choice, got = allocate_to_target(costs, errors, 12.0, measure)
    assert got <= 12.0 and measure(choice) == got
    # it is the least-error plan among those whose measured cost fits
    plans = [(errors[0, a] + errors[1, b], (a, b)) for a in range(3) for b in range(3) if measure((a, b)) <= 12.0]
    assert tuple(choice) == min(plans)[1]
    assert tuple(allocate(costs, errors, 12.0)[0]) != tuple(choice)  # the additive estimate alone overshoots
