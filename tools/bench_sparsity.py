"""Fine-grained sparsity on ResNet-20 / CIFAR-10, one resumable row at a time, with the torch
peers trained by the same recipe.

  python tools/bench_sparsity.py --row gmp-80 [--epochs 3]   # train (or resume) one row
                                                             # (another budget: key gmp-80@Nep)
  python tools/bench_sparsity.py --tune gmp-90             # choose its lr and schedule on the
                                                             # validation split (the recipe of gmp-90-tuned)
  python tools/bench_sparsity.py --list
  python tools/bench_sparsity.py --table

Every row starts from the pretrained FP32 weights (87.79) and fine-tunes with graphopt's recipe
(SGD momentum 0.9, cosine from --lr 0.01, weight decay 1e-4, batch 128, crop + flip, loss = 0.5
distillation from the FP32 model at T = 4 + 0.5 cross-entropy), BatchNorm unfolded and training.
It reports top-1 on all 10,000 test images: right after pruning at the final sparsity (no
training), after fine-tuning through torch, and through onnxruntime on the exported file, with
the sparsity of the export and its compressed size (graphopt inspect --sparsity's encodings).

* gmp-S: global gradual magnitude pruning to S% (prune-gradual{final=S,end=0.75,frequency=50}).
* layer-80: the same schedule with one sparsity per layer.
* ROW-tuned: ROW with the learning rate and the schedule's end that --tune ROW chose on the
  validation split (2,000 CIFAR-10 training images; the candidates train on the other 48,000).
* nm-2:4: prune-nm{n=2,m=4} (the 3-channel stem stays dense), then fine-tuning.
* nm-2:4-int8: that, then the int8 preset's quantize (per-channel W8, uint8 activations).
* torch-global-S: torch.nn.utils.prune.global_unstructured (L1, one shot), same fine-tuning.
* torch-ao-2:4: torch.ao.pruning.WeightNormSparsifier (2:4 blocks along the input channels),
  one shot, then the same fine-tuning with its masks.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import (
    agree_pct,
    base_of,
    cifar10,
    cifar_augment,
    cifar_normalize,
    cifar_val,
    key_of,
    load_results,
    ort_logits,
    outside_val,
    save_results,
    top1_pct,
    torch_logits,
    train_timing,
    tune_best,
    tune_candidate,
    tune_record,
    tune_widen,
    with_budgets,
)

RESULTS = Path(__file__).resolve().parent / "results" / "sparsity.json"
SHARED_LR = 0.01  # the shared recipe's rate (--lr's default)
WORK = Path(tempfile.gettempdir()) / "graphopt-sparsity"
# rows whose training is another row's: they resume (and so reuse) its fine-tuned checkpoint
TRAINS_AS = {"nm-2:4-int8": "nm-2:4"}
FT = "finetune{{epochs={epochs},batch_size=128,lr={lr},weight_decay=0.0001,kd_weight=0.5,temperature=4,checkpoint={ck}," \
     "resume=true}}"
# row -> (graphopt pipeline before fine-tuning, final sparsity for the "after pruning" column, after fine-tuning, what)
ROWS = {
    "gmp-50": ("prune-gradual{final=0.5,end=0.75,frequency=50}", "prune-weights{sparsity=0.5}", "", "global gradual 50%"),
    "gmp-70": ("prune-gradual{final=0.7,end=0.75,frequency=50}", "prune-weights{sparsity=0.7}", "", "global gradual 70%"),
    "gmp-80": ("prune-gradual{final=0.8,end=0.75,frequency=50}", "prune-weights{sparsity=0.8}", "", "global gradual 80%"),
    "gmp-90": ("prune-gradual{final=0.9,end=0.75,frequency=50}", "prune-weights{sparsity=0.9}", "", "global gradual 90%"),
    "gmp-90-tuned": ("prune-gradual{final=0.9,end=0.75,frequency=50}", "prune-weights{sparsity=0.9}", "",
                     "global gradual 90%, lr and end chosen by --tune gmp-90"),
    "oneshot-80": ("prune-weights{sparsity=0.8}", "prune-weights{sparsity=0.8}", "",
                   "global one-shot 80%, then fine-tuning (the torch-global-80 peer's recipe)"),
    "layer-80": ("prune-gradual{final=0.8,end=0.75,frequency=50,scope=layer}", "prune-weights{sparsity=0.8,scope=layer}",
                 "", "layer-wise gradual 80%"),
    "nm-2:4": ("prune-nm{n=2,m=4}", "prune-nm{n=2,m=4}", "", "2:4 along input channels"),
    "nm-2:4-int8": ("prune-nm{n=2,m=4}", "prune-nm{n=2,m=4}", "fold-bn,quantize{weights=int8:channel,acts=uint8:tensor}",
                    "2:4, then int8 PTQ"),
}
# ROW-tuned -> ROW: the recipe (lr, the gradual schedule's end) comes from --tune ROW's record
# (the peer's -tuned row trains at the learning rate chosen for graphopt's row: one shot, no schedule)
TUNED = {"gmp-90-tuned": "gmp-90", "torch-global-90-tuned": "gmp-90"}
PEERS = {"torch-global-80": 0.8, "torch-global-90": 0.9, "torch-global-90-tuned": 0.9, "torch-ao-2:4": None}

FP32 = 87.79  # the pretrained ResNet-20's top-1 (../shared/models/README)


def _export_stats(g) -> dict:
    from graphopt.passes.sparsity import sparsity_report

    rep = sparsity_report(g)
    p, nz = sum(r["params"] for r in rep), sum(r["nonzero"] for r in rep)
    enc = sum(r["stored_bits"] for r in rep)
    return {"sparsity": round(1 - nz / p, 4), "nonzero_macs": round(sum(r["nonzero_macs"] for r in rep) /
                                                                  sum(r["macs"] for r in rep), 4),
            "compressed_mb": round(enc / 8e6, 4), "dense_mb": round(p * 4 / 1e6, 4)}


def _file(row: str, epochs: int, suffix: str) -> Path:
    """Where a row's checkpoint or export lives at a budget (``nm-2_4@20ep.pt``)."""
    WORK.mkdir(parents=True, exist_ok=True)
    return WORK / f"{key_of(row, epochs).replace(':', '_')}{suffix}"


