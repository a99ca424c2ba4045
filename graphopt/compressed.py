"""Deep Compression files (``.gdc``): a model whose weights are pruned and/or shared through
k-means codebooks, stored as Han et al. store it (relative positions and cluster indices,
each stream Huffman-coded), with an exact decoder back to the ONNX model.

**What is encoded.** Every weight of a Conv/Gemm/MatMul: a palettized weight (the index tensor
of ``packing.palette_weight``'s ``Gather``) as a ``storage.Stream`` of its indices (background:
the most frequent index, the pruned-zero slot of a sparse layer); a plain float weight as a
``Stream`` of float32 values (background 0: the pruned zeros). Each tensor takes the relative
position width (0 = dense, 2..8 bits) that makes it smallest. The rest of the model (graph,
codebooks, biases) is the ONNX model without those tensors, zlib-compressed.

**File layout** (version 1; all integers little-endian)::

    magic    8 bytes   b"GOPTDC\\r\\n"
    length   4 bytes   header length H
    header   H bytes   UTF-8 JSON: {"format", "version", "graph": [offset, length],
                       "order": [initializer names], "tensors": [{"name", "data_type",
                       "shape", "codec": {gap_bits, value_bits, huffman, background},
                       "meta": {...}, "fields": {name: {"offset", "length", "dtype",
                       "count", "width"}}}]}
    payload  ...       the fields (Huffman streams as bytes, fixed-width fields bit-packed
                       to their width, float32 values raw) and the zlib'd graph, at the
                       header's offsets
    sha256  32 bytes   of everything before it

``read`` refuses, in one line, a foreign file (magic), a newer version, a truncated or corrupt
file (lengths, checksum, offsets, streams that do not decode) and a file whose tensors do not
match its graph; it never returns a partly decoded model.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from graphopt.errors import GraphOptError
from graphopt.ir import numpy_dtype
from graphopt.storage import Encoded, Stream

MAGIC = b"GOPTDC\r\n"
FORMAT = "graphopt-deep-compression"
VERSION = 1
SUFFIX = ".gdc"
COMPUTE = ("Conv", "ConvTranspose", "Gemm", "MatMul")
GAP_WIDTHS = (0, 2, 3, 4, 5, 6, 7, 8)


# ------------------------------------------------------------------ what the model holds
@dataclass
class Weight:
    """One layer's weight as the model stores it."""

    layer: str  # the Conv/Gemm/MatMul node
    op: str
    tensor: str  # the initializer encoded: the index of a palette, or the float weight
    form: str  # "palette" or "float"
    size: int  # weights
    kept: int  # weights that are not zero
    codebook: str | None = None  # a palette's codebook initializer (int codes: their DequantizeLinear steps)
    offset: str | None = None  # a palette's group offsets (several codebooks)
    value_bits: int = 32  # a palette's index width (log2 of its centroids), or 32


