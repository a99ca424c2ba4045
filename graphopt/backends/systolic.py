"""A systolic-array back end: an N x N weight-stationary array with a multiplexer in every cell,
int8 inputs and weights, int32 accumulation, in numpy. It runs a column-combined layer
(``graphopt.columns.Packed``) tile by tile, and writes and reads the packed file.

**The array.** A tile holds an N x N block of the packed matrix: N filters (the array's columns)
by N groups (its rows). Cell (r, g) holds one int8 weight and a select naming which of group g's
input channels it multiplies; an input vector streams through, each array row carrying every
input channel of its group, and the cell's multiplexer picks one. The partial sums run down the
columns in int32. A layer runs ceil(B/N) x ceil(G/N) tiles, one after another; its cycle count
is ``graphopt.columns.ws_cycles``.

**Inputs.** A Conv's input is unfolded to im2col columns in the filter matrix's order
(``Geometry.filter_matrix``: input channel x kernel position, every channel of every group),
padded with zeros (the inputs are zero-point-free int8, so zero padding is exact). A Gemm/MatMul's
input rows are its vectors.

**The packed file** (``save_packed``/``load_packed``; ``.npz``) sits next to an ONNX model whose
weights are the equivalent sparse matrices (what the ONNX back end writes for a column mask). It
holds, per packed layer ``i``: ``{i}/values`` [B, G] (float32, or int8 codes with
``{i}/scales`` [B], the per-filter weight step, for a quantized layer), ``{i}/select`` [B, G]
(uint8: the member of the group each cell multiplies), ``{i}/members`` [G, a] (int32 filter-matrix
columns, -1 padded), and a JSON header ``header`` naming, per layer, the weight in the ONNX model,
its shape, op, group count and columns. ``unpack_layer`` rebuilds the sparse weight bit for bit;
``check_packed`` refuses a file that does not match its model, in one line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from graphopt.columns import Packed, pack, tiles, ws_cycles
from graphopt.errors import GraphOptError
from graphopt.geometry import Geometry, geometry, window

FORMAT = "graphopt-packed-columns/1"
INT32 = np.iinfo(np.int32)


class SystolicArray:
    """An N x N weight-stationary array with per-cell multiplexers: int8 weights, int8 or uint8
    inputs (a u8 x s8 dot product, as VNNI and onnxruntime's QLinearConv), int32 accumulation."""

    def __init__(self, n: int):
        if int(n) != n or n < 1:
            raise GraphOptError(f"a systolic array needs a positive size, not {n}")
        self.n = int(n)

    def matmul(self, packed: Packed, x: np.ndarray) -> np.ndarray:
        """[B, P] int32: the packed [B, C] matrix times ``x`` [C, P] (int8 or uint8), tile by tile."""
        x = np.asarray(x)
        if x.dtype not in (np.int8, np.uint8) or packed.values.dtype != np.int8:
            raise GraphOptError(f"the array takes int8 weights and int8 or uint8 inputs (got {x.dtype} inputs and "
                                f"{packed.values.dtype} weights)")
        if x.shape[0] != packed.columns:
            raise GraphOptError(f"the layer reads {packed.columns} input columns, the input has {x.shape[0]}")
        n, b, g = self.n, packed.rows, packed.groups
        src = packed.inputs()
        xi = x.astype(np.int32)
        acc = np.zeros((b, x.shape[1]), np.int64)
        for r0 in range(0, b, n):
            for g0 in range(0, g, n):
                w = packed.values[r0:r0 + n, g0:g0 + n].astype(np.int32)  # the tile's stationary weights
                s = src[r0:r0 + n, g0:g0 + n]  # each cell's multiplexer select, as a column of x
                # every cell multiplies the input channel its select names; partial sums run down a column
                acc[r0:r0 + n] += np.einsum("rg,rgp->rp", w, xi[np.maximum(s, 0)], dtype=np.int64)
        if acc.size and (acc.min() < INT32.min or acc.max() > INT32.max):
            raise GraphOptError("an int32 accumulator overflowed: the layer's sums leave the int32 range")
        return acc.astype(np.int32)

    def tiles(self, packed: Packed) -> int:
        return tiles(packed.rows, packed.groups, self.n)

    def cycles(self, packed: Packed, positions: int) -> int:
        return ws_cycles(packed.rows, packed.groups, positions, self.n)


# ------------------------------------------------------------------ layers
def im2col(node, x: np.ndarray, pad_value=0) -> tuple[np.ndarray, tuple]:
    """([C*K, P], output shape [N, H_out, W_out...]) for a Conv's input ``x`` [N, C, H, W...], in
    the filter matrix's column order; for Gemm/MatMul ([K, P], leading shape). ``pad_value``
    fills the borders (a quantized input's zero point: the code of 0.0)."""
    x = np.asarray(x)
    if node.op_type != "Conv":
        return x.reshape(-1, x.shape[-1]).T, x.shape[:-1]
    win = window(node)
    ks, strides, dil, d = win.kernel, win.strides, win.dilations, win.nd
    xp = np.pad(x, [(0, 0), (0, 0)] + win.pad_pairs(), constant_values=pad_value)
    span = tuple((k - 1) * dl + 1 for k, dl in zip(ks, dil))
    win = np.lib.stride_tricks.sliding_window_view(xp, span, axis=tuple(range(2, 2 + d)))
    win = win[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides)
              + tuple(slice(None, None, dl) for dl in dil)]  # [N, C, out..., k...]
    n, c = x.shape[:2]
    out = win.shape[2:2 + d]
    cols = np.transpose(win, [1] + list(range(2 + d, 2 + 2 * d)) + [0] + list(range(2, 2 + d)))  # [C, k..., N, out...]
    return np.ascontiguousarray(cols).reshape(c * int(np.prod(ks)), -1), (n, *out)


