"""Deep Compression (Han, Mao & Dally 2016) on ResNet-20 / CIFAR-10 and EfficientNet-Lite0:
pruning, k-means weight sharing with trained centroids, Huffman coding; one resumable row at a
time, with the peers in the same run.

  python tools/bench_compress.py --choose                 # centroid learning rate, on the validation split
  python tools/bench_compress.py --row prune80-km4 [--epochs 3 --km-epochs 1]
  python tools/bench_compress.py --effnet                  # post-training rows + coremltools + w4a8
  python tools/bench_compress.py --ort                     # load time, memory, latency, what onnxruntime folds
  python tools/bench_compress.py --list | --table | --plot docs/img/compress_pareto.png

**ResNet-20** rows start from the pretrained FP32 weights (87.79). Pruning is the sparsity
benchmark's ``gmp`` recipe (prune-gradual to the final sparsity over the first 75% of the steps,
SGD momentum 0.9, cosine from 0.01, weight decay 1e-4, batch 128, crop + flip, 0.5
distillation from the FP32 model at T = 4 + 0.5 cross-entropy) for --epochs epochs. Then
BatchNorm is folded, the weights are clustered (``quantize{weights=kmeans<b>,acts=float}``:
one codebook per layer, linear start; the classifier at its own width as the paper's FC
layers) and the centroids are fine-tuned for --km-epochs with the same recipe at the learning
rate ``--choose`` picked on the validation split (CIFAR-10 training images 512-2511 of the
seed-0 permutation; the test images only score). Rows that share a pruning stage resume its
checkpoint. Per row: top-1 on all 10,000 test images in torch (the simulation), in
onnxruntime on the palettized ONNX and on the model decoded from the ``.gdc`` file (they must
agree), the weights' compression ratio against FP32 (fixed width P+Q, and with Huffman P+Q+H),
and the file sizes (.gdc, palettized ONNX, FP32 ONNX and its gzip -9).

**EfficientNet-Lite0** (no training set here): post-training k-means at 4, 5 and 6 bits per
layer (the start, linear or k-means++, chosen by top-1 on the 128 calibration images), then
bias correction (empirical, on the same images), scored on the other 372 imagenet-sample
images; coremltools' ``PostTrainingPalettizer`` at the same bits and granularity (per tensor,
k-means) on the same torch model as its users run it (BatchNorm beside the palettized convs)
and on the BN-folded weights graphopt clusters, scored through torch the same way; a 4-bit
per-output-channel row against coremltools' grouped-channel mode; and the uniform ``w4a8``
preset.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import (
    VAL_SPLIT,
    agree_pct,
    cifar10,
    cifar_augment,
    cifar_normalize,
    cifar_val,
    fp32_file,
    load_results,
    ort_logits,
    ptq_data,
    save_results,
    top1_pct,
    torch_logits,
)

RESULTS = Path(__file__).resolve().parent / "results" / "compress.json"
WORK = Path(tempfile.gettempdir()) / "graphopt-compress"
FP32 = 87.79
FT = ("finetune{{epochs={epochs},batch_size=128,lr={lr},optimizer={opt},weight_decay=0.0001,kd_weight=0.5,"
      "temperature=4,checkpoint={ck},resume=true}}")
PRUNE = {"prune80": "prune-gradual{final=0.8,end=0.75,frequency=50}",
         "prune90": "prune-gradual{final=0.9,end=0.75,frequency=50}"}
# row -> (pruning stage or None, weight sharing after fold-bn or None, what)
ROWS = {
    "prune-80": ("prune80", None, "prune only, 80% (global gradual)"),
    "kmeans4": (None, "weights=kmeans4,acts=float", "k-means 4-bit only (classifier too), centroids fine-tuned"),
    "kmeans4-post": (None, "weights=kmeans4,acts=float", "k-means 4-bit only, no fine-tuning (post-training)"),
    "prune80-km4": ("prune80", "weights=kmeans4,acts=float,last_bits=5",
                    "prune 80% + k-means (conv 4-bit, classifier 5-bit) + Huffman"),
    "prune80-km3": ("prune80", "weights=kmeans3,acts=float,last_bits=4", "prune 80% + k-means (conv 3, classifier 4)"),
    "prune80-km2": ("prune80", "weights=kmeans2,acts=float,last_bits=3", "prune 80% + k-means (conv 2, classifier 3)"),
    "prune80-km4-int8": ("prune80", "weights=kmeans4:int8,acts=uint8:tensor,last_bits=5",
                         "prune 80% + k-means 4/5-bit on int8 grids, uint8 activations (QLinearConv runs)"),
    "prune90-km3": ("prune90", "weights=kmeans3,acts=float,last_bits=4", "prune 90% + k-means (conv 3, classifier 4)"),
    "int4-gptq": (None, "weights=int4:channel,acts=float,weight_method=gptq",
                  "uniform int4 per channel + GPTQ, weight-only, post-training (the zoo's answer)"),
}
# (optimizer, learning rate) for the centroids. A centroid's gradient is the sum of its members'
# (thousands of weights), so SGD needs rates far below the weights' own; Adam is scale-free.
LR_CHOICES = (("sgd", 1e-3), ("sgd", 1e-4), ("sgd", 1e-5), ("sgd", 1e-6), ("adam", 1e-4), ("adam", 1e-5))


def _lr(res: dict) -> tuple[str, float, str]:
    """The centroid optimizer and learning rate --choose picked (and on what), or Adam 1e-5
    until it has run."""
    c = res.get("choose/centroid_lr")
    if c:
        opt, lr = c["chosen"].split(":")
        return opt, float(lr), VAL_SPLIT
    return "adam", 1e-5, "not chosen yet (adam 1e-5)"


def _files(q, name: str, fmt: str) -> dict:
    """Export ``q``, write its .gdc, decode it back; sizes and the paths to score."""
    import onnx

    from graphopt import compressed
    from graphopt.backends.lowering import export_file

    out = WORK / f"{name}.onnx"
    export_file(q, out, fmt)
    model = onnx.load(str(out))
    rows = compressed.report(model)
    gdc = WORK / f"{name}.gdc"
    t = time.perf_counter()
    size = compressed.write(model, gdc)
    enc_s = time.perf_counter() - t
    t = time.perf_counter()
    decoded = compressed.dense_model(compressed.read(gdc))
    dec_s = time.perf_counter() - t
    dec_path = WORK / f"{name}.decoded.onnx"
    dec_path.write_bytes(decoded.SerializeToString())
    n = sum(r.weights for r in rows)
    return {"out": out, "decoded": dec_path, "layers": [r.__dict__ for r in rows],
            "ratio_pq": round(32 * n / sum(r.bits for r in rows), 2),
            "ratio_pqh": round(32 * n / sum(r.bits_h for r in rows), 2),
            "kept": round(sum(r.kept for r in rows) / n, 4), "weights": n,
            "gdc_kb": round(size / 1e3, 1), "onnx_kb": round(out.stat().st_size / 1e3, 1),
            "encode_s": round(enc_s, 2), "decode_s": round(dec_s, 2)}


def run_row(row: str, epochs: int, km_epochs: int, limit: int | None) -> dict:
    import torch
    from cifar_resnet import resnet_cifar

    import graphopt
    from graphopt.passmanager import Context, PassManager, TrainingData

    prune, share, what = ROWS[row]
    res = load_results(RESULTS)
    opt, lr, lr_on = _lr(res)
    xtr_u8, ytr = cifar10("train")
    xt_u8, yt = cifar10("test")
    xtr, xt, ytr = cifar_normalize(xtr_u8[:limit]), cifar_normalize(xt_u8), ytr[:limit]
    calib = ptq_data("resnet20")[0]
    g = PassManager("canonicalize").run(graphopt.from_torch(resnet_cifar(20), torch.zeros(1, 3, 32, 32))).graph
    WORK.mkdir(parents=True, exist_ok=True)
    pipe = []
    if prune:
        pipe += [PRUNE[prune], FT.format(epochs=epochs, lr=0.01, opt="sgd", ck=WORK / f"{prune}.pt")]
    pipe.append("fold-bn")
    trained = 0
    if share:
        pipe.append(f"quantize{{{share}}}")
        if share.startswith("weights=kmeans") and not row.endswith("-post"):
            pipe.append(FT.format(epochs=km_epochs, lr=lr, opt=opt, ck=WORK / f"{row}.pt"))
            trained = km_epochs
    text = ",".join(pipe)
    t = time.perf_counter()
    q = PassManager(text).run(g.copy(), Context(calib=calib, train=TrainingData(xtr, ytr, cifar_augment),
                                                teacher=g.copy())).graph
    secs = time.perf_counter() - t
    f = _files(q, row, "qdq" if share else "float")
    sim = torch_logits(graphopt.to_torch(q).eval(), xt)
    ort = ort_logits(f.pop("out"), xt)
    dec = ort_logits(f.pop("decoded"), xt)
    fp32 = fp32_file("resnet20").read_bytes()
    return {"what": what, "pipeline": text, "prune_epochs": epochs if prune else 0, "centroid_epochs": trained,
            "centroid_lr": f"{opt}:{lr:g}" if trained else None, "chosen_on": lr_on if trained else "the paper's recipe",
            "torch_top1": top1_pct(sim, yt), "ort_top1": top1_pct(ort, yt), "decoded_top1": top1_pct(dec, yt),
            "agree_decoded": agree_pct(ort, dec), "max_abs_diff_decoded": float(np.abs(ort - dec).max()),
            "agree_torch": agree_pct(sim, ort), "fp32_kb": round(len(fp32) / 1e3, 1),
            "fp32_gzip_kb": round(len(gzip.compress(fp32, 9)) / 1e3, 1), "wall_s": round(secs, 1),
            "train_images": len(xtr), **f}


def choose(steps: int = 200) -> dict:
    """The centroid optimizer and learning rate: post-training k-means 4-bit from the FP32
    weights, then ``steps`` fine-tuning steps with each choice on the training images outside the
    validation split; the best validation top-1 wins."""
    import torch
    from cifar_resnet import resnet_cifar

    import graphopt
    from graphopt.passmanager import Context, PassManager, TrainingData

    xv, yv = cifar_val()
    xtr_u8, ytr = cifar10("train")
    perm = np.random.default_rng(0).permutation(len(ytr))
    keep = np.setdiff1d(np.arange(len(ytr)), perm[512:2512])
    g = PassManager("canonicalize").run(graphopt.from_torch(resnet_cifar(20), torch.zeros(1, 3, 32, 32))).graph
    ctx = Context(train=TrainingData(cifar_normalize(xtr_u8[keep]), ytr[keep], cifar_augment), teacher=g.copy())
    scores = {}
    post = PassManager("fold-bn,quantize{weights=kmeans4,acts=float}").run(g.copy(), ctx).graph
    scores["untrained"] = top1_pct(torch_logits(graphopt.to_torch(post).eval(), xv), yv)
    for opt, lr in LR_CHOICES:
        pipe = (f"fold-bn,quantize{{weights=kmeans4,acts=float}},finetune{{epochs=1,max_steps={steps},batch_size=128,"
                f"lr={lr},optimizer={opt},weight_decay=0.0001,kd_weight=0.5,temperature=4}}")
        q = PassManager(pipe).run(g.copy(), ctx).graph
        key = f"{opt}:{lr:g}"
        scores[key] = top1_pct(torch_logits(graphopt.to_torch(q).eval(), xv), yv)
        print(f"{key}: validation top-1 {scores[key]:.2f}", flush=True)
    best = max((k for k in scores if k != "untrained"), key=scores.get)
    rec = {"val_top1": scores, "steps": steps, "chosen": best, "chosen_on": VAL_SPLIT,
           "rule": f"validation top-1 after {steps} centroid fine-tuning steps from post-training kmeans4"}
    res = load_results(RESULTS)
    res["choose/centroid_lr"] = rec
    save_results(RESULTS, res)
    print(json.dumps(rec))
    return rec


def run_effnet() -> dict:
    """Post-training k-means at 4/5/6 bits per tensor (+ bias correction) with the start (linear or
    k-means++) chosen by top-1 on the 128 calibration images, coremltools' palettizer at the same
    bits and granularity on the same torch model, a per-output-channel 4-bit row against
    coremltools' grouped-channel mode, and the w4a8 preset; all scored on the 372 held-out images."""
    import graphopt
    from graphopt.models.efficientnet_lite import efficientnet_lite0
    from graphopt.passmanager import Context, PassManager
    from graphopt.pipeline import presets

    xc, yc, xt, yt = ptq_data("effnet")
    src = fp32_file("effnet")
    fp32 = src.read_bytes()
    g = graphopt.load_onnx(str(src))
    WORK.mkdir(parents=True, exist_ok=True)
    out = {"fp32": {"ort_top1": top1_pct(ort_logits(src, xt), yt), "fp32_kb": round(len(fp32) / 1e3, 1),
                    "fp32_gzip_kb": round(len(gzip.compress(fp32, 9)) / 1e3, 1)}}
    print("fp32", out["fp32"], flush=True)

    def ours(name: str, scheme: str, bc: bool, chosen: dict | None = None) -> None:
        pipe = f"canonicalize,fold-bn,quantize{{weights={scheme},acts=float}}" + (",correct-bias" if bc else "")
        t = time.perf_counter()
        q = PassManager(pipe).run(g.copy(), Context(calib=xc)).graph
        secs = time.perf_counter() - t
        f = _files(q, name, "qdq")
        ort, dec = ort_logits(f.pop("out"), xt), ort_logits(f.pop("decoded"), xt)
        sim = torch_logits(graphopt.to_torch(q).eval(), xt, 50)
        f.pop("layers")
        out[name] = {"pipeline": pipe, "torch_top1": top1_pct(sim, yt), "ort_top1": top1_pct(ort, yt),
                     "decoded_top1": top1_pct(dec, yt), "agree_decoded": agree_pct(ort, dec),
                     "convert_s": round(secs, 1), **(chosen or {}), **f}
        print(name, out[name], flush=True)

    def peer(name: str, cfg: dict, what: str, folded: bool = False) -> None:
        """coremltools on the torch model as its users run it (BatchNorm kept beside the palettized
        convs: the palette is shared before each channel's BN scale) or, ``folded``, on the same
        BN-folded weights graphopt clusters (torch.fx's conv-BN fusion)."""
        from coremltools.optimize.torch.palettization import PostTrainingPalettizer, PostTrainingPalettizerConfig
        from torch.fx.experimental.optimization import fuse

        m = efficientnet_lite0().eval()
        if folded:
            m, what = fuse(m).eval(), what + ", BN folded first"
        t = time.perf_counter()
        pm = PostTrainingPalettizer(m, PostTrainingPalettizerConfig.from_dict({"global_config": cfg})).compress()
        secs = time.perf_counter() - t
        out[name] = {"peer": f"coremltools PostTrainingPalettizer {what}",
                     "torch_top1": top1_pct(torch_logits(pm.eval(), xt, 50), yt), "convert_s": round(secs, 1),
                     "note": "its compact form exists only in Core ML; no ONNX to score or size"}
        print(name, out[name], flush=True)

    for bits in (4, 5, 6):
        # the start, chosen on the calibration images (never on the 372 scored ones)
        cal = {}
        for init in ("linear", "kpp"):
            q = PassManager(f"canonicalize,fold-bn,quantize{{weights=kmeans{bits}:{init},acts=float}}").run(
                g.copy(), Context(calib=xc)).graph
            cal[init] = top1_pct(torch_logits(graphopt.to_torch(q).eval(), xc, 64), yc)
        init = max(cal, key=lambda k: (cal[k], k == "linear"))
        chosen = {"init": init, "init_calib_top1": cal, "chosen_on": "the 128 calibration images"}
        for bc in (False, True):
            ours(f"effnet-km{bits}" + ("-bc" if bc else ""), f"kmeans{bits}:{init}", bc, chosen)
        peer(f"coremltools-km{bits}", {"n_bits": bits, "granularity": "per_tensor"}, f"n_bits={bits} per_tensor")
        peer(f"coremltools-km{bits}-folded", {"n_bits": bits, "granularity": "per_tensor"},
             f"n_bits={bits} per_tensor", folded=True)
    # one codebook per output channel: the granularity a 4-bit palette needs on a mobile net
    ours("effnet-km4-channel-bc", "kmeans4:channel", True)
    peer("coremltools-km4-channel", {"n_bits": 4, "granularity": "per_grouped_channel", "group_size": 1},
         "n_bits=4 per_grouped_channel group_size=1")
    pipe = presets()["w4a8"][0]
    q = PassManager(pipe).run(g.copy(), Context(calib=xc)).graph
    from graphopt.backends.lowering import export_file

    p = WORK / "effnet-w4a8.onnx"
    export_file(q, p, "qdq")
    out["w4a8"] = {"pipeline": pipe, "ort_top1": top1_pct(ort_logits(p, xt), yt), "onnx_kb": round(p.stat().st_size / 1e3, 1)}
    print("w4a8", out["w4a8"], flush=True)
    res = load_results(RESULTS)
    res["effnet"] = out
    save_results(RESULTS, res)
    return out


