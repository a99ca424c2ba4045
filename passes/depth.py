"""Depth pruning: ``prune-blocks`` removes whole residual blocks.

A *residual block* is an ``Add`` whose two operands are computed from one tensor ``x`` along two
paths that nothing else reads: the *branch* (the path with more MACs: convs, BN, activations)
and the *shortcut* (often nothing at all: the operand is ``x`` itself; or a subsample and
channel pad, or a 1x1 conv). Removing the block replaces the Add's output by the shortcut's and
deletes the branch. Both operands must have the Add's own shape (no broadcasting), so the
graph's shapes do not change.

Channel pruning narrows every conv; on a CPU runtime whose kernels work in blocks of 8 or 16
channels, a narrow conv is slower per MAC than a wide one. Removing blocks keeps every
remaining layer at full width, so the runtime realizes nearly all of the MACs saved.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np

from graphopt.errors import GraphError, GraphOptError
from graphopt.ir import Graph, Node, Value
from graphopt.meta import PRUNED_BLOCKS
from graphopt.passmanager import Context, Pass, PassResult, option, register_pass

from . import _layers as L

log = logging.getLogger("graphopt.passes.depth")



@dataclass
class Block:
    add: Node
    branch: list[Node]  # removed with the block
    shortcut: Value  # the operand that replaces the Add's output
    macs: int  # MACs of the branch

    @property
    def name(self) -> str:
        return self.add.name


def _cone(graph: Graph, v: Value, sink: Node, order: dict[Node, int]) -> list[Node]:
    """The nodes that compute ``v`` and whose outputs nothing but each other (and ``sink``) reads:
    empty when ``v`` is read elsewhere too, or is an input. ``order``: topological positions."""
    if v.producer is None or v.is_graph_output or any(n is not sink for n in v.users()):
        return []
    cone = {v.producer}
    nodes = graph.nodes
    # every reader of a node comes after it, so one backward sweep decides each node for good
    for node in reversed(nodes[: order[v.producer]]):
        outs = node.outputs
        if any(o.uses for o in outs) and all(
                not o.is_graph_output and all(u in cone for u in o.users()) for o in outs):
            cone.add(node)
    return [n for n in nodes if n in cone]


def _entries(graph: Graph, cone: list[Node], v: Value) -> set[str]:
    """The non-constant values the cone reads from outside (``v`` itself if the cone is empty)."""
    if not cone:
        return {v.name}
    inside = set(cone)
    return {i.name for n in cone for i in n.inputs
            if i is not None and i.const is None and i.producer not in inside and graph.const_value(i) is None}


def residual_blocks(graph: Graph) -> list[Block]:
    """Every removable residual block, in graph order."""
    from graphopt.analysis import node_macs

    if any(v.shape is None for n in graph.find_nodes("Add") for v in n.inputs if v is not None):
        graph.infer_shapes()
    graph.toposort()
    order = {n: i for i, n in enumerate(graph.nodes)}
    blocks = []
    for add in graph.find_nodes("Add"):
        if add.domain != "" or len(add.inputs) != 2 or any(v is None or v.const is not None for v in add.inputs):
            continue
        out = add.outputs[0]
        if out.shape is None or any(v.shape != out.shape for v in add.inputs):
            continue  # broadcasting (or unknown shapes): removing a path could change the shape
        if add.inputs[0] is add.inputs[1]:
            continue
        paths = [(_cone(graph, v, add, order), v) for v in add.inputs]
        ents = [_entries(graph, c, v) for c, v in paths]
        if len(ents[0]) != 1 or ents[0] != ents[1]:
            continue
        if any(n.domain != "" or n.has_subgraphs() for c, _ in paths for n in c):
            continue
        macs = [sum(node_macs(n) or 0 for n in c) for c, _ in paths]
        if macs[0] == macs[1]:
            continue  # no path is the branch (e.g. two shortcuts, or two identical branches)
        b = int(np.argmax(macs))
        blocks.append(Block(add, paths[b][0], paths[1 - b][1], macs[b]))
    return blocks


def remove_block(graph: Graph, block: Block) -> bool:
    """Replace the block's Add by its shortcut and delete the branch. A ReLU that now applies to
    a ReLU's output (the previous block's) is an identity and goes too. False if the graph's
    output names forbid the rewrite."""
    out = block.add.outputs[0]
    relu = None
    users = out.users()
    if (len(users) == 1 and users[0].op_type == "Relu" and users[0].domain == ""
            and block.shortcut.producer is not None and block.shortcut.producer.op_type == "Relu"):
        relu = users[0]
    try:
        graph.replace_all_uses(out, block.shortcut)
    except GraphError as e:
        log.info("prune-blocks: keeping %s: %s", block.name, e)
        return False
    graph.remove_node(block.add)
    for node in reversed(block.branch):  # in graph order, so users go first
        graph.remove_node(node)
    if relu is not None:
        try:
            graph.replace_all_uses(relu.outputs[0], relu.inputs[0])
            graph.remove_node(relu)
        except GraphError:
            pass
    graph.remove_unused_constants()
    return True


def _skipped(block: Block, patterns: list[str]) -> bool:
    return any(L.matches(n, patterns) for n in [block.add, *block.branch])


@register_pass("prune-blocks")
@dataclass(kw_only=True)
class PruneBlocks(Pass):
    """Remove whole residual blocks (depth pruning): each removed block's output becomes its
    shortcut, and its branch is deleted, so every remaining layer keeps its width. Give either
    ``count`` (blocks to remove) or ``target_macs`` (remove blocks until the MACs are at most
    this fraction of the model's before any block was removed).

    criterion=sensitivity (needs calibration data) removes blocks greedily: at each step, the
    block whose removal moves the output least (relative L2 against the output this pass started
    from, on the calibration data) goes, and the rest are scored again. ``target_macs`` picks the
    block with the least error per MAC saved. criterion=random is a baseline. Counts and
    targets refer to the model before the first prune-blocks of the pipeline, so a second run
    with the same options changes nothing. Fine-tune afterwards: removing blocks changes the function."""

    before = ("quantize",)  # removing blocks of a quantized graph would keep stale ranges

    count: Optional[int] = option(None, "number of residual blocks to remove", minimum=1)
    target_macs: Optional[float] = option(None, "instead of count: remove blocks until the MACs are at most this "
                                                "fraction of the unpruned model's", minimum=0.01, maximum=1.0)
    criterion: Literal["sensitivity", "random"] = option(
        "sensitivity", "which blocks go: least output error on the calibration data, or random")
    skip: list[str] = option([], "name/source patterns (fnmatch) of blocks to keep: an Add or any node of its branch")
    seed: int = option(0, "seed for criterion=random")

    def run(self, graph: Graph, ctx: Context) -> PassResult:
        from graphopt.analysis import total_macs

        if (self.count is None) == (self.target_macs is None):
            raise GraphOptError("prune-blocks needs exactly one of count=N or target_macs=F")
        meta = dict(graph.scratch.get(PRUNED_BLOCKS) or {})
        macs0 = int(meta.get("macs0") or total_macs(graph))
        removed: list[str] = list(meta.get("removed", []))
        candidates = [b for b in residual_blocks(graph) if not _skipped(b, self.skip)]
        if self.count is not None and self.count - len(removed) > len(candidates):
            raise GraphOptError(f"prune-blocks{{count={self.count}}}: the model has only "
                                f"{len(candidates) + len(removed)} removable residual blocks")
        if self._reached(graph, macs0, len(removed)):
            return PassResult(graph, False, {"removed": 0, "blocks": [], "macs": total_macs(graph) / macs0})
        if not candidates:
            return PassResult(graph, False, {"removed": 0, "blocks": [], "reason": "no residual block found"})
        scan = None
        if self.criterion == "sensitivity":
            if ctx.calib is None:
                raise GraphOptError("prune-blocks{criterion=sensitivity} needs calibration data (--calib); "
                                    "criterion=random does not")
            from graphopt.scan import Scan

            scan = Scan(graph, ctx.calib)  # the baseline: the graph before any block goes
        rng = np.random.default_rng(self.seed)
        errors: list[float] = []
        done_now, stuck = 0, set()  # stuck: blocks the graph's output names keep in place
        while not self._reached(graph, macs0, len(removed)):
            blocks = [b for b in residual_blocks(graph) if not _skipped(b, self.skip) and b.name not in stuck]
            if not blocks:
                log.warning("prune-blocks: no removable block left at %.3f of the MACs", total_macs(graph) / macs0)
                break
            if self.criterion == "random":
                pick, err = blocks[int(rng.integers(len(blocks)))], float("nan")
            else:
                pick, err = self._least_damaging(graph, blocks, scan, ctx)
            if pick is None:
                break
            name = pick.name
            if not remove_block(graph, pick):
                stuck.add(name)
                continue
            removed.append(name)
            errors.append(err)
            done_now += 1
            log.info("prune-blocks: removed %s (output error %.4g)", name, err)
        if done_now:
            graph.scratch[PRUNED_BLOCKS] = {"macs0": macs0, "removed": removed}
        return PassResult(graph, done_now > 0, {"removed": done_now, "blocks": removed[-done_now:] if done_now else [],
                                                "output_error": errors[-1] if errors else 0.0,
                                                "macs": total_macs(graph) / macs0})

    def _reached(self, graph: Graph, macs0: int, n_removed: int) -> bool:
        from graphopt.analysis import total_macs

        if self.count is not None:
            return n_removed >= self.count
        return total_macs(graph) <= self.target_macs * macs0 + 1e-9

    def _least_damaging(self, graph: Graph, blocks: list[Block], scan, ctx: Context):
        from graphopt.analysis import total_macs

        best, best_cost, best_err = None, np.inf, np.nan
        macs = total_macs(graph)
        for block in ctx.progress(blocks, total=len(blocks), desc="prune-blocks"):
            trial = _removal_trial(graph, block.name, scan)
            if trial is None:
                continue
            err = float(np.sqrt(trial["rel_mse"]))  # the relative L2 error of the output
            # count: least error; target_macs: least error per MAC saved
            cost = err if self.target_macs is None else err / max(block.macs / max(macs, 1), 1e-12)
            if cost < best_cost:
                best, best_cost, best_err = block, cost, err
        return best, best_err


def _removal_trial(graph: Graph, add_name: str, scan) -> dict | None:
    """The scan trial of ``graph`` without the block whose Add is ``add_name`` (on a copy), or
    None if the block cannot be removed."""
    trial = graph.copy()
    block = next(b for b in residual_blocks(trial) if b.name == add_name)
    if not remove_block(trial, block):
        return None
    return scan.transform(trial)


def block_sensitivity(graph: Graph, data, labels: np.ndarray | None = None, progress: bool = False,
                      scan=None) -> list[dict]:
    """Remove each residual block alone and measure the damage on ``data`` (a
    ``graphopt.scan.Scan`` transform trial; ``scan``: one already built on ``data``): the
    output's relative L2 error against the intact graph, and top-1 accuracy if ``labels``. One
    row per block, in graph order, in the scan schema (unit = the block's Add, level = 1, cost =
    the share of the MACs its branch holds), with that share as ``macs_saved``."""
    from graphopt.analysis import total_macs
    from graphopt.scan import Scan, row

    scan = scan or Scan(graph, data, labels)
    macs0 = max(total_macs(graph), 1)
    blocks = residual_blocks(graph)
    it = blocks
    if progress:
        from tqdm import tqdm

        it = tqdm(blocks, desc="blocks", leave=False)
    rows = []
    for b in it:
        trial = _removal_trial(graph, b.name, scan)
        if trial is None:
            continue
        convs = [n for n in b.branch if n.op_type in ("Conv", "Gemm", "MatMul")]
        rows.append(row(b.name, 1, b.macs / macs0, trial, block=b.name,
                        layers=", ".join(n.source or n.name for n in convs), macs_saved=b.macs / macs0,
                        rel_error=float(np.sqrt(trial["rel_mse"])),
                        **({"top1": trial["top1"]} if "top1" in trial else {})))
    return rows
