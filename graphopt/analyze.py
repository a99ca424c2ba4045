"""The four ``graphopt analyze`` reports, over the scan owner (``graphopt.scan``) and the
allocator: each takes a graph, its data and plain options, prints one table (``text_table``),
and draws the scan's plot. The CLI only turns flags into these arguments.

* ``channels``: each prunable channel group pruned alone at each ratio (prune-channels'
  sensitivity);
* ``blocks``: each residual block removed alone (prune-blocks' block scan);
* ``bits``: each layer's weights quantized alone at each width, and the allocation under a budget
  (choose-bits' sweep);
* ``sparsity``: each layer pruned alone by magnitude at each level, and the per-layer choice for a
  target (``prune-weights{scope=sensitivity}``'s scan);
* ``columns``: each layer's filter matrix packed by column combining (``graphopt.columns``):
  tiles, utilization and cycles on an N x N systolic array, dense, sparse and packed; it needs no
  data, and writes the packed file.
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


def columns(graph, *, array: int = 64, alpha: int = 8, gamma: float = 0.5, window: int = 256,
            plans: str | None = None, out: str | None = None, onnx_out: str | None = None,
            plot: str | None = None, layer: str | None = None, source: str | None = None) -> dict:
    """Pack every layer by column combining and report it on an ``array`` x ``array`` array.
    ``plans``: a packed file to take the groups from (it must match the model); otherwise
    ``column-combine{alpha, gamma, window}`` groups the model's own sparsity (pruning the conflicts
    it cannot pack: their count is reported, and the packed file then stands for the combined
    weights, which ``onnx_out`` writes). Returns the totals."""
    from graphopt import columns as C
    from graphopt.backends import systolic
    from graphopt.meta import COLUMN_PLANS

    if int(array) != array or array < 1:
        raise GraphOptError(f"--array must be a positive array size, not {array}")
    C.check_options(alpha, gamma, window)
    graph = PassManager("canonicalize").run(graph).graph
    if plans:
        layers = systolic.load_packed(plans)
        weights = {v.name: v.const for v in graph.values.values() if v.const is not None}
        systolic.check_packed(layers, weights, source or "the model")
        graph.scratch[COLUMN_PLANS] = {L.weight: C.Plan(_groups_of(L.packed), alpha, gamma, window) for L in layers}
        pruned, dense = 0, {}
    else:
        r = PassManager(f"column-combine{{alpha={alpha},gamma={gamma},window={window}}}").run(graph)
        graph, st = r.graph, r.stats["column-combine"][0]
        pruned, dense = st.get("conflicts_pruned", 0), st.get("dense", {})
    cplans = graph.scratch.get(COLUMN_PLANS) or {}
    sizes = tuple(sorted({int(array), *C.ARRAY_SIZES}))
    reports = [C.layer_report(n, np.asarray(n.inputs[1].const), cplans.get(n.inputs[1].name), sizes)
               for n in pass_library().sparsity.prunable_layers(graph)]
    n = int(array)
    rows = []
    for rep in reports:
        a = rep["arrays"][n]
        pk = a.get("packed") or a["sparse"]
        rows.append([rep["layer"], f"{rep['rows']}x{rep['columns']}",
                     f"{100 * (1 - rep['nonzeros'] / max(rep['rows'] * rep['columns'], 1)):.0f}%",
                     str(rep["groups"] if rep["groups"] is not None else "-"),
                     str(a["dense"]["tiles"]), str(a["sparse"]["tiles"]), str(pk["tiles"]),
                     f"{100 * pk['utilization']:.0f}%", human(a["dense"]["cycles"]), human(pk["cycles"])])
    print(f"column combining on a {n}x{n} weight-stationary array (alpha {alpha}, gamma {gamma}):")
    print(text_table(["layer", "filter matrix", "zeros", "groups", "tiles dense", "sparse", "packed", "util.",
                      "cycles dense", "packed"], rows, 36))
    tot = {m: C.totals(reports, m) for m in sizes}
    for m in sizes:
        t = tot[m]
        print(f"N={m}: tiles {t['dense']['tiles']} dense, {t['sparse']['tiles']} sparse, {t['packed']['tiles']} packed "
              f"({t['packed']['tiles'] / max(t['dense']['tiles'], 1):.3f}x dense); utilization "
              f"{100 * t['dense']['utilization']:.1f}% dense, {100 * t['sparse']['utilization']:.1f}% sparse, "
              f"{100 * t['packed']['utilization']:.1f}% packed; mapping efficiency {100 * t['dense']['mapping']:.0f}% / "
              f"{100 * t['sparse']['mapping']:.0f}% / {100 * t['packed']['mapping']:.0f}%; cycles "
              f"{human(t['dense']['cycles'])} / {human(t['sparse']['cycles'])} / {human(t['packed']['cycles'])} "
              f"({t['packed']['cycles'] / max(t['dense']['cycles'], 1):.3f}x dense)")
    if not cplans:
        print("the model has no sparsity: nothing to combine (prune it first, e.g. column-combine{sparsity=0.8} or "
              "prune-weights)")
    for k, why in dense.items():
        print(f"left dense: {k}: {why}")
    if pruned:
        print(f"combining pruned {pruned} conflicting weights: the packed file stands for the combined weights"
              + ("" if onnx_out else " (write them with --onnx-out)"))
    if out:
        packed = systolic.packed_layers(graph)
        systolic.save_packed(out, packed, model=source)
        print(f"wrote {out} ({len(packed)} packed layers)")
    if onnx_out:
        from graphopt.backends.lowering import export_file

        export_file(graph, onnx_out)
        print(f"wrote {onnx_out}")
    if plot:
        plot_packing(plot, graph, layer)
        print(f"wrote {plot}")
    return tot


def _groups_of(packed) -> np.ndarray:
    """The plan's column -> group array of a packed layer (members read back)."""
    g = np.full(packed.columns, -1, np.int64)
    gi, _ = np.nonzero(packed.members >= 0)
    g[packed.members[packed.members >= 0]] = gi
    return g


