"""torch front end: ``nn.Module`` -> the same ``Graph`` the ONNX front end builds.

We trace with ``torch.fx.symbolic_trace`` and not with ``torch.export``. fx keeps the
``nn.Module`` boundaries, so a ``Conv2d``, ``BatchNorm2d`` or ``Linear`` maps directly onto one
ONNX ``Conv``, ``BatchNormalization`` or ``Gemm``. That node keeps the module's parameters and
its qualified name (``layer1.0.conv1``) as provenance. ``torch.export`` decomposes to ATen ops
first, and we would have to re-fuse them. The limitation of fx is data-dependent Python
control flow. Such a model fails to trace, with a message that says so.

The model runs once on ``example_inputs`` (an fx Interpreter), which gives the concrete shape
and value of every node. Shape arithmetic (``x.size(0)``, ``x.shape[1]``) becomes constants
from those values. A Reshape that keeps the batch dimension is written with ONNX's ``0``
("copy this dim"), so the graph stays batch-size independent.

ONNX has no op for some modules, so they are decomposed (each piece keeps the module's name):
* GELU is written with Erf (opset < 20), or as Gelu (opset >= 20);
* SiLU becomes x * Sigmoid(x);
* Linear on inputs of rank > 2 becomes MatMul + Add.
"""

from __future__ import annotations

import logging
import math
import operator
from typing import Any, Sequence

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn

from graphopt.errors import FrontendError, UnsupportedOpError
from graphopt.ir import Graph, Value
from graphopt.util import with_gc_paused

log = logging.getLogger("graphopt.torch")

DEFAULT_OPSET = 17
_ONNX_DTYPE = {torch.float32: onnx.TensorProto.FLOAT, torch.float64: onnx.TensorProto.DOUBLE,
               torch.float16: onnx.TensorProto.FLOAT16, torch.int64: onnx.TensorProto.INT64,
               torch.int32: onnx.TensorProto.INT32, torch.bool: onnx.TensorProto.BOOL,
               torch.uint8: onnx.TensorProto.UINT8, torch.int8: onnx.TensorProto.INT8}


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().copy()


class _ConcreteRecorder(torch.fx.Interpreter):
    """Runs the traced module and remembers every node's concrete result."""

    def __init__(self, gm):
        super().__init__(gm)
        self.values: dict[torch.fx.Node, Any] = {}

    def run_node(self, n):
        r = super().run_node(n)
        self.values[n] = r
        return r


class _Converter:
    def __init__(self, gm: torch.fx.GraphModule, concrete: dict, opset: int, batch_dim: bool):
        self.gm = gm
        self.concrete = concrete
        self.opset = opset
        self.batch_dim = batch_dim
        self.g = Graph("main")
        self.g.opset_imports = {"": opset}
        self.g.model_meta = {"producer_name": "graphopt.frontends.torch_fx"}
        self.env: dict[torch.fx.Node, Any] = {}
        self.fx_node: torch.fx.Node | None = None
        self.param_cache: dict[int, Value] = {}
        self.node_names: set[str] = set()
        self.dropped_checks = 0
        self.batch_size: int | None = None  # dim 0 of the first tensor input: the one named "batch"

    # ------------------------------------------------------------------ helpers
    @property
    def where(self) -> str:
        """The module path of the current fx node, for error messages."""
        n = self.fx_node
        if n is None:
            return "?"
        if n.op == "call_module":
            return str(n.target)
        stack = n.meta.get("nn_module_stack")
        qual = list(stack.values())[-1][0] if stack else ""
        return qual or "<top level>"

    def source(self, n: torch.fx.Node) -> str:
        if n.op == "call_module":
            return str(n.target)
        stack = n.meta.get("nn_module_stack")
        if stack:
            qual = list(stack.values())[-1][0]
            return qual or n.name
        return n.name

    def unsupported(self, what: str) -> UnsupportedOpError:
        return UnsupportedOpError(f"torch front end: unsupported op {what} at module '{self.where}' "
                                  f"(fx node '{self.fx_node.name}')")

    def node(self, op: str, inputs: Sequence[Value | None], attrs: dict | None = None, n_out: int = 1,
             suffix: str = "") -> list[Value]:
        fxn = self.fx_node
        base = fxn.name + suffix
        name = base if base not in self.node_names else self.g.unique_node_name(base)
        self.node_names.add(name)
        nd = self.g.add_node(op, list(inputs), [f"{base}_out{i}" if n_out > 1 else base for i in range(n_out)],
                             attrs=attrs or {}, name=name, source=self.source(fxn))
        return nd.outputs

    def param(self, t: torch.Tensor, name: str) -> Value:
        """A parameter/buffer as a graph constant (shared when the same tensor is reused)."""
        key = id(t)
        if key in self.param_cache:
            return self.param_cache[key]
        v = self.g.add_const(_np(t), name)
        self.param_cache[key] = v
        return v

    def const(self, arr, name: str = "const", dtype=None) -> Value:
        return self.g.add_const(np.asarray(arr, dtype=dtype), f"{self.fx_node.name}_{name}")

    def ints(self, arr: Sequence[int], name: str) -> Value:
        return self.const(np.asarray(list(arr), dtype=np.int64), name)

    def val(self, a, like: Value | None = None) -> Value:
        """An argument as an IR value: tensors pass through, Python scalars become constants."""
        if isinstance(a, Value):
            return a
        if isinstance(a, (bool, int, float)):
            dt = np.float32
            if like is not None and like.dtype == onnx.TensorProto.INT64:
                dt = np.int64
            return self.const(np.array(a, dtype=dt), "scalar")
        raise self.unsupported(f"argument of type {type(a).__name__}")

    def arg(self, a):
        """Map an fx argument (nested) to IR values / Python values."""
        if isinstance(a, torch.fx.Node):
            return self.env[a]
        if isinstance(a, (list, tuple)):
            return type(a)(self.arg(x) for x in a)
        if isinstance(a, dict):
            return {k: self.arg(v) for k, v in a.items()}
        return a

    def cval(self, n) -> Any:
        return self.concrete.get(n) if isinstance(n, torch.fx.Node) else n

    def rank_of(self, fx_arg) -> int:
        t = self.cval(fx_arg)
        return t.dim() if isinstance(t, torch.Tensor) else 0

    def shape_of(self, fx_arg) -> list[int]:
        return list(self.cval(fx_arg).shape)

    # ------------------------------------------------------------------ driver
    def convert(self) -> Graph:
        for n in self.gm.graph.nodes:
            self.fx_node = n
            if n.op == "placeholder":
                t = self.concrete.get(n)
                if not isinstance(t, torch.Tensor):
                    if t is None or isinstance(t, (bool, int, float, str)):
                        self.env[n] = t  # an optional / keyword / scalar argument: a constant of the trace
                        continue
                    raise FrontendError(f"torch front end: input '{n.name}' must be a tensor, None or a Python "
                                        f"scalar (got {type(t).__name__})")
                shape: list = list(t.shape)
                if self.batch_dim and shape:
                    # inputs that agree on dim 0 share the symbolic batch; one that does not (a
                    # sequence-first tensor of another length) gets a dim of its own
                    self.batch_size = shape[0] if self.batch_size is None else self.batch_size
                    shape[0] = "batch" if shape[0] == self.batch_size else f"{n.name}_dim0"
                self.env[n] = self.g.add_input(n.name, _ONNX_DTYPE.get(t.dtype), shape)
            elif n.op == "get_attr":
                t = _get_attr(self.gm, n.target)
                self.env[n] = self.param(t, str(n.target)) if isinstance(t, torch.Tensor) else t
            elif n.op == "call_module":
                mod = self.gm.get_submodule(n.target)
                fn = _MODULES.get(type(mod))
                if fn is None:
                    raise self.unsupported(f"module {type(mod).__module__}.{type(mod).__name__}")
                self.env[n] = fn(self, n, mod, *self.arg(n.args), **self.arg(n.kwargs))
            elif n.op == "call_function" and n.target in _CHECKS:
                self.env[n] = None
                self.dropped_checks += 1
            elif n.op in ("call_function", "call_method") and not _has_value(self.arg(n.args)) and \
                    not _has_value(self.arg(n.kwargs)) and isinstance(self.concrete.get(n), (int, float, bool, torch.Size)):
                self.env[n] = self.concrete[n]  # Python arithmetic on shapes: a constant of the trace
            elif n.op in ("call_function", "call_method"):
                key = n.target if n.op == "call_function" else f"Tensor.{n.target}"
                fn = _FUNCTIONS.get(key)
                if fn is None:
                    name = key if isinstance(key, str) else f"{getattr(key, '__module__', '')}.{getattr(key, '__name__', key)}"
                    raise self.unsupported(f"function {name}")
                self.env[n] = fn(self, n, *self.arg(n.args), **self.arg(n.kwargs))
            elif n.op == "output":
                outs = self.arg(n.args[0])
                outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
                values = []
                for i, o in enumerate(outs):
                    if not isinstance(o, Value):
                        raise FrontendError(f"torch front end: output {i} is not a tensor ({type(o).__name__})")
                    name = "output" if len(outs) == 1 else f"output_{i}"
                    if o.is_graph_input or o.is_const or o in values or name in self.g.values:
                        o = self.node("Identity", [o], suffix=f"_{name}")[0]
                    self.g.rename_value(o, name)
                    values.append(o)
                self.g.set_outputs(values)
        return self.g


def _has_value(a) -> bool:
    if isinstance(a, Value):
        return True
    if isinstance(a, (list, tuple)):
        return any(_has_value(x) for x in a)
    if isinstance(a, dict):
        return any(_has_value(x) for x in a.values())
    return False


