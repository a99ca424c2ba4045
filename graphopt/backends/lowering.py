"""Lowering FakeQuant nodes to ONNX, and onnxruntime's verdict on the result.

* ``lower(graph, "qdq")``: QuantizeLinear/DequantizeLinear pairs on activations; weights and
  biases become integer initializers + DequantizeLinear (int8 weights symmetric, zero point 0;
  int32 biases). 8-bit needs opset 13; 4/16-bit and blocked weights need opset 21 (the model
  is converted with ``onnx.version_converter`` when it is older).
* ``lower(graph, "qoperator")``: QDQ first, then Conv -> QLinearConv and MatMul ->
  QLinearMatMul where the input, weight and output are quantized; Gemm -> MatMulInteger with an
  int32 bias add and a float rescale. Only standard ONNX ops are emitted. A ReLU/Clip between a
  layer and its output quantizer is dropped only when the output range already implies it.
* ``lower(graph, "float")``: every FakeQuant becomes the same maths in float ops (Div, Round,
  Add, Clip, Sub, Mul): an exact simulation that any runtime executes.
A bit width that no ONNX integer type holds (2, 3, 5-7, 9-15 bits) is always simulated in
float, and the returned report lists those nodes.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto

from graphopt.errors import GraphOptError
from graphopt.geometry import geometry
from graphopt.ir import Graph, Node
from graphopt.quantizers.uniform import DOMAIN, FAKE_QUANT, broadcast_param, fq_range, quantize_np

INT_TYPES = {(8, True): TensorProto.INT8, (8, False): TensorProto.UINT8, (16, True): TensorProto.INT16,
             (16, False): TensorProto.UINT16, (4, True): TensorProto.INT4, (4, False): TensorProto.UINT4}
INTEGER_KERNELS = {"QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger", "QGemm", "MatMulIntegerToFloat",
                   "DynamicQuantizeMatMul", "QAttention", "MatMulNBits"}
FLOAT_KERNELS = {"Conv", "Gemm", "MatMul", "FusedConv", "FusedGemm", "FusedMatMul", "ConvTranspose", "NhwcConv"}


@dataclass
class LowerReport:
    format: str
    qdq_pairs: int = 0
    weights: int = 0
    simulated: list[str] = field(default_factory=list)
    fused: int = 0
    opset: int = 0


def _np_dtype(elem: int):
    return onnx.helper.tensor_dtype_to_np_dtype(elem)


def _fq_attrs(n: Node):
    qmin, qmax = fq_range(n)
    return n.attr("bits", 8), bool(n.attr("signed", 1)), qmin, qmax, n.attr("axis"), n.attr("block_size", 0), n.attr("kind", "act")


def is_quantized(graph: Graph) -> bool:
    return any(n.domain == DOMAIN and n.op_type == FAKE_QUANT for n in graph.nodes)


def lower(graph: Graph, fmt: str) -> tuple[Graph, LowerReport]:
    """A lowered copy of ``graph`` (FakeQuant-free) and what was done."""
    if fmt not in ("qdq", "qoperator", "float"):
        raise GraphOptError(f"unknown format '{fmt}' (float, qdq, qoperator)")
    g = graph.copy()
    rep = LowerReport(fmt)
    fqs = [n for n in g.nodes if n.domain == DOMAIN and n.op_type == FAKE_QUANT]
    if fmt != "float" and not fqs:
        raise GraphOptError(f"--format {fmt} needs a quantized graph: add 'quantize' to the pipeline "
                            "(or use --preset int8)")
    if fmt == "qoperator":
        bad = [n for n in fqs if n.attr("kind", "act") != "bias" and n.attr("bits", 8) != 8]
        if bad:
            n = bad[0]
            raise GraphOptError(f"--format qoperator supports 8-bit weights and activations only (QLinearConv/"
                                f"QLinearMatMul); '{n.source}' has a {n.attr('bits')}-bit {n.attr('kind', 'act')} "
                                "quantizer: use --format qdq")
    need = g.opset_imports.get("", 13)
    for n in fqs:
        bits, signed, qmin, qmax, axis, block, kind = _fq_attrs(n)
        is_const = g.const_value(n.inputs[0]) is not None
        elem = TensorProto.INT32 if (bits == 32 and signed and kind == "bias" and is_const) else INT_TYPES.get((bits, signed))
        if fmt == "float" or elem is None or (fmt != "float" and not is_const and bits == 32):
            _simulate(g, n, qmin, qmax)
            if fmt != "float":
                rep.simulated.append(n.source)
            continue
        if bits in (4, 16) or block:
            need = max(need, 21)
        else:
            need = max(need, 13)
        _qdq(g, n, elem, qmin, qmax, axis, block, is_const)
        rep.weights += int(is_const)
        rep.qdq_pairs += int(not is_const)
    if not any(n.domain == DOMAIN for n in g.nodes):
        g.opset_imports.pop(DOMAIN, None)
    if fmt == "qoperator":
        rep.fused = _to_qoperator(g)
    from graphopt.passes.canonicalize import EliminateDead

    EliminateDead()(g)
    rep.opset = max(g.opset_imports.get("", 13), need)
    g.model_meta["required_opset"] = rep.opset
    return g, rep


def to_model(g: Graph, opset: int) -> onnx.ModelProto:
    """Serialize a lowered graph, converting its default-domain opset up to ``opset`` if needed.

    Q/DQ with int4/int16 or blocks exist only from opset 21, and older models carry ops whose
    form changed on the way (ReduceMean, Split, ...). The float ops are converted with
    ``onnx.version_converter`` while stand-ins take the place of every Q/DQ node; the original
    Q/DQ nodes are then put back."""
    from graphopt.backends.onnx_file import to_onnx
    from graphopt.frontends.onnx_file import from_model_proto

    cur = g.opset_imports.get("", opset)
    model = to_onnx(g)
    if cur >= opset:
        return model
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    qdq_inputs = {i for n in qdq for i in n.input}
    others = {i for n in model.graph.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear") for i in n.input}
    q_outputs = {n.output[0]: n for n in qdq if n.op_type == "QuantizeLinear"}
    stripped = onnx.ModelProto()
    stripped.CopyFrom(model)
    del stripped.graph.node[:]
    del stripped.graph.value_info[:]
    standins = []
    for n in model.graph.node:
        if n.op_type == "QuantizeLinear":
            continue
        if n.op_type == "DequantizeLinear":
            src = n.input[0]
            if src in q_outputs:  # activation pair: an Identity from the float input
                idn = onnx.helper.make_node("Identity", [q_outputs[src].input[0]], [n.output[0]],
                                            name=f"__graphopt_standin_{len(standins)}")
                stripped.graph.node.append(idn)
                standins.append(idn.name)
            else:  # weight: a float stand-in initializer of the same shape
                t = next(t for t in model.graph.initializer if t.name == src)
                stripped.graph.initializer.append(
                    onnx.numpy_helper.from_array(np.zeros(tuple(t.dims), np.float32), n.output[0]))
            continue
        stripped.graph.node.append(n)
    only_qdq = qdq_inputs - others
    inits = [t for t in stripped.graph.initializer if t.name not in only_qdq]
    del stripped.graph.initializer[:]
    stripped.graph.initializer.extend(inits)
    try:
        conv = onnx.version_converter.convert_version(stripped, opset)
    except Exception as e:
        raise GraphOptError(f"cannot convert the model from opset {cur} to {opset} (needed for 4/16-bit or blocked "
                            f"quantization): {str(e).splitlines()[0]}") from e
    dq_outs = {n.output[0] for n in qdq if n.op_type == "DequantizeLinear"}
    keep_nodes = [n for n in conv.graph.node if n.name not in standins]
    del conv.graph.node[:]
    conv.graph.node.extend(keep_nodes + qdq)
    kept = [t for t in conv.graph.initializer if t.name not in dq_outs]
    del conv.graph.initializer[:]
    conv.graph.initializer.extend(kept + [t for t in model.graph.initializer if t.name in only_qdq])
    del conv.graph.value_info[:]
    return to_onnx(from_model_proto(conv, infer_shapes=False))


def _scale_zp(g: Graph, n: Node, elem: int):
    s = np.asarray(g.const_value(n.inputs[1]), np.float32)
    z = np.asarray(g.const_value(n.inputs[2]), np.float32)
    return s, z, z.astype(_np_dtype(elem))


def _qdq(g: Graph, n: Node, elem: int, qmin: int, qmax: int, axis, block: int, is_const: bool) -> None:
    x = n.inputs[0]
    s, z, zt = _scale_zp(g, n, elem)
    attrs = {}
    if axis is not None and s.size > 1:
        attrs["axis"] = int(axis)
    if block:
        attrs["block_size"] = int(block)
    sc = g.add_const(s, f"{x.name}_scale")
    zc = g.add_const(zt, f"{x.name}_zero_point")
    out = n.outputs[0]
    if is_const:
        w = np.asarray(g.const_value(x), np.float32)
        dim = w.shape[axis] if axis is not None else None
        sb, zb = (broadcast_param(p, w.ndim, axis, block, dim) for p in (s, z))
        q = quantize_np(w, sb, zb, qmin, qmax).astype(_np_dtype(elem))
        qc = g.add_const(q, f"{x.name}_quantized")
        dq = g.add_node("DequantizeLinear", [qc, sc, zc], [out.name + "_dq"], attrs=attrs, source=n.source,
                        name=g.unique_node_name(n.name + "_dq"))
    else:
        q = g.add_node("QuantizeLinear", [x, sc, zc], [x.name + "_quantized"], attrs=attrs, source=n.source,
                       name=g.unique_node_name(n.name + "_q"))
        q.outputs[0].dtype, q.outputs[0].shape = elem, x.shape
        dq = g.add_node("DequantizeLinear", [q.outputs[0], sc, zc], [out.name + "_dq"], attrs=attrs, source=n.source,
                        name=g.unique_node_name(n.name + "_dq"))
    dq.outputs[0].dtype, dq.outputs[0].shape = out.dtype or TensorProto.FLOAT, out.shape
    g.replace_all_uses(out, dq.outputs[0])
    g.remove_node(n)
    if not x.uses and x.const is not None:
        g.remove_const(x)


def _simulate(g: Graph, n: Node, qmin: int, qmax: int) -> None:
    """FakeQuant as float ops: ((clip(round(x / s) + z, qmin, qmax)) - z) * s, broadcast per axis."""
    x, out = n.inputs[0], n.outputs[0]
    s, z, _ = _scale_zp(g, n, TensorProto.FLOAT)
    axis, block = n.attr("axis"), n.attr("block_size", 0)
    rank = len(x.shape) if x.shape is not None else (np.asarray(g.const_value(x)).ndim if x.const is not None else None)
    if axis is not None and s.size > 1:
        if rank is None:
            raise GraphOptError(f"cannot simulate per-channel FakeQuant '{n.name}' on a value of unknown rank")
        dim = x.shape[axis] if x.shape is not None else None
        s = broadcast_param(s, rank, axis % rank, block, dim)
        z = broadcast_param(z, rank, axis % rank, block, dim)
    sc, zc = g.add_const(s.astype(np.float32), f"{x.name}_scale"), g.add_const(z.astype(np.float32), f"{x.name}_zp")
    lo, hi = g.add_const(np.array(qmin, np.float32), f"{x.name}_qmin"), g.add_const(np.array(qmax, np.float32),
                                                                                  f"{x.name}_qmax")

    def node(op, ins, tag):
        m = g.add_node(op, ins, [f"{out.name}_{tag}"], source=n.source, name=g.unique_node_name(f"{n.name}_{tag}"))
        m.outputs[0].dtype, m.outputs[0].shape = out.dtype or TensorProto.FLOAT, out.shape
        return m.outputs[0]

    v = node("Div", [x, sc], "div")
    v = node("Round", [v], "round")
    v = node("Add", [v, zc], "addzp")
    v = node("Clip", [v, lo, hi], "clip")
    v = node("Sub", [v, zc], "subzp")
    v = node("Mul", [v, sc], "mul")
    g.replace_all_uses(out, v)
    g.remove_node(n)


# ------------------------------------------------------------------ QOperator
def _dq_parts(g: Graph, v):
    """(quantized value, scale, zero point, DQ node) if v = DequantizeLinear(...), else None."""
    p = v.producer if v is not None else None
    if p is None or p.op_type != "DequantizeLinear" or p.domain != "":
        return None
    return p.inputs[0], p.inputs[1], p.inputs[2], p


def _output_q(g: Graph, n: Node):
    """Follow n's output through an optional Relu/Clip to a sole QuantizeLinear.
    Returns (Q node, [activation nodes]) or None."""
    v = n.outputs[0]
    acts = []
    while True:
        if len(v.uses) != 1 or v.is_graph_output:
            return None
        (u,) = v.users()
        if u.op_type == "QuantizeLinear" and u.inputs[0] is v:
            return u, acts
        if u.op_type in ("Relu", "Clip") and not acts:
            acts.append(u)
            v = u.outputs[0]
            continue
        return None


def _act_implied(g: Graph, acts: list[Node], q: Node) -> bool:
    """Whether the output quantizer's range already does what the ReLU/Clip does."""
    if not acts:
        return True
    s = float(np.asarray(g.const_value(q.inputs[1])).reshape(-1)[0])
    zt = np.asarray(g.const_value(q.inputs[2]))
    info = np.iinfo(zt.dtype) if zt.dtype.kind in "iu" else None
    if info is None:
        return False
    z = float(zt.reshape(-1)[0])
    lo, hi = (info.min - z) * s, (info.max - z) * s
    a = acts[0]
    if a.op_type == "Relu":
        return lo >= 0.0
    from graphopt.passes._layers import clip_bounds

    b = clip_bounds(g, a)
    if b is None:
        return False
    cmin = -np.inf if b[0] is None else b[0]
    cmax = np.inf if b[1] is None else b[1]
    return lo >= cmin and hi <= cmax


