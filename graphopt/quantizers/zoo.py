"""The shared base of the non-uniform weight schemes; each scheme is its own module beside this
one (pow2, apot, binary, ternary, term, pwlq, dorefa).

Each is a registered ``Quantizer``; its maths is written once, in torch, on a ``[rows, n]``
view of the tensor (one row per output channel, or one row for the whole tensor, this module's
``to_rows``/``from_rows``), and numpy calls the same code. Spec text is ``<scheme>[<bits>][:<token>]...``; every scheme takes
``tensor`` or ``channel`` (the default) and ``b<N>`` for its bit width; the other tokens are
the scheme's own (see each class, and ``docs/quantizers.md``).

**Integer-kernel lowering.** A scheme whose dequantized weights are integers times a step
``s`` (per channel), with the integers in [-127, 127], *is* an int8 uniform tensor with scale
``s``. Such a weight is written as int8 codes (packed to 4 bits when they allow, see
``packing``) and a DequantizeLinear, so onnxruntime runs QLinearConv/QGemm on it; the report
gives the scheme's true bit width beside it. Every other weight is written as its exact
dequantized float values (the float simulation), and the conversion summary says why.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from graphopt.errors import GraphOptError
from graphopt.quantizers.base import Lowered, Quantizer, parse, parse_tokens
from graphopt.quantizers.uniform import straight_through

GRANULARITIES = ("tensor", "channel")


# ------------------------------------------------------------------ row views
def to_rows(x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """``x`` as ``[rows, n]``: one row per index of ``axis`` (or one row)."""
    if axis is None:
        return x.reshape(1, -1)
    return x.movedim(axis, 0).reshape(x.shape[axis], -1)


def from_rows(r: torch.Tensor, shape, axis: int | None) -> torch.Tensor:
    if axis is None:
        return r.reshape(shape)
    moved = [shape[axis]] + [d for i, d in enumerate(shape) if i != axis % len(shape)]
    return r.reshape(moved).movedim(0, axis)


def _col(p: torch.Tensor, rows: int) -> torch.Tensor:
    """A per-row parameter (scalar or [rows] or [rows, k]) as [rows, k]."""
    p = p.to(torch.float32)
    if p.dim() == 0 or p.numel() == 1:
        return p.reshape(1, 1).expand(rows, 1)
    return p.reshape(rows, -1)


def nearest_level(u: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Each element of ``u`` replaced by the nearest of the sorted ``levels`` (ties go to the
    level of larger magnitude's lower neighbour, i.e. to the left): one bucketize."""
    mids = (levels[1:] + levels[:-1]) / 2
    return levels[torch.bucketize(u.contiguous(), mids)]


def dyadic_step(levels: np.ndarray, max_exp: int = 40) -> float | None:
    """The largest power of two ``d`` with every level an integer multiple of it, or None."""
    lv = np.abs(np.asarray(levels, np.float64))
    for k in range(max_exp):
        d = 2.0 ** -k
        if np.all(np.abs(lv / d - np.round(lv / d)) == 0):
            return d
    return None


