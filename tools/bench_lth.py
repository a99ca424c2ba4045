"""The Lottery Ticket Hypothesis on CIFAR-10: the winning ticket against its controls, one
resumable run per control, on Conv-2 (Frankle & Carbin 2019, Figure 5's network) or on
ResNet-20 with late rewinding (Frankle et al. 2020, "Linear mode connectivity and the LTH").

  python tools/bench_lth.py --control ticket        [--rounds 7 --rate 0.2 --epochs 4 --train 10000]
  python tools/bench_lth.py --control reinit
  python tools/bench_lth.py --control random_mask
  python tools/bench_lth.py --table [--plot lth.png]
  python tools/bench_lth.py --model resnet20 --control ticket   # then --control reinit; --table --model resnet20

Conv-2: conv3x3(64) ReLU conv3x3(64) ReLU maxpool2 -> FC 256 ReLU FC 256 ReLU FC 10, trained
from a fixed random initialization (seed 0) with Adam lr 2e-4 (the paper's), batch 60, on the
--train CIFAR-10 training images (a fixed random sample), labels only, no augmentation; scored on all 10,000 test
images. Each round prunes --rate of the surviving weights by one global magnitude threshold and
rewinds the survivors to the initialization (--rewind 0) or to step k. The state after every
round goes to /tmp/graphopt-lth/CONTROL.{npz,json}: rerunning the command continues there.
Results: tools/results/lth.json.

ResNet-20 (--model resnet20; the defaults change to --rounds 4 --rate 0.415 --epochs 2 --train
50000, so that round 4 trains 20.0% of the weights): He et al.'s CIFAR ResNet-20 from torch's
default initialization (seed 0), BatchNorm training, SGD momentum 0.9, lr 0.1 cosine, weight decay
1e-4, batch 128, crop + flip, labels only. Rewinding to the initialization does not find tickets in
deeper networks at a standard learning rate; the survivors rewind to step --rewind, by default 1%
of a round's training (Frankle et al. rewind ResNet-20 to ~2% of it). Round 1 is the dense
network at the same budget, the baseline a ticket has to match. The state goes to
/tmp/graphopt-lth/resnet20-CONTROL-rK.{npz,json}, the results under ``resnet20/`` keys.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from common import cifar10, cifar_augment, cifar_normalize, load_results, ort_top1, save_results, top1_pct, torch_logits

RESULTS = Path(__file__).resolve().parent / "results" / "lth.json"
WORK = Path(tempfile.gettempdir()) / "graphopt-lth"


def conv2():
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * 16 * 16, 256), nn.ReLU(), nn.Linear(256, 256),
                         nn.ReLU(), nn.Linear(256, 10))


def resnet20():
    """ResNet-20 at torch's default initialization (seed 0), its BatchNorm kept (trained)."""
    import torch
    from cifar_resnet import CifarResNet

    torch.manual_seed(0)
    return CifarResNet(20)


# model -> (network at its initialization, rounds, rate, epochs per round, training images)
MODELS = {"conv2": (conv2, 7, 0.2, 4, 10000), "resnet20": (resnet20, 4, 0.415, 2, 50000)}


def config(model: str, epochs: int):
    """The training recipe of one round (the module doc states both)."""
    from graphopt.training.finetune import FinetuneConfig

    if model == "conv2":
        return FinetuneConfig(epochs=epochs, batch_size=60, lr=2e-4, optimizer="adam", kd_weight=0.0)
    return FinetuneConfig(epochs=epochs, batch_size=128, lr=0.1, optimizer="sgd", momentum=0.9, weight_decay=1e-4,
                          kd_weight=0.0, transform=cifar_augment)


