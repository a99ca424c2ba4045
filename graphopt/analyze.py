"""The four ``graphopt analyze`` reports, over the scan owner (``graphopt.scan``) and the
allocator: each takes a graph, its data and plain options, prints one table (``text_table``),
and draws the scan's plot. The CLI only turns flags into these arguments.

* ``channels``: each prunable channel group pruned alone at each ratio (prune-channels'
  sensitivity);
* ``blocks``: each residual block removed alone (prune-blocks' block scan);
* ``bits``: each layer's weights quantized alone at each width, and the allocation under a budget
  (choose-bits' sweep);
* ``sparsity``: each layer pruned alone by magnitude at each level, and the per-layer choice for a
  target (``prune-weights{scope=sensitivity}``'s scan).
"""

from __future__ import annotations

import numpy as np

from graphopt.analysis import human
from graphopt.errors import GraphOptError
from graphopt.passmanager import Context, PassManager, pass_library


def text_table(header: list[str], rows: list[list[str]], name_width: int = 48, note: str = "") -> str:
    """A plain-text table: the first column left-aligned and cut at ``name_width`` characters
    (an ellipsis marks the cut), the others right-aligned to their widest cell; ``note`` follows
    the header line."""
    cut = [(r[0] if len(r[0]) <= name_width else r[0][: name_width - 1] + "…") for r in rows]
    w0 = max([len(header[0])] + [len(c) for c in cut])
    ws = [max([len(header[i])] + [len(r[i]) for r in rows]) for i in range(1, len(header))]
    lines = [f"{header[0]:<{w0}} " + " ".join(f"{h:>{w}}" for h, w in zip(header[1:], ws)) + (f"   ({note})" if note else "")]
    lines += [f"{c:<{w0}} " + " ".join(f"{v:>{w}}" for v, w in zip(r[1:], ws)) for c, r in zip(cut, rows)]
    return "\n".join(lines)


def _prepared(graph, data, prepare: str | None):
    return PassManager(prepare).run(graph, Context(calib=data)).graph if prepare else graph


def channels(graph, data, labels, *, ratios, criterion: str = "l1", round_to: int = 1, plot: str | None = None) -> None:
    if not ratios or any(not 0 < r < 1 for r in ratios):
        raise GraphOptError("--ratios must lie in (0, 1)")
    rows = pass_library().prune.sensitivity(graph, data, ratios, labels, criterion, round_to,
                                            progress=Context().show_progress)
    if not rows:
        raise GraphOptError("the model has no prunable channel group")
    metric = "top1" if labels is not None else "rel_error"
    table = []
    for g in dict.fromkeys(r["group"] for r in rows):
        rs = {r["ratio"]: r for r in rows if r["group"] == g}
        first = next(iter(rs.values()))
        table.append([first["layers"], str(first["channels"])] + [f"{rs[r][metric]:.4g}" if r in rs else "-"
                                                                  for r in ratios]
                     + [f"{100 * rs[max(rs)]['macs_saved']:.1f}%"])
    print(text_table(["group (layers)", "ch", *[f"r={r}" for r in ratios], "MACs saved"], table, 56,
                     f"{'top-1 %' if labels is not None else 'output rel. error'} with each group pruned alone; MACs "
                     "saved at the largest ratio"))
    if plot:
        from graphopt.scan import plot_units

        plot_units(plot, [{**r, "unit": r["layers"]} for r in rows], y=metric, xlabel="pruning ratio of the group",
                   ylabel="top-1 %" if labels is not None else "output relative error",
                   title="sensitivity per channel group")
        print(f"wrote {plot}")


def blocks(graph, data, labels) -> None:
    from graphopt.scan import Scan

    scan = Scan(graph, data, labels)
    rows = pass_library().depth.block_sensitivity(graph, data, labels, progress=Context().show_progress, scan=scan)
    if not rows:
        raise GraphOptError("the model has no removable residual block (an Add of two paths from one tensor)")
    metric = "top1" if labels is not None else "rel_error"
    if labels is not None:
        print(f"intact model: top-1 {scan.ref_top1:.2f} %")
    print(text_table(["block (Add)", "branch layers", "MACs", "top-1 %" if labels is not None else "rel. error"],
                     [[r["block"], r["layers"][:48], f"{100 * r['macs_saved']:.1f}%", f"{r[metric]:.4g}"]
                      for r in rows], note="each block removed alone"))


