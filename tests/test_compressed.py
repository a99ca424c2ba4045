"""Deep Compression files: Huffman coding, the exact decoder on every layer kind, the size
report, and hostile files (one line each, nothing written)."""

from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import graphopt
from graphopt import compressed
from graphopt.backends.lowering import export_file
from graphopt.errors import GraphOptError
from graphopt.passmanager import Context, PassManager
from graphopt.storage import Stream, huffman_decode, huffman_encode, huffman_lengths
from tests.test_hostile import cli, one_line_error


# ------------------------------------------------------------------ Huffman and streams
@pytest.mark.parametrize("case", ["geometric", "single", "two", "fibonacci"])
def test_huffman_round_trips_and_limits_code_lengths(case):
    rng = np.random.default_rng(0)
    if case == "geometric":
        sym = rng.geometric(0.3, 5000) - 1
    elif case == "single":
        sym = np.full(37, 5)
    elif case == "two":
        sym = rng.integers(0, 2, 999)
    else:  # Fibonacci counts force a code deeper than 16 bits unless it is limited
        fib = [1, 1]
        while len(fib) < 24:
            fib.append(fib[-1] + fib[-2])
        sym = np.repeat(np.arange(24), fib)
        rng.shuffle(sym)
    lengths = huffman_lengths(np.bincount(sym))
    assert lengths.max() <= 16
    assert np.sum(2.0 ** -lengths[lengths > 0]) <= 1.0 + 1e-12  # a prefix code (Kraft)
    data, nbits = huffman_encode(sym, lengths)
    np.testing.assert_array_equal(huffman_decode(data, nbits, lengths, sym.size), sym)
    if case == "geometric":  # within a bit of the entropy
        p = np.bincount(sym) / sym.size
        h = -(p[p > 0] * np.log2(p[p > 0])).sum()
        assert h <= nbits / sym.size < h + 1


def test_a_stream_that_does_not_decode_to_its_count_is_refused():
    sym = np.arange(8).repeat(10)
    lengths = huffman_lengths(np.bincount(sym))
    data, nbits = huffman_encode(sym, lengths)
    with pytest.raises(GraphOptError, match="corrupt Huffman stream"):
        huffman_decode(data, nbits, lengths, sym.size + 3)
    with pytest.raises(GraphOptError, match="corrupt Huffman stream"):
        huffman_decode(data[:2], nbits, lengths, sym.size)


@pytest.mark.parametrize("gap_bits", [0, 2, 3, 5, 8])
@pytest.mark.parametrize("huffman", [True, False])
def test_streams_round_trip_sparse_and_dense_tensors(gap_bits, huffman):
    rng = np.random.default_rng(1)
    w = rng.normal(size=(16, 8, 3, 3)).astype(np.float32)
    w[rng.random(w.shape) < 0.9] = 0
    w[3] = 0  # a long run of zeros: skip symbols
    idx = rng.integers(0, 16, size=(40, 30))
    idx[rng.random(idx.shape) < 0.7] = 16
    for x, c in ((w, Stream(gap_bits, 32, huffman, 0.0)), (idx, Stream(gap_bits, 5, huffman, 16)),
                 (np.zeros((3, 3), np.float32), Stream(gap_bits, 32, huffman, 0.0))):
        np.testing.assert_array_equal(c.decode(c.encode(x)), x)


# ------------------------------------------------------------------ every layer kind
class _AllKinds(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 8, 3, padding=1)
        self.grouped = torch.nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.depthwise = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.fc = torch.nn.Linear(8 * 4 * 4, 32)
        self.mat = torch.nn.Parameter(torch.randn(32, 10) * 0.1)

    def forward(self, x):
        x = torch.relu(self.depthwise(torch.relu(self.grouped(torch.relu(self.conv(x))))))
        x = torch.relu(self.fc(x.flatten(1)))
        return torch.matmul(x, self.mat)


