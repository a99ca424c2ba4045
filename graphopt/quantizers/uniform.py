"""The uniform affine scheme (``scheme="uniform"``): ONNX's QuantizeLinear + DequantizeLinear.

Spec text: ``(u)int<bits>[:tensor|channel|block<size>][:sym|asym]``, e.g. ``int8:channel``,
``uint8:tensor``, ``int4:block32``. Signed specs are symmetric by default (zero point 0),
unsigned ones asymmetric. Parameters: ``scale`` and ``zero_point``. Attributes: ``bits``,
``signed``, ``narrow`` (symmetric range without the most negative code), ``block_size`` (0 =
none) and ``learnable`` (the torch back end trains the scale). Its value is

    y = (clamp(round_half_even(x / scale) + zero_point, qmin, qmax) - zero_point) * scale

which is, operation for operation, QuantizeLinear followed by DequantizeLinear. So the torch
simulation and onnxruntime's integer model agree to the last code, except where the integer
kernels accumulate in a different order. In training, the rounding passes the gradient
straight through; the clamp zeroes it outside the range; and the scale and zero point get
their true gradients (the LSQ form), so a learnable range can train.

Lowering: Q/DQ on 4-, 8- and 16-bit integer types (int32 for biases), which onnxruntime fuses
into integer kernels; any other bit width is simulated exactly in float ops, and the report
says why. All maths is vectorized over channels (numpy for static weights, torch for data).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from onnx import TensorProto

from graphopt.errors import GraphOptError
from graphopt.ir import numpy_dtype
from graphopt.quantizers.base import Lowered, Quantizer, parse_tokens, register

INT_TYPES = {(8, True): TensorProto.INT8, (8, False): TensorProto.UINT8, (16, True): TensorProto.INT16,
             (16, False): TensorProto.UINT16, (4, True): TensorProto.INT4, (4, False): TensorProto.UINT4,
             (32, True): TensorProto.INT32}


def qrange(bits: int, signed: bool, narrow: bool = False) -> tuple[int, int]:
    """Integer range of a quantizer: [-2^(b-1) (+1 if narrow), 2^(b-1) - 1] or [0, 2^b - 1]."""
    if signed:
        return -(1 << (bits - 1)) + (1 if narrow else 0), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


ESTIMATORS = ("ste", "lsq", "pact", "dorefa")


@register
@dataclass(frozen=True)
class Uniform(Quantizer):
    """Uniform affine quantization: bits, signedness, granularity, symmetry."""

    scheme = "uniform"
    keywords = ("int", "uint")
    param_names = ("scale", "zero_point")
    scale_params = ("scale",)
    doc = "(u)int<bits>[:tensor|channel|block<size>][:sym|asym]: uniform affine, ONNX Q/DQ (integer kernels)"

    bits: int = 8
    signed: bool = True
    granularity: str = "tensor"  # tensor | channel | block
    block_size: int = 0
    symmetric: bool = True
    narrow: bool = False
    learnable: bool = False
    estimator: str = "ste"  # the training estimator: ste | lsq | pact | dorefa (see train_function)

    @property
    def qmin(self) -> int:
        return qrange(self.bits, self.signed, self.narrow)[0]

    @property
    def qmax(self) -> int:
        return qrange(self.bits, self.signed, self.narrow)[1]

    def __str__(self) -> str:
        s = f"{'int' if self.signed else 'uint'}{self.bits}:{self.granularity}"
        if self.granularity == "block":
            s += str(self.block_size)
        if self.symmetric != self.signed:
            s += ":sym" if self.symmetric else ":asym"
        if self.estimator != "ste":
            s += ":" + self.estimator
        return s

    def with_bits(self, bits: int) -> "Uniform":
        return replace(self, bits=int(bits))

    # -- what the passes ask (see Quantizer) --------------------------------
    for_activations = True
    elementwise = True
    enlargeable_step = True

    def layer_at_bits(self, bits: int) -> "Uniform":
        return self.with_bits(bits)

    def for_training(self, qat: str, kind: str) -> Quantizer:
        if kind == "weight":
            if qat in ("lsq", "pact") and self.estimator == "ste":  # a learned weight step (PACT's clip is for
                return replace(self, estimator="lsq", learnable=True)  # activations)
            if qat == "dorefa":  # DoReFa weights are their own scheme
                from graphopt.quantizers.base import get

                return get("dorefa")(bits=self.bits, granularity="tensor" if self.granularity == "tensor" else "channel")
            return self
        if qat == "none" or self.estimator != "ste":  # an estimator named in the spec wins
            return self
        if qat == "pact" and self.signed:
            raise GraphOptError("qat=pact learns the clip of unsigned activations: use acts=uint<bits>:tensor")
        return replace(self, estimator=qat, learnable=qat in ("lsq", "pact"))

    def for_range(self, lo: float, hi: float) -> "Uniform":
        if self.estimator == "pact" and lo < 0:  # PACT clips at 0: a signed tensor learns its step (LSQ)
            return replace(self, estimator="lsq")
        if self.estimator == "dorefa" and lo < 0:  # DoReFa's [0, 1] clip is for ReLU outputs: a signed
            return replace(self, estimator="ste", learnable=False)  # tensor keeps its range
        return self

    def with_learned_scales(self) -> "Uniform":
        return replace(self, learnable=True)

    def check_integer_weights(self) -> None:
        if not self.symmetric or not self.signed:
            raise GraphOptError("weights must be signed and symmetric (zero point 0), as integer kernels expect")

    def check_dynamic_weights(self, text: str) -> None:
        if self.bits > 8 or not self.symmetric or self.block_size:
            super().check_dynamic_weights(text)

    def gptq_rounding(self, params, axis, shape):
        if self.granularity == "block":
            return self._block_rounding(params, axis, shape)
        n = shape[0] * shape[1]
        return uniform_rounding(np.broadcast_to(np.asarray(params["scale"], np.float64).reshape(-1), (n,)),
                                np.broadcast_to(np.asarray(params["zero_point"], np.float64).reshape(-1), (n,)),
                                self.qmin, self.qmax, shape)

    def _block_rounding(self, params, axis, shape):
        """GPTQ onto a block grid: the blocks' scales are fixed before rounding (GPTQ's static
        groups), column k uses its block's. 2-D weights (MatMul/Gemm) only."""
        s, z = np.asarray(params.get("scale", np.zeros(0))), np.asarray(params.get("zero_point", np.zeros(0)))
        if s.ndim != 2 or axis is None:
            raise GraphOptError("weight_method=gptq with block scales needs a 2-D weight (MatMul/Gemm); a Conv's "
                                "blocks would span kernel positions: use minmax or mse")
        G, R = shape
        sb = torch.from_numpy(np.moveaxis(s, axis, -1).astype(np.float64).reshape(G, R, -1))
        zb = torch.from_numpy(np.moveaxis(z, axis, -1).astype(np.float64).reshape(G, R, -1))
        bs, qmin, qmax = self.block_size, self.qmin, self.qmax
        return lambda w, k: fake_quant_torch(w, sb[:, :, k // bs], zb[:, :, k // bs], qmin, qmax)

    # -- spec text -----------------------------------------------------------
    @classmethod
    def parse(cls, text: str, what: str) -> "Uniform":
        words = {"sym": ("symmetric", True), "asym": ("symmetric", False), **{e: ("estimator", e) for e in ESTIMATORS}}
        kind, v = parse_tokens(text, what, "uniform", cls.keywords, words=words, numbers={"block": "block_size"},
                               bit_range=(1, 16))
        bits, block_size, est = v["bits"], v.get("block_size", 0), v.get("estimator", "ste")
        if bits == 1 and (kind == "int" or what != "acts"):
            raise GraphOptError(f"bad {what} spec '{text}': 1 bit is for unsigned activations only (uint1: "
                                "{0, step}, a binary ReLU output); binary weights are the binary scheme")
        if "block_size" in v and "granularity" in v:
            raise GraphOptError(f"bad {what} spec '{text}': block<size> is a granularity of its own, not beside "
                                f"{v['granularity']}")
        if "block_size" in v and block_size <= 0:
            raise GraphOptError(f"bad {what} spec '{text}': block needs a size, e.g. block32")
        gran = "block" if "block_size" in v else v.get("granularity", "tensor")
        sym = v.get("symmetric")
        signed = kind == "int"
        symmetric = signed if sym is None else sym
        if est == "pact" and (signed or what != "acts"):
            raise GraphOptError(f"bad {what} spec '{text}': pact learns the clip of an unsigned activation "
                                "(acts=uint<bits>:tensor:pact)")
        if est == "dorefa" and what == "weights":
            raise GraphOptError(f"bad {what} spec '{text}': DoReFa weights are their own scheme (dorefa<bits>); "
                                "uint<bits>:tensor:dorefa is the DoReFa activation (x / alpha clipped to [0, 1])")
        return cls(bits, signed, gran, block_size, symmetric, learnable=est in ("lsq", "pact"), estimator=est)

    # -- node attributes -----------------------------------------------------
    def to_attrs(self) -> dict[str, Any]:
        a = {"bits": self.bits, "signed": int(self.signed), "narrow": int(self.narrow)}
        if self.granularity == "block":
            a["block_size"] = self.block_size
        if not self.symmetric:
            a["symmetric"] = 0
        if self.learnable:
            a["learnable"] = 1
        if self.estimator != "ste":
            a["estimator"] = self.estimator
        return a

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> "Uniform":
        block = int(attrs.get("block_size", 0) or 0)
        gran = "block" if block else ("tensor" if attrs.get("axis") is None else "channel")
        return cls(int(attrs.get("bits", 8)), bool(attrs.get("signed", 1)), gran, block,
                   bool(attrs.get("symmetric", 1)), bool(attrs.get("narrow", 0)), bool(attrs.get("learnable", 0)),
                   _text(attrs.get("estimator", "ste")))

    # -- parameters ----------------------------------------------------------
    def weight_params(self, w, out_axis, in_axis, method="minmax", start="paper"):
        axis = {"tensor": None, "channel": out_axis, "block": in_axis}[self.granularity]
        if self.estimator == "lsq" and self.granularity != "block" and start == "paper":  # 2 mean|w| / sqrt(Qp)
            a = np.abs(np.asarray(w, np.float64))
            m = a.mean() if axis is None else np.moveaxis(a, axis, 0).reshape(a.shape[axis], -1).mean(1)
            s = np.maximum(2 * m / np.sqrt(self.qmax), 1e-8).astype(np.float32)
            return {"scale": s.reshape(()) if axis is None else s, "zero_point": np.zeros_like(s)}, axis
        s, z = weight_qparams(w, self, axis if axis is not None else 0, method)
        if axis is None:
            s, z = s.reshape(()), z.reshape(())
        return {"scale": s, "zero_point": z}, axis

    def act_params(self, lo, hi, abs_mean: float | None = None):
        """Per-tensor parameters for an activation observed in [lo, hi]. DoReFa activations
        are x / alpha clipped to [0, 1] and quantized, times alpha: alpha is the calibrated
        maximum, fixed (the paper's alpha = 1 assumes a BatchNorm before the ReLU; a folded-BN
        graph has none, so alpha restores the scale, as it does for DoReFa weights). LSQ starts
        at 2 mean|x| / sqrt(Qp) when the mean absolute value is given."""
        if self.estimator == "dorefa":
            lo, hi = 0.0, max(float(hi), 1e-8)
        if self.estimator == "pact":  # PACT clips at 0: its grid starts there
            lo = 0.0
        if self.estimator == "lsq" and abs_mean is not None and abs_mean > 0:
            z = 0.0 if self.symmetric or lo >= 0 else scale_zp(np.array(lo), np.array(hi), self)[1]
            s = 2 * abs_mean / np.sqrt(max(self.qmax - (z if not self.symmetric else 0), 1))
            return {"scale": np.array(s, np.float32).reshape(()), "zero_point": np.array(z, np.float32).reshape(())}
        s, z = scale_zp(np.array(lo), np.array(hi), self)
        return {"scale": s.reshape(()), "zero_point": z.reshape(())}

    # -- maths ---------------------------------------------------------------
    def step(self, scale) -> np.ndarray:
        """The step a stored scale stands for: itself, or for a learned one (LSQ, PACT) |scale|
        (at least 1e-8), the positive step its training used whatever sign the parameter reached."""
        scale = np.asarray(scale, np.float32)
        return np.maximum(np.abs(scale), np.float32(1e-8)) if self.estimator in ("lsq", "pact") else scale

    def _shaped(self, x: np.ndarray, params, axis) -> tuple[np.ndarray, np.ndarray]:
        """Scale and zero point shaped to broadcast against ``x``."""
        dim = x.shape[axis] if axis is not None else None
        p = {"scale": self.step(params["scale"]), "zero_point": params["zero_point"]}
        return tuple(broadcast_param(p[k], x.ndim, axis, self.block_size, dim) for k in ("scale", "zero_point"))

    def apply_np(self, x, params, axis):
        x = np.asarray(x, np.float32)
        return fake_quant_np(x, *self._shaped(x, params, axis), self.qmin, self.qmax)

    def codes_np(self, x, params, axis) -> np.ndarray:
        """The integer codes of ``x`` (as float64)."""
        x = np.asarray(x, np.float32)
        return quantize_np(x, *self._shaped(x, params, axis), self.qmin, self.qmax)

    def torch_function(self, axis):
        if self.estimator == "lsq":
            return lsq_fake_quant, (self.qmin, self.qmax, axis, self.block_size)
        if self.estimator == "pact":
            return pact_fake_quant, (self.qmin, self.qmax)
        return fake_quant, (self.qmin, self.qmax, axis, self.block_size)

    def trainable(self, param: str) -> bool:
        return self.learnable and param == "scale"

    # -- ONNX ----------------------------------------------------------------
    def kernel_bits(self, kind: str = "weight") -> int | None:
        if self._int8_container(kind, True):
            return 8
        return self.bits if INT_TYPES.get((self.bits, self.signed)) is not None else None

    def _int8_container(self, kind: str, is_const: bool) -> bool:
        """A constant signed weight of at most 8 bits is held in int8: QLinearConv/QGemm then run
        on it (there are no int4 convolution kernels); its file storage is still packed."""
        return kind == "weight" and is_const and self.signed and self.bits <= 8 and not self.block_size

    def integer_step(self, params):
        return self.step(params["scale"]), ""

    def integer_type(self, kind: str, is_const: bool) -> tuple[int | None, str]:
        """The ONNX integer type that holds this quantizer's codes, or (None, why not)."""
        if self.bits == 32 and not (self.signed and kind == "bias" and is_const):
            return None, "32-bit codes exist only for constant int32 biases"
        elem = INT_TYPES.get((self.bits, self.signed))
        if elem is None:
            return None, f"no ONNX integer type holds {self.bits}-bit {'signed' if self.signed else 'unsigned'} codes"
        return elem, ""

    def lower(self, graph, node, fmt):
        is_const = graph.const_value(node.inputs[0]) is not None
        if fmt != "float" and self._int8_container(node.attr("kind", "act"), is_const):
            return Lowered(True, _qdq(graph, node, self, TensorProto.INT8, True))
        if fmt != "float" and not is_const and self.bits < 8 and not self.block_size:
            # a 1-7-bit activation in an 8-bit container: Clip to its range, then Q/DQ (onnxruntime
            # cannot run uint4 Q/DQ next to a fused layer; this is exact and always loads)
            _clip_to_range(graph, node, self)
            _qdq(graph, node, self, TensorProto.INT8 if self.signed else TensorProto.UINT8, False)
            return Lowered(True, 13)
        elem, why = self.integer_type(node.attr("kind", "act"), is_const)
        if fmt != "float" and elem is None and is_const and self.block_size and self.bits < 8:
            # weight-only blocks of 2, 3, 5-7 bits: the next container (int4/int8) holds the codes
            elem = INT_TYPES[(4 if self.bits < 4 else 8, self.signed)]
        if fmt == "float" or elem is None:
            _simulate(graph, node, self)
            return Lowered(False, 13, "float format asked for" if fmt == "float" else why)
        return Lowered(True, _qdq(graph, node, self, elem, is_const))

    def describe(self) -> str:
        sym = "symmetric" if self.symmetric else "asymmetric"
        est = f", {self.estimator} estimator" if self.estimator != "ste" else ""
        return f"uniform {self} ({sym}{', learnable scale' if self.learnable else ''}{est})"



# ------------------------------------------------------------------ the formula, once per library
def fake_quant_np(x: np.ndarray, scale: np.ndarray, zp: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
    """Broadcasted numpy fake quantization (scale/zp already shaped to broadcast), in x's float
    dtype (float32 for tensors; the histogram search uses float64)."""
    x = np.asarray(x)
    if x.dtype != np.float64:
        x = x.astype(np.float32)
    q = np.clip(np.round(x / scale) + zp, qmin, qmax)
    return ((q - zp) * scale).astype(x.dtype)


def quantize_np(x: np.ndarray, scale: np.ndarray, zp: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
    """Integer codes as float64 (exact for every bit width up to 32). The division is float32,
    as in QuantizeLinear; the clip is float64, where 2**31 - 1 is representable."""
    q = np.round(np.asarray(x, np.float32) / np.asarray(scale, np.float32)).astype(np.float64)
    return np.clip(q + np.asarray(zp, np.float64), qmin, qmax)


def straight_through(value: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``value`` bit for bit, with the gradient of ``grad``: value.detach() + (grad - grad.detach()),
    whose second term is exactly zero. The common ``grad + (value - grad).detach()`` is off by an ulp
    wherever ``value - grad`` rounds; on a learned step that ulp moves a weight sitting on a rounding
    tie to the other code, so training and the torch back end would run another model than the
    export writes. Every straight-through estimator in the quantizers goes through here."""
    return value.detach() + (grad - grad.detach())


def fake_quant_torch(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """The formula in torch, scale and zero point already broadcastable; gradient-free rounding."""
    return (torch.clamp(torch.round(x / s) + z, qmin, qmax) - z) * s


def uniform_rounding(scale: np.ndarray, zp: np.ndarray, qmin: int, qmax: int, shape: tuple[int, int]):
    """The column rounding of the uniform grid with per-row ``scale``/``zp`` ([G, R])."""
    s = torch.from_numpy(np.array(scale, np.float64)).reshape(shape)
    z = torch.from_numpy(np.array(zp, np.float64)).reshape(shape)
    return lambda w, k=None: fake_quant_torch(w, s, z, qmin, qmax)


def _shaped_params(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor, axis, block_size):
    if axis is not None and s.dim() > 0 and s.numel() > 1:
        ax = axis % x.dim()
        if block_size:
            s = torch.repeat_interleave(s, block_size, dim=ax).narrow(ax, 0, x.shape[ax])
            z = torch.repeat_interleave(z, block_size, dim=ax).narrow(ax, 0, x.shape[ax])
        else:
            shape = [1] * x.dim()
            shape[ax] = -1
            s, z = s.reshape(shape), z.reshape(shape)
    return s, z


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
               axis: int | None, block_size: int) -> torch.Tensor:
    """QuantizeLinear + DequantizeLinear in float, as the torch back end runs it (calibration,
    bias correction, QAT). With gradients: the rounding is straight-through, so dy/dx is 1 inside
    the range and 0 outside; dy/dscale and dy/dzero_point are their exact values given that
    rounding (LSQ's form), so a learnable scale trains."""
    s, z = _shaped_params(x, scale, zero_point, axis, block_size)
    if not (x.requires_grad or s.requires_grad or z.requires_grad):
        return fake_quant_torch(x, s, z, qmin, qmax)
    u = x / s
    r = straight_through(torch.round(u), u)
    return (torch.clamp(r + z, qmin, qmax) - z) * s


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def lsq_fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                   axis: int | None, block_size: int) -> torch.Tensor:
    """LSQ (Esser et al., ICLR 2020): the step is learned, its gradient scaled by
    g = 1 / sqrt(N * Qp) (N: values per step; for a per-tensor activation, the values of one
    sample), and kept positive (|s|, at least 1e-8: a step that a large update pushes through
    zero stays a step instead of turning the layer into NaNs). The forward value is QuantizeLinear +
    DequantizeLinear with that step, as the ONNX export computes."""
    s = scale.abs().clamp_min(1e-8)  # the same step whether or not it trains (the export writes it)
    if scale.requires_grad:
        per = x.numel() / max(scale.numel(), 1)
        if axis is None and x.dim() > 1:  # an activation: N counts one sample's features
            per = per / x.shape[0]
        g = 1.0 / math.sqrt(max(per * max(qmax, 1), 1.0))
        s = straight_through(s, s * g)  # value s exactly, gradient scaled by g
    s, z = _shaped_params(x, s, zero_point.detach(), axis, block_size)
    u = x / s
    r = straight_through(torch.round(u), u)
    return (torch.clamp(r + z, qmin, qmax) - z) * s


def pact_fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
                    ) -> torch.Tensor:
    """PACT (Choi et al. 2018): y = quantize(clip(x, 0, alpha)) with alpha = scale * (qmax - qmin)
    learned. The gradient to alpha is 1 where x >= alpha and 0 elsewhere; to x it is 1 inside
    (0, alpha). The rounding passes gradients straight through. The forward value is
    QuantizeLinear + DequantizeLinear with zero point qmin. Like LSQ's step, alpha is kept
    positive (|scale|, at least 1e-8): a clip pushed through zero stays a clip."""
    scale = scale.abs().clamp_min(1e-8)
    alpha = scale * (qmax - qmin)
    yc = torch.where(x >= alpha, alpha, torch.relu(x))
    s = scale.detach()
    q = torch.clamp(torch.round(yc.detach() / s), qmin, qmax) * s
    return straight_through(q, yc)


def sqnr_db(ref: np.ndarray, test: np.ndarray) -> float:
    noise = float(np.sum((np.asarray(ref, np.float64) - test) ** 2))
    sig = float(np.sum(np.asarray(ref, np.float64) ** 2))
    return float("inf") if noise == 0 else 10 * np.log10(max(sig, 1e-30) / noise)


# ------------------------------------------------------------------ parameter choice
def bias_quantizer(per_channel: bool) -> Uniform:
    """The int32 quantizer of a bias (scale: input step x weight step, zero point 0)."""
    return Uniform(32, True, "channel" if per_channel else "tensor")


def scale_zp(lo: np.ndarray, hi: np.ndarray, spec: Uniform) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point that make [lo, hi] representable (0 always exactly representable)."""
    lo = np.minimum(np.asarray(lo, np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, np.float64), 0.0)
    if spec.symmetric:
        amax = np.maximum(-lo, hi)
        if spec.signed:
            half = min(-spec.qmin, spec.qmax)
            scale = amax / half
            zp = np.zeros_like(scale)
        else:  # symmetric unsigned (non-negative data): zero point at qmin
            scale = hi / (spec.qmax - spec.qmin)
            zp = np.full_like(scale, spec.qmin)
    else:
        scale = (hi - lo) / (spec.qmax - spec.qmin)
        safe = np.where(scale > 0, scale, 1.0)
        zp = np.clip(np.round(spec.qmin - lo / safe), spec.qmin, spec.qmax)
    scale = np.where(scale > 0, scale, 1.0)  # all-zero channels: any scale is exact
    return scale.astype(np.float32), zp.astype(np.float32)


def broadcast_param(p: np.ndarray, ndim: int, axis: int | None, block: int = 0, dim_size: int | None = None) -> np.ndarray:
    """Shape a per-channel/per-block parameter to broadcast against a tensor of rank ndim."""
    p = np.asarray(p, np.float32)
    if axis is None or p.size == 1:
        return p.reshape(())
    if block:
        p = np.repeat(p, block, axis=axis)
        if dim_size is not None:
            p = np.take(p, np.arange(dim_size), axis=axis)
        return p
    shape = [1] * ndim
    shape[axis] = p.size
    return p.reshape(shape)


def weight_qparams(w: np.ndarray, spec: Uniform, axis: int, method: str = "minmax",
                   grid: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """Per-tensor / per-channel / per-block scale and zero point for a weight tensor.

    ``method=mse`` searches, per channel (or block) and in one batched computation, the
    clipping ratio in [0.3, 1] that minimises the squared quantization error."""
    w = np.asarray(w, np.float32)
    if spec.granularity == "tensor":
        groups = w.reshape(1, -1)
    elif spec.granularity == "channel":
        groups = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    else:  # block: blocks of block_size along the *input* axis, per output channel
        groups, _ = _blocks(w, axis, spec.block_size)
    lo, hi = groups.min(axis=1), groups.max(axis=1)
    if method == "minmax":
        scale, zp = scale_zp(lo, hi, spec)
    elif method == "mse":
        ratios = np.linspace(0.3, 1.0, grid, dtype=np.float32)
        best_err = np.full(groups.shape[0], np.inf, np.float64)
        scale, zp = scale_zp(lo, hi, spec)
        gt = torch.from_numpy(np.array(groups, np.float32))  # a copy: a weight constant is read-only
        for r in ratios:  # grid points in sequence, all channels at once
            s, z = scale_zp(lo * r, hi * r, spec)
            q = fake_quant_torch(gt, torch.from_numpy(s)[:, None], torch.from_numpy(z)[:, None], spec.qmin, spec.qmax)
            err = ((q - gt) ** 2).sum(1).double().numpy()
            better = err < best_err
            best_err = np.where(better, err, best_err)
            scale, zp = np.where(better, s, scale), np.where(better, z, zp)
    else:
        raise GraphOptError(f"unknown weight calibration method '{method}' (minmax, mse)")
    if spec.granularity == "block":
        nblocks = -(-w.shape[axis] // spec.block_size)
        # groups are ordered [out-channel, block]: reshape to the block-scale tensor layout
        scale = _block_param_layout(scale, w.shape, axis, nblocks)
        zp = _block_param_layout(zp, w.shape, axis, nblocks)
    return scale, zp


def _blocks(w: np.ndarray, axis: int, block: int) -> tuple[np.ndarray, int]:
    """[out_channels * nblocks, block] groups; the last block is padded with zeros."""
    wm = np.moveaxis(w, axis, -1)  # [..., K]
    k = wm.shape[-1]
    nblocks = -(-k // block)
    pad = nblocks * block - k
    if pad:
        wm = np.concatenate([wm, np.zeros(wm.shape[:-1] + (pad,), wm.dtype)], axis=-1)
    return wm.reshape(-1, block), nblocks


def _block_param_layout(p: np.ndarray, wshape, axis: int, nblocks: int) -> np.ndarray:
    """Block parameters laid out like the weight with ``axis`` shrunk to the block count
    (ONNX DequantizeLinear's blocked layout)."""
    moved = list(np.moveaxis(np.empty(wshape, np.int8), axis, -1).shape)
    moved[-1] = nblocks
    return np.moveaxis(np.asarray(p, np.float32).reshape(moved), -1, axis)


# ------------------------------------------------------------------ activation ranges
def range_from_histogram(counts: np.ndarray, lo: float, hi: float, spec: Uniform, method: str,
                         percentile: float = 99.99, grid: int = 64) -> tuple[float, float]:
    """Pick the quantization range of one tensor from its histogram over [lo, hi].

    * ``minmax``: [lo, hi].
    * ``percentile``: the ``percentile`` and ``100 - percentile`` points of the distribution
      (the lower one only if the data goes negative).
    * ``mse``: of ``grid`` ranges shrunk from [lo, hi], the one whose quantization of the
      histogram's bin centres has the least expected squared error (clipping + rounding),
      evaluated for all candidates at once."""
    counts = np.asarray(counts, np.float64)
    if method == "minmax" or counts.sum() == 0 or hi <= lo:
        return lo, hi
    edges = np.linspace(lo, hi, len(counts) + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    if method == "percentile":
        cdf = np.cumsum(counts) / counts.sum()
        top = float(edges[1:][np.searchsorted(cdf, percentile / 100.0)]) if percentile < 100 else hi
        bottom = float(edges[:-1][np.searchsorted(cdf, 1 - percentile / 100.0)]) if lo < 0 else lo
        return min(bottom, 0.0) if lo < 0 else lo, max(top, 0.0)
    if method == "mse":
        ratios = np.linspace(1.0 / grid, 1.0, grid)
        cand_lo, cand_hi = lo * ratios, hi * ratios
        scale, zp = scale_zp(cand_lo, cand_hi, spec)  # [grid]
        s, z = scale[:, None].astype(np.float64), zp[:, None].astype(np.float64)
        q = fake_quant_np(np.broadcast_to(centres[None, :], (grid, centres.size)), s, z, spec.qmin, spec.qmax)
        err = ((q - centres[None, :]) ** 2 * counts[None, :]).sum(1)
        best = int(np.argmin(err))
        return float(cand_lo[best]), float(cand_hi[best])
    if method == "entropy":
        t = entropy_threshold(counts, lo, hi, spec)
        return max(lo, -t) if lo < 0 else lo, min(hi, t)
    raise GraphOptError(f"unknown activation calibration method '{method}' (minmax, percentile, mse, entropy)")


def entropy_threshold(counts: np.ndarray, lo: float, hi: float, spec: Uniform, stride: int = 8,
                      eps: float = 1e-4) -> float:
    """The clip threshold t (on |x|) whose quantized distribution is closest, in KL divergence,
    to the clipped one (the TensorRT / onnxruntime ``entropy`` method). The histogram is folded
    to |x|; candidates are every ``stride``-th bin from the level count up, each scored with
    vector ops."""
    counts = np.asarray(counts, np.float64)
    edges = np.linspace(lo, hi, counts.size + 1)
    centres = np.abs((edges[:-1] + edges[1:]) / 2)
    top = max(abs(lo), abs(hi))
    nb = counts.size
    folded, fedges = np.histogram(centres, bins=nb, range=(0.0, top), weights=counts)
    levels = spec.qmax - spec.qmin + 1
    if lo < 0:
        levels //= 2  # one side of a signed grid
    if levels >= nb or folded.sum() == 0:
        return float(top)
    best_kl, best_i = np.inf, nb
    for i in range(levels, nb + 1, stride):
        raw = folded[:i]
        p = raw.copy()
        p[-1] += folded[i:].sum()  # the reference: outliers clipped into the last bin
        chunk = np.minimum(np.arange(i) * levels // i, levels - 1)  # which level each bin merges into
        nz = raw > 0  # the candidate: the slice without its outliers, merged into levels and spread back
        mass = np.bincount(chunk, weights=raw, minlength=levels)
        width = np.bincount(chunk, weights=nz.astype(np.float64), minlength=levels)
        q = np.where(nz, mass[chunk] / np.maximum(width[chunk], 1), 0.0)
        ps, qs = p / p.sum(), q / max(q.sum(), 1e-300)
        # smooth: a bin the candidate leaves empty gets a little mass (as onnxruntime/TensorRT do)
        hole = (ps > 0) & (qs == 0)
        if hole.any() and (qs > 0).any():
            qs = np.where(hole, eps, qs * (1 - eps * hole.sum()))
        m = (ps > 0) & (qs > 0)
        kl = float(np.sum(ps[m] * np.log(ps[m] / qs[m])))
        if kl < best_kl:
            best_kl, best_i = kl, i
    return float(fedges[best_i])




# ------------------------------------------------------------------ ONNX lowering
def _qdq(g, n, q: Uniform, elem: int, is_const: bool) -> int:
    """A constant becomes integer codes + DequantizeLinear; a computed value a Q/DQ pair.
    Returns the opset the nodes need (int8 weight codes of at most 4 bits are stored packed,
    which needs opset 21)."""
    from graphopt.quantizers.packing import int8_codes

    x, out = n.inputs[0], n.outputs[0]
    axis = n.attr("axis")
    s = q.step(g.const_value(n.inputs[1]))
    z = np.asarray(g.const_value(n.inputs[2]), np.float32)
    attrs = {}
    if axis is not None and s.size > 1:
        attrs["axis"] = int(axis)
    if q.block_size:
        attrs["block_size"] = int(q.block_size)
    sc = g.add_const(s, f"{x.name}_scale")
    zc = g.add_const(z.astype(numpy_dtype(elem)), f"{x.name}_zero_point")
    opset = 21 if (q.bits in (4, 16) or q.block_size) and elem != TensorProto.INT8 else 13
    if is_const:
        codes = q.codes_np(g.const_value(x), {"scale": s, "zero_point": z}, axis)
        if elem == TensorProto.INT8 and q.bits < 8:
            qc, opset = int8_codes(g, codes, x.name, n.source)
        else:
            qc = g.add_const(codes.astype(numpy_dtype(elem)), f"{x.name}_quantized")
        dq = g.add_node("DequantizeLinear", [qc, sc, zc], [out.name + "_dq"], attrs=attrs, source=n.source,
                        name=g.unique_node_name(n.name + "_dq"))
    else:
        qn = g.add_node("QuantizeLinear", [x, sc, zc], [x.name + "_quantized"], attrs=attrs, source=n.source,
                        name=g.unique_node_name(n.name + "_q"))
        qn.outputs[0].dtype, qn.outputs[0].shape = elem, x.shape
        dq = g.add_node("DequantizeLinear", [qn.outputs[0], sc, zc], [out.name + "_dq"], attrs=attrs,
                        source=n.source, name=g.unique_node_name(n.name + "_dq"))
    dq.outputs[0].dtype, dq.outputs[0].shape = out.dtype or TensorProto.FLOAT, out.shape
    g.replace_all_uses(out, dq.outputs[0])
    g.remove_node(n)
    if not x.uses and x.const is not None:
        g.remove_const(x)
    return opset


def _clip_to_range(g, n, q: Uniform) -> None:
    """Put Clip(x, (qmin - z) s, (qmax - z) s) before the FakeQuant ``n`` (per tensor): a
    QuantizeLinear to 8 bits after it then writes exactly the low-bit codes."""
    x = n.inputs[0]
    s = float(q.step(g.const_value(n.inputs[1])).reshape(-1)[0])
    z = float(np.asarray(g.const_value(n.inputs[2])).reshape(-1)[0])
    lo = g.add_const(np.array((q.qmin - z) * s, np.float32), f"{x.name}_lo")
    hi = g.add_const(np.array((q.qmax - z) * s, np.float32), f"{x.name}_hi")
    c = g.add_node("Clip", [x, lo, hi], [f"{x.name}_{q.bits}bit"], source=n.source,
                   name=g.unique_node_name(f"{n.name}_clip"))
    c.outputs[0].dtype, c.outputs[0].shape = x.dtype or TensorProto.FLOAT, x.shape
    g.set_input(n, 0, c.outputs[0])


def _simulate(g, n, q: Uniform) -> None:
    """The formula as float ops: ((clip(round(x / s) + z, qmin, qmax)) - z) * s, per axis."""
    x, out = n.inputs[0], n.outputs[0]
    s = q.step(g.const_value(n.inputs[1]))
    z = np.asarray(g.const_value(n.inputs[2]), np.float32)
    axis = n.attr("axis")
    rank = len(x.shape) if x.shape is not None else (np.asarray(g.const_value(x)).ndim if x.const is not None else None)
    if axis is not None and s.size > 1:
        if rank is None:
            raise GraphOptError(f"cannot simulate per-channel FakeQuant '{n.name}' on a value of unknown rank")
        dim = x.shape[axis] if x.shape is not None else None
        s = broadcast_param(s, rank, axis % rank, q.block_size, dim)
        z = broadcast_param(z, rank, axis % rank, q.block_size, dim)
    sc, zc = g.add_const(s.astype(np.float32), f"{x.name}_scale"), g.add_const(z.astype(np.float32), f"{x.name}_zp")
    lo = g.add_const(np.array(q.qmin, np.float32), f"{x.name}_qmin")
    hi = g.add_const(np.array(q.qmax, np.float32), f"{x.name}_qmax")

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
