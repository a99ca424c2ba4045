"""Quantization-aware training of ResNet-20 on CIFAR-10, one resumable row at a time.

  python tools/bench_qat.py --row w4a4-lsq [--epochs 3]     # train (or resume) one row
  python tools/bench_qat.py --list                          # the rows and what they run
  python tools/bench_qat.py --table                         # the README table from the results

Every row starts from the pretrained FP32 weights (../shared/models/resnet20_cifar10.npz,
87.79%), folds BatchNorm into the weights *before* they are fake-quantized (the frozen-
statistics schedule: see docs/qat.md), and trains with the same recipe: SGD momentum 0.9,
cosine schedule from --lr (0.001: without BatchNorm in the graph, 0.01 diverges within 10 steps), weight decay 1e-4 (on the learned steps and clips too, PACT's L2
on alpha), batch 128, random crop (pad 4) + horizontal flip, loss = 0.5 distillation from the
FP32 model (T = 4) + 0.5 cross-entropy. The first and last layers are 8-bit in every row.

A row's checkpoint is written after every epoch (atomic), so an interrupted row resumes with
the same command. Results (top-1 on all 10,000 test images through torch's fake-quant model
and through onnxruntime on the exported QDQ file, their agreement, wall time per epoch) go
to tools/results/qat.json as each row finishes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import cifar10, cifar_normalize, load_results, ort_session, save_results

RESULTS = Path(__file__).resolve().parent / "results" / "qat.json"
WORK = Path(tempfile.gettempdir()) / "graphopt-qat"
EDGE = "first_last_bits=8"
# row -> (quantize options, what it is)
ROWS = {
    "w8a8-ptq": ("weights=int8:channel,acts=uint8:tensor", "PTQ baseline, no training"),
    "w4a4-ptq": ("weights=int4:channel,acts=uint4:tensor", "PTQ baseline, no training"),
    "w4a4-lsq": ("weights=int4:channel,acts=uint4:tensor,qat=lsq", "LSQ steps, weights and activations"),
    "w4a4-pact": ("weights=int4:channel,acts=uint4:tensor,qat=pact", "PACT clips (weights: LSQ)"),
    "w4a4-dorefa": ("weights=int4:channel,acts=uint4:tensor,qat=dorefa", "DoReFa weights, [0,1] activations"),
    "w4a4-ste": ("weights=int4:channel,acts=uint4:tensor,qat=ste", "plain STE, calibrated fixed scales"),
    "w3a3-lsq": ("weights=int3:channel,acts=uint3:tensor,qat=lsq", "LSQ"),
    "w2a2-lsq": ("weights=int2:channel,acts=uint2:tensor,qat=lsq", "LSQ"),
    "ternary-a8": ("weights=ternary:channel,acts=uint8:tensor,qat=lsq", "TWN ternary weights, LSQ activations"),
    "binary-a8": ("weights=binary:channel,acts=uint8:tensor,qat=lsq", "XNOR binary weights, LSQ activations"),
    "w4a4-lsq-g8": ("weights=int4:channel,acts=uint4:tensor,qat=lsq,grad_bits=8", "LSQ + 8-bit DoReFa gradients"),
    "w4a4-lsq-g6": ("weights=int4:channel,acts=uint4:tensor,qat=lsq,grad_bits=6", "LSQ + 6-bit DoReFa gradients"),
    "w4a4-apot": ("weights=apot4:channel,acts=uint4:tensor,qat=lsq", "APoT weights (STE), LSQ activations"),
    "w4a4-pow2": ("weights=pow2:b4:channel,acts=uint4:tensor,qat=lsq", "power-of-two weights (STE), LSQ acts"),
}


def augment(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random crop with 4 pixels of zero padding and a random horizontal flip, batched."""
    n, c, h, w = x.shape
    p = np.pad(x, ((0, 0), (0, 0), (4, 4), (4, 4)))
    dy, dx = rng.integers(0, 9, n), rng.integers(0, 9, n)
    rows = (dy[:, None] + np.arange(h))[:, :, None]  # [n, h, 1]
    cols = (dx[:, None] + np.arange(w))[:, None, :]  # [n, 1, w]
    flip = rng.random(n) < 0.5
    cols = np.where(flip[:, None, None], cols[:, :, ::-1], cols)
    out = p[np.arange(n)[:, None, None, None], np.arange(c)[None, :, None, None], rows[:, None], cols[:, None]]
    return np.ascontiguousarray(out, np.float32)


