"""Does sparsity buy CPU speed here? torch's CSR matmul and scipy.sparse against dense matmul,
on ResNet-20's own layer shapes (each conv as its im2col GEMM, and the classifier), at a range
of sparsities; the sparsity where sparse starts to win, per shape.

  python tools/bench_sparse_matmul.py [--batch 1] [--threads 1] [--plot sparse_matmul.png]

The weight is W [out, in*kh*kw] with random magnitude-pruned entries; the activation is the
im2col matrix [in*kh*kw, batch*H*W]. Each time is the median of repeated runs after a warm-up.
Results: tools/results/sparse_matmul.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from common import median_time

RESULTS = Path(__file__).resolve().parent / "results" / "sparse_matmul.json"
SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)
# ResNet-20 (CIFAR-10): (name, out, in*kh*kw, output pixels)
SHAPES = [("stem 3x3, 3->16", 16, 27, 1024), ("stage1 3x3, 16->16", 16, 144, 1024),
          ("stage2 3x3, 32->32", 32, 288, 256), ("stage3 3x3, 64->64", 64, 576, 64), ("classifier 64->10", 10, 64, 1)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--plot", help="PNG of the sparse/dense time ratio against sparsity")
    args = ap.parse_args()
    import scipy.sparse as sp
    import torch

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    rows = []
    for name, out, k, pix in SHAPES:
        n = pix * args.batch
        w = rng.standard_normal((out, k)).astype(np.float32)
        x = rng.standard_normal((k, n)).astype(np.float32)
        wt, xt = torch.from_numpy(w), torch.from_numpy(x)
        dense_t = median_time(lambda wt=wt, xt=xt: torch.mm(wt, xt), repeat=args.reps)
        dense_np = median_time(lambda w=w, x=x: w @ x, repeat=args.reps)
        for s in SPARSITIES:
            thr = np.quantile(np.abs(w), s)
            ws = np.where(np.abs(w) > thr, w, 0).astype(np.float32)
            csr_t = torch.from_numpy(ws).to_sparse_csr()
            csr_s = sp.csr_matrix(ws)
            t_csr = median_time(lambda c=csr_t, xt=xt: torch.sparse.mm(c, xt), repeat=args.reps)
            s_csr = median_time(lambda c=csr_s, x=x: c @ x, repeat=args.reps)
            rows.append({"shape": name, "out": out, "k": k, "n": n, "sparsity": s, "dense_torch_us": dense_t * 1e6,
                         "csr_torch_us": t_csr * 1e6, "dense_numpy_us": dense_np * 1e6, "csr_scipy_us": s_csr * 1e6})
    by = {}
    for r in rows:
        by.setdefault(r["shape"], []).append(r)
    print(f"batch {args.batch}, {args.threads} thread(s); time ratio sparse / dense (< 1: sparse wins)")
    print(f"{'shape':<22} " + " ".join(f"{s:>11}" for s in SPARSITIES) + "   breakeven (torch, scipy)")
    summary = {}
    for name, rs in by.items():
        cells = " ".join(f"{r['csr_torch_us'] / r['dense_torch_us']:5.2f}/{r['csr_scipy_us'] / r['dense_numpy_us']:5.2f}"
                         for r in rs)
        bt = next((r["sparsity"] for r in rs if r["csr_torch_us"] < r["dense_torch_us"]), None)
        bs = next((r["sparsity"] for r in rs if r["csr_scipy_us"] < r["dense_numpy_us"]), None)
        summary[name] = {"torch_breakeven": bt, "scipy_breakeven": bs}
        print(f"{name:<22} {cells}   {bt if bt is not None else 'never'}, {bs if bs is not None else 'never'}")
    res = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    res[f"batch{args.batch}-threads{args.threads}"] = {"rows": rows, "breakeven": summary}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=1))
    tmp.replace(RESULTS)
    if args.plot:
        from graphopt.plotting import pyplot, save_png

        plt = pyplot("--plot")
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, (name, rs) in enumerate(by.items()):
            ax.plot([r["sparsity"] for r in rs], [r["csr_torch_us"] / r["dense_torch_us"] for r in rs], "-o",
                    color=f"C{i}", label=f"{name} (torch CSR)")
            ax.plot([r["sparsity"] for r in rs], [r["csr_scipy_us"] / r["dense_numpy_us"] for r in rs], "--x",
                    color=f"C{i}", alpha=0.6)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("weight sparsity")
        ax.set_ylabel("sparse time / dense time (dashed: scipy)")
        ax.set_title(f"ResNet-20 layer GEMMs, batch {args.batch}, {args.threads} thread(s)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        save_png(fig, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
