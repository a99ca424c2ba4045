"""Shape and dtype inference for the IR, delegated to ONNX's own shape inference.

The graph is written as a *skeleton* model: float weights become typed graph inputs (their
data is not needed to infer shapes, and copying it would cost the model size), while small
integer constants (shapes, axes, pads) stay inline so data propagation can read them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import numpy_helper

if TYPE_CHECKING:  # annotations only: the IR imports this module
    from graphopt.ir import Graph, Shape

SMALL_INT_CONST = 4096


def _shape_of(tp: onnx.TypeProto) -> tuple[int | None, Shape | None]:
    if not tp.HasField("tensor_type"):
        return None, None
    tt = tp.tensor_type
    dtype = tt.elem_type or None
    if not tt.HasField("shape"):
        return dtype, None
    dims = []
    for d in tt.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return dtype, tuple(dims)


def skeleton_model(graph: Graph) -> onnx.ModelProto:
    """The graph as a model whose float weights are typed graph inputs (no data copied)."""
    from graphopt.serialize import build_model, node_to_proto, value_info

    graph.toposort()
    small, big = [], []
    for v in graph.constants.values():
        a = np.asarray(v.const)
        (small if a.dtype.kind in "iub" and a.size <= SMALL_INT_CONST else big).append(v)
    nodes = [node_to_proto(n) for n in graph.nodes]
    inits = [numpy_helper.from_array(np.asarray(v.const), v.name) for v in small]
    inputs = [value_info(v) for v in graph.inputs] + [value_info(v) for v in big]
    return build_model(graph, nodes, inits, inputs, [], typed_outputs=False)


def infer_types(graph: Graph) -> dict[str, tuple[int | None, Shape | None]]:
    """Map value name -> (dtype, shape) for everything ONNX shape inference can tell."""
    model = skeleton_model(graph)
    inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    out: dict[str, tuple[int | None, Shape | None]] = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        out[vi.name] = _shape_of(vi.type)
    return out
