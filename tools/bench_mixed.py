"""Mixed precision (choose-bits) against uniform 4-bit weights, at the same weight size, at the
size of uniform 3-bit, and under the BOPs of W4A8.

  python tools/bench_mixed.py --model effnet [--rows uniform4,mp-size4,...] [--redo]
  python tools/bench_mixed.py --model resnet20
  python tools/bench_mixed.py --model effnet --latency     # paired latency against the uniform4 row
  python tools/bench_mixed.py --table

* EfficientNet-Lite0: calibrate (and measure sensitivity) on the first 128 imagenet-sample
  images, top-1 on the other 372. ResNet-20: 256 CIFAR-10 training images, all 10,000 test images.
* Every row: canonicalize,fold-bn,equalize,absorb-bias, then quantize{weights=int4:channel,
  weight_method=gptq} with uint8 activations, then correct-bias: the zoo's best 4-bit uniform
  recipe. The reference row has the first and last layers at 8 bits and every other at 4
  (uniform3: at 3). The mixed rows put choose-bits{widths=2,3,4,6,8} in front of quantize; its
  sensitivity sweep uses 32 calibration images (one forward pass per layer and width), and its
  budget is the reference row's average bits per weight (``avg:``), or ``bops:w4a8``.
* Each row is its own resumable cell in tools/results/mixed.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import fp32_file, load_results, ort_session, ort_top1, ptq_data, save_results

RESULTS = Path(__file__).resolve().parent / "results" / "mixed.json"
CACHE = Path(tempfile.gettempdir()) / "graphopt-mixed"
PREFIX = "canonicalize,fold-bn,equalize,absorb-bias"
QUANT = "quantize{weights=int%d:channel,acts=uint8:tensor,weight_method=gptq%s},correct-bias"
CHOOSE = "choose-bits{budget=%s,widths=[2,3,4,6,8],max_samples=32}"
# row -> (what, budget or None, weight bits, quantize extras)
ROWS = {
    "uniform4": ("uniform 4-bit weights, first and last 8-bit (reference)", None, 4, ",first_last_bits=8"),
    "uniform3": ("uniform 3-bit weights, first and last 8-bit", None, 3, ",first_last_bits=8"),
    "mp-size4": ("mixed precision at the reference's weight size", "avg:{avg4}", 4, ""),
    "mp-size3": ("mixed precision at the size of uniform3", "avg:{avg3}", 4, ""),
    "mp-bops-w4a8": ("mixed precision under the BOPs of uniform W4A8", "bops:w4a8", 4, ""),
    "mp-size4-stored": ("mixed precision at the reference's file size (stored bits: 2-4 -> 4, 5-8 -> 8)",
                        "avg:{avg4s},size_bits=stored", 4, ""),
}


def avg_bits(model: str, first_last: int, middle: int) -> float:
    """Average bits per weight with the first and last layers at ``first_last`` bits."""
    from graphopt.passes.bits import quantizable_layers

    import graphopt
    from graphopt.geometry import weight
    from graphopt.passmanager import Context, PassManager

    g = PassManager(PREFIX).run(graphopt.load_onnx(str(fp32_file(model))), Context()).graph
    layers = quantizable_layers(g)
    p = np.array([weight(g, n).size for n in layers], np.float64)
    b = np.full(len(layers), float(middle))
    b[0] = b[-1] = first_last
    return float((p * b).sum() / p.sum())


def run(model: str, row: str) -> dict:

    import graphopt
    from graphopt.backends.lowering import export_file, ort_kernel_report
    from graphopt.passmanager import Context, PassManager

    what, budget, wbits, extra = ROWS[row]
    calib, ycal, xt, yt = ptq_data(model)
    pipe = PREFIX
    if budget:
        budget = budget.format(avg4=round(avg_bits(model, 8, 4), 4), avg3=round(avg_bits(model, 8, 3), 4),
                               avg4s=round(avg_bits(model, 8, 4), 4))
        pipe += "," + CHOOSE % budget
    pipe += "," + QUANT % (wbits, extra)
    out = CACHE / model / f"{row}.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    r = PassManager(pipe).run(graphopt.load_onnx(str(fp32_file(model))), Context(calib=calib))
    export_file(r.graph, out, "qdq")
    secs = time.perf_counter() - t
    q = r.graph
    fqs = [n for n in q.nodes if n.op_type == "FakeQuant" and n.attr("kind") == "weight"]
    sizes = np.array([q.const_value(n.inputs[0]).size for n in fqs], np.float64)
    bits = np.array([int(n.attr("bits")) for n in fqs], np.float64)
    st = r.stats.get("choose-bits", [{}])[0]
    kr = ort_kernel_report(str(out))
    hist = {int(b): int((bits == b).sum()) for b in np.unique(bits)}
    return {"pipeline": pipe, "test": ort_top1(out, xt, yt), "calib": ort_top1(out, calib, ycal),
            "mb": round(out.stat().st_size / 1e6, 3), "convert_s": round(secs, 1),
            "avg_bits": round(float((sizes * bits).sum() / sizes.sum()), 4), "budget": budget, "layers_at": {str(k): v for k, v in sorted(hist.items())},
            "float_layers": len(kr["float"]), "integer_layers": int(sum(kr["integer"].values())),
            "chosen": st.get("table"), "sensitivity": st.get("sensitivity"), "row": what}


def latency(model: str, rounds: int) -> None:
    from common import paired_latency_ratios

    res = load_results(RESULTS)
    ref = CACHE / model / "uniform4.onnx"
    x = ptq_data(model)[2][:1]
    s_ref = ort_session(ref)
    feed = {s_ref.get_inputs()[0].name: x}
    for row in ROWS:
        path = CACHE / model / f"{row}.onnx"
        key = f"{model}/{row}"
        if key not in res or not path.exists():
            continue
        r = paired_latency_ratios(s_ref, ort_session(path), feed, feed, rounds)
        res[key]["latency_vs_uniform4"] = round(float(np.median(r)), 3)
        print(f"{key:28s} latency / uniform4 {res[key]['latency_vs_uniform4']:.3f}")
    save_results(RESULTS, res)


def plot(model: str, path: Path) -> None:
    """The predicted front from a mixed row's sensitivity sweep, each mixed row's allocation,
    and every row's measured top-1."""
    from graphopt.passes.bits import layer_costs, plot_front

    res = load_results(RESULTS)
    src = next((res[f"{model}/{k}"] for k in ROWS if res.get(f"{model}/{k}", {}).get("sensitivity")), None)
    if src is None:
        raise SystemExit(f"no {model} row with a stored sensitivity sweep yet")
    sens = src["sensitivity"]
    widths = sens["widths"]
    p = np.array([r["params"] for r in sens["layers"]], np.float64)
    errors = np.maximum(np.array([r["error"] for r in sens["layers"]], np.float64), 0.0)
    costs = layer_costs("avg", p, p, widths, 8)
    marks, measured = {}, {}
    for k in ROWS:
        r = res.get(f"{model}/{k}")
        if not r:
            continue
        measured[f"{k} {r['test']:.1f}"] = (r["avg_bits"], r["test"])
        if r.get("chosen") and k != "mp-bops-w4a8":
            by_layer = {c["layer"]: c["bits"] for c in r["chosen"]}
            marks[k] = [widths.index(by_layer[x["layer"]]) for x in sens["layers"]]
    plot_front(path, costs, errors, widths, p, "avg", "output rel. MSE", marks, measured)
    print(f"wrote {path}")


