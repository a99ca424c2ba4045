"""Serialization, IR -> ONNX protos: ``to_onnx`` (the float ONNX export), atomic ``save_onnx``
and the proto builders (``node_to_proto``, ``value_info``, ``build_model``) that shape
inference and the integer back end reuse.

This is core, not a back end: the IR's shape inference (``graphopt.shapes``) writes the graph
through it, and the IR never imports ``graphopt.backends``. ONNX -> IR is the ONNX front end.

A weight that carries a mask (``graphopt.masks``) is written with the mask folded in: its
dropped entries are exact zeros in the file.

Large models: constants above ``external_threshold`` bytes can be written to an external
data file tensor by tensor, straight from the arrays, so a model over 2 GB is never held
twice in memory (the ModelProto only holds the file offsets).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from onnx import AttributeProto, helper, numpy_helper

from graphopt.atomic import atomic_paths
from graphopt.masks import masked_const
from graphopt.meta import SOURCE
from graphopt.util import with_gc_paused

if TYPE_CHECKING:  # annotations only: shape inference (under the IR) serializes through this module
    from graphopt.ir import Graph, Node, Value

SOURCE_KEY = "graphopt.source"
# Above this total of constant bytes a model must use external data (protobuf's 2 GB cap).
PROTOBUF_LIMIT = 2_000_000_000 - 64_000_000
# dtypes whose ONNX external-data layout is the plain little-endian numpy layout.
_PLAIN_DTYPES = {np.dtype(t) for t in (np.float16, np.float32, np.float64, np.int8, np.int16, np.int32, np.int64,
                                       np.uint8, np.uint16, np.uint32, np.uint64, np.bool_)}


def attr_to_proto(name: str, value: Any, attr_type: int | None) -> AttributeProto:
    if isinstance(value, AttributeProto):
        a = AttributeProto()
        a.CopyFrom(value)
        a.name = name
        return a
    if isinstance(value, np.ndarray):
        return helper.make_attribute(name, numpy_helper.from_array(value))
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], np.ndarray):
        return helper.make_attribute(name, [numpy_helper.from_array(v) for v in value])
    if isinstance(value, (np.integer, np.floating)):
        value = value.item()
    return helper.make_attribute(name, value, attr_type=attr_type)


def node_to_proto(n: Node) -> onnx.NodeProto:
    p = onnx.NodeProto()
    p.op_type = n.op_type
    p.domain = n.domain
    p.name = n.name
    p.input.extend("" if v is None else v.name for v in n.inputs)
    p.output.extend(v.name for v in n.outputs)
    if n.doc_string:
        p.doc_string = n.doc_string
    src = n.meta.get(SOURCE)
    if src and src != n.name:  # provenance survives the file (NodeProto.metadata_props, ONNX >= 1.16)
        p.metadata_props.append(onnx.StringStringEntryProto(key=SOURCE_KEY, value=src))
    for k, a in n.attrs.items():
        p.attribute.append(attr_to_proto(k, a, n.attr_types.get(k)))
    return p


def value_info(v: Value) -> onnx.ValueInfoProto:
    if v.dtype is None:
        vi = onnx.ValueInfoProto()
        vi.name = v.name
        return vi
    return helper.make_tensor_value_info(v.name, v.dtype, None if v.shape is None else list(v.shape))


def _ir_version(graph: Graph) -> int:
    want = graph.model_meta.get("ir_version")
    try:
        need = helper.find_min_ir_version_for(
            [helper.make_opsetid(d, v) for d, v in graph.opset_imports.items()], ignore_unknown=True)
    except Exception:
        need = 8
    return max(int(want or 0), need)


def build_model(graph: Graph, nodes_proto: list[onnx.NodeProto], initializers: list[onnx.TensorProto],
                inputs: list[onnx.ValueInfoProto], value_infos: list[onnx.ValueInfoProto],
                typed_outputs: bool = True) -> onnx.ModelProto:
    m = onnx.ModelProto()
    g = m.graph
    g.name = graph.name
    g.node.extend(nodes_proto)
    g.initializer.extend(initializers)
    g.input.extend(inputs)
    g.output.extend(value_info(v) if typed_outputs else onnx.ValueInfoProto(name=v.name) for v in graph.outputs)
    g.value_info.extend(value_infos)
    if graph.model_meta.get("graph_doc_string"):
        g.doc_string = graph.model_meta["graph_doc_string"]
    m.ir_version = _ir_version(graph)
    for d, v in graph.opset_imports.items():
        m.opset_import.append(helper.make_opsetid(d, v))
    meta = graph.model_meta
    m.producer_name = meta.get("producer_name") or "graphopt"
    m.producer_version = meta.get("producer_version") or ""
    if meta.get("domain"):
        m.domain = meta["domain"]
    if meta.get("model_version"):
        m.model_version = meta["model_version"]
    if meta.get("doc_string"):
        m.doc_string = meta["doc_string"]
    for k, v in (meta.get("metadata_props") or {}).items():
        m.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))
    m.functions.extend(meta.get("functions") or [])
    return m


@with_gc_paused
def to_onnx(graph: Graph, *, value_infos: bool = True) -> onnx.ModelProto:
    """Return a self-contained ModelProto (all constants inline). Use ``save_onnx`` for
    models over 2 GB."""
    graph.toposort()
    return _assemble(graph, value_infos, lambda v: numpy_helper.from_array(np.asarray(masked_const(v)), v.name))


def _assemble(graph: Graph, with_value_infos: bool, make_init) -> onnx.ModelProto:
    nodes = [node_to_proto(n) for n in graph.nodes]
    inits = [make_init(v) for v in graph.constants.values()]
    inputs = [value_info(v) for v in graph.inputs]
    vis = []
    if with_value_infos:
        outs = set(graph.outputs)
        vis = [value_info(o) for n in graph.nodes for o in n.outputs if o.dtype is not None and o not in outs]
    return build_model(graph, nodes, inits, inputs, vis)


def _external_init(v: Value, fh, data_name: str, threshold: int) -> onnx.TensorProto:
    arr = np.asarray(masked_const(v))
    if arr.nbytes < threshold or arr.dtype not in _PLAIN_DTYPES:
        return numpy_helper.from_array(arr, v.name)
    t = onnx.TensorProto()
    t.name = v.name
    t.data_type = v.dtype
    t.dims.extend(arr.shape)
    pad = (-fh.tell()) % 4096  # page-aligned so readers can memory-map
    fh.write(b"\0" * pad)
    offset = fh.tell()
    fh.write(np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"), copy=False).tobytes(order="C"))
    t.data_location = onnx.TensorProto.EXTERNAL
    for k, val in (("location", data_name), ("offset", str(offset)), ("length", str(arr.nbytes))):
        t.external_data.append(onnx.StringStringEntryProto(key=k, value=val))
    return t


@with_gc_paused
def save_onnx(graph: Graph, path: str | os.PathLike, *, external_data: bool | None = None,
              external_threshold: int = 1024) -> None:
    """Write ``graph`` to ``path`` atomically (temp file + rename; no half-written output).

    ``external_data``: None (default) uses an external data file ``<name>.data`` only when
    the constants exceed protobuf's 2 GB limit; True always; False never.
    """
    path = Path(path)
    total = sum(int(np.asarray(v.const).nbytes) for v in graph.constants.values())
    use_ext = total > PROTOBUF_LIMIT if external_data is None else external_data
    if not use_ext:
        model = to_onnx(graph)
        data = model.SerializeToString()
        with atomic_paths(path) as (tmp,):
            Path(tmp).write_bytes(data)
        return
    data_path = path.with_name(path.name + ".data")
    graph.toposort()
    with atomic_paths(data_path, path) as (tmp_data, tmp_model):
        with open(tmp_data, "wb") as fh:
            model = _assemble(graph, True, lambda v: _external_init(v, fh, data_path.name, external_threshold))
        # SerializeToString would fail past 2 GB; by construction the proto is small now.
        with open(tmp_model, "wb") as fm:
            fm.write(model.SerializeToString())