def run_row(row: str, epochs: int, lr: float, limit: int | None) -> dict:
    import onnx
    import torch
    from cifar_resnet import resnet_cifar

    import graphopt
    from graphopt.backends.lowering import export_file
    from graphopt.passmanager import Context, PassManager, TrainingData

    prune, oneshot, after, _ = ROWS[row]
    if row in TUNED:
        recipe = tuned_recipe(row)
        lr, prune = recipe["lr"], with_end(prune, recipe["end"])
    xtr_u8, ytr = cifar10("train")
    xt_u8, yt = cifar10("test")
    xtr, xt = cifar_normalize(xtr_u8[:limit]), cifar_normalize(xt_u8)
    ytr = ytr[:limit]
    g = graphopt.from_torch(resnet_cifar(20), torch.zeros(1, 3, 32, 32))
    g = PassManager("canonicalize").run(g).graph
    WORK.mkdir(parents=True, exist_ok=True)
    shot = PassManager(oneshot).run(g.copy()).graph
    before = top1_pct(torch_logits(graphopt.to_torch(shot).eval(), xt), yt)
    calib = xtr[np.random.default_rng(0).permutation(len(xtr))[:512]]
    pipe = prune + "," + FT.format(epochs=epochs, lr=lr, ck=_file(TRAINS_AS.get(row, row), epochs, ".pt"))
    if after:
        pipe += "," + after
    t = time.perf_counter()
    r = PassManager(pipe).run(g.copy(), Context(calib=calib, train=TrainingData(xtr, ytr, cifar_augment), teacher=g.copy()))
    secs = time.perf_counter() - t
    q = r.graph
    sim = torch_logits(graphopt.to_torch(q).eval(), xt)
    out = _file(row, epochs, ".onnx")
    if after:
        export_file(q, out, "qdq")
    else:
        graphopt.save_onnx(q, out)
        onnx.checker.check_model(str(out), full_check=True)
    ort = ort_logits(out, xt)
    return {"pipeline": pipe, "epochs": epochs, "after_pruning": before, "torch_top1": top1_pct(sim, yt),
            "ort_top1": top1_pct(ort, yt), "agree": agree_pct(sim, ort),
            **train_timing(secs, r.stats.get("finetune", [{}])[0].get("epochs", 0),
                           load_results(RESULTS).get(key_of(row, epochs), {})),
            "train_images": len(xtr), **_export_stats(q), "lr": lr, "chosen_on": chosen_on(row, lr=lr)}


