"""Benchmark the data-free float passes on EfficientNet-Lite0 (../shared), next to AIMET.

  python tools/bench_dfq.py [--aimet-python /tmp/aimetenv/bin/python] [--calib 128]

Prints, in one run:
1. per-pair weight-range spread (p99/p1 of per-channel max|w|, all-zero channels ignored)
   before and after `equalize`, with the sweeps to convergence and the pass time;
2. the median spread of the depthwise layers: original, graphopt `fold-bn,equalize`, and
   AIMET-ONNX `equalize_model` on the same file (if --aimet-python points at an environment
   with aimet-onnx), plus each model's float top-1 and agreement on imagenet-sample;
3. `absorb-bias` with calibration data: error on the calibration images and top-1 changes
   on all 500 images, for --calib N images and for all 500.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import SHARED, imagenet_sample, need_shared, ort_logits

from graphopt.geometry import geometry


def logits(model, x: np.ndarray) -> np.ndarray:
    return ort_logits(model, x, 50)


def dw_spreads(graph) -> list[float]:
    from graphopt.passes import _layers as L

    return [L.spread(geometry(n).out_view(L.weight(graph, n)))[0] for n in graph.find_nodes("Conv") if n.attr("group", 1) > 1]


def rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--aimet-python", default=os.environ.get("GRAPHOPT_AIMET_PYTHON"),
                    help="python of an environment with aimet-onnx (see tools/peers/aimet_equalize.py)")
    ap.add_argument("--calib", type=int, default=128, help="calibration images for absorb-bias")
    args = ap.parse_args()
    import graphopt
    from graphopt.passmanager import Context, PassManager

    src = need_shared(SHARED / "models" / "efficientnet_lite0.onnx")
    x, y = imagenet_sample()
    ref = logits(str(src), x)
    tmp = Path(tempfile.mkdtemp())

    g0 = graphopt.load_onnx(src)
    t = time.perf_counter()
    res = PassManager("canonicalize,fold-bn,equalize").run(g0.copy())
    t_ours = time.perf_counter() - t
    eq = res.graph
    st = res.stats["equalize"][0]
    print(f"== equalize on {src.name}: {st['pairs']} pairs, {st['skipped']} layers not paired, "
          f"{st['iterations']} sweeps to tol, pass pipeline {t_ours:.2f} s")
    print(f"{'pair (layer1 -> layer2)':78s} {'spread1 before':>14s} {'after':>7s} {'spread2 before':>15s} {'after':>7s}")
    for p in st["pair_spreads"]:
        name = p["pair"].replace("/blocks/blocks.", "b").replace("/Conv", "")
        print(f"{name[-78:]:78s} {p['spread1_before']:14.1f} {p['spread1_after']:7.1f} {p['spread2_before']:15.1f} "
              f"{p['spread2_after']:7.1f}")

    rows = [("FP32 original", np.median(dw_spreads(g0)), ref, None)]
    eq_logits = logits(graphopt.to_onnx(eq), x)
    rows.append(("graphopt fold-bn,equalize", np.median(dw_spreads(eq)), eq_logits, t_ours))
    if args.aimet_python:
        out = tmp / "aimet.onnx"
        peer = Path(__file__).parent / "peers" / "aimet_equalize.py"
        t = time.perf_counter()
        proc = subprocess.run([args.aimet_python, str(peer), str(src), str(out)], capture_output=True, text=True)
        wall = time.perf_counter() - t
        if proc.returncode != 0:
            print(f"AIMET peer failed:\n{proc.stderr[-2000:]}")
        else:
            secs = json.loads(proc.stdout.strip().splitlines()[-1])["seconds"]
            ga = graphopt.load_onnx(out)
            rows.append(("AIMET-ONNX equalize_model", np.median(dw_spreads(ga)), logits(str(out), x), secs))
            print(f"(AIMET process wall time incl. imports {wall:.1f} s)")
    else:
        print("\n(AIMET row skipped: pass --aimet-python, see tools/peers/aimet_equalize.py)")

    print(f"\n== depthwise layers and float accuracy on {len(x)} imagenet-sample images")
    print(f"{'model':28s} {'median dw spread':>17s} {'top-1 %':>8s} {'agree w/ FP32':>14s} {'rel.err':>9s} {'pass s':>7s}")
    for name, sp, lg, secs in rows:
        print(f"{name:28s} {sp:17.2f} {100 * (lg.argmax(1) == y).mean():8.1f} "
              f"{100 * (lg.argmax(1) == ref.argmax(1)).mean():13.1f}% {rel(lg, ref):9.1e} "
              f"{'-' if secs is None else f'{secs:7.2f}'}")
    if len(rows) == 3:
        print(f"median depthwise spread reduction: graphopt {rows[0][1] / rows[1][1]:.2f}x, "
              f"AIMET {rows[0][1] / rows[2][1]:.2f}x; pass time ratio graphopt/AIMET {rows[1][3] / rows[2][3]:.2f}")

    print("\n== absorb-bias with calibration data (after fold-bn,equalize)")
    print(f"{'calibration set':24s} {'pairs':>6s} {'rel.err on calib':>17s} {'rel.err on others':>18s} "
          f"{'top-1 changed (of 500)':>23s}")
    for n in sorted({min(args.calib, len(x)), len(x)}):
        r = PassManager("absorb-bias").run(eq.copy(), Context(calib=x[:n]))
        lg = logits(graphopt.to_onnx(r.graph), x)
        others = rel(lg[n:], eq_logits[n:]) if n < len(x) else float("nan")
        print(f"{f'first {n} images':24s} {r.stats['absorb-bias'][0]['absorbed']:6d} "
              f"{rel(lg[:n], eq_logits[:n]):17.1e} {others:18.1e} {int((lg.argmax(1) != ref.argmax(1)).sum()):23d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
