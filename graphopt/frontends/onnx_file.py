"""ONNX front end: a ``.onnx`` file (or ModelProto / bytes) -> ``Graph``.

* Opsets 13-21 of the default domain are supported; an older model is refused with a hint
  to convert it (``onnx.version_converter``); a newer one loads with a warning.
* Initializers become graph constants. External data is memory-mapped straight from its
  file (no copy); its path must stay inside the model's folder.
* Ops graphopt does not know pass through untouched, with all attributes.
* Control-flow subgraphs (If/Loop/Scan) are kept intact as ONNX GraphProtos; the outer
  values they capture become the node's ``implicit_inputs``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import onnx
from onnx import AttributeProto, numpy_helper

from graphopt.errors import FrontendError
from graphopt.ir import OPAQUE_ATTR_TYPES, Graph, Node, Value, _free_names_of_graph, _names_in_graph, numpy_dtype
from graphopt.meta import SOURCE
from graphopt.shapes import _shape_of
from graphopt.util import with_gc_paused

log = logging.getLogger("graphopt.onnx")

MIN_OPSET, MAX_OPSET = 13, 21

_MMAP_DTYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.INT8,
                onnx.TensorProto.UINT8, onnx.TensorProto.INT16, onnx.TensorProto.UINT16, onnx.TensorProto.INT32,
                onnx.TensorProto.UINT32, onnx.TensorProto.INT64, onnx.TensorProto.UINT64, onnx.TensorProto.BOOL}


def attr_from_proto(a: AttributeProto, base_dir: Path | None = None, where: str = ""):
    """An attribute as a Python value. Tensors anywhere inside it (a Constant's value, sparse
    tensors, subgraph initializers and constants) have their external data confined to the
    model's folder and read in, so nothing outside it is ever read and kept protos are whole."""
    t = a.type
    if t in OPAQUE_ATTR_TYPES:
        c = AttributeProto()
        c.CopyFrom(a)
        _internalize_attr(c, base_dir, where)
        return c
    if t == AttributeProto.FLOAT:
        return float(a.f)
    if t == AttributeProto.INT:
        return int(a.i)
    if t == AttributeProto.STRING:
        try:
            return a.s.decode("utf-8")
        except UnicodeDecodeError:
            return bytes(a.s)
    if t == AttributeProto.TENSOR:
        return tensor_to_array(a.t, base_dir, where)
    if t == AttributeProto.FLOATS:
        return [float(x) for x in a.floats]
    if t == AttributeProto.INTS:
        return [int(x) for x in a.ints]
    if t == AttributeProto.STRINGS:
        return [s.decode("utf-8", errors="surrogateescape") for s in a.strings]
    if t == AttributeProto.TENSORS:
        return [tensor_to_array(x, base_dir, where) for x in a.tensors]
    c = AttributeProto()  # unknown/undefined type: keep verbatim
    c.CopyFrom(a)
    _internalize_attr(c, base_dir, where)
    return c


def _internalize_tensor(t: onnx.TensorProto, base_dir: Path | None, where: str) -> None:
    if t.data_location == onnx.TensorProto.EXTERNAL:
        arr = tensor_to_array(t, base_dir, where)
        t.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(arr), t.name))


def _internalize_sparse(s: onnx.SparseTensorProto, base_dir: Path | None, where: str) -> None:
    _internalize_tensor(s.values, base_dir, where)
    _internalize_tensor(s.indices, base_dir, where)


def _internalize_graph(g: onnx.GraphProto, base_dir: Path | None, where: str) -> None:
    for t in g.initializer:
        _internalize_tensor(t, base_dir, f"{where}, subgraph '{g.name}'")
    for s in g.sparse_initializer:
        _internalize_sparse(s, base_dir, f"{where}, subgraph '{g.name}'")
    for n in g.node:
        for a in n.attribute:
            _internalize_attr(a, base_dir, f"{where}, subgraph node '{n.name or n.op_type}'")


def _internalize_attr(a: AttributeProto, base_dir: Path | None, where: str) -> None:
    if a.type == AttributeProto.TENSOR:
        _internalize_tensor(a.t, base_dir, where)
    for t in a.tensors:
        _internalize_tensor(t, base_dir, where)
    if a.type == AttributeProto.SPARSE_TENSOR:
        _internalize_sparse(a.sparse_tensor, base_dir, where)
    for s in a.sparse_tensors:
        _internalize_sparse(s, base_dir, where)
    if a.type == AttributeProto.GRAPH:
        _internalize_graph(a.g, base_dir, where)
    for g in a.graphs:
        _internalize_graph(g, base_dir, where)


def _tensor_dtype(t: onnx.TensorProto, where: str) -> np.dtype:
    dtype = numpy_dtype(t.data_type)
    if dtype is None:
        raise FrontendError(f"tensor '{t.name}'{where} has unknown data_type {t.data_type}")
    return dtype