def default_rewind(model: str, epochs: int, n_train: int) -> int:
    """Conv-2 rewinds to the initialization (the paper's); ResNet-20 late, to 1% of a round's steps."""
    return 0 if model == "conv2" else max(1, round(0.01 * epochs * (n_train // config(model, epochs).batch_size)))


def key(model: str, control: str, rewind: int) -> str:
    """A run's results key (Conv-2's keep their names from before ResNet-20 joined)."""
    return f"{control}-rewind{rewind}" if model == "conv2" else f"{model}/{control}-rewind{rewind}"


def run(control: str, rounds: int, rate: float, epochs: int, n_train: int, rewind: int,
        model: str = "conv2") -> list[dict]:
    import torch

    import graphopt
    from graphopt.passmanager import PassManager
    from graphopt.training.lottery import lottery_ticket

    xtr_u8, ytr = cifar10("train")
    xt_u8, yt = cifar10("test")
    idx = np.random.default_rng(0).permutation(len(ytr))[:n_train]  # the archive lists the classes in order
    xtr, ytr = cifar_normalize(xtr_u8[idx]), ytr[idx]
    xt = cifar_normalize(xt_u8)
    g = graphopt.from_torch(MODELS[model][0](), torch.zeros(1, 3, 32, 32))
    if model != "conv2":  # (Conv-2's states were written from the graph as imported)
        g = PassManager("canonicalize").run(g).graph
    prefix = "" if model == "conv2" else f"{model}-"

    def score(graph) -> dict[str, float]:
        """Top-1 of the round's network in torch and of its exported ONNX file in onnxruntime."""
        m = graphopt.to_torch(graph).eval()
        out = WORK / f"{prefix}{control}-r{rewind}-round.onnx"
        graphopt.save_onnx(graph, out)
        return {"torch": top1_pct(torch_logits(m, xt, 1000), yt), "onnxruntime": ort_top1(out, xt, yt)}

    WORK.mkdir(parents=True, exist_ok=True)
    return lottery_ticket(g, xtr, ytr, rounds=rounds, rate=rate, rewind_step=rewind, control=control,
                          config=config(model, epochs), evaluate=score, state=WORK / f"{prefix}{control}-r{rewind}",
                          ticket=None if control == "ticket" else WORK / f"{prefix}ticket-r{rewind}")


def table(plot: str | None, model: str = "conv2") -> None:
    from graphopt.training.lottery import format_table, plot_curves

    res = {k.split("/")[-1]: v for k, v in load_results(RESULTS).items() if v.get("model", "conv2") == model}
    if not res:
        print(f"no {model} results yet")
        return
    runs = {k: v["rounds"] for k, v in res.items()}
    epochs = sorted({v["epochs_per_round"] for v in res.values()})
    print(f"{model}: torch top-1 % on the 10,000 test images ({'/'.join(map(str, epochs))} epochs per round, "
          f"{'/'.join(map(str, sorted({v['train_images'] for v in res.values()})))} training images):")
    print(format_table(runs))
    print("\nthe same rounds' exported ONNX files in onnxruntime:")
    print(format_table(runs, key="onnxruntime"))
    if plot:
        title = {"conv2": "Conv-2", "resnet20": "ResNet-20, late rewinding"}[model]
        plot_curves(plot, runs, title=f"{title} on CIFAR-10: winning ticket vs controls", ylabel="test top-1 %")
        print(f"wrote {plot}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--control", choices=("ticket", "reinit", "random_mask"))
    ap.add_argument("--model", choices=tuple(MODELS), default="conv2")
    ap.add_argument("--rounds", type=int, help="default: conv2 7, resnet20 4")
    ap.add_argument("--rate", type=float, help="pruned per round; default: conv2 0.2, resnet20 0.415")
    ap.add_argument("--epochs", type=int, help="epochs per round (the table states them); default: conv2 4, resnet20 2")
    ap.add_argument("--train", type=int, help="training images; default: conv2 10000, resnet20 50000")
    ap.add_argument("--rewind", type=int, help="rewind step (0: the initialization); default: conv2 0, "
                    "resnet20 1%% of a round's steps")
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--plot")
    args = ap.parse_args()
    if args.table:
        table(args.plot, args.model)
        return 0
    if not args.control:
        ap.error("--control is required (or --table)")
    _, rounds, rate, epochs, n_train = MODELS[args.model]
    rounds, rate, epochs = args.rounds or rounds, args.rate or rate, args.epochs or epochs
    n_train = args.train or n_train
    rewind = default_rewind(args.model, epochs, n_train) if args.rewind is None else args.rewind
    rows = run(args.control, rounds, rate, epochs, n_train, rewind, args.model)
    res = load_results(RESULTS)
    res[key(args.model, args.control, rewind)] = {"rounds": rows, "epochs_per_round": epochs, "rate": rate,
                                                  "train_images": n_train, "rewind_step": rewind, "model": args.model}
    save_results(RESULTS, res)
    for r in rows:
        ort = (r.get("scores") or {}).get("onnxruntime")
        print(f"round {r['round']}: {100 * r['remaining']:.1f}% remaining, top-1 {r['score']:.2f}"
              + ("" if ort is None else f" (onnxruntime {ort:.2f})"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
