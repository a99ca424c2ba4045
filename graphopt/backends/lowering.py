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

import functools
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto

from graphopt.errors import GraphOptError
from graphopt.geometry import geometry
from graphopt.ir import Graph, Node, clip_bounds
from graphopt.quantizers import DOMAIN, from_node, is_fake_quant
from graphopt.quantizers.base import refresh_bias_scales
from graphopt.quantizers.packing import codes_of, int8_codes

ACCURACY_LEVELS = (0, 1, 2, 3, 4)  # MatMulNBits: minimum precision of its activations (0 = as the file; 4 = int8)
INTEGER_KERNELS = {"QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger", "QGemm", "MatMulIntegerToFloat",
                   "DynamicQuantizeMatMul", "QAttention", "MatMulNBits"}
FLOAT_KERNELS = {"Conv", "Gemm", "MatMul", "FusedConv", "FusedGemm", "FusedMatMul", "ConvTranspose", "NhwcConv"}


@dataclass
class LowerReport:
    """What ``lower`` did. Every quantizer left in float and every layer not fused into a
    QOperator kernel is listed with its reason."""

    format: str
    qdq_pairs: int = 0
    weights: int = 0
    simulated: list[str] = field(default_factory=list)  # sources of FakeQuants simulated in float
    simulated_why: dict[str, str] = field(default_factory=dict)  # FakeQuant node -> reason
    fused: int = 0
    not_fused: dict[str, str] = field(default_factory=dict)  # "op 'source'" -> why no QOperator kernel
    schemes: dict[str, int] = field(default_factory=dict)  # report line of each quantizer -> count
    opset: int = 0

    def lines(self) -> list[str]:
        """The fall-backs, one line each, for the conversion summary."""
        out = [f"quantizer '{k}' simulated in float: {why}" for k, why in self.simulated_why.items()]
        out += [f"{k} not lowered to QOperator: {why}" for k, why in self.not_fused.items()]
        return out


def is_quantized(graph: Graph) -> bool:
    return any(is_fake_quant(n) for n in graph.nodes)


def check_format(fmt: str, quantized: bool, quantizers) -> None:
    """Whether ``fmt`` can be written: ``quantizers`` are ``(what, Quantizer)`` pairs. The one
    place that knows what a format takes; the CLI asks it before running (from the pipeline's
    planned specs), ``lower`` asks it with the graph's FakeQuants. ``quantizers`` are
    ``(what, Quantizer, kind)`` triples."""
    if fmt not in ("qdq", "qoperator", "float"):
        raise GraphOptError(f"unknown format '{fmt}' (float, qdq, qoperator)")
    if fmt != "float" and not quantized:
        raise GraphOptError(f"--format {fmt} needs a quantized graph: add 'quantize' to the pipeline "
                            "(or use --preset int8)")
    if fmt == "qoperator":
        for what, q, kind in quantizers:
            nbits = kind == "weight" and getattr(q, "granularity", "") == "block" \
                and getattr(q, "bits", 0) <= 8  # weight-only blocks, either sign: MatMulNBits
            if q.kernel_bits(kind) != 8 and not nbits:
                raise GraphOptError(f"--format qoperator needs weights and activations on 8-bit integer kernels "
                                    f"(QLinearConv/QLinearMatMul), or weight blocks of up to 8 bits (MatMulNBits); "
                                    f"{what} is {q.describe()}: use --format qdq")


def check_accuracy_level(level) -> None:
    """A MatMulNBits accuracy level onnxruntime defines, or a one-line error."""
    if level not in ACCURACY_LEVELS:
        raise GraphOptError(f"accuracy_level must be one of {', '.join(map(str, ACCURACY_LEVELS))}, not {level}")


