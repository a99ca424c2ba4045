"""Layer geometry: the one table of which weight axis of a layer holds its output channels and
which its input channels.

| op | weight | output axis | input axis | groups |
| --- | --- | --- | --- | --- |
| Conv | [C_out, C_in / g, k...] | 0 | 1 | ``group`` |
| ConvTranspose | [C_in, C_out / g, k...] | 1 | 0 | ``group`` |
| Gemm, ``transB=1`` | [N, K] | 0 | 1 | 1 |
| Gemm, ``transB=0`` | [K, N] | 1 | 0 | 1 |
| MatMul (constant right operand) | [K, N] | 1 | 0 | 1 |

Every pass that scales, slices, quantizes or masks a layer's weights by channel asks
``geometry(node)``; nobody decodes ``group`` or ``transB`` for that again. Views:

* ``out_view(w)`` is [C_out, -1]: row o holds every weight that produces output o, ordered
  (input channel within the group, kernel position);
* ``in_view(w)`` is [C_in, -1]: row i holds every weight that reads input channel i. A grouped
  conv's input channel meets only its group's filters; a depthwise conv's input channel i is
  exactly the filter of output i.

Both have inverses (``from_out_view``, ``from_in_view``), given the weight's shape.

* ``filter_matrix(w)`` is the layer's whole GEMM operand, [C_out, C_in x kernel]: row o is filter
  o, column ``c * K + k`` multiplies input channel c at kernel position k (K = the kernel's size;
  1 for Gemm/MatMul), the im2col order. A grouped conv's matrix is block diagonal: filter o has
  zeros in every column outside its group (a depthwise conv has one nonzero block of K columns
  per row). ``from_filter_matrix`` is its inverse (it reads the blocks back). Column combining
  (``graphopt.columns``) and the systolic-array back end work on this view. A ConvTranspose has
  none: it scatters its outputs, so its weight is not the operand of one GEMM over im2col.

``window(node)`` is the other half of a layer's geometry: the sliding window of a Conv,
ConvTranspose or pool (kernel, strides, explicit pads, dilations) with ONNX's defaults, and
``auto_pad`` resolved. Every back end and pass that reads those attributes asks it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graphopt.errors import GraphOptError, UnsupportedOpError

LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# the layers whose weights the rescaling and quantizing passes rewrite by channel
LINEAR_OPS = ("Conv", "Gemm", "MatMul")


@dataclass(frozen=True)
class Geometry:
    """Where a layer's channels sit in its weight tensor."""

    op: str
    out_axis: int
    in_axis: int
    groups: int = 1

    # -- views ---------------------------------------------------------------
    def _view(self, w: np.ndarray, axis: int) -> np.ndarray:
        """[w.shape[axis] (all groups), -1] for a weight whose axes 0 and 1 are the channel axes
        (axis 0 holds every channel, axis 1 the channels of one group)."""
        if axis == 0:
            return w.reshape(w.shape[0], -1)
        g, d0, d1 = self.groups, w.shape[0], w.shape[1]
        k = int(np.prod(w.shape[2:], dtype=np.int64))
        return w.reshape(g, d0 // g, d1, k).transpose(0, 2, 1, 3).reshape(g * d1, (d0 // g) * k)

    def _unview(self, view: np.ndarray, shape, axis: int) -> np.ndarray:
        shape = tuple(shape)
        if axis == 0:
            return np.ascontiguousarray(view.reshape(shape))
        g, d0, d1 = self.groups, shape[0], shape[1]
        k = int(np.prod(shape[2:], dtype=np.int64))
        return np.ascontiguousarray(view.reshape(g, d1, d0 // g, k).transpose(0, 2, 1, 3).reshape(shape))

    def out_view(self, w: np.ndarray) -> np.ndarray:
        return self._view(np.asarray(w), self.out_axis)

    def from_out_view(self, view: np.ndarray, shape) -> np.ndarray:
        return self._unview(view, shape, self.out_axis)

    def in_view(self, w: np.ndarray) -> np.ndarray:
        return self._view(np.asarray(w), self.in_axis)

    def from_in_view(self, view: np.ndarray, shape) -> np.ndarray:
        return self._unview(view, shape, self.in_axis)

    def filter_matrix(self, w: np.ndarray) -> np.ndarray:
        """[C_out, C_in * K]: the layer as one GEMM over im2col columns (see the module notes)."""
        if self.op == "ConvTranspose":
            raise GraphOptError("a ConvTranspose has no filter matrix (it scatters its outputs)")
        v = self.out_view(w)
        g = self.groups
        if g == 1:
            return v
        b, ck = v.shape
        full = np.zeros((g, b // g, g, ck), v.dtype)
        idx = np.arange(g)
        full[idx, :, idx, :] = v.reshape(g, b // g, ck)
        return full.reshape(b, g * ck)

    def from_filter_matrix(self, f: np.ndarray, shape) -> np.ndarray:
        """The weight of ``shape`` whose filter matrix is ``f`` (a grouped conv's off-block
        entries are not part of the weight and are dropped)."""
        g = self.groups
        if g == 1:
            return self.from_out_view(f, shape)
        b = f.shape[0]
        ck = f.shape[1] // g
        idx = np.arange(g)
        return self.from_out_view(f.reshape(g, b // g, g, ck)[idx, :, idx, :].reshape(b, ck), shape)

    # -- sizes ---------------------------------------------------------------
    def out_channels(self, shape) -> int:
        return int(shape[self.out_axis]) * (self.groups if self.out_axis == 1 else 1)

    def in_channels(self, shape) -> int:
        return int(shape[self.in_axis]) * (self.groups if self.in_axis == 1 else 1)

    def resized(self, shape, *, out: int | None = None, inp: int | None = None) -> tuple[int, ...]:
        """The weight shape with ``out`` output channels and/or ``inp`` input channels (totals
        over all groups; the group count stays)."""
        s = list(shape)
        for axis, n in ((self.out_axis, out), (self.in_axis, inp)):
            if n is not None:
                s[axis] = n // self.groups if axis == 1 else n
        return tuple(s)

    # -- arithmetic ----------------------------------------------------------
    def grouped_rows(self, w: np.ndarray) -> np.ndarray:
        """[G, C_out / G, K]: each group's output rows over that group's K = (C_in / G) x kernel
        inputs, in the im2col order a layer reads them (GPTQ's layout)."""
        v = self.out_view(w)
        return v.reshape(self.groups, v.shape[0] // self.groups, -1)

    def mean_output(self, w: np.ndarray, ex: np.ndarray) -> np.ndarray:
        """Per output channel, what the layer adds when input channel i carries the constant
        ``ex[i]`` everywhere (no bias; exact away from zero-padded borders)."""
        rows = self.grouped_rows(np.asarray(w, np.float64))  # [G, R, cin_g * k]
        g, r = rows.shape[:2]
        ex = np.asarray(ex, np.float64).reshape(g, -1)
        cin_g = ex.shape[1]
        return np.einsum("goik,gi->go", rows.reshape(g, r, cin_g, -1), ex).reshape(g * r)


def geometry(node) -> Geometry:
    """The geometry of a Conv/ConvTranspose/Gemm/MatMul node's weight (input 1)."""
    op = node.op_type
    if node.domain != "" or op not in LAYER_OPS:
        raise GraphOptError(f"{node.qualified_op if hasattr(node, 'qualified_op') else op} node '{node.name}' "
                            "is not a layer with a weight (Conv, ConvTranspose, Gemm, MatMul)")
    if op == "Conv":
        return Geometry(op, 0, 1, int(node.attr("group", 1)))
    if op == "ConvTranspose":
        return Geometry(op, 1, 0, int(node.attr("group", 1)))
    if op == "Gemm" and node.attr("transB", 0):
        return Geometry(op, 0, 1)
    return Geometry(op, 1, 0)


def is_linear_layer(graph, n) -> bool:
    """A Conv (any group), Gemm (no transA) or MatMul whose weight (and bias) are float constants."""
    if n.domain != "" or n.op_type not in LINEAR_OPS or len(n.inputs) < 2:
        return False
    w = graph.const_value(n.inputs[1])
    if w is None or not np.issubdtype(np.asarray(w).dtype, np.floating):
        return False
    if n.op_type == "Conv":
        return w.ndim >= 3 and (len(n.inputs) < 3 or n.inputs[2] is None or graph.const_value(n.inputs[2]) is not None)
    if n.op_type == "Gemm":
        if n.attr("transA", 0) or w.ndim != 2:
            return False
        return len(n.inputs) < 3 or n.inputs[2] is None or graph.const_value(n.inputs[2]) is not None
    return w.ndim == 2  # MatMul: x[..., K] @ W[K, N]

def linear_layers(graph) -> list:
    """Every ``is_linear_layer`` node, in topological order."""
    graph.toposort()
    return [n for n in graph.nodes if is_linear_layer(graph, n)]


def weight(graph, n) -> np.ndarray:
    return np.asarray(graph.const_value(n.inputs[1]))

def bias(graph, n) -> np.ndarray | None:
    if n.op_type == "MatMul" or len(n.inputs) < 3 or n.inputs[2] is None:
        return None
    return np.asarray(graph.const_value(n.inputs[2]))


WINDOW_OPS = ("Conv", "ConvTranspose", "MaxPool", "AveragePool", "LpPool")


@dataclass(frozen=True)
class Window:
    """A Conv's, ConvTranspose's or pool's sliding window, every field explicit (ONNX order:
    ``pads`` is the begin of each spatial axis, then the end of each)."""

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    pads: tuple[int, ...]
    dilations: tuple[int, ...]

    @property
    def nd(self) -> int:
        return len(self.kernel)

    @property
    def padded(self) -> bool:
        return any(self.pads)

    def pad_pairs(self) -> list[tuple[int, int]]:
        """[(begin, end)] per spatial axis."""
        return [(self.pads[i], self.pads[i + self.nd]) for i in range(self.nd)]


def window(node) -> Window:
    """The window of a Conv/ConvTranspose/MaxPool/AveragePool/LpPool node, ONNX's defaults filled
    in (strides and dilations 1, no padding; a convolution's kernel from its weight when
    ``kernel_shape`` is absent). ``auto_pad=VALID`` is no padding; ``SAME_UPPER``/``SAME_LOWER``
    become the explicit pads ONNX defines from the input's static spatial shape (output =
    ceil(input / stride), the odd pad at the end for SAME_UPPER, at the start for SAME_LOWER)."""
    op, where = node.op_type, f"{node.op_type} node '{node.name}'"
    if node.domain != "" or op not in WINDOW_OPS:
        raise GraphOptError(f"{where} has no sliding window ({', '.join(WINDOW_OPS)} have)")
    ks = node.attr("kernel_shape")
    if ks is None and op in ("Conv", "ConvTranspose") and len(node.inputs) > 1 and node.inputs[1] is not None:
        w = node.inputs[1].shape
        ks = list(w[2:]) if w is not None and all(isinstance(d, int) for d in w[2:]) else None
    if ks is None:
        raise UnsupportedOpError(f"{where}: its kernel shape is unknown (no kernel_shape, no static weight shape)")
    kernel = tuple(int(k) for k in ks)
    d = len(kernel)
    strides = tuple(int(v) for v in node.attr("strides", [1] * d))
    dil = tuple(int(v) for v in node.attr("dilations", [1] * d))
    auto = node.attr("auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto == "NOTSET":
        return Window(kernel, strides, tuple(int(v) for v in node.attr("pads", [0] * (2 * d))), dil)
    if auto == "VALID":
        return Window(kernel, strides, (0,) * (2 * d), dil)
    if op == "ConvTranspose":
        raise UnsupportedOpError(f"{where}: auto_pad={auto} on a ConvTranspose (its pads follow output_shape); "
                                 "export the model with explicit pads")
    x = node.inputs[0].shape if node.inputs and node.inputs[0] is not None else None  # the batch may be symbolic
    if x is None or len(x) != d + 2 or not all(isinstance(v, int) for v in x[2:]):
        raise UnsupportedOpError(f"{where}: auto_pad={auto} needs the input's static spatial shape, which is unknown; "
                                 "export the model with explicit pads or fixed input sizes")
    size = np.asarray(x[2:])
    st, span = np.asarray(strides), (np.asarray(kernel) - 1) * np.asarray(dil) + 1
    total = np.maximum((-(-size // st) - 1) * st + span - size, 0)
    small = total // 2
    begin, end = (small, total - small) if auto == "SAME_UPPER" else (total - small, small)
    return Window(kernel, strides, tuple(int(v) for v in (*begin, *end)), dil)


def pads_input(node) -> bool:
    """Whether a windowed node pads its input: explicit pads, or SAME padding that does (or may:
    an input shape that is not static) pad."""
    try:
        return window(node).padded
    except UnsupportedOpError:
        return True