def _confined(base_dir: Path, location: str, tensor: str) -> Path:
    if os.path.isabs(location):
        raise FrontendError(f"external data of tensor '{tensor}' uses an absolute path '{location}'; "
                            "only paths inside the model's folder are allowed")
    base = base_dir.resolve()
    p = (base / location).resolve()
    if p != base and base not in p.parents:
        raise FrontendError(f"external data path '{location}' of tensor '{tensor}' escapes the model folder {base}")
    return p


def tensor_to_array(t: onnx.TensorProto, base_dir: Path | None, where: str = "") -> np.ndarray:
    """A tensor proto as a numpy array; external data (confined to the model's folder) is
    memory-mapped read-only. Any malformed tensor is a FrontendError that names it."""
    where = f" ({where})" if where and not where.startswith(" (") else where
    _tensor_dtype(t, where)
    if any(d < 0 for d in t.dims):
        raise FrontendError(f"tensor '{t.name}'{where} has a negative dimension {list(t.dims)}")
    if t.data_location != onnx.TensorProto.EXTERNAL:
        try:
            return numpy_helper.to_array(t)
        except Exception as e:
            raise FrontendError(f"tensor '{t.name}'{where} is malformed: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if base_dir is None:
        raise FrontendError(f"tensor '{t.name}' uses external data, but the model was not loaded from a file")
    info = {e.key: e.value for e in t.external_data}
    if "location" not in info:
        raise FrontendError(f"tensor '{t.name}' has external data without a location")
    path = _confined(base_dir, info["location"], t.name)
    if not path.is_file():
        raise FrontendError(f"external data file '{info['location']}' of tensor '{t.name}' does not exist")
    shape = tuple(int(d) for d in t.dims)
    try:
        offset = int(info.get("offset", 0))
        length = int(info["length"]) if "length" in info else None
    except ValueError:
        raise FrontendError(f"external data of tensor '{t.name}' has a non-integer offset or length "
                            f"({info.get('offset')!r}, {info.get('length')!r})") from None
    if offset < 0 or (length is not None and length < 0):
        raise FrontendError(f"external data of tensor '{t.name}' has a negative offset or length")
    if t.data_type in _MMAP_DTYPES:
        dtype = _tensor_dtype(t, where).newbyteorder("<")
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if length is not None and length != nbytes:
            raise FrontendError(f"external data of tensor '{t.name}' has length {info['length']}, "
                                f"but its shape {list(shape)} needs {nbytes} bytes")
        if path.stat().st_size < offset + nbytes:
            raise FrontendError(f"external data file '{info['location']}' is too short for tensor '{t.name}'")
        if nbytes == 0:
            return np.zeros(shape, dtype)
        return np.asarray(np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape))
    c = onnx.TensorProto()
    c.CopyFrom(t)
    if path.stat().st_size < offset + (length or 0):
        raise FrontendError(f"external data file '{info['location']}' is too short for tensor '{t.name}'")
    onnx.external_data_helper.load_external_data_for_tensor(c, str(base_dir))  # location is relative to it
    c.data_location = onnx.TensorProto.DEFAULT
    del c.external_data[:]
    try:
        return numpy_helper.to_array(c)
    except Exception as e:
        raise FrontendError(f"tensor '{t.name}'{where} is malformed: {str(e).splitlines()[0]}") from None


def read_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Parse an ONNX file without loading external data; bad input -> FrontendError."""
    from graphopt.frontends.sniff import check_file

    p = check_file(path)
    try:
        model = onnx.load_model(str(p), load_external_data=False)
    except Exception as e:
        raise FrontendError(f"{p}: not a valid ONNX file (cannot parse protobuf: {str(e).splitlines()[0] if str(e) else type(e).__name__})") from e
    return model


def load_onnx(src: str | os.PathLike | onnx.ModelProto | bytes, *, infer_shapes: bool = True) -> Graph:
    """Read an ONNX model into a ``Graph``."""
    base_dir = None
    label = "<model>"
    if isinstance(src, onnx.ModelProto):
        model = src
    elif isinstance(src, (bytes, bytearray)):
        try:
            model = onnx.load_model_from_string(bytes(src))
        except Exception as e:
            raise FrontendError(f"not a valid ONNX model: {e}") from e
    else:
        model = read_model(src)
        base_dir = Path(src).parent
        label = str(src)
    graph = from_model_proto(model, base_dir=base_dir, label=label, infer_shapes=infer_shapes)
    # after our own reading (which confines external data and names bad tensors): onnx's checker
    # with strict shape inference, by path when there is a file (it then reads external data itself)
    check_layers(graph, label)
    validate_model(str(src) if base_dir is not None else model, label)
    return graph


def validate_model(model: onnx.ModelProto | str, label: str) -> None:
    """onnx.checker with shape inference; any violation is a FrontendError naming the rule."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:  # ValidationError, InferenceError, and friends
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise FrontendError(f"{label}: invalid ONNX model: {first}") from None


