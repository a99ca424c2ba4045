"""How stored weights are written to an ONNX file: the forms of ``graphopt.storage`` (which
owns choosing and computing them) as initializers plus the unpacking nodes onnxruntime folds
into an int8 (or float) initializer at session start (so QLinearConv/QGemm run on it).

* codes in [-8, 7]: an INT4 initializer and ``Cast(to=INT8)`` (half a byte per weight);
* at most 16 distinct codes (a power-of-two or APoT tensor): a UINT4 index, a 16-entry int8
  codebook, ``Cast(to=INT32)`` and ``Gather``;
* anything else: an INT8 initializer;
* k-means shared weights (``palette_weight``): a UINT4 (or UINT8/16) index in the weight's
  shape, the float codebooks, ``Cast(to=INT64)``, a broadcast ``Add`` of each group's offset
  when there are several codebooks, and ``Gather``.

onnxruntime's constant folding runs the Cast/Gather on the initializers before its Q/DQ
fusion, so the int4 file runs exactly as fast as its int8 twin (measured in
``tools/bench_zoo.py``). The unpacking nodes are named ``*_unpack`` so that ``to_model`` keeps
them with the DequantizeLinear they feed when it converts opsets.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from graphopt.errors import GraphOptError
from graphopt.ir import numpy_dtype
from graphopt.storage import Palette, SharedPalette, smallest_int8_form

UNPACK_TAG = "_unpack"


def int8_codes(g, codes: np.ndarray, name: str, source: str, packed: bool = True):
    """A value holding ``codes`` (integers in [-128, 127]) as INT8, stored as compactly as
    onnxruntime allows. Returns ``(value, opset)``: the default-domain opset the nodes need."""
    codes = np.asarray(codes)
    c8 = codes.astype(np.int8)
    if not packed or c8.size == 0:
        return g.add_const(c8, f"{name}_quantized"), 13

    def node(op, ins, tag, **attrs):
        m = g.add_node(op, ins, [f"{name}_{tag}"], attrs=attrs, source=source,
                       name=g.unique_node_name(f"{name}_{tag}{UNPACK_TAG}"))
        return m.outputs[0]

    form = smallest_int8_form(c8)  # the storage owner decides the form and computes it
    if form.name == "int8":
        return g.add_const(c8, f"{name}_quantized"), 13
    if form.name == "int4":
        packed4 = g.add_const(c8.astype(numpy_dtype(TensorProto.INT4)), f"{name}_int4")
        out = node("Cast", [packed4], "int8", to=TensorProto.INT8)
    else:
        enc = form.encode(c8)
        book = enc["codebook"].astype(np.int8)
        idx = g.add_const(enc["index"].reshape(c8.shape).astype(numpy_dtype(TensorProto.UINT4)), f"{name}_index")
        i32 = node("Cast", [idx], "index32", to=TensorProto.INT32)
        i32.dtype, i32.shape = TensorProto.INT32, c8.shape
        out = node("Gather", [g.add_const(book, f"{name}_codebook"), i32], "int8", axis=0)
    out.dtype, out.shape = TensorProto.INT8, c8.shape
    return out, 21


def is_unpack_node(name: str) -> bool:
    return name.endswith(UNPACK_TAG) or UNPACK_TAG + "_" in name


def codes_of(g, v) -> np.ndarray | None:
    """The int8 codes a value holds: a constant's, or those its unpacking Cast/Gather compute
    from constants. None when the value is computed from data."""
    c = g.const_value(v)
    if c is not None:
        return np.asarray(c)
    p = v.producer
    if p is None or not is_unpack_node(p.name):
        return None
    if p.op_type == "Cast":
        src = codes_of(g, p.inputs[0])
        return None if src is None else src.astype(np.int8 if p.attr("to") == TensorProto.INT8 else np.int32)
    if p.op_type == "Gather":
        book, idx = codes_of(g, p.inputs[0]), codes_of(g, p.inputs[1])
        return None if book is None or idx is None else np.take(book, idx.astype(np.int64), axis=0)
    return None


def float_codebook(g, y: np.ndarray, axis: int | None, name: str, source: str):
    """An exact float weight ``y`` whose rows (one per index of ``axis``, or one) each hold at
    most 256 distinct values, stored as a uint8 index per weight and a float32 codebook per
    row: ``GatherElements(book, Cast(index))`` reshaped to ``y``'s layout. onnxruntime folds it
    into the float initializer at session start, so the file is about a quarter of FP32 and the
    values are bit for bit ``y``. Returns the value, or None when a row has more levels."""
    y = np.asarray(y, np.float32)
    moved = np.moveaxis(y, axis, 0) if axis is not None else y.reshape(1, -1)
    rows = moved.reshape(moved.shape[0], -1)
    try:
        enc = Palette(axis=axis, index_bits=8).encode(y)
    except GraphOptError:  # a row with more than 256 levels: no palette
        return None
    book, idx = enc["codebook"], enc["index"]

    def node(op, ins, tag, **attrs):
        m = g.add_node(op, ins, [f"{name}_{tag}"], attrs=attrs, source=source,
                       name=g.unique_node_name(f"{name}_{tag}"))
        return m.outputs[0]

    iv = g.add_const(idx.astype(np.uint8), f"{name}_index")
    i64 = node("Cast", [iv], "index64", to=TensorProto.INT64)
    i64.dtype, i64.shape = TensorProto.INT64, rows.shape
    flat = node("GatherElements", [g.add_const(book, f"{name}_codebook"), i64], "rows", axis=1)
    flat.dtype, flat.shape = TensorProto.FLOAT, rows.shape
    out = node("Reshape", [flat, g.add_const(np.array(moved.shape, np.int64), f"{name}_shape")], "moved")
    out.dtype, out.shape = TensorProto.FLOAT, tuple(moved.shape)
    if axis is None:
        out = node("Reshape", [out, g.add_const(np.array(y.shape, np.int64), f"{name}_shape_out")], "value")
    elif axis != 0:
        perm = list(range(1, y.ndim))
        perm.insert(axis, 0)
        out = node("Transpose", [out], "value", perm=perm)
    out.dtype, out.shape = TensorProto.FLOAT, tuple(y.shape)
    return out


def palette_weight(g, book: np.ndarray, index: np.ndarray, axis: int | None, group_rows: int, name: str,
                   source: str):
    """A float weight shared through codebooks (``book`` [groups, k], ``index`` in the weight's
    shape, -1 for a pruned zero; one codebook per ``group_rows`` slices along ``axis``), written
    in ``storage.SharedPalette``'s form: ``Gather(flat codebook, Cast(index) [+ group offset])``.
    Returns ``(value, opset)``."""
    book, idx, bits = SharedPalette.form(book, index)
    k = book.shape[1]
    dtype = {4: TensorProto.UINT4, 8: TensorProto.UINT8, 16: TensorProto.UINT16}[bits]

    def node(op, ins, tag, **attrs):
        m = g.add_node(op, ins, [f"{name}_{tag}"], attrs=attrs, source=source,
                       name=g.unique_node_name(f"{name}_{tag}{UNPACK_TAG}"))
        return m.outputs[0]

    iv = g.add_const(idx.astype(numpy_dtype(dtype)), f"{name}_index")
    i64 = node("Cast", [iv], "index64", to=TensorProto.INT64)
    i64.dtype, i64.shape = TensorProto.INT64, idx.shape
    if book.shape[0] > 1:
        shape = [1] * idx.ndim
        shape[axis] = idx.shape[axis]
        offs = (np.arange(idx.shape[axis]) // group_rows * k).astype(np.int64).reshape(shape)
        i64 = node("Add", [i64, g.add_const(offs, f"{name}_offset")], "flat_index")
        i64.dtype, i64.shape = TensorProto.INT64, idx.shape
    out = node("Gather", [g.add_const(book.reshape(-1), f"{name}_codebook"), i64], "value", axis=0)
    out.dtype, out.shape = TensorProto.FLOAT, tuple(idx.shape)
    return out, 21 if bits == 4 else 13
