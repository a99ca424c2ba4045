"""Weight storage codecs: every form decodes to exactly what it encoded, and its size is what
its arrays cost."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from graphopt import storage
from graphopt.errors import GraphOptError


def _sparse(rng, shape, density):
    x = rng.standard_normal(shape).astype(np.float32)
    return np.where(rng.random(shape) < density, x, 0).astype(np.float32)


def _nm(rng, shape, n, m, axis):
    x = rng.standard_normal(shape).astype(np.float32)
    g = np.moveaxis(x, axis, -1).reshape(-1, m)
    drop = np.argsort(rng.random(g.shape), 1)[:, : m - n]
    np.put_along_axis(g, drop, 0.0, 1)
    moved = list(shape)
    moved.append(moved.pop(axis))
    return np.ascontiguousarray(np.moveaxis(g.reshape(moved), -1, axis))


CASES = {
    "int8": (lambda r: r.integers(-128, 128, (6, 5, 3)).astype(np.int8), {}),
    "int4": (lambda r: r.integers(-8, 8, (7, 3)).astype(np.int8), {}),  # odd count: the last byte half used
    "indexed": (lambda r: r.choice(np.array([-64, -8, 0, 2, 32], np.int8), (5, 9)), {"index_bits": 4}),
    "palette": (lambda r: r.choice(r.standard_normal(200).astype(np.float32), (8, 3, 3, 3)), {"axis": 0}),
    "palette-axis1": (lambda r: r.choice(r.standard_normal(12).astype(np.float32), (4, 6, 2)), {"axis": 1}),
    "palette-none": (lambda r: r.choice(r.standard_normal(12).astype(np.float32), (4, 6)), {"axis": None}),
    "nm": (lambda r: _nm(r, (4, 8, 3, 3), 2, 4, 1), {"n": 2, "m": 4, "axis": 1}),
    "nm-4:8-axis0": (lambda r: _nm(r, (16, 5), 4, 8, 0), {"n": 4, "m": 8, "axis": 0}),
    "relative": (lambda r: _sparse(r, (64, 40), 0.05), {"index_bits": 4}),
    "relative-3bit": (lambda r: _sparse(r, (500,), 0.02), {"index_bits": 3}),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("seed", range(3))
def test_decode_of_encode_is_exact(case, seed):
    make, opts = CASES[case]
    x = make(np.random.default_rng(seed))
    codec = storage.get(case.split("-")[0], **opts)
    assert codec.fits(x)
    e = codec.encode(x)
    y = codec.decode(e)
    assert y.dtype == x.dtype and y.shape == x.shape
    np.testing.assert_array_equal(y, x)
    assert codec.size_bits(x) == e.bits > 0


@settings(max_examples=80, deadline=None)
@given(n=st.integers(0, 400), density=st.floats(0, 1), bits=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_relative_round_trips_and_counts_fillers(n, density, bits, seed):
    rng = np.random.default_rng(seed)
    x = _sparse(rng, (n,), density)
    c = storage.Relative(index_bits=bits)
    e = c.encode(x)
    np.testing.assert_array_equal(c.decode(e), x)
    assert int(e["gaps"].max(initial=0)) < 1 << bits  # every gap fits its field
    # the size by hand: one entry per nonzero, plus one filler per 2^bits zeros skipped in a run
    pos = np.flatnonzero(x)
    gaps = np.diff(np.concatenate([[-1], pos])) - 1
    assert len(e["values"]) == pos.size + int((gaps // (1 << bits)).sum())
    assert c.size_bits(x) == e.bits == len(e["values"]) * (32 + bits)


@settings(max_examples=60, deadline=None)
@given(size=st.integers(0, 65), seed=st.integers(0, 2**16))
def test_int4_packs_two_per_byte(size, seed):
    x = np.random.default_rng(seed).integers(-8, 8, size).astype(np.int8)
    e = storage.Int4().encode(x)
    assert e["packed"].size == -(-size // 2) and e.nbytes == -(-size // 2)
    np.testing.assert_array_equal(storage.Int4().decode(e), x)


def test_forms_refuse_what_they_cannot_hold():
    with pytest.raises(GraphOptError, match=r"int4 storage cannot hold .*outside the integers -8..7"):
        storage.Int4().encode(np.array([9], np.int8))
    with pytest.raises(GraphOptError, match="17 distinct values, more than 2\\^4"):
        storage.Indexed(4).encode(np.arange(17))
    with pytest.raises(GraphOptError, match="not 2:4 sparse along axis 1"):
        storage.NM(2, 4, 1).encode(np.ones((2, 4), np.float32))
    with pytest.raises(GraphOptError, match="has 300 distinct values, more than 2\\^8"):
        storage.Palette(axis=0).encode(np.arange(300, dtype=np.float32).reshape(1, 300))
    with pytest.raises(GraphOptError, match="unknown weight storage 'relativ'; did you mean 'relative'"):
        storage.get("relativ")
    assert not storage.Int8().fits(np.array([0.5], np.float32))


def test_smallest_int8_form():
    assert storage.smallest_int8_form(np.array([-8, 7], np.int8)).name == "int4"
    assert storage.smallest_int8_form(np.array([-64, 0, 64], np.int8)).name == "indexed"
    assert storage.smallest_int8_form(np.arange(-100, 100).astype(np.int8)).name == "int8"
