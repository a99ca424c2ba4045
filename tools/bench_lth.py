"""The Lottery Ticket Hypothesis on Conv-2 / CIFAR-10 (Frankle & Carbin 2019, Figure 5's
network): the winning ticket against its two controls, one resumable run per control.

  python tools/bench_lth.py --control ticket        [--rounds 7 --rate 0.2 --epochs 4 --train 10000]
  python tools/bench_lth.py --control reinit
  python tools/bench_lth.py --control random_mask
  python tools/bench_lth.py --table [--plot lth.png]

Conv-2: conv3x3(64) ReLU conv3x3(64) ReLU maxpool2 -> FC 256 ReLU FC 256 ReLU FC 10, trained
from a fixed random initialization (seed 0) with Adam lr 2e-4 (the paper's), batch 60, on the
--train CIFAR-10 training images (a fixed random sample), labels only, no augmentation; scored on all 10,000 test
images. Each round prunes --rate of the surviving weights by one global magnitude threshold and
rewinds the survivors to the initialization (--rewind 0) or to step k. The state after every
round goes to /tmp/graphopt-lth/CONTROL.{npz,json}: rerunning the command continues there.
Results: tools/results/lth.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from common import cifar10, cifar_normalize, load_results, ort_top1, save_results, top1_pct, torch_logits

RESULTS = Path(__file__).resolve().parent / "results" / "lth.json"
WORK = Path(tempfile.gettempdir()) / "graphopt-lth"


def conv2():
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * 16 * 16, 256), nn.ReLU(), nn.Linear(256, 256),
                         nn.ReLU(), nn.Linear(256, 10))


def run(control: str, rounds: int, rate: float, epochs: int, n_train: int, rewind: int) -> list[dict]:
    import torch

    import graphopt
    from graphopt.training.finetune import FinetuneConfig
    from graphopt.training.lottery import lottery_ticket

    xtr_u8, ytr = cifar10("train")
    xt_u8, yt = cifar10("test")
    idx = np.random.default_rng(0).permutation(len(ytr))[:n_train]  # the archive lists the classes in order
    xtr, ytr = cifar_normalize(xtr_u8[idx]), ytr[idx]
    xt = cifar_normalize(xt_u8)
    g = graphopt.from_torch(conv2(), torch.zeros(1, 3, 32, 32))

    def score(graph) -> dict[str, float]:
        """Top-1 of the round's network in torch and of its exported ONNX file in onnxruntime."""
        m = graphopt.to_torch(graph).eval()
        out = WORK / f"{control}-r{rewind}-round.onnx"
        graphopt.save_onnx(graph, out)
        return {"torch": top1_pct(torch_logits(m, xt, 1000), yt), "onnxruntime": ort_top1(out, xt, yt)}

    WORK.mkdir(parents=True, exist_ok=True)
    cfg = FinetuneConfig(epochs=epochs, batch_size=60, lr=2e-4, optimizer="adam", kd_weight=0.0)
    return lottery_ticket(g, xtr, ytr, rounds=rounds, rate=rate, rewind_step=rewind, control=control, config=cfg,
                          evaluate=score, state=WORK / f"{control}-r{rewind}",
                          ticket=None if control == "ticket" else WORK / f"ticket-r{rewind}")


def table(plot: str | None) -> None:
    from graphopt.training.lottery import format_table, plot_curves

    res = load_results(RESULTS)
    if not res:
        print("no results yet")
        return
    runs = {k: v["rounds"] for k, v in res.items()}
    epochs = sorted({v["epochs_per_round"] for v in res.values()})
    print(f"torch top-1 % on the 10,000 test images ({'/'.join(map(str, epochs))} epochs per round):")
    print(format_table(runs))
    print("\nthe same rounds' exported ONNX files in onnxruntime:")
    print(format_table(runs, key="onnxruntime"))
    if plot:
        plot_curves(plot, runs, title="Conv-2 on CIFAR-10: winning ticket vs controls", ylabel="test top-1 %")
        print(f"wrote {plot}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--control", choices=("ticket", "reinit", "random_mask"))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--rate", type=float, default=0.2)
    ap.add_argument("--epochs", type=int, default=4, help="epochs per round (the table states them)")
    ap.add_argument("--train", type=int, default=10000, help="training images")
    ap.add_argument("--rewind", type=int, default=0, help="rewind step (0: the initialization)")
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--plot")
    args = ap.parse_args()
    if args.table:
        table(args.plot)
        return 0
    if not args.control:
        ap.error("--control is required (or --table)")
    rows = run(args.control, args.rounds, args.rate, args.epochs, args.train, args.rewind)
    res = load_results(RESULTS)
    res[f"{args.control}-rewind{args.rewind}"] = {"rounds": rows, "epochs_per_round": args.epochs, "rate": args.rate,
                                                   "train_images": args.train}
    save_results(RESULTS, res)
    for r in rows:
        ort = (r.get("scores") or {}).get("onnxruntime")
        print(f"round {r['round']}: {100 * r['remaining']:.1f}% remaining, top-1 {r['score']:.2f}"
              + ("" if ort is None else f" (onnxruntime {ort:.2f})"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
