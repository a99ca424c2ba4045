"""The quantizer zoo side by side: top-1 for weights at 8/6/5/4/3 bits (activations uint8) for
every scheme, with and without bias correction, next to onnxruntime's quantize_static (per
channel, QDQ, MinMax) at 8 and 4 bits, in the pattern of Table 1 of the PWLQ paper.

  python tools/bench_zoo.py --model effnet    [--rows uniform,pow2,...] [--bits 8,4] [--redo]
  python tools/bench_zoo.py --model resnet20
  python tools/bench_zoo.py --model effnet --latency      # paired latency of the 4-bit row
  python tools/bench_zoo.py --table                       # the README tables from the results

Every cell (model, scheme, bits, bias correction) is its own resumable unit: its result is
written to tools/results/zoo.json as soon as it is measured, and a rerun skips the cells
already there, so the table can be finished across sessions.

* EfficientNet-Lite0: calibrate on the first 128 imagenet-sample images, top-1 on the other 372.
  ResNet-20: calibrate on 256 CIFAR-10 *training* images, top-1 on all 10,000 test images.
* Every graphopt row runs canonicalize,fold-bn,equalize,absorb-bias (the ``-noeq`` rows:
  canonicalize,fold-bn; the ``-relu`` rows: equalize{relu6=relu}, the DFQ paper's way, which
  leaves no per-channel ReLU6 bound between layers), then
  quantize{weights=SCHEME:channel,weight_method=mse,first_last_bits=8} (the ``+gptq`` rows:
  GPTQ rounding onto the scheme's own grid instead), then correct-bias in the "+bc" cells. The first and last layers are
  8-bit in every row (as in the w4a8 preset); the others are at the column's bits.
* "calib" is the top-1 on the calibration images; ResNet-20's cells also have "val", the top-1 on
  the validation split (2,000 CIFAR-10 training images outside the calibration set: common.VAL_SPLIT).
  The presets and the summary cells (``--table``'s first tables) are chosen by calib
  (EfficientNet-Lite0) or val (ResNet-20), never by the test column.
* Conversion time is in-process: load the FP32 file, run the pipeline, lower, write the file.
* Float layers: the Conv/Gemm that onnxruntime's optimized graph still runs in float.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from common import (
    PTQ_CACHE,
    VAL_SPLIT,
    cifar_val,
    fp32_file,
    load_results,
    ort_session,
    ort_top1,
    ptq_data,
    save_results,
)

RESULTS = Path(__file__).resolve().parent / "results" / "zoo.json"
CACHE = PTQ_CACHE
PREFIX = "canonicalize,fold-bn,equalize,absorb-bias"
# row -> (weight spec with {b}, weight_method, bit widths it has)
ROWS = {
    "uniform": ("int{b}:channel", "mse", (8, 6, 5, 4, 3)),
    "uniform+gptq": ("int{b}:channel", "gptq", (8, 6, 5, 4, 3)),
    "pow2": ("pow2:b{b}:channel", "mse", (8, 6, 5, 4, 3)),
    "apot": ("apot{b}:channel", "mse", (8, 6, 5, 4, 3)),
    "term": ("term{b}:channel:g8:t16", "mse", (8, 6, 5, 4, 3)),
    "pwlq": ("pwlq{b}:channel", "mse", (8, 6, 5, 4, 3)),
    "ternary": ("ternary:channel", "minmax", (2,)),
    "binary": ("binary:channel", "minmax", (1,)),
    # GPTQ's Hessian-aware rounding onto the zoo's own grids (every element-wise scheme)
    "pow2+gptq": ("pow2:b{b}:channel", "gptq", (4, 3)),
    "apot+gptq": ("apot{b}:channel", "gptq", (8, 6, 5, 4, 3)),
    "pwlq+gptq": ("pwlq{b}:channel", "gptq", (8, 6, 5, 4, 3)),
    "ternary+gptq": ("ternary:channel", "gptq", (2,)),
    "binary+gptq": ("binary:channel", "gptq", (1,)),
    # the classifier at the column's bits too (only the first layer 8-bit): the file-size rows
    "uniform+gptq-last4": ("int{b}:channel", "gptq", (4, 3)),
    "pwlq+gptq-last4": ("pwlq{b}:channel", "gptq", (4, 3)),
    # without equalize/absorb-bias: no per-channel ReLU6 bounds, so every layer fuses as in int8
    "uniform+gptq-noeq": ("int{b}:channel", "gptq", (8, 4, 3)),
    "apot+gptq-noeq": ("apot{b}:channel", "gptq", (4, 3)),
    "pwlq+gptq-noeq": ("pwlq{b}:channel", "gptq", (4, 3)),
    # equalize{relu6=relu}, as the DFQ paper does: ReLU6 between a pair becomes ReLU (the
    # function changes a little), no per-channel bounds, every layer fuses
    "uniform+gptq-relu": ("int{b}:channel", "gptq", (8, 4, 3)),
    "apot+gptq-relu": ("apot{b}:channel", "gptq", (4, 3)),
    "pwlq+gptq-relu": ("pwlq{b}:channel", "gptq", (4, 3)),
}
PEER_BITS = (8, 4)


def convert(src: Path, out: Path, calib: np.ndarray, pipeline: str) -> float:
    import graphopt
    from graphopt.backends.lowering import export_file
    from graphopt.passmanager import Context, PassManager

    t = time.perf_counter()
    g = graphopt.load_onnx(str(src))
    r = PassManager(pipeline).run(g, Context(calib=calib))
    export_file(r.graph, out, "qdq")
    return time.perf_counter() - t


def ort_peer(src: Path, out: Path, calib: np.ndarray, bits: int) -> float:
    from common import OrtReader
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    name = ort_session(src).get_inputs()[0].name
    t = time.perf_counter()
    quantize_static(str(src), str(out), OrtReader(calib, name), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt4 if bits == 4 else QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)
    return time.perf_counter() - t


def load() -> dict:
    return load_results(RESULTS)


def save(res: dict) -> None:
    save_results(RESULTS, res)


def cell_path(model: str, key: str) -> Path:
    return CACHE / model / (key.replace("/", "_").replace("+", "p").replace("-", "_") + ".onnx")


def measure(model: str, rows: list[str], bits_wanted: set[int], redo: bool) -> None:
    from graphopt.backends.lowering import ort_kernel_report

    src = fp32_file(model)
    calib, ycal, xt, yt = ptq_data(model)
    xv, yv = cifar_val() if model == "resnet20" else (None, None)
    res = load()
    jobs = [("fp32", None, None, None)]
    jobs += [(f"ort/w{b}", "ort", b, None) for b in PEER_BITS]
    for row in rows:
        spec, method, widths = ROWS[row]
        for b in widths:
            if b in bits_wanted or len(widths) == 1:
                for bc in (False, True):
                    jobs.append((f"{row}/w{b}{'+bc' if bc else ''}", row, b, bc))
    for key, row, b, bc in jobs:
        full = f"{model}/{key}"
        if full in res and not redo:
            continue
        out = cell_path(model, key)
        out.parent.mkdir(parents=True, exist_ok=True)
        if row is None:
            out, secs, pipe = src, None, "FP32"
        elif row == "ort":
            secs, pipe = ort_peer(src, out, calib, b), "onnxruntime quantize_static per-channel QDQ MinMax"
        else:
            spec, method, _ = ROWS[row]
            edges = "first_bits=8" if row.endswith("-last4") else "first_last_bits=8"
            prefix = {"noeq": "canonicalize,fold-bn", "relu": PREFIX.replace("equalize", "equalize{relu6=relu}")}.get(
                row.rpartition("-")[2], PREFIX)
            pipe = (f"{prefix},quantize{{weights={spec.format(b=b)},weight_method={method},{edges}}}"
                    + (",correct-bias" if bc else ""))
            secs = convert(src, out, calib, pipe)
        kr = ort_kernel_report(str(out))
        res[full] = {"pipeline": pipe, "test": ort_top1(out, xt, yt), "calib": ort_top1(out, calib, ycal),
                     "mb": round(out.stat().st_size / 1e6, 3), "convert_s": None if secs is None else round(secs, 2),
                     "float_layers": len(kr["float"]), "integer_layers": int(sum(kr["integer"].values()))}
        if xv is not None:
            res[full]["val"] = ort_top1(out, xv, yv)
        save(res)
        print(f"{full:34s} test {res[full]['test']:6.2f} calib {res[full]['calib']:6.2f} "
              f"{res[full]['mb']:7.2f} MB  float layers {res[full]['float_layers']:3d}  "
              f"{'' if secs is None else f'{secs:.1f} s'}", flush=True)


LAT_KEYS = ["ort/w8", "ort/w4", "uniform/w8+bc", "uniform+gptq/w4+bc", "pow2/w4+bc", "apot/w4+bc", "term/w4+bc",
            "pwlq/w4+bc", "ternary/w2+bc", "binary/w1+bc", "uniform+gptq-relu/w8+bc", "uniform+gptq-relu/w4+bc",
            "apot+gptq-relu/w4+bc", "uniform+gptq-last4/w4+bc"]


def latency(model: str, rounds: int) -> None:
    """Paired latency ratios (median of ``rounds`` rounds) to FP32 and to graphopt's int8 of the
    same pipeline (uniform/w8+bc for the exact-ReLU6 rows, uniform+gptq-relu/w8+bc for the
    -relu rows), batch 1 and batch 32."""
    from common import paired_latency_ratios

    res = load()
    src = fp32_file(model)
    _, _, xt, _ = ptq_data(model)
    fp = ort_session(src)
    name = fp.get_inputs()[0].name
    refs = {}
    for key in LAT_KEYS:
        ref_key = "uniform+gptq-relu/w8+bc" if "-relu" in key else "uniform/w8+bc"
        if not cell_path(model, ref_key).exists():
            print(f"{model}/{ref_key}: not measured yet; run the accuracy cells first")
            continue
        i8 = refs.setdefault(ref_key, ort_session(cell_path(model, ref_key)))
        full = f"{model}/{key}"
        p = cell_path(model, key)
        if full not in res or not p.exists():
            print(f"{full}: not measured yet (or its file is gone); run the accuracy cells first")
            continue
        s = ort_session(p)
        out = {}
        for b in (1, 32):
            feed = {name: xt[:b]}
            out[f"b{b}_vs_fp32"] = round(float(np.median(paired_latency_ratios(fp, s, feed, feed, rounds))), 3)
            out[f"b{b}_vs_int8"] = round(float(np.median(paired_latency_ratios(i8, s, feed, feed, rounds))), 3)
        out["int8_reference"] = ref_key
        res[full]["latency"] = out
        save(res)
        print(f"{full:34s} " + "  ".join(f"{k} {v:.2f}x" for k, v in out.items() if k != "int8_reference"),
              flush=True)


# scheme family -> the rows that are its variants (the -last4 rows change the file, not the scheme)
FAMILIES = {
    "uniform": ["uniform", "uniform+gptq", "uniform+gptq-noeq", "uniform+gptq-relu"],
    "APoT": ["apot", "apot+gptq", "apot+gptq-noeq", "apot+gptq-relu"],
    "power-of-two": ["pow2", "pow2+gptq"],
    "term (g8, t16)": ["term"],
    "PWLQ (stores b+1 bits)": ["pwlq", "pwlq+gptq", "pwlq+gptq-noeq", "pwlq+gptq-relu"],
    "ternary": ["ternary", "ternary+gptq"],
    "binary": ["binary", "binary+gptq"],
}
CHOOSER = {"effnet": ("calib", "the 128 calibration images"), "resnet20": ("val", VAL_SPLIT)}


def chosen_cells(model: str, res: dict) -> dict[tuple[str, int], tuple[str, dict]]:
    """(family, bits) -> (cell key, result): the variant (GPTQ or not, equalized or not, bias
    correction or not) with the best top-1 on the choosing data (CHOOSER), never on test."""
    col = CHOOSER[model][0]
    out = {}
    for fam, rows in FAMILIES.items():
        for b in (8, 6, 5, 4, 3, 2, 1):
            cands = [(f"{row}/w{b}{bc}", res[f"{model}/{row}/w{b}{bc}"]) for row in rows for bc in ("", "+bc")
                     if col in res.get(f"{model}/{row}/w{b}{bc}", {})]
            if cands:
                out[fam, b] = max(cands, key=lambda kv: kv[1][col])
    return out


def variant(key: str) -> str:
    """'pwlq+gptq-noeq/w4+bc' -> 'pwlq+gptq-noeq+bc'."""
    row, _, cell = key.partition("/")
    return row + ("+bc" if cell.endswith("+bc") else "")


def summary(model: str, res: dict) -> None:
    col, what = CHOOSER[model]
    cells = chosen_cells(model, res)
    if not cells:
        print(f"\n({model}: no cell has a '{col}' score yet: run --model {model} --redo)")
        return
    cols = [8, 6, 5, 4, 3]
    print(f"\n**{model} summary**: per scheme and width, the variant the choosing data picks ({col}: {what}); "
          "test top-1, the variant below it\n")
    print("| scheme | " + " | ".join(f"W{b}" for b in cols) + " |")
    print("|---|" + "---|" * len(cols))
    peer = [f"{res[f'{model}/ort/w{b}']['test']:.1f}" if f"{model}/ort/w{b}" in res else "–" for b in cols]
    print("| ORT quantize_static | " + " | ".join(peer) + " |")
    for fam in FAMILIES:
        if any((fam, b) in cells for b in (2, 1)):
            b = 2 if (fam, 2) in cells else 1
            k, r = cells[fam, b]
            print(f"| {fam} | W{b}: {r['test']:.1f} ({variant(k)}) |" + " |" * (len(cols) - 1))
            continue
        row = [f"{cells[fam, b][1]['test']:.1f} ({variant(cells[fam, b][0])})" if (fam, b) in cells else "–"
               for b in cols]
        print(f"| {fam} | " + " | ".join(row) + " |")


def table() -> None:
    res = load()
    for model in ("effnet", "resnet20"):
        if f"{model}/fp32" in res:
            summary(model, res)
    for model, title in (("effnet", "EfficientNet-Lite0 (test: 372 imagenet-sample images, FP32 {fp})"),
                         ("resnet20", "ResNet-20 CIFAR-10 (test: 10,000 images, FP32 {fp})")):
        if f"{model}/fp32" not in res:
            continue
        col = CHOOSER[model][0]
        print(f"\n**{title.format(fp=res[f'{model}/fp32']['test'])}**, top-1 test ({col}) for weight bits; "
              "activations uint8\n")
        cols = [8, 6, 5, 4, 3]
        print("| scheme | bc | " + " | ".join(f"W{b}" for b in cols) + " |")
        print("|---|---|" + "---|" * len(cols))
        peer = ["-"] * len(cols)
        for i, b in enumerate(cols):
            r = res.get(f"{model}/ort/w{b}")
            if r:
                peer[i] = f"{r['test']:.1f} ({r.get(col, float('nan')):.1f})"
        print("| ORT quantize_static | - | " + " | ".join(peer) + " |")
        for row, (_, _, widths) in ROWS.items():
            for bc in (False, True):
                cells = []
                for b in cols if len(widths) > 1 else widths:
                    r = res.get(f"{model}/{row}/w{b}{'+bc' if bc else ''}")
                    cells.append("-" if r is None else f"{r['test']:.1f} ({r.get(col, float('nan')):.1f})")
                if all(c == "-" for c in cells):
                    continue
                if len(widths) == 1:
                    cells = [f"W{widths[0]}: {cells[0]}"] + [""] * (len(cols) - 1)
                print(f"| {row} | {'yes' if bc else 'no'} | " + " | ".join(cells) + " |")
        lat = [(k, res[f"{model}/{k}"]) for k in LAT_KEYS if "latency" in res.get(f"{model}/{k}", {})]
        if lat:
            fp = res[f"{model}/fp32"]
            print(f"\n| model | top-1 | MB ({fp['mb']:.1f} FP32) | size / FP32 | b1 vs FP32 | b32 vs FP32 | b1 vs int8 | "
                  "b32 vs int8 | float Conv/Gemm | convert s |")
            print("|---|---|---|---|---|---|---|---|---|---|")
            for k, r in lat:
                L = r["latency"]
                print(f"| {k} | {r['test']:.1f} | {r['mb']:.2f} | {r['mb'] / fp['mb']:.3f} | {L['b1_vs_fp32']:.2f} | "
                      f"{L['b32_vs_fp32']:.2f} | {L['b1_vs_int8']:.2f} | {L['b32_vs_int8']:.2f} | "
                      f"{r['float_layers']} | {r['convert_s']} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["effnet", "resnet20"])
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows of {', '.join(ROWS)}")
    ap.add_argument("--bits", default="8,6,5,4,3", help="weight bit widths (columns) to measure")
    ap.add_argument("--redo", action="store_true", help="measure cells again even if they have results")
    ap.add_argument("--latency", action="store_true", help="paired latency of the cells in LAT_KEYS")
    ap.add_argument("--rounds", type=int, default=5, help="latency rounds")
    ap.add_argument("--table", action="store_true", help="print the tables from the results file")
    args = ap.parse_args()
    if args.table:
        table()
        return 0
    if not args.model:
        ap.error("--model is required (or --table)")
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    bad = [r for r in rows if r not in ROWS]
    if bad:
        ap.error(f"unknown rows {bad} (known: {', '.join(ROWS)})")
    if args.latency:
        latency(args.model, args.rounds)
    else:
        measure(args.model, rows, {int(b) for b in args.bits.split(",")}, args.redo)
    return 0


if __name__ == "__main__":
    sys.exit(main())