def lower(graph: Graph, fmt: str, *, accuracy_level: int = 0) -> tuple[Graph, LowerReport]:
    """A lowered copy of ``graph`` (FakeQuant-free) and what was done. Each FakeQuant is
    lowered by its own scheme (``Quantizer.lower``); QOperator fusion then runs on the Q/DQ form.
    ``accuracy_level`` goes into every ``MatMulNBits`` (0: float activations, what the file
    says; 4: onnxruntime quantizes the activations to int8 per block, faster, not exact)."""
    check_accuracy_level(accuracy_level)
    from graphopt.training.gradquant import drop_grad_quants

    g = graph.copy()
    rep = LowerReport(fmt)
    drop_grad_quants(g)  # gradient quantizers act in training only
    refresh_bias_scales(g)  # int32 biases on the steps the layers have now (training moves them)
    quantizers = {n: from_node(n) for n in g.nodes if is_fake_quant(n)}
    check_format(fmt, bool(quantizers), [(f"the {n.attr('kind', 'act')} quantizer of '{n.source}'", q,
                                          n.attr("kind", "act"))
                                         for n, q in quantizers.items() if n.attr("kind", "act") != "bias"])
    need = g.opset_imports.get("", 13)
    # weights first: a layer whose weight stays float must not read a DequantizeLinear, or
    # onnxruntime's WeightBiasQuantization re-quantizes that weight to int8 by itself (an
    # approximation the user did not ask for); its input quantizer is then simulated in float.
    order = sorted(quantizers, key=lambda n: n.attr("kind", "act") != "weight")
    float_layers: set = set()
    for n in order:
        q = quantizers[n]
        is_const = g.const_value(n.inputs[0]) is not None
        line = q.describe()
        rep.schemes[line] = rep.schemes.get(line, 0) + 1
        name = n.name
        kind = n.attr("kind", "act")
        layers = [u for u, i in n.outputs[0].uses if i == 1 and u.op_type in ("Conv", "Gemm", "MatMul")]
        if kind == "act" and fmt != "float":
            _split_for_float_layers(g, n, q, float_layers, rep)
        done = q.lower(g, n, fmt)
        need = max(need, done.opset)
        if not done.integer:
            if kind == "weight":
                float_layers.update(layers)
            if fmt != "float":
                rep.simulated.append(n.source)
                rep.simulated_why[name] = done.reason
            continue
        rep.weights += int(is_const)
        rep.qdq_pairs += int(not is_const)
    if not any(n.domain == DOMAIN for n in g.nodes):
        g.opset_imports.pop(DOMAIN, None)
    if fmt != "float":
        for n in list(g.nodes):
            if n.domain == "" and n.op_type == "Gather" and n.graph is not None:
                _gather_codes(g, n)
            if n.domain == "" and n.op_type in ("MatMul", "Gemm") and n.graph is not None:
                why = _dynamic_integer(g, n)
                if why is None:
                    rep.fused += 1
                elif why:
                    rep.not_fused[f"{n.op_type} '{n.source}'"] = why
    if fmt == "qoperator":
        rep.fused += _to_qoperator(g, rep.not_fused, accuracy_level)
    g.eliminate_dead()
    rep.opset = max(g.opset_imports.get("", 13), need)
    return g, rep


def _split_for_float_layers(g: Graph, n: Node, q, float_layers: set, rep: LowerReport) -> None:
    """Give the float-weight layers among ``n``'s readers their own copy of the activation
    quantizer, written as float maths (exact, and invisible to onnxruntime's Q/DQ fusion)."""
    readers = [(u, i) for u, i in n.outputs[0].uses if u in float_layers and i == 0]
    if not readers:
        return
    copy = g.add_node(n.op_type, list(n.inputs), [n.outputs[0].name + "_float_layer"], attrs=dict(n.attrs),
                      domain=n.domain, source=n.source, name=g.unique_node_name(n.name + "_float_layer"))
    copy.outputs[0].dtype, copy.outputs[0].shape = n.outputs[0].dtype, n.outputs[0].shape
    for u, i in readers:
        g.set_input(u, i, copy.outputs[0])
    q.lower(g, copy, "float")
    rep.simulated_why[copy.name] = "it feeds a layer whose weight is simulated in float"


