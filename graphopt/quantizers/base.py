"""The quantizer interface, the scheme registry, and the ``FakeQuant`` node that carries a scheme.

A ``FakeQuant`` node (domain ``ai.graphopt``) is ``FakeQuant(x, *params)``. Its attributes are
the generic ones below plus whatever its scheme writes (``Quantizer.to_attrs``):

* ``scheme``: the registered scheme name (absent means ``uniform``, the first scheme);
* ``kind``: ``weight``, ``act`` or ``bias``;
* ``axis``: the channel/block axis; absent means per tensor.

A scheme (a ``Quantizer`` subclass, registered with ``@register``) owns everything about
itself: its spec text, its attributes, choosing its parameters, numpy and torch maths (with
gradients to any learnable parameter), its ONNX lowering and its report line. The back ends
and the passes look it up with ``from_node``/``parse`` and never decode its attributes.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import numpy as np

from graphopt.errors import GraphOptError

DOMAIN = "ai.graphopt"
FAKE_QUANT = "FakeQuant"
KINDS = ("weight", "act", "bias")

_SCHEMES: dict[str, type["Quantizer"]] = {}
_KEYWORDS: dict[str, type["Quantizer"]] = {}


@dataclass(frozen=True)
class Lowered:
    """What a scheme's ``lower`` did with one FakeQuant."""

    integer: bool  # True: an integer tensor/op onnxruntime can run on integer kernels
    opset: int = 13  # the default-domain opset the emitted ops need
    reason: str = ""  # why it stays float (when ``integer`` is False)