# --tune ROW: the learning rate, then the gradual schedule's end (the share of training that
# prunes; the rest recovers at the final sparsity), chosen on the validation split. Each candidate
# trains on the 48,000 training images outside the split for --tune-epochs (default 2: the
# schedule needs room to prune and recover) and is scored in torch on the split. The current
# recipe comes first in each stage and keeps its place on a tie.
TUNE_LRS = (SHARED_LR, 0.003, 0.03, 0.1, 0.3)  # the best rate kept landing on the grid's edge: 0.1 and 0.3 bracket it
# (common.tune_widen now widens a grid whose best is on its edge by itself, a factor 3 at a time)
TUNE_ENDS = (0.75, 0.5)


def tune(row: str, epochs: int = 2) -> dict:
    """Score TUNE_LRS at the row's end, then TUNE_ENDS at the best rate, for a gradual row on the
    validation split; record the choice as ``tune/ROW`` (each candidate as it finishes)."""
    import torch
    from cifar_resnet import resnet_cifar

    import graphopt
    from graphopt.passmanager import Context, PassManager, TrainingData

    gradual = [r for r in ROWS if r.startswith("gmp-") and r not in TUNED]
    if row not in gradual:
        raise SystemExit(f"--tune takes a global gradual row: {', '.join(gradual)}")
    xv, yv = cifar_val()
    calib, xk, yk = outside_val()
    g0 = PassManager("canonicalize").run(graphopt.from_torch(resnet_cifar(20), torch.zeros(1, 3, 32, 32))).graph
    key = f"tune/{row}"
    rec = tune_record(RESULTS, key, epochs, train_images=len(yk), rule=(
        f"top-1 on the validation split (torch) after {epochs} epoch(s) on the training images outside it, "
        "for lr, then for the gradual schedule's end at that lr"))
    work = WORK / "tune"
    work.mkdir(parents=True, exist_ok=True)

    def run(lr: float, end: float) -> dict:
        name = f"lr={lr},end={end}"
        pipe = (with_end(ROWS[row][0], end) + "," +
                FT.format(epochs=epochs, lr=lr, ck=work / f"{row}-lr{lr}-end{end}-{epochs}ep.pt"))

        def score() -> float:
            ctx = Context(calib=calib, train=TrainingData(xk, yk, cifar_augment), teacher=g0.copy())
            q = PassManager(pipe).run(g0.copy(), ctx).graph
            return top1_pct(torch_logits(graphopt.to_torch(q).eval(), xv), yv)

        return tune_candidate(RESULTS, key, rec, name, {"lr": lr, "end": end}, epochs, score)

    lr = tune_widen(key, rec, [run(lr, TUNE_ENDS[0]) for lr in TUNE_LRS], "lr", 3, lambda lr, _: run(lr, TUNE_ENDS[0]))["lr"]
    end = tune_best(key, rec, [run(lr, end) for end in TUNE_ENDS])["end"]
    rec["chosen"] = {"end": end, "lr": lr}  # in the order the file stores it (sorted), so chosen_on reads the same
    res = load_results(RESULTS)
    res[key] = rec
    for k, r in res.items():  # every measured row learns which data chose its recipe
        if (base_of(k) in ROWS or base_of(k) in PEERS) and "epochs" in r and not k.startswith("tune/"):
            r["chosen_on"] = chosen_on(base_of(k), res, r.get("lr", SHARED_LR))
    save_results(RESULTS, res)
    print(f"{key}: chose {rec['chosen']}", flush=True)
    return rec


def with_end(prune: str, end: float) -> str:
    """A gradual row's pruning step with its schedule ending at ``end`` instead of the shared 0.75."""
    assert "end=0.75" in prune, prune
    return prune.replace("end=0.75", f"end={end}")


def tuned_recipe(row: str) -> dict:
    """The recipe ``--tune`` chose for a tuned row's base row ({"lr", "end"})."""
    rec = load_results(RESULTS).get(f"tune/{TUNED[row]}", {})
    if "chosen" not in rec:
        raise SystemExit(f"{row}: no recipe chosen yet; run python tools/bench_sparsity.py --tune {TUNED[row]} first")
    return rec["chosen"]