def bits(graph, data, labels, *, scheme: str, widths, budget: str | None = None, act_bits: int = 8,
         method: str = "sweep", prepare: str | None = None, plot: str | None = None) -> None:
    from graphopt.quantizers import parse

    bits_mod = pass_library().bits
    widths = sorted(set(widths))
    for w in widths:
        parse(scheme, "weights").at_bits(w)
    bud = bits_mod.Budget.parse(budget) if budget else None
    graph = _prepared(graph, data, prepare)
    limit = bits_mod.budget_limit(graph, bud, widths, act_bits)[0] if bud else None
    rows = bits_mod.bit_sensitivity(graph, data, widths, weights=scheme, method=method, labels=labels,
                                    progress=Context().show_progress)
    p = np.array([r["params"] for r in rows], np.float64)
    m = np.array([r["macs"] for r in rows], np.float64)
    kind = bud.kind if bud else "size"
    costs, errors, plan = bits_mod.plan_bits([r["error"] for r in rows], kind, p, m, widths, act_bits, limit)
    chosen, cost, err = plan if plan is not None else (None, None, None)
    metric = "top-1 drop (points)" if labels is not None else "output rel. MSE"
    table = []
    for i, r in enumerate(rows):
        cells = [r["layer"], human(r["params"]), human(r["macs"])] + [f"{e:.3g}" for e in r["error"]]
        if chosen is not None:
            k = int(chosen[i])
            cells += [str(widths[k]), f"{100 * costs[i, k] / cost:.1f}%"]
        table.append(cells)
    print(f"sensitivity ({method}; {metric}, each layer alone):")
    print(text_table(["layer", "params", "MACs", *[f"w{b}" for b in widths]]
                     + (["chosen", "share"] if chosen is not None else []), table, 40))
    if chosen is not None:
        avg = float((p * np.array([widths[int(k)] for k in chosen])).sum() / p.sum())
        print(f"budget {bud.text}: {avg:.2f} bits per weight on average, "
              f"{avg / 32:.4f} x FP32 weight size, predicted error {err:.4g}")
    if plot:
        bits_mod.plot_front(plot, costs, errors, widths, p, kind, metric,
                            {} if chosen is None else {f"chosen ({bud.text})": chosen})
        print(f"wrote {plot}")


def sparsity(graph, data, labels, *, levels, sparsity: float | None = None, target: str = "params",
             skip=(), max_samples: int | None = None, prepare: str | None = None, plot: str | None = None) -> None:
    sp = pass_library().sparsity
    if sparsity is not None:
        sp.check_sparsity(sparsity, "--sparsity")
    graph = _prepared(graph, data, prepare)
    layers = sp.prunable_layers(graph, list(skip))
    if not layers:
        raise GraphOptError("the model has no Conv/Gemm/MatMul layer with constant weights to prune")
    _, scan = sp.sensitivity_masks(graph, layers, data, sparsity, "macs" if target == "macs" else "params",
                                   levels, max_samples, labels=labels, progress=Context().show_progress)
    metric = "top-1 drop (points)" if labels is not None else "output rel. MSE"
    lv = scan[0]["levels"][1:]
    table = [[r["layer"], human(r["params"])] + [f"{e:.3g}" for e in r["error"][1:]]
             + ([f"{100 * r['chosen']:.0f}%"] if r["chosen"] is not None else []) for r in scan]
    print(f"sparsity sensitivity ({metric}; each layer pruned alone by magnitude):")
    print(text_table(["layer", "params", *[f"{100 * v:.0f}%" for v in lv]]
                     + (["chosen"] if sparsity is not None else []), table, 40))
    if sparsity is not None:
        p = np.array([r["params"] for r in scan], np.float64)
        ch = np.array([r["chosen"] for r in scan])
        print(f"--sparsity {sparsity} ({target}): {100 * float((p * ch).sum() / p.sum()):.1f}% of the "
              f"weights pruned; predicted error {sum(r['error'][r['levels'].index(r['chosen'])] for r in scan):.4g}")
    if plot:
        sp.plot_scan(plot, scan, metric)
        print(f"wrote {plot}")