@dataclass(frozen=True)
class Quantizer:
    """Interface of a quantizer scheme. Subclasses are frozen dataclasses whose fields are the
    scheme's spec; they are registered by ``@register``."""

    scheme: ClassVar[str] = ""
    keywords: ClassVar[tuple[str, ...]] = ()  # spec words that select this scheme ("int", "uint")
    param_names: ClassVar[tuple[str, ...]] = ()  # FakeQuant inputs after x, in order
    # the parameters that scale with the input: q(g*x; g*p) == g*q(x; p) for g > 0 when the
    # scheme is scale-equivariant (a learned or fitted step, clip or threshold)
    scale_params: ClassVar[tuple[str, ...]] = ()
    doc: ClassVar[str] = ""  # one line for `graphopt passes` / the README
    # -- what the passes may ask of a scheme (defaults: a weight-only scheme) ----------------
    bit_range: ClassVar[tuple[int, int]] = (1, 16)  # the widths ``at_bits`` accepts
    fixed_bits: ClassVar[bool] = False  # binary/ternary: one width only
    for_activations: ClassVar[bool] = False  # quantizes activations from calibrated ranges (acts=...)
    dynamic: ClassVar[bool] = False  # activations quantized at run time (acts=dynamic): no calibration
    elementwise: ClassVar[bool] = False  # each value rounds on its own, so GPTQ can drive its rounding
    enlargeable_step: ClassVar[bool] = False  # a weight step may grow so an int32 bias fits (uniform)

    # -- spec text -----------------------------------------------------------
    @classmethod
    def parse(cls, text: str, what: str) -> "Quantizer":  # pragma: no cover - abstract
        raise NotImplementedError

    # -- node attributes -----------------------------------------------------
    def to_attrs(self) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> "Quantizer":  # pragma: no cover - abstract
        raise NotImplementedError

    # -- parameters ----------------------------------------------------------
    def weight_params(self, w: np.ndarray, out_axis: int, in_axis: int, method: str = "minmax",
                      start: str = "paper") -> tuple[dict[str, np.ndarray], int | None]:
        """Parameters for a constant weight and the axis they run along (None: per tensor).
        ``start`` is where a learned step starts: ``paper`` (the estimator's own rule, LSQ's
        2 mean|w| / sqrt(Qp)) or ``calib`` (``method``'s range, like a fixed scale); schemes
        without a learned step ignore it."""
        raise GraphOptError(f"the {self.scheme} scheme does not quantize weights")

    def act_params(self, lo: float, hi: float) -> dict[str, np.ndarray]:
        """Per-tensor parameters for an activation observed in [lo, hi]."""
        raise GraphOptError(f"the {self.scheme} scheme does not quantize activations")

    # -- maths ---------------------------------------------------------------
    def apply_np(self, x: np.ndarray, params: dict[str, np.ndarray], axis: int | None) -> np.ndarray:
        raise NotImplementedError  # pragma: no cover - abstract

    def torch_function(self, axis: int | None) -> tuple[Callable, tuple]:
        """``(fn, static)``: the torch back end emits ``fn(x, *params, *static)``. ``fn`` is a
        module-level function (fx generated code calls it by name)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def trainable(self, param: str) -> bool:
        """Whether the torch back end makes ``param`` an ``nn.Parameter``."""
        return False

    def rescaled(self, params: dict[str, np.ndarray], g: np.ndarray, axis: int | None
                 ) -> dict[str, np.ndarray] | None:
        """The parameters for the weight scaled by ``g`` (> 0, one factor per slice along
        ``axis``), such that the quantized weight scales by exactly ``g``; None when the scheme
        cannot follow a per-channel rescaling (per-tensor parameters, or no ``scale_params``).
        Re-folding BatchNorm after batch-statistics training uses it; the caller checks the
        result numerically (a scheme whose maths is not scale-equivariant fails that check)."""
        if axis is None or not self.scale_params:
            return None
        g = np.asarray(g, np.float64)
        out = dict(params)
        for name in self.scale_params:
            p = np.asarray(params[name])
            if p.ndim == 0 or p.shape[0] != g.size:  # a per-tensor parameter cannot follow per-channel factors
                return None
            out[name] = (p * g.reshape((-1,) + (1,) * (p.ndim - 1))).astype(p.dtype)
        return out

    # -- ONNX ----------------------------------------------------------------
    def kernel_bits(self, kind: str = "weight") -> int | None:
        """Bit width of the integer container an ONNX integer kernel reads for a ``kind``
        tensor (8 for a 4-bit weight held in int8), or None when the scheme has no integer form
        (it is then simulated in float)."""
        return None

    def true_bits(self) -> float:
        """Bits of information per value (what the report and the size tables count)."""
        return float(getattr(self, "bits", 32))

    def integer_step(self, params: dict[str, np.ndarray]) -> tuple[np.ndarray | None, str]:
        """The per-channel step of the integer grid a lowered weight sits on (an int32 bias
        then has scale input step x this), or (None, why there is none)."""
        return None, f"the {self.scheme} scheme has no integer grid"

    def effective_params(self, w: np.ndarray, params: dict[str, np.ndarray], axis) -> dict[str, np.ndarray]:
        """The parameters constant weights ``w`` are quantized with: the stored ones, unless the
        scheme derives its own from the weights (binary and ternary do, as in training)."""
        return params

    def with_bits(self, bits: int) -> "Quantizer":
        """The same scheme at another bit width (``override``, ``first_last_bits``)."""
        raise GraphOptError(f"the {self.scheme} scheme has no bit width to override")

    def at_bits(self, bits: int) -> "Quantizer":
        """``with_bits`` checked against the scheme's widths: the one-line refusal a width scan
        (choose-bits, ``graphopt analyze bits``) gives for a width the scheme does not have."""
        lo, hi = self.bit_range
        if self.fixed_bits or not lo <= bits <= hi:
            raise GraphOptError(f"the {self.scheme} weight scheme has no {bits}-bit form")
        try:
            return self.with_bits(bits)
        except GraphOptError:
            raise GraphOptError(f"the {self.scheme} weight scheme has no {bits}-bit form") from None

    def layer_at_bits(self, bits: int) -> "Quantizer":
        """The weight quantizer of one layer given other bits (``override``, ``first_last_bits``):
        by default uniform int<bits> per channel (an 8-bit first layer of a power-of-two model is
        an int8 layer); uniform keeps its own spec at those bits."""
        return parse(f"int{int(bits)}:channel", "weights")

    def for_training(self, qat: str, kind: str) -> "Quantizer":
        """This spec with the ``quantize{qat=...}`` estimator applied to a ``kind`` ('weight' or
        'act') tensor (an estimator named in the spec itself wins). Default: unchanged."""
        return self

    def for_range(self, lo: float, hi: float) -> "Quantizer":
        """The activation spec for a tensor observed in [lo, hi] (an estimator that assumes a
        non-negative tensor falls back on a signed one). Default: unchanged."""
        return self

    def with_learned_scales(self) -> "Quantizer":
        """This spec with its scale trained (``quantize{learn_scales=true}``)."""
        raise GraphOptError(f"learn_scales applies to uniform weights, not {self.scheme}")

    def check_integer_weights(self) -> None:
        """Refuse a weight spec that integer kernels cannot take (zero point must be 0)."""

    def check_dynamic_weights(self, text: str) -> None:
        """Refuse a weight spec that acts=dynamic's MatMulInteger cannot take."""
        raise GraphOptError(f"acts=dynamic runs on MatMulInteger, which takes symmetric int8 weights per tensor or "
                            f"per channel, not '{text}'")

    def gptq_rounding(self, params: dict[str, np.ndarray], axis: int | None, shape: tuple[int, int]) -> Callable:
        """GPTQ's rounding onto this scheme's grid: a function of one column of the
        ``[groups, rows]`` weight view (float64 torch) that returns it rounded. Only for
        ``elementwise`` schemes."""
        raise GraphOptError(f"weight_method=gptq rounds one weight at a time; the {self.scheme} scheme rounds "
                            "groups of weights together: use minmax or mse")

    def lower(self, graph, node, fmt: str) -> Lowered:  # pragma: no cover - abstract
        """Replace ``node`` in ``graph`` by standard ONNX ops (``fmt`` is ``qdq``, ``qoperator``
        or ``float``; QOperator fusion runs afterwards on the Q/DQ form)."""
        raise NotImplementedError

    # -- report --------------------------------------------------------------
    def describe(self) -> str:
        return str(self)