def export(graph: Graph, fmt: str = "float", *, accuracy_level: int = 0) -> tuple[onnx.ModelProto, LowerReport | None]:
    """The one way a graph becomes an ONNX model: a float graph as it is (``fmt='float'``), a
    quantized one lowered to ``fmt`` (``qdq``, ``qoperator``, or ``float``: its exact float
    simulation). Returns the model and the lowering report (None for a float graph)."""
    from graphopt.serialize import to_onnx

    if fmt == "float" and not is_quantized(graph):
        return to_onnx(graph), None
    lowered, rep = lower(graph, fmt, accuracy_level=accuracy_level)
    return to_model(lowered, rep.opset), rep


def export_file(graph: Graph, path: str | os.PathLike, fmt: str = "float", *,
                external_data: bool | None = None, accuracy_level: int = 0) -> LowerReport | None:
    """``export`` written atomically to ``path`` (a float graph through ``save_onnx``, which can
    write large weights as external data). Returns the lowering report, or None."""
    from graphopt.atomic import atomic_paths
    from graphopt.serialize import save_onnx

    if fmt == "float" and not is_quantized(graph):
        save_onnx(graph, path, external_data=external_data)
        return None
    model, rep = export(graph, fmt, accuracy_level=accuracy_level)
    with atomic_paths(str(path)) as (tmp,):
        with open(tmp, "wb") as fh:
            fh.write(model.SerializeToString())
    return rep


def to_model(g: Graph, opset: int) -> onnx.ModelProto:
    """Serialize a lowered graph, converting its default-domain opset up to ``opset`` if needed.

    Q/DQ with int4/int16 or blocks exist only from opset 21, and older models carry ops whose
    form changed on the way (ReduceMean, Split, ...). The float ops are converted with
    ``onnx.version_converter`` while stand-ins take the place of every Q/DQ node; the original
    Q/DQ nodes are then put back."""
    from graphopt.frontends.onnx_file import from_model_proto
    from graphopt.serialize import to_onnx

    cur = g.opset_imports.get("", opset)
    model = to_onnx(g)
    if cur >= opset:
        return model
    from graphopt.quantizers.packing import is_unpack_node

    # The integer part of the graph is kept aside: Q/DQ, the weight unpacking, the QLinear and
    # integer ops, and whatever reads their integer outputs. It is converted by nobody: these
    # ops have the same form in every opset from 13 (21 for int4), so it is put back as it is.
    integer_ops = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "MatMulInteger",
                   "ConvInteger", "QLinearAdd", "QLinearConcat", "QLinearAveragePool", "QLinearGlobalAveragePool"}

    float_books = {t.name for t in model.graph.initializer if t.data_type == TensorProto.FLOAT}

    def float_out(n) -> bool:  # a kept-aside node whose output is float again
        return n.op_type == "DequantizeLinear" or (n.op_type == "Cast" and any(
            a.name == "to" and a.i == TensorProto.FLOAT for a in n.attribute)) or (
            n.op_type == "Gather" and is_unpack_node(n.name) and n.input[0] in float_books)  # a float palette

    aside: list = []
    int_values: set[str] = set()
    for n in model.graph.node:  # topological order
        if n.op_type in integer_ops or is_unpack_node(n.name) or any(i in int_values for i in n.input):
            aside.append(n)
            if not float_out(n):
                int_values.update(n.output)
    aside_ids = {id(n) for n in aside}
    rest = [n for n in model.graph.node if id(n) not in aside_ids]
    init_dims = {t.name: tuple(t.dims) for t in model.graph.initializer}
    producers = {o: n for n in aside for o in n.output}

    def dims(name: str):
        """The shape of stored weight codes (an initializer, or through Cast/Gather to one), or
        None for an activation."""
        if name in init_dims:
            return init_dims[name]
        p = producers.get(name)
        if p is None or not is_unpack_node(p.name):
            return None
        return dims(p.input[1] if p.op_type == "Gather" else p.input[0])  # Gather: the index's; Cast/Add: input 0

    read_by_rest = {i for n in rest for i in n.input} | {o.name for o in model.graph.output}
    stripped = onnx.ModelProto()
    stripped.CopyFrom(model)
    del stripped.graph.node[:]
    del stripped.graph.value_info[:]
    stripped.graph.node.extend(rest)
    standin_inputs = []
    for n in aside:  # the float values the rest reads from the integer part become stand-ins
        if not float_out(n) or n.output[0] not in read_by_rest:
            continue
        d = dims(n.input[0]) if n.op_type == "DequantizeLinear" else dims(n.output[0]) if n.op_type == "Gather" \
            else None
        if d is not None:  # a weight: a float initializer of its shape
            stripped.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros(d, np.float32), n.output[0]))
        else:  # an activation: a graph input
            stripped.graph.input.append(onnx.helper.make_tensor_value_info(n.output[0], TensorProto.FLOAT, None))
            standin_inputs.append(n.output[0])
    used_by_rest = {i for n in rest for i in n.input}
    aside_only = {i for n in aside for i in n.input} - used_by_rest
    inits = [t for t in stripped.graph.initializer if t.name not in aside_only]
    del stripped.graph.initializer[:]
    stripped.graph.initializer.extend(inits)
    try:
        conv = onnx.version_converter.convert_version(stripped, opset)
    except Exception as e:
        raise GraphOptError(f"cannot convert the model from opset {cur} to {opset} (needed for 4/16-bit or blocked "
                            f"quantization): {str(e).splitlines()[0]}") from e
    standin_outs = {o for n in aside for o in n.output}
    nodes = list(conv.graph.node) + aside
    del conv.graph.node[:]
    conv.graph.node.extend(nodes)
    kept = [t for t in conv.graph.initializer if t.name not in standin_outs]
    del conv.graph.initializer[:]
    conv.graph.initializer.extend(kept + [t for t in model.graph.initializer if t.name in aside_only])
    ins = [v for v in conv.graph.input if v.name not in standin_inputs]
    del conv.graph.input[:]
    conv.graph.input.extend(ins)
    del conv.graph.value_info[:]
    return to_onnx(from_model_proto(conv, infer_shapes=False))