def _inits(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def weights(model: onnx.ModelProto) -> list[Weight]:
    """The weights of the model's Conv/Gemm/MatMul layers: palettized ones (``Gather`` of a
    float codebook by ``Cast(index)`` [+ group offset]) and plain float initializers."""
    inits = _inits(model)
    prod = {o: n for n in model.graph.node for o in n.output}
    out = []
    for n in model.graph.node:
        if n.op_type not in COMPUTE or len(n.input) < 2:
            continue
        w = n.input[1]
        scale = None
        if w in prod and prod[w].op_type == "DequantizeLinear":  # int8 codes (a weight on an integer grid)
            scale = prod[w].input[1] if prod[w].input[1] in inits else None  # its steps count as the codebook
            w = prod[w].input[0]
            c = prod.get(w)
            if c is not None and c.op_type == "Cast" and c.input[0] in inits and \
                    inits[c.input[0]].data_type == TensorProto.INT4:  # int4 codes, unpacked to int8
                w = c.input[0]
        if w in inits and inits[w].data_type in (TensorProto.FLOAT, TensorProto.INT8, TensorProto.INT4):
            a = numpy_helper.to_array(inits[w])
            dt = inits[w].data_type
            out.append(Weight(n.name, n.op_type, w, "float" if dt == TensorProto.FLOAT else "codes", a.size,
                              int(np.count_nonzero(a.astype(np.float32))), codebook=scale,
                              value_bits={TensorProto.FLOAT: 32, TensorProto.INT8: 8, TensorProto.INT4: 4}[dt]))
            continue
        p = prod.get(w)
        if p is None or p.op_type != "Gather" or p.input[0] not in inits:
            continue
        book = inits[p.input[0]]
        src, offset = prod.get(p.input[1]), None
        if src is not None and src.op_type == "Add" and src.input[1] in inits:
            offset, src = src.input[1], prod.get(src.input[0])
        if src is None or src.op_type != "Cast" or src.input[0] not in inits or book.data_type not in (
                TensorProto.FLOAT, TensorProto.INT8):
            continue
        idx = numpy_helper.to_array(inits[src.input[0]]).astype(np.int64)
        book_a = numpy_helper.to_array(book).reshape(-1)
        offs = 0 if offset is None else numpy_helper.to_array(inits[offset]).astype(np.int64)
        vals = book_a[idx + offs]
        groups = 1 if offset is None else int(np.unique(offs).size)
        k = book_a.size // groups
        zero_slot = bool(np.all(book_a.reshape(groups, k)[:, -1] == 0)) and k > 1
        centroids = k - 1 if zero_slot else k
        out.append(Weight(n.name, n.op_type, src.input[0], "palette", idx.size, int(np.count_nonzero(vals)),
                          p.input[0], offset, max(1, math.ceil(math.log2(max(centroids, 2))))))
    return out


def _array(t: onnx.TensorProto) -> np.ndarray:
    """An initializer as the streams take it: float32, or integers >= 0 (int8/int4 codes as their
    two's-complement bits, which the decoder's cast back to int8/int4 restores)."""
    a = numpy_helper.to_array(t)
    if t.data_type == TensorProto.FLOAT:
        return a
    if t.data_type in (TensorProto.INT8, TensorProto.INT4):
        return a.astype(np.int64) & (0xFF if t.data_type == TensorProto.INT8 else 0xF)
    return a.astype(np.int64)


def _codec(a: np.ndarray, w: Weight, huffman: bool, gap_bits: int | None) -> tuple[Stream, Encoded]:
    """The smallest ``Stream`` for one weight tensor (over the position widths, or the one given)."""
    if w.form == "float":
        background, widths = 0.0, (32, 32)
    else:
        vals, counts = np.unique(a, return_counts=True)
        background = int(vals[counts.argmax()]) if w.form == "palette" else 0
        rest = vals[vals != background]

        def bits(top: int) -> int:
            return max(1, math.ceil(math.log2(top + 1)))

        widths = (bits(int(vals.max(initial=0))), bits(int(rest.max(initial=0))))  # (dense, sparse) value widths
    best = None
    for h in ((True, False) if huffman else (False,)):  # Huffman only where its code table pays for itself
        for g in (GAP_WIDTHS if gap_bits is None else (gap_bits,)):
            c = Stream(gap_bits=g, value_bits=widths[g > 0], huffman=h, background=background)
            e = c.encode(a)
            if best is None or e.bits < best[1].bits:
                best = (c, e)
    return best


# ------------------------------------------------------------------ bit packing
def pack_bits(a: np.ndarray, width: int) -> bytes:
    """Non-negative integers in ``width`` bits each, most significant first, zero-padded."""
    a = np.asarray(a, np.int64).reshape(-1)
    bits = (a[:, None] >> np.arange(width - 1, -1, -1)[None, :]) & 1
    return np.packbits(bits.astype(np.uint8).reshape(-1)).tobytes()


def unpack_bits(data: bytes, width: int, count: int) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(data, np.uint8))
    if bits.size < width * count:
        raise GraphOptError("corrupt .gdc file: a field holds fewer bits than its header says")
    return bits[: width * count].reshape(count, width).astype(np.int64) @ (1 << np.arange(width - 1, -1, -1))


