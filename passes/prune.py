"""Structured channel pruning: dependency analysis, ``prune-channels`` (selection) and
``fold-prune`` (physical removal). Selection and folding are separate steps: prune-channels only
records masks, fold-prune removes the channels from every member of each group.

Dependency analysis. A *channel space* is a set of values whose channel axis (axis 1) must keep
the same channels. Union-find joins them through:
- channel-wise ops: BN, activations, pooling, Identity;
- depthwise convs: channels pass through, and ``group`` shrinks with them;
- grouped convs: their input and output channels leave every group in equal numbers, and
  ``group`` stays (a grouped conv with one channel per group on a side leaves that side alone);
- element-wise binary ops whose operands both carry the channels. A residual Add couples its
  branches. A [N,1,H,W] operand or a broadcast constant does not couple.
Derived spaces map a base space's channels onto other values:
- Concat outputs: offsets;
- Split outputs: segments;
- Flatten -> Gemm: channel c is features [c*s, (c+1)*s).
Channel padding (a Pad that only adds zero channels, as the option-A shortcut of CIFAR ResNets
does) puts a smaller space inside a larger one at an offset. Such a tree of spaces is pruned as
one group from its root: a channel of the inner space goes wherever it goes in the outer one,
and the kept zero channels stay as (smaller) pads. A Slice or Pad that leaves axis 1 alone is
channel-wise.
A space can be pruned only when every producer is a Conv/Gemm/MatMul with constant weights, and
every reader is understood. An op the analysis does not understand makes its space unprunable,
and the reason names the op and the node; nothing is guessed.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Literal, Optional

import numpy as np

from graphopt.errors import GraphOptError
from graphopt.geometry import geometry
from graphopt.ir import Graph, Node, Value
from graphopt.masks import Mask, channel_masks, set_channel_masks
from graphopt.meta import BN_STATS
from graphopt.passmanager import Context, Pass, PassResult, option, register_pass

from . import _layers as L
from .canonicalize import _bypass, is_zero_pad

log = logging.getLogger("graphopt.passes.prune")

CHANNELWISE = {"Relu", "Clip", "LeakyRelu", "Sigmoid", "Tanh", "HardSwish", "HardSigmoid", "Identity", "Dropout",
               "Softplus", "Neg", "Abs", "Exp", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool",
               "BatchNormalization", "PRelu", "Erf"}
BINARY = {"Add", "Sub", "Mul", "Div", "Min", "Max"}


@dataclass
class Space:
    id: int
    channels: int
    values: list[Value] = field(default_factory=list)
    producers: list[Node] = field(default_factory=list)  # layers whose output rows are these channels
    depthwise: list[Node] = field(default_factory=list)  # channels pass through (rows and group shrink)
    consumers: list[tuple[Node, int]] = field(default_factory=list)  # (layer, factor s): reads columns
    params: list[tuple[Node, int]] = field(default_factory=list)  # per-channel constant inputs to slice
    derived: list[tuple[str, Node, int]] = field(default_factory=list)  # ("concat"|"split"|"flatten", node, index)
    blocks: list[int] = field(default_factory=list)  # group counts of grouped convs: equal removal per group
    reasons: list[str] = field(default_factory=list)
    # channel padding (Pad on axis 1, zeros): this space is channels [offset, offset + channels)
    # of ``parent``; the tree of such spaces is selected and pruned as one group from its root
    parent: Optional[tuple["Space", int, Node]] = None
    children: list["Space"] = field(default_factory=list)

    @property
    def prunable(self) -> bool:
        return not self.reasons and bool(self.producers) and self.parent is None

    def tree(self) -> list[tuple["Space", int]]:
        """This space and every space padded into it, with offsets in this space's channels."""
        out = [(self, 0)]
        for ch in self.children:
            off = ch.parent[1]
            out += [(s, off + o) for s, o in ch.tree()]
        return out

    @property
    def key(self) -> str:
        return self.producers[0].outputs[0].name if self.producers else f"space{self.id}"

    @property
    def names(self) -> list[str]:
        return [n.source for n in self.producers]


class _UF:
    def __init__(self):
        self.parent: dict[Value, Value] = {}

    def find(self, v: Value) -> Value:
        self.parent.setdefault(v, v)
        while self.parent[v] is not v:
            self.parent[v] = self.parent[self.parent[v]]
            v = self.parent[v]
        return v

    def union(self, a: Value, b: Value) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra is not rb:
            self.parent[rb] = ra


def _channels(v: Value | None) -> int | None:
    if v is None or v.shape is None or len(v.shape) < 2 or not isinstance(v.shape[1], int):
        return None
    return v.shape[1]