# ------------------------------------------------------------------ QOperator
def _dq_parts(g: Graph, v):
    """(quantized value, scale, zero point, DQ node) if v = DequantizeLinear(...), else None."""
    p = v.producer if v is not None else None
    if p is None or p.op_type != "DequantizeLinear" or p.domain != "":
        return None
    return p.inputs[0], p.inputs[1], p.inputs[2], p


def _output_q(g: Graph, n: Node):
    """Follow n's output through an optional Relu/Clip to a sole QuantizeLinear.
    Returns (Q node, [activation nodes]), or why there is none."""
    v = n.outputs[0]
    acts = []
    while True:
        if v.is_graph_output:
            return "its output is a graph output in float"
        if len(v.uses) != 1:
            return f"its output has {len(v.uses)} readers (a QLinear op writes one quantized tensor)"
        (u,) = v.users()
        if u.op_type == "QuantizeLinear" and u.inputs[0] is v:
            return u, acts
        if u.op_type in ("Relu", "Clip") and not acts:
            acts.append(u)
            v = u.outputs[0]
            continue
        return f"its output goes to {u.op_type} '{u.source}' in float, not to a quantizer"


def _act_implied(g: Graph, acts: list[Node], q: Node) -> bool:
    """Whether quantizing straight away gives the same codes as the ReLU/Clip then quantizing:
    the activation's bounds must land on (or beyond) the quantizer's end codes. Compared in
    codes, with QuantizeLinear's float32 division and rounding, so a scale of 6/255 (whose top
    code is 6 plus a rounding error) still implies ReLU6."""
    if not acts:
        return True
    s = np.float32(np.asarray(g.const_value(q.inputs[1])).reshape(-1)[0])
    zt = np.asarray(g.const_value(q.inputs[2]))
    if zt.dtype.kind not in "iu":
        return False
    info = np.iinfo(zt.dtype)
    z = int(zt.reshape(-1)[0])
    a = acts[0]
    b = (0.0, None) if a.op_type == "Relu" else clip_bounds(g, a)
    if b is None:
        return False

    def code(c):
        return int(np.round(np.float32(c) / s)) + z

    low_ok = b[0] is None or code(b[0]) <= info.min
    high_ok = b[1] is None or code(b[1]) >= info.max
    return low_ok and high_ok