def _model():
    torch.manual_seed(0)
    return PassManager("canonicalize").run(graphopt.from_torch(_AllKinds(), torch.zeros(1, 4, 4, 4))).graph


def _ort(model, x):
    import onnxruntime as ort

    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def _same_tensors(a: onnx.ModelProto, b: onnx.ModelProto):
    assert [t.name for t in a.graph.initializer] == [t.name for t in b.graph.initializer]
    for ta, tb in zip(a.graph.initializer, b.graph.initializer):
        assert ta.data_type == tb.data_type
        xa, xb = numpy_helper.to_array(ta), numpy_helper.to_array(tb)
        assert xa.dtype == xb.dtype and np.array_equal(xa.view(np.uint8) if xa.dtype.kind == "f" else xa,
                                                       xb.view(np.uint8) if xb.dtype.kind == "f" else xb)


@pytest.mark.parametrize("pipe,fmt,forms", [
    ("prune-weights{sparsity=0.7},quantize{weights=kmeans4,acts=float,last_bits=5}", "qdq", {"palette"}),
    ("quantize{weights=kmeans3:g4,acts=float}", "qdq", {"palette"}),
    ("prune-weights{sparsity=0.7}", "float", {"float"}),
    ("prune-weights{sparsity=0.5},quantize{weights=kmeans4:int8:channel,acts=float}", "qdq", {"codes", "palette"}),
    ("prune-weights{sparsity=0.5},quantize{weights=int4:channel,acts=float}", "qdq", {"codes", "palette"}),
])
def test_the_decoder_rebuilds_every_layer_kind_bit_for_bit(tmp_path, pipe, fmt, forms):
    g = PassManager(pipe).run(_model(), Context()).graph
    path = tmp_path / "m.onnx"
    export_file(g, path, fmt)
    model = onnx.load(str(path))
    ws = compressed.weights(model)
    assert {w.op for w in ws} == {"Conv", "Gemm", "MatMul"} and len(ws) == 5
    assert {w.form for w in ws} <= forms and {w.form for w in ws} & forms
    for huffman in (True, False):
        back = compressed.decode(compressed.encode(model, huffman=huffman))
        _same_tensors(model, back)
    x = np.random.default_rng(0).normal(size=(3, 4, 4, 4)).astype(np.float32)
    np.testing.assert_array_equal(_ort(back, x), _ort(model, x))
    np.testing.assert_allclose(_ort(compressed.dense_model(back), x), _ort(model, x), rtol=1e-6, atol=1e-6)


def test_size_report_counts_what_the_file_holds(tmp_path):
    g = PassManager("prune-weights{sparsity=0.8,scope=layer},quantize{weights=kmeans4,acts=float}").run(
        _model(), Context()).graph
    export_file(g, tmp_path / "m.onnx", "qdq")
    model = onnx.load(str(tmp_path / "m.onnx"))
    rows = compressed.report(model)
    assert [r.weights for r in rows] == [w.size for w in compressed.weights(model)]
    for r in rows:
        assert r.bits_h <= r.bits  # Huffman only where it pays
        assert r.codebook_bits == 32 * 17  # 16 centroids and the pruned-zero slot, float32
        assert 0.15 < r.kept / r.weights < 0.25
    data = compressed.encode(model)
    weight_bytes = sum(r.bits_h for r in rows) / 8
    assert weight_bytes < len(data)  # the file adds its header and the zlib'd graph, nothing is hidden
    text = compressed.format_report(rows, compressed.sizes(model, len(data)))
    assert "(P+Q+H)" in text and "gzip -9" in text and text.count("\n") >= len(rows) + 3


# ------------------------------------------------------------------ hostile files
def _file(tmp_path) -> bytes:
    g = PassManager("prune-weights{sparsity=0.7},quantize{weights=kmeans4,acts=float}").run(_model(), Context()).graph
    export_file(g, tmp_path / "m.onnx", "qdq")
    return compressed.encode(onnx.load(str(tmp_path / "m.onnx")))