def _to_qoperator(g: Graph) -> int:
    fused = 0
    for n in list(g.nodes):
        if n.domain != "" or n.op_type not in ("Conv", "MatMul", "Gemm") or n.graph is None:
            continue
        xp, wp = _dq_parts(g, n.inputs[0]), _dq_parts(g, n.inputs[1])
        if xp is None or wp is None or g.const_value(wp[0]) is None or xp[0].producer is None:
            continue
        if n.op_type == "Gemm":
            fused += _gemm_integer(g, n, xp, wp)
            continue
        out = _output_q(g, n)
        if out is None:
            continue
        q, acts = out
        if not _act_implied(g, acts, q):
            continue
        if np.asarray(g.const_value(xp[1])).size != 1 or np.asarray(g.const_value(q.inputs[1])).size != 1:
            continue
        if n.op_type == "Conv":
            bias = None
            if len(n.inputs) > 2 and n.inputs[2] is not None:
                bp = _dq_parts(g, n.inputs[2])
                if bp is None or g.const_value(bp[0]) is None:
                    continue
                bias = bp[0]
            ins = [xp[0], xp[1], xp[2], wp[0], wp[1], wp[2], q.inputs[1], q.inputs[2]] + ([bias] if bias else [])
            new = g.add_node("QLinearConv", ins, [q.outputs[0].name + "_qlinear"], attrs=dict(n.attrs),
                             source=n.source, name=g.unique_node_name(n.name + "_qlinear"))
        else:
            new = g.add_node("QLinearMatMul", [xp[0], xp[1], xp[2], wp[0], wp[1], wp[2], q.inputs[1], q.inputs[2]],
                             [q.outputs[0].name + "_qlinear"], source=n.source,
                             name=g.unique_node_name(n.name + "_qlinear"))
        new.outputs[0].dtype, new.outputs[0].shape = q.outputs[0].dtype, q.outputs[0].shape
        g.replace_all_uses(q.outputs[0], new.outputs[0])
        fused += 1
    return fused