_AUTO_PAD = ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID")


def check_layers(graph: Graph, label: str) -> None:
    """graphopt's own checks for the layers its passes rewrite (Conv, ConvTranspose, Gemm,
    MatMul with a constant weight): things the checker lets through but no pass can reason about."""
    for n in graph.nodes:
        if n.domain != "" or n.op_type not in ("Conv", "ConvTranspose"):
            continue
        w = graph.const_value(n.inputs[1]) if len(n.inputs) > 1 else None
        where = f"{label}: {n.op_type} '{n.name}'"
        for key in ("kernel_shape", "strides", "dilations", "pads"):
            v = n.attr(key)
            if v is not None and not (isinstance(v, list) and all(isinstance(i, int) for i in v)):
                raise FrontendError(f"{where}: attribute {key} must be a list of integers")
        group = n.attr("group", 1)
        if not isinstance(group, int) or group < 1:
            raise FrontendError(f"{where}: group must be a positive integer, not {group!r}")
        for key in ("strides", "dilations"):
            vals = n.attr(key)
            if vals is not None and any(not isinstance(v, int) or v < 1 for v in vals):
                raise FrontendError(f"{where}: {key} must be positive integers, not {vals}")
        pads = n.attr("pads")
        if pads is not None and any(not isinstance(v, int) or v < 0 for v in pads):
            raise FrontendError(f"{where}: pads must be non-negative integers, not {pads}")
        if not isinstance(n.attr("auto_pad", "NOTSET"), str) or n.attr("auto_pad", "NOTSET") not in _AUTO_PAD:
            raise FrontendError(f"{where}: auto_pad must be one of {', '.join(_AUTO_PAD)}, not {n.attr('auto_pad')!r}")
        if w is None:
            continue
        w = np.asarray(w)
        if w.ndim < 3:
            raise FrontendError(f"{where}: a {w.ndim}-D weight {list(w.shape)}; a convolution weight has rank >= 3")
        ks = n.attr("kernel_shape")
        if ks is not None and list(ks) != list(w.shape[2:]):
            raise FrontendError(f"{where}: kernel_shape {list(ks)} does not match the weight's {list(w.shape[2:])}")
        x = n.inputs[0]
        cin = x.shape[1] if x.shape is not None and len(x.shape) > 1 and isinstance(x.shape[1], int) else None
        if w.shape[0] % group:
            what = "output" if n.op_type == "Conv" else "input"
            raise FrontendError(f"{where}: {w.shape[0]} {what} channels do not split into group={group}")
        reads = w.shape[1] * group if n.op_type == "Conv" else w.shape[0]
        if cin is not None and reads != cin:
            raise FrontendError(f"{where}: the input has {cin} channels, but the weight {list(w.shape)} with "
                                f"group={group} reads {reads}")


def _check_opset(model: onnx.ModelProto, label: str) -> dict[str, int]:
    opsets = {(o.domain if o.domain != "ai.onnx" else ""): int(o.version) for o in model.opset_import}
    if not model.graph.node and not model.graph.output:
        raise FrontendError(f"{label}: not a valid ONNX model (it has no graph)")
    if model.ir_version <= 0:
        raise FrontendError(f"{label}: not a valid ONNX model (ir_version is missing)")
    v = opsets.get("")
    if v is None:
        raise FrontendError(f"{label}: the model imports no default-domain opset")
    if v < MIN_OPSET:
        raise FrontendError(f"{label}: opset {v} is older than the supported {MIN_OPSET}-{MAX_OPSET}; convert it first "
                            f"with onnx.version_converter.convert_version(model, {MIN_OPSET})")
    if v > onnx.defs.onnx_opset_version():
        raise FrontendError(f"{label}: opset {v} is newer than any ONNX release this installation knows "
                            f"(onnx {onnx.__version__} knows up to {onnx.defs.onnx_opset_version()})")
    if v > MAX_OPSET:
        log.warning("%s: opset %d is newer than the tested range %d-%d; ops are passed through as they are",
                    label, v, MIN_OPSET, MAX_OPSET)
    return opsets