def run_layer(node, packed: Packed, x: np.ndarray, n: int = 64, pad_value=0) -> np.ndarray:
    """The layer's int32 output (no bias) for int8 or uint8 input ``x``, on an N x N array:
    [N, B, out...] for a Conv, [..., B] for a Gemm/MatMul. ``pad_value``: see ``im2col``."""
    cols, lead = im2col(node, x, pad_value)
    y = SystolicArray(n).matmul(packed, cols)  # [B, P]
    if node.op_type == "Conv":
        return np.moveaxis(y.reshape(y.shape[0], *lead), 0, 1)
    return y.T.reshape(*lead, y.shape[0])


def run_qlinear(node, packed: Packed, xq: np.ndarray, x_scale, x_zero: int, w_scale, bias_q, y_scale,
                y_zero: int, n: int = 64) -> np.ndarray:
    """A quantized layer end to end, as onnxruntime's QLinearConv/QGemm computes it: the array's
    int32 sums of the uint8/int8 input codes (borders padded with the input's zero point), minus
    the zero point times each filter's sum, plus the int32 bias; then requantized with the
    float32 multiplier (x_scale * w_scale) / y_scale, rounded half to even, offset by the output
    zero point and saturated to the output type (uint8 when ``xq`` is uint8). Returns the output
    codes."""
    acc = run_layer(node, packed, xq, n, pad_value=int(x_zero)).astype(np.int64)
    rows = packed.unpack().astype(np.int64).sum(1)  # each filter's sum: the zero point's share
    axis = 1 if node.op_type == "Conv" else -1
    shape = [1] * acc.ndim
    shape[axis] = -1
    acc = acc - int(x_zero) * rows.reshape(shape)
    if bias_q is not None:
        acc = acc + np.asarray(bias_q, np.int64).reshape(shape)
    mult = (np.float32(x_scale) * np.asarray(w_scale, np.float32)) / np.float32(y_scale)
    y = np.rint(acc.astype(np.float32) * np.asarray(mult, np.float32).reshape(shape)) + int(y_zero)
    lo, hi = (0, 255) if xq.dtype == np.uint8 else (-128, 127)
    return np.clip(y, lo, hi).astype(xq.dtype)


# ------------------------------------------------------------------ the packed file
@dataclass(frozen=True)
class PackedLayer:
    weight: str  # the weight's name in the ONNX model
    source: str
    op: str
    shape: tuple[int, ...]
    geometry: Geometry
    packed: Packed
    scales: np.ndarray | None = None  # per filter: int8 codes x scale = the weight


def unpack_layer(layer: PackedLayer) -> np.ndarray:
    """The sparse weight the packed layer stands for, bit for bit (float32 from int8 codes x
    scales for a quantized layer)."""
    f = layer.packed.unpack()
    if layer.scales is not None:
        f = (f.astype(np.float32) * layer.scales.astype(np.float32)[:, None]).astype(np.float32)
    return layer.geometry.from_filter_matrix(f, layer.shape)