def _gemm_integer(g: Graph, n: Node, xp, wp) -> int:
    """DQ(x) -> Gemm(DQ(W), DQ(b)) as MatMulInteger(x_q, W^T_q) + b_q -> Cast -> Mul(s_x * s_w)."""
    if n.attr("transA", 0) or n.attr("alpha", 1.0) != 1.0 or n.attr("beta", 1.0) != 1.0:
        return 0
    w_q = np.asarray(g.const_value(wp[0]))
    w_s = np.asarray(g.const_value(wp[1]), np.float32)
    w_z = np.asarray(g.const_value(wp[2]))
    x_s = np.asarray(g.const_value(xp[1]), np.float32)
    if x_s.size != 1 or np.any(w_z != 0) or w_q.dtype != np.int8:
        return 0
    w_q = np.ascontiguousarray(geometry(n).in_view(w_q))  # [K, N], as MatMulInteger reads it
    bias = None
    if len(n.inputs) > 2 and n.inputs[2] is not None:
        bp = _dq_parts(g, n.inputs[2])
        if bp is None or g.const_value(bp[0]) is None:
            return 0
        bias = np.asarray(g.const_value(bp[0]))
        if bias.dtype != np.int32:
            return 0
    wc = g.add_const(w_q, f"{n.name}_WT_quantized")
    wz = g.add_const(np.zeros(w_q.shape[1] if w_z.size > 1 else (), np.int8), f"{n.name}_W_zero_point")
    mm = g.add_node("MatMulInteger", [xp[0], wc, xp[2], wz], [n.outputs[0].name + "_int32"], source=n.source,
                    name=g.unique_node_name(n.name + "_matmulinteger"))
    v = mm.outputs[0]
    if bias is not None:
        add = g.add_node("Add", [v, g.add_const(bias, f"{n.name}_bias_int32")], [n.outputs[0].name + "_acc"],
                         source=n.source, name=g.unique_node_name(n.name + "_addbias"))
        v = add.outputs[0]
    cast = g.add_node("Cast", [v], [n.outputs[0].name + "_float"], attrs={"to": TensorProto.FLOAT}, source=n.source,
                      name=g.unique_node_name(n.name + "_cast"))
    scale = (w_s.reshape(-1) * x_s.reshape(())).astype(np.float32)
    mul = g.add_node("Mul", [cast.outputs[0], g.add_const(scale, f"{n.name}_rescale")], [n.outputs[0].name + "_y"],
                     source=n.source, name=g.unique_node_name(n.name + "_rescale"))
    mul.outputs[0].dtype, mul.outputs[0].shape = n.outputs[0].dtype, n.outputs[0].shape
    g.replace_all_uses(n.outputs[0], mul.outputs[0])
    g.remove_node(n)
    return 1


# ------------------------------------------------------------------ onnxruntime's verdict
def ort_kernel_report(model: onnx.ModelProto | str) -> dict:
    """Load the model in onnxruntime, read back its optimized graph, and list every
    Conv/Gemm/MatMul that still runs in float next to the integer kernels."""
    import onnxruntime as ort

    fd, path = tempfile.mkstemp(suffix=".onnx")
    os.close(fd)
    try:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = path
        so.log_severity_level = 3
        src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
        ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
        opt = onnx.load(path)
    finally:
        for p in (path, path + ".data"):
            if os.path.exists(p):
                os.unlink(p)
    float_ops = [(n.op_type, n.name) for n in opt.graph.node if n.op_type in FLOAT_KERNELS]
    int_ops = Counter(n.op_type for n in opt.graph.node if n.op_type in INTEGER_KERNELS)
    return {"float": float_ops, "integer": dict(int_ops), "nodes": len(opt.graph.node)}