# ------------------------------------------------------------------ size report
@dataclass
class Row:
    """One line of the paper's per-layer table (Han et al. 2016, Tables 2-5)."""

    layer: str
    weights: int
    kept: int
    weight_bits: float  # per kept weight: its value (32) or its cluster index, fixed width (a layer stored
    # dense spends its zeros' values here too)
    weight_bits_h: float  # the same, Huffman-coded
    index_bits: float  # per kept weight: its relative position, fixed width (0 when stored dense)
    index_bits_h: float
    codebook_bits: int
    bits: int  # the layer's total, fixed width (P+Q)
    bits_h: int  # with Huffman (P+Q+H)

    @property
    def ratio(self) -> float:
        return 32 * self.weights / max(self.bits, 1)

    @property
    def ratio_h(self) -> float:
        return 32 * self.weights / max(self.bits_h, 1)


def _split_bits(e: Encoded) -> tuple[int, int]:
    """(value bits, position bits) of an encoded stream, code tables included."""
    v = sum(a.size * b for k, (a, b) in e.fields.items() if k.startswith("values"))
    return int(v), int(e.bits - v)


def report(model: onnx.ModelProto) -> list[Row]:
    """The per-layer size table of a model's weights, fixed width and Huffman-coded."""
    inits = _inits(model)
    rows = []
    for w in weights(model):
        a = _array(inits[w.tensor])
        _, fixed = _codec(a, w, False, None)
        _, huff = _codec(a, w, True, None)
        book = 32 * numpy_helper.to_array(inits[w.codebook]).size if w.codebook else 0
        kept = max(w.kept, 1)
        fv, fp = _split_bits(fixed)
        hv, hp = _split_bits(huff)
        rows.append(Row(w.layer, w.size, w.kept, fv / kept, hv / kept, fp / kept, hp / kept, book, fixed.bits + book,
                        huff.bits + book))
    return rows


def format_report(rows: list[Row], extra: dict[str, int] | None = None) -> str:
    """The paper's table layout, plus a total line and ``extra`` file sizes (bytes)."""
    w = min(max([len(r.layer) for r in rows] + [5]), 40)
    lines = [f"{'layer':<{w}} {'#weights':>9} {'kept':>6} {'w bits':>7} {'w bits':>7} {'idx bits':>8} {'idx bits':>8} "
             f"{'ratio':>7} {'ratio':>7}",
             f"{'':<{w}} {'':>9} {'':>6} {'(P+Q)':>7} {'(P+Q+H)':>7} {'(P+Q)':>8} {'(P+Q+H)':>8} {'(P+Q)':>7} "
             f"{'(P+Q+H)':>7}"]
    for r in rows:
        name = r.layer if len(r.layer) <= w else "…" + r.layer[-(w - 1):]
        lines.append(f"{name:<{w}} {r.weights:>9} {100 * r.kept / max(r.weights, 1):5.1f}% {r.weight_bits:7.2f} "
                     f"{r.weight_bits_h:7.2f} {r.index_bits:8.2f} {r.index_bits_h:8.2f} {r.ratio:6.1f}x {r.ratio_h:6.1f}x")
    n = sum(r.weights for r in rows)
    k = sum(r.kept for r in rows)
    b, bh = sum(r.bits for r in rows), sum(r.bits_h for r in rows)
    lines.append(f"{'total':<{w}} {n:>9} {100 * k / max(n, 1):5.1f}% {'':>7} {'':>7} {'':>8} {'':>8} "
                 f"{32 * n / max(b, 1):6.1f}x {32 * n / max(bh, 1):6.1f}x")
    lines.append(f"weights: FP32 {4 * n / 1e3:.1f} KB -> {b / 8e3:.1f} KB (P+Q), {bh / 8e3:.1f} KB (P+Q+H; codebooks "
                 "included)")
    for what, size in (extra or {}).items():
        lines.append(f"{what}: {size / 1e3:.1f} KB")
    return "\n".join(lines)