def load() -> dict:
    return load_results(RESULTS)


def save(res: dict) -> None:
    save_results(RESULTS, res)


def run_row(row: str, epochs: int, lr: float, limit: int | None) -> dict:
    import onnx
    import torch
    from cifar_resnet import resnet_cifar

    import graphopt
    from graphopt.backends.lowering import lower, to_model
    from graphopt.passmanager import Context, PassManager, TrainingData

    opts, _ = ROWS[row]
    xtr_u8, ytr = cifar10("train")
    xt_u8, yt = cifar10("test")
    xtr, xt = cifar_normalize(xtr_u8[:limit]), cifar_normalize(xt_u8)
    ytr = ytr[:limit]
    model = resnet_cifar(20)
    g = graphopt.from_torch(model, torch.zeros(1, 3, 32, 32))
    calib = xtr[np.random.default_rng(0).permutation(len(xtr))[:512]]
    WORK.mkdir(parents=True, exist_ok=True)
    ck = WORK / f"{row}.pt"
    train = "ptq" not in row
    pipe = f"canonicalize,fold-bn,quantize{{{opts},{EDGE}}}"
    if train:
        pipe += (f",finetune{{epochs={epochs},batch_size=128,lr={lr},weight_decay=0.0001,kd_weight=0.5,"
                 f"temperature=4,checkpoint={ck},resume=true}}")
    t = time.perf_counter()
    ctx = Context(calib=calib, train=TrainingData(xtr, ytr, augment), teacher=g.copy())
    r = PassManager(pipe).run(g, ctx)
    secs = time.perf_counter() - t
    q = r.graph
    module = graphopt.to_torch(q).eval()
    with torch.no_grad():
        sim = np.concatenate([module(torch.from_numpy(xt[i:i + 500])).numpy() for i in range(0, len(xt), 500)])
    low, rep = lower(q, "qdq")
    out = WORK / f"{row}.onnx"
    onnx.save(to_model(low, rep.opset), str(out))
    sess = ort_session(out)
    name = sess.get_inputs()[0].name
    ort = np.concatenate([sess.run(None, {name: xt[i:i + 500]})[0] for i in range(0, len(xt), 500)])
    steps = r.stats.get("finetune", [{}])[0].get("steps", 0) if train else 0
    return {"pipeline": pipe, "epochs": epochs if train else 0, "torch_top1": round(100 * float((sim.argmax(1) == yt).mean()), 2),
            "ort_top1": round(100 * float((ort.argmax(1) == yt).mean()), 2),
            "agree": round(100 * float((sim.argmax(1) == ort.argmax(1)).mean()), 2),
            "wall_s": round(secs, 1), "s_per_epoch": round(secs / max(epochs, 1), 1) if train else None,
            "steps": steps, "train_images": len(xtr), "mb": round(out.stat().st_size / 1e6, 3)}


def table() -> None:
    res = load()
    print("| row | what | epochs | top-1 torch | top-1 onnxruntime | agree | s/epoch |")
    print("|---|---|---|---|---|---|---|")
    for row, (_, what) in ROWS.items():
        r = res.get(row)
        if r:
            print(f"| {row} | {what} | {r['epochs']} | {r['torch_top1']:.2f} | {r['ort_top1']:.2f} | {r['agree']:.2f}% | "
                  f"{r['s_per_epoch'] if r['s_per_epoch'] is not None else '-'} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--row", help="the row to run (see --list)")
    ap.add_argument("--epochs", type=int, default=3, help="training epochs (the table states them)")
    ap.add_argument("--lr", type=float, default=0.001, help="peak learning rate (a BN-folded net diverges at 0.01)")
    ap.add_argument("--limit", type=int, default=None, help="train on the first N training images (smoke runs)")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--table", action="store_true")
    args = ap.parse_args()
    if args.list:
        for row, (opts, what) in ROWS.items():
            print(f"{row:14s} {what}: quantize{{{opts},{EDGE}}}")
        return 0
    if args.table:
        table()
        return 0
    if args.row not in ROWS:
        ap.error(f"--row must be one of {', '.join(ROWS)}")
    result = run_row(args.row, args.epochs, args.lr, args.limit)
    res = load()
    res[args.row] = result
    save(res)
    print(json.dumps({args.row: result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