def _is_depthwise(graph: Graph, n: Node) -> bool:
    w = L.weight(graph, n)
    g = n.attr("group", 1)
    return n.op_type == "Conv" and g > 1 and w.shape[1] == 1 and w.shape[0] == g and _channels(n.inputs[0]) == g


def _slice_or_pad_channels(graph: Graph, n: Node):
    """"channelwise" when a Slice/Pad leaves axis 1 alone; (before, after) for a Pad that only adds
    zero channels around the input (option-A ResNet shortcuts); None when not understood."""
    x = n.inputs[0]
    rank = len(x.shape) if x.shape is not None else None
    if rank is None:
        return None
    consts = [graph.const_value(v) if v is not None else None for v in n.inputs[1:]]
    if any(v is not None and c is None for v, c in zip(n.inputs[1:], consts)):
        return None  # computed starts/ends/pads
    if n.op_type == "Slice":
        if len(consts) < 2:
            return None
        axes = np.asarray(consts[2]).tolist() if len(consts) > 2 and consts[2] is not None else list(range(rank))
        return "channelwise" if 1 not in [a % rank for a in axes] else None
    if n.attr("mode", "constant") not in ("constant", b"constant"):
        return None
    if len(consts) > 1 and consts[1] is not None and np.asarray(consts[1]).size and np.any(np.asarray(consts[1])):
        return None  # a non-zero pad value
    if len(consts) > 2 and consts[2] is not None:
        return None  # explicit axes input: not handled
    pads = np.asarray(consts[0]).tolist() if consts and consts[0] is not None else None
    if pads is None or len(pads) != 2 * rank:
        return None
    before, after = int(pads[1]), int(pads[1 + rank])
    if before < 0 or after < 0 or pads[0] or pads[rank]:
        return None
    if before == after == 0:
        return "channelwise"
    if any(pads[i] or pads[i + rank] for i in range(2, rank)):
        return None  # channel and spatial padding at once: keep it simple
    return before, after


