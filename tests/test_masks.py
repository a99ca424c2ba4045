"""The mask owner: selection properties, training keeps masked weights at exactly zero, the ONNX
back end folds masks, and channel masks are pass scratch data, never ONNX metadata."""

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from nets import build, run_ort

import graphopt
from graphopt import GraphOptError, from_torch
from graphopt.masks import Mask, channel_masks, get_mask, masked_const, set_mask
from graphopt.meta import CHANNEL_MASKS
from graphopt.passmanager import PassManager


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), nm=st.sampled_from([(2, 4), (1, 4), (4, 8), (1, 2)]), axis=st.sampled_from([0, 1]))
def test_n_m_keeps_the_n_largest_of_every_group(seed, nm, axis):
    n, m = nm
    rng = np.random.default_rng(seed)
    shape = [3, 5]
    shape[axis] = 2 * m
    w = rng.standard_normal(shape).astype(np.float32)
    mask = Mask.n_m(w, n, m, axis)
    wm = mask.apply(w)
    groups = np.moveaxis(wm, axis, -1).reshape(-1, m)
    assert (np.count_nonzero(groups, axis=1) <= n).all() and mask.violations(wm) == 0
    orig = np.moveaxis(np.abs(w), axis, -1).reshape(-1, m)
    kept_min = np.where(groups != 0, orig, np.inf).min(1)
    dropped_max = np.where(groups == 0, orig, -np.inf).max(1)
    assert (kept_min >= dropped_max).all()  # by magnitude inside each group
    assert mask.density == pytest.approx(n / m)
    assert mask.violations(w) > 0 if n < m else mask.violations(w) == 0


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), sparsity=st.floats(0.0, 0.95))
def test_magnitude_mask_drops_the_smallest(seed, sparsity):
    w = np.random.default_rng(seed).standard_normal((7, 11)).astype(np.float32)
    mask = Mask.magnitude(w, sparsity)
    assert (~mask.keep).sum() == int(np.floor(w.size * sparsity))
    if (~mask.keep).any() and mask.keep.any():
        assert np.abs(w[~mask.keep]).max() <= np.abs(w[mask.keep]).min()


def test_mask_errors():
    with pytest.raises(GraphOptError, match="multiple of 4"):
        Mask.n_m(np.ones((3, 6)), 2, 4, 1)
    with pytest.raises(GraphOptError, match="0 < N <= M"):
        Mask.n_m(np.ones((3, 8)), 5, 4, 1)
    with pytest.raises(GraphOptError, match="does not fit"):
        Mask.element(np.ones((2, 2), bool)).apply(np.ones((3, 3)))
    with pytest.raises(GraphOptError, match="distinct and in"):
        Mask.channel([0, 4], 4)
    with pytest.raises(GraphOptError, match="unknown mask kind"):
        Mask("rows", np.ones(2, bool))
    assert Mask.channel([3, 1], 5).indices() == [1, 3]


def _masked_mlp():
    model, x = build("mlp")
    g = from_torch(model, torch.from_numpy(x))
    gemms = [n for n in g.nodes if n.op_type == "Gemm"]
    w = gemms[0].inputs[1]
    set_mask(g, w, Mask.n_m(w.const, 2, 4, 1))  # Gemm transB: [N, K], K is the reduction axis
    return g, x, w


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_training_keeps_masked_weights_exactly_zero(opt):
    g, x, w = _masked_mlp()
    mask = get_mask(w)
    m = graphopt.to_torch(g)
    m.train()
    params = list(m.parameters())
    o = (torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-2) if opt == "sgd"
         else torch.optim.AdamW(params, lr=1e-2, weight_decay=1e-2))
    xt = torch.from_numpy(np.repeat(x, 8, axis=0)) + torch.randn(8 * len(x), *x.shape[1:])
    attr = m.param_names[w.name]
    for _ in range(10):
        o.zero_grad()
        m(xt).pow(2).mean().backward()
        o.step()
    p = dict(m.named_parameters())[attr].detach().numpy()
    assert np.count_nonzero(p[~mask.keep]) == 0  # the parameter itself, not only its use
    before = w.const.copy()
    g.update_from(m)
    assert mask.violations(w.const) == 0 and not np.array_equal(before, w.const)  # trained, still 2:4


def test_onnx_back_end_folds_the_mask():
    g, x, w = _masked_mlp()
    g.set_const(w, np.ones_like(w.const))  # a later pass wrote dense weights: the mask still holds on export
    proto = graphopt.to_onnx(g)
    onnx.checker.check_model(proto, full_check=True)
    init = next(t for t in proto.graph.initializer if t.name == w.name)
    arr = onnx.numpy_helper.to_array(init)
    assert get_mask(w).violations(arr) == 0 and np.array_equal(arr, masked_const(w))
    with torch.no_grad():
        sim = graphopt.to_torch(g)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(run_ort(proto, x), sim, rtol=1e-5, atol=1e-5)


def test_channel_masks_are_scratch_not_onnx_metadata():
    model, x = build("resnet")
    g = PassManager("canonicalize,fold-bn").run(from_torch(model, torch.from_numpy(x))).graph
    r = PassManager("prune-channels{ratio=0.5}").run(g)
    masks = channel_masks(r.graph)
    assert masks and all(m.kind == "channel" for m in masks.values())
    assert CHANNEL_MASKS not in r.graph.model_meta
    proto = graphopt.to_onnx(r.graph)
    assert all(CHANNEL_MASKS not in p.key for p in proto.metadata_props)
    folded = PassManager("fold-prune").run(r.graph).graph
    assert channel_masks(folded) == {}
