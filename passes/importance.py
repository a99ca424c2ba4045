"""Channel importance for structured pruning: the criteria ``prune-channels`` ranks channels by
(l1, l2, bn_scale, random, and Taylor's first-order estimate of the loss change, which needs a
backward pass over calibration data), one score per channel of a dependency group."""

from __future__ import annotations

import numpy as np

from graphopt.errors import GraphOptError
from graphopt.geometry import geometry
from graphopt.ir import Graph, Value
from graphopt.meta import BN_STATS

from .channels import Space


def _importance(graph: Graph, sp: Space, criterion: str, rng: np.random.Generator,
                taylor: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """Importance of every channel of ``sp``, summed with that of the spaces padded into it."""
    total, found = np.zeros(sp.channels), False
    for m, off in sp.tree():
        sc = _own_importance(graph, m, criterion, rng, taylor)
        if sc is not None:
            total[off:off + m.channels] += sc
            found = True
    if not found:
        raise GraphOptError(f"criterion bn_scale: group {sp.names} has no BatchNorm (statistics)")
    return total


def _own_importance(graph: Graph, sp: Space, criterion: str, rng: np.random.Generator,
                    taylor: dict[str, np.ndarray] | None = None) -> np.ndarray | None:
    c = sp.channels
    if criterion == "taylor":
        if taylor is None or sp.key not in taylor:
            raise GraphOptError("criterion taylor needs calibration data (its gradients come from it)")
        return taylor[sp.key]
    if criterion == "random":
        return rng.random(c)
    if criterion == "bn_scale":
        scores = np.zeros(c)
        found = False
        for n, i in sp.params:
            if n.op_type == "BatchNormalization" and i == 1:
                scores += np.abs(np.asarray(graph.const_value(n.inputs[1]), np.float64))
                found = True
        for p in sp.producers:
            meta = p.outputs[0].meta.get(BN_STATS)
            if meta is not None:
                scores += np.abs(np.asarray(meta["gamma"], np.float64))
                found = True
        return scores if found else None
    p = 1 if criterion == "l1" else 2
    return _channel_sums(sp, lambda v: np.abs(np.asarray(graph.const_value(v), np.float64)) ** p) ** (1.0 / p)


def _channel_sums(sp: Space, per_element, biases_and_params: bool = False) -> np.ndarray:
    """Per channel of ``sp``, the sum of ``per_element(constant)`` over the weights the channel owns:
    producer and depthwise rows, consumer columns (flatten -> Gemm: a block of columns each) and,
    with ``biases_and_params``, biases and per-channel constants. ``per_element`` returns an array
    shaped like the constant, or None to leave it out."""
    total = np.zeros(sp.channels)
    for n in sp.producers + sp.depthwise:
        a = per_element(n.inputs[1])
        if a is not None:
            total += geometry(n).out_view(a).sum(1)
        if biases_and_params and len(n.inputs) > 2 and n.inputs[2] is not None:
            b = per_element(n.inputs[2])
            if b is not None:
                total += b
    for n, _s in sp.consumers:
        a = per_element(n.inputs[1])
        if a is not None:
            total += geometry(n).in_view(a).reshape(sp.channels, -1).sum(1)  # [C*s, rest]
    if biases_and_params:
        for n, i in sp.params:
            a = per_element(n.inputs[i])
            if a is not None and a.size == sp.channels:
                total += a.reshape(-1)
    return total


def taylor_scores(graph: Graph, spaces: list[Space], data, max_batches: int | None = None) -> dict[str, np.ndarray]:
    """First-order Taylor importance of every channel of ``spaces`` (Molchanov et al. 2019):
    for each calibration batch, the loss change estimated for removing channel c is the sum of
    gradient x weight over every parameter the channel owns in its group (producer rows and
    biases, depthwise rows, consumer columns, BN scale and shift, per-channel constants); the
    score is the mean of its square over batches. The loss is cross-entropy against the
    model's own top-1 when the output is [N, classes] logits (no labels needed), else half the
    squared output norm. Gradients come from the torch back end in ``eval()`` mode."""
    import torch
    import torch.nn.functional as F

    from graphopt.backends.torch_module import to_torch
    from graphopt.training.calibration import CalibrationData

    data = data if isinstance(data, CalibrationData) else CalibrationData(data)
    module = to_torch(graph).eval()
    params = dict(module.named_parameters())
    attr_of = module.param_names  # IR constant name -> parameter attribute

    gw: dict[str, np.ndarray | None] = {}  # grad x weight of the current batch, once per constant

    def gw_of(v: Value) -> np.ndarray | None:
        if v.name not in gw:
            a = attr_of.get(v.name)
            grad = params[a].grad if a is not None else None
            gw[v.name] = None if grad is None else (grad * params[a]).detach().double().numpy()
        return gw[v.name]

    sums = {sp.key: np.zeros(sp.channels) for sp in spaces}
    batches = 0
    for batch in data:
        module.zero_grad(set_to_none=True)
        out = module(torch.from_numpy(np.ascontiguousarray(batch)))
        out = out[0] if isinstance(out, tuple) else out
        if out.dim() == 2 and out.shape[1] > 1:
            loss = F.cross_entropy(out, out.detach().argmax(1))
        else:
            loss = 0.5 * (out * out).sum() / out.shape[0]
        loss.backward()
        gw.clear()
        for sp in spaces:
            t = _channel_sums(sp, gw_of, biases_and_params=True)
            sums[sp.key] += t * t
        batches += 1
        if max_batches is not None and batches >= max_batches:
            break
    if batches == 0:
        raise GraphOptError("criterion taylor: the calibration data has no batches")
    return {k: v / batches for k, v in sums.items()}