def analyze(graph: Graph) -> list[Space]:
    """Channel spaces of ``graph`` (see the module doc). Runs shape inference first."""
    try:
        graph.infer_shapes()
    except Exception as e:  # keep the shapes we have; values without one are not pruned
        log.warning("prune: shape inference failed (%s); using the recorded shapes", str(e).splitlines()[0])
    graph.toposort()
    uf = _UF()
    roles: list[tuple[str, Value, object]] = []  # (Space list to append to, value, item), resolved after unions
    problems: list[tuple[Value, str]] = []
    for n in graph.nodes:
        op = n.op_type
        ins = [v for v in n.inputs if v is not None]
        chan_ins = [(i, v) for i, v in enumerate(n.inputs) if v is not None and graph.const_value(v) is None
                    and _channels(v) is not None]
        out = n.outputs[0] if n.outputs else None
        if n.domain != "":
            for _, v in chan_ins:
                problems.append((v, f"op {n.qualified_op} '{n.name}' is not understood"))
            for o in n.outputs:
                if _channels(o) is not None:
                    problems.append((o, f"channels produced by op {n.qualified_op} '{n.name}', which is not understood"))
            continue
        if op in ("Conv", "Gemm", "MatMul") and L.is_linear_layer(graph, n):
            x = n.inputs[0]
            if op == "Conv" and _is_depthwise(graph, n):
                uf.union(x, out)
                roles.append(("depthwise", x, n))
                continue
            g = n.attr("group", 1)
            if op == "Conv" and g > 1:  # grouped: channels leave each group in equal numbers, `group` stays
                w = L.weight(graph, n)
                if w.shape[1] > 1 and _channels(x) is not None:
                    roles.append(("consumers", x, (n, 1)))
                    roles.append(("blocks", x, g))
                else:
                    problems.append((x, f"grouped conv '{n.name}' reads one channel per group"))
                if w.shape[0] // g > 1:
                    roles.append(("producers", out, n))
                    roles.append(("blocks", out, g))
                else:
                    problems.append((out, f"grouped conv '{n.name}' writes one channel per group"))
                continue
            if op == "MatMul" and (x.shape is None or len(x.shape) != 2):
                problems.append((x, f"MatMul '{n.name}' on a rank-{len(x.shape) if x.shape else '?'} input"))
            elif _channels(x) is not None:
                roles.append(("consumers", x, (n, 1)))
            roles.append(("producers", out, n))
            continue
        if op in CHANNELWISE:
            if chan_ins and out is not None:
                x = n.inputs[0]
                if _channels(x) is not None:
                    uf.union(x, out)
                for i, v in enumerate(n.inputs[1:], start=1):
                    c = graph.const_value(v) if v is not None else None
                    if c is not None and np.asarray(c).size == _channels(x) and np.asarray(c).size > 1:
                        roles.append(("params", x, (n, i)))
                    elif v is not None and c is None:
                        problems.append((x, f"{op} '{n.name}' with a computed parameter"))
            continue
        if op in BINARY and out is not None and _channels(out) is not None:
            cout = _channels(out)
            for i, v in enumerate(n.inputs):
                if v is None:
                    continue
                c = graph.const_value(v)
                if c is not None:
                    c = np.asarray(c)
                    rank = len(out.shape)
                    shape = (1,) * (rank - c.ndim) + c.shape
                    if shape[1] == cout and cout > 1:
                        roles.append(("params", out, (n, i)))
                    continue
                ch = _channels(v)
                if ch == cout:
                    uf.union(v, out)  # both operands carry the channels: coupled
                elif ch != 1:
                    problems.append((out, f"{op} '{n.name}' broadcasts in an unknown way"))
            continue
        if op in ("Slice", "Pad") and out is not None and _channels(n.inputs[0]) is not None:
            how = _slice_or_pad_channels(graph, n)
            if how == "channelwise":
                uf.union(n.inputs[0], out)
                continue
            if isinstance(how, tuple):  # zero-padding of the channels: out = [0]*before ++ x ++ [0]*after
                roles.append(("embed", out, (n.inputs[0], how[0], n)))
                continue
        if op == "Concat" and out is not None and n.attr("axis") in (1, -len(out.shape or [0, 0]) + 1) and \
                all(_channels(v) is not None for v in ins):
            for i, v in enumerate(n.inputs):
                roles.append(("derived", v, ("concat", n, i)))
            roles.append(("derived-root", out, n))
            continue
        if op == "Split" and n.attr("axis", 0) == 1 and _channels(n.inputs[0]) is not None:
            roles.append(("derived", n.inputs[0], ("split", n, 0)))
            for o in n.outputs:
                roles.append(("derived-root", o, n))
            continue
        if op == "Flatten" and n.attr("axis", 1) == 1 and _channels(n.inputs[0]) is not None and out is not None:
            users = out.users()
            shape = n.inputs[0].shape
            s = int(np.prod(shape[2:])) if all(isinstance(d, int) for d in shape[2:]) else None
            if s is not None and users and all(u.op_type in ("Gemm", "MatMul") and L.is_linear_layer(graph, u)
                                               and u.inputs[0] is out for u in users) and not out.is_graph_output:
                for u in users:
                    roles.append(("consumers", n.inputs[0], (u, s)))
                continue
        for _, v in chan_ins:  # anything else reading channels: not understood
            problems.append((v, f"op {op} '{n.name}' is not understood"))
        for o in n.outputs:  # ...and channels it produces cannot be removed either
            if _channels(o) is not None:
                problems.append((o, f"channels produced by op {op} '{n.name}', which is not understood"))

    spaces: dict[Value, Space] = {}

    def space(v: Value) -> Space:
        r = uf.find(v)
        if r not in spaces:
            spaces[r] = Space(len(spaces), _channels(v) or 0)
        return spaces[r]

    derived_roots: set[Value] = set()
    embeds: list[tuple[Space, Space, int, Node]] = []
    for kind, v, item in roles:
        if kind == "derived-root":
            derived_roots.add(uf.find(v))
        elif kind == "embed":
            x, before, pad = item
            embeds.append((space(x), space(v), before, pad))
        else:
            getattr(space(v), kind).append(item)
    for v, why in problems:
        space(v).reasons.append(why)
    for n in graph.nodes:
        for o in n.outputs:
            if _channels(o) is not None:
                sp = space(o)
                if o not in sp.values:
                    sp.values.append(o)
    for v in graph.inputs:
        if _channels(v) is not None:
            space(v).reasons.append(f"graph input '{v.name}'")
    for v in graph.outputs:
        if _channels(v) is not None:
            space(v).reasons.append(f"graph output '{v.name}'")
    for r in derived_roots:  # a concat/split result: pruned through its sources, never on its own
        sp = spaces.get(r)
        if sp is not None:
            if sp.producers:
                sp.reasons.append("channels that come from a Concat/Split are also produced by a layer")
            if sp.blocks:
                sp.reasons.append("a grouped conv reads channels that come from a Concat/Split")
            sp.producers.clear()
    for sp in spaces.values():
        if len(set(sp.blocks)) > 1:
            sp.reasons.append(f"grouped convs with different group counts {sorted(set(sp.blocks))} share channels")
        elif sp.blocks and sp.channels % sp.blocks[0]:
            sp.reasons.append(f"{sp.channels} channels do not split into {sp.blocks[0]} groups")
    for child, parent, before, pad in embeds:
        if child.parent is not None or child is parent:
            why = f"channels padded by more than one Pad ('{pad.name}', '{child.parent[2].name}')" \
                if child.parent is not None else f"Pad '{pad.name}' pads a group into itself"
            child.reasons.append(why)
            parent.reasons.append(why)
            continue
        child.parent = (parent, before, pad)
        parent.children.append(child)
    roots = [sp for sp in spaces.values() if sp.parent is None]
    for root in roots:  # a padded tree is pruned as one group: one problem blocks all of it
        members = [m for m, _ in root.tree()]
        if len(members) == 1:
            continue
        bad = [m for m in members if m.reasons]
        if any(m.blocks for m in members):
            bad = members
            root.reasons.append("a grouped conv in a group with channel padding")
        if bad:
            for m in members:
                if not m.reasons:
                    m.reasons.append(f"coupled through channel padding to an unprunable group ({bad[0].reasons[0]})")
    # a problem in a derived space blocks the sources it is made of, and the other way round
    changed = True
    while changed:
        changed = False
        for sp in spaces.values():
            for kind, n, _ in sp.derived:
                linked = [space(o) for o in n.outputs] if kind == "split" else [space(n.outputs[0])]
                if kind == "concat":
                    linked += [space(v) for v in n.inputs if v is not None]
                bad = [x for x in linked + [sp] if x.reasons]
                if bad:
                    for x in linked + [sp]:
                        if not x.reasons:
                            x.reasons.append(f"coupled through {n.op_type} '{n.name}' to an unprunable group")
                            changed = True
    return list(spaces.values())