def packed_layers(graph) -> list[PackedLayer]:
    """Every column-combined layer of ``graph`` (its plan in ``COLUMN_PLANS``), packed: float
    weights, or int8 codes and per-filter steps where the weight is fake-quantized to an int8 grid."""
    from graphopt.meta import COLUMN_PLANS
    from graphopt.quantizers import is_fake_quant
    from graphopt.quantizers.base import apply_node, weight_step

    plans = graph.scratch.get(COLUMN_PLANS) or {}
    out = []
    for node in graph.nodes:
        if node.domain or node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.inputs) < 2:
            continue
        v = node.inputs[1]
        fq = v.producer if is_fake_quant(v.producer) else None
        wv = fq.inputs[0] if fq is not None else v
        if wv.name not in plans or wv.const is None:
            continue
        geo = geometry(node)
        w = np.asarray(wv.const, np.float32)
        scales = None
        if fq is not None:
            step, why = weight_step(graph, fq)
            if step is None:
                raise GraphOptError(f"layer '{node.source}': its weight quantizer has no int8 grid ({why})")
            wq = apply_node(graph, fq, w)
            step = np.broadcast_to(np.asarray(step, np.float64).reshape(-1), (geo.out_channels(w.shape),))
            f = geo.filter_matrix(wq) / step[:, None]
            codes = np.round(f)
            if np.abs(codes - f).max(initial=0) > 1e-3 or np.abs(codes).max(initial=0) > 127:
                raise GraphOptError(f"layer '{node.source}': the quantized weights are not int8 codes x step")
            f, scales = codes.astype(np.int8), step.astype(np.float32)
        else:
            f = geo.filter_matrix(w)
        out.append(PackedLayer(wv.name, node.source, node.op_type, tuple(w.shape), geo, pack(f, plans[wv.name]),
                               scales))
    return out


def save_packed(path, layers: list[PackedLayer], model: str | None = None) -> None:
    """Write the packed file (atomically: no half-written file on failure)."""
    from graphopt.atomic import atomic_paths

    arrays, header = {}, {"format": FORMAT, "model": model, "layers": []}
    for i, L in enumerate(layers):
        arrays[f"{i}/values"] = L.packed.values
        arrays[f"{i}/select"] = L.packed.select
        arrays[f"{i}/members"] = L.packed.members
        if L.scales is not None:
            arrays[f"{i}/scales"] = L.scales
        header["layers"].append({"weight": L.weight, "source": L.source, "op": L.op, "shape": list(L.shape),
                                 "geometry": [L.geometry.op, L.geometry.out_axis, L.geometry.in_axis,
                                              L.geometry.groups], "columns": L.packed.columns})
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    with atomic_paths(Path(path)) as (tmp,):
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)


def load_packed(path) -> list[PackedLayer]:
    """Read a packed file; a file that is not one fails in one line."""
    p = Path(path)
    try:
        with np.load(p, allow_pickle=False) as d:
            header = json.loads(bytes(d["header"]).decode())
            if header.get("format") != FORMAT:
                raise GraphOptError(f"{p}: not a packed-columns file (format {header.get('format')!r})")
            out = []
            for i, h in enumerate(header["layers"]):
                g = Geometry(*h["geometry"])
                pk = Packed(d[f"{i}/values"], d[f"{i}/select"], d[f"{i}/members"], int(h["columns"]))
                out.append(PackedLayer(h["weight"], h["source"], h["op"], tuple(h["shape"]), g, pk,
                                       d[f"{i}/scales"] if f"{i}/scales" in d else None))
            return out
    except GraphOptError:
        raise
    except Exception as e:
        raise GraphOptError(f"{p}: not a readable packed-columns file ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''})") from None


def check_packed(layers: list[PackedLayer], weights: dict[str, np.ndarray], what: str = "the model") -> None:
    """Refuse (one line) a packed file whose layers are not ``weights`` (name -> array, e.g. an
    ONNX model's initializers) bit for bit."""
    for L in layers:
        w = weights.get(L.weight)
        if w is None:
            raise GraphOptError(f"the packed file does not match {what}: it has no weight '{L.weight}' "
                                f"(layer '{L.source}')")
        if tuple(np.shape(w)) != L.shape:
            raise GraphOptError(f"the packed file does not match {what}: weight '{L.weight}' is "
                                f"{list(np.shape(w))} there, {list(L.shape)} in the file")
        if not np.array_equal(unpack_layer(L), np.asarray(w, np.float32)):
            raise GraphOptError(f"the packed file does not match {what}: weight '{L.weight}' "
                                f"(layer '{L.source}') holds other values")