_PROBE = r"""
import json, resource, sys, time
import numpy as np, onnxruntime as ort
path, mode, opt_out = sys.argv[1], sys.argv[2], sys.argv[3]
so = ort.SessionOptions()
so.intra_op_num_threads = 1
so.log_severity_level = 3
if opt_out != "-":
    so.optimized_model_filepath = opt_out
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"],
                         disabled_optimizers=["ConstantFolding"] if mode == "nofold" else None)
load = time.perf_counter() - t
inp = s.get_inputs()[0]
x = np.random.default_rng(0).normal(size=[1] + list(inp.shape[1:])).astype(np.float32)
s.run(None, {inp.name: x})
ts = []
for _ in range(20):
    t = time.perf_counter(); s.run(None, {inp.name: x}); ts.append(time.perf_counter() - t)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"load_s": load, "latency_ms": 1000 * float(np.median(ts)), "peak_mb": peak / 1024,
                  "session_mb": (peak - base) / 1024}))
"""


def ort_memory(files: dict[str, Path]) -> dict:
    """Session load time, peak memory (each in a fresh process), latency at batch 1 (one thread)
    and what onnxruntime's optimizer did with the palettes (from its optimized graph): with its
    default constant folding, and with ConstantFolding disabled (the Gathers then run per call)."""
    import subprocess

    import onnx

    out = {}
    for name, path in files.items():
        for mode in ("default", "nofold"):
            if mode == "nofold" and name == "fp32":
                continue
            opt = WORK / f"{name}.{mode}.optimized.onnx"
            r = subprocess.run([sys.executable, "-c", _PROBE, str(path), mode, str(opt)], capture_output=True,
                               text=True, check=True)
            rec = json.loads(r.stdout.strip().splitlines()[-1])
            m = onnx.load(str(opt))
            ops = {}
            for n in m.graph.node:
                ops[n.op_type] = ops.get(n.op_type, 0) + 1
            rec.update(file_kb=round(path.stat().st_size / 1e3, 1), gathers_left=ops.get("Gather", 0),
                       optimized_kb=round(opt.stat().st_size / 1e3, 1))
            out[f"{name}/{mode}"] = {k: round(v, 3) if isinstance(v, float) else v for k, v in rec.items()}
            print(name, mode, out[f"{name}/{mode}"], flush=True)
    return out


