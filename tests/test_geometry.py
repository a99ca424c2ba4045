"""The layer-geometry table: views invert, channel counts, and mean_output against torch."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from graphopt.errors import GraphOptError
from graphopt.geometry import geometry
from graphopt.ir import Graph


def _node(op, **attrs):
    g = Graph()
    x = g.add_input("x")
    w = g.add_const(np.zeros(1, np.float32), "w")
    return g.add_node(op, [x, w], ["y"], attrs=attrs)


CASES = [("Conv", dict(group=1), (6, 4, 3, 3), 6, 4), ("Conv", dict(group=2), (6, 2, 3, 3), 6, 4),
         ("Conv", dict(group=4), (4, 1, 3, 3), 4, 4), ("ConvTranspose", dict(group=2), (4, 3, 2, 2), 6, 4),
         ("Gemm", dict(transB=1), (5, 3), 5, 3), ("Gemm", dict(transB=0), (3, 5), 5, 3), ("MatMul", {}, (3, 5), 5, 3)]


@pytest.mark.parametrize("op,attrs,shape,cout,cin", CASES)
def test_views_invert_and_count(op, attrs, shape, cout, cin):
    geo = geometry(_node(op, **attrs))
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    assert geo.out_channels(shape) == cout and geo.in_channels(shape) == cin
    assert geo.out_view(w).shape[0] == cout and geo.in_view(w).shape[0] == cin
    np.testing.assert_array_equal(geo.from_out_view(geo.out_view(w), shape), w)
    np.testing.assert_array_equal(geo.from_in_view(geo.in_view(w), shape), w)


def test_out_view_rows_are_output_channels():
    """Zeroing row o of out_view silences output o in torch; row i of in_view, input i."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((6, 2, 3, 3)).astype(np.float32)
    x = torch.from_numpy(rng.standard_normal((1, 4, 5, 5)).astype(np.float32))
    geo = geometry(_node("Conv", group=2))
    v = geo.out_view(w).copy()
    v[3] = 0
    y = F.conv2d(x, torch.from_numpy(geo.from_out_view(v, w.shape)), groups=2)
    assert float(y[0, 3].abs().max()) == 0.0 and float(y[0, 2].abs().max()) > 0
    v = geo.in_view(w).copy()
    v[1] = 0  # input channel 1 no longer matters
    w2 = torch.from_numpy(geo.from_in_view(v, w.shape))
    x2 = x.clone()
    x2[0, 1] += 7.0
    torch.testing.assert_close(F.conv2d(x, w2, groups=2), F.conv2d(x2, w2, groups=2))


@pytest.mark.parametrize("op,attrs,shape,cout,cin", [c for c in CASES if c[0] != "ConvTranspose"])
def test_mean_output_is_the_layer_on_a_constant_input(op, attrs, shape, cout, cin):
    rng = np.random.default_rng(2)
    w = rng.standard_normal(shape).astype(np.float32)
    c = rng.standard_normal(cin)
    geo = geometry(_node(op, **attrs))
    if op == "Conv":
        x = torch.from_numpy(np.broadcast_to(c[None, :, None, None], (1, cin, 4, 4)).astype(np.float64))
        ref = F.conv2d(x, torch.from_numpy(w).double(), groups=attrs["group"])[0, :, 0, 0].numpy()
    else:
        wk = w.T if (op == "Gemm" and attrs.get("transB")) else w  # [K, N]
        ref = c @ wk.astype(np.float64)
    np.testing.assert_allclose(geo.mean_output(w, c), ref, rtol=1e-10, atol=1e-10)


def test_not_a_layer():
    with pytest.raises(GraphOptError, match="not a layer"):
        geometry(_node("Relu"))


def test_resized_keeps_groups():
    geo = geometry(_node("Conv", group=2))
    assert geo.resized((6, 2, 3, 3), out=4) == (4, 2, 3, 3)
    assert geo.resized((6, 2, 3, 3), inp=2) == (6, 1, 3, 3)
    assert geometry(_node("Gemm", transB=0)).resized((3, 5), out=2, inp=1) == (1, 2)