# ---------------------------------------------------------------------------- selection
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


@register_pass("prune-channels")
@dataclass(kw_only=True)
class PruneChannels(Pass):
    """Choose channels to remove and record them as masks (fold-prune removes them).

    A group of coupled channels (see the dependency analysis) is scored as a whole: the
    importance of all its members is summed (L1 or L2 of every weight that touches a channel,
    or |BN scale|, or random). ``ratio`` removes that fraction of each prunable group. With
    ``global_ranking`` scores are normalised per group and one threshold picks channels across
    all groups. Kept channel counts are rounded to multiples of ``round_to``; layers whose name
    matches a ``skip`` pattern keep all their channels."""

    before = ("quantize", "fold-prune")  # fold-prune consumes the masks this pass makes

    ratio: float = option(0.3, "fraction of channels to remove from each prunable group, in [0, 1)", minimum=0.0,
                          maximum=0.999999)
    criterion: Literal["l1", "l2", "bn_scale", "taylor", "random"] = option(
        "l1", "channel importance (taylor: gradient x weight on the calibration data)")
    round_to: Optional[int] = option(None, "keep a multiple of this many channels: the runtime's channel block "
                                           "(onnxruntime: 16 on AVX-512, 8 on AVX2); none: this CPU's, detected "
                                           "(see graphopt.util.channel_block)", minimum=1)
    skip: list[str] = option([], "layer name/source patterns (fnmatch) whose groups are not pruned; "
                                 "in a channel-padded tree, that member keeps its own channels")
    global_ranking: bool = option(False, "one threshold across groups instead of the same ratio in each")
    target_macs: Optional[float] = option(None, "instead of ratio: reach this fraction of the MACs, with per-group "
                                                "ratios chosen by a sensitivity scan on the calibration data",
                                          minimum=0.05, maximum=1.0)
    seed: int = option(0, "seed for criterion=random")

    def run(self, graph: Graph, ctx: Context) -> PassResult:
        if self.round_to is None:  # the default is safe for speed: this CPU's channel block
            from graphopt.util import channel_block

            block, why = channel_block()
            log.info("prune-channels: round_to=%d (%s)", block, why)
            r = dataclasses.replace(self, round_to=block)._run(graph, ctx)
            r.stats["round_to"] = f"{block} ({why})"
            return r
        return self._run(graph, ctx)

    def _run(self, graph: Graph, ctx: Context) -> PassResult:
        if not 0.0 <= self.ratio < 1.0:
            raise GraphOptError(f"ratio must be in [0, 1), got {self.ratio}")
        rng = np.random.default_rng(self.seed)
        spaces = analyze(graph)
        candidates, reasons = [], {}
        for sp in spaces:
            if sp.parent is not None:
                continue  # pruned as part of the space it is padded into
            if not sp.prunable:
                for name in sp.names or [v.name for v in sp.values[:1]]:
                    reasons[name] = "; ".join(sp.reasons) or "no producing layer"
                continue
            if _skipped(sp, self.skip):
                continue
            candidates.append(sp)
        masks: dict[str, list[int]] = {}
        taylor = None
        if self.criterion == "taylor":
            if ctx.calib is None:
                raise GraphOptError("prune-channels{criterion=taylor} needs calibration data (--calib)")
            taylor = taylor_scores(graph, [m for sp in candidates for m, _ in sp.tree()], ctx.calib)
        if self.target_macs is not None:
            return self._by_target(graph, ctx, candidates, reasons, rng, taylor)
        scores = {sp.id: _importance(graph, sp, self.criterion, rng, taylor) for sp in candidates}
        threshold = None
        if self.global_ranking and candidates:
            allnorm = np.concatenate([scores[sp.id] / max(scores[sp.id].mean(), 1e-12) for sp in candidates])
            threshold = np.quantile(allnorm, self.ratio) if self.ratio > 0 else -np.inf
        for sp in candidates:
            sc = scores[sp.id]
            if threshold is not None:
                n_remove = int((sc / max(sc.mean(), 1e-12) < threshold).sum())
            else:
                n_remove = int(np.floor(sp.channels * self.ratio))
            if sp.children:
                keep = _select_tree(sp, sc, n_remove / sp.channels, self.round_to, self.skip)
                if len(keep) < sp.channels:
                    masks[sp.key] = Mask.channel(keep, sp.channels)
                continue
            keep_n = _round_keep(sp, sp.channels - n_remove, self.round_to)
            if keep_n <= 0:
                raise GraphOptError(f"pruning would remove every channel of {sp.names}")
            if keep_n == sp.channels:
                continue
            masks[sp.key] = Mask.channel(_select(sp, sc, keep_n), sp.channels)
        prev = channel_masks(graph)
        set_channel_masks(graph, masks)
        for name, why in reasons.items():
            log.info("prune-channels: '%s' not prunable: %s", name, why)
        removed = sum(sp.channels - len(masks[sp.key].indices()) for sp in candidates if sp.key in masks)
        return PassResult(graph, masks != prev, {"groups": len(candidates), "pruned_groups": len(masks),
                                                 "channels_removed": removed, "unprunable": reasons})


    def _by_target(self, graph: Graph, ctx: Context, candidates: list[Space], reasons, rng, taylor) -> PassResult:
        if ctx.calib is None:
            raise GraphOptError("prune-channels{target_macs=...} needs calibration data for its sensitivity scan")
        rows = [r for r in sensitivity(graph, ctx.calib, ratios=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8),
                                       criterion=self.criterion, round_to=self.round_to, progress=ctx.show_progress,
                                       taylor=taylor)
                if r["group"] in {sp.key for sp in candidates}]
        from graphopt.allocate import allocate_to_target
        from graphopt.analysis import total_macs

        # Savings of neighbouring groups are not additive (a conv losing inputs and outputs keeps
        # (1-a)(1-b) of its MACs): the allocator measures each plan and asks for more until it holds.
        macs0 = total_macs(graph)
        groups, ratios, saved, err = ratio_table(rows)
        by_key = {sp.key: sp for sp in candidates}

        memo: dict[tuple, dict] = {}  # one draw per plan (criterion=random), reused for the final masks

        def plan_masks(choice) -> dict:
            key = tuple(int(k) for k in choice)
            if key in memo:
                return memo[key]
            masks = memo[key] = {}
            for g, k in zip(groups, choice):
                if k > 0:
                    sp = by_key[g]
                    keep = _keep_top(graph, sp, ratios[int(k)], self.criterion, self.round_to, rng, taylor, self.skip)
                    if keep is not None:
                        masks[sp.key] = Mask.channel(keep, sp.channels)
            return masks

        def measured(choice) -> float:  # minus the MACs really saved by the folded plan
            masks = plan_masks(choice)
            trial = graph.copy()
            set_channel_masks(trial, masks)
            return -(1.0 - (total_macs(FoldPrune()(trial).graph) / macs0 if masks else 1.0))

        choice, _ = allocate_to_target(-saved, err, -(1.0 - self.target_macs), measured)
        masks = plan_masks(choice)
        plan = {g: ratios[int(k)] for g, k in zip(groups, choice) if k > 0}
        prev = channel_masks(graph)
        set_channel_masks(graph, masks)
        return PassResult(graph, masks != prev, {"groups": len(candidates), "pruned_groups": len(masks),
                                                 "ratios": plan, "unprunable": reasons})