def chosen_on(row: str, res: dict | None = None, lr: float = SHARED_LR) -> str:
    """Which data chose what a row runs: a tuned row's recipe comes from --tune on the validation
    split; the other rows run the shared recipe (lr 0.01, end 0.75), which --tune may have judged,
    or the rate ``lr`` that --lr set by hand."""
    res = load_results(RESULTS) if res is None else res
    base = TUNED.get(row, row)
    rec = res.get(f"tune/{base}", {})
    if row not in TUNED and lr != SHARED_LR:
        return f"lr {lr} set by hand (--lr); nothing chosen on data"
    if row in PEERS and row not in TUNED:
        return f"the shared recipe (lr {SHARED_LR}); nothing chosen on data"
    if "chosen" not in rec:
        return f"the shared recipe (lr {SHARED_LR}, end 0.75); nothing chosen on data"
    how = f"{rec['rule']} on {rec['chosen_on']}"
    if row in TUNED:
        return f"recipe {rec['chosen']} chosen by {how}"
    own = rec["chosen"] == {"lr": TUNE_LRS[0], "end": TUNE_ENDS[0]}
    return (f"the shared recipe: {'the' if own else 'NOT the'} --tune choice ({rec['chosen']}), {how}"
            + ("" if own else f"; see {row}-tuned"))