def plot_packing(path, graph, layer: str | None = None) -> None:
    """PNG of one layer's filter matrix before and after column combining, as in the paper's
    figures: the sparse matrix's nonzeros, and the packed matrix with each cell coloured by which
    member of its group it multiplies. ``layer``: a name or source (default: the layer whose
    packing saves the most columns)."""
    from graphopt import columns as C
    from graphopt.geometry import geometry
    from graphopt.meta import COLUMN_PLANS
    from graphopt.plotting import pyplot, save_png

    plans = graph.scratch.get(COLUMN_PLANS) or {}
    nodes = [n for n in graph.nodes if len(n.inputs) > 1 and n.inputs[1] is not None and n.inputs[1].name in plans]
    if not nodes:
        raise GraphOptError("no column-combined layer to plot")
    if layer:
        nodes = [n for n in nodes if layer in (n.name, n.source)]
        if not nodes:
            raise GraphOptError(f"--layer '{layer}' is not a column-combined layer of the model")
        node = nodes[0]
    else:
        node = max(nodes, key=lambda n: plans[n.inputs[1].name].group.size - plans[n.inputs[1].name].n_groups)
    plt = pyplot("--plot")
    f = geometry(node).filter_matrix(np.asarray(node.inputs[1].const))
    plan = plans[node.inputs[1].name]
    pk = C.pack(f, plan)
    fig, (a0, a1) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 1.4]})
    a0.imshow(f != 0, cmap="Greys", aspect="auto", interpolation="nearest")
    a0.set_title(f"{node.source}: filter matrix {f.shape[0]}x{f.shape[1]}, {np.count_nonzero(f)} nonzeros", fontsize=9)
    a0.set_xlabel("column (input channel x kernel position)")
    a0.set_ylabel("row (filter)")
    sel = np.where(pk.values != 0, pk.select.astype(float), np.nan)
    im = a1.imshow(sel, cmap="viridis", aspect="auto", interpolation="nearest")
    a1.set_title(f"packed: {int((f != 0).any(0).sum())} columns -> {pk.groups} groups\n"
                 f"(alpha {plan.alpha}, gamma {plan.gamma}; colour: multiplexer select)", fontsize=9)
    a1.set_xlabel("group (one array row)")
    fig.colorbar(im, ax=a1, fraction=0.08)
    fig.tight_layout()
    save_png(fig, path, dpi=110)