@register_pass("fold-prune")
@dataclass(kw_only=True)
class FoldPrune(Pass):
    """Physically remove the channels prune-channels masked: weight rows of producers and depthwise
    convs (``group`` shrinks), weight columns of every consumer (flatten -> Gemm columns in
    blocks; grouped convs per group), per-channel constants (BN, PReLU, Min/Mul/Add), Concat/Split
    offsets, Split sizes and the channel pads of zero-padding Pads (a Pad left padding nothing is
    removed). The result is a smaller dense graph, exactly equal to the masked model."""

    before = ("quantize",)

    def run(self, graph: Graph, ctx: Context) -> PassResult:
        masks = channel_masks(graph)
        if not masks:
            return PassResult(graph, False, {"groups": 0})
        spaces = {sp.key: sp for sp in analyze(graph)}
        keep_of: dict[int, np.ndarray] = {}
        for key, mask in masks.items():
            sp = spaces.get(key)
            if sp is None or not sp.prunable:
                raise GraphOptError(f"mask for '{key}' no longer matches a prunable group (re-run prune-channels)")
            _assign_tree(graph, sp, np.asarray(mask.indices(), np.int64), keep_of)
        # a channel Pad left with nothing to pad (all its zero channels pruned) is an identity
        zero_pads = [n for n in graph.nodes if is_zero_pad(graph, n)]
        dropped_pads = sum(_bypass(graph, n) for n in zero_pads)
        by_value = {v: sp for sp in spaces.values() for v in sp.values}
        for sp in spaces.values():
            for n in sp.producers:
                by_value.setdefault(n.outputs[0], sp)
        # derived spaces: concat outputs and split outputs get mapped keep lists
        for n in graph.nodes:
            if n.op_type == "Concat" and n.outputs[0] in by_value and by_value[n.outputs[0]].id not in keep_of:
                parts, off, touched = [], 0, False
                for v in n.inputs:
                    sp = by_value.get(v)
                    k = keep_of.get(sp.id) if sp is not None else None
                    touched |= k is not None
                    parts.append(off + (k if k is not None else np.arange(_channels(v))))
                    off += _channels(v)
                if touched:
                    keep_of[by_value[n.outputs[0]].id] = np.concatenate(parts)
            if n.op_type == "Split" and n.inputs[0] in by_value and by_value[n.inputs[0]].id in keep_of:
                k = keep_of[by_value[n.inputs[0]].id]
                off, sizes = 0, []
                for o in n.outputs:
                    c = _channels(o)
                    seg = k[(k >= off) & (k < off + c)] - off
                    if seg.size == 0:
                        raise GraphOptError(f"pruning would empty output '{o.name}' of Split '{n.name}'")
                    if o in by_value:
                        keep_of[by_value[o].id] = seg
                    sizes.append(seg.size)
                    off += c
                L.set_input_const(graph, n, 1, np.asarray(sizes, np.int64))
        changed = 0
        for sp in spaces.values():
            k = keep_of.get(sp.id)
            if k is None:
                continue
            for n in sp.producers:
                w = L.weight(graph, n)
                geo = geometry(n)
                L.set_input_const(graph, n, 1, geo.from_out_view(geo.out_view(w)[k], geo.resized(w.shape, out=len(k))))
                b = L.bias(graph, n)
                if b is not None:
                    L.set_input_const(graph, n, 2, b[k])
            for n in sp.depthwise:
                w = L.weight(graph, n)
                L.set_input_const(graph, n, 1, w[k])
                b = L.bias(graph, n)
                if b is not None:
                    L.set_input_const(graph, n, 2, b[k])
                n.attrs["group"] = int(len(k))
            for n, s in sp.consumers:
                cols = np.concatenate([np.arange(c * s, (c + 1) * s) for c in k]) if s > 1 else k
                w = L.weight(graph, n)
                view = geometry(n).in_view(w)[cols]
                L.set_input_const(graph, n, 1, geometry(n).from_in_view(view, geometry(n).resized(w.shape, inp=len(cols))))
            for n, i in sp.params:
                c = np.asarray(graph.const_value(n.inputs[i]))
                # BN parameters are 1-D per channel; other constants broadcast right-aligned
                axis = 0 if n.op_type == "BatchNormalization" else 1 - (len(n.outputs[0].shape) - c.ndim)
                L.set_input_const(graph, n, i, np.take(c, k, axis=axis))
            changed += 1
        for v in graph.values.values():  # shapes change: infer them again
            if v.const is None and v.producer is not None:
                v.shape = None
        graph.infer_shapes()
        set_channel_masks(graph, {})
        graph.remove_unused_constants()
        return PassResult(graph, changed > 0 or dropped_pads > 0, {"groups": changed, "pads_removed": dropped_pads})


