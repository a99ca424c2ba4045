"""Post-training quantization: the ``quantize`` pass (calibration + FakeQuant insertion) and
``correct-bias`` (DFQ 4.2 bias correction)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np

from graphopt.errors import GraphOptError
from graphopt.geometry import geometry, window
from graphopt.ir import Graph, Node, Value
from graphopt.meta import BIAS_BEFORE_CORRECTION, BN_STATS, CHOSEN_BITS, FLOAT_WEIGHT
from graphopt.passmanager import Context, Pass, PassResult, option, register_pass
from graphopt.quantizers import (
    add_fake_quant,
    apply_node,
    bias_quantizer,
    from_node,
    is_fake_quant,
    params_of,
    parse,
    range_from_histogram,
    weight_step,
)

from . import _layers as L
from .bits import COMPUTE_OPS, quantizable_layers  # the one definition of a quantizable layer

log = logging.getLogger("graphopt.passes.quantize")

# ops whose float inputs are quantized, so onnxruntime can run them on integers
ACT_OPS = ("Conv", "Gemm", "MatMul", "Add", "Concat", "GlobalAveragePool", "AveragePool", "MaxPool")
FUSED_ACTS = ("Relu", "Clip")
# ops that move quantized data without computing on it (onnxruntime runs them on int8 tensors)
DATA_MOVEMENT = ("Pad", "Slice", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity")
# element-wise ops of one activation that keep a tensor on a quantized grid's scale of values
# (onnxruntime has QLinear/QDQ forms for them): their output counts as written by an integer kernel
UNARY_ACTS = ("Relu", "Clip", "Min", "Max", "Sigmoid", "HardSigmoid", "HardSwish", "LeakyRelu", "Tanh")
FLOAT_TYPES = (1,)  # FLOAT


def _gptq_weights(n: Node, w: np.ndarray, H: np.ndarray, params: dict, axis, spec) -> np.ndarray:
    """GPTQ-rounded weights (on ``spec``'s grid with ``params``), in ``w``'s layout."""
    from graphopt.quantizers.gptq import gptq

    geo = geometry(n)
    rows = geo.grouped_rows(w)
    G, R, _ = rows.shape
    rnd = spec.gptq_rounding(params, axis, (G, R))
    q = gptq(rows, H, rnd).astype(np.float32)
    return geo.from_out_view(q.reshape(G * R, -1), w.shape)


@register_pass("quantize")
@dataclass(kw_only=True)
class Quantize(Pass):
    """Calibrate and insert FakeQuant nodes for integer inference (needs calibration data).

    Weights of Conv/Gemm/MatMul are quantized symmetrically (zero point 0, onnxruntime's fast
    path). The granularity is per tensor, per output channel, or per block along the input
    axis. Activations are quantized per tensor, placed where integer kernels fuse them. The
    inputs and output of Add/Concat/pooling are quantized, and so is the input of each
    Conv/Gemm/MatMul. So is each Conv/Gemm/MatMul output, after its ReLU/Clip, never between. Concat inputs share one scale. A value that
    stays float gets no FakeQuant. Biases become int32 with scale = input scale x weight scale.
    A per-channel ``Min`` bound left by ``equalize`` that the calibration data never reaches is
    dropped (exact on that data), so the Conv before it can fuse; so is one whose every bound is
    at or above its output quantizer's top value (the quantizer saturates first: exact). Each
    ``Min`` kept is listed in ``bounds_kept`` with the reason."""

    weights: str = option("int8:channel", "weight spec: int<bits>:tensor|channel|block<size>, or a zoo scheme "
                                          "(pow2, apot, term, pwlq, binary, ternary; see docs/quantizers.md)")
    acts: str = option("uint8:tensor", "activation spec: (u)int<bits>[:tensor][:sym|asym] (uint = asymmetric), "
                                       "dynamic (quantized at run time), or float (weight-only: activations and "
                                       "biases stay float, no calibration unless GPTQ)")
    act_method: Literal["minmax", "percentile", "mse", "entropy"] = option(
        "minmax", "activation range from calibration (entropy: KL-optimal clip, as TensorRT/onnxruntime)")
    percentile: float = option(99.99, "for act_method=percentile", minimum=50.0, maximum=100.0)
    weight_method: Literal["minmax", "mse", "gptq"] = option(
        "minmax", "weights: min-max range, MSE-optimal clipping, or GPTQ (MSE clipping + Hessian-aware rounding "
                  "from the calibration data)")
    skip: list[str] = option([], "node name/source patterns (fnmatch) to leave in float")
    override: list[str] = option([], "PATTERN=BITS: other weight bits for matching layers (uniform int<BITS> "
                                     "when the weight scheme is not uniform, k-means at BITS for kmeans)")
    first_bits: Optional[int] = option(None, "weight bits for the first compute layer (over first_last_bits)",
                                       minimum=2, maximum=16)
    last_bits: Optional[int] = option(None, "weight bits for the last compute layer (over first_last_bits)",
                                      minimum=2, maximum=16)
    first_last_bits: Optional[int] = option(None, "weight bits for the first and last compute layers", minimum=2,
                                            maximum=16)
    first_last_act_bits: Optional[int] = option(
        None, "activation bits for the inputs of the first and last compute layers and the graph outputs "
              "(binary and 2-bit networks keep these wider, as IR-Net and PACT do)", minimum=1, maximum=16)
    drop_inactive_bounds: bool = option(True, "remove per-channel Min bounds the calibration data never reaches")
    act_outputs: bool = option(True, "also quantize each layer's output (QLinear kernels chain); false: only layer "
                                     "inputs, outputs stay float (transformers: MatMulIntegerToFloat, no per-tensor grid "
                                     "on the residual stream)")
    batch_size: int = option(32, "calibration batch size", minimum=1)
    qat: Literal["none", "ste", "lsq", "pact", "dorefa"] = option(
        "none", "prepare for quantization-aware training (a finetune step follows): ste = fixed scales, "
                "straight-through; lsq = learned steps (weights and activations); pact = learned activation clips "
                "(weights: lsq); dorefa = DoReFa weights (dorefa<bits>) and activations x/alpha clipped to [0, 1] "
                "(alpha: the calibrated max). See docs/qat.md")
    weight_init: Literal["paper", "calib"] = option(
        "paper", "where learned weight steps (lsq) start: paper = 2 mean|w| / sqrt(Qp) (Esser et al.); calib = the "
                 "weight_method range (minmax, mse, or gptq's with its rounded weights), where fixed scales start. "
                 "paper clips heavy-tailed rows (depthwise kernels) hard")
    act_init: Literal["paper", "calib"] = option(
        "paper", "where learned activation steps (lsq, pact on signed tensors) start: paper = 2 mean|x| / sqrt(Qp) "
                 "(Esser et al.); calib = the calibrated range (act_method), where fixed scales start")
    grad_bits: Optional[int] = option(None, "DoReFa gradient quantization: quantize the gradient at every layer "
                                            "output to this many bits in training (dropped on export)",
                                      minimum=2, maximum=16)
    embeddings: bool | str = option(False, "also quantize the constant tables of Gather nodes (embeddings): true = "
                                           "int8 per row (a 4x smaller table), or a weight spec such as int4:block32 "
                                           "(blocks along the row; GatherBlockQuantized with --format qoperator)")
    learn_scales: bool = option(False, "mark weight and activation scales learnable: the torch back end makes them "
                                       "parameters with true gradients (a start for QAT)")

    def _overrides(self) -> dict[str, int]:
        """``override`` as {pattern: weight bits}."""
        out = {}
        for item in self.override:
            pat, _, bits = item.rpartition("=")
            if not pat or not bits.isdigit() or not 2 <= int(bits) <= 16:
                raise GraphOptError(f"bad override '{item}': expected PATTERN=BITS with BITS in 2..16")
            out[pat] = int(bits)
        return out

    def _qat_specs(self, wspec, aspec):
        """The specs with the ``qat`` estimator applied (an estimator named in a spec wins)."""
        return wspec.for_training(self.qat, "weight"), aspec.for_training(self.qat, "act")

    def planned_quantizers(self) -> list[tuple[str, object]]:
        """(what, quantizer) for every spec this pass will use, known before it runs (for a CLI
        that checks the output format before doing any work)."""
        w = parse(self.weights, "weights")
        a = None if self._weight_only else parse(self.acts, "acts")
        out = [("weights", w, "weight")] + ([] if a is None else [("activations", a, "act")])
        out += [(f"weights of '{pat}'", w.layer_at_bits(bits), "weight") for pat, bits in self._overrides().items()]
        if self.first_last_act_bits and a is not None:
            out.append(("first/last layer activations", a.with_bits(self.first_last_act_bits), "act"))
        for what, bits in (("first layer weights", self.first_bits or self.first_last_bits),
                           ("last layer weights", self.last_bits or self.first_last_bits)):
            if bits:
                out.append((what, w.layer_at_bits(bits), "weight"))
        return out

    def requires(self, graph: Graph) -> None:
        from graphopt.errors import PreconditionError

        if any(is_fake_quant(n) for n in graph.nodes):
            raise PreconditionError("the graph is already quantized (it has FakeQuant nodes)")

    @property
    def _weight_only(self) -> bool:
        return str(self.acts).strip().lower() == "float"

    def run(self, graph: Graph, ctx: Context) -> PassResult:
        wspec = parse(self.weights, "weights")
        if self._weight_only:
            return self._run_weight_only(graph, ctx, wspec)
        aspec = parse(self.acts, "acts")
        if aspec.dynamic:
            return self._run_dynamic(graph, ctx, wspec, aspec)
        if not aspec.for_activations:
            raise GraphOptError(f"bad acts spec '{self.acts}': the {aspec.scheme} scheme quantizes weights only; "
                                "activations take int<bits>/uint<bits>")
        wspec, aspec = self._qat_specs(wspec, aspec)
        if self.learn_scales:
            wspec, aspec = wspec.with_learned_scales(), aspec.with_learned_scales()
        if aspec.granularity != "tensor":
            raise GraphOptError(f"acts must be per tensor (got {aspec.granularity}): integer kernels take one "
                                "activation scale")
        wspec.check_integer_weights()
        if self.weight_method == "gptq" and not wspec.elementwise:
            wspec.gptq_rounding({}, None, (1, 1))  # refuses, saying why
        overrides = self._overrides()
        if ctx.calib is None:
            raise GraphOptError("quantize needs calibration data (--calib FILE.npy or an image folder)")

        graph.toposort()
        compute = quantizable_layers(graph, self.skip)
        skipped, float_layers = self._left_float(graph, compute)
        float_biases: dict[str, str] = {}
        targets = self._activation_targets(graph, compute)
        mins = [n for n in graph.nodes if n.op_type == "Min" and L.per_channel_min_bound(graph, n) is not None] \
            if self.drop_inactive_bounds else []

        from graphopt.training.calibration import AbsMean, CalibrationData, Histogram, MinMax, observe

        data = ctx.calib if isinstance(ctx.calib, CalibrationData) else CalibrationData(ctx.calib,
                                                                                        batch_size=self.batch_size)
        # learned activation steps (LSQ; PACT falls back to LSQ on signed tensors) start at the paper's
        # 2 mean|x| / sqrt(Qp), which needs mean|x|; act_init=calib starts them at the calibrated range instead
        paper_start = aspec.estimator in ("lsq", "pact") and self.act_init == "paper"
        obs: dict[str, list] = {v.name: [MinMax()] + ([AbsMean()] if paper_start else []) for v in targets}
        for m in mins:
            obs.setdefault(m.inputs[0].name, []).append(MinMax(axis=1))
        hessians = _hessian_observers(compute, obs) if self.weight_method == "gptq" else {}
        first = observe(graph, data, obs, progress=ctx.show_progress, desc="calibrating (ranges)")
        ranges = {v.name: (float(first[v.name][0]["min"][0]), float(first[v.name][0]["max"][0])) for v in targets}
        abs_means = {v.name: first[v.name][1]["abs_mean"] for v in targets} if paper_start else {}

        dropped = 0
        for m in mins:
            res = first[m.inputs[0].name][-1]
            bound = np.asarray(L.per_channel_min_bound(graph, m)).reshape(-1)
            if bound.size in (1, res["max"].size) and np.all(res["max"] <= bound):
                # inactive on the data: its input equals its output there, so ranges carry over
                if m.outputs[0].name in ranges and m.inputs[0].name not in ranges:
                    ranges[m.inputs[0].name] = ranges[m.outputs[0].name]
                graph.replace_all_uses(m.outputs[0], m.inputs[0])
                graph.remove_node(m)
                dropped += 1
        if dropped:
            targets = self._activation_targets(graph, compute)

        if self.act_method != "minmax":
            hist = observe(graph, data, {v.name: Histogram(*ranges[v.name]) for v in targets},
                           progress=ctx.show_progress, desc=f"calibrating ({self.act_method})")
            ranges = {k: range_from_histogram(h["counts"], h["lo"], h["hi"], aspec, self.act_method, self.percentile)
                      for k, h in hist.items()}
        self._share_concat_ranges(graph, ranges)
        bounds_kept: dict[str, str] = {}
        implied = 0
        for m in mins:
            if m not in graph.nodes:
                continue
            out = m.outputs[0].name
            bound = np.asarray(L.per_channel_min_bound(graph, m)).reshape(-1)
            res = first[m.inputs[0].name][-1]
            reached = int(np.sum(res["max"] > bound)) if bound.size in (1, res["max"].size) else -1
            if out in ranges and m.outputs[0] in targets:
                lo, hi = ranges[out]
                spec = aspec.for_range(lo, hi)
                big = 4.0 * max(abs(lo), abs(hi), float(np.max(bound))) + 1.0  # far above the range: saturates
                top = float(spec.apply_np(np.array([big]), spec.act_params(lo, hi), None)[0])
                if np.all(bound >= top):
                    # the quantizer of its output saturates at or below every bound: Q(min(x, b)) = Q(x)
                    ranges[m.inputs[0].name] = ranges[out]
                    graph.replace_all_uses(m.outputs[0], m.inputs[0])
                    graph.remove_node(m)
                    implied += 1
                    continue
            quantized = out in ranges and m.outputs[0] in targets
            bounds_kept[m.source] = (f"per-channel bound active on the calibration data ({reached} of {bound.size} "
                                     "channels reach it)" + (" and below its output quantizer's top value"
                                                             if quantized else ", its output not quantized")
                                     + ": onnxruntime runs the Min in float")
        if implied:
            targets = self._activation_targets(graph, compute)

        act_fq: dict[str, Node] = {}
        edge_acts = ({compute[0].inputs[0], compute[-1].inputs[0], *graph.outputs}
                     if self.first_last_act_bits and compute else set())
        for v in targets:
            lo, hi = ranges[v.name]
            spec = (aspec.with_bits(self.first_last_act_bits) if v in edge_acts else aspec).for_range(lo, hi)
            act_fq[v.name] = add_fake_quant(graph, v, spec, spec.act_params(lo, hi, abs_means.get(v.name)), "act")
        n_w = 0
        edge_bits: dict = {}
        if compute:
            for n, b in ((compute[-1], self.last_bits or self.first_last_bits),
                         (compute[0], self.first_bits or self.first_last_bits)):
                if b:
                    edge_bits[n] = b
        layers = ctx.progress(compute, total=len(compute), desc="GPTQ rounding") if self.weight_method == "gptq" \
            else compute
        for n in layers:
            spec = self._layer_spec(n, wspec, overrides, edge_bits)
            h = hessians.get(n)
            self._quantize_weights(graph, n, spec, self.weight_method, None if h is None else h.result())
            why = self._quantize_bias(graph, n)
            if why:
                float_biases[n.source] = why
            n_w += 1
        if self.grad_bits:
            from graphopt.training.gradquant import add_grad_quant

            for n in compute:
                add_grad_quant(graph, n.outputs[0], self.grad_bits, source=n.source)
        tables = self._quantize_tables(graph) if self.embeddings else 0
        changed = n_w > 0 or len(targets) > 0 or dropped > 0 or tables > 0 or implied > 0
        return PassResult(graph, changed, {"weights": n_w, "tables": tables, "activations": len(targets),
                                        "bounds_dropped": dropped, "bounds_implied": implied,
                                        "bounds_kept": bounds_kept,
                                        "skipped": skipped, "float_layers": float_layers,
                                        "float_biases": float_biases, "weight_spec": str(wspec),
                                        "act_spec": str(aspec)})

    def _left_float(self, graph: Graph, compute: list[Node], by_op: dict[str, str] | None = None):
        """(layers that match ``skip``, {source: why} for every compute layer not in ``compute``);
        ``by_op``: a reason for whole op types this placement leaves float."""
        skipped = [n.source for n in graph.nodes if n.op_type in COMPUTE_OPS and L.matches(n, self.skip)]
        def why(n: Node) -> str:
            if L.matches(n, self.skip):
                return "matches skip"
            return (by_op or {}).get(n.op_type) or _not_quantizable(graph, n)

        return skipped, {n.source: why(n) for n in graph.nodes
                         if n.op_type in COMPUTE_OPS and n.domain == "" and n not in compute}

    def _layer_spec(self, n: Node, wspec, overrides: dict[str, int], edge_bits: dict):
        """The weight spec of layer ``n``: an ``override``, else choose-bits' allocation, else the
        first/last layer widths, else ``wspec``."""
        bits = next((b for p, b in overrides.items() if L.matches(n, [p])), None)
        if bits is None:
            bits = n.meta.get(CHOSEN_BITS, edge_bits.get(n))
        return wspec if bits is None else wspec.layer_at_bits(bits)

    def _run_weight_only(self, graph: Graph, ctx: Context, wspec) -> PassResult:
        """``acts=float``: every Conv/Gemm/MatMul weight quantized, activations and biases left
        float (weight sharing, weight-only int4). No calibration data unless GPTQ."""
        if self.first_last_act_bits or self.learn_scales:
            raise GraphOptError("acts=float quantizes weights only: first_last_act_bits and learn_scales do not apply")
        wspec = wspec.for_training(self.qat, "weight")
        if self.weight_method == "gptq" and not wspec.elementwise:
            wspec.gptq_rounding({}, None, (1, 1))  # refuses, saying why
        if self.weight_method == "gptq" and ctx.calib is None:
            raise GraphOptError("weight_method=gptq needs calibration data (--calib), even with acts=float")
        graph.toposort()
        compute = quantizable_layers(graph, self.skip)
        skipped, float_layers = self._left_float(graph, compute)
        hessians = self._gptq_hessians(graph, compute, ctx)
        edge_bits = {}
        if compute:
            for n, b in ((compute[-1], self.last_bits or self.first_last_bits),
                         (compute[0], self.first_bits or self.first_last_bits)):
                if b:
                    edge_bits[n] = b
        overrides = self._overrides()
        for n in ctx.progress(compute, total=len(compute), desc="quantizing weights"):
            h = hessians.get(n)
            self._quantize_weights(graph, n, self._layer_spec(n, wspec, overrides, edge_bits), self.weight_method,
                                   None if h is None else h.result())
        tables = self._quantize_tables(graph) if self.embeddings else 0
        return PassResult(graph, bool(compute) or tables > 0,
                          {"weights": len(compute), "tables": tables, "activations": 0, "bounds_dropped": 0,
                           "skipped": skipped, "float_layers": float_layers,
                           "float_biases": {n.source: "acts=float: weight-only" for n in compute
                                            if len(n.inputs) > 2 and n.inputs[2] is not None},
                           "weight_spec": str(wspec), "act_spec": "float"})

    def _gptq_hessians(self, graph: Graph, compute: list[Node], ctx: Context) -> dict[Node, object]:
        """With ``weight_method=gptq``, each layer's input Hessian from one pass over the
        calibration data (else none)."""
        if self.weight_method != "gptq":
            return {}
        from graphopt.training.calibration import CalibrationData, observe

        data = ctx.calib if isinstance(ctx.calib, CalibrationData) else CalibrationData(
            ctx.calib, batch_size=self.batch_size)
        obs: dict[str, list] = {}
        hessians = _hessian_observers(compute, obs)
        observe(graph, data, obs, progress=ctx.show_progress, desc="calibrating (GPTQ)")
        return hessians

    def _run_dynamic(self, graph: Graph, ctx: Context, wspec, aspec) -> PassResult:
        """``acts=dynamic``: quantized weights, and each Gemm/MatMul input quantized at run time
        (onnxruntime's ``quantize_dynamic`` placement). Nothing else is quantized, biases stay
        float, and no calibration data is needed (GPTQ still needs it)."""
        if self.qat != "none" or self.learn_scales or self.grad_bits or self.first_last_act_bits:
            raise GraphOptError("acts=dynamic takes no qat, learn_scales, grad_bits or first_last_act_bits: its "
                                "ranges are measured at run time")
        wspec.check_dynamic_weights(self.weights)
        if self.weight_method == "gptq" and ctx.calib is None:
            raise GraphOptError("weight_method=gptq needs calibration data (--calib), even with acts=dynamic")
        graph.toposort()
        overrides = self._overrides()
        compute = [n for n in quantizable_layers(graph, self.skip) if n.op_type in ("Gemm", "MatMul")]
        skipped, float_layers = self._left_float(graph, compute, {"Conv": "acts=dynamic quantizes Gemm/MatMul only"})
        hessians = self._gptq_hessians(graph, compute, ctx)
        readers: dict[Value, list] = {}  # one quantizer per input value, shared by the layers reading it
        for n in compute:
            v = n.inputs[0]
            if v.dtype in (None, *FLOAT_TYPES) and graph.const_value(v) is None:
                readers.setdefault(v, []).append((n, 0))
        seen = {v.name: add_fake_quant(graph, v, aspec, {}, "act", consumers=uses) for v, uses in readers.items()}
        for n in compute:
            bits = next((b for p, b in overrides.items() if L.matches(n, [p])), n.meta.get(CHOSEN_BITS))
            spec = wspec if bits is None else wspec.layer_at_bits(bits)
            h = hessians.get(n)
            self._quantize_weights(graph, n, spec, self.weight_method, None if h is None else h.result())
        tables = self._quantize_tables(graph) if self.embeddings else 0
        changed = bool(compute) or tables > 0
        return PassResult(graph, changed, {"weights": len(compute), "tables": tables, "activations": len(seen),
                                        "bounds_dropped": 0,
                                        "skipped": skipped, "float_layers": float_layers,
                                        "float_biases": {}, "weight_spec": str(wspec), "act_spec": str(aspec)})

    # ---------------------------------------------------------------- placement
    def _activation_targets(self, graph: Graph, compute: list[Node]) -> list[Value]:
        """The activations to quantize: each compute layer's input and its output (after its
        fused ReLU/Clip, never between), and the inputs and output of an Add/Concat/pooling whose
        float inputs are all written by integer kernels (a layer, or another such op, through
        data-movement ops such as Pad/Slice/Reshape), so that its QLinear kernel chains with
        them. An Add with an operand computed in float stays float: a transformer's attention
        mask (-3.4e38) or a LayerNorm output in a residual stream with outlier channels would
        ruin a per-tensor grid."""
        skip = {n for n in graph.nodes if L.matches(n, self.skip)}
        chosen: dict[Value, None] = {}

        def want(v: Value | None) -> bool:
            if v is None or v.const is not None or graph.const_value(v) is not None:
                return False
            if v.dtype not in (None, *FLOAT_TYPES):
                return False
            chosen[v] = None
            return True

        def after_acts(v: Value) -> Value:
            while len(v.uses) == 1 and not v.is_graph_output:
                (u,) = v.users()
                if u.op_type not in FUSED_ACTS or u.domain != "" or u.inputs[0] is not v:
                    break
                if u.op_type == "Clip" and L.clip_bounds(graph, u) is None:
                    break
                v = u.outputs[0]
            return v

        produced: set[Value] = set()  # values an integer kernel writes (a QLinear op's output)
        for n in compute:
            want(n.inputs[0])
            out = after_acts(n.outputs[0])
            if self.act_outputs and want(out):
                produced.add(out)
        for n in graph.nodes:  # topological order: a chain of Adds is decided front to back
            if n.domain != "" or n in skip:
                continue
            one_input = len([v for v in n.inputs if v is not None and graph.const_value(v) is None]) == 1
            if (n.op_type in DATA_MOVEMENT or n.op_type in UNARY_ACTS) and one_input and n.inputs[0] in produced \
                    and len(n.outputs) == 1:
                produced.add(n.outputs[0])
            elif n.op_type in ACT_OPS and n.op_type not in COMPUTE_OPS:
                floats = [v for v in n.inputs if v is not None and v.const is None and graph.const_value(v) is None
                          and v.dtype in (None, *FLOAT_TYPES)]
                if floats and all(v in produced for v in floats):
                    for v in floats:
                        want(v)
                    out = after_acts(n.outputs[0])
                    if want(out):
                        produced.add(out)
        return list(chosen)

    @staticmethod
    def _share_concat_ranges(graph: Graph, ranges: dict[str, tuple[float, float]]) -> None:
        for n in graph.find_nodes("Concat"):
            names = [v.name for v in n.inputs if v is not None and v.name in ranges]
            if n.outputs[0].name in ranges:
                names.append(n.outputs[0].name)
            if len(names) > 1:
                lo = min(ranges[k][0] for k in names)
                hi = max(ranges[k][1] for k in names)
                for k in names:
                    ranges[k] = (lo, hi)

    def _quantize_weights(self, graph: Graph, n: Node, spec, method: str, hessian=None) -> None:
        w = L.weight(graph, n)
        geo = geometry(n)
        params, axis = spec.weight_params(w, geo.out_axis, geo.in_axis, "mse" if method == "gptq" else method,
                                          self.weight_init)
        if method == "gptq" and axis is not None and axis != geo.out_axis and spec.granularity != "block":
            raise GraphOptError("weight_method=gptq needs per-tensor, per-output-channel or block parameters")
        float_w = None
        if method == "gptq":
            float_w = w
            L.set_input_const(graph, n, 1, _gptq_weights(n, w, hessian, params, axis, spec))
        fq = add_fake_quant(graph, n.inputs[1], spec, params, "weight", axis, source=n.source, consumers=[(n, 1)])
        if float_w is not None:
            fq.meta[FLOAT_WEIGHT] = float_w  # what bias correction measures the error against

    def _quantize_tables(self, graph: Graph) -> int:
        """``embeddings=true``: each Gather that reads rows of a constant 2-D float table gets
        an int8 per-row weight quantizer on it (symmetric, one scale per row); ``embeddings=SPEC``
        that scheme instead (a block spec's blocks run along the row)."""
        spec = parse("int8:channel" if self.embeddings is True else self.embeddings, "embeddings")
        n_t = 0
        for n in list(graph.nodes):
            if n.op_type != "Gather" or n.domain != "" or n.attr("axis", 0) != 0 or L.matches(n, self.skip):
                continue
            table = graph.const_value(n.inputs[0])
            if table is None or np.asarray(table).ndim != 2 or np.asarray(table).dtype != np.float32:
                continue
            params, axis = spec.weight_params(np.asarray(table), 0, 1, "minmax")
            add_fake_quant(graph, n.inputs[0], spec, params, "weight", axis, source=n.source, consumers=[(n, 0)])
            n_t += 1
        return n_t

    @staticmethod
    def _quantize_bias(graph: Graph, n: Node) -> str | None:
        """int32 bias with scale = input scale x weight scale (per channel), zero point 0.
        Returns why the bias stays float, or None (no bias, or quantized)."""
        if n.op_type == "MatMul" or len(n.inputs) < 3 or n.inputs[2] is None:
            return None
        if graph.const_value(n.inputs[2]) is None:
            return "the bias is computed, not a constant"
        x_fq, w_fq = n.inputs[0].producer, n.inputs[1].producer
        if not is_fake_quant(x_fq):
            return "the layer's input is not quantized"
        if not is_fake_quant(w_fq):
            return "the layer's weight is not quantized"
        if w_fq.attr("block_size", 0):
            return "blocked weights have no per-channel scale for an int32 bias"
        if n.op_type == "Gemm" and (n.attr("alpha", 1.0) != 1.0 or n.attr("beta", 1.0) != 1.0):
            return "Gemm with alpha/beta != 1 scales its bias"
        b = np.asarray(graph.const_value(n.inputs[2]))
        sx = float(params_of(graph, x_fq)["scale"].reshape(()))
        wq = from_node(w_fq)
        step, why = weight_step(graph, w_fq)
        if step is None:
            return f"the weights have no integer grid ({why})"
        sw = np.asarray(step, np.float32)
        if b.ndim != 1 or (sw.size > 1 and sw.size != b.size):
            return f"bias of shape {list(b.shape)} is not one value per output channel"
        # A channel with tiny weights has a tiny weight scale; its bias may then not fit in int32.
        # Enlarge that channel's weight scale until it does (onnxruntime's quantizer does the same).
        limit = np.float64(2 ** 31 - 1) * 0.5
        need = np.abs(b.astype(np.float64)) / (np.float64(sx) * limit)
        if np.any(need > sw) and not wq.enlargeable_step:
            return "the bias does not fit int32 at the weight step"
        if np.any(need > sw):
            sw = np.maximum(sw.astype(np.float64), need).astype(np.float32)
            L.set_input_const(graph, w_fq, 1, sw.reshape(np.asarray(graph.const_value(w_fq.inputs[1])).shape))
        scale = (sw * np.float32(sx)).astype(np.float32)
        spec = bias_quantizer(sw.size > 1)
        add_fake_quant(graph, n.inputs[2], spec, {"scale": scale, "zero_point": np.zeros_like(scale)}, "bias",
                       0 if sw.size > 1 else None, source=n.source, consumers=[(n, 2)])
        return None


def _hessian_observers(compute: list[Node], obs: dict[str, list]) -> dict[Node, object]:
    """GPTQ's Hessian observer for each layer of ``compute``, also added to ``obs`` (value name ->
    observers), so one pass over the calibration data fills them beside what else it observes."""
    hessians = {n: _hessian_observer(n) for n in compute}
    for n, h in hessians.items():
        obs.setdefault(n.inputs[0].name, []).append(h)
    return hessians


def _hessian_observer(n: Node):
    """GPTQ's input Hessian observer for layer ``n`` (its im2col geometry)."""
    from graphopt.quantizers.gptq import HessianObserver

    if n.op_type != "Conv":
        return HessianObserver(n.op_type)
    win = window(n)
    return HessianObserver(n.op_type, list(win.kernel), list(win.strides), list(win.pads), list(win.dilations),
                           n.attr("group", 1))


def _not_quantizable(graph: Graph, n: Node) -> str:
    """Why a Conv/Gemm/MatMul is not a layer ``quantize`` can give integer weights."""
    w = graph.const_value(n.inputs[1]) if len(n.inputs) > 1 else None
    if w is None:
        return "its weight is computed, not a constant (e.g. a MatMul of two activations)"
    if not np.issubdtype(np.asarray(w).dtype, np.floating):
        return f"its weight is {np.asarray(w).dtype}, not float"
    if n.op_type == "Gemm" and n.attr("transA", 0):
        return "Gemm with transA"
    if len(n.inputs) > 2 and n.inputs[2] is not None and graph.const_value(n.inputs[2]) is None:
        return "its bias is computed, not a constant"
    return f"a {np.asarray(w).ndim}-D weight is not a {n.op_type} layer"


@register_pass("correct-bias")
@dataclass(kw_only=True)
class CorrectBias(Pass):
    """Bias correction (DFQ 4.2): remove the mean output shift that weight quantization causes.

    For each Conv/Gemm with quantized weights, the shift is E[(W_q - W) x] per output channel,
    and it is subtracted from the bias. ``empirical`` measures E[x], the per-channel mean of
    the layer's input in the float model, on the calibration data through the torch back end.
    That takes one pass for all layers, and it is exact for 1x1 convs and Gemm; at zero-padded
    borders of larger kernels it is approximate. ``analytical`` takes E[x] from the BatchNorm statistics that
    fold-bn recorded upstream: x = ReLU(y) with y ~ N(beta, gamma^2). ``auto`` uses analytical
    where BN statistics exist, and empirical elsewhere if data is given."""

    after = ("quantize",)  # it corrects the error of quantized weights

    mode: Literal["auto", "empirical", "analytical"] = option("auto", "where E[x] comes from")
    tol: float = option(1e-3, "leave a bias alone when its correction changes it by less than this, relative to "
                              "the bias magnitude (so a second run is a no-op)", minimum=0.0)

    def run(self, graph: Graph, ctx: Context) -> PassResult:
        layers = [n for n in graph.nodes if n.op_type in ("Conv", "Gemm") and len(n.inputs) > 1
                  and is_fake_quant(n.inputs[1].producer) and n.inputs[1].producer.attr("kind") == "weight"
                  and graph.const_value(n.inputs[1].producer.inputs[0]) is not None]
        if not layers:
            return PassResult(graph, False, {"corrected": 0, "reason": "no quantized Conv/Gemm weights"})
        means: dict[Node, np.ndarray] = {}
        reasons: dict[str, str] = {}
        need_data = []
        for n in layers:
            m = _analytical_mean(graph, n) if self.mode in ("auto", "analytical") else None
            if m is not None:
                means[n] = m
            elif self.mode == "analytical":
                reasons[n.source] = "no BN statistics upstream"
            elif ctx.calib is None:
                reasons[n.source] = "no BN statistics upstream and no calibration data"
            else:
                need_data.append(n)
        if need_data:
            from graphopt.training.calibration import Moments, observe

            # E[x] of the *float* model: the correction then depends only on W, W_q and float
            # activations, never on earlier corrections, so running the pass twice changes nothing.
            fgraph, names = float_view(graph, [n.inputs[0] for n in need_data])
            axis = {n: (1 if n.op_type == "Conv" else -1) for n in need_data}
            res = observe(fgraph, ctx.calib, {names[i]: Moments(axis=axis[n]) for i, n in enumerate(need_data)},
                          progress=ctx.show_progress, desc="correct-bias")
            for i, n in enumerate(need_data):
                means[n] = res[names[i]]["mean"]
        corrected = 0
        for n, ex in means.items():
            fq = n.inputs[1].producer
            wq = apply_node(graph, fq, np.asarray(graph.const_value(fq.inputs[0]), np.float32)).astype(np.float64)
            w = np.asarray(fq.meta.get(FLOAT_WEIGHT, graph.const_value(fq.inputs[0])), np.float64)
            eps = wq - w
            shift = geometry(n).mean_output(eps, ex)
            bias_v, bias_fq = _bias_value(graph, n)
            b = np.zeros(shift.shape) if bias_v is None else np.asarray(graph.const_value(bias_v), np.float64)
            # correct from the bias as it was before any correction: running twice must not double it
            original = n.meta.setdefault(BIAS_BEFORE_CORRECTION, b.copy())
            new_b = (np.asarray(original, np.float64) - shift).astype(np.float32)
            if np.abs(new_b - b).max(initial=0.0) <= self.tol * max(1e-3, np.abs(b).max(initial=0.0)):
                continue
            if bias_v is None:
                if n.op_type == "Gemm" and n.attr("beta", 1.0) != 1.0:
                    continue
                L.set_input_const(graph, n, 2, new_b, "_bias")
            elif bias_fq is not None:
                L.set_input_const(graph, bias_fq, 0, new_b)
            else:
                L.set_input_const(graph, n, 2, new_b)
            corrected += 1
        return PassResult(graph, corrected > 0, {"corrected": corrected, "analytical": sum(
            1 for n in means if n not in need_data), "empirical": len(need_data), "skipped": reasons})


def float_view(graph: Graph, values: list[Value]) -> tuple[Graph, list[str]]:
    """A copy of ``graph`` with every FakeQuant bypassed and every bias back to its value before
    bias correction (the float model), and the names ``values`` have there."""
    g = graph.copy()
    for n in g.nodes:
        if "bias_before_correction" in n.meta:
            bv, _ = _bias_value(g, n)
            if bv is not None:
                g.set_const(bv, np.asarray(n.meta[BIAS_BEFORE_CORRECTION], np.float32))
    names = []
    for v in values:
        u = g.values[v.name]
        while is_fake_quant(u.producer):
            u = u.producer.inputs[0]
        names.append(u.name)
    for n in [n for n in g.nodes if is_fake_quant(n)]:
        src, out = n.inputs[0], n.outputs[0]
        if out.is_graph_output:
            continue  # keep the interface; it is not among the probed values
        for node, i in list(out.uses):
            if i >= 0:
                g.set_input(node, i, src)
        g.remove_node(n)
    return g, names


def _bias_value(graph: Graph, n: Node) -> tuple[Value | None, Node | None]:
    if len(n.inputs) < 3 or n.inputs[2] is None:
        return None, None
    v = n.inputs[2]
    if is_fake_quant(v.producer):
        return v.producer.inputs[0], v.producer
    return v, None


def _analytical_mean(graph: Graph, n: Node) -> np.ndarray | None:
    """E[x] of a layer input x = ReLU(y), y ~ N(beta, gamma^2) from fold-bn metadata upstream."""
    v = n.inputs[0]
    relu = False
    while v is not None and v.producer is not None:
        p = v.producer
        if BN_STATS in v.meta:
            break
        if is_fake_quant(p) or p.op_type in ("Min", "Identity"):
            v = p.inputs[0]
        elif p.op_type in ("Relu", "Clip"):
            relu = True
            v = p.inputs[0]
        else:
            return None
    if v is None or BN_STATS not in v.meta:
        return None
    beta = np.asarray(v.meta[BN_STATS]["beta"], np.float64)
    gamma = np.abs(np.asarray(v.meta[BN_STATS]["gamma"], np.float64))
    if not relu:
        return beta
    g = np.maximum(gamma, 1e-12)
    z = beta / g
    pdf = np.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    import torch

    cdf = 0.5 * (1 + torch.special.erf(torch.from_numpy(z / math.sqrt(2))).numpy())  # batched, float64
    return beta * cdf + g * pdf