def table() -> None:
    res = load_results(RESULTS)
    for model, title in (("effnet", "EfficientNet-Lite0 (372 test images, FP32 78.23)"),
                         ("resnet20", "ResNet-20 CIFAR-10 (10,000 test images, FP32 87.79)")):
        rows = [(k, res.get(f"{model}/{k}")) for k in ROWS]
        if not any(r for _, r in rows):
            continue
        print(f"\n**{title}**\n")
        print("| row | what | avg bits | top-1 test (calib) | MB | float layers | latency / uniform4 | convert s |")
        print("|---|---|---|---|---|---|---|---|")
        for k, r in rows:
            if r:
                avg = f"{r['avg_bits']:.2f}"
                lat = r.get("latency_vs_uniform4", "-")
                print(f"| {k} | {ROWS[k][0]} | {avg} | {r['test']:.1f} ({r['calib']:.1f}) | {r['mb']:.2f} | "
                      f"{r['float_layers']} | {lat} | {r['convert_s']} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("effnet", "resnet20"), default="effnet")
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated rows")
    ap.add_argument("--redo", action="store_true", help="measure rows already in the results again")
    ap.add_argument("--latency", action="store_true")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--plot", metavar="FILE.png", help="draw the Pareto front with every row on it")
    args = ap.parse_args()
    if args.plot:
        plot(args.model, Path(args.plot))
        return 0
    if args.table:
        table()
        return 0
    if args.latency:
        latency(args.model, args.rounds)
        return 0
    rows = [r for r in args.rows.split(",") if r]
    bad = [r for r in rows if r not in ROWS]
    if bad:
        ap.error(f"unknown rows {bad}; rows are {', '.join(ROWS)}")
    res = load_results(RESULTS)
    for row in rows:
        key = f"{args.model}/{row}"
        if key in res and not args.redo:
            continue
        res[key] = run(args.model, row)
        save_results(RESULTS, res)
        r = res[key]
        print(f"{key:28s} test {r['test']:6.2f} calib {r['calib']:6.2f} {r['mb']:6.2f} MB avg bits {r['avg_bits']} "
              f"layers at {r['layers_at']} float layers {r['float_layers']} ({r['convert_s']} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