def run_peer(row: str, epochs: int, lr: float, limit: int | None) -> dict:
    import torch
    from cifar_resnet import resnet_cifar
    from peers.train_loop import train
    from torch import nn

    import graphopt

    xtr_u8, ytr = cifar10("train")
    xt_u8, yt = cifar10("test")
    xtr, xt = cifar_normalize(xtr_u8[:limit]), cifar_normalize(xt_u8)
    ytr = ytr[:limit]
    if row in TUNED:
        lr = tuned_recipe(row)["lr"]
    teacher, model = resnet_cifar(20), resnet_cifar(20)
    layers = [(m, "weight") for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    t = time.perf_counter()
    if row.startswith("torch-global"):
        import torch.nn.utils.prune as tp

        tp.global_unstructured(layers, pruning_method=tp.L1Unstructured, amount=PEERS[row])
        before = top1_pct(torch_logits(model.eval(), xt), yt)
        ran = train(model, teacher, xtr, ytr, cifar_augment, epochs=epochs, lr=lr,
                    checkpoint=_file(row, epochs, ".pt"))["epochs"]
        for m, name in layers:
            tp.remove(m, name)
    else:
        from torch.ao.pruning import WeightNormSparsifier

        sp = WeightNormSparsifier(sparsity_level=1.0, sparse_block_shape=(1, 4), zeros_per_block=2)
        sp.prepare(model, [{"tensor_fqn": f"{n}.weight"} for n, m in model.named_modules()
                           if isinstance(m, nn.Conv2d) and m.in_channels % 4 == 0])
        try:
            sp.step()
        except Exception as e:  # the peer's limitation is a result
            return {"pipeline": row, "epochs": epochs, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
        before = top1_pct(torch_logits(model.eval(), xt), yt)
        ran = train(model, teacher, xtr, ytr, cifar_augment, epochs=epochs, lr=lr,
                    checkpoint=_file(row, epochs, ".pt"))["epochs"]
        sp.squash_mask()
    secs = time.perf_counter() - t
    model.eval()
    sim = torch_logits(model, xt)
    g = graphopt.from_torch(model, torch.zeros(1, 3, 32, 32))
    out = _file(row, epochs, ".onnx")
    graphopt.save_onnx(g, out)
    ort = ort_logits(out, xt)
    return {"pipeline": row, "lr": lr, "epochs": epochs, "after_pruning": before, "torch_top1": top1_pct(sim, yt),
            "ort_top1": top1_pct(ort, yt), "agree": agree_pct(sim, ort),
            **train_timing(secs, ran, load_results(RESULTS).get(key_of(row, epochs), {})),
            "train_images": len(xtr), **_export_stats(g),
            "chosen_on": chosen_on(row, lr=lr)}


def table() -> None:
    res = load_results(RESULTS)
    print("| row | what | epochs | sparsity | top-1 after pruning | after fine-tuning (torch) | onnxruntime | "
          "nonzero MACs | compressed MB (dense) | s/epoch |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in with_budgets([*ROWS, *PEERS], res):
        r, base = res.get(row), base_of(row)
        if r and "error" in r:
            print(f"| {row} | peer | {r['epochs']} | - | fails: {r['error']} | - | - | - | - | - |")
        elif r:
            what = ROWS[base][3] if base in ROWS else f"peer, lr chosen by --tune {TUNED[base]}" if base in TUNED else "peer"
            print(f"| {row} | {what} | {r['epochs']} | {100 * r['sparsity']:.1f}% | {r['after_pruning']:.2f} | "
                  f"{r['torch_top1']:.2f} | {r['ort_top1']:.2f} | {100 * r['nonzero_macs']:.1f}% | "
                  f"{r['compressed_mb']:.3f} ({r['dense_mb']:.3f}) | {r['s_per_epoch']} |")


def plot(path: Path) -> None:
    """Top-1 through onnxruntime against the share of weights remaining: graphopt's global gradual
    rows as a curve, the other rows and the peers as points, FP32 as a line."""
    from graphopt.plotting import pyplot, save_png

    plt = pyplot("--plot")

    res = {k: r for k, r in load_results(RESULTS).items() if "error" not in r and not k.startswith("tune/")}
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.axhline(FP32, color="0.5", ls="--", lw=1, label=f"FP32 {FP32}")
    # other budgets and tuned recipes: points of their own
    longer = {k: res.pop(k) for k in [k for k in res if "@" in k or base_of(k) in TUNED]}
    gmp = sorted((r["sparsity"], r["ort_top1"]) for k, r in res.items() if k.startswith("gmp-"))
    if gmp:
        ax.plot([100 * (1 - s) for s, _ in gmp], [a for _, a in gmp], "o-", label="graphopt global gradual")
    marks = {"oneshot": ("s", "graphopt global one-shot"), "layer": ("^", "graphopt layer-wise gradual"),
             "nm": ("D", "graphopt N:M"), "torch-global": ("x", "torch.nn.utils.prune global L1")}
    for prefix, (m, label) in marks.items():
        pts = [(100 * (1 - r["sparsity"]), r["ort_top1"]) for k, r in res.items()
               if k.startswith(prefix + "-") and not k.endswith("int8")]
        if pts:
            ax.scatter(*zip(*pts), marker=m, s=50, label=label, zorder=3)
    for k, r in longer.items():
        ax.scatter(100 * (1 - r["sparsity"]), r["ort_top1"], marker="X" if base_of(k) in PEERS else "*", s=90, zorder=4,
                   label=f"{base_of(k)}, {r['epochs']} epochs")
    ax.invert_xaxis()
    ax.set_xlabel("weights remaining (%)")
    ax.set_ylabel("top-1 on 10,000 test images (onnxruntime)")
    epochs = "/".join(str(e) for e in sorted({r["epochs"] for r in res.values()}))
    ax.set_title(f"ResNet-20 / CIFAR-10, fine-tuned {epochs} epochs per row" + (f" (stars, X: {'/'.join(str(e) for e in sorted({r['epochs'] for r in longer.values()}))} epochs)" if longer else ""), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path, dpi=120)
    print(f"wrote {path}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--row")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=SHARED_LR)
    ap.add_argument("--limit", type=int, default=None, help="train on the first N images (smoke runs; not saved)")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--plot", metavar="FILE.png", help="draw top-1 against the weights remaining for every row")
    ap.add_argument("--tune", metavar="ROW", help="choose a gradual row's lr and schedule end on the validation split "
                    "(the recipe of ROW-tuned)")
    ap.add_argument("--tune-epochs", type=int, default=2, help="--tune: epochs per candidate (default %(default)s)")
    args = ap.parse_args()
    if args.tune:
        tune(args.tune, args.tune_epochs)
        return 0
    if args.plot:
        plot(Path(args.plot))
        return 0
    if args.list:
        for row, (p, _, a, what) in ROWS.items():
            if row in TUNED:  # its end (and lr) as --tune chose them, once it has
                chosen = load_results(RESULTS).get(f"tune/{TUNED[row]}", {}).get("chosen")
                p = with_end(p, chosen["end"]) + f" (lr {chosen['lr']})" if chosen else p + " (end and lr: not chosen yet)"
            print(f"{row:14s} {what}: {p},finetune{{...}}" + (f",{a}" if a else ""))
        for row in PEERS:
            print(f"{row:14s} peer")
        return 0
    if args.table:
        table()
        return 0
    if args.row not in ROWS and args.row not in PEERS:
        ap.error(f"--row must be one of {', '.join([*ROWS, *PEERS])}")
    if args.limit:  # a smoke run: its own checkpoints (a real run must not resume from them)
        global WORK
        WORK = WORK / "smoke"
    result = (run_peer if args.row in PEERS else run_row)(args.row, args.epochs, args.lr, args.limit)
    print(json.dumps({key_of(args.row, args.epochs): result}))
    if args.limit is None:
        res = load_results(RESULTS)
        res[key_of(args.row, args.epochs)] = result
        save_results(RESULTS, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