# ------------------------------------------------------------------ dense form
def dense_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every palettized weight expanded to its float initializer (what
    onnxruntime folds it into at session start): the FP32 file of the same network."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = _inits(out)
    prod = {o: n for n in out.graph.node for o in n.output}
    drop: set[int] = set()
    for w in weights(out):
        if w.form != "palette":
            continue
        layer = next(n for n in out.graph.node if n.name == w.layer)
        gather = prod[layer.input[1]]
        idx = _array(inits[w.tensor])
        offs = 0 if w.offset is None else numpy_helper.to_array(inits[w.offset]).astype(np.int64)
        vals = numpy_helper.to_array(inits[w.codebook]).reshape(-1)[idx + offs].astype(np.float32)
        out.graph.initializer.append(numpy_helper.from_array(vals, gather.output[0]))
        chain = [gather]
        while chain:
            n = chain.pop()
            drop.add(id(n))
            chain += [prod[i] for i in n.input if i in prod and prod[i].op_type in ("Cast", "Add")]
    keep = [n for n in out.graph.node if id(n) not in drop]
    del out.graph.node[:]
    out.graph.node.extend(keep)
    used = {i for n in out.graph.node for i in n.input} | {o.name for o in out.graph.output}
    inits_kept = [t for t in out.graph.initializer if t.name in used]
    del out.graph.initializer[:]
    out.graph.initializer.extend(inits_kept)
    return out


# ------------------------------------------------------------------ write / read
def encode(model: onnx.ModelProto, huffman: bool = True, gap_bits: int | None = None) -> bytes:
    """The ``.gdc`` bytes of ``model`` (see the module doc)."""
    if gap_bits is not None and gap_bits not in GAP_WIDTHS:
        raise GraphOptError(f"relative positions take {', '.join(map(str, GAP_WIDTHS[1:]))} bits (or 0: dense), "
                            f"not {gap_bits}")
    inits = _inits(model)
    ws = weights(model)
    if not ws:
        raise GraphOptError("the model has no Conv/Gemm/MatMul weight to compress")
    payload = bytearray()
    tensors = []
    for w in ws:
        t = inits[w.tensor]
        codec, e = _codec(_array(t), w, huffman, gap_bits)
        fields = {}
        for name, (arr, width) in e.fields.items():
            if arr.dtype == np.float32:
                data, dtype = arr.astype("<f4").tobytes(), "float32"
            elif name in ("values", "gaps") and f"{name}_lengths" in e.fields:
                data, dtype = arr.tobytes(), "bytes"  # a Huffman stream
            else:
                data, dtype = pack_bits(arr, width), "bits"
            fields[name] = {"offset": len(payload), "length": len(data), "dtype": dtype, "count": int(arr.size),
                            "width": int(width)}
            payload += data
        tensors.append({"name": t.name, "data_type": int(t.data_type), "shape": list(e.shape),
                        "codec": {"gap_bits": codec.gap_bits, "value_bits": codec.value_bits,
                                  "huffman": codec.huffman, "background": codec.background},
                        "meta": e.meta, "fields": fields})
    rest = onnx.ModelProto()
    rest.CopyFrom(model)
    coded = {w.tensor for w in ws}
    order = [t.name for t in model.graph.initializer]
    kept = [t for t in rest.graph.initializer if t.name not in coded]
    del rest.graph.initializer[:]
    rest.graph.initializer.extend(kept)
    graph = zlib.compress(rest.SerializeToString(), 9)
    header = {"format": FORMAT, "version": VERSION, "graph": [len(payload), len(graph)], "order": order,
              "tensors": tensors}
    payload += graph
    head = json.dumps(header, separators=(",", ":")).encode()
    body = MAGIC + struct.pack("<I", len(head)) + head + bytes(payload)
    return body + hashlib.sha256(body).digest()


def write(model: onnx.ModelProto, path, huffman: bool = True, gap_bits: int | None = None) -> int:
    """``encode`` written atomically to ``path``; returns its size in bytes."""
    from graphopt.atomic import atomic_paths

    data = encode(model, huffman, gap_bits)
    with atomic_paths(str(path)) as (tmp,):
        with open(tmp, "wb") as fh:
            fh.write(data)
    return len(data)


