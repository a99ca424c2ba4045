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
from onnx import AttributeProto, helper, numpy_helper

from graphopt.errors import FrontendError
from graphopt.ir import OPAQUE_ATTR_TYPES, Graph, Node, Value, _free_names_of_graph, _names_in_graph
from graphopt.meta import SOURCE
from graphopt.shapes import _shape_of
from graphopt.util import with_gc_paused

log = logging.getLogger("graphopt.onnx")

MIN_OPSET, MAX_OPSET = 13, 21

_MMAP_DTYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.INT8,
                onnx.TensorProto.UINT8, onnx.TensorProto.INT16, onnx.TensorProto.UINT16, onnx.TensorProto.INT32,
                onnx.TensorProto.UINT32, onnx.TensorProto.INT64, onnx.TensorProto.UINT64, onnx.TensorProto.BOOL}


def attr_from_proto(a: AttributeProto):
    t = a.type
    if t in OPAQUE_ATTR_TYPES:
        c = AttributeProto()
        c.CopyFrom(a)
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
        return numpy_helper.to_array(a.t)
    if t == AttributeProto.FLOATS:
        return [float(x) for x in a.floats]
    if t == AttributeProto.INTS:
        return [int(x) for x in a.ints]
    if t == AttributeProto.STRINGS:
        return [s.decode("utf-8", errors="surrogateescape") for s in a.strings]
    if t == AttributeProto.TENSORS:
        return [numpy_helper.to_array(x) for x in a.tensors]
    c = AttributeProto()  # unknown/undefined type: keep verbatim
    c.CopyFrom(a)
    return c


def _confined(base_dir: Path, location: str, tensor: str) -> Path:
    if os.path.isabs(location):
        raise FrontendError(f"external data of tensor '{tensor}' uses an absolute path '{location}'; "
                            "only paths inside the model's folder are allowed")
    base = base_dir.resolve()
    p = (base / location).resolve()
    if p != base and base not in p.parents:
        raise FrontendError(f"external data path '{location}' of tensor '{tensor}' escapes the model folder {base}")
    return p


def tensor_to_array(t: onnx.TensorProto, base_dir: Path | None) -> np.ndarray:
    """An initializer as a numpy array; external data is memory-mapped read-only."""
    if t.data_location != onnx.TensorProto.EXTERNAL:
        return numpy_helper.to_array(t)
    if base_dir is None:
        raise FrontendError(f"tensor '{t.name}' uses external data, but the model was not loaded from a file")
    info = {e.key: e.value for e in t.external_data}
    if "location" not in info:
        raise FrontendError(f"tensor '{t.name}' has external data without a location")
    path = _confined(base_dir, info["location"], t.name)
    if not path.is_file():
        raise FrontendError(f"external data file '{info['location']}' of tensor '{t.name}' does not exist")
    shape = tuple(int(d) for d in t.dims)
    offset = int(info.get("offset", 0))
    if t.data_type in _MMAP_DTYPES:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).newbyteorder("<")
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if "length" in info and int(info["length"]) != nbytes:
            raise FrontendError(f"external data of tensor '{t.name}' has length {info['length']}, "
                                f"but its shape {list(shape)} needs {nbytes} bytes")
        if path.stat().st_size < offset + nbytes:
            raise FrontendError(f"external data file '{info['location']}' is too short for tensor '{t.name}'")
        if nbytes == 0:
            return np.zeros(shape, dtype)
        return np.asarray(np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape))
    c = onnx.TensorProto()
    c.CopyFrom(t)
    onnx.external_data_helper.load_external_data_for_tensor(c, str(path.parent))
    c.data_location = onnx.TensorProto.DEFAULT
    del c.external_data[:]
    return numpy_helper.to_array(c)


def read_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Parse an ONNX file without loading external data; bad input -> FrontendError."""
    p = Path(path)
    if not p.exists():
        raise FrontendError(f"{p}: no such file")
    if p.is_dir():
        raise FrontendError(f"{p}: is a folder, not an ONNX file")
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
    return from_model_proto(model, base_dir=base_dir, label=label, infer_shapes=infer_shapes)


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
            node.attrs[a.name] = attr_from_proto(a)
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
