"""Benchmark post-training quantization on EfficientNet-Lite0 against onnxruntime's quantize_static.

  python tools/bench_quant.py [--calib 128] [--repeat 10] [--extra]

Calibrates on the first --calib imagenet-sample images and measures top-1 on the rest, in one
run. Peer rows use onnxruntime.quantization.quantize_static (QDQ, MinMax) with the same
calibration images. Latency is onnxruntime's (default session options, all threads), as a ratio to
FP32 at batch 1 and 32, the median of --repeat interleaved rounds over all models. Conversion time is the wall time from the FP32 file to the written
quantized file, as a ratio to ORT's conversion of the same weight format; graphopt's is the
whole `graphopt convert` command (start-up and its conversion report included), as a user sees it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import SHARED, OrtReader, imagenet_sample, median_time, need_shared, ort_logits, ort_session

ROWS = [
    ("graphopt naive per-tensor W8A8", "canonicalize,quantize{weights=int8:tensor}", "ort-tensor"),
    ("  + equalize", "canonicalize,fold-bn,equalize,quantize{weights=int8:tensor}", "ort-tensor"),
    ("  + absorb-bias", "canonicalize,fold-bn,equalize,absorb-bias,quantize{weights=int8:tensor}", "ort-tensor"),
    ("  + correct-bias (= dfq)", "dfq", "ort-tensor"),
    ("graphopt int8", "int8", "ort-channel"),
    ("graphopt w4a8", "w4a8", "ort-w4"),
]
EXTRA = [
    ("graphopt w4a8, depthwise 8-bit", "canonicalize,fold-bn,equalize,absorb-bias,quantize{weights=int4:channel,"
     "weight_method=mse,first_last_bits=8,override=[*conv_dw*=8]},correct-bias", "ort-w4"),
]


def ort_quantize(src: Path, out: Path, calib: np.ndarray, kind: str) -> float:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    t = time.perf_counter()
    wt = QuantType.QInt4 if kind == "ort-w4" else QuantType.QInt8
    quantize_static(str(src), str(out), OrtReader(calib, "input"), quant_format=QuantFormat.QDQ,
                    per_channel=kind != "ort-tensor", activation_type=QuantType.QUInt8, weight_type=wt,
                    calibrate_method=CalibrationMethod.MinMax)
    return time.perf_counter() - t


def ours(src: Path, out: Path, calib: np.ndarray, pipeline: str) -> tuple[float, dict]:
    """graphopt through its CLI, as a user runs it: `graphopt convert` with the conversion report
    (onnxruntime's kernel check and SQNR on 32 samples) on. The time is the whole command, Python
    start-up included; the calibration images are an .npy of the preprocessed arrays, as ORT's
    reader gets them."""
    import subprocess

    from graphopt.pipeline import presets

    npy = out.with_suffix(".calib.npy")
    if not npy.exists():
        np.save(npy, calib)
    how = ["--preset", pipeline] if pipeline in presets() else ["--pipeline", pipeline]
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "graphopt.cli", "convert", str(src), "-o", str(out), *how,
                        "--calib", str(npy), "--format", "qdq"], capture_output=True, text=True)
    secs = time.perf_counter() - t
    if r.returncode:
        raise SystemExit(f"graphopt convert failed: {r.stderr.strip()}")
    return secs, {}


def evaluate(path, x, y, ref_top1) -> tuple[float, float]:
    top1 = ort_logits(path, x, 62).argmax(1)
    return 100 * float((top1 == y).mean()), 100 * float((top1 == ref_top1).mean())


def latencies(paths, x1, x32, repeat) -> dict:
    """Median batch-1 and batch-32 latency per model, measured in interleaved rounds (every round
    times every model once, in rotating order) so that all models share the machine's noise."""
    sessions = {p: ort_session(p) for p in paths}
    names = {p: s.get_inputs()[0].name for p, s in sessions.items()}
    times = {p: ([], []) for p in paths}
    for p, s in sessions.items():  # warm up
        s.run(None, {names[p]: x1}), s.run(None, {names[p]: x32})
    order = list(paths)
    for _ in range(repeat):
        order = order[1:] + order[:1]
        for p in order:
            s = sessions[p]
            times[p][0].append(median_time(lambda s=s, p=p: s.run(None, {names[p]: x1}), 15, 0))
            times[p][1].append(median_time(lambda s=s, p=p: s.run(None, {names[p]: x32}), 2, 0))
    return {p: (float(np.median(a)), float(np.median(b))) for p, (a, b) in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=15, help="latency rounds")
    ap.add_argument("--extra", action="store_true", help="also the w4a8 variant with 8-bit depthwise layers")
    args = ap.parse_args()
    from graphopt.backends.lowering import ort_kernel_report

    src = need_shared(SHARED / "models" / "efficientnet_lite0.onnx")
    x, y = imagenet_sample()
    calib, xt, yt = x[:args.calib], x[args.calib:], y[args.calib:]
    tmp = Path(tempfile.mkdtemp())
    ref_top1 = np.concatenate([ort_session(src).run(None, {"input": xt[i:i + 62]})[0]
                               for i in range(0, len(xt), 62)]).argmax(1)
    x1, x32 = xt[:1], xt[:32]

    models: list[tuple[str, Path, float | None, str | None]] = [("FP32", src, None, None)]
    ort_times = {}
    for kind, label in (("ort-tensor", "ORT per-tensor W8A8"), ("ort-channel", "ORT per-channel W8A8"),
                        ("ort-w4", "ORT per-channel W4A8")):
        out = tmp / f"{kind}.onnx"
        ort_times[kind] = ort_quantize(src, out, calib, kind)
        models.append((label, out, ort_times[kind], kind))
    for i, (label, pipe, peer) in enumerate(ROWS + (EXTRA if args.extra else [])):
        out = tmp / f"ours{i}.onnx"
        secs, _ = ours(src, out, calib, pipe)
        models.append((label, out, secs, peer))

    lat = latencies([path for _, path, _, _ in models], x1, x32, args.repeat)
    fp_b1, fp_b32 = lat[src]
    print(f"EfficientNet-Lite0, calibration {len(calib)} images, top-1 on the other {len(xt)} imagenet-sample images")
    print(f"{'model':34s} {'top-1':>6s} {'agree':>6s} {'MB':>6s} {'lat b1':>7s} {'lat b32':>8s} {'conv. s':>8s} "
          f"{'vs ORT':>7s} {'float conv/gemm':>16s}")
    results = {}
    for label, path, secs, peer in models:
        top1, agree = evaluate(path, xt, yt, ref_top1)
        b1, b32 = lat[path]
        size = Path(path).stat().st_size / 1e6
        kr = ort_kernel_report(str(path))
        n_float = len(kr["float"])
        vs = "" if secs is None or peer is None else f"{secs / ort_times[peer]:.2f}x"
        results[label] = (top1, agree, b1, b32)
        print(f"{label:34s} {top1:6.1f} {agree:5.1f}% {size:6.2f} {b1 / fp_b1:6.2f}x {b32 / fp_b32:7.2f}x "
              f"{'-' if secs is None else f'{secs:8.1f}'} {vs:>7s} {n_float:16d}")
    fp = results["FP32"][0]
    print("\nlatency columns: ratio to FP32 (lower is faster); 'vs ORT': conversion time / ORT's for the same weights")
    checks = [("dfq per-tensor W8A8 within 0.5 pt of FP32", fp - results["  + correct-bias (= dfq)"][0] <= 0.5),
              ("int8 within 0.3 pt of FP32", fp - results["graphopt int8"][0] <= 0.3),
              ("w4a8 within 5 pt of FP32", fp - results["graphopt w4a8"][0] <= 5.0),
              ("int8 latency <= ORT per-channel W8A8 (b1, b32)",
               results["graphopt int8"][2] <= results["ORT per-channel W8A8"][2] * 1.0 and
               results["graphopt int8"][3] <= results["ORT per-channel W8A8"][3] * 1.0)]
    for what, ok in checks:
        print(f"  [{'PASS' if ok else 'FAIL'}] {what}")
    g8, o8 = results["graphopt int8"], results["ORT per-channel W8A8"]
    print(f"  int8 latency / ORT per-channel W8A8 latency: batch 1 {g8[2] / o8[2]:.3f}, batch 32 {g8[3] / o8[3]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