def _to_qoperator(g: Graph, not_fused: dict[str, str], accuracy_level: int = 0) -> int:
    """Fuse DQ -> Conv/MatMul/Gemm -> [Relu/Clip] -> Q into integer ops. Every layer left as
    Q/DQ around a float op is recorded in ``not_fused`` with its reason."""
    fused = 0
    for n in list(g.nodes):
        if n.op_type == "Gather" and n.domain == "" and n.graph is not None:
            why = _gather_blocks(g, n)  # a table lookup, not a layer: not counted in ``fused``
            if why:
                not_fused[f"Gather '{n.source}'"] = why
            continue
        if n.domain != "" or n.op_type not in ("Conv", "MatMul", "Gemm") or n.graph is None:
            continue
        blocks = _block_nbits(g, n) if _dq_parts(g, n.inputs[0]) is None else None
        if blocks is not None:
            why = _matmul_nbits(g, n, *blocks, level=accuracy_level)  # weight-only blocks: MatMulNBits
        else:
            why = _fuse(g, n)
        if why is None:
            fused += 1
        else:
            not_fused[f"{n.op_type} '{n.source}'"] = why
    return fused


MS_DOMAIN = "com.microsoft"


_NBITS = {"int4": 4, "uint4": 4, "int8": 8, "uint8": 8}  # code containers MatMulNBits reads as they are


def _block_nbits(g: Graph, n: Node):
    """(bits, unsigned codes [K, N] in 0..2^bits-1, unsigned zero points [K/bs, N] or None for
    the kernel's default 2^(bits-1), scales [K/bs, N], block size) when ``n`` is a MatMul, or a
    plain Gemm (no transA, alpha = beta = 1), whose weight is a blocked 4- or 8-bit
    DequantizeLinear along its input axis; else None. Signed codes and zero points are shifted
    by 2^(bits-1), which leaves (code - zero point) unchanged. (A 2- or 3-bit spec is stored in
    an int4 container and runs as 4-bit blocks.)"""
    if n.op_type == "MatMul":
        in_axis = 0
    elif n.op_type == "Gemm" and not n.attr("transA", 0) and n.attr("alpha", 1.0) == 1.0 \
            and n.attr("beta", 1.0) == 1.0:
        in_axis = 1 if n.attr("transB", 0) else 0
    else:
        return None
    wp = _dq_parts(g, n.inputs[1])
    if wp is None:
        return None
    codes, scale = g.const_value(wp[0]), g.const_value(wp[1])
    zp = g.const_value(wp[2]) if wp[2] is not None else None
    bs = int(wp[3].attr("block_size", 0) or 0)
    kind = str(np.asarray(codes).dtype) if codes is not None else ""
    if scale is None or np.asarray(codes).ndim != 2 or kind not in _NBITS:
        return None
    bits = _NBITS[kind]
    if not bs or wp[3].attr("axis", 1) != in_axis:
        return None
    shift = 1 << (bits - 1) if kind.startswith("int") else 0
    u = (np.asarray(codes).astype(np.int16) + shift).astype(np.uint8)
    z = None if zp is None else (np.asarray(zp).astype(np.int16) + shift).astype(np.uint8)
    if in_axis == 1:  # Gemm with transB: [N, K] -> [K, N]
        u, scale, z = u.T, np.asarray(scale).T, None if z is None else z.T
    if z is not None and np.all(z == 1 << (bits - 1)):
        z = None  # the kernel's default
    elif z is None and shift == 0:  # unsigned codes without zero points: zero point 0, not the default
        z = np.zeros(np.asarray(scale).shape, np.uint8)
    return bits, u, z, np.asarray(scale, np.float32), bs


