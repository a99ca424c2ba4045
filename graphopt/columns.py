"""Column combining: pack a sparse filter matrix into fewer, denser columns for a weight-stationary
systolic array (Kung, McDanel & Zhang, "Packing Sparse Convolutional Neural Networks for
Efficient Systolic Array Implementations: Column Combining Under Joint Optimization", ASPLOS 2019).

The one owner of the idea: the ``column-combine`` pass, the joint-optimization schedule in
``finetune``, the systolic back end, ``graphopt analyze columns`` and the packed file all call it.

**Layout.** A layer's filter matrix F is ``Geometry.filter_matrix``: [B, C*K], row b is filter b,
column ``c*K + k`` is input channel c at kernel position k (im2col order; K = 1 for Gemm/MatMul;
a grouped conv's matrix is block diagonal). On the array the columns of F run along the array's
rows (one input stream each) and the filters along its columns, as SCALE-Sim maps a
weight-stationary GEMM.

**Combining.** Columns are put into groups of at most ``alpha``; within a group each row keeps at
most one nonzero (the largest |w|; the others are the pruned *conflicts*). A group becomes one
physical array row whose cells each hold one weight and a multiplexer select naming which of the
group's input channels it multiplies. Grouping is greedy, as the authors' code does it: start with
every nonzero column alone; two groups may merge while the merged group has at most ``alpha``
columns and prunes at most floor(gamma * B) weights in total; among the allowed merges take the
pair with the fewest rows where both are empty (the densest result; ties: the lowest indices);
repeat until no merge is allowed. Columns are grouped within windows of ``window`` consecutive
columns (256, as the authors do), which bounds the cost.

The pairwise numbers come from one matrix product: with D the per-group row counts and
Z = [D == 0], the weights a merge of groups i and j prunes are
S_i + S_j - B + E_ij (S: a group's nonzeros, E = Z Z^T: rows where both are empty), so each merge
costs one vector-matrix product to update E. No per-weight Python loop.

**What packs.** Conv (any group count: a grouped or depthwise conv's off-block zeros pack like any
other zeros, since two groups' columns never share a row), Gemm and MatMul with a constant weight.
A ConvTranspose does not (no filter matrix); it stays dense, with that reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from graphopt.errors import GraphOptError

ARRAY_SIZES = (32, 64, 128)  # the array sizes every report gives


def check_options(alpha: int, gamma: float, window: int = 256) -> None:
    if int(alpha) != alpha or alpha < 1:
        raise GraphOptError(f"column combining needs alpha >= 1 (columns per group), not {alpha}")
    if not np.isfinite(gamma) or gamma < 0:
        raise GraphOptError(f"column combining needs gamma >= 0 (conflicts pruned per row), not {gamma}")
    if int(window) != window or window < 1:
        raise GraphOptError(f"column combining needs window >= 1 (columns grouped together), not {window}")


@dataclass(frozen=True, eq=False)
class Plan:
    """How one filter matrix packs: ``group[c]`` is the packed column (group) that filter-matrix
    column c joins, -1 for a column that holds no weight (it takes no array row)."""

    group: np.ndarray  # int64 [C]
    alpha: int
    gamma: float
    window: int = 256

    def __eq__(self, other) -> bool:
        return (isinstance(other, Plan) and (self.alpha, self.gamma, self.window) ==
                (other.alpha, other.gamma, other.window) and np.array_equal(self.group, other.group))

    __hash__ = None  # type: ignore[assignment]

    @property
    def n_groups(self) -> int:
        return int(self.group.max()) + 1 if self.group.size and self.group.max() >= 0 else 0

    def members(self) -> np.ndarray:
        """[G, a] int64: each group's columns, ascending, padded with -1 (a: the largest group)."""
        return self._members

    @cached_property
    def _members(self) -> np.ndarray:  # computed once per plan: select, keep and pack all read it
        g = self.group
        cols = np.flatnonzero(g >= 0)
        if not cols.size:
            return np.zeros((0, 1), np.int64)
        order = cols[np.argsort(g[cols], kind="stable")]
        counts = np.bincount(g[cols], minlength=self.n_groups)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        pos = np.arange(order.size) - np.repeat(starts, counts)
        out = np.full((self.n_groups, int(counts.max())), -1, np.int64)
        out[g[order], pos] = order
        return out

    def select(self, f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(sel [B, G], value [B, G]): per row and group, the member with the largest |w| (the one
        the cell keeps; its index within the group) and that weight (0: the cell is empty)."""
        mem = self.members()
        f = np.asarray(f)
        a = np.abs(f[:, np.maximum(mem, 0)])  # [B, G, a]
        a = np.where(mem[None] >= 0, a, -1.0)
        sel = a.argmax(2)
        cols = mem[np.arange(mem.shape[0])[None, :], sel]  # [B, G]
        val = np.take_along_axis(f, np.maximum(cols, 0), 1)
        return sel, np.where(cols >= 0, val, 0).astype(f.dtype)

    def keep(self, f: np.ndarray) -> np.ndarray:
        """[B, C] bool: the weights the packing keeps (one per row and group, the largest)."""
        sel, val = self.select(f)
        mem = self.members()
        keep = np.zeros(np.shape(f), bool)
        r, g = np.nonzero(val != 0)
        keep[r, mem[g, sel[r, g]]] = True
        return keep

    def conflicts(self, f: np.ndarray) -> int:
        """How many nonzeros of ``f`` the packing must drop (two or more in a row of one group,
        or in a column outside every group)."""
        return int(np.count_nonzero(f)) - int(self.keep(f).sum())


def _greedy(nz: np.ndarray, alpha: int, limit: int) -> np.ndarray:
    """Group labels (a root column index per column) for one window of nonzero columns ``nz``
    [B, C]: the greedy merge described in the module notes."""
    b, c = nz.shape
    d = nz.T.astype(np.int32)  # [C, B] per-group row counts
    z = (d == 0).astype(np.float32)
    e = z @ z.T  # rows where both groups are empty
    s = d.sum(1).astype(np.int64)
    size = np.ones(c, np.int64)
    alive = np.ones(c, bool)
    root = np.arange(c)
    if alpha < 2 or c < 2:
        return root
    upper = np.triu(np.ones((c, c), bool), 1)
    while True:
        over = s[:, None] + s[None, :] - b + e
        ok = upper & (over <= limit) & (size[:, None] + size[None, :] <= alpha) & alive[:, None] & alive[None, :]
        if not ok.any():
            return root
        i, j = np.unravel_index(np.argmin(np.where(ok, e, np.inf)), e.shape)
        d[i] += d[j]
        s[i] += s[j]
        size[i] += size[j]
        alive[j] = False
        root[root == j] = i
        z[i] = d[i] == 0
        e[i] = z @ z[i]
        e[:, i] = e[i]


def group_columns(nonzero: np.ndarray, alpha: int, gamma: float, window: int = 256) -> Plan:
    """The plan for a filter matrix's nonzero pattern [B, C] (see the module notes)."""
    check_options(alpha, gamma, window)
    nz = np.asarray(nonzero, bool)
    b, c = nz.shape
    limit = int(np.floor(gamma * b))
    group = np.full(c, -1, np.int64)
    used = nz.any(0)
    next_id = 0
    for start in range(0, c, window):
        cols = np.arange(start, min(c, start + window))
        cols = cols[used[cols]]
        if not cols.size:
            continue
        root = _greedy(nz[:, cols], int(alpha), limit)
        _, label = np.unique(root, return_inverse=True)  # groups numbered by their first column
        group[cols] = next_id + label
        next_id += int(label.max()) + 1
    return Plan(group, int(alpha), float(gamma), int(window))


def combine(f: np.ndarray, alpha: int, gamma: float, window: int = 256) -> tuple[np.ndarray, Plan]:
    """(keep [B, C], plan): group the columns of filter matrix ``f`` and keep, in every row of
    every group, only its largest |w|."""
    plan = group_columns(np.asarray(f) != 0, alpha, gamma, window)
    return plan.keep(f), plan


# ------------------------------------------------------------------ packed form
@dataclass(frozen=True, eq=False)
class Packed:
    """A packed filter matrix: ``values`` [B, G] (the weight each cell holds, 0 for an empty
    cell), ``select`` [B, G] (which member of its group the cell multiplies), ``members`` [G, a]
    (each group's filter-matrix columns, -1 padded) and ``columns`` (C, the unpacked width)."""

    values: np.ndarray
    select: np.ndarray
    members: np.ndarray
    columns: int

    @property
    def rows(self) -> int:
        return int(self.values.shape[0])

    @property
    def groups(self) -> int:
        return int(self.values.shape[1])

    def inputs(self) -> np.ndarray:
        """[B, G] the filter-matrix column each cell reads (-1 where the cell is empty)."""
        cols = self.members[np.arange(self.groups)[None, :], self.select.astype(np.int64)]
        return np.where(self.values != 0, cols, -1)

    def unpack(self) -> np.ndarray:
        """The sparse filter matrix [B, C], bit for bit."""
        f = np.zeros((self.rows, self.columns), self.values.dtype)
        src = self.inputs()
        r, g = np.nonzero(src >= 0)
        f[r, src[r, g]] = self.values[r, g]
        return f


def pack(f: np.ndarray, plan: Plan) -> Packed:
    """Pack filter matrix ``f`` by ``plan``. ``f`` must already be conflict free under the plan
    (``plan.keep(f)`` keeps every nonzero): a packing never silently drops a weight."""
    f = np.asarray(f)
    sel, val = plan.select(f)
    lost = int(np.count_nonzero(f)) - int(np.count_nonzero(val))  # plan.conflicts(f), from this one selection
    if lost:
        raise GraphOptError(f"the filter matrix does not fit its column plan: {lost} nonzeros conflict "
                            "(apply the plan's keep mask first)")
    a = plan.members().shape[1]
    return Packed(val, sel.astype(np.uint8 if a <= 256 else np.int32), plan.members().astype(np.int32),
                  int(f.shape[1]))


# ------------------------------------------------------------------ array cost
def tiles(rows: int, cols: int, n: int) -> int:
    """N x N tiles a [rows, cols] matrix needs (cols along the array's rows, rows along its columns)."""
    return -(-int(rows) // n) * -(-int(cols) // n) if rows and cols else 0


def ws_cycles(rows: int, cols: int, positions: int, n: int) -> int:
    """Cycles of a weight-stationary N x N array for a [rows, cols] weight matrix applied to
    ``positions`` input vectors: per tile, N cycles to shift the weights in, N - 1 cycles of input
    skew, one cycle per input vector and N - 1 cycles to drain the last partial sums
    (``positions + 3N - 2``), tiles one after another with no overlap (SCALE-Sim's count
    without prefetch; compared in tools/bench_columns.py)."""
    return tiles(rows, cols, n) * (int(positions) + 3 * n - 2)


def layout_report(f: np.ndarray, plan: Plan | None, n: int, positions: int) -> dict:
    """Tiles, utilization, mapping efficiency and cycles of one filter matrix on an N x N array,
    as laid out dense, sparse without combining (all-zero rows and columns dropped) and packed by
    ``plan`` (None: no plan). Utilization = nonzeros / (tiles N^2); mapping efficiency = the
    share of the tiles' cells a matrix of that size occupies, zeros included."""
    f = np.asarray(f)
    nz = f != 0
    nnz = int(nz.sum())
    b, c = f.shape
    rows_used = int(nz.any(1).sum())
    shapes = {"dense": (b, c), "sparse": (rows_used, int(nz.any(0).sum()))}
    if plan is not None:
        shapes["packed"] = (rows_used, plan.n_groups)
    out = {}
    for k, (r, cc) in shapes.items():
        t = tiles(r, cc, n)
        out[k] = {"rows": r, "cols": cc, "tiles": t,
                  "utilization": nnz / (t * n * n) if t else 0.0,
                  "mapping": r * cc / (t * n * n) if t else 0.0,
                  "cycles": ws_cycles(r, cc, positions, n)}
    return out


# ------------------------------------------------------------------ layers of a graph
def packable(node) -> str | None:
    """None if column combining can pack this layer, else why not (one line)."""
    if node.op_type == "ConvTranspose":
        return "a ConvTranspose scatters its outputs: its weight is not one GEMM over im2col columns"
    return None


def pointwise(node, weight_shape) -> bool:
    """A 1x1 conv of one group, or a Gemm/MatMul: the layers ``column-combine{only=pointwise}`` packs."""
    return node.op_type != "Conv" or (int(node.attr("group", 1)) == 1 and int(np.prod(weight_shape[2:])) == 1)


def positions(node) -> int:
    """Input vectors the layer's GEMM streams per sample: output pixels of a Conv, 1 for a Gemm,
    the rows of a MatMul's input (1 where the shape is unknown)."""
    from graphopt.analysis import _per_sample

    out = _per_sample(node.outputs[0].shape)  # [batch, ...] with a symbolic batch read as 1
    if out is None or len(out) < 2:
        return 1
    if node.op_type == "Conv":
        return int(np.prod(out[2:], dtype=np.int64))  # output pixels
    return int(np.prod(out[1:-1], dtype=np.int64))  # rows of a MatMul's input (1 for a Gemm)


def combine_weight(node, w: np.ndarray, alpha: int, gamma: float, window: int = 256,
                   old: Plan | None = None) -> tuple[np.ndarray, Plan]:
    """(keep, plan) for one layer's weight ``w``: ``keep`` has the weight's shape. A previous
    ``old`` plan with the same options that still fits (no conflicts) is kept as it is, so the
    pass is idempotent and training under a plan keeps it."""
    from graphopt.geometry import geometry

    geo = geometry(node)
    f = geo.filter_matrix(np.asarray(w))
    if (old is not None and (old.alpha, old.gamma, old.window) == (alpha, gamma, window)
            and old.group.size == f.shape[1] and old.conflicts(f) == 0):
        plan = old
    else:
        plan = group_columns(f != 0, alpha, gamma, window)
    return geo.from_filter_matrix(plan.keep(f), np.shape(w)), plan


def layer_report(node, w: np.ndarray, plan: Plan | None, sizes=ARRAY_SIZES) -> dict:
    """One layer's row for the reports: shape, sparsity and ``layout_report`` at every array size."""
    from graphopt.geometry import geometry

    f = geometry(node).filter_matrix(np.asarray(w))
    p = positions(node)
    return {"layer": node.source, "op": node.op_type, "rows": int(f.shape[0]), "columns": int(f.shape[1]),
            "nonzeros": int(np.count_nonzero(f)), "weights": int(np.size(w)),
            "groups": plan.n_groups if plan is not None else None, "positions": p,
            "arrays": {n: layout_report(f, plan, n, p) for n in sizes}}


def totals(reports: list[dict], n: int) -> dict:
    """Tiles, cycles, utilization and mapping efficiency summed over ``reports`` at array size n,
    per layout, with ``packed`` falling back to ``sparse`` for layers without a plan."""
    out = {}
    for kind in ("dense", "sparse", "packed"):
        rows = [r["arrays"][n].get(kind) or r["arrays"][n]["sparse"] for r in reports]
        t = sum(x["tiles"] for x in rows)
        nnz = sum(r["nonzeros"] for r in reports)
        occ = sum(x["rows"] * x["cols"] for x in rows)
        out[kind] = {"tiles": t, "cycles": sum(x["cycles"] for x in rows),
                     "utilization": nnz / (t * n * n) if t else 0.0, "mapping": occ / (t * n * n) if t else 0.0}
    return out