def _parts(data: bytes) -> tuple[dict, bytes]:
    n = len(compressed.MAGIC)
    (hlen,) = struct.unpack("<I", data[n:n + 4])
    return json.loads(data[n + 4:n + 4 + hlen]), data[n + 4 + hlen:-32]


def _signed(header: dict, payload: bytes) -> bytes:
    """A file with a valid checksum around the given (tampered) contents."""
    head = json.dumps(header).encode()
    body = compressed.MAGIC + struct.pack("<I", len(head)) + head + payload
    return body + hashlib.sha256(body).digest()


def test_hostile_files_get_one_line_errors(tmp_path):
    data = _file(tmp_path)
    header, payload = _parts(data)
    first = header["tensors"][0]
    big = dict(header, version=compressed.VERSION + 1)
    outside = json.loads(json.dumps(header))
    outside["tensors"][0]["fields"]["values"]["offset"] = len(payload) + 10
    renamed = json.loads(json.dumps(header))
    renamed["tensors"][0]["name"] = "not_in_the_graph"
    renamed["order"] = [("not_in_the_graph" if n == first["name"] else n) for n in header["order"]]
    huff = next(t for t in header["tensors"] if "values_lengths" in t["fields"])
    f = huff["fields"]["values"]
    garbled = bytearray(payload)
    garbled[f["offset"]:f["offset"] + f["length"]] = bytes(f["length"])  # all-zero bits: the wrong symbol count
    cases = {
        "foreign": (b"PK\x03\x04" + data[4:], "magic bytes"),
        "empty": (b"", "magic bytes"),
        "truncated": (data[: len(data) // 2], "checksum"),
        "short": (data[:10], "truncated"),
        "flipped": (data[:200] + bytes([data[200] ^ 1]) + data[201:], "checksum"),
        "newer": (_signed(big, payload), f"version {compressed.VERSION + 1}"),
        "offset": (_signed(outside, payload), "outside the file"),
        "mismatch": (_signed(renamed, payload), "does not match its model"),
        "stream": (_signed(header, bytes(garbled)), "corrupt"),
        "not json": (_signed(header, payload)[:len(compressed.MAGIC) + 4] + b"{" * 5, "truncated"),
    }
    for name, (blob, needle) in cases.items():
        with pytest.raises(GraphOptError, match="not a valid graphopt compressed model") as e:
            compressed.decode(blob, name)
        assert needle in str(e.value) and "\n" not in str(e.value), (name, str(e.value))


def test_cli_compress_decompress_and_refusals(tmp_path):
    data = _file(tmp_path)
    src = tmp_path / "m.onnx"
    r = cli("compress", src, "-o", tmp_path / "m.gdc")
    assert r.returncode == 0, r.stderr
    assert "(P+Q+H)" in r.stdout and "wrote" in r.stdout
    assert (tmp_path / "m.gdc").read_bytes() == data  # deterministic
    r = cli("decompress", tmp_path / "m.gdc", "-o", tmp_path / "back.onnx")
    assert r.returncode == 0, r.stderr
    _same_tensors(onnx.load(str(src)), onnx.load(str(tmp_path / "back.onnx")))
    r = cli("inspect", src, "--compression")
    assert r.returncode == 0 and "ratio" in r.stdout
    (tmp_path / "bad.gdc").write_bytes(data[:-40])
    one_line_error(cli("decompress", tmp_path / "bad.gdc", "-o", tmp_path / "x.onnx"), "checksum")
    one_line_error(cli("decompress", src, "-o", tmp_path / "x.onnx"), "magic bytes")
    assert not (tmp_path / "x.onnx").exists()
    one_line_error(cli("compress", tmp_path / "m.gdc", "-o", tmp_path / "y.gdc"), "reads an ONNX file")
    one_line_error(cli("decompress", tmp_path / "m.gdc", "-o", tmp_path / "m.gdc"), "refusing to write")
    assert (tmp_path / "m.gdc").read_bytes() == data