def _gather_blocks(g: Graph, n: Node) -> str | None:
    """Gather(axis 0) of a table stored as 4-bit blocks along its rows (DequantizeLinear, axis
    1) as com.microsoft GatherBlockQuantized, which dequantizes only the rows it gathers: the
    INT4/UINT4 codes, scales and zero points as they are. None when done; '' when ``n`` is not
    such a Gather; else why it stays DequantizeLinear + Gather."""
    tp = _dq_parts(g, n.inputs[0])
    if tp is None or n.attr("axis", 0) != 0:
        return ""
    codes = g.const_value(tp[0])
    if codes is None or str(np.asarray(codes).dtype) not in ("int4", "uint4") or np.asarray(codes).ndim != 2:
        return ""
    bs = int(tp[3].attr("block_size", 0) or 0)
    if not bs or tp[3].attr("axis", 1) != 1:
        return "GatherBlockQuantized takes 4-bit blocks along the table's rows"
    if bs < 16 or bs & (bs - 1):
        return f"GatherBlockQuantized takes a power-of-two block of at least 16, not {bs}"
    ins = [tp[0], n.inputs[1], tp[1]] + ([tp[2]] if tp[2] is not None else [])
    new = g.add_node("GatherBlockQuantized", ins, [n.outputs[0].name + "_gbq"], domain=MS_DOMAIN,
                     attrs={"gather_axis": 0, "quantize_axis": 1, "block_size": bs, "bits": 4},
                     source=n.source, name=g.unique_node_name(n.name + "_gbq"))
    new.outputs[0].dtype, new.outputs[0].shape = n.outputs[0].dtype, n.outputs[0].shape
    g.opset_imports.setdefault(MS_DOMAIN, 1)
    g.replace_all_uses(n.outputs[0], new.outputs[0])
    return None


def _nibbles(u: np.ndarray) -> np.ndarray:
    """Pack 4-bit values two per byte along the last axis, low nibble first (an odd count is
    padded with a zero nibble)."""
    if u.shape[-1] % 2:
        u = np.concatenate([u, np.zeros(u.shape[:-1] + (1,), np.uint8)], -1)
    return (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)