def _assign_tree(graph: Graph, sp: Space, keep: np.ndarray, keep_of: dict[int, np.ndarray]) -> None:
    """Give ``sp`` its kept channels, map them into every space padded into it, and shrink the
    channel pads of those Pads to the zero channels that are kept."""
    keep_of[sp.id] = keep
    for ch in sp.children:
        _, off, pad = ch.parent
        inner = keep[(keep >= off) & (keep < off + ch.channels)] - off
        if inner.size == 0:
            raise GraphOptError(f"pruning would remove every channel that Pad '{pad.name}' pads")
        pads = np.asarray(graph.const_value(pad.inputs[1])).copy()
        rank = pads.size // 2
        pads[1], pads[1 + rank] = int((keep < off).sum()), int((keep >= off + ch.channels).sum())
        L.set_input_const(graph, pad, 1, pads)
        _assign_tree(graph, ch, inner, keep_of)


# ---------------------------------------------------------------------------- sensitivity
def _round_keep(sp: Space, keep_n: int, round_to: int) -> int:
    """``keep_n`` rounded to a multiple of ``round_to`` (and of the group count of grouped convs)."""
    unit = int(np.lcm(round_to, sp.blocks[0])) if sp.blocks else round_to
    return min(sp.channels, max(unit, int(round(keep_n / unit)) * unit))


