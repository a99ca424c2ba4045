"""k-means weight sharing (Deep Compression): the batched clustering, trained centroids, the
weight-only quantize path, and the palettized ONNX."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

import graphopt
from graphopt.backends.lowering import export_file
from graphopt.errors import GraphOptError
from graphopt.passmanager import Context, PassManager, TrainingData
from graphopt.quantizers import is_fake_quant, params_of, parse
from graphopt.quantizers.kmeans import cluster
from graphopt.storage import SharedPalette


def _lloyd_1d(v: np.ndarray, c: np.ndarray, iters: int = 60) -> np.ndarray:
    """Plain Lloyd on one group (the reference the batched code must match): an empty centroid
    moves onto the value worst served by the current centroids (the i-th empty, in order, onto
    the i-th worst)."""
    c = np.sort(c.astype(np.float64))
    for _ in range(iters):
        a = np.abs(v[:, None] - c[None, :]).argmin(1)
        new = np.array([v[a == j].mean() if (a == j).any() else c[j] for j in range(c.size)])
        err = (v - c[a]) ** 2
        worst = np.argsort(-err, kind="stable")
        for i, j in enumerate(np.flatnonzero([not (a == j).any() for j in range(c.size)])):
            if i < v.size and err[worst[i]] > 0:
                new[j] = v[worst[i]]
        new = np.sort(new)
        if np.array_equal(new, c):
            break
        c = new
    return c


def test_batched_clustering_matches_lloyd_per_group_and_keeps_zeros():
    rng = np.random.default_rng(0)
    r = rng.normal(size=(6, 50))
    r[rng.random(r.shape) < 0.4] = 0.0  # pruned weights
    book, idx, exact = cluster(r, 3, 2)  # 3 groups of 2 rows, 8 centroids each
    assert book.shape == (3, 8) and idx.shape == r.shape and exact == 0
    assert np.array_equal(idx < 0, r == 0)  # zeros are not members and stay zero
    for gi in range(3):
        v = r[2 * gi:2 * gi + 2][r[2 * gi:2 * gi + 2] != 0]
        ref = _lloyd_1d(v, np.linspace(v.min(), v.max(), 8))
        np.testing.assert_allclose(book[gi], ref, rtol=1e-5, atol=1e-6)
    # every weight sits at its nearest centroid
    rows_book = book[np.arange(6) // 2]
    y = np.take_along_axis(rows_book, np.maximum(idx, 0), 1)
    best = np.abs(r[:, :, None] - rows_book[:, None, :]).min(-1)
    assert np.all(np.abs(r - y)[r != 0] <= best[r != 0] + 1e-6)


@pytest.mark.parametrize("init", ["linear", "density", "kpp"])
def test_every_initialisation_clusters(init):
    rng = np.random.default_rng(1)
    r = rng.laplace(size=(4, 300)).astype(np.float32)
    book, idx, _ = cluster(r, 4, 1, init)
    y = np.take_along_axis(book, idx, 1)
    err = ((y - r) ** 2).mean()
    uniform = ((np.round(r / (np.abs(r).max() / 7.5)) * (np.abs(r).max() / 7.5) - r) ** 2).mean()
    assert err < uniform  # k-means beats a uniform grid of the same size on heavy-tailed weights


def test_fewer_distinct_values_than_clusters_are_kept_exactly(caplog):
    r = np.array([[0.5, -0.25, 0.5, 0.0, 0.125]], np.float32)
    book, idx, exact = cluster(r, 3, 1)
    assert exact == 1
    y = np.where(idx >= 0, np.take_along_axis(book, np.maximum(idx, 0), 1), 0)
    np.testing.assert_array_equal(y, r)
    q = parse("kmeans3")
    with caplog.at_level("WARNING", logger="graphopt.kmeans"):
        q.weight_params(r, 0, 1)
    assert "no more distinct nonzero values than 8 centroids" in caplog.text


def test_centroid_gradient_is_the_sum_of_its_members_gradients():
    q = parse("kmeans2:g2")
    rng = np.random.default_rng(2)
    w = rng.normal(size=(3, 4, 3, 3)).astype(np.float32)
    w[0, 0] = 0
    params, axis = q.weight_params(w, 0, 1)
    book = torch.tensor(params["codebook"], requires_grad=True)
    x = torch.tensor(w, requires_grad=True)
    y = q.value(x, book, torch.from_numpy(params["index"]), axis)
    up = torch.from_numpy(rng.normal(size=w.shape).astype(np.float32))
    (y * up).sum().backward()
    idx = params["index"].astype(np.int64)
    gid = np.arange(3)[:, None, None, None] // 2 * np.ones_like(idx)
    want = np.zeros_like(params["codebook"])
    np.add.at(want, (gid[idx >= 0], idx[idx >= 0]), up.numpy()[idx >= 0])
    np.testing.assert_allclose(book.grad.numpy(), want, rtol=1e-5, atol=1e-6)
    assert not x.grad.abs().any()  # the weight itself is not trained through the codebook
    np.testing.assert_array_equal(y.detach().numpy()[0, 0], 0)


def test_spec_errors_are_one_line():
    for bad, why in (("kmeans0", "1..8 bits, not 0"), ("kmeans9", "1..8 bits, not 9"),
                     ("kmeans4:g", "unknown option 'g'")):
        with pytest.raises(GraphOptError, match=why):
            parse(bad)
    assert str(parse("kmeans5:g8:kpp")) == "kmeans5:g8:kpp" and str(parse("kmeans4")) == "kmeans4:tensor"
    with pytest.raises(GraphOptError, match="k-means shares each centroid"):
        PassManager("quantize{weights=kmeans4,acts=float,weight_method=gptq}").run(_net(), Context(calib=_data()[0]))


def _net():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 6, 1),
                            torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(6 * 8 * 8, 10))
    return PassManager("canonicalize").run(graphopt.from_torch(m, torch.zeros(1, 3, 8, 8))).graph


def _data(n=64):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 3, 8, 8)).astype(np.float32), rng.integers(0, 10, n)


def _ort(path, x):
    import onnxruntime as ort

    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def _torch(g, x):
    with torch.no_grad():
        return graphopt.to_torch(g).eval()(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("spec", ["kmeans4", "kmeans3:channel", "kmeans2:g4:kpp", "kmeans8"])
def test_weight_only_kmeans_lowers_to_a_palettized_onnx_equal_to_the_simulation(tmp_path, spec):
    x, _ = _data()
    r = PassManager(f"prune-weights{{sparsity=0.5}},quantize{{weights={spec},acts=float,last_bits=5}}").run(
        _net(), Context())
    g = r.graph
    fqs = [n for n in g.nodes if is_fake_quant(n)]
    assert len(fqs) == 3 and all(n.attr("kind") == "weight" for n in fqs)  # weights only: no activation quantizer
    assert str(parse(fqs[-1].attr("spec"))).startswith("kmeans5")  # the classifier at last_bits
    out = tmp_path / "p.onnx"
    export_file(g, out, "qdq")
    np.testing.assert_allclose(_ort(out, x), _torch(g, x), rtol=1e-5, atol=1e-5)
    m = onnx.load(str(out))
    types = {t.name: t.data_type for t in m.graph.initializer}
    idx = [n for n, t in types.items() if n.endswith("_index")]
    assert len(idx) == 3
    bits = int(spec[6])
    # pruned zeros take one more entry: 2^b + 1 entries fit UINT4 below 4 bits, UINT8 below 8
    k = (1 << bits) + 1
    want = onnx.TensorProto.UINT4 if k <= 16 else onnx.TensorProto.UINT8 if k <= 256 else onnx.TensorProto.UINT16
    assert types[idx[0]] == want
    assert not any(t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 4 for t in m.graph.initializer)


def test_trained_centroids_keep_the_assignment_and_the_zeros(tmp_path):
    x, y = _data()
    pipe = "prune-weights{sparsity=0.6},quantize{weights=kmeans3,acts=float},finetune{epochs=2,lr=0.05,batch_size=16}"
    before = PassManager("prune-weights{sparsity=0.6},quantize{weights=kmeans3,acts=float}").run(_net(), Context()).graph
    after = PassManager(pipe).run(_net(), Context(train=TrainingData(x, y))).graph
    b = {n.source: params_of(before, n) for n in before.nodes if is_fake_quant(n)}
    a = {n.source: params_of(after, n) for n in after.nodes if is_fake_quant(n)}
    assert b.keys() == a.keys()
    for k in a:
        np.testing.assert_array_equal(a[k]["index"], b[k]["index"])  # the assignment stays fixed
        assert not np.allclose(a[k]["codebook"], b[k]["codebook"])  # the centroids trained
    out = tmp_path / "t.onnx"
    export_file(after, out, "qdq")
    np.testing.assert_allclose(_ort(out, x), _torch(after, x), rtol=1e-5, atol=1e-5)
    for n in after.nodes:
        if is_fake_quant(n):
            w = parse(n.attr("spec")).apply_np(after.const_value(n.inputs[0]), params_of(after, n), n.attr("axis"))
            assert (w == 0).sum() == (params_of(after, n)["index"] < 0).sum() > 0


def test_int8_grid_runs_on_integer_kernels(tmp_path):
    x, y = _data()
    r = PassManager("quantize{weights=kmeans4:int8:channel,acts=uint8:tensor},finetune{epochs=1,lr=0.02,"
                    "batch_size=16}").run(_net(), Context(calib=x, train=TrainingData(x, y)))
    out = tmp_path / "q.onnx"
    rep = export_file(r.graph, out, "qdq")
    assert not rep.simulated  # every weight became int8 codes on its grid, even after training
    np.testing.assert_allclose(_ort(out, x), _torch(r.graph, x), rtol=1e-4, atol=1e-4)
    for n in r.graph.nodes:
        if is_fake_quant(n) and n.attr("kind") == "weight":
            book = params_of(r.graph, n)["codebook"]
            step = np.abs(book).max(1, keepdims=True) / 127
            w = parse(n.attr("spec")).apply_np(r.graph.const_value(n.inputs[0]), params_of(r.graph, n),
                                               n.attr("axis"))
            codes = w.reshape(w.shape[0], -1) / step.repeat(w.shape[0] // step.shape[0], 0)
            np.testing.assert_allclose(codes, np.round(codes), atol=1e-3)  # what runs is on the grid


def test_shared_palette_round_trips_every_layout():
    rng = np.random.default_rng(3)
    book = np.sort(rng.normal(size=(3, 16)).astype(np.float32), 1)
    idx = rng.integers(-1, 16, size=(6, 4, 3, 3))
    w = np.where(idx >= 0, book[(np.arange(6) // 2)[:, None, None, None], np.maximum(idx, 0)], 0).astype(np.float32)
    for axis, rows in ((0, 2), (None, 1), (1, 4), (0, 4), (3, 1)):
        c = SharedPalette(axis=axis, group_rows=rows)
        e = c.encode(w)
        np.testing.assert_array_equal(c.decode(e), w)
        assert e.fields["index"][1] == (8 if e["codebook"].shape[1] > 16 else 4)
    e = SharedPalette(axis=0, group_rows=2).encode(np.zeros((2, 3), np.float32))
    np.testing.assert_array_equal(SharedPalette(axis=0, group_rows=2).decode(e), 0)


def test_linear_start_on_a_heavy_tailed_layer_leaves_no_dead_centroid():
    # linear over [min, max] puts most centroids in the empty range between the body and two
    # outliers; without relocation they never get a member and the body shares two values
    rng = np.random.default_rng(1)
    r = np.concatenate([rng.normal(scale=0.05, size=2000), [-3.0, 4.0]])[None, :]
    book, idx, _ = cluster(r, 4, 1, "linear")
    used = np.bincount(idx[idx >= 0], minlength=16)
    assert (used > 0).all(), used
    sse = ((book[0][idx[0]] - r[0]) ** 2).sum()
    dead = _lloyd_1d(r[0], np.linspace(-3.0, 4.0, 16), iters=0)  # the start itself
    a = np.abs(r[0][:, None] - dead[None, :]).argmin(1)
    assert sse < 0.2 * ((dead[a] - r[0]) ** 2).sum()


def test_groups_with_few_distinct_values_beside_full_groups_are_exact():
    # per-channel codebooks where one channel is mostly pruned (5 distinct values) and the others
    # are not: the exact groups keep their values, the others cluster (this crashed once)
    rng = np.random.default_rng(0)
    r = rng.normal(size=(4, 27))
    r[0, 5:] = 0.0
    book, idx, exact = cluster(r, 4, 1)
    assert exact == 1 and book.shape == (4, 16)
    q = np.where(idx >= 0, np.take_along_axis(book, np.maximum(idx, 0), 1), 0.0)
    np.testing.assert_allclose(q[0], r[0], atol=1e-6)
    assert np.abs(q[1:] - r[1:]).max() < 0.5