def decode(data: bytes, what: str = "the file") -> onnx.ModelProto:
    """The ONNX model a ``.gdc`` holds, every tensor bit for bit as it was encoded."""

    def bad(why: str) -> GraphOptError:
        return GraphOptError(f"{what} is not a valid graphopt compressed model: {why}")

    if len(data) < len(MAGIC) or data[: len(MAGIC)] != MAGIC:
        raise bad("it does not start with the .gdc magic bytes (a foreign file?)")
    if len(data) < len(MAGIC) + 4 + 32:
        raise bad("it is truncated")
    (hlen,) = struct.unpack("<I", data[len(MAGIC):len(MAGIC) + 4])
    body, digest = data[:-32], data[-32:]
    if len(MAGIC) + 4 + hlen > len(body):
        raise bad("it is truncated (the header runs past the end)")
    if hashlib.sha256(body).digest() != digest:
        raise bad("checksum mismatch (the file is truncated or corrupt)")
    try:
        header = json.loads(body[len(MAGIC) + 4:len(MAGIC) + 4 + hlen].decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"its header is not JSON ({e})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise bad("its header names another format")
    if not isinstance(header.get("version"), int) or header["version"] > VERSION:
        raise bad(f"it is version {header.get('version')}; this graphopt reads version {VERSION} (upgrade graphopt)")
    payload = body[len(MAGIC) + 4 + hlen:]

    def piece(off, length) -> bytes:
        if not (isinstance(off, int) and isinstance(length, int)) or off < 0 or length < 0 or off + length > len(
                payload):
            raise bad("a field lies outside the file")
        return payload[off:off + length]

    try:
        go, gl = header["graph"]
        model = onnx.ModelProto()
        model.ParseFromString(zlib.decompress(piece(go, gl)))
        tensors = {}
        for t in header["tensors"]:
            c = t["codec"]
            codec = Stream(gap_bits=int(c["gap_bits"]), value_bits=int(c["value_bits"]), huffman=bool(c["huffman"]),
                           background=c["background"])
            fields = {}
            for name, f in t["fields"].items():
                raw = piece(f["offset"], f["length"])
                if f["dtype"] == "float32":
                    if len(raw) != 4 * f["count"]:
                        raise bad(f"tensor '{t['name']}': field '{name}' has the wrong length")
                    arr = np.frombuffer(raw, "<f4").astype(np.float32)
                elif f["dtype"] == "bytes":
                    arr = np.frombuffer(raw, np.uint8)
                else:
                    arr = unpack_bits(raw, int(f["width"]), int(f["count"]))
                fields[name] = (arr, int(f["width"]))
            dt = int(t["data_type"])
            e = Encoded("stream", tuple(int(d) for d in t["shape"]), np.dtype(np.float32 if dt == TensorProto.FLOAT
                                                                              else np.int64), fields, t["meta"])
            tensors[t["name"]] = numpy_helper.from_array(codec.decode(e).astype(numpy_dtype(dt)), t["name"])
    except GraphOptError as e:
        raise e if "not a valid graphopt" in str(e) else bad(str(e)) from None
    except Exception as e:  # a field of the wrong type, zlib's or protobuf's errors: never a traceback
        raise bad(f"its contents do not decode ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                  ) from None
    have = {t.name for t in model.graph.initializer}
    used = {i for n in model.graph.node for i in n.input}
    for name in tensors:
        if name in have or name not in used:
            raise bad(f"tensor '{name}' does not match its model (" + (
                "the graph already holds it)" if name in have else "no node of the graph reads it)"))
    missing = [i for i in used if i and i not in have and i not in tensors and i not in
               {v.name for v in model.graph.input} and i not in {o for n in model.graph.node for o in n.output}]
    if missing:
        raise bad(f"its model reads '{missing[0]}', which the file does not hold")
    by_name = {**{t.name: t for t in model.graph.initializer}, **tensors}
    order = header.get("order", [])
    if sorted(order) != sorted(by_name):
        raise bad("its initializer list does not match its tensors")
    del model.graph.initializer[:]
    model.graph.initializer.extend(by_name[n] for n in order)
    return model


def read(path) -> onnx.ModelProto:
    """``decode`` of the file at ``path``."""
    with open(path, "rb") as fh:
        return decode(fh.read(), str(path))


def sizes(model: onnx.ModelProto, gdc_bytes: int) -> dict[str, int]:
    """File sizes (bytes) to set a ``.gdc`` against: the dense FP32 ONNX file of the same
    network, its ``gzip -9`` (the trivial baseline), and the palettized ONNX itself."""
    dense = dense_model(model).SerializeToString()
    return {"ONNX file with palettes expanded (dense)": len(dense), "gzip -9 of that file": len(gzip.compress(dense, 9)),
            "this ONNX file": len(model.SerializeToString()), ".gdc file": gdc_bytes}