def run_ort() -> dict:
    """``ort_memory`` on EfficientNet-Lite0: FP32 against its k-means 4-bit palettized file."""
    files = {"fp32": fp32_file("effnet"), "kmeans4": WORK / "effnet-km4-bc.onnx"}
    if not files["kmeans4"].exists():
        raise SystemExit("run --effnet first (it writes the palettized file)")
    res = load_results(RESULTS)
    res["ort_memory"] = ort_memory(files)
    save_results(RESULTS, res)
    return res["ort_memory"]


def table() -> None:
    res = load_results(RESULTS)
    c = res.get("choose/centroid_lr")
    if c:
        print(f"centroid optimizer:lr {c['chosen']} ({c['rule']}; "
              f"{', '.join(f'{k} {v}' for k, v in c['val_top1'].items())})\n")
    print("| row | what | epochs (prune + centroids) | top-1 torch | onnxruntime palettized | decoded .gdc | kept | "
          "ratio P+Q | ratio P+Q+H | .gdc KB | ONNX KB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for k in ROWS:
        r = res.get(k)
        if not r:
            continue
        print(f"| {k} | {r['what']} | {r['prune_epochs']} + {r['centroid_epochs']} | {r['torch_top1']:.2f} | "
              f"{r['ort_top1']:.2f} | {r['decoded_top1']:.2f} | {100 * r['kept']:.1f}% | {r['ratio_pq']:.1f}x | "
              f"{r['ratio_pqh']:.1f}x | {r['gdc_kb']} | {r['onnx_kb']} |")
    any_row = next((res[k] for k in ROWS if k in res), None)
    if any_row:
        print(f"\nFP32 {FP32} top-1; FP32 ONNX {any_row['fp32_kb']} KB, gzip -9 {any_row['fp32_gzip_kb']} KB")
    e = res.get("effnet")
    if e:
        print(f"\nEfficientNet-Lite0, 372 held-out images (FP32 {e['fp32']['ort_top1']:.2f}; FP32 ONNX "
              f"{e['fp32']['fp32_kb']} KB, gzip -9 {e['fp32']['fp32_gzip_kb']} KB)\n")
        print("| row | top-1 onnxruntime | decoded | top-1 torch | ratio P+Q+H | .gdc KB | ONNX KB | s |")
        print("|---|---|---|---|---|---|---|---|")
        for k, r in e.items():
            if k == "fp32":
                continue
            print(f"| {k} | {r.get('ort_top1', '-')} | {r.get('decoded_top1', '-')} | {r.get('torch_top1', '-')} | "
                  f"{r.get('ratio_pqh', '-')} | {r.get('gdc_kb', '-')} | {r.get('onnx_kb', '-')} | "
                  f"{r.get('convert_s', '-')} |")


def plot(path: Path) -> None:
    """Top-1 against the compression ratio (P+Q+H) of every ResNet-20 row (the paper's Figure 6)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = load_results(RESULTS)
    groups = {"pruning only": ["prune-80"], "k-means only": ["kmeans4", "kmeans4-post"],
              "pruning + k-means + Huffman": ["prune80-km4", "prune80-km3", "prune80-km2", "prune90-km3", "prune80-km4-int8"],
              "uniform int4 + GPTQ": ["int4-gptq"]}
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for label, rows in groups.items():
        pts = [(res[r]["ratio_pqh"], res[r]["ort_top1"], r) for r in rows if r in res]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", label=label)
            for x, y, r in pts:
                ax.annotate(r, (x, y), fontsize=7, xytext=(3, -10 if r.endswith("-int8") else 3),
                            textcoords="offset points")  # the int8 row sits on its float row: label it below
    ax.axhline(FP32, color="gray", ls="--", lw=0.8, label=f"FP32 {FP32}")
    ax.set_xscale("log")
    ax.set_xlabel("weight compression ratio vs FP32 (P+Q+H, codebooks included)")
    ax.set_ylabel("top-1 % (10,000 test images, onnxruntime)")
    ax.set_title("ResNet-20 / CIFAR-10: Deep Compression")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--row")
    ap.add_argument("--epochs", type=int, default=3, help="pruning epochs (the sparsity benchmark's 3)")
    ap.add_argument("--km-epochs", type=int, default=1, help="centroid fine-tuning epochs")
    ap.add_argument("--limit", type=int, default=None, help="train on the first N images (smoke runs; not saved)")
    ap.add_argument("--choose", action="store_true")
    ap.add_argument("--steps", type=int, default=200, help="--choose: fine-tuning steps per learning rate")
    ap.add_argument("--effnet", action="store_true")
    ap.add_argument("--ort", action="store_true", help="session load time, peak memory, latency and constant folding "
                                                       "of the palettized EfficientNet file against FP32")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--plot", metavar="FILE.png")
    args = ap.parse_args()
    if args.plot:
        plot(Path(args.plot))
        return 0
    if args.list:
        for row, (_, _, what) in ROWS.items():
            print(f"{row:14s} {what}")
        return 0
    if args.table:
        table()
        return 0
    if args.choose:
        choose(args.steps)
        return 0
    if args.effnet:
        run_effnet()
        return 0
    if args.ort:
        run_ort()
        return 0
    if args.row not in ROWS:
        ap.error(f"--row must be one of {', '.join(ROWS)}")
    if args.limit:
        global WORK
        WORK = WORK / "smoke"
    result = run_row(args.row, args.epochs, args.km_epochs, args.limit)
    print(json.dumps({args.row: {k: v for k, v in result.items() if k != "layers"}}))
    if args.limit is None:
        res = load_results(RESULTS)
        res[args.row] = result
        save_results(RESULTS, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