@with_gc_paused
def from_model_proto(model: onnx.ModelProto, *, base_dir: Path | None = None, label: str = "<model>",
                     infer_shapes: bool = True) -> Graph:
    opsets = _check_opset(model, label)
    g_proto = model.graph
    if len(g_proto.sparse_initializer):
        raise FrontendError(f"{label}: sparse initializers are not supported (tensor '{g_proto.sparse_initializer[0].values.name}')")
    graph = Graph(g_proto.name or "main")
    graph.opset_imports = opsets
    graph.model_meta = {
        "ir_version": model.ir_version,
        "producer_name": model.producer_name,
        "producer_version": model.producer_version,
        "domain": model.domain,
        "model_version": model.model_version,
        "doc_string": model.doc_string,
        "graph_doc_string": g_proto.doc_string,
        "metadata_props": {p.key: p.value for p in model.metadata_props},
        "functions": list(model.functions),
    }

    init_names = set()
    for t in g_proto.initializer:
        if t.name in graph.values:
            raise FrontendError(f"{label}: duplicate initializer '{t.name}'")
        arr = tensor_to_array(t, base_dir)
        v = graph.add_const(arr, t.name, exact_name=True)
        init_names.add(t.name)
    for vi in g_proto.input:
        if vi.name in init_names:
            continue  # IR<4 models list initializers as inputs too; they are constants here
        dtype, shape = _shape_of(vi.type)
        if vi.name in graph.values:
            raise FrontendError(f"{label}: duplicate graph input '{vi.name}'")
        bad = [(i, d) for i, d in enumerate(shape or ()) if isinstance(d, int) and d <= 0]
        if bad:
            raise FrontendError(f"{label}: graph input '{vi.name}' has dimension {bad[0][1]} at axis {bad[0][0]} "
                                f"(shape {list(shape)}): an input dimension must be positive or symbolic")
        graph.add_input(vi.name, dtype, shape)

    # Pass 1: create nodes and their outputs, so unsorted models still link.
    pending: list[tuple[Node, onnx.NodeProto]] = []
    used_names: set[str] = set()
    for i, np_ in enumerate(g_proto.node):
        name = np_.name or f"{np_.op_type}_{i}"
        if name in used_names:
            name = f"{name}_{i}"
        used_names.add(name)
        node = Node(np_.op_type, np_.domain if np_.domain != "ai.onnx" else "", name)
        node.graph = graph
        if np_.name:
            node.meta[SOURCE] = np_.name
        for prop in np_.metadata_props:
            if prop.key == "graphopt.source":
                node.meta[SOURCE] = prop.value
        node.doc_string = np_.doc_string
        for a in np_.attribute:
            node.attrs[a.name] = attr_from_proto(a, base_dir, f"attribute '{a.name}' of node '{name}'")
            node.attr_types[a.name] = a.type
        for j, oname in enumerate(np_.output):
            if not oname:
                oname = graph.unique_name(f"{name}_unused{j}")
            if oname in graph.values:
                raise FrontendError(f"{label}: value '{oname}' is defined twice (node '{name}')")
            v = Value(oname)
            v.producer, v.index = node, j
            graph._register_value(v)
            node.outputs.append(v)
        graph._nodes[node] = None
        pending.append((node, np_))

    for node, np_ in pending:
        for i, iname in enumerate(np_.input):
            if not iname:
                node.inputs.append(None)
                continue
            v = graph.values.get(iname)
            if v is None:
                raise FrontendError(f"{label}: node '{node.name}' ({node.op_type}) uses undefined value '{iname}'")
            node.inputs.append(v)
            v.uses.append((node, i))
        if node.has_subgraphs():
            free: set[str] = set()
            for a in np_.attribute:
                for sg in ([a.g] if a.type == AttributeProto.GRAPH else a.graphs if a.type == AttributeProto.GRAPHS else []):
                    free |= _free_names_of_graph(sg)
                    graph._reserved.update(_names_in_graph(sg))
            for fname in sorted(free):
                v = graph.values.get(fname)
                if v is None:
                    raise FrontendError(f"{label}: the subgraph of node '{node.name}' uses undefined value '{fname}'")
                node.implicit_inputs.append(v)
                v.uses.append((node, -1))

    for vi in g_proto.output:
        v = graph.values.get(vi.name)
        if v is None:
            raise FrontendError(f"{label}: graph output '{vi.name}' is not produced by any node")
        graph.outputs.append(v)
        dtype, shape = _shape_of(vi.type)
        v.dtype = v.dtype or dtype
        if v.shape is None:
            v.shape = shape
    for vi in g_proto.value_info:
        v = graph.values.get(vi.name)
        if v is not None and v.const is None:
            dtype, shape = _shape_of(vi.type)
            v.dtype = v.dtype or dtype
            if v.shape is None:
                v.shape = shape

    try:
        graph.toposort()
    except Exception as e:
        raise FrontendError(f"{label}: {e}") from e
    if infer_shapes:
        try:
            graph.infer_shapes()
        except Exception as e:  # inference is a help, not a requirement: say so and go on
            log.warning("%s: ONNX shape inference failed, shapes stay as declared: %s", label, str(e).splitlines()[0])
    return graph