def register(cls: type[Quantizer]) -> type[Quantizer]:
    """Class decorator: make a scheme available by ``cls.scheme`` and its spec keywords."""
    if not dataclasses.is_dataclass(cls) or not cls.scheme:
        raise TypeError(f"quantizer {cls.__name__} must be a dataclass with a scheme name")
    if cls.scheme in _SCHEMES and _SCHEMES[cls.scheme] is not cls:
        raise ValueError(f"quantizer scheme '{cls.scheme}' is already registered by {_SCHEMES[cls.scheme].__name__}")
    _SCHEMES[cls.scheme] = cls
    for k in cls.keywords or (cls.scheme,):
        _KEYWORDS[k] = cls
    return cls


def schemes() -> dict[str, type[Quantizer]]:
    return dict(sorted(_SCHEMES.items()))


def get(name: str) -> type[Quantizer]:
    if name not in _SCHEMES:
        near = difflib.get_close_matches(name, list(_SCHEMES), n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else f" (known: {', '.join(sorted(_SCHEMES))})"
        raise GraphOptError(f"unknown quantizer scheme '{name}'{hint}")
    return _SCHEMES[name]


def parse_tokens(text: str, what: str, scheme: str, keywords: tuple[str, ...], *,
                 words: dict[str, tuple[str, Any]] | None = None, numbers: dict[str, str] | None = None,
                 granularities: tuple[str, ...] = ("tensor", "channel"), fixed_bits: bool = False,
                 default_bits: int | None = None, bit_range: tuple[int, int] = (1, 16),
                 special: Callable[[str], tuple[str, Any] | None] | None = None) -> tuple[str, dict[str, Any]]:
    """The one spec grammar: ``<keyword>[<bits>][:<token>]...``. A token is a granularity
    (``tensor``, ``channel``), one of the scheme's ``words`` (token -> (field, value)), a
    ``<prefix><int>`` of its ``numbers`` (prefix -> field; ``b<N>`` is the bit width unless
    ``fixed_bits``), or what ``special`` recognises. Tokens may come in any order, each field at
    most once. Returns (the keyword, {field: value}) with ``bits`` checked against ``bit_range``
    (``default_bits`` when the spec gives none; None: the spec must give it). Every refusal is
    one line naming the spec."""
    words, numbers = words or {}, numbers or {}
    parts = str(text).strip().lower().split(":")
    head = parts[0]
    kw = next((k for k in sorted(keywords, key=len, reverse=True) if head.startswith(k)), None)
    if kw is None:
        raise GraphOptError(f"bad {what} spec '{text}': expected {' or '.join(keywords)} first")
    digits = head[len(kw):]
    values: dict[str, Any] = {}
    if digits:
        if not digits.isdigit() or fixed_bits:
            raise GraphOptError(f"bad {what} spec '{text}': {scheme} takes no bit count after its name"
                                if fixed_bits else f"bad {what} spec '{text}': '{digits}' is not a bit count")
        values["bits"] = int(digits)
    prefixes = dict(numbers) if fixed_bits else {"b": "bits", **numbers}
    seen: set[str] = set()
    for tok in parts[1:]:
        if not tok:
            raise GraphOptError(f"bad {what} spec '{text}': empty option")
        field = None
        hit = special(tok) if special is not None else None
        if hit is not None:
            field, val = hit
        elif tok in granularities:
            field, val = "granularity", tok
        elif tok in words:
            field, val = words[tok]
        else:
            m = re.fullmatch(r"([a-z]+)(\d+)", tok)
            if m and m.group(1) in prefixes:
                field, val = prefixes[m.group(1)], int(m.group(2))
        if field is None:
            opts = sorted(set(granularities) | set(words) | {f"{p}<N>" for p in prefixes})
            raise GraphOptError(f"bad {what} spec '{text}': unknown option '{tok}' for {scheme} "
                                f"(options: {', '.join(opts)})")
        if field in seen or (field == "bits" and digits):
            raise GraphOptError(f"bad {what} spec '{text}': '{field}' given twice")
        seen.add(field)
        values[field] = val
    if "bits" not in values:
        if default_bits is None:
            raise GraphOptError(f"bad {what} spec '{text}': {scheme} needs a bit count, e.g. {keywords[0]}8")
        values["bits"] = default_bits
    lo, hi = bit_range
    if not lo <= values["bits"] <= hi:
        raise GraphOptError(f"bad {what} spec '{text}': {scheme} takes {lo}..{hi} bits, not {values['bits']}")
    return kw, values


def parse(text: str, what: str = "weights") -> Quantizer:
    """A spec string (``int8:channel``, ``uint8:tensor``, ...) -> a quantizer. The scheme is
    chosen by the spec's first word, without its digits (``int8`` -> ``int`` -> uniform)."""
    head = str(text).strip().lower().split(":", 1)[0]
    word = head.rstrip("0123456789")
    cls = _KEYWORDS.get(head) or _KEYWORDS.get(word)  # "pow2" is a name; "int8" is "int" + 8
    if cls is None:
        known = sorted(_KEYWORDS)
        near = difflib.get_close_matches(word, known, n=1)
        hint = f"did you mean '{near[0]}'?" if near else f"known: {', '.join(known)}"
        raise GraphOptError(f"bad {what} spec '{text}': unknown quantizer '{word or head}' ({hint})")
    return cls.parse(text, what)


def apply(spec: str, array, axis: int | None = None, method: str = "minmax") -> np.ndarray:
    """Quantize-dequantize ``array`` with the weight spec ``spec`` and return the float32
    result: what the scheme does to these numbers. ``axis`` is the channel axis for a
    ``:channel`` spec (per-tensor specs ignore it); ``method`` is ``minmax`` or ``mse``.

    >>> apply("pow2:b3:tensor", np.array([0.3, -1.0, 0.05]))
    array([ 0.25, -1.  ,  0.  ], dtype=float32)
    """
    q = parse(spec, "weights")
    a = np.asarray(array, np.float32)
    if a.ndim == 0:
        a = a.reshape(1)
    if getattr(q, "granularity", "tensor") != "tensor":
        if axis is None:
            raise GraphOptError(f"spec '{spec}' is per {q.granularity}: give the channel axis (axis=0 for a "
                                "Conv or Gemm weight)")
        if not -a.ndim <= axis < a.ndim:
            raise GraphOptError(f"axis {axis} is out of range for an array of rank {a.ndim}")
        axis %= a.ndim
    out_axis = 0 if axis is None else axis
    in_axis = (1 if a.ndim > 1 else 0) if out_axis == 0 else 0
    params, used = q.weight_params(a, out_axis, in_axis, method)
    return q.apply_np(a, params, used).reshape(np.shape(array))


# ------------------------------------------------------------------ FakeQuant nodes
def is_fake_quant(n) -> bool:
    return n is not None and n.domain == DOMAIN and n.op_type == FAKE_QUANT


def from_node(n) -> Quantizer:
    """The quantizer a FakeQuant node carries."""
    if not is_fake_quant(n):
        raise GraphOptError(f"node '{n.name}' ({n.op_type}) is not a FakeQuant")
    return get(n.attr("scheme", "uniform")).from_attrs(n.attrs)


def params_of(graph, n) -> dict[str, np.ndarray]:
    """The constant parameters of a FakeQuant node, by the scheme's parameter names."""
    q = from_node(n)
    out = {}
    for i, name in enumerate(q.param_names, start=1):
        v = graph.const_value(n.inputs[i]) if i < len(n.inputs) else None
        if v is None:
            raise GraphOptError(f"FakeQuant '{n.name}': parameter '{name}' is not a constant")
        out[name] = np.asarray(v)
    return out


def apply_node(graph, n, x: np.ndarray) -> np.ndarray:
    """The FakeQuant ``n`` applied to the array ``x`` (numpy)."""
    return from_node(n).apply_np(x, params_of(graph, n), n.attr("axis"))


def add_fake_quant(graph, v, quantizer: Quantizer, params: dict[str, np.ndarray], kind: str,
                   axis: int | None = None, source: str | None = None, consumers=None):
    """Insert ``FakeQuant(v, *params)`` after ``v``; its users (or only ``consumers``, a list of
    ``(node, input index)``) read the quantized value. A graph output keeps its name on the
    quantized value."""
    if kind not in KINDS:
        raise GraphOptError(f"FakeQuant kind must be one of {', '.join(KINDS)}, not '{kind}'")
    missing = [p for p in quantizer.param_names if p not in params]
    if missing:
        raise GraphOptError(f"{quantizer.scheme} FakeQuant needs parameters {missing}")
    graph.opset_imports.setdefault(DOMAIN, 1)
    base = v.name
    ins = [v] + [graph.add_const(np.asarray(params[p], np.float32), f"{base}_{p}") for p in quantizer.param_names]
    attrs = {"scheme": quantizer.scheme, "kind": kind, **quantizer.to_attrs()}
    if axis is not None:
        attrs["axis"] = int(axis)
    uses = list(v.uses) if consumers is None else consumers
    fq = graph.add_node(FAKE_QUANT, ins, [f"{base}_q"], attrs=attrs, domain=DOMAIN,
                        name=graph.unique_node_name(f"{base}_fq"),
                        source=source or (v.producer.source if v.producer else base))
    out = fq.outputs[0]
    out.dtype, out.shape = v.dtype, v.shape
    for node, i in uses:
        if i >= 0:
            graph.set_input(node, i, out)
    if v.is_graph_output and consumers is None:
        name = v.name
        graph.outputs = [out if o is v else o for o in graph.outputs]
        graph.rename_value(v, graph.unique_name(name + "_float"))
        graph.rename_value(out, name)
    return fq


def weight_step(graph, w_fq) -> tuple[np.ndarray | None, str]:
    """The per-channel step of the int8 grid weight quantizer ``w_fq``'s lowered codes sit on,
    from the parameters the weights are quantized with now (``effective_params``: binary and
    ternary scales follow the trained weights, not the stored start), or (None, why not)."""
    q = from_node(w_fq)
    params, w = params_of(graph, w_fq), graph.const_value(w_fq.inputs[0])
    if w is not None:
        params = q.effective_params(np.asarray(w, np.float32), params, w_fq.attr("axis"))
    return q.integer_step(params)


def bias_scale(graph, layer) -> np.ndarray | None:
    """The int32 bias step of a Conv/Gemm whose input and weight are quantized: input step x
    weight step (per output channel), the only scale an integer kernel's accumulator has.
    None when the layer has no such pair."""
    x_fq, w_fq = layer.inputs[0].producer, layer.inputs[1].producer
    if not (is_fake_quant(x_fq) and is_fake_quant(w_fq)):
        return None
    sx, _ = from_node(x_fq).integer_step(params_of(graph, x_fq))
    sw, _ = weight_step(graph, w_fq)
    if sx is None or sw is None or np.size(sx) != 1:
        return None
    return (np.asarray(sw, np.float32).reshape(-1) * np.float32(np.asarray(sx).reshape(()))).astype(np.float32)


def refresh_bias_scales(graph) -> int:
    """Set every int32 bias quantizer's scale to its layer's current input step x weight step.
    Training moves learned steps (LSQ, PACT); the bias grid must follow them, or the integer
    kernel, which derives it from the two steps, would read the codes on another scale.
    A scale constant that only its quantizer reads is updated in place: its name is the torch
    module's buffer name, which a training checkpoint written after a refresh (the BN phase's
    end) must share with the module a resumed run builds."""
    changed = 0
    for n in list(graph.nodes):
        if not is_fake_quant(n) or n.attr("kind") != "bias":
            continue
        for layer, i in n.outputs[0].uses:
            if i != 2:
                continue
            s = bias_scale(graph, layer)
            old = np.asarray(graph.const_value(n.inputs[1]), np.float32)
            if s is None or s.size not in (1, old.size) or np.array_equal(s.reshape(old.shape) if s.size == old.size
                                                                         else s, old):
                continue
            new = s.reshape(old.shape) if s.size == old.size else s.reshape(())
            sv = n.inputs[1]
            if sv.const is not None and len(sv.uses) == 1:
                graph.set_const(sv, new)
            else:
                graph.set_input(n, 1, graph.add_const(new, f"{n.name}_scale"))
            changed += 1
    return changed
