"""Paired onnxruntime latency ratio of a compressed model against its reference, with its spread.

  python tools/latency_ratio.py REF.onnx MODEL.onnx [--batch 1 32 256] [--rounds 40] [--threads N]

Each round times the reference and the model back to back (in alternating order) and keeps the
ratio, so the slow drift of a shared machine hits both sides of a ratio alike. It prints the
median ratio over the rounds with its quartiles, and the share of the MACs reduction that the
latency reduction realizes. Inputs are random: only the shapes matter.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
from common import ort_session, paired_latency_ratios, ratio_summary


def _feed(sess, batch: int) -> dict:
    inp = sess.get_inputs()[0]
    if any(not isinstance(d, int) for d in inp.shape[1:]):
        sys.exit(f"input {inp.name} has a symbolic non-batch dimension: {inp.shape}")
    shape = [batch, *inp.shape[1:]]
    return {inp.name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ref")
    ap.add_argument("model")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: all cores)")
    args = ap.parse_args()
    import graphopt
    from graphopt.analysis import total_macs

    mr = total_macs(graphopt.load_onnx(args.model)) / total_macs(graphopt.load_onnx(args.ref))
    ref, model = ort_session(args.ref, args.threads), ort_session(args.model, args.threads)
    print(f"{args.model} vs {args.ref}: MACs ratio {mr:.3f}; onnxruntime, {args.threads or 'default'} threads, "
          f"{args.rounds} paired rounds; latency ratio median (quartiles)")
    for b in args.batch:
        r = paired_latency_ratios(ref, model, _feed(ref, b), _feed(model, b), args.rounds)
        print(f"  batch {b:4d}: {ratio_summary(r, mr)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