def _select(sp: Space, scores: np.ndarray, keep_n: int) -> list[int]:
    """The ``keep_n`` most important channels; with grouped convs, the same number from each group."""
    if not sp.blocks:
        return np.sort(np.argsort(-scores, kind="stable")[:keep_n]).tolist()
    g = sp.blocks[0]
    per, size = keep_n // g, sp.channels // g
    blocks = scores.reshape(g, size)
    top = np.sort(np.argsort(-blocks, axis=1, kind="stable")[:, :per], axis=1)
    return (top + (np.arange(g) * size)[:, None]).reshape(-1).tolist()


def _skipped(sp: Space, patterns: list[str]) -> bool:
    return any(L.matches(n, patterns) for n in sp.producers + sp.depthwise)


def _select_tree(sp: Space, scores: np.ndarray, ratio: float, round_to: int, skip: list[str] = ()) -> list[int]:
    """Selection for a space with channel-padded spaces inside it. Every member of the tree keeps
    ``1 - ratio`` of its channels, rounded to ``round_to`` (at least ``round_to``): first the
    inner spaces choose theirs, then each outer space tops up from its own channels (the ones
    not padded in) by importance. A member whose layers match ``skip`` keeps all its own."""
    keep: list[np.ndarray] = []

    def visit(m: Space, off: int) -> int:
        inner = sum(visit(ch, off + ch.parent[1]) for ch in m.children)
        own = np.ones(m.channels, bool)
        for ch in m.children:
            own[ch.parent[1]:ch.parent[1] + ch.channels] = False
        idx = off + np.flatnonzero(own)
        if m is not sp and _skipped(m, skip):
            k = idx.size
        else:
            target = min(m.channels, max(round_to, int(round(m.channels * (1.0 - ratio) / round_to)) * round_to))
            k = int(np.clip(target - inner, 0, idx.size))
        keep.append(idx[np.argsort(-scores[idx], kind="stable")[:k]])
        return inner + k

    visit(sp, 0)
    return np.sort(np.concatenate(keep)).tolist()


def _keep_top(graph: Graph, sp: Space, ratio: float, criterion: str, round_to: int, rng,
              taylor: dict[str, np.ndarray] | None = None, skip: list[str] = ()) -> list[int] | None:
    if sp.children:
        keep = _select_tree(sp, _importance(graph, sp, criterion, rng, taylor), ratio, round_to, skip)
        return keep if len(keep) < sp.channels else None
    keep_n = _round_keep(sp, sp.channels - int(np.floor(sp.channels * ratio)), round_to)
    if keep_n >= sp.channels:
        return None
    return _select(sp, _importance(graph, sp, criterion, rng, taylor), keep_n)


def sensitivity(graph: Graph, data, ratios=(0.1, 0.3, 0.5, 0.7), labels: np.ndarray | None = None,
                criterion: str = "l1", round_to: int = 1, progress: bool = False,
                taylor: dict[str, np.ndarray] | None = None) -> list[dict]:
    """Prune each prunable group alone at each ratio and measure the damage on ``data`` (a
    ``graphopt.scan.Scan`` transform trial: the pruned, folded copy): the output's relative L2
    error against the unpruned graph, and top-1 accuracy if ``labels``. Returns one row per
    (group, ratio) in the scan schema (unit = group, level = ratio, cost = the share of MACs left,
    error = the scan's metric) with the MACs saved."""
    from graphopt.analysis import total_macs
    from graphopt.scan import Scan, row
    from graphopt.training.calibration import CalibrationData

    data = data if isinstance(data, CalibrationData) else CalibrationData(data)
    scan = Scan(graph, data, labels)
    macs0 = total_macs(graph)
    rng = np.random.default_rng(0)
    rows = []
    spaces = [sp for sp in analyze(graph) if sp.prunable]
    if criterion == "taylor" and taylor is None:
        taylor = taylor_scores(graph, [m for sp in spaces for m, _ in sp.tree()], data)
    jobs = [(sp, r) for sp in spaces for r in ratios]
    it = jobs
    if progress:
        from tqdm import tqdm

        it = tqdm(jobs, desc="sensitivity", leave=False)
    for sp, r in it:
        keep = _keep_top(graph, sp, r, criterion, round_to, rng, taylor)
        if keep is None:
            continue
        g = graph.copy()
        set_channel_masks(g, {sp.key: Mask.channel(keep, sp.channels)})
        g = FoldPrune()(g).graph
        trial = scan.transform(g)
        left = total_macs(g) / macs0
        rows.append(row(sp.key, r, left, trial, group=sp.key, layers=", ".join(sp.names), ratio=r,
                        channels=sp.channels, kept=len(keep), macs_saved=1.0 - left,
                        rel_error=float(np.sqrt(trial["rel_mse"])),
                        **({"top1": trial["top1"]} if labels is not None else {})))
    return rows


