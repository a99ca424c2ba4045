"""torch back end: ``Graph`` -> ``nn.Module`` that executes it with ONNX semantics.

The graph is lowered to a ``torch.fx.GraphModule``: one generated Python ``forward`` that
calls torch ops directly, so execution pays no per-node interpretation cost.

* Every floating-point constant of rank >= 1 (weights, biases) is an ``nn.Parameter``, so a
  graph born from an ONNX file can be fine-tuned; other constants are buffers, or plain
  Python values where an op needs them static (shapes, axes, pads, clip bounds).
* ``write_back(graph, module)`` copies trained parameters into the graph's constants.
* A weight with an element/N:M mask (``graphopt.masks``) runs as ``where(keep, w, 0)``: its
  dropped entries are exactly zero in every forward pass and get no gradient, so they stay
  zero through every optimizer step; ``write_back`` stores the masked weights.
* BatchNormalization uses its stored statistics (ONNX inference semantics), in ``train()`` as
  in ``eval()``, unless ``to_torch(graph, train_bn=True)``: then each BN whose four tensors are
  constants becomes a module that, like ``nn.BatchNorm2d``, normalizes with batch statistics
  and updates its running statistics in ``train()``; ``write_back`` stores those statistics
  too. Dropout is always the identity.
* An op with no lowering raises ``UnsupportedOpError`` naming the op and the node.
"""

from __future__ import annotations

import math
import operator
import re
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from graphopt.errors import GraphOptError, UnsupportedOpError
from graphopt.geometry import window
from graphopt.ir import Graph, Node, Value, is_param
from graphopt.masks import get_mask
from graphopt.meta import BN_STATS, MASK
from graphopt.training.bnfold import refold, refoldable

_LOWERINGS: dict[tuple[str, str], Callable[["_Builder", Node], list]] = {}
_INT64_MAX = 2 ** 63 - 1


def lowering(*op_types: str, domain: str = ""):
    def deco(fn):
        for op in op_types:
            _LOWERINGS[(domain, op)] = fn
        return fn

    return deco



# --------------------------------------------------------------------------- runtime helpers
# (module-level functions: fx's generated code calls them by name)

def _as_list(v):
    """A static list, or a tensor computed at run time (shape plumbing) -> list of ints."""
    if isinstance(v, torch.Tensor):
        return [int(i) for i in v.reshape(-1).tolist()]
    return v


def onnx_conv(x, w, b, stride, pads, dilation, groups):
    nd = w.dim() - 2
    begin, end = pads[:nd], pads[nd:]
    if begin != end:
        x = F.pad(x, [p for i in reversed(range(nd)) for p in (begin[i], end[i])])
        begin = [0] * nd
    fn = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
    return fn(x, w, b, stride, begin, dilation, groups)


def onnx_conv_transpose(x, w, b, stride, pads, output_padding, dilation, groups):
    nd = w.dim() - 2
    begin, end = pads[:nd], pads[nd:]
    if begin != end:
        raise GraphOptError("ConvTranspose with asymmetric pads is not supported by the torch back end")
    fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[nd - 1]
    return fn(x, w, b, stride, begin, output_padding, groups, dilation)


def onnx_gemm(a, b, c, alpha, beta, trans_a, trans_b):
    if trans_a:
        a = a.transpose(0, 1)
    if trans_b and alpha == 1.0 and beta == 1.0:
        return F.linear(a, b, c)
    if trans_b:
        b = b.transpose(0, 1)
    y = a @ b
    if alpha != 1.0:
        y = y * alpha
    if c is not None:
        y = y + (c * beta if beta != 1.0 else c)
    return y


def onnx_reshape(x, shape, allowzero):
    if not allowzero:
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def onnx_reshape_dynamic(x, shape_tensor, allowzero):
    return onnx_reshape(x, [int(s) for s in shape_tensor.tolist()], allowzero)


def onnx_flatten(x, axis):
    if axis < 0:
        axis += x.dim()
    lead = 1
    for d in x.shape[:axis]:
        lead *= d
    return x.reshape(lead, -1)


