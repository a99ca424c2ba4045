"""Channel dependency analysis for structured pruning (``prune-channels``, ``fold-prune``). A *channel space* is a set of values whose channel axis (axis 1) must keep
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

import logging
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from graphopt.ir import Graph, Node, Value

from . import _layers as L

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