def ratio_table(rows: list[dict]) -> tuple[list[str], list[float], np.ndarray, np.ndarray]:
    """The sensitivity rows as the allocator's tables: (groups, ratios with 0 first, MACs saved
    [G, K], relative MSE [G, K] (the square of the rows' relative L2 error); inf where a group has
    no row at that ratio)."""
    groups = list(dict.fromkeys(r["group"] for r in rows))
    ratios = [0.0] + sorted({r["ratio"] for r in rows})
    saved = np.zeros((len(groups), len(ratios)))
    err = np.full((len(groups), len(ratios)), np.inf)
    err[:, 0] = 0.0
    gi, ri = {g: i for i, g in enumerate(groups)}, {v: j for j, v in enumerate(ratios)}
    for r in rows:
        saved[gi[r["group"]], ri[r["ratio"]]] = r["macs_saved"]
        err[gi[r["group"]], ri[r["ratio"]]] = r["rel_error"] ** 2  # the relative MSE (the scan's metric)
    return groups, ratios, saved, err


def allocate_ratios(rows: list[dict], target_saving: float) -> dict[str, float]:
    """The ratio per group with the least summed output error (relative MSE) whose summed MACs
    saved reach ``target_saving``: ``graphopt.allocate``'s exact dynamic program, with cost =
    minus the MACs saved. Groups left unpruned are omitted."""
    from graphopt.allocate import allocate

    groups, ratios, saved, err = ratio_table(rows)
    choice = allocate(-saved, err, -target_saving)[0]
    return {g: ratios[int(k)] for g, k in zip(groups, choice) if k > 0}


# ---------------------------------------------------------------------------- BN re-estimation
@register_pass("recalibrate-bn")
@dataclass(kw_only=True)
class RecalibrateBatchNorm(Pass):
    """Re-estimate the statistics of every (unfolded) BatchNormalization from the calibration
    data: after pruning, a BN's stored mean and variance describe the unpruned network and no
    longer match its input (the "adaptive BN" of EagleEye, Li et al. 2020). The graph runs in
    torch training mode, so each BN normalizes with batch statistics, and the running
    statistics become the average over all batches (``torch.optim.swa_utils.update_bn``).
    Weights are not touched. Run it before fold-bn; a graph without BN is left alone."""

    before = ("fold-bn",)  # it needs the BatchNormalization nodes fold-bn removes

    def run(self, graph: Graph, ctx: Context) -> PassResult:
        bns = [n for n in graph.nodes if n.op_type == "BatchNormalization"]
        if not bns:
            return PassResult(graph, False, {"recalibrated": 0, "reason": "no BatchNormalization (folded already?)"})
        if ctx.calib is None:
            raise GraphOptError("recalibrate-bn needs calibration data (--calib)")
        import torch
        from torch.optim.swa_utils import update_bn

        from graphopt.backends.torch_module import to_torch
        from graphopt.training.calibration import CalibrationData

        data = ctx.calib if isinstance(ctx.calib, CalibrationData) else CalibrationData(ctx.calib)
        module = to_torch(graph, train_bn=True)
        if not module.buffer_names:
            return PassResult(graph, False, {"recalibrated": 0, "reason": "no BN with constant statistics"})
        before = {name: np.asarray(graph.const_value(graph.values[name])).copy() for name in module.buffer_names}
        with torch.no_grad():
            update_bn((torch.from_numpy(np.ascontiguousarray(b)) for b in data), module)
        module.eval()
        graph.update_from(module)
        changed = sum(not np.array_equal(np.asarray(graph.const_value(graph.values[k])), v) for k, v in before.items())
        return PassResult(graph, changed > 0, {"recalibrated": len(module.buffer_names) // 2})