def _get_attr(gm, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


# ====================================================================== modules
def _conv(c: _Converter, n, mod: nn.Conv1d | nn.Conv2d, x, *rest):
    if mod.padding_mode not in ("zeros", *_PAD_MODES):
        raise c.unsupported(f"{type(mod).__name__} with padding_mode='{mod.padding_mode}'")
    nd = len(mod.kernel_size)
    if isinstance(mod.padding, str):
        if mod.padding == "valid":
            pads = [0] * 2 * nd
        else:  # 'same'
            tot = [d * (k - 1) for d, k in zip(mod.dilation, mod.kernel_size)]
            pads = [t // 2 for t in tot] + [t - t // 2 for t in tot]
    else:
        pads = list(mod.padding) * 2
    if mod.padding_mode != "zeros" and any(pads):  # pad the borders as torch does, then a zero-pad conv
        x = _border_pad(c, x, c.shape_of(n.args[0]), [0, 0] + pads[:nd], [0, 0] + pads[nd:], mod.padding_mode)
        pads = [0] * (2 * nd)
    w = c.param(mod.weight, f"{n.target}.weight")
    b = c.param(mod.bias, f"{n.target}.bias") if mod.bias is not None else None
    attrs = {"kernel_shape": list(mod.kernel_size), "strides": list(mod.stride), "pads": pads,
             "dilations": list(mod.dilation), "group": mod.groups}
    return c.node("Conv", [x, w] + ([b] if b is not None else []), attrs)[0]


def _conv_t(c: _Converter, n, mod: nn.ConvTranspose2d, x, *rest):
    if rest:
        raise c.unsupported("ConvTranspose2d with output_size")
    w = c.param(mod.weight, f"{n.target}.weight")
    b = c.param(mod.bias, f"{n.target}.bias") if mod.bias is not None else None
    attrs = {"kernel_shape": list(mod.kernel_size), "strides": list(mod.stride), "pads": list(mod.padding) * 2,
             "dilations": list(mod.dilation), "group": mod.groups, "output_padding": list(mod.output_padding)}
    return c.node("ConvTranspose", [x, w] + ([b] if b is not None else []), attrs)[0]


def _linear_values(c: _Converter, n, x, w_t: torch.Tensor, b_t: torch.Tensor | None, wname: str, bname: str):
    rank = c.rank_of(n.args[0])
    if rank == 2:
        w = c.param(w_t, wname)
        ins = [x, w] + ([c.param(b_t, bname)] if b_t is not None else [])
        return c.node("Gemm", ins, {"transB": 1})[0]
    wt = c.g.add_const(_np(w_t).T.copy(), wname + "_T")
    y = c.node("MatMul", [x, wt], suffix="_matmul")[0]
    if b_t is None:
        return y
    return c.node("Add", [y, c.param(b_t, bname)])[0]


def _linear(c: _Converter, n, mod: nn.Linear, x):
    return _linear_values(c, n, x, mod.weight, mod.bias, f"{n.target}.weight", f"{n.target}.bias")


def _bn(c: _Converter, n, mod, x):
    if not mod.track_running_stats:
        raise c.unsupported(f"{type(mod).__name__} without running statistics")
    C = mod.num_features
    w = c.param(mod.weight, f"{n.target}.weight") if mod.affine else c.const(np.ones(C, np.float32), "scale")
    b = c.param(mod.bias, f"{n.target}.bias") if mod.affine else c.const(np.zeros(C, np.float32), "bias")
    mean = c.param(mod.running_mean, f"{n.target}.running_mean")
    var = c.param(mod.running_var, f"{n.target}.running_var")
    return c.node("BatchNormalization", [x, w, b, mean, var], {"epsilon": float(mod.eps)})[0]


def _act(op: str, **attrs):
    def fn(c: _Converter, n, mod, x, *a, **k):
        return c.node(op, [x], dict(attrs))[0]

    return fn


def _clip(c: _Converter, x, lo: float, hi: float):
    return c.node("Clip", [x, c.const(np.array(lo, np.float32), "min"), c.const(np.array(hi, np.float32), "max")])[0]


def _relu6(c, n, mod, x):
    return _clip(c, x, 0.0, 6.0)


def _hardtanh(c, n, mod, x):
    return _clip(c, x, float(mod.min_val), float(mod.max_val))


def _leaky(c, n, mod, x):
    return c.node("LeakyRelu", [x], {"alpha": float(mod.negative_slope)})[0]


def _prelu(c, n, mod, x):
    rank = c.rank_of(n.args[0])
    w = _np(mod.weight)
    if w.size > 1:
        w = w.reshape([-1] + [1] * max(rank - 2, 0))
    return c.node("PRelu", [x, c.g.add_const(w, f"{n.target}.weight")])[0]


def _silu_values(c: _Converter, x):
    s = c.node("Sigmoid", [x], suffix="_sigmoid")[0]
    return c.node("Mul", [x, s])[0]


def _silu(c, n, mod, x):
    return _silu_values(c, x)


def _gelu_values(c: _Converter, x, approximate: str):
    if c.opset >= 20:
        return c.node("Gelu", [x], {"approximate": approximate})[0]
    if approximate == "tanh":
        # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        x3 = c.node("Mul", [c.node("Mul", [x, x], suffix="_sq")[0], x], suffix="_cube")[0]
        inner = c.node("Add", [x, c.node("Mul", [x3, c.const(np.float32(0.044715), "k")], suffix="_k")[0]], suffix="_in")[0]
        t = c.node("Tanh", [c.node("Mul", [inner, c.const(np.float32(math.sqrt(2 / math.pi)), "s")], suffix="_s")[0]],
                   suffix="_tanh")[0]
    else:
        t = c.node("Erf", [c.node("Div", [x, c.const(np.float32(math.sqrt(2.0)), "sqrt2")], suffix="_div")[0]],
                   suffix="_erf")[0]
    one = c.node("Add", [t, c.const(np.float32(1.0), "one")], suffix="_add1")[0]
    half = c.node("Mul", [x, c.const(np.float32(0.5), "half")], suffix="_half")[0]
    return c.node("Mul", [half, one])[0]


def _gelu(c, n, mod, x):
    return _gelu_values(c, x, mod.approximate)


def _hardsigmoid(c, n, mod, x):
    return c.node("HardSigmoid", [x], {"alpha": 1.0 / 6.0, "beta": 0.5})[0]


def _softmax_mod(c, n, mod, x):
    return c.node("Softmax", [x], {"axis": mod.dim if mod.dim is not None else -1})[0]


def _pool_attrs(c: _Converter, kernel, stride, padding, dilation=1, nd=2):
    def tup(v):
        return list(v) if isinstance(v, (list, tuple)) else [int(v)] * nd

    k = tup(kernel)
    s = tup(stride) if stride not in (None, [], ()) else list(k)
    p = tup(padding)
    return {"kernel_shape": k, "strides": s, "pads": p + p}, tup(dilation)


def _maxpool(c, n, mod, x):
    if mod.return_indices:
        raise c.unsupported("MaxPool with return_indices")
    nd = c.rank_of(n.args[0]) - 2
    attrs, dil = _pool_attrs(c, mod.kernel_size, mod.stride, mod.padding, mod.dilation, nd)
    attrs.update(dilations=dil, ceil_mode=int(mod.ceil_mode))
    return c.node("MaxPool", [x], attrs)[0]


def _avgpool(c, n, mod, x):
    if getattr(mod, "divisor_override", None):
        raise c.unsupported("AvgPool with divisor_override")
    nd = c.rank_of(n.args[0]) - 2
    attrs, _ = _pool_attrs(c, mod.kernel_size, mod.stride, mod.padding, 1, nd)
    attrs.update(ceil_mode=int(mod.ceil_mode), count_include_pad=int(mod.count_include_pad))
    return c.node("AveragePool", [x], attrs)[0]


def _adaptive(c: _Converter, n, x, output_size, kind: str):
    in_shape = c.shape_of(n.args[0])
    nd = len(in_shape) - 2
    out = list(output_size) if isinstance(output_size, (list, tuple)) else [output_size] * nd
    out = [in_shape[2 + i] if o is None else o for i, o in enumerate(out)]
    if all(o == 1 for o in out):
        return c.node("GlobalAveragePool" if kind == "avg" else "GlobalMaxPool", [x])[0]
    spatial = in_shape[2:]
    if any(s % o for s, o in zip(spatial, out)):
        if kind != "avg":
            raise c.unsupported(f"adaptive {kind} pool from {spatial} to {out} (not a whole multiple)")
        return _adaptive_avg_bins(c, x, spatial, out)
    k = [s // o for s, o in zip(spatial, out)]
    attrs = {"kernel_shape": k, "strides": k, "pads": [0] * 2 * nd}
    return c.node("AveragePool" if kind == "avg" else "MaxPool", [x], attrs)[0]


def _adaptive_avg_bins(c: _Converter, x, spatial: list[int], out: list[int]):
    """Adaptive average pooling with torch's overlapping bins (start floor(i·in/out), end
    ceil((i+1)·in/out)) as one averaging matrix per spatial axis: x @ P_w^T, then P_h @ that."""
    def bins(size: int, o: int) -> np.ndarray:
        i = np.arange(o)
        start, stop = (i * size) // o, -((-(i + 1) * size) // o)
        cols = np.arange(size)
        m = ((cols >= start[:, None]) & (cols < stop[:, None])).astype(np.float32)
        return m / m.sum(1, keepdims=True)

    y = x
    nd = len(spatial)
    for k in reversed(range(nd)):  # last axis first: y @ P^T; an earlier axis: P @ y moved to the last two
        p = bins(spatial[k], out[k])
        if k == nd - 1:
            y = c.node("MatMul", [y, c.const(p.T.copy(), f"bins{k}")], suffix=f"_bins{k}")[0]
        else:  # only the height of a 2-D pool: [o, H] @ [N, C, H, w] broadcasts
            y = c.node("MatMul", [c.const(p, f"bins{k}"), y], suffix=f"_bins{k}")[0]
    return y


def _adaptive_avg(c, n, mod, x):
    return _adaptive(c, n, x, mod.output_size, "avg")


def _adaptive_max(c, n, mod, x):
    if mod.return_indices:
        raise c.unsupported("AdaptiveMaxPool with return_indices")
    return _adaptive(c, n, x, mod.output_size, "max")


def _identity_mod(c, n, mod, x, *a, **k):
    return x


def _flatten_values(c: _Converter, n, x, start: int, end: int):
    shape = c.shape_of(n.args[0])
    rank = len(shape)
    start, end = _norm_axis(start, rank), _norm_axis(end, rank)
    if start == end:
        return x
    if end == rank - 1 and start >= 1:
        if start == 1:
            return c.node("Flatten", [x], {"axis": 1})[0]
    target = shape[:start] + [int(np.prod(shape[start:end + 1]))] + shape[end + 1:]
    return _reshape_values(c, n, x, target)


def _flatten_mod(c, n, mod, x):
    return _flatten_values(c, n, x, mod.start_dim, mod.end_dim)


def _layer_norm_values(c: _Converter, n, x, normalized_shape, w_t, b_t, eps, wname, bname):
    ns = [normalized_shape] if isinstance(normalized_shape, int) else list(normalized_shape)
    scale = c.param(w_t, wname) if w_t is not None else c.const(np.ones(ns, np.float32), "scale")
    bias = c.param(b_t, bname) if b_t is not None else c.const(np.zeros(ns, np.float32), "bias")
    return c.node("LayerNormalization", [x, scale, bias], {"axis": -len(ns), "epsilon": float(eps)})[0]


def _layer_norm(c, n, mod, x):
    return _layer_norm_values(c, n, x, mod.normalized_shape, mod.weight, mod.bias, mod.eps,
                              f"{n.target}.weight", f"{n.target}.bias")


def _group_norm_values(c: _Converter, n, x, g: int, w_t, b_t, eps: float, name: str):
    """GroupNorm at opset 17 (ONNX's GroupNormalization arrives in 18): InstanceNormalization of
    x viewed as [N, G, -1], back to x's shape, then the per-channel affine."""
    rank = c.rank_of(n.args[0])
    v = c.node("Reshape", [x, c.ints([0, g, -1], "groups")], suffix="_groups")[0]
    ones, zeros = c.const(np.ones(g, np.float32), "one"), c.const(np.zeros(g, np.float32), "zero")
    v = c.node("InstanceNormalization", [v, ones, zeros], {"epsilon": float(eps)}, suffix="_norm")[0]
    v = c.node("Reshape", [v, c.node("Shape", [x], suffix="_shape")[0]], suffix="_back")[0]
    shape = [-1] + [1] * (rank - 2)
    if w_t is not None:
        v = c.node("Mul", [v, c.g.add_const(_np(w_t).reshape(shape), f"{name}.weight")], suffix="_scale")[0]
    if b_t is not None:
        v = c.node("Add", [v, c.g.add_const(_np(b_t).reshape(shape), f"{name}.bias")])[0]
    return v


def _group_norm(c: _Converter, n, mod: nn.GroupNorm, x):
    return _group_norm_values(c, n, x, int(mod.num_groups), mod.weight if mod.affine else None,
                              mod.bias if mod.affine else None, mod.eps, n.target)


def _einsum_fn(c: _Converter, n, equation, *operands):
    ops = list(operands[0]) if len(operands) == 1 and isinstance(operands[0], (list, tuple)) else list(operands)
    return c.node("Einsum", ops, {"equation": str(equation).replace(" ", "")})[0]


def _roll_fn(c: _Converter, n, x, shifts, dims=None):
    shifts = [shifts] if isinstance(shifts, int) else list(shifts)
    if dims is None:
        raise c.unsupported("roll without dims (it flattens)")
    dims = [dims] if isinstance(dims, int) else list(dims)
    shape = c.shape_of(n.args[0])
    v = x
    for i, (s, d) in enumerate(zip(shifts, dims)):  # roll by s along d: the last s, then the rest
        d = _norm_axis(d, len(shape))
        size = shape[d]
        s %= size
        if s == 0:
            continue
        tail = c.node("Slice", [v, c.ints([size - s], f"t{i}s"), c.ints([size], f"t{i}e"), c.ints([d], f"t{i}a")],
                      suffix=f"_tail{i}")[0]
        head = c.node("Slice", [v, c.ints([0], f"h{i}s"), c.ints([size - s], f"h{i}e"), c.ints([d], f"h{i}a")],
                      suffix=f"_head{i}")[0]
        v = c.node("Concat", [tail, head], {"axis": d}, suffix=f"_roll{i}")[0]
    return v if v is not x else c.node("Identity", [x])[0]


_MODULES = {
    nn.GroupNorm: _group_norm,
    nn.Conv1d: _conv, nn.Conv2d: _conv, nn.ConvTranspose2d: _conv_t, nn.Linear: _linear,
    nn.BatchNorm1d: _bn, nn.BatchNorm2d: _bn,
    nn.ReLU: _act("Relu"), nn.ReLU6: _relu6, nn.Hardtanh: _hardtanh, nn.LeakyReLU: _leaky, nn.PReLU: _prelu,
    nn.SiLU: _silu, nn.GELU: _gelu, nn.Sigmoid: _act("Sigmoid"), nn.Tanh: _act("Tanh"),
    nn.Hardswish: _act("HardSwish"), nn.Hardsigmoid: _hardsigmoid, nn.Softmax: _softmax_mod,
    nn.MaxPool1d: _maxpool, nn.MaxPool2d: _maxpool, nn.AvgPool1d: _avgpool, nn.AvgPool2d: _avgpool,
    nn.AdaptiveAvgPool1d: _adaptive_avg, nn.AdaptiveAvgPool2d: _adaptive_avg, nn.AdaptiveMaxPool2d: _adaptive_max,
    nn.Flatten: _flatten_mod, nn.Dropout: _identity_mod, nn.Dropout1d: _identity_mod, nn.Dropout2d: _identity_mod,
    nn.Identity: _identity_mod, nn.LayerNorm: _layer_norm,
}


# ====================================================================== functions
def _binary(op: str, reverse: bool = False):
    def fn(c: _Converter, n, a, b, *rest, **kw):
        if rest or kw.get("alpha", 1) != 1:
            raise c.unsupported(f"{op} with alpha")
        if not isinstance(a, Value) and not isinstance(b, Value):  # shape arithmetic
            return {"Add": operator.add, "Sub": operator.sub, "Mul": operator.mul, "Div": operator.truediv}[op](a, b)
        like = a if isinstance(a, Value) else b
        x, y = c.val(a, like), c.val(b, like)
        if reverse:
            x, y = y, x
        return c.node(op, [x, y])[0]

    return fn


def _compare(op: str, negate: bool = False):
    def fn(c: _Converter, n, a, b):
        like = a if isinstance(a, Value) else b
        y = c.node(op, [c.val(a, like), c.val(b, like)], suffix="_cmp" if negate else "")[0]
        return c.node("Not", [y])[0] if negate else y

    return fn


def _where_fn(c: _Converter, n, cond, a, b):
    like = a if isinstance(a, Value) else b
    return c.node("Where", [cond, c.val(a, like), c.val(b, like)])[0]


def _masked_fill_fn(c: _Converter, n, x, mask, value):
    return c.node("Where", [mask, c.val(float(value) if not isinstance(value, Value) else value, x), x])[0]


def _cumsum_fn(c: _Converter, n, x, dim, **kw):
    if kw.get("dtype") is not None:
        raise c.unsupported("cumsum with dtype")
    return c.node("CumSum", [x, c.const(np.array(dim, np.int64), "axis")])[0]


def _argmax_fn(c: _Converter, n, x, dim=None, keepdim=False):
    if dim is None:
        flat = c.node("Reshape", [x, c.ints([-1], "flat")], suffix="_flat")[0]
        return c.node("ArgMax", [flat], {"axis": 0, "keepdims": 0})[0]
    return c.node("ArgMax", [x], {"axis": int(dim), "keepdims": int(bool(keepdim))})[0]


def _batch_source(c: _Converter, a) -> Value | None:
    """The tensor whose dim 0 an fx size argument reads (``t.shape[0]`` / ``t.size(0)``), if the
    batch is symbolic: that size must stay symbolic too."""
    if not c.batch_dim or not isinstance(a, torch.fx.Node):
        return None
    if a.op == "call_method" and a.target == "size" and len(a.args) == 2 and a.args[1] == 0:
        src = a.args[0]
    elif a.op == "call_function" and a.target is operator.getitem and a.args[1] == 0 and \
            isinstance(a.args[0], torch.fx.Node) and a.args[0].op == "call_function" and \
            a.args[0].target is getattr and a.args[0].args[1] == "shape":
        src = a.args[0].args[0]
    else:
        return None
    v = c.env.get(src)  # Shape(v)[0] at run time is exactly what the code reads, whatever v's shape
    return v if isinstance(v, Value) else None


def _expand_fn(c: _Converter, n, x, *sizes):
    fx_sizes = list(n.args[1:])
    if len(sizes) == 1 and isinstance(sizes[0], (list, tuple, torch.Size)):
        sizes, fx_sizes = list(sizes[0]), list(n.args[1]) if isinstance(n.args[1], (list, tuple)) else [None]
    sizes = list(sizes)
    if any(isinstance(s, Value) for s in sizes):
        raise c.unsupported("expand to a computed size")
    # -1 keeps a dimension: 1 in ONNX's broadcasting Expand
    static = [1 if s == -1 else int(s) for s in sizes]
    batch = [_batch_source(c, a) for a in fx_sizes] + [None] * (len(sizes) - len(fx_sizes))
    if not any(batch):
        return c.node("Expand", [x, c.ints(static, "shape")])[0]
    parts = []  # a size read from a symbolic batch: Shape(t)[0] at run time
    for i, (s, src) in enumerate(zip(static, batch)):
        if src is not None:
            shp = c.node("Shape", [src], {"start": 0, "end": 1}, suffix=f"_batch{i}")[0]
            parts.append(shp)
        else:
            parts.append(c.ints([s], f"dim{i}"))
    shape = c.node("Concat", parts, {"axis": 0}, suffix="_shape")[0]
    return c.node("Expand", [x, shape])[0]


def _repeat_fn(c: _Converter, n, x, *reps):
    reps = list(reps[0]) if len(reps) == 1 and isinstance(reps[0], (list, tuple, torch.Size)) else list(reps)
    if len(reps) != c.rank_of(n.args[0]):
        raise c.unsupported("repeat that adds dimensions")
    return c.node("Tile", [x, c.ints([int(r) for r in reps], "repeats")])[0]


def _cast_fn(to: int):
    def fn(c: _Converter, n, x, *a, **k):
        return c.node("Cast", [x], {"to": to})[0]

    return fn


def _unary_fn(op: str):
    def fn(c, n, x, *a, **k):
        return c.node(op, [x])[0]

    return fn


def _relu_fn(c, n, x, inplace=False):
    return c.node("Relu", [x])[0]


def _relu6_fn(c, n, x, inplace=False):
    return _clip(c, x, 0.0, 6.0)


def _hardtanh_fn(c, n, x, min_val=-1.0, max_val=1.0, inplace=False):
    return _clip(c, x, float(min_val), float(max_val))


def _clamp_fn(c, n, x, min=None, max=None):  # noqa: A002 - torch's names
    lo = c.const(np.array(min, np.float32), "min") if min is not None else None
    hi = c.const(np.array(max, np.float32), "max") if max is not None else None
    return c.node("Clip", [x, lo, hi])[0]


def _leaky_fn(c, n, x, negative_slope=0.01, inplace=False):
    return c.node("LeakyRelu", [x], {"alpha": float(negative_slope)})[0]


def _gelu_fn(c, n, x, approximate="none"):
    return _gelu_values(c, x, approximate)


def _silu_fn(c, n, x, inplace=False):
    return _silu_values(c, x)


def _hardswish_fn(c, n, x, inplace=False):
    return c.node("HardSwish", [x])[0]


def _hardsigmoid_fn(c, n, x, inplace=False):
    return c.node("HardSigmoid", [x], {"alpha": 1.0 / 6.0, "beta": 0.5})[0]


def _softmax_fn(c, n, x, dim=None, *a, **k):
    if dim is None:
        dim = k.get("dim", -1)
    return c.node("Softmax", [x], {"axis": int(dim)})[0]


def _identity_fn(c, n, x, *a, **k):
    return x


def _cat_fn(c, n, tensors, dim=0):
    return c.node("Concat", list(tensors), {"axis": int(dim)})[0]


def _stack_fn(c, n, tensors, dim=0):
    rank = c.rank_of(n.args[0][0]) + 1
    axes = c.ints([_norm_axis(dim, rank)], "axes")
    parts = [c.node("Unsqueeze", [t, axes], suffix=f"_u{i}")[0] for i, t in enumerate(tensors)]
    return c.node("Concat", parts, {"axis": _norm_axis(dim, rank)})[0]


def _split_values(c: _Converter, n, x, sizes: list[int], dim: int):
    outs = c.node("Split", [x, c.ints(sizes, "split")], {"axis": int(dim)}, n_out=len(sizes))
    return list(outs)


def _split_fn(c, n, x, split_size_or_sections, dim=0):
    size = c.shape_of(n.args[0])[dim]
    if isinstance(split_size_or_sections, int):
        s = split_size_or_sections
        sizes = [s] * (size // s) + ([size % s] if size % s else [])
    else:
        sizes = list(split_size_or_sections)
    return _split_values(c, n, x, sizes, dim)


def _chunk_fn(c, n, x, chunks, dim=0):
    size = c.shape_of(n.args[0])[dim]
    step = -(-size // chunks)
    sizes = [step] * (size // step) + ([size % step] if size % step else [])
    return _split_values(c, n, x, sizes, dim)


def _reshape_values(c: _Converter, n, x, target: list[int]):
    in_shape = c.shape_of(n.args[0])
    target = [int(t) for t in target]
    if c.batch_dim and target and in_shape and target[0] == in_shape[0]:
        target = [0] + target[1:]  # ONNX 0 = copy input dim 0: keeps the batch dim symbolic
    return c.node("Reshape", [x, c.ints(target, "shape")])[0]


def _view_fn(c, n, x, *shape):
    if len(shape) == 1 and isinstance(shape[0], (list, tuple, torch.Size)):
        shape = tuple(shape[0])
    if any(isinstance(s, Value) for s in shape):
        raise c.unsupported("reshape to a shape computed from tensor values")
    return _reshape_values(c, n, x, list(shape))


def _flatten_fn(c, n, x, start_dim=0, end_dim=-1):
    return _flatten_values(c, n, x, start_dim, end_dim)


def _permute_fn(c, n, x, *dims):
    if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
        dims = tuple(dims[0])
    rank = c.rank_of(n.args[0])
    return c.node("Transpose", [x], {"perm": [_norm_axis(d, rank) for d in dims]})[0]


def _transpose_fn(c, n, x, d0, d1):
    rank = c.rank_of(n.args[0])
    perm = list(range(rank))
    a, b = _norm_axis(d0, rank), _norm_axis(d1, rank)
    perm[a], perm[b] = perm[b], perm[a]
    return c.node("Transpose", [x], {"perm": perm})[0]


def _reduce_fn(op: str):
    def fn(c: _Converter, n, x, dim=None, keepdim=False, *a, dtype=None):
        rank = c.rank_of(n.args[0])
        dims = list(range(rank)) if dim is None else ([dim] if isinstance(dim, int) else list(dim))
        dims = sorted(_norm_axis(d, rank) for d in dims)
        if op == "ReduceMean" and rank >= 3 and dims == list(range(2, rank)):
            y = c.node("GlobalAveragePool", [x], suffix="_gap" if not keepdim else "")[0]
            return y if keepdim else c.node("Flatten", [y], {"axis": 1})[0]
        if op == "ReduceMean" and c.opset < 18:
            return c.node(op, [x], {"axes": dims, "keepdims": int(bool(keepdim))})[0]
        return c.node(op, [x, c.ints(dims, "axes")], {"keepdims": int(bool(keepdim))})[0]

    return fn


def _matmul_fn(c, n, a, b):
    return c.node("MatMul", [a, b])[0]


def _linear_fn(c, n, x, weight, bias=None):
    w_t = _tensor_of(c, n.args[1] if len(n.args) > 1 else n.kwargs["weight"])
    b_node = n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
    b_t = _tensor_of(c, b_node) if b_node is not None else None
    return _linear_values(c, n, x, w_t, b_t, f"{n.name}.weight", f"{n.name}.bias")


def _tensor_of(c: _Converter, fx_arg) -> torch.Tensor:
    if isinstance(fx_arg, torch.fx.Node) and fx_arg.op == "get_attr":
        return _get_attr(c.gm, fx_arg.target)
    raise c.unsupported("functional op whose weight is computed, not a parameter")


def _layer_norm_fn(c, n, x, normalized_shape, weight=None, bias=None, eps=1e-5):
    args = list(n.args) + [None] * 5
    w = _tensor_of(c, args[2] or n.kwargs.get("weight")) if (args[2] or n.kwargs.get("weight")) is not None else None
    b = _tensor_of(c, args[3] or n.kwargs.get("bias")) if (args[3] or n.kwargs.get("bias")) is not None else None
    return _layer_norm_values(c, n, x, normalized_shape, w, b, eps, f"{n.name}.weight", f"{n.name}.bias")


def _batch_norm_fn(c, n, x, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
                   eps=1e-5):
    """``F.batch_norm`` in inference form (a fused BatchNorm + activation module calls it): one
    BatchNormalization whose statistics and affine parameters are the module's tensors."""
    if training:
        raise c.unsupported("F.batch_norm with training=True (batch statistics)")
    names = ("running_mean", "running_var", "weight", "bias")
    args = list(n.args[1:5]) + [None] * 4
    fx = {k: args[i] if args[i] is not None else n.kwargs.get(k) for i, k in enumerate(names)}
    if fx["running_mean"] is None or fx["running_var"] is None:
        raise c.unsupported("F.batch_norm without running statistics")
    t = {k: _tensor_of(c, a) for k, a in fx.items() if a is not None}
    C = t["running_mean"].numel()

    def value(k, default):
        if k not in t:
            return c.const(np.full(C, default, np.float32), k)
        return c.param(t[k], str(fx[k].target))

    return c.node("BatchNormalization", [x, value("weight", 1.0), value("bias", 0.0), value("running_mean", 0.0),
                                         value("running_var", 1.0)], {"epsilon": float(eps)})[0]


def _unbind_fn(c, n, x, dim=0):
    """``unbind``: a Split into size-1 pieces, each squeezed (attention's q, k, v)."""
    rank = c.rank_of(n.args[0])
    d = _norm_axis(dim, rank)
    size = c.shape_of(n.args[0])[d]
    pieces = _split_values(c, n, x, [1] * int(size), d)
    return tuple(c.node("Squeeze", [p, c.ints([d], f"axes{i}")], suffix=f"_squeeze{i}")[0]
                 for i, p in enumerate(pieces))


def _reshape_as_fn(c, n, x, other):
    """``reshape_as`` / ``view_as``: Reshape to the other tensor's run-time shape."""
    return c.node("Reshape", [x, c.node("Shape", [c.val(other)], suffix="_shape")[0]])[0]


def _expand_as_fn(c, n, x, other):
    return c.node("Expand", [x, c.node("Shape", [c.val(other)], suffix="_shape")[0]])[0]


def _type_as_fn(c, n, x, other):
    t = c.concrete.get(n.args[1]) if isinstance(n.args[1], torch.fx.Node) else None
    to = _ONNX_DTYPE.get(t.dtype) if isinstance(t, torch.Tensor) else None
    if to is None:
        raise c.unsupported("type_as of a tensor whose dtype is unknown")
    return c.node("Cast", [x], {"to": to})[0]


def _adaptive_avg_fn(c, n, x, output_size):
    return _adaptive(c, n, x, output_size, "avg")


def _avg_pool_fn(c, n, x, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
                 divisor_override=None):
    if divisor_override:
        raise c.unsupported("avg_pool with divisor_override")
    nd = c.rank_of(n.args[0]) - 2
    attrs, _ = _pool_attrs(c, kernel_size, stride, padding, 1, nd)
    attrs.update(ceil_mode=int(ceil_mode), count_include_pad=int(count_include_pad))
    return c.node("AveragePool", [x], attrs)[0]


def _max_pool_fn(c, n, x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    if return_indices:
        raise c.unsupported("max_pool with return_indices")
    nd = c.rank_of(n.args[0]) - 2
    attrs, dil = _pool_attrs(c, kernel_size, stride, padding, dilation, nd)
    attrs.update(dilations=dil, ceil_mode=int(ceil_mode))
    return c.node("MaxPool", [x], attrs)[0]


_PAD_MODES = {"reflect": "reflect", "replicate": "edge", "circular": "wrap"}  # torch border mode -> ONNX Pad mode


def _border_pad(c: _Converter, x, shape: list[int], begin: list[int], end: list[int], mode: str):
    """Pad ``x`` (static ``shape``) by ``begin``/``end`` per axis with a torch border mode.
    ``circular`` wraps around, written as Slice + Concat per axis: ONNX Pad's ``wrap`` only
    arrives in opset 19."""
    if mode != "circular":
        return c.node("Pad", [x, c.ints(begin + end, "pads")], {"mode": _PAD_MODES[mode]}, suffix="_pad")[0]
    y = x
    for axis, (lo, hi) in enumerate(zip(begin, end)):
        if not lo and not hi:
            continue
        if lo > shape[axis] or hi > shape[axis]:
            raise c.unsupported(f"circular padding wider than the dimension ({max(lo, hi)} > {shape[axis]})")
        parts = []
        if lo:
            parts.append(c.node("Slice", [y, c.ints([-lo], "lo_s"), c.ints([2 ** 62], "lo_e"), c.ints([axis], "lo_a")],
                                suffix=f"_wrap{axis}_lo")[0])
        parts.append(y)
        if hi:
            parts.append(c.node("Slice", [y, c.ints([0], "hi_s"), c.ints([hi], "hi_e"), c.ints([axis], "hi_a")],
                                suffix=f"_wrap{axis}_hi")[0])
        y = c.node("Concat", parts, {"axis": axis}, suffix=f"_wrap{axis}")[0]
    return y


def _pad_fn(c, n, x, pad, mode="constant", value=None):
    if mode != "constant" and mode not in _PAD_MODES:
        raise c.unsupported(f"pad mode '{mode}' (constant, reflect, replicate and circular are)")
    rank = c.rank_of(n.args[0])
    begin, end = [0] * rank, [0] * rank
    for i in range(len(pad) // 2):
        begin[rank - 1 - i], end[rank - 1 - i] = int(pad[2 * i]), int(pad[2 * i + 1])
    if mode != "constant":
        return _border_pad(c, x, c.shape_of(n.args[0]), begin, end, mode)
    ins = [x, c.ints(begin + end, "pads")]
    if value:
        ins.append(c.const(np.array(value, np.float32), "value"))
    return c.node("Pad", ins)[0]


def _unsqueeze_fn(c, n, x, dim):
    rank = c.rank_of(n.args[0]) + 1
    return c.node("Unsqueeze", [x, c.ints([_norm_axis(dim, rank)], "axes")])[0]


def _squeeze_fn(c, n, x, dim=None):
    if dim is None:
        shape = c.shape_of(n.args[0])
        dims = [i for i, s in enumerate(shape) if s == 1]
    else:
        rank = c.rank_of(n.args[0])
        dims = [_norm_axis(d, rank) for d in ([dim] if isinstance(dim, int) else dim)]
    return c.node("Squeeze", [x, c.ints(dims, "axes")])[0]


def _size_fn(c, n, x, dim=None):
    shape = c.shape_of(n.args[0])
    return shape[dim] if dim is not None else torch.Size(shape)


def _dim_fn(c, n, x):
    return c.rank_of(n.args[0])


def _getattr_fn(c, n, obj, name):
    if isinstance(obj, tuple) and name in ("values", "indices") and len(obj) == 2:  # torch.return_types.topk
        return obj[0 if name == "values" else 1]
    if name == "shape" and isinstance(obj, Value):
        return torch.Size(c.shape_of(n.args[0]))
    if name in ("ndim",) and isinstance(obj, Value):
        return c.rank_of(n.args[0])
    raise c.unsupported(f"attribute access .{name}")


def _getitem_fn(c: _Converter, n, obj, idx):
    if isinstance(obj, (list, tuple, torch.Size)):
        return obj[idx]
    if not isinstance(obj, Value):
        raise c.unsupported(f"indexing a {type(obj).__name__}")
    return _tensor_index(c, n, obj, idx)


def _tensor_index(c: _Converter, n, x: Value, idx):
    shape = c.shape_of(n.args[0])
    rank = len(shape)
    idx = idx if isinstance(idx, tuple) else (idx,)
    if any(isinstance(i, Value) for i in idx):
        return _tensor_gather(c, n, x, idx, shape)
    if Ellipsis in idx:
        k = idx.index(Ellipsis)
        fill = rank - (len(idx) - 1 - sum(i is None for i in idx))
        idx = idx[:k] + (slice(None),) * fill + idx[k + 1:]
    starts, ends, axes, steps, squeeze, unsqueeze = [], [], [], [], [], []
    dim = 0
    out_dim = 0
    for i in idx:
        if i is None:
            unsqueeze.append(out_dim)
            out_dim += 1
            continue
        if isinstance(i, int):
            j = _norm_axis(i, shape[dim])
            starts.append(j)
            ends.append(j + 1)
            axes.append(dim)
            steps.append(1)
            squeeze.append(dim)
        elif isinstance(i, slice):
            if i != slice(None):
                st = 1 if i.step is None else int(i.step)
                if st <= 0:
                    raise c.unsupported("slicing with a non-positive step")
                starts.append(0 if i.start is None else int(i.start))
                ends.append(2 ** 62 if i.stop is None else int(i.stop))
                axes.append(dim)
                steps.append(st)
            out_dim += 1
        else:
            raise c.unsupported(f"index of type {type(i).__name__}")
        dim += 1
    y = x
    if axes:
        y = c.node("Slice", [y, c.ints(starts, "starts"), c.ints(ends, "ends"), c.ints(axes, "axes"),
                             c.ints(steps, "steps")], suffix="_slice" if squeeze or unsqueeze else "")[0]
    if squeeze:
        y = c.node("Squeeze", [y, c.ints(squeeze, "sq_axes")], suffix="_squeeze" if unsqueeze else "")[0]
    if unsqueeze:
        y = c.node("Unsqueeze", [y, c.ints(unsqueeze, "unsq_axes")])[0]
    return y


def _tensor_gather(c: _Converter, n, x: Value, idx: tuple, shape: list[int]):
    """``x[..., t, ...]`` with one integer tensor ``t`` after full slices (a lookup table indexed
    by a buffer, as Swin's relative position bias): Gather along that axis."""
    k = next(j for j, i in enumerate(idx) if isinstance(i, Value))
    if any(i != slice(None) for j, i in enumerate(idx) if j != k):
        raise c.unsupported("indexing with a tensor next to other indices")
    fx_idx = n.args[1][k] if isinstance(n.args[1], tuple) else n.args[1]
    t = c.concrete.get(fx_idx) if isinstance(fx_idx, torch.fx.Node) else None
    if t is not None and t.dtype == torch.bool:
        raise c.unsupported("indexing with a boolean mask (its result's shape depends on the values)")
    return c.node("Gather", [x, idx[k]], {"axis": k})[0]


# ---------------------------------------------------------------- attention
_NEG_INF = np.float32(-np.inf)


def _attention_values(c: _Converter, q, k, v, q_shape, k_shape, scale: float, masks=()):
    """softmax(q·kᵀ·scale + masks)·v, and the probabilities. ``masks``: (value, kind) with kind
    ``"add"`` (a float mask, added), ``"keep"`` (bool, True = attend: SDPA's convention) or
    ``"drop"`` (bool, True = masked out: nn.MultiheadAttention's)."""
    rank = len(k_shape)
    perm = list(range(rank))
    perm[-1], perm[-2] = perm[-2], perm[-1]
    kt = c.node("Transpose", [k], {"perm": perm}, suffix="_kt")[0]
    sc = c.node("MatMul", [q, kt], suffix="_qk")[0]
    sc = c.node("Mul", [sc, c.const(np.array(scale, np.float32), "scale")], suffix="_scale")[0]
    ninf = None
    for i, (m, kind) in enumerate(masks):
        if kind == "add":
            sc = c.node("Add", [sc, m], suffix=f"_mask{i}")[0]
        else:
            ninf = ninf or c.const(np.array(_NEG_INF), "neg_inf")
            ins = [m, sc, ninf] if kind == "keep" else [m, ninf, sc]
            sc = c.node("Where", ins, suffix=f"_mask{i}")[0]
    p = c.node("Softmax", [sc], {"axis": -1}, suffix="_softmax")[0]
    return c.node("MatMul", [p, v], suffix="_pv")[0], p


def _sdpa_fn(c: _Converter, n, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
             enable_gqa=False):
    if dropout_p:
        raise c.unsupported("scaled_dot_product_attention with dropout_p > 0 (it drops at random, in eval too)")
    fx = dict(zip(("query", "key", "value", "attn_mask"), n.args))
    fx.update({k: v for k, v in n.kwargs.items()})
    q_shape, k_shape = c.shape_of(fx["query"]), c.shape_of(fx["key"])
    if enable_gqa and q_shape[-3] != k_shape[-3]:
        raise c.unsupported("scaled_dot_product_attention with grouped-query heads (enable_gqa)")
    masks = []
    if is_causal:
        L, S = q_shape[-2], k_shape[-2]
        masks.append((c.const(np.tril(np.ones((L, S), bool)), "causal"), "keep"))
    if attn_mask is not None:
        bool_mask = c.cval(fx["attn_mask"]).dtype == torch.bool
        masks.append((attn_mask, "keep" if bool_mask else "add"))
    sc = float(scale) if scale is not None else 1.0 / math.sqrt(q_shape[-1])
    return _attention_values(c, query, key, value, q_shape, k_shape, sc, masks)[0]


def _mha(c: _Converter, n, mod: nn.MultiheadAttention, query, key, value, key_padding_mask=None, need_weights=True,
         attn_mask=None, average_attn_weights=True, is_causal=False):
    """nn.MultiheadAttention (eval): the input projections, per-head attention with both masks,
    the output projection; returns (output, head-averaged or per-head weights or None)."""
    if mod.bias_k is not None or mod.add_zero_attn:
        raise c.unsupported("MultiheadAttention with add_bias_kv or add_zero_attn")
    fx = dict(zip(("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask"), n.args))
    fx.update(n.kwargs)
    E, H = mod.embed_dim, mod.num_heads
    D = E // H
    name = str(n.target)
    qs, ks = c.shape_of(fx["query"]), c.shape_of(fx["key"])
    if not mod.batch_first:  # [L, N, E] -> [N, L, E]
        query, key, value = (c.node("Transpose", [t], {"perm": [1, 0, 2]}, suffix=f"_bf{i}")[0]
                             for i, t in enumerate((query, key, value)))
        qs, ks = [qs[1], qs[0], qs[2]], [ks[1], ks[0], ks[2]]
    if mod._qkv_same_embed_dim:
        w = _np(mod.in_proj_weight)
        ws = [w[:E], w[E:2 * E], w[2 * E:]]
    else:
        ws = [_np(mod.q_proj_weight), _np(mod.k_proj_weight), _np(mod.v_proj_weight)]
    bs = np.split(_np(mod.in_proj_bias), 3) if mod.in_proj_bias is not None else [None] * 3
    heads = []
    for t, w_, b_, tag in zip((query, key, value), ws, bs, "qkv"):
        y = c.node("MatMul", [t, c.g.add_const(w_.T.copy(), f"{name}.{tag}_proj.weight_T")], suffix=f"_{tag}")[0]
        if b_ is not None:
            y = c.node("Add", [y, c.g.add_const(b_.copy(), f"{name}.{tag}_proj.bias")], suffix=f"_{tag}_bias")[0]
        y = c.node("Reshape", [y, c.ints([0, 0, H, D], f"{tag}_heads")], suffix=f"_{tag}_heads")[0]
        heads.append(c.node("Transpose", [y], {"perm": [0, 2, 1, 3]}, suffix=f"_{tag}_t")[0])  # [N, H, L, D]
    masks = []
    if attn_mask is not None:
        am = c.cval(fx["attn_mask"])
        m = attn_mask
        if am.dim() == 3:  # [N*H, L, S] -> [N, H, L, S]
            m = c.node("Reshape", [m, c.ints([-1, H, qs[1], ks[1]], "mask_heads")], suffix="_mask_heads")[0]
        masks.append((m, "drop" if am.dtype == torch.bool else "add"))
    if key_padding_mask is not None:  # [N, S] -> [N, 1, 1, S]
        kp = c.cval(fx["key_padding_mask"])
        m = c.node("Unsqueeze", [key_padding_mask, c.ints([1, 2], "kpm_axes")], suffix="_kpm")[0]
        masks.append((m, "drop" if kp.dtype == torch.bool else "add"))
    out, p = _attention_values(c, *heads, [qs[0], H, qs[1], D], [ks[0], H, ks[1], D], 1.0 / math.sqrt(D), masks)
    out = c.node("Transpose", [out], {"perm": [0, 2, 1, 3]}, suffix="_merge_t")[0]
    out = c.node("Reshape", [out, c.ints([0, 0, E], "merge")], suffix="_merge")[0]
    op = mod.out_proj
    out = c.node("MatMul", [out, c.g.add_const(_np(op.weight).T.copy(), f"{name}.out_proj.weight_T")],
                 suffix="_out")[0]
    if op.bias is not None:
        out = c.node("Add", [out, c.param(op.bias, f"{name}.out_proj.bias")], suffix="_out_bias")[0]
    if not mod.batch_first:
        out = c.node("Transpose", [out], {"perm": [1, 0, 2]}, suffix="_out_t")[0]
    if not need_weights:
        return (out, None)
    if average_attn_weights:
        p = c.node("ReduceMean", [p], {"axes": [1], "keepdims": 0}, suffix="_avg")[0] if c.opset < 18 else \
            c.node("ReduceMean", [p, c.ints([1], "avg_axes")], {"keepdims": 0}, suffix="_avg")[0]
    return (out, p)


# ---------------------------------------------------------------- resampling, gathering
def _interpolate_fn(c: _Converter, n, x, size=None, scale_factor=None, mode="nearest", align_corners=None,
                    recompute_scale_factor=None, antialias=False):
    if antialias:
        raise c.unsupported("interpolate with antialias=True")
    if mode == "nearest":
        attrs = {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}
    elif mode in ("linear", "bilinear"):
        attrs = {"mode": "linear", "coordinate_transformation_mode": "align_corners" if align_corners
                 else "pytorch_half_pixel"}
    else:
        raise c.unsupported(f"interpolate mode '{mode}' (nearest, linear and bilinear are)")
    in_shape = c.shape_of(n.args[0])
    nd = len(in_shape) - 2
    if scale_factor is not None and not recompute_scale_factor:  # torch maps coordinates with the given factor
        sf = list(scale_factor) if isinstance(scale_factor, (list, tuple)) else [scale_factor] * nd
        scales = c.const(np.array([1.0, 1.0, *sf], np.float32), "scales")
        return c.node("Resize", [x, None, scales], attrs)[0]
    out = list(c.shape_of(n))[2:]
    lead = c.node("Slice", [c.node("Shape", [x], suffix="_shape")[0], c.ints([0], "s0"), c.ints([2], "s2")],
                  suffix="_nc")[0]
    sizes = c.node("Concat", [lead, c.ints(out, "spatial")], {"axis": 0}, suffix="_sizes")[0]
    return c.node("Resize", [x, None, None, sizes], attrs)[0]


def _upsample(c, n, mod: nn.Upsample, x):
    return _interpolate_fn(c, n, x, mod.size, mod.scale_factor, mod.mode, mod.align_corners,
                           getattr(mod, "recompute_scale_factor", None))


def _factory_fn(c: _Converter, n, *args, **kwargs):
    """torch.arange/zeros/ones/full of sizes the trace knows: the tensor it made on the example
    inputs, as a constant, unless a size reads a symbolic batch dimension."""
    if any(_batch_source(c, a) is not None for a in [*n.args, *n.kwargs.values()]):
        raise c.unsupported(f"{n.target.__name__} of a size read from the batch dimension")
    t = c.concrete.get(n)
    if not isinstance(t, torch.Tensor):
        raise c.unsupported(f"{n.target.__name__} without a tensor result")
    return c.const(_np(t), "made")


def _embedding_values(c: _Converter, ids, w_t: torch.Tensor, wname: str, max_norm):
    if max_norm is not None:
        raise c.unsupported("embedding with max_norm (it renormalizes rows in place)")
    return c.node("Gather", [c.param(w_t, wname), ids], {"axis": 0})[0]


def _embedding(c, n, mod: nn.Embedding, ids):
    return _embedding_values(c, ids, mod.weight, f"{n.target}.weight", mod.max_norm)


def _embedding_fn(c, n, ids, weight, padding_idx=None, max_norm=None, *a, **k):
    w_node = n.args[1] if len(n.args) > 1 else n.kwargs["weight"]
    return _embedding_values(c, ids, _tensor_of(c, w_node), f"{n.name}.weight", max_norm)


def _gather_fn(c, n, x, dim, index, *, sparse_grad=False):
    return c.node("GatherElements", [x, index], {"axis": int(dim)})[0]


def _index_select_fn(c, n, x, dim, index):
    return c.node("Gather", [x, index], {"axis": int(dim)})[0]


def _extreme_fn(kind: str):
    """torch.max / torch.min: of a whole tensor, elementwise with another tensor, or along
    ``dim`` as the (values, indices) pair."""
    red, arg, elem = {"max": ("ReduceMax", "ArgMax", "Max"), "min": ("ReduceMin", "ArgMin", "Min")}[kind]

    def fn(c: _Converter, n, x, dim=None, keepdim=False, *, out=None):
        if isinstance(dim, Value):
            return c.node(elem, [x, dim])[0]
        rank = c.rank_of(n.args[0])
        if dim is None:
            return c.node(red, [x, c.ints(list(range(rank)), "axes")] if c.opset >= 18 else [x],
                          {"keepdims": 0} if c.opset >= 18 else {"axes": list(range(rank)), "keepdims": 0})[0]
        d = _norm_axis(int(dim), rank)
        vals = c.node(red, [x, c.ints([d], "axes")] if c.opset >= 18 else [x],
                      {"keepdims": int(bool(keepdim))} if c.opset >= 18 else {"axes": [d], "keepdims": int(bool(keepdim))},
                      suffix="_values")[0]
        idx = c.node(arg, [x], {"axis": d, "keepdims": int(bool(keepdim))}, suffix="_indices")[0]
        return (vals, idx)

    return fn


def _topk_fn(c, n, x, k, dim=-1, largest=True, sorted=True):  # noqa: A002 - torch's names
    if not sorted:
        raise c.unsupported("topk with sorted=False (the order is unspecified, so no export can match it)")
    return tuple(c.node("TopK", [x, c.ints([int(k)], "k")], {"axis": int(dim), "largest": int(bool(largest)),
                                                               "sorted": 1}, n_out=2))


def _contiguous_fn(c, n, x, *a, **k):
    return x


_FUNCTIONS: dict[Any, Any] = {
    operator.add: _binary("Add"), operator.iadd: _binary("Add"), torch.add: _binary("Add"), "Tensor.add": _binary("Add"),
    "Tensor.add_": _binary("Add"),
    operator.sub: _binary("Sub"), operator.isub: _binary("Sub"), torch.sub: _binary("Sub"), "Tensor.sub": _binary("Sub"),
    operator.mul: _binary("Mul"), operator.imul: _binary("Mul"), torch.mul: _binary("Mul"), "Tensor.mul": _binary("Mul"),
    "Tensor.mul_": _binary("Mul"),
    operator.truediv: _binary("Div"), torch.div: _binary("Div"), "Tensor.div": _binary("Div"),
    operator.matmul: _matmul_fn, torch.matmul: _matmul_fn, torch.bmm: _matmul_fn, "Tensor.matmul": _matmul_fn,
    torch.cat: _cat_fn, torch.concat: _cat_fn, torch.stack: _stack_fn,
    torch.split: _split_fn, "Tensor.split": _split_fn, torch.chunk: _chunk_fn, "Tensor.chunk": _chunk_fn,
    torch.flatten: _flatten_fn, "Tensor.flatten": _flatten_fn,
    "Tensor.view": _view_fn, "Tensor.reshape": _view_fn, torch.reshape: _view_fn,
    torch.permute: _permute_fn, "Tensor.permute": _permute_fn, torch.transpose: _transpose_fn,
    "Tensor.transpose": _transpose_fn,
    torch.mean: _reduce_fn("ReduceMean"), "Tensor.mean": _reduce_fn("ReduceMean"),
    torch.sum: _reduce_fn("ReduceSum"), "Tensor.sum": _reduce_fn("ReduceSum"),
    torch.relu: _relu_fn, F.relu: _relu_fn, "Tensor.relu": _relu_fn, F.relu6: _relu6_fn, F.hardtanh: _hardtanh_fn,
    torch.clamp: _clamp_fn, "Tensor.clamp": _clamp_fn, torch.clip: _clamp_fn,
    F.leaky_relu: _leaky_fn, F.gelu: _gelu_fn, F.silu: _silu_fn, F.hardswish: _hardswish_fn,
    F.hardsigmoid: _hardsigmoid_fn,
    torch.sigmoid: _unary_fn("Sigmoid"), F.sigmoid: _unary_fn("Sigmoid"), "Tensor.sigmoid": _unary_fn("Sigmoid"),
    torch.tanh: _unary_fn("Tanh"), F.tanh: _unary_fn("Tanh"), "Tensor.tanh": _unary_fn("Tanh"),
    torch.exp: _unary_fn("Exp"), "Tensor.exp": _unary_fn("Exp"), torch.sqrt: _unary_fn("Sqrt"),
    "Tensor.sqrt": _unary_fn("Sqrt"), torch.neg: _unary_fn("Neg"), operator.neg: _unary_fn("Neg"),
    torch.abs: _unary_fn("Abs"), "Tensor.abs": _unary_fn("Abs"), torch.erf: _unary_fn("Erf"),
    torch.softmax: _softmax_fn, F.softmax: _softmax_fn, "Tensor.softmax": _softmax_fn,
    F.dropout: _identity_fn, "Tensor.contiguous": _contiguous_fn, "Tensor.clone": _contiguous_fn,
    F.linear: _linear_fn, F.layer_norm: _layer_norm_fn,
    F.adaptive_avg_pool2d: _adaptive_avg_fn, F.avg_pool2d: _avg_pool_fn, F.max_pool2d: _max_pool_fn,
    F.pad: _pad_fn, torch.unsqueeze: _unsqueeze_fn, "Tensor.unsqueeze": _unsqueeze_fn,
    torch.squeeze: _squeeze_fn, "Tensor.squeeze": _squeeze_fn,
    "Tensor.size": _size_fn, getattr: _getattr_fn, operator.getitem: _getitem_fn,
    "Tensor.dim": _dim_fn, "Tensor.ndimension": _dim_fn,
    operator.lt: _compare("Less"), torch.lt: _compare("Less"), "Tensor.lt": _compare("Less"),
    operator.gt: _compare("Greater"), torch.gt: _compare("Greater"), "Tensor.gt": _compare("Greater"),
    operator.le: _compare("LessOrEqual"), torch.le: _compare("LessOrEqual"), "Tensor.le": _compare("LessOrEqual"),
    operator.ge: _compare("GreaterOrEqual"), torch.ge: _compare("GreaterOrEqual"),
    "Tensor.ge": _compare("GreaterOrEqual"), operator.eq: _compare("Equal"), torch.eq: _compare("Equal"),
    "Tensor.eq": _compare("Equal"), operator.ne: _compare("Equal", negate=True),
    torch.ne: _compare("Equal", negate=True), "Tensor.ne": _compare("Equal", negate=True),
    torch.where: _where_fn, "Tensor.masked_fill": _masked_fill_fn, torch.cumsum: _cumsum_fn,
    "Tensor.cumsum": _cumsum_fn, torch.argmax: _argmax_fn, "Tensor.argmax": _argmax_fn,
    "Tensor.expand": _expand_fn, "Tensor.repeat": _repeat_fn, torch.einsum: _einsum_fn, torch.roll: _roll_fn,
    "Tensor.roll": _roll_fn,
    "Tensor.float": _cast_fn(onnx.TensorProto.FLOAT), "Tensor.long": _cast_fn(onnx.TensorProto.INT64),
    "Tensor.int": _cast_fn(onnx.TensorProto.INT32), "Tensor.bool": _cast_fn(onnx.TensorProto.BOOL),
    F.scaled_dot_product_attention: _sdpa_fn, F.interpolate: _interpolate_fn, torch.gather: _gather_fn,
    "Tensor.gather": _gather_fn, torch.index_select: _index_select_fn, "Tensor.index_select": _index_select_fn,
    torch.topk: _topk_fn, "Tensor.topk": _topk_fn, torch.max: _extreme_fn("max"), "Tensor.max": _extreme_fn("max"),
    torch.min: _extreme_fn("min"), "Tensor.min": _extreme_fn("min"),
}
_FUNCTIONS[F.embedding] = _embedding_fn
_FUNCTIONS.update({F.batch_norm: _batch_norm_fn, torch.unbind: _unbind_fn, "Tensor.unbind": _unbind_fn,
                   "Tensor.reshape_as": _reshape_as_fn, "Tensor.view_as": _reshape_as_fn,
                   "Tensor.expand_as": _expand_as_fn, "Tensor.type_as": _type_as_fn})
_FUNCTIONS.update({f: _factory_fn for f in (torch.arange, torch.zeros, torch.ones, torch.full)})
_MODULES.update({nn.MultiheadAttention: _mha, nn.Upsample: _upsample, nn.Embedding: _embedding})


# ---------------------------------------------------------------- more of what modern blocks call
def _pow_fn(c, n, x, exponent):
    if not isinstance(x, Value) and not isinstance(exponent, Value):  # shape arithmetic
        return x ** exponent
    if not isinstance(x, Value):  # scalar ** tensor
        return c.node("Pow", [c.val(x, exponent), exponent])[0]
    if isinstance(exponent, (int, float)) and float(exponent) == 2.0:
        return c.node("Mul", [x, x])[0]  # exact, as torch computes x * x for pow 2
    return c.node("Pow", [x, c.val(exponent, x)])[0]


def _rsqrt_fn(c, n, x):
    return c.node("Reciprocal", [c.node("Sqrt", [x], suffix="_sqrt")[0]])[0]


def _var_values(c: _Converter, n, x, dim, correction, keepdim):
    rank = c.rank_of(n.args[0])
    shape = c.shape_of(n.args[0])
    dims = list(range(rank)) if dim is None else ([dim] if isinstance(dim, int) else list(dim))
    dims = sorted(_norm_axis(d, rank) for d in dims)
    mean = _reduce_fn("ReduceMean")(c, n, x, dims, True)
    d = c.node("Sub", [x, mean], suffix="_centered")[0]
    v = _reduce_fn("ReduceMean")(c, n, c.node("Mul", [d, d], suffix="_sq")[0], dims, keepdim)
    count = int(np.prod([shape[i] for i in dims]))
    if correction:
        v = c.node("Mul", [v, c.const(np.array(count / max(count - correction, 1), np.float32), "bessel")],
                   suffix="_unbiased")[0]
    return v


def _var_fn(c, n, x, dim=None, unbiased=None, keepdim=False, *, correction=None):
    if isinstance(dim, bool):  # var(x, unbiased)
        dim, unbiased = None, dim
    corr = correction if correction is not None else (0 if unbiased is False else 1)
    return _var_values(c, n, x, dim, corr, keepdim)


def _norm_values(c: _Converter, n, x, p, dim, keepdim):
    if p not in (2, 2.0, "fro", None, 1, 1.0):
        raise c.unsupported(f"norm with p={p}")
    rank = c.rank_of(n.args[0])
    dims = list(range(rank)) if dim is None else ([dim] if isinstance(dim, int) else list(dim))
    dims = sorted(_norm_axis(d, rank) for d in dims)
    op = "ReduceL1" if p in (1, 1.0) else "ReduceL2"
    if c.opset >= 18:
        return c.node(op, [x, c.ints(dims, "axes")], {"keepdims": int(bool(keepdim))})[0]
    return c.node(op, [x], {"axes": dims, "keepdims": int(bool(keepdim))})[0]


def _norm_fn(c, n, x, p="fro", dim=None, keepdim=False, dtype=None):
    return _norm_values(c, n, x, p, dim, keepdim)


def _normalize_fn(c, n, x, p=2.0, dim=1, eps=1e-12, out=None):
    nrm = _norm_values(c, n, x, p, dim, True)
    nrm = c.node("Max", [nrm, c.const(np.array(eps, np.float32), "eps")], suffix="_clamp")[0]
    return c.node("Div", [x, nrm])[0]


def _unflatten_values(c: _Converter, n, x, dim, sizes):
    shape = c.shape_of(n.args[0])
    d = _norm_axis(int(dim), len(shape))
    sizes = [int(s) for s in sizes]
    if -1 in sizes:
        known = int(np.prod([s for s in sizes if s != -1]))
        sizes = [shape[d] // known if s == -1 else s for s in sizes]
    return _reshape_values(c, n, x, shape[:d] + sizes + shape[d + 1:])


def _unflatten_fn(c, n, x, dim, sizes):
    return _unflatten_values(c, n, x, dim, sizes)


def _unflatten_mod(c, n, mod, x):
    return _unflatten_values(c, n, x, mod.dim, mod.unflattened_size)


def _t_fn(c, n, x):
    return x if c.rank_of(n.args[0]) < 2 else c.node("Transpose", [x], {"perm": [1, 0]})[0]


def _flip_fn(c, n, x, *dims, **kw):
    dims = kw["dims"] if "dims" in kw else (dims[0] if len(dims) == 1 and isinstance(dims[0], (list, tuple)) else dims)
    dims = [dims] if isinstance(dims, int) else list(dims)
    rank = c.rank_of(n.args[0])
    axes = [_norm_axis(d, rank) for d in dims]
    big = 2 ** 62
    return c.node("Slice", [x, c.ints([-1] * len(axes), "starts"), c.ints([-big] * len(axes), "ends"),
                            c.ints(axes, "axes"), c.ints([-1] * len(axes), "steps")])[0]


def _narrow_fn(c, n, x, dim, start, length):
    if isinstance(start, Value):
        raise c.unsupported("narrow at a computed start")
    rank = c.rank_of(n.args[0])
    d = _norm_axis(int(dim), rank)
    s = _norm_axis(int(start), c.shape_of(n.args[0])[d]) if int(start) < 0 else int(start)
    return c.node("Slice", [x, c.ints([s], "starts"), c.ints([s + int(length)], "ends"), c.ints([d], "axes")])[0]


def _mish_values(c: _Converter, x):
    sp = c.node("Softplus", [x], suffix="_softplus")[0]
    return c.node("Mul", [x, c.node("Tanh", [sp], suffix="_tanh")[0]])[0]


def _mish_fn(c, n, x, inplace=False):
    return _mish_values(c, x)


def _mish(c, n, mod, x):
    return _mish_values(c, x)


def _elu_fn(c, n, x, alpha=1.0, inplace=False):
    return c.node("Elu", [x], {"alpha": float(alpha)})[0]


def _elu(c, n, mod, x):
    return c.node("Elu", [x], {"alpha": float(mod.alpha)})[0]


def _softplus_values(c: _Converter, x, beta, threshold):
    """torch's softplus: log(1 + exp(beta x)) / beta, and x itself where beta x > threshold."""
    bx = x if beta == 1 else c.node("Mul", [x, c.const(np.array(beta, np.float32), "beta")], suffix="_beta")[0]
    sp = c.node("Softplus", [bx], suffix="_sp")[0]
    if beta != 1:
        sp = c.node("Div", [sp, c.const(np.array(beta, np.float32), "beta")], suffix="_div")[0]
    over = c.node("Greater", [bx, c.const(np.array(threshold, np.float32), "threshold")], suffix="_over")[0]
    return c.node("Where", [over, x, sp])[0]


def _softplus_fn(c, n, x, beta=1.0, threshold=20.0):
    return _softplus_values(c, x, float(beta), float(threshold))


def _softplus(c, n, mod, x):
    return _softplus_values(c, x, float(mod.beta), float(mod.threshold))


def _log_softmax_fn(c, n, x, dim=None, *a, **k):
    return c.node("LogSoftmax", [x], {"axis": int(-1 if dim is None else dim)})[0]


def _baddbmm_fn(c, n, inp, b1, b2, *, beta=1, alpha=1):
    y = c.node("MatMul", [b1, b2], suffix="_mm")[0]
    if alpha != 1:
        y = c.node("Mul", [y, c.val(float(alpha), y)], suffix="_alpha")[0]
    if beta == 0:
        return y
    if beta != 1:
        inp = c.node("Mul", [inp, c.val(float(beta), inp)], suffix="_beta")[0]
    return c.node("Add", [inp, y])[0]


def _zero_pad(c, n, mod, x):
    return _pad_fn(c, n, x, list(mod.padding), "constant", 0.0)


def _pixel_shuffle_values(c: _Converter, x, r):
    return c.node("DepthToSpace", [x], {"blocksize": int(r), "mode": "CRD"})[0]


def _pixel_shuffle_fn(c, n, x, upscale_factor):
    return _pixel_shuffle_values(c, x, upscale_factor)


def _pixel_shuffle(c, n, mod, x):
    return _pixel_shuffle_values(c, x, mod.upscale_factor)


def _instance_norm_values(c: _Converter, n, x, w_t, b_t, eps, wname, bname):
    ch = c.shape_of(n.args[0])[1]
    w = c.param(w_t, wname) if w_t is not None else c.const(np.ones(ch, np.float32), "scale")
    b = c.param(b_t, bname) if b_t is not None else c.const(np.zeros(ch, np.float32), "bias")
    return c.node("InstanceNormalization", [x, w, b], {"epsilon": float(eps)})[0]


def _instance_norm(c, n, mod, x):
    if mod.track_running_stats:
        raise c.unsupported("InstanceNorm with track_running_stats (eval uses running statistics)")
    return _instance_norm_values(c, n, x, mod.weight, mod.bias, mod.eps, f"{n.target}.weight", f"{n.target}.bias")


def _instance_norm_fn(c, n, x, running_mean=None, running_var=None, weight=None, bias=None, use_input_stats=True,
                      momentum=0.1, eps=1e-5):
    if not use_input_stats:
        raise c.unsupported("instance_norm with use_input_stats=False")
    w = _tensor_of(c, n.kwargs.get("weight", n.args[3] if len(n.args) > 3 else None)) if weight is not None else None
    b = _tensor_of(c, n.kwargs.get("bias", n.args[4] if len(n.args) > 4 else None)) if bias is not None else None
    return _instance_norm_values(c, n, x, w, b, eps, f"{n.name}.weight", f"{n.name}.bias")


def _group_norm_fn(c, n, x, num_groups, weight=None, bias=None, eps=1e-5):
    args = list(n.args) + [None] * 4
    w_node = args[2] if args[2] is not None else n.kwargs.get("weight")
    b_node = args[3] if args[3] is not None else n.kwargs.get("bias")
    return _group_norm_values(c, n, x, int(num_groups), _tensor_of(c, w_node) if w_node is not None else None,
                              _tensor_of(c, b_node) if b_node is not None else None, float(eps), n.name)


def _like_fn(fill: float):
    """zeros_like / ones_like / new_zeros / new_ones: a constant of the shape the trace saw,
    unless that shape holds the symbolic batch (then ConstantOfShape of the input's Shape)."""
    def fn(c: _Converter, n, x, *size, **kw):
        if size:  # x.new_zeros(size): the size is what the trace knows
            t = c.concrete.get(n)
            if any(_batch_source(c, a) is not None for a in n.args[1:]):
                raise c.unsupported(f"{n.target} of a size read from the batch dimension")
            return c.const(_np(t), "made")
        shp = c.node("Shape", [x], suffix="_shape")[0]
        return c.node("ConstantOfShape", [shp], {"value": np.array([fill], np.float32)})[0]

    return fn


def _to_fn(c, n, x, *args, **kw):
    """Tensor.to(device / dtype / tensor): a device move is nothing in ONNX; a dtype a Cast."""
    dtype = kw.get("dtype")
    for a in args:
        if isinstance(a, torch.dtype):
            dtype = a
        elif isinstance(a, Value):
            raise c.unsupported("Tensor.to(other tensor)")
    if dtype is None:
        return x
    if dtype not in _ONNX_DTYPE:
        raise c.unsupported(f"Tensor.to({dtype})")
    return c.node("Cast", [x], {"to": _ONNX_DTYPE[dtype]})[0]


def _amax_fn(kind: str):
    op = {"max": "ReduceMax", "min": "ReduceMin"}[kind]

    def fn(c, n, x, dim=(), keepdim=False):
        rank = c.rank_of(n.args[0])
        dims = list(range(rank)) if dim in ((), [], None) else ([dim] if isinstance(dim, int) else list(dim))
        dims = sorted(_norm_axis(d, rank) for d in dims)
        if c.opset >= 18:
            return c.node(op, [x, c.ints(dims, "axes")], {"keepdims": int(bool(keepdim))})[0]
        return c.node(op, [x], {"axes": dims, "keepdims": int(bool(keepdim))})[0]

    return fn


def _floordiv_fn(c, n, a, b):
    if not isinstance(a, Value) and not isinstance(b, Value):  # shape arithmetic
        return a // b
    like = a if isinstance(a, Value) else b
    return c.node("Floor", [c.node("Div", [c.val(a, like), c.val(b, like)], suffix="_div")[0]])[0]


_FUNCTIONS.update({
    torch.pow: _pow_fn, "Tensor.pow": _pow_fn, operator.pow: _pow_fn, torch.rsqrt: _rsqrt_fn, "Tensor.rsqrt": _rsqrt_fn,
    torch.var: _var_fn, "Tensor.var": _var_fn, torch.norm: _norm_fn, "Tensor.norm": _norm_fn,
    F.normalize: _normalize_fn, torch.unflatten: _unflatten_fn, "Tensor.unflatten": _unflatten_fn,
    torch.t: _t_fn, "Tensor.t": _t_fn, torch.flip: _flip_fn, "Tensor.flip": _flip_fn,
    torch.narrow: _narrow_fn, "Tensor.narrow": _narrow_fn, F.mish: _mish_fn, F.elu: _elu_fn,
    F.softplus: _softplus_fn, F.log_softmax: _log_softmax_fn, torch.log_softmax: _log_softmax_fn,
    "Tensor.log_softmax": _log_softmax_fn, "Tensor.bmm": _matmul_fn, torch.masked_fill: _masked_fill_fn,
    torch.baddbmm: _baddbmm_fn, F.pixel_shuffle: _pixel_shuffle_fn, torch.pixel_shuffle: _pixel_shuffle_fn,
    F.instance_norm: _instance_norm_fn, F.group_norm: _group_norm_fn,
    torch.zeros_like: _like_fn(0.0), torch.ones_like: _like_fn(1.0), "Tensor.new_zeros": _like_fn(0.0),
    "Tensor.new_ones": _like_fn(1.0), "Tensor.to": _to_fn, torch.amax: _amax_fn("max"), "Tensor.amax": _amax_fn("max"),
    torch.amin: _amax_fn("min"), "Tensor.amin": _amax_fn("min"), operator.floordiv: _floordiv_fn,

})
_MODULES.update({nn.Unflatten: _unflatten_mod, nn.Mish: _mish, nn.ELU: _elu, nn.Softplus: _softplus,
                 nn.ZeroPad2d: _zero_pad, nn.PixelShuffle: _pixel_shuffle, nn.InstanceNorm1d: _instance_norm,
                 nn.InstanceNorm2d: _instance_norm})
# run-time checks: they held on the example inputs (the model ran once), so they are dropped
_CHECKS = {torch._assert, torch.fx._symbolic_trace._assert_is_none}


# ====================================================================== entry point
def _bind_arguments(module: nn.Module, n_inputs: int, constants: dict[str, Any]) -> tuple[dict[str, Any], list]:
    """forward's arguments beyond the example inputs: ``(concrete, trailing)``, the non-tensor
    ones fx specializes on (bound from ``constants`` or their default), and the values of every
    trailing placeholder in order, for running the traced module."""
    import inspect

    try:
        sig = inspect.signature(module.forward)
    except (TypeError, ValueError):
        return {}, []
    params = [p for p in sig.parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    unknown = [k for k in constants if k not in {p.name for p in params}]
    if unknown:
        raise FrontendError(f"torch front end: forward() has no argument {unknown[0]!r} to bind")
    concrete = {}
    for p in params[n_inputs:]:
        if p.name in constants:
            concrete[p.name] = constants[p.name]
        elif p.default is p.empty:
            raise FrontendError(f"torch front end: forward() needs argument {p.name!r}: give it among the example "
                                "inputs (a tensor) or in constants (a Python value)")
        elif not isinstance(p.default, torch.Tensor):
            concrete[p.name] = p.default
    return concrete, [concrete.get(p.name, p.default) for p in params[n_inputs:]]



@with_gc_paused
def _export_fallback(module, example_inputs, concrete, opset, dynamic_batch, infer_shapes, why: str | None) -> Graph:
    """``torch.onnx.export(dynamo=True)`` + the ONNX front end; ``why`` the fx path failed (None:
    the exporter was asked for). A warning names that reason; if the exporter fails too, the
    error names both."""
    from graphopt.frontends.torch_export import EXPORTER, export_graph

    try:
        graph = export_graph(module, example_inputs, concrete, opset=opset, dynamic_batch=dynamic_batch,
                             infer_shapes=infer_shapes)
    except FrontendError as e:
        if why is None:
            raise FrontendError(f"torch front end: {e}") from e
        raise FrontendError(f"torch front end: {why}, and {e}") from e
    if why is not None:
        log.warning("torch front end: %s; converted it through %s instead", why, EXPORTER)
    return graph


def from_torch(module: nn.Module, example_inputs: torch.Tensor | Sequence[torch.Tensor], *,
               opset: int = DEFAULT_OPSET, dynamic_batch: bool = True, infer_shapes: bool = True,
               constants: dict[str, Any] | None = None, exporter: str = "auto") -> Graph:
    """Convert ``module`` (put in eval mode) into a graphopt ``Graph``.

    ``example_inputs``: a tensor or a tuple of tensors with the shapes the model expects.
    ``forward``'s other arguments that have a non-tensor default (``attn_mask=None``, ``scale=1.0``,
    keyword-only flags) are bound to that default, or to ``constants[name]``, with fx's
    ``concrete_args``: ``if attn_mask is not None`` branches are decided at trace time.
    ``torch._assert`` checks are evaluated on the example inputs and dropped (the log says how many).
    ``dynamic_batch``: name dim 0 of every input ``batch`` so the graph takes any batch size.
    ``exporter``: ``"auto"`` traces with torch.fx and, when fx cannot trace the module (Python
    control flow on shapes, a library fx refuses) or its conversion meets an op, argument or
    dtype it has no mapping for, falls back to ``torch.onnx.export(dynamo=True)`` and the ONNX
    front end, with one warning that names the reason (the op and the module)
    (``graphopt.frontends.torch_export``); ``"fx"`` never falls back; ``"export"`` always exports.
    Raises ``UnsupportedOpError`` naming the op and module path for anything it cannot map,
    and ``FrontendError`` when the module cannot be traced or rejects the example inputs.
    """
    if not isinstance(module, nn.Module):
        raise FrontendError(f"from_torch needs an nn.Module, got {type(module).__name__}")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    example_inputs = tuple(torch.as_tensor(x) for x in example_inputs)
    was_training = module.training
    module.eval()
    if exporter not in ("auto", "fx", "export"):
        raise FrontendError(f"torch front end: exporter must be auto, fx or export, not '{exporter}'")
    concrete, trailing = _bind_arguments(module, len(example_inputs), constants or {})
    try:
        gm = None
        if exporter != "export":
            try:
                gm = torch.fx.symbolic_trace(module, concrete_args=concrete or None)
            except Exception as e:
                why = str(e).splitlines()[0] if str(e) else type(e).__name__
                if exporter == "fx":
                    raise FrontendError(f"torch front end: torch.fx cannot trace {type(module).__name__} "
                                        f"(data-dependent control flow?): {why}") from e
                fx_error = why
        if gm is None:
            return _export_fallback(module, example_inputs, concrete, opset, dynamic_batch, infer_shapes,
                                    None if exporter == "export" else
                                    f"torch.fx cannot trace {type(module).__name__} ({fx_error})")
        rec = _ConcreteRecorder(gm)
        try:
            with torch.no_grad():
                rec.run(*example_inputs, *trailing)
        except Exception as e:
            shapes = ", ".join(str(list(x.shape)) for x in example_inputs)
            raise FrontendError(f"torch front end: the model rejects example input(s) of shape {shapes}: "
                                f"{str(e).splitlines()[0]}") from e
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        for p, x in zip(placeholders, example_inputs):
            rec.values[p] = x
        conv = _Converter(gm, rec.values, opset, dynamic_batch)
        try:
            graph = conv.convert()
        except UnsupportedOpError as e:
            if exporter != "auto":
                raise
            # fx traced it, but an op has no fx mapping here: the exporter knows more ops
            return _export_fallback(module, example_inputs, concrete, opset, dynamic_batch, infer_shapes,
                                    f"torch.fx traced {type(module).__name__} but graphopt's fx path has no mapping for "
                                    f"{str(e).removeprefix('torch front end: unsupported op ')}")
        if conv.dropped_checks:
            log.info("torch front end: %d run-time checks (torch._assert) held on the example inputs and were "
                     "dropped", conv.dropped_checks)
    finally:
        module.train(was_training)
    graph.toposort()
    if infer_shapes:
        graph.infer_shapes()
    return graph