def onnx_slice(x, starts, ends, axes, steps):
    starts, ends, steps = _as_list(starts), _as_list(ends), _as_list(steps)
    axes = [a + x.dim() if a < 0 else a for a in (_as_list(axes) if axes is not None else range(len(starts)))]
    if steps is None:
        steps = [1] * len(starts)
    idx: list[Any] = [slice(None)] * x.dim()
    for s, e, a, st in zip(starts, ends, axes, steps):
        if st < 0:  # ONNX's clamping for a negative step, then the same walk on the flipped axis
            d = x.shape[a]
            s = min(max(s + d if s < 0 else s, 0), d - 1)
            e = min(max(e + d if e < 0 else e, -1), d - 1)
            x = torch.flip(x, (a,))
            idx[a] = slice(d - 1 - s, d - 1 - e, -st)
            continue
        idx[a] = slice(s, None if e >= _INT64_MAX // 2 else e, st)
    return x[tuple(idx)]


def onnx_pool(x, kind, kernel, stride, pads, dilation, ceil_mode, count_include_pad):
    nd = len(kernel)
    begin, end = pads[:nd], pads[nd:]
    spec = [p for i in reversed(range(nd)) for p in (begin[i], end[i])]  # F.pad's order
    explicit = begin != end or any(2 * p > k for p, k in zip(begin, kernel))
    if explicit:
        ones = torch.ones_like(x[:1, :1])
        x = F.pad(x, spec, value=-math.inf if kind == "max" else 0.0)
    if kind == "max":
        fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[nd - 1]
        return fn(x, kernel, stride, 0 if explicit else begin, dilation, ceil_mode)
    fn = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[nd - 1]
    if explicit and not count_include_pad:  # the padding is real elements now: divide by the others only
        return fn(x, kernel, stride, 0, ceil_mode, True) / fn(F.pad(ones, spec), kernel, stride, 0, ceil_mode, True)
    return fn(x, kernel, stride, 0 if explicit else begin, ceil_mode, bool(count_include_pad))


def onnx_global_avg(x):
    return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


def onnx_global_max(x):
    return x.amax(dim=tuple(range(2, x.dim())), keepdim=True)


def onnx_reduce(x, kind, axes, keepdims):
    axes = _as_list(axes)
    if axes is None or len(axes) == 0:
        axes = tuple(range(x.dim()))
    fn = {"mean": torch.mean, "sum": torch.sum}[kind]
    return fn(x, dim=tuple(axes), keepdim=bool(keepdims))


def onnx_reduce_minmax(x, kind, axes, keepdims):
    axes = _as_list(axes)
    if axes is None or len(axes) == 0:
        axes = tuple(range(x.dim()))
    return (torch.amax if kind == "max" else torch.amin)(x, dim=tuple(axes), keepdim=bool(keepdims))


def onnx_reduce_norm(x, p, axes, keepdims):
    axes = _as_list(axes)
    if axes is None or len(axes) == 0:
        axes = tuple(range(x.dim()))
    return torch.linalg.vector_norm(x, ord=p, dim=tuple(axes), keepdim=bool(keepdims))


def onnx_depth_to_space(x, r, mode):
    b, c, h, w = x.shape
    if mode == "CRD":
        return F.pixel_shuffle(x, r)
    y = x.reshape(b, r, r, c // (r * r), h, w).permute(0, 3, 4, 1, 5, 2)  # DCR
    return y.reshape(b, c // (r * r), h * r, w * r)


def onnx_layer_norm(x, scale, bias, axis, eps):
    if axis < 0:
        axis += x.dim()
    return F.layer_norm(x, tuple(x.shape[axis:]), scale, bias, eps)


def onnx_batch_norm(x, scale, bias, mean, var, eps):
    return F.batch_norm(x, mean, var, scale, bias, False, 0.0, eps)


def onnx_prelu(x, slope):
    return torch.where(x >= 0, x, x * slope)


def onnx_hardsigmoid(x, alpha, beta):
    return torch.clamp(x * alpha + beta, 0.0, 1.0)


def onnx_pad(x, pads, value, mode="constant"):
    pads = _as_list(pads)
    nd = len(pads) // 2
    torch_pads = [p for i in reversed(range(nd)) for p in (pads[i], pads[nd + i])]
    if mode == "constant":
        return F.pad(x, torch_pads, value=value)
    while torch_pads and torch_pads[-2:] == [0, 0]:  # torch pads only the trailing (spatial) dims here
        torch_pads = torch_pads[:-2]
    return F.pad(x, torch_pads, mode={"reflect": "reflect", "edge": "replicate"}[mode])


def onnx_split(x, sizes, axis):
    return tuple(torch.split(x, _as_list(sizes), axis))


def onnx_split_equal(x, n, axis):
    size = x.shape[axis]
    step = -(-size // n)
    return tuple(torch.split(x, step, axis))


def onnx_shape(x, start, end):
    return torch.tensor(x.shape[start:end], dtype=torch.int64)


def onnx_expand(x, shape):
    return torch.broadcast_to(x, torch.broadcast_shapes(x.shape, tuple(int(s) for s in shape)))


def onnx_gather(x, idx, axis):
    if idx.dim() == 0:
        return x.select(axis, int(idx))
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)  # ONNX allows negative indices
    return torch.index_select(x, axis, idx.reshape(-1)).reshape(x.shape[:axis] + idx.shape + x.shape[axis + 1:])


def onnx_clip(x, lo, hi):
    return torch.clamp(x, lo, hi)


def onnx_leaky_relu(x, alpha):
    return F.leaky_relu(x, alpha)


def onnx_gelu(x, approximate):
    return F.gelu(x, approximate=approximate)


def onnx_softmax(x, axis):
    return torch.softmax(x, axis)


def onnx_log_softmax(x, axis):
    return torch.log_softmax(x, axis)


def onnx_transpose(x, perm):
    if perm is None:
        perm = list(reversed(range(x.dim())))
    return x.permute(perm)


def onnx_squeeze(x, axes):
    if axes is None:
        return x.squeeze()
    return x.squeeze(tuple(_as_list(axes)))


def onnx_unsqueeze(x, axes):
    axes = _as_list(axes)
    out_rank = x.dim() + len(axes)
    for a in sorted(a + out_rank if a < 0 else a for a in axes):
        x = x.unsqueeze(a)
    return x


def onnx_concat(axis, *xs):
    return torch.cat(xs, axis)


def onnx_cast(x, dtype):
    return x.to(dtype)


def onnx_const_of_shape(shape, value):
    return torch.full(tuple(int(s) for s in shape), value.item(), dtype=value.dtype)


def onnx_div(a, b):
    """ONNX Div: integer tensors divide with truncation (torch's / would promote to float)."""
    if not a.is_floating_point() and not b.is_floating_point():
        return torch.div(a, b, rounding_mode="trunc")
    return a / b


def onnx_where(c, a, b):
    return torch.where(c.bool(), a, b)


def onnx_resize(x, scales, sizes, mode: str, transform: str):
    """ONNX Resize for the modes the torch front end writes: nearest (asymmetric, floor) and
    linear (pytorch_half_pixel or align_corners), over the spatial axes only."""
    nd = x.dim() - 2
    kind = "nearest" if mode == "nearest" else ("linear", "bilinear", "trilinear")[nd - 1]
    ac = None if mode == "nearest" else transform == "align_corners"
    if sizes is not None and (not isinstance(sizes, torch.Tensor) or sizes.numel()):
        size = [int(s) for s in _as_list(sizes)[2:]]
        return F.interpolate(x, size=size, mode=kind, align_corners=ac)
    sf = [float(s) for s in (scales.reshape(-1).tolist() if isinstance(scales, torch.Tensor) else scales)]
    if sf[:2] != [1.0, 1.0]:
        raise GraphOptError("Resize of the batch or channel axis is not supported by the torch back end")
    return F.interpolate(x, scale_factor=sf[2:], mode=kind, align_corners=ac, recompute_scale_factor=False)


def onnx_topk(x, k, axis: int, largest: bool):
    r = torch.topk(x, int(_as_list(k)[0]), dim=axis, largest=largest, sorted=True)
    return r.values, r.indices


def onnx_range(start, limit, delta):
    def scalar(v):
        return v.reshape(()).item() if isinstance(v, torch.Tensor) else v

    ref = next((v for v in (start, limit, delta) if isinstance(v, torch.Tensor)), None)
    dtype = ref.dtype if ref is not None else None
    return torch.arange(scalar(start), scalar(limit), scalar(delta), dtype=dtype)


def onnx_gather_elements(x, index, axis):
    axis = axis % x.dim()
    index = index.long()
    index = torch.where(index < 0, index + x.shape[axis], index)
    return torch.gather(x, axis, index)


def onnx_gather_nd(x, index, batch_dims=0):
    """ONNX GatherND: the last axis of ``index`` addresses the k axes of ``x`` after its first
    ``batch_dims`` (which index shares); one batched fancy-index, negative indices wrap."""
    b, k = batch_dims, index.shape[-1]
    dims = list(x.shape[b:b + k])
    index = index.long()
    index = torch.where(index < 0, index + torch.tensor(dims, device=index.device), index)
    strides = torch.tensor([int(np.prod(dims[j + 1:])) for j in range(k)], device=index.device)
    nb = int(np.prod(x.shape[:b]))
    flat = x.reshape(nb, -1, *x.shape[b + k:])  # [batch, gathered positions, rest]
    lin = (index.reshape(nb, -1, k) * strides).sum(-1)  # [batch, M]
    out = flat[torch.arange(nb, device=x.device)[:, None], lin]
    return out.reshape(*index.shape[:-1], *x.shape[b + k:])


def onnx_min(*xs):
    out = xs[0]
    for x in xs[1:]:
        out = torch.minimum(out, x)
    return out


def onnx_max(*xs):
    out = xs[0]
    for x in xs[1:]:
        out = torch.maximum(out, x)
    return out


def onnx_sum(*xs):
    out = xs[0]
    for x in xs[1:]:
        out = out + x
    return out


# --------------------------------------------------------------------------- builder
_TORCH_DTYPE = {1: torch.float32, 2: torch.uint8, 3: torch.int8, 5: torch.int16, 6: torch.int32, 7: torch.int64,
                9: torch.bool, 10: torch.float16, 11: torch.float64, 16: torch.bfloat16}


def _attr_name(name: str, taken: set[str]) -> str:
    base = re.sub(r"\W", "_", name).strip("_") or "c"
    if base[0].isdigit():
        base = "c_" + base
    cand, i = base, 0
    while cand in taken:
        i += 1
        cand = f"{base}_{i}"
    taken.add(cand)
    return cand


class _Builder:
    def __init__(self, graph: Graph, root: nn.Module, outputs: list[Value]):
        self.graph = graph
        self.root = root
        self.fx = torch.fx.Graph()
        self.env: dict[Value, torch.fx.Node] = {}
        self.taken: set[str] = set()
        self.param_names: dict[str, str] = {}  # IR value name -> module attribute
        self.quant_params: set[str] = set()  # the attributes of learned quantizer parameters (LSQ steps, PACT clips)
        self.mask_names: dict[str, tuple[str, str]] = {}  # masked weight -> (parameter, mask buffer)
        self.buffer_names: dict[str, str] = {}  # IR value name -> module buffer written back (BN statistics)
        self.outputs = outputs
        self.train_bn = False
        self.folded_bn = "frozen"  # or "batch": BN folded into a fake-quantized layer normalizes with batch statistics
        self.bn_folds: dict[str, dict[str, str]] = {}  # layer node -> its batch-statistics BN (see _batch_stats_bn)

    # inputs --------------------------------------------------------------
    def value(self, v: Value | None, trainable: bool | None = None):
        """The fx node for ``v``. A constant becomes an nn.Parameter when ``trainable`` is True
        (any float constant, scalars included: a learnable quantizer scale) or, by default, when
        it is a float tensor of rank >= 1 (weights, biases); otherwise a buffer."""
        if v is None:
            return None
        if v in self.env:
            return self.env[v]
        arr = self.graph.const_value(v)
        if arr is None:
            raise GraphOptError(f"value '{v.name}' is used before it is defined")
        attr = _attr_name(v.name, self.taken)
        t = torch.from_numpy(np.array(arr, copy=True))
        a = np.asarray(arr)
        param = is_param(a) if trainable is None else (trainable and np.issubdtype(a.dtype, np.floating))
        mask = get_mask(v) if param else None
        if mask is not None:  # masked weight: the parameter starts masked and the forward re-applies it
            t = torch.from_numpy(np.array(mask.apply(a), copy=True))
        if param and v.const is not None:
            self.root.register_parameter(attr, nn.Parameter(t))
            self.param_names[v.name] = attr
        else:
            self.root.register_buffer(attr, t)
        node = self.fx.get_attr(attr)
        if mask is not None:
            mattr = _attr_name(v.name + "_mask", self.taken)
            self.root.register_buffer(mattr, torch.from_numpy(mask.keep.copy()))
            self.mask_names[v.name] = (attr, mattr)
            node = self.call(apply_mask, node, self.fx.get_attr(mattr))
        self.env[v] = node
        return node

    def inp(self, n: Node, i: int):
        return self.value(n.inputs[i]) if i < len(n.inputs) else None

    def static(self, n: Node, i: int, default: Any = None) -> Any:
        """Input ``i`` as a static Python value (list/scalar); it must be constant."""
        if i >= len(n.inputs) or n.inputs[i] is None:
            return default
        arr = self.graph.const_value(n.inputs[i])
        if arr is None:
            return _Dynamic
        arr = np.asarray(arr)
        return arr.tolist()

    def call(self, fn, *args, **kwargs):
        return self.fx.call_function(fn, tuple(args), kwargs)


def apply_mask(w: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """A masked weight: dropped entries are exactly zero and receive no gradient."""
    return torch.where(keep, w, torch.zeros((), dtype=w.dtype))


def _static_or_runtime(b: "_Builder", n: Node, i: int, default: Any = None):
    """Input ``i`` as a static Python value when constant, else the fx node computing it."""
    v = b.static(n, i, default)
    return b.inp(n, i) if v is _Dynamic else v


class _Dynamic:
    """Marker: an input that lowering needs static is computed at run time."""


def _need_static(b: _Builder, n: Node, i: int, what: str, default: Any = None):
    v = b.static(n, i, default)
    if v is _Dynamic:
        raise UnsupportedOpError(f"torch back end: input {i} ({what}) of {n.op_type} node '{n.name}' "
                                 f"(from '{n.source}') must be a constant")
    return v


# --------------------------------------------------------------------------- lowerings
@lowering("Conv")
def _conv(b, n):
    win = window(n)
    out = b.call(onnx_conv, b.inp(n, 0), b.inp(n, 1), b.inp(n, 2), list(win.strides), list(win.pads),
                 list(win.dilations), n.attr("group", 1))
    return [_batch_stats_bn(b, n, out)]


@lowering("ConvTranspose")
def _conv_t(b, n):
    if "output_shape" in n.attrs:
        raise UnsupportedOpError(f"torch back end: ConvTranspose output_shape (node '{n.name}')")
    win = window(n)
    return [b.call(onnx_conv_transpose, b.inp(n, 0), b.inp(n, 1), b.inp(n, 2), list(win.strides), list(win.pads),
                   list(n.attr("output_padding", [0] * win.nd)), list(win.dilations), n.attr("group", 1))]


@lowering("Gemm")
def _gemm(b, n):
    out = b.call(onnx_gemm, b.inp(n, 0), b.inp(n, 1), b.inp(n, 2), float(n.attr("alpha", 1.0)),
                 float(n.attr("beta", 1.0)), n.attr("transA", 0), n.attr("transB", 0))
    return [_batch_stats_bn(b, n, out)]


@lowering("MatMul")
def _matmul(b, n):
    return [b.call(torch.matmul, b.inp(n, 0), b.inp(n, 1))]


class TrainableBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNormalization as ``nn.BatchNorm2d`` trains it, for any rank >= 2: batch statistics
    and a running-average update in ``train()``, the running statistics in ``eval()``. It is a
    torch ``_BatchNorm``, so ``SyncBatchNorm.convert_sync_batchnorm`` and
    ``torch.optim.swa_utils.update_bn`` work on it."""

    def __init__(self, scale, bias, mean, var, eps: float, momentum: float):
        super().__init__(scale.numel(), eps=eps, momentum=momentum)
        with torch.no_grad():
            self.weight.copy_(scale)
            self.bias.copy_(bias)
            self.running_mean.copy_(mean)
            self.running_var.copy_(var)

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input (got {input.dim()}-D input)")


class FoldedBatchNorm(TrainableBatchNorm):
    """The BatchNorm that ``fold-bn`` folded into a layer, back for QAT's first phase (torch.ao
    ConvBn's batch statistics). It acts on the folded layer's output u, whose distribution
    fold-bn recorded as N(beta, gamma^2), and starts as the identity: weight sqrt(gamma^2 + eps),
    bias beta, running mean beta, running variance gamma^2. In ``train()`` it normalizes u with
    the batch statistics; ``write_back`` folds it into the layer again (see ``refold``)."""


def _batch_stats_bn(b, n, out):
    """``out`` (a Conv/Gemm result), followed by a ``FoldedBatchNorm`` when the builder is in
    ``folded_bn="batch"`` mode and the layer is one whose folded BN can be folded back exactly:
    fold-bn statistics on its output, a constant bias, and a per-output-channel weight
    quantizer that follows a per-channel rescaling. Any other layer keeps its BN frozen."""
    if b.folded_bn != "batch":
        return out
    why = refoldable(b.graph, n)
    if why:
        import logging

        logging.getLogger("graphopt.backends.torch").info("layer '%s' keeps frozen BN statistics: %s", n.source, why)
        return out
    stats = n.outputs[0].meta[BN_STATS]
    gamma, beta = (np.asarray(stats[k], np.float32) for k in ("gamma", "beta"))
    eps = 1e-5
    t = [torch.from_numpy(np.ascontiguousarray(a, np.float32)) for a in
         (np.sqrt(gamma.astype(np.float64) ** 2 + eps), beta, beta, gamma.astype(np.float64) ** 2)]
    attr = _attr_name((n.name or "layer") + "_bn", b.taken)
    b.root.add_module(attr, FoldedBatchNorm(*t, eps, 0.1))
    from graphopt.quantizers.base import from_node, params_of

    w_fq = n.inputs[1].producer
    q = from_node(w_fq)
    # the scale parameters that do not train stay as built: a refold scales these copies, so
    # writing the same module back twice folds once
    fixed = {k: np.array(v, copy=True) for k, v in params_of(b.graph, w_fq).items() if not q.trainable(k)}
    b.bn_folds[n.name] = {"module": attr, "fixed": fixed}
    return b.fx.call_module(attr, (out,))


@lowering("BatchNormalization")
def _bn(b, n):
    if n.attr("training_mode", 0):
        raise UnsupportedOpError(f"torch back end: BatchNormalization training_mode=1 (node '{n.name}')")
    eps = float(n.attr("epsilon", 1e-5))
    consts = [b.graph.const_value(v) if v is not None else None for v in n.inputs[1:5]]
    if b.train_bn and len(n.inputs) == 5 and all(c is not None for c in consts) and \
            not any(v in b.env or len(v.users()) > 1 for v in n.inputs[1:5]):
        attr = _attr_name(n.name or "bn", b.taken)
        t = [torch.from_numpy(np.array(c, np.float32, copy=True)) for c in consts]
        b.root.add_module(attr, TrainableBatchNorm(*t, eps, 1.0 - float(n.attr("momentum", 0.9))))
        b.param_names[n.inputs[1].name], b.param_names[n.inputs[2].name] = f"{attr}.weight", f"{attr}.bias"
        b.buffer_names[n.inputs[3].name] = f"{attr}.running_mean"
        b.buffer_names[n.inputs[4].name] = f"{attr}.running_var"
        return [b.fx.call_module(attr, (b.inp(n, 0),))]
    mean, var = (b.value(n.inputs[i], trainable=False) for i in (3, 4))  # statistics are never gradient-trained
    return [b.call(onnx_batch_norm, b.inp(n, 0), b.inp(n, 1), b.inp(n, 2), mean, var, eps)]


_UNARY = {"Relu": torch.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Erf": torch.erf, "Exp": torch.exp,
          "Log": torch.log, "Sqrt": torch.sqrt, "Neg": torch.neg, "Abs": torch.abs, "Reciprocal": torch.reciprocal,
          "Floor": torch.floor, "Ceil": torch.ceil, "Sign": torch.sign, "HardSwish": F.hardswish,
          "Softplus": F.softplus, "Not": torch.logical_not, "Sin": torch.sin, "Cos": torch.cos, "IsNaN": torch.isnan}
_BINARY = {"Add": operator.add, "Sub": operator.sub, "Mul": operator.mul, "Div": onnx_div, "Pow": torch.pow,
           "Equal": torch.eq, "Less": torch.lt, "Greater": torch.gt, "LessOrEqual": torch.le,
           "GreaterOrEqual": torch.ge, "And": torch.logical_and, "Or": torch.logical_or}


def _unary(b, n):
    return [b.call(_UNARY[n.op_type], b.inp(n, 0))]


def _binary(b, n):
    return [b.call(_BINARY[n.op_type], b.inp(n, 0), b.inp(n, 1))]


for _op in _UNARY:
    _LOWERINGS[("", _op)] = _unary
for _op in _BINARY:
    _LOWERINGS[("", _op)] = _binary


@lowering("Identity", "Dropout")
def _identity(b, n):
    outs = [b.inp(n, 0)]
    if len(n.outputs) > 1:  # Dropout mask: all true in inference
        outs.append(b.call(torch.ones_like, outs[0], dtype=torch.bool))
    return outs


@lowering("Clip")
def _clip(b, n):
    lo, hi = b.static(n, 1), b.static(n, 2)
    lo = b.inp(n, 1) if lo is _Dynamic else lo
    hi = b.inp(n, 2) if hi is _Dynamic else hi
    return [b.call(onnx_clip, b.inp(n, 0), lo, hi)]


@lowering("LeakyRelu")
def _leaky(b, n):
    return [b.call(onnx_leaky_relu, b.inp(n, 0), float(n.attr("alpha", 0.01)))]


@lowering("PRelu")
def _prelu(b, n):
    return [b.call(onnx_prelu, b.inp(n, 0), b.inp(n, 1))]


@lowering("HardSigmoid")
def _hsig(b, n):
    return [b.call(onnx_hardsigmoid, b.inp(n, 0), float(n.attr("alpha", 0.2)), float(n.attr("beta", 0.5)))]


@lowering("Gelu")
def _gelu(b, n):
    return [b.call(onnx_gelu, b.inp(n, 0), n.attr("approximate", "none"))]


@lowering("Softmax")
def _softmax(b, n):
    return [b.call(onnx_softmax, b.inp(n, 0), n.attr("axis", -1))]


@lowering("LogSoftmax")
def _log_softmax(b, n):
    return [b.call(onnx_log_softmax, b.inp(n, 0), n.attr("axis", -1))]


@lowering("Reshape")
def _reshape(b, n):
    shape = b.static(n, 1)
    if shape is _Dynamic:
        return [b.call(onnx_reshape_dynamic, b.inp(n, 0), b.inp(n, 1), n.attr("allowzero", 0))]
    return [b.call(onnx_reshape, b.inp(n, 0), shape, n.attr("allowzero", 0))]


@lowering("Flatten")
def _flatten(b, n):
    return [b.call(onnx_flatten, b.inp(n, 0), n.attr("axis", 1))]


@lowering("Transpose")
def _transpose(b, n):
    return [b.call(onnx_transpose, b.inp(n, 0), n.attr("perm"))]


@lowering("Squeeze")
def _squeeze(b, n):
    axes = n.attr("axes") if "axes" in n.attrs else _static_or_runtime(b, n, 1)
    return [b.call(onnx_squeeze, b.inp(n, 0), axes)]


@lowering("Unsqueeze")
def _unsqueeze(b, n):
    axes = n.attr("axes") if "axes" in n.attrs else _static_or_runtime(b, n, 1)
    return [b.call(onnx_unsqueeze, b.inp(n, 0), axes)]


@lowering("Concat")
def _concat(b, n):
    return [b.call(onnx_concat, n.attr("axis"), *(b.inp(n, i) for i in range(len(n.inputs))))]


@lowering("Split")
def _split(b, n):
    axis = n.attr("axis", 0)
    sizes = n.attr("split") if "split" in n.attrs else _static_or_runtime(b, n, 1)
    if sizes is None:
        res = b.call(onnx_split_equal, b.inp(n, 0), n.attr("num_outputs", len(n.outputs)), axis)
    else:
        res = b.call(onnx_split, b.inp(n, 0), sizes, axis)
    return [b.call(operator.getitem, res, i) for i in range(len(n.outputs))]


@lowering("Slice")
def _slice(b, n):
    return [b.call(onnx_slice, b.inp(n, 0), *(_static_or_runtime(b, n, i) for i in (1, 2, 3, 4)))]


@lowering("Pad")
def _pad(b, n):
    mode = n.attr("mode", "constant")
    if mode not in ("constant", "reflect", "edge"):
        raise UnsupportedOpError(f"torch back end: Pad mode={mode} (node '{n.name}')")
    pads = _static_or_runtime(b, n, 1)
    value = _need_static(b, n, 2, "constant_value", 0.0)
    if len(n.inputs) > 3 and n.inputs[3] is not None:
        raise UnsupportedOpError(f"torch back end: Pad with axes (node '{n.name}')")
    return [b.call(onnx_pad, b.inp(n, 0), pads, float(value if not isinstance(value, list) else value[0]), mode)]


def _axes_of(b, n):
    if "axes" in n.attrs:
        return n.attrs["axes"]
    axes = _static_or_runtime(b, n, 1)
    if (axes is None or axes == []) and n.attr("noop_with_empty_axes", 0):
        raise UnsupportedOpError(f"torch back end: reduction with noop_with_empty_axes (node '{n.name}')")
    return axes


@lowering("ReduceMean", "ReduceSum")
def _reduce(b, n):
    kind = "mean" if n.op_type == "ReduceMean" else "sum"
    return [b.call(onnx_reduce, b.inp(n, 0), kind, _axes_of(b, n), n.attr("keepdims", 1))]


@lowering("ReduceMax", "ReduceMin")
def _reduce_mm(b, n):
    kind = "max" if n.op_type == "ReduceMax" else "min"
    return [b.call(onnx_reduce_minmax, b.inp(n, 0), kind, _axes_of(b, n), n.attr("keepdims", 1))]


@lowering("ReduceL1", "ReduceL2")
def _reduce_norm(b, n):
    return [b.call(onnx_reduce_norm, b.inp(n, 0), 1 if n.op_type == "ReduceL1" else 2, _axes_of(b, n),
                   n.attr("keepdims", 1))]


@lowering("DepthToSpace")
def _depth_to_space(b, n):
    return [b.call(onnx_depth_to_space, b.inp(n, 0), int(n.attr("blocksize")), n.attr("mode", "DCR"))]


@lowering("Elu")
def _elu(b, n):
    return [b.call(F.elu, b.inp(n, 0), float(n.attr("alpha", 1.0)))]


@lowering("GlobalAveragePool")
def _gap(b, n):
    return [b.call(onnx_global_avg, b.inp(n, 0))]


@lowering("GlobalMaxPool")
def _gmp(b, n):
    return [b.call(onnx_global_max, b.inp(n, 0))]


@lowering("MaxPool", "AveragePool")
def _pool(b, n):
    if len(n.outputs) > 1:
        raise UnsupportedOpError(f"torch back end: MaxPool with indices output (node '{n.name}')")
    win = window(n)
    kind = "max" if n.op_type == "MaxPool" else "avg"
    return [b.call(onnx_pool, b.inp(n, 0), kind, list(win.kernel), list(win.strides), list(win.pads),
                   list(win.dilations), bool(n.attr("ceil_mode", 0)), n.attr("count_include_pad", 0))]


@lowering("LayerNormalization")
def _ln(b, n):
    if len(n.outputs) > 1 and any(o.uses for o in n.outputs[1:]):
        raise UnsupportedOpError(f"torch back end: LayerNormalization mean/inv_std outputs (node '{n.name}')")
    return [b.call(onnx_layer_norm, b.inp(n, 0), b.inp(n, 1), b.inp(n, 2), n.attr("axis", -1),
                   float(n.attr("epsilon", 1e-5)))] + [None] * (len(n.outputs) - 1)


@lowering("Shape")
def _shape(b, n):
    return [b.call(onnx_shape, b.inp(n, 0), n.attr("start", 0), n.attr("end", None))]


@lowering("Gather")
def _gather(b, n):
    return [b.call(onnx_gather, b.inp(n, 0), b.inp(n, 1), n.attr("axis", 0))]


@lowering("Expand")
def _expand(b, n):
    shape = b.static(n, 1)
    if shape is _Dynamic:
        return [b.call(onnx_expand, b.inp(n, 0), b.inp(n, 1))]
    return [b.call(onnx_expand, b.inp(n, 0), shape)]


@lowering("Cast")
def _cast(b, n):
    to = n.attr("to")
    if to not in _TORCH_DTYPE:
        raise UnsupportedOpError(f"torch back end: Cast to ONNX type {to} (node '{n.name}')")
    return [b.call(onnx_cast, b.inp(n, 0), _TORCH_DTYPE[to])]


@lowering("Constant")
def _constant(b, n):
    if b.graph.const_value(n.outputs[0]) is None:
        raise UnsupportedOpError(f"torch back end: Constant without a tensor value (node '{n.name}')")
    return [None]  # materialized on first use by _Builder.value (static uses need no tensor)


@lowering("ConstantOfShape")
def _cos(b, n):
    value = n.attr("value", np.zeros(1, np.float32))
    attr = _attr_name(n.name + "_value", b.taken)
    b.root.register_buffer(attr, torch.from_numpy(np.array(value, copy=True)))
    return [b.call(onnx_const_of_shape, b.inp(n, 0), b.fx.get_attr(attr))]


@lowering("Range")
def _range(b, n):
    return [b.call(onnx_range, *(_static_or_runtime(b, n, i) for i in range(3)))]


@lowering("Resize")
def _resize(b, n):
    mode = n.attr("mode", "nearest")
    tr = n.attr("coordinate_transformation_mode", "half_pixel")
    ok = (mode == "nearest" and tr == "asymmetric" and n.attr("nearest_mode", "round_prefer_floor") == "floor") or \
         (mode == "linear" and tr in ("pytorch_half_pixel", "align_corners"))
    if not ok or n.attr("antialias", 0) or n.attr("axes", None):
        raise UnsupportedOpError(f"torch back end: Resize mode={mode}, coordinate_transformation_mode={tr} "
                                 f"(node '{n.name}'; nearest/asymmetric/floor and linear/pytorch_half_pixel or "
                                 "align_corners are supported)")
    scales = _static_or_runtime(b, n, 2) if len(n.inputs) > 2 and n.inputs[2] is not None else None
    sizes = _static_or_runtime(b, n, 3) if len(n.inputs) > 3 and n.inputs[3] is not None else None
    return [b.call(onnx_resize, b.inp(n, 0), scales, sizes, mode, tr)]


@lowering("TopK")
def _topk(b, n):
    if not n.attr("sorted", 1):
        raise UnsupportedOpError(f"torch back end: TopK with sorted=0 (node '{n.name}')")
    res = b.call(onnx_topk, b.inp(n, 0), _static_or_runtime(b, n, 1), n.attr("axis", -1), bool(n.attr("largest", 1)))
    return [b.call(operator.getitem, res, i) for i in range(2)]


@lowering("GatherElements")
def _gather_elements(b, n):
    return [b.call(onnx_gather_elements, b.inp(n, 0), b.inp(n, 1), n.attr("axis", 0))]


@lowering("GatherND")
def _gather_nd(b, n):
    return [b.call(onnx_gather_nd, b.inp(n, 0), b.inp(n, 1), n.attr("batch_dims", 0))]


@lowering("InstanceNormalization")
def _instance_norm(b, n):
    return [b.call(F.instance_norm, b.inp(n, 0), None, None, b.inp(n, 1), b.inp(n, 2), True, 0.0,
                   float(n.attr("epsilon", 1e-5)))]


@lowering("Einsum")
def _einsum(b, n):
    return [b.call(torch.einsum, n.attr("equation"), *(b.inp(n, i) for i in range(len(n.inputs))))]


@lowering("CumSum")
def _cumsum(b, n):
    if n.attr("exclusive", 0) or n.attr("reverse", 0):
        raise UnsupportedOpError(f"torch back end: CumSum with exclusive/reverse (node '{n.name}')")
    axis = _need_static(b, n, 1, "axis")
    return [b.call(torch.cumsum, b.inp(n, 0), int(axis if not isinstance(axis, list) else axis[0]))]


@lowering("ArgMax", "ArgMin")
def _argmax(b, n):
    if n.attr("select_last_index", 0):
        raise UnsupportedOpError(f"torch back end: {n.op_type} with select_last_index (node '{n.name}')")
    fn = torch.argmax if n.op_type == "ArgMax" else torch.argmin
    return [b.call(fn, b.inp(n, 0), n.attr("axis", 0), bool(n.attr("keepdims", 1)))]


@lowering("Tile")
def _tile(b, n):
    reps = _need_static(b, n, 1, "repeats")
    return [b.call(torch.Tensor.repeat, b.inp(n, 0), [int(r) for r in reps])]


@lowering("Where")
def _where(b, n):
    return [b.call(onnx_where, b.inp(n, 0), b.inp(n, 1), b.inp(n, 2))]


@lowering("Min", "Max", "Sum")
def _variadic(b, n):
    fn = {"Min": onnx_min, "Max": onnx_max, "Sum": onnx_sum}[n.op_type]
    return [b.call(fn, *(b.inp(n, i) for i in range(len(n.inputs))))]


@lowering("FakeQuant", domain="ai.graphopt")
def _fake_quant(b, n):
    from graphopt.quantizers import from_node

    q = from_node(n)  # the scheme owns the maths and says which parameters train
    fn, static = q.torch_function(n.attr("axis"))
    params = [b.value(n.inputs[i], trainable=q.trainable(name)) for i, name in enumerate(q.param_names, start=1)]
    b.quant_params.update(b.param_names[n.inputs[i].name] for i, name in enumerate(q.param_names, start=1)
                          if q.trainable(name) and n.inputs[i].name in b.param_names)
    return [b.call(fn, b.call(as_float32, b.inp(n, 0)), *params, *static)]


def as_float32(x: torch.Tensor) -> torch.Tensor:
    """A FakeQuant's input in float32: under autocast a bf16/fp16 activation would round to the
    grid in low precision (autocast leaves elementwise maths in its input's dtype)."""
    return x.float() if x.is_floating_point() and x.dtype != torch.float32 else x


@lowering("GradQuant", domain="ai.graphopt")
def _grad_quant(b, n):
    from graphopt.training.gradquant import grad_quant

    return [b.call(grad_quant, b.inp(n, 0), int(n.attr("bits", 8)))]


# --------------------------------------------------------------------------- module
class TorchGraphModule(torch.fx.GraphModule):
    """The ``nn.Module`` returned by ``to_torch``. ``param_names`` maps IR constant names to
    parameter attribute names; ``input_names``/``output_names`` follow the graph."""

    def write_back(self, graph: Graph) -> int:
        """Copy this module's (trained) parameters into ``graph``'s constants."""
        return write_back(graph, self)

    param_names: dict[str, str]
    bn_folds: dict[str, dict[str, str]]
    mask_names: dict[str, tuple[str, str]]
    buffer_names: dict[str, str]
    input_names: list[str]
    output_names: list[str]


def to_torch(graph: Graph, outputs: list[str] | None = None, train_bn: bool = False,
             folded_bn: str = "frozen") -> TorchGraphModule:
    """Lower ``graph`` to an ``nn.Module``.

    ``train_bn``: BatchNormalization nodes become trainable BN modules (batch statistics in
    ``train()``; see the module doc). By default BN always uses its stored statistics.

    ``folded_bn="batch"``: a fake-quantized layer into which fold-bn folded a BatchNorm gets
    that BN back after it (``FoldedBatchNorm``, identity at the start), normalizing with batch
    statistics in ``train()``: the first phase of QAT's BN schedule. ``write_back`` folds it
    into the layer's weight, weight scale and bias again.

    ``outputs``: value names to return instead of the graph outputs (for calibration and
    sensitivity scans); the module then returns a tuple in that order. With the default,
    it returns a tensor for one graph output and a tuple for several.
    """
    graph.toposort()
    if outputs is None:
        out_values = list(graph.outputs)
    else:
        missing = [o for o in outputs if o not in graph.values]
        if missing:
            raise GraphOptError(f"no value named {', '.join(repr(m) for m in missing)} in the graph")
        out_values = [graph.values[o] for o in outputs]
    if folded_bn not in ("frozen", "batch"):
        raise GraphOptError(f"folded_bn must be 'frozen' or 'batch', not '{folded_bn}'")
    root = nn.Module()
    b = _Builder(graph, root, out_values)
    b.train_bn = train_bn
    b.folded_bn = folded_bn
    for v in graph.inputs:
        b.env[v] = b.fx.placeholder(_attr_name(v.name, b.taken))
    needed = _needed_nodes(graph, out_values)
    for n in graph.nodes:
        if n not in needed:
            continue
        fn = _LOWERINGS.get((n.domain, n.op_type))
        if fn is None:
            raise UnsupportedOpError(f"torch back end cannot execute op {n.qualified_op} (node '{n.name}', "
                                     f"from '{n.source}')")
        results = fn(b, n)
        for v, r in zip(n.outputs, results):
            if r is not None:
                b.env[v] = r
    outs = [b.value(v) for v in out_values]
    b.fx.output(outs[0] if len(outs) == 1 and outputs is None else tuple(outs))
    gm = TorchGraphModule(root, b.fx, class_name="GraphoptModule")
    if gm.graph.eliminate_dead_code():
        gm.recompile()
    gm.param_names = b.param_names
    gm.mask_names = b.mask_names
    gm.quant_params = b.quant_params
    gm.buffer_names = b.buffer_names
    gm.bn_folds = b.bn_folds
    gm.input_names = [v.name for v in graph.inputs]
    gm.output_names = [v.name for v in out_values]
    return gm


def _needed_nodes(graph: Graph, outputs: list[Value]) -> set[Node]:
    need: set[Node] = set()
    stack = [v.producer for v in outputs if v.producer is not None]
    while stack:
        n = stack.pop()
        if n in need:
            continue
        need.add(n)
        stack.extend(v.producer for v in n.inputs if v is not None and v.producer is not None)
    return need


def write_back(graph: Graph, module: TorchGraphModule) -> int:
    """Copy ``module``'s (trained) parameters, and the BN running statistics of a
    ``train_bn`` module, into the graph's constants. Returns how many."""
    params = dict(module.named_parameters())
    params.update(module.named_buffers())
    n = 0
    for value_name, attr in {**module.param_names, **getattr(module, "buffer_names", {})}.items():
        v = graph.values.get(value_name)
        if v is None or v.const is None:
            raise GraphOptError(f"graph has no constant '{value_name}' to write parameter '{attr}' into")
        new = params[attr].detach().cpu().numpy().astype(v.const.dtype, copy=True)
        mask = get_mask(v)
        if mask is not None and value_name in getattr(module, "mask_names", {}):
            keep = params[module.mask_names[value_name][1]].detach().cpu().numpy().astype(bool)
            if not np.array_equal(keep, mask.keep):  # training tightened it (gradual pruning)
                from dataclasses import replace

                mask = replace(mask, keep=keep)
                v.meta[MASK] = mask
        if mask is not None:  # the stored weights carry the mask folded in
            new = mask.apply(new)
        if new.shape != v.const.shape:
            raise GraphOptError(f"parameter '{attr}' has shape {list(new.shape)}, constant '{value_name}' "
                                f"has {list(v.const.shape)}")
        graph.set_const(v, new)
        n += 1
    folds = getattr(module, "bn_folds", {})
    if folds:
        from graphopt.quantizers.base import refresh_bias_scales

        by_name = {nd.name: nd for nd in graph.nodes}
        for layer, info in folds.items():
            if layer not in by_name:
                raise GraphOptError(f"graph has no layer '{layer}' to fold its trained BatchNorm into")
            bn = module.get_submodule(info["module"])
            with torch.no_grad():
                stats = [t.detach().cpu().double().numpy() for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var)]
            refold(graph, by_name[layer], *stats, bn.eps, info.get("fixed"))
        refresh_bias_scales(graph)
    return n