def _matmul_nbits(g: Graph, n: Node, bits: int, codes: np.ndarray, zp: np.ndarray | None, scale: np.ndarray,
                  bs: int, *, level: int = 0) -> str | None:
    """x @ DQ(4- or 8-bit blocks) (+ a Gemm's bias) as com.microsoft MatMulNBits: unsigned codes
    packed low bits first (4-bit: two per byte), laid out [N, blocks, block * bits / 8]; scales
    [N * blocks]; the zero points, when not the kernel's default 2^(bits-1), packed the same
    way, [N, ceil(blocks * bits / 8)] (asymmetric blocks); ``accuracy_level`` ``level``: 0 by
    default, so the kernel computes what the file says (float activations), not its
    int8-activation fast path (4). The arguments come from ``_block_nbits``."""
    if bs < 16 or bs & (bs - 1):
        return f"MatMulNBits takes a power-of-two block of at least 16, not {bs}"
    K, N = codes.shape
    c = None
    if n.op_type == "Gemm" and len(n.inputs) > 2 and n.inputs[2] is not None:
        c = g.const_value(n.inputs[2])
        if c is None or np.asarray(c).size != N:
            return "its bias is not a constant vector of its outputs (MatMulNBits adds only that)"
        c = np.asarray(c, np.float32).reshape(N)
    nb = -(-K // bs)
    pad = 1 << (bits - 1) if zp is None else 0  # padded rows: code = zero point, so they add nothing
    pack = _nibbles if bits == 4 else (lambda a: a)
    u = np.full((nb * bs, N), pad, np.uint8)
    u[:K] = codes
    if zp is not None:  # the padding rows of the last block sit on that block's zero point
        u[K:] = zp[nb - 1][None, :]
    u = np.ascontiguousarray(u.T).reshape(N, nb, bs)
    b = g.add_const(pack(u), n.inputs[1].name + "_nbits")
    sc = g.add_const(np.ascontiguousarray(scale.T).reshape(-1).astype(np.float32), n.inputs[1].name + "_nbits_scale")
    ins = [n.inputs[0], b, sc]
    if zp is not None:
        ins.append(g.add_const(pack(np.ascontiguousarray(zp.T)).reshape(-1), n.inputs[1].name + "_nbits_zp"))
    if c is not None:
        ins += [None] * (5 - len(ins)) + [g.add_const(c, n.inputs[2].name + "_nbits_bias")]  # A, B, scales,
        # zero_points, g_idx, bias
    new = g.add_node("MatMulNBits", ins, [n.outputs[0].name + "_nbits"], domain=MS_DOMAIN,
                     attrs={"K": K, "N": N, "bits": bits, "block_size": bs, "accuracy_level": level},
                     source=n.source, name=g.unique_node_name(n.name + "_nbits"))
    new.outputs[0].dtype, new.outputs[0].shape = n.outputs[0].dtype, n.outputs[0].shape
    g.opset_imports.setdefault(MS_DOMAIN, 1)
    g.replace_all_uses(n.outputs[0], new.outputs[0])
    return None


def _fuse(g: Graph, n: Node) -> str | None:
    """Replace one layer by its QOperator form; None when done, else why it cannot be."""
    xp, wp = _dq_parts(g, n.inputs[0]), _dq_parts(g, n.inputs[1])
    if xp is None or xp[0].producer is None:
        return "its input is not quantized"
    if wp is None or codes_of(g, wp[0]) is None:
        return "its weight is not a quantized constant"
    if n.op_type == "Gemm":
        return _gemm_integer(g, n, xp, wp)
    out = _output_q(g, n)
    if isinstance(out, str):
        return out
    q, acts = out
    if not _act_implied(g, acts, q):
        return (f"the output quantizer's range does not imply the {acts[0].op_type} after the layer, "
                "and QLinear ops have no fused activation")
    if np.asarray(g.const_value(xp[1])).size != 1 or np.asarray(g.const_value(q.inputs[1])).size != 1:
        return "per-channel activation scales (QLinear ops take one input and one output scale)"
    if n.op_type == "Conv":
        bias = None
        if len(n.inputs) > 2 and n.inputs[2] is not None:
            bp = _dq_parts(g, n.inputs[2])
            if bp is None or g.const_value(bp[0]) is None:
                return "its bias is not an int32 constant (QLinearConv takes an int32 bias)"
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
    return None


def _gemm_integer(g: Graph, n: Node, xp, wp) -> str | None:
    """DQ(x) -> Gemm(DQ(W), DQ(b)) as MatMulInteger(x_q, W^T_q) + b_q -> Cast -> Mul(s_x * s_w)."""
    if n.attr("transA", 0) or n.attr("alpha", 1.0) != 1.0 or n.attr("beta", 1.0) != 1.0:
        return "Gemm with transA or alpha/beta != 1"
    w_q = codes_of(g, wp[0])
    w_s = np.asarray(g.const_value(wp[1]), np.float32)
    w_z = np.asarray(g.const_value(wp[2]))
    x_s = np.asarray(g.const_value(xp[1]), np.float32)
    if x_s.size != 1:
        return "per-channel input scale (MatMulInteger's rescale takes one)"
    if np.any(w_z != 0) or w_q.dtype != np.int8:
        return "weights are not symmetric int8"
    w_q = np.ascontiguousarray(geometry(n).in_view(w_q))  # [K, N], as MatMulInteger reads it
    bias = None
    if len(n.inputs) > 2 and n.inputs[2] is not None:
        bp = _dq_parts(g, n.inputs[2])
        if bp is None or g.const_value(bp[0]) is None:
            return "its bias is not an int32 constant"
        bias = np.asarray(g.const_value(bp[0]))
        if bias.dtype != np.int32:
            return f"its bias is {bias.dtype}, not int32"
    # stored packed again when the weight was (its opset is already 21)
    wc, _ = int8_codes(g, w_q, f"{n.name}_WT", n.source, packed=wp[0].producer is not None)
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
    return None


def _add_for(g: Graph, n: Node, op: str, ins, name: str, **attrs):
    """A node that stands in for (part of) ``n``: named after it, with its source. Returns its
    output, named ``<n's output>_<name>``."""
    node = g.add_node(op, ins, [f"{n.outputs[0].name}_{name}"], attrs=attrs, source=n.source,
                      name=g.unique_node_name(f"{n.name}_{name}"))
    return node.outputs[0]


def _gather_codes(g: Graph, n: Node) -> bool:
    """Gather(DQ(codes, scale), ids) as Gather(codes, ids) then the dequantization of the rows
    read: onnxruntime does not fold a DequantizeLinear of a constant, so an embedding table
    would be dequantized whole on every run. Per-tensor: DQ of the rows; per row: Cast, times
    Gather(scale, ids). The same float32 values either way."""
    dq = _dq_parts(g, n.inputs[0])
    if dq is None or n.attr("axis", 0) != 0 or codes_of(g, dq[0]) is None or len(dq[3].outputs[0].uses) != 1:
        return False
    scale = np.asarray(g.const_value(dq[1]), np.float32)
    zp = np.asarray(g.const_value(dq[2]))
    axis = dq[3].attr("axis", 1)
    if scale.size > 1 and (axis != 0 or np.any(zp != 0)):
        return False
    out, ids = n.outputs[0], n.inputs[1]

    add = functools.partial(_add_for, g, n)

    rows = add("Gather", [dq[0], ids], "codes", axis=0)
    if scale.size == 1:
        y = add("DequantizeLinear", [rows, dq[1], dq[2]], "rows")
    else:
        s = add("Unsqueeze", [add("Gather", [dq[1], ids], "row_scales", axis=0),
                              g.add_const(np.array([-1], np.int64), f"{n.name}_last_axis")], "row_scales_1")
        y = add("Mul", [add("Cast", [rows], "float", to=TensorProto.FLOAT), s], "rows")
    y.dtype, y.shape = out.dtype, out.shape
    g.replace_all_uses(out, y)
    g.remove_node(n)
    return True


def _dynamic_integer(g: Graph, n: Node) -> str | None:
    """DQ(DynamicQuantizeLinear(x)) @ DQ(W int8) [+ b] as onnxruntime's ``quantize_dynamic``
    writes it: MatMulInteger(x_q, W_q, x_zp, 0) -> Cast -> Mul(x_scale * w_scale) [-> Add b],
    which onnxruntime fuses into DynamicQuantizeMatMul. Returns None when rewritten, "" when the
    layer's input is not dynamically quantized, else why it stays a float layer."""
    xp = _dq_parts(g, n.inputs[0])
    if xp is None or xp[0].producer is None or xp[0].producer.op_type != "DynamicQuantizeLinear":
        return ""
    wp = _dq_parts(g, n.inputs[1])
    w_q = codes_of(g, wp[0]) if wp is not None else None
    if w_q is None:
        return "its weight is not a quantized constant"
    if n.op_type == "Gemm" and (n.attr("transA", 0) or n.attr("alpha", 1.0) != 1.0 or n.attr("beta", 1.0) != 1.0):
        return "Gemm with transA or alpha/beta != 1"
    w_s = np.asarray(g.const_value(wp[1]), np.float32)
    w_z = np.asarray(g.const_value(wp[2]))
    if np.any(w_z != 0) or w_q.dtype != np.int8:
        return "weights are not symmetric int8"
    bias = None
    if n.op_type == "Gemm" and len(n.inputs) > 2 and n.inputs[2] is not None:
        bias = n.inputs[2]
        if g.const_value(bias) is None or np.asarray(g.const_value(bias)).ndim > 1:
            return "its bias is not a constant vector"
    w_q = np.ascontiguousarray(geometry(n).in_view(w_q))  # [K, N], as MatMulInteger reads it
    wc, _ = int8_codes(g, w_q, f"{n.name}_WT", n.source, packed=wp[0].producer is not None)
    wz = g.add_const(np.zeros(w_q.shape[1] if w_z.size > 1 else (), np.int8), f"{n.name}_W_zero_point")
    out = n.outputs[0]

    add = functools.partial(_add_for, g, n)

    scale = add("Mul", [xp[1], g.add_const(w_s.reshape(-1) if w_s.size > 1 else w_s.reshape(()),
                                                f"{n.name}_W_scale")], "rescale_factor")
    acc = add("MatMulInteger", [xp[0], wc, xp[2], wz], "int32")
    y = add("Mul", [add("Cast", [acc], "float", to=TensorProto.FLOAT), scale], "y")
    if bias is not None:
        y = add("Add", [y, bias], "biased")
    y.dtype, y.shape = out.dtype, out.shape
    g.replace_all_uses(out, y)
    g.remove_node(n)
    return None


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
