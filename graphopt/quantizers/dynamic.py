"""The dynamic scheme (``scheme="dynamic"``): activations quantized at run time from each
tensor's own range, ONNX's ``DynamicQuantizeLinear``. No calibration data is needed.

Spec text: ``dynamic`` (or ``dynamic:uint8``; DynamicQuantizeLinear writes uint8 only). For
each tensor, per call, over all its elements:

    lo = min(0, min x),  hi = max(0, max x),  scale = (hi - lo) / 255 (1 when hi = lo),
    zero_point = clamp(round(-lo / scale), 0, 255),
    y = (clamp(round(x / scale) + zero_point, 0, 255) - zero_point) * scale

with round-half-to-even, in float32: DynamicQuantizeLinear followed by DequantizeLinear,
operation for operation. The range is the whole tensor's, so a batch shares one scale, as in
onnxruntime's ``quantize_dynamic``. The scheme has no stored parameters. In training the
rounding passes the gradient straight through.

Lowering: ``DynamicQuantizeLinear`` + ``DequantizeLinear``. The lowering of the layers then
turns ``DQ(DynamicQuantizeLinear(x)) @ DQ(W int8)`` into ``MatMulInteger`` + ``Cast`` + ``Mul`` by
the product of the two scales (+ the float bias), the pattern onnxruntime fuses into
``DynamicQuantizeMatMul``. Biases stay float: their integer step would be known only at run time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from onnx import TensorProto

from graphopt.errors import GraphOptError
from graphopt.quantizers.base import Lowered, Quantizer, register
from graphopt.quantizers.uniform import fake_quant_np, straight_through


def dynamic_params_np(x: np.ndarray) -> tuple[np.float32, np.float32]:
    """(scale, zero point) DynamicQuantizeLinear computes for ``x``."""
    x = np.asarray(x, np.float32)
    lo = np.minimum(np.float32(0), x.min()) if x.size else np.float32(0)
    hi = np.maximum(np.float32(0), x.max()) if x.size else np.float32(0)
    scale = np.float32((hi - lo) / np.float32(255))
    if scale == 0:
        scale = np.float32(1)
    zp = np.float32(np.clip(np.round(-lo / scale), 0, 255))
    return scale, zp


def dynamic_fake_quant(x: torch.Tensor) -> torch.Tensor:
    """The scheme in torch, with a straight-through gradient."""
    with torch.no_grad():
        lo = torch.clamp(x.min(), max=0.0)
        hi = torch.clamp(x.max(), min=0.0)
        scale = (hi - lo) / 255.0
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zp = torch.clamp(torch.round(-lo / scale), 0, 255)
        y = (torch.clamp(torch.round(x / scale) + zp, 0, 255) - zp) * scale
    return straight_through(y, x)


@register
@dataclass(frozen=True)
class Dynamic(Quantizer):
    """uint8 activations quantized per tensor at run time (DynamicQuantizeLinear)."""

    scheme = "dynamic"
    keywords = ("dynamic",)
    dynamic = True
    param_names = ()
    scale_params = ()
    doc = ("dynamic[:uint8]: activations quantized at run time from each tensor's own range "
           "(DynamicQuantizeLinear; no calibration)")

    bits: int = 8

    def __str__(self) -> str:
        return "dynamic"

    @classmethod
    def parse(cls, text: str, what: str) -> "Dynamic":
        parts = str(text).strip().lower().split(":")
        if what != "acts":
            raise GraphOptError(f"bad {what} spec '{text}': dynamic quantization is for activations (acts=dynamic); "
                                "weights are constants and take int8:channel")
        if parts[0] != "dynamic" or len(parts) > 2 or (len(parts) == 2 and parts[1] != "uint8"):
            raise GraphOptError(f"bad {what} spec '{text}': expected dynamic or dynamic:uint8 "
                                "(DynamicQuantizeLinear writes uint8 only)")
        return cls()

    def to_attrs(self) -> dict[str, Any]:
        return {"bits": 8}

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> "Dynamic":
        return cls()

    def weight_params(self, w, out_axis, in_axis, method="minmax", start="paper"):
        raise GraphOptError("the dynamic scheme quantizes activations at run time; weights take int8:channel")

    def act_params(self, lo, hi, abs_mean=None):
        return {}

    def apply_np(self, x, params, axis):
        x = np.asarray(x, np.float32)
        return fake_quant_np(x, *dynamic_params_np(x), 0, 255)  # the uniform formula at this call's parameters

    def torch_function(self, axis):
        return dynamic_fake_quant, ()

    def kernel_bits(self, kind: str = "weight") -> int | None:
        return 8

    def true_bits(self) -> float:
        return 8.0

    def integer_step(self, params):
        return None, "the activation step is computed at run time"

    def with_bits(self, bits: int) -> "Dynamic":
        if int(bits) != 8:
            raise GraphOptError(f"the dynamic scheme is uint8 only (DynamicQuantizeLinear); {bits} bits asked")
        return self

    def lower(self, graph, node, fmt):
        x = node.inputs[0]
        base = node.name
        dq = graph.add_node("DynamicQuantizeLinear", [x], [f"{base}_u8", f"{base}_scale", f"{base}_zero_point"],
                            name=graph.unique_node_name(f"{base}_dynamic"), source=node.source)
        dq.outputs[0].dtype, dq.outputs[0].shape = TensorProto.UINT8, x.shape
        dq.outputs[1].dtype, dq.outputs[1].shape = TensorProto.FLOAT, ()
        dq.outputs[2].dtype, dq.outputs[2].shape = TensorProto.UINT8, ()
        deq = graph.add_node("DequantizeLinear", list(dq.outputs), [f"{base}_dq"],
                             name=graph.unique_node_name(f"{base}_dequantize"), source=node.source)
        deq.outputs[0].dtype, deq.outputs[0].shape = TensorProto.FLOAT, x.shape
        graph.replace_all_uses(node.outputs[0], deq.outputs[0])
        graph.remove_node(node)
        return Lowered(fmt != "float", 13, "" if fmt != "float" else "float format asked for")

    def describe(self) -> str:
        return "dynamic uint8 (per tensor, range measured at run time: DynamicQuantizeLinear)"
