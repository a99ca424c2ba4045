"""DoReFa-Net gradient quantization (Zhou et al. 2016, eq. 12) as a graph node.

``GradQuant(x)`` (domain ``ai.graphopt``, attribute ``bits``) is the identity in the forward
pass. In the backward pass the gradient dr reaching it is replaced by

    2 max|dr| * (quantize_k(dr / (2 max|dr|) + 1/2 + N(k)) - 1/2),   N(k) ~ U(-1/2, 1/2) / (2^k - 1)

(max over the whole tensor). The ``quantize`` pass puts one at each layer output
(``grad_bits``); the ONNX lowering drops them, because inference has no backward pass.
"""

from __future__ import annotations

import torch

from graphopt.quantizers.base import DOMAIN

OP = "GradQuant"


def is_grad_quant(n) -> bool:
    return n is not None and n.domain == DOMAIN and n.op_type == OP


class _GradQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bits):
        ctx.bits = bits
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        n = (1 << ctx.bits) - 1
        m = g.abs().amax().clamp_min(1e-30)
        u = g / (2 * m) + 0.5 + (torch.rand_like(g) - 0.5) / n
        q = torch.round(u.clamp(0, 1) * n) / n
        return 2 * m * (q - 0.5), None


def grad_quant(x: torch.Tensor, bits: int) -> torch.Tensor:
    """The identity whose gradient is quantized to ``bits`` bits (module-level for fx)."""
    return _GradQuant.apply(x, bits) if x.requires_grad else x


def add_grad_quant(graph, v, bits: int, source: str | None = None):
    """Insert ``GradQuant(v)`` after ``v`` for all of v's readers."""
    graph.opset_imports.setdefault(DOMAIN, 1)
    uses = list(v.uses)
    n = graph.add_node(OP, [v], [f"{v.name}_gq"], attrs={"bits": int(bits)}, domain=DOMAIN,
                       name=graph.unique_node_name(f"{v.name}_gradquant"),
                       source=source or (v.producer.source if v.producer else v.name))
    out = n.outputs[0]
    out.dtype, out.shape = v.dtype, v.shape
    for node, i in uses:
        if i >= 0:
            graph.set_input(node, i, out)
    if v.is_graph_output:
        name = v.name
        graph.outputs = [out if o is v else o for o in graph.outputs]
        graph.rename_value(v, graph.unique_name(name + "_pre_gq"))
        graph.rename_value(out, name)
    return n


def drop_grad_quants(graph) -> int:
    """Remove every GradQuant (inference); returns how many."""
    nodes = [n for n in graph.nodes if is_grad_quant(n)]
    for n in nodes:
        graph.replace_all_uses(n.outputs[0], n.inputs[0])  # a graph output keeps its name
        graph.remove_node(n)
    return len(nodes)