# ------------------------------------------------------------------ the shared base
@dataclass(frozen=True)
class ZooScheme(Quantizer):
    """Base of the weight-only schemes: spec parsing, attributes, the row maths, the MSE clip
    search, the integer-kernel lowering and the float simulation."""

    param_names = ("alpha",)
    scale_params = ("alpha",)
    default_bits: ClassVar[int] = 4
    bit_range: ClassVar[tuple[int, int]] = (2, 8)
    words: ClassVar[dict[str, tuple[str, Any]]] = {}  # token -> (field, value)
    numbers: ClassVar[dict[str, str]] = {}  # token prefix -> int field
    fixed_bits: ClassVar[bool] = False  # binary/ternary
    elementwise: ClassVar[bool] = True  # each value rounds on its own (GPTQ can drive it); term: False

    bits: int = 4
    granularity: str = "channel"

    def gptq_rounding(self, params, axis, shape):
        """GPTQ drives the scheme's own row maths: one parameter row per output channel (the
        rows of the [groups, rows] view), or the per-tensor parameters shared by every row."""
        if not self.elementwise:
            return super().gptq_rounding(params, axis, shape)
        n = shape[0] * shape[1]

        def as_rows(v) -> torch.Tensor:
            v = np.asarray(v, np.float32)
            r = v.reshape(n, -1) if axis is not None else np.broadcast_to(v.reshape(1, -1), (n, v.size))
            return torch.from_numpy(np.ascontiguousarray(r))

        per_row = {k: as_rows(v) for k, v in params.items()}
        return lambda col, k=None: self.rows(col.reshape(n, 1).float(), per_row).reshape(shape).double()

    # -- spec text -----------------------------------------------------------
    @classmethod
    def parse(cls, text: str, what: str) -> "ZooScheme":
        _, values = parse_tokens(text, what, cls.scheme, cls.keywords or (cls.scheme,), words=cls.words,
                                 numbers=cls.numbers, granularities=GRANULARITIES, fixed_bits=cls.fixed_bits,
                                 default_bits=cls.default_bits, bit_range=cls.bit_range,
                                 special=lambda tok: cls.special_token(tok, text, what))
        q = cls(**values)
        why = q.invalid()
        if why:
            raise GraphOptError(f"bad {what} spec '{text}': {why}")
        return q

    def invalid(self) -> str:
        """Why this combination of options is impossible ('' when it is fine)."""
        return ""

    @classmethod
    def special_token(cls, tok: str, text: str, what: str) -> tuple[str, Any] | None:
        """A scheme's own token form beyond words and ``<prefix><int>`` (None: not one)."""
        return None

    def __str__(self) -> str:
        name = self.scheme if self.fixed_bits else (f"{self.scheme}:b{self.bits}" if self.scheme[-1].isdigit()
                                                    else f"{self.scheme}{self.bits}")
        toks = [name, self.granularity]
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for tok, (field, val) in self.words.items():
            if getattr(self, field) == val and defaults[field] != val:
                toks.append(tok)
        for prefix, field in self.numbers.items():
            if getattr(self, field) != defaults[field]:
                toks.append(f"{prefix}{getattr(self, field)}")
        return ":".join(toks)

    def with_bits(self, bits: int) -> "ZooScheme":
        return self if self.fixed_bits else dataclasses.replace(self, bits=int(bits))

    # -- node attributes -----------------------------------------------------
    def to_attrs(self) -> dict[str, Any]:
        return {"spec": str(self)}

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> "ZooScheme":
        spec = attrs.get("spec")
        if isinstance(spec, bytes):
            spec = spec.decode()
        if not spec:
            raise GraphOptError(f"{cls.scheme} FakeQuant without a 'spec' attribute")
        return _parse_cached(str(spec))

    # -- maths (override rows) -------------------------------------------------
    def rows(self, r: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Dequantized values of ``r`` ([rows, n]), parameters as [rows, k] tensors."""
        raise NotImplementedError  # pragma: no cover - abstract

    def _apply_torch(self, x: torch.Tensor, params: dict[str, torch.Tensor], axis: int | None,
                     train: bool = False) -> torch.Tensor:
        r = to_rows(x, axis)
        p = {k: _col(v, r.shape[0]) for k, v in self.row_params(r, params).items()}
        if not train:
            with torch.no_grad():
                return from_rows(self.rows(r, p), x.shape, axis)
        with torch.no_grad():
            value = self.rows(r.detach(), {k: v.detach() for k, v in p.items()})
        g = self.surrogate(r, p)  # what the gradient follows; the value is exactly ``rows``
        return from_rows(straight_through(value, g), x.shape, axis)

    def row_params(self, r: torch.Tensor, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The parameters ``rows`` uses: the stored ones (binary/ternary recompute theirs from
        the weights, so that training and the export use the current weights' scale)."""
        return params

    def surrogate(self, r: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training estimator: a differentiable stand-in whose gradient the quantizer
        passes back. Default: straight-through (identity) inside the clip, zero outside."""
        a = params.get("alpha", params.get("scale"))
        if a is None:
            return r
        top = float(np.abs(self.unit_levels()).max()) if hasattr(self, "unit_levels") else (
            float((1 << (self.bits - 1)) - 1) if self.param_names == ("scale",) else 1.0)
        return clipped_ste(r, a.detach() * top)

    def apply_np(self, x, params, axis):
        x = np.asarray(x, np.float32)
        with torch.no_grad():
            y = self._apply_torch(torch.from_numpy(np.array(x, np.float32)),
                                  {k: torch.from_numpy(np.array(v, np.float32)) for k, v in params.items()}, axis)
        return y.numpy().astype(np.float32)

    def torch_function(self, axis):
        fn = {1: zoo_fake_quant_1, 2: zoo_fake_quant_2}[len(self.param_names)]
        return fn, (str(self), axis)

    # -- parameters ----------------------------------------------------------
    def initial_params(self, r: np.ndarray) -> dict[str, np.ndarray]:
        """Parameters for the rows ``r`` ([rows, n] float32) by the scheme's own rule."""
        return {"alpha": np.maximum(np.abs(r).max(axis=1), 1e-12).astype(np.float32)}

    search_clip: ClassVar[bool] = True  # method=mse searches a clip ratio of alpha

    def weight_params(self, w, out_axis, in_axis, method="minmax", start="paper"):
        if method not in ("minmax", "mse"):
            raise GraphOptError(f"the {self.scheme} scheme chooses its parameters by minmax or mse, not '{method}'")
        axis = out_axis if self.granularity == "channel" else None
        rt = to_rows(torch.from_numpy(np.array(w, np.float32)), axis)  # a copy: torch wants writable arrays
        r = rt.numpy()
        params = self.initial_params(r)
        if method == "mse" and self.search_clip:
            params = self._mse_clip(rt, params)
        if axis is None:
            params = {k: (v.reshape(()) if v.size == 1 else v.reshape(v.shape[1:])) for k, v in params.items()}
        return params, axis

    def effective_params(self, w: np.ndarray, params: dict[str, np.ndarray], axis) -> dict[str, np.ndarray]:
        """``row_params`` for a numpy weight (what the lowering writes)."""
        r = to_rows(torch.from_numpy(np.array(w, np.float32)), axis)
        tp = {k: _col(torch.from_numpy(np.array(v, np.float32)), r.shape[0]) for k, v in params.items()}
        out = self.row_params(r, tp)
        return {k: v.numpy().reshape(-1) if v.shape[1] == 1 else v.numpy() for k, v in out.items()}

    def _mse_clip(self, rt: torch.Tensor, params: dict[str, np.ndarray], grid: int = 40) -> dict[str, np.ndarray]:
        """Per row, the clip ratio in [0.3, 1] (scaling every parameter) with the least squared
        error; all rows at once, one grid point at a time."""
        best = {k: v.copy() for k, v in params.items()}
        best_err = np.full(rt.shape[0], np.inf)
        with torch.no_grad():
            for ratio in np.linspace(0.3, 1.0, grid, dtype=np.float32):
                cand = {k: (v * ratio).astype(np.float32) for k, v in params.items()}
                q = self.rows(rt, {k: _col(torch.from_numpy(v), rt.shape[0]) for k, v in cand.items()})
                err = ((q - rt) ** 2).sum(1).double().numpy()
                better = err < best_err
                best_err = np.where(better, err, best_err)
                for k in best:
                    best[k] = np.where(better.reshape((-1,) + (1,) * (best[k].ndim - 1)), cand[k], best[k])
        return best

    # -- integer form --------------------------------------------------------
    def integer_step(self, params: dict[str, np.ndarray]) -> tuple[np.ndarray | None, str]:
        """The per-row step ``s`` of the int8 grid this scheme's values lie on, or (None, why
        not). The lowering checks the codes value by value besides."""
        return None, f"{self.scheme} levels are not integer multiples of one step"

    def kernel_bits(self, kind: str = "weight") -> int | None:
        return 8 if self.integer_step(self._unit_params())[0] is not None else None

    def _unit_params(self) -> dict[str, np.ndarray]:
        return {k: np.ones(1, np.float32) for k in self.param_names}

    def weight_codes(self, w: np.ndarray, params, axis) -> tuple[np.ndarray | None, np.ndarray | None, str]:
        """(int codes, per-row step, '') such that codes * step == the quantized ``w`` exactly
        in float32; or (None, None, why not)."""
        params = self.effective_params(w, params, axis)
        step, why = self.integer_step(params)
        if step is None:
            return None, None, why
        y = self.apply_np(w, params, axis)
        yr = to_rows(torch.from_numpy(y), axis).numpy().astype(np.float64)
        s = np.broadcast_to(np.asarray(step, np.float32).reshape(-1, 1), (yr.shape[0], 1)).astype(np.float32)
        codes = np.round(yr / s.astype(np.float64))
        if np.abs(codes).max(initial=0) > 127:
            return None, None, f"its codes reach {int(np.abs(codes).max())}, beyond int8's 127"
        if not np.array_equal((codes.astype(np.float32) * s).astype(np.float32), yr.astype(np.float32)):
            return None, None, "its values are not exact multiples of the int8 step in float32"
        return from_rows(torch.from_numpy(codes), w.shape, axis).numpy(), s.reshape(-1), ""

    def lower(self, graph, node, fmt):
        return lower_weight(self, graph, node, fmt)

    # -- report --------------------------------------------------------------
    def true_bits(self) -> float:
        return float(self.bits)

    def describe(self) -> str:
        return f"{self.scheme} {self} ({self.true_bits():g} bits)"


@functools.lru_cache(maxsize=256)
def _parse_cached(spec: str) -> Quantizer:
    return parse(spec, "FakeQuant")


def zoo_fake_quant_1(x: torch.Tensor, a: torch.Tensor, spec: str, axis: int | None) -> torch.Tensor:
    q = _parse_cached(spec)
    return q._apply_torch(x, {q.param_names[0]: a}, axis, train=x.requires_grad)


def zoo_fake_quant_2(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, spec: str, axis: int | None) -> torch.Tensor:
    q = _parse_cached(spec)
    return q._apply_torch(x, {q.param_names[0]: a, q.param_names[1]: b}, axis, train=x.requires_grad)


def lower_weight(q: ZooScheme, g, n, fmt: str) -> Lowered:
    """A zoo weight as int8 codes + DequantizeLinear (integer kernels), or as its exact float
    values (simulation)."""
    from graphopt.quantizers.base import params_of
    from graphopt.quantizers.packing import int8_codes

    x, out = n.inputs[0], n.outputs[0]
    w = g.const_value(x)
    if w is None:
        raise GraphOptError(f"FakeQuant '{n.name}': the {q.scheme} scheme quantizes constant weights only")
    w = np.asarray(w, np.float32)
    params, axis = params_of(g, n), n.attr("axis")
    codes, step, why = q.weight_codes(w, params, axis) if fmt != "float" else (None, None, "float format asked for")
    if codes is None:
        from graphopt.quantizers.packing import float_codebook

        yv = q.apply_np(w, params, axis)
        y = float_codebook(g, yv, axis, f"{x.name}_{q.scheme}", n.source) if fmt != "float" else None
        if y is None:  # more than 256 levels a row (or the float format): the plain float values
            y = g.add_const(yv, f"{x.name}_{q.scheme}")
        g.replace_all_uses(out, y)
        g.remove_node(n)
        return Lowered(False, 13, why)
    qv, opset = int8_codes(g, codes, x.name, n.source)
    attrs = {"axis": int(axis)} if axis is not None and step.size > 1 else {}
    sc = g.add_const(step.astype(np.float32) if attrs else step.reshape(()).astype(np.float32), f"{x.name}_scale")
    zc = g.add_const(np.zeros(step.shape if attrs else (), np.int8), f"{x.name}_zero_point")
    dq = g.add_node("DequantizeLinear", [qv, sc, zc], [out.name + "_dq"], attrs=attrs, source=n.source,
                    name=g.unique_node_name(n.name + "_dq"))
    dq.outputs[0].dtype, dq.outputs[0].shape = out.dtype or 1, out.shape
    g.replace_all_uses(out, dq.outputs[0])
    g.remove_node(n)
    return Lowered(True, opset)


# ------------------------------------------------------------------ level-set schemes
@dataclass(frozen=True)
class LevelScheme(ZooScheme):
    """A scheme with a fixed set of dyadic levels L, scaled per row by ``alpha``:
    y = alpha * nearest_level(clamp(x / alpha, min L, max L)). alpha starts at
    max|w| / max L (and the MSE search shrinks it)."""

    def unit_levels(self) -> np.ndarray:
        """The sorted signed levels (float64, exact powers-of-two sums)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def initial_params(self, r):
        top = float(np.abs(self.unit_levels()).max())
        return {"alpha": (np.maximum(np.abs(r).max(axis=1), 1e-12) / top).astype(np.float32)}

    @functools.cached_property
    def _levels_t(self) -> torch.Tensor:
        return torch.from_numpy(self.unit_levels().astype(np.float32))

    def rows(self, r, params):
        a = params["alpha"]
        lv = self._levels_t
        return a * nearest_level(torch.clamp(r / a, float(lv[0]), float(lv[-1])), lv)

    def integer_step(self, params):
        d = dyadic_step(self.unit_levels())
        if d is None or np.abs(self.unit_levels()).max() / d > 127:
            return None, (f"its levels span {np.abs(self.unit_levels()).max() / (d or 1):g} steps of the smallest, "
                          "beyond int8's 127" if d else "its levels are not multiples of one power-of-two step")
        return (np.asarray(params["alpha"], np.float32).reshape(-1) * np.float32(d)).astype(np.float32), ""

    def level_count(self) -> int:
        return int(np.unique(self.unit_levels()).size)

    def true_bits(self) -> float:
        return round(math.log2(self.level_count()), 2)


def clipped_ste(r: torch.Tensor, bound: torch.Tensor | float = 1.0) -> torch.Tensor:
    """The clipped straight-through estimator: ``r`` itself, with gradient 1 where |r| <= bound
    and 0 beyond (bound 1: binary/ternary training; a scheme's clip: the default surrogate)."""
    inside = (r.abs() <= bound).to(r.dtype)
    return r * inside + (r * (1 - inside)).detach()


def levels_from_weights(q: "LevelScheme", r: np.ndarray) -> dict[str, np.ndarray]:
    """The stored parameters of a scheme whose scale comes from the weights (``row_params``):
    the same formula, so the stored values equal what training and the export compute."""
    out = q.row_params(torch.from_numpy(np.array(r, np.float32)), {})
    return {k: v.numpy().reshape(-1).astype(np.float32) for k, v in out.items()}


@dataclass(frozen=True)
class DerivedLevels(LevelScheme):
    """Base of binary and ternary: one width, no clip search; the parameters are derived from the
    weights themselves (``row_params``, as in training) and trained through a clipped STE."""

    fixed_bits = True
    search_clip = False

    def initial_params(self, r):
        return levels_from_weights(self, r)

    def surrogate(self, r, params):
        return clipped_ste(r)
