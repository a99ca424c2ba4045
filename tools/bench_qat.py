"""Quantization-aware training of ResNet-20 on CIFAR-10, one resumable row at a time.

  python tools/bench_qat.py --row w4a4-lsq [--epochs 3]     # train (or resume) one row
  python tools/bench_qat.py --list                          # the rows and what they run
  python tools/bench_qat.py --table                         # the README table from the results
  python tools/bench_qat.py --plot docs/img/qat_resnet20.png  # a dot per row against FP32
  python tools/bench_qat.py --choose                        # the starts (act_init, weight_init), on validation
  python tools/bench_qat.py --tune w4a4-lsq-mse             # lr, quantizer wd, BN phase, KD, schedule: on validation

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
from common import (
    VAL_SPLIT,
    agree_pct,
    base_of,
    cifar10,
    cifar_augment,
    cifar_normalize,
    cifar_val,
    key_of,
    load_results,
    ort_logits,
    ort_session,
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

RESULTS = Path(__file__).resolve().parent / "results" / "qat.json"
WORK = Path(tempfile.gettempdir()) / "graphopt-qat"
EDGE = "first_last_bits=8"
LR = 0.001  # the rows' peak learning rate (--lr; --tune's first candidate)
KD_WEIGHT = 0.5  # the rows' loss: 0.5 x distillation (T = 4) + 0.5 x cross-entropy (--tune's first candidate)
# rows that use the two-phase BN schedule: epochs with batch statistics (the others: frozen throughout)
BN_BATCH: dict[str, int] = {"w4a4-lsq-bn": 2}
# rows below 4-bit activations keep the first and last layers' inputs (and the logits) at 8 bits, as
# the LSQ, PACT and IR-Net papers do; the 4-bit rows quantize the network input to 4 bits too
EDGE_ACT = {"w3a3-lsq": 8, "w2a2-lsq": 8, "w1a1": 8, "w4a4-lsq-e8": 8, "w4a4-ptq-e8": 8,
            "w3a3-lsq-mse": 8, "w2a2-lsq-mse": 8, "w2a2-lsq-mse-in": 8}
MSE = "act_method=mse"
# row -> (quantize options, what it is)
ROWS = {
    "w8a8-ptq": ("weights=int8:channel,acts=uint8:tensor", "PTQ baseline, no training"),
    "w4a4-ptq": ("weights=int4:channel,acts=uint4:tensor", "PTQ baseline, no training"),
    "w4a4-ptq-e8": ("weights=int4:channel,acts=uint4:tensor", "PTQ baseline, 8-bit input, classifier input, logits"),
    "w4a4-lsq": ("weights=int4:channel,acts=uint4:tensor,qat=lsq", "LSQ steps, weights and activations"),
    "w4a4-pact": ("weights=int4:channel,acts=uint4:tensor,qat=pact", "PACT clips (weights: LSQ)"),
    "w4a4-dorefa": ("weights=int4:channel,acts=uint4:tensor,qat=dorefa", "DoReFa weights, activations x/alpha clipped to [0, 1]"),
    "w4a4-ste": ("weights=int4:channel,acts=uint4:tensor,qat=ste", "plain STE, calibrated fixed scales"),
    "w3a3-lsq": ("weights=int3:channel,acts=uint3:tensor,qat=lsq", "LSQ"),
    "w2a2-lsq": ("weights=int2:channel,acts=uint2:tensor,qat=lsq", "LSQ"),
    "ternary-a8": ("weights=ternary:channel,acts=uint8:tensor,qat=lsq", "TWN ternary weights, LSQ activations"),
    "binary-a8": ("weights=binary:channel,acts=uint8:tensor,qat=lsq", "XNOR binary weights, LSQ activations"),
    "w4a4-lsq-g8": ("weights=int4:channel,acts=uint4:tensor,qat=lsq,grad_bits=8", "LSQ + 8-bit DoReFa gradients"),
    "w4a4-lsq-g6": ("weights=int4:channel,acts=uint4:tensor,qat=lsq,grad_bits=6", "LSQ + 6-bit DoReFa gradients"),
    "w4a4-apot": ("weights=apot4:channel,acts=uint4:tensor,qat=lsq", "APoT weights (STE), LSQ activations"),
    "w4a4-pow2": ("weights=pow2:b4:channel,acts=uint4:tensor,qat=lsq", "power-of-two weights (STE), LSQ acts"),
    "w4a4-lsq-bn": ("weights=int4:channel,acts=uint4:tensor,qat=lsq", "LSQ, two-phase BN: 2 epochs batch statistics"),
    "w4a4-lsq-e8": ("weights=int4:channel,acts=uint4:tensor,qat=lsq", "LSQ, 8-bit network input, classifier input "
                                                                       "and logits (the LSQ paper's edges)"),
    "w1a1": ("weights=binary:channel,acts=uint1:tensor,qat=lsq", "binary weights, 1-bit {0, s} activations (LSQ)"),
    # the same methods with the activation steps starting at the MSE-calibrated range (act_init=calib) instead of
    # the LSQ paper's 2 mean|x| / sqrt(Qp): at W4A4 the untrained graph scores 81.2 instead of 59.9 (2,000 images)
    "w4a4-ptq-mse": (f"weights=int4:channel,acts=uint4:tensor,{MSE}", "PTQ baseline, MSE-calibrated activations"),
    "w4a4-lsq-mse": (f"weights=int4:channel,acts=uint4:tensor,qat=lsq,act_init=calib,{MSE}",
                     "LSQ, steps start at the MSE-calibrated range"),
    "w3a3-lsq-mse": (f"weights=int3:channel,acts=uint3:tensor,qat=lsq,act_init=calib,{MSE}",
                     "LSQ, steps start at the MSE-calibrated range"),
    "w2a2-lsq-mse": (f"weights=int2:channel,acts=uint2:tensor,qat=lsq,act_init=calib,{MSE}",
                     "LSQ, steps start at the MSE-calibrated range"),
    # the same with only the layers' inputs quantized (act_outputs=false): conv outputs, residual adds and
    # the logits stay float, the scope of the LSQ paper and of the Brevitas peer (onnxruntime runs the
    # low-bit layers in float, as every A4/A2 row's)
    "w2a2-lsq-mse-in": (f"weights=int2:channel,acts=uint2:tensor,qat=lsq,act_init=calib,{MSE},act_outputs=false",
                        "LSQ, MSE start; layer inputs only (outputs, residual adds, logits float)"),
    "w4a4-lsq-mse-in": (f"weights=int4:channel,acts=uint4:tensor,qat=lsq,act_init=calib,{MSE},act_outputs=false",
                        "LSQ, MSE start; layer inputs only (outputs, residual adds, logits float)"),
}
# ROW-tuned: ROW's method with the recipe (learning rate, weight decay on the learned steps, BN phase,
# distillation weight, schedule) that --tune ROW chose; run only where that differs from the rows' own
# (otherwise ROW is it). A -in row not yet tuned itself borrows its full-scope twin's choice (RECIPE_FROM)
RECIPE_FROM = {"w2a2-lsq-mse-in": "w2a2-lsq-mse", "w4a4-lsq-mse-in": "w4a4-lsq-mse"}  # -> whose --tune it borrows
TUNED = {f"{row}-tuned": row for row in ("w4a4-lsq-mse", "w2a2-lsq-mse", *RECIPE_FROM)}  # tuned row -> its base row
ROWS.update({t: (ROWS[b][0], f"{b} with the recipe --tune chose on the validation split"
                 + (f" (for {RECIPE_FROM[b]}, unless --tune {b} ran)" if b in RECIPE_FROM else "")) for t, b in TUNED.items()})
EDGE_ACT.update({t: EDGE_ACT[b] for t, b in TUNED.items() if b in EDGE_ACT})


def load() -> dict:
    return load_results(RESULTS)


def save(res: dict) -> None:
    save_results(RESULTS, res)


def row_pipeline(row: str, epochs: int, lr: float, ck: Path, quant_wd: float | None = None,
                 bn_batch: int | None = None, kd_weight: float = KD_WEIGHT, schedule: dict | None = None) -> str:
    """A row's pipeline: quantize with its options and edges, then (trained rows) the shared
    recipe at ``lr``, with ``quant_wd`` on the learned steps when set (else the weights' 1e-4),
    ``bn_batch`` epochs of batch-statistics BN (default: the row's, usually 0), the loss
    ``kd_weight`` x distillation + (1 - it) x cross-entropy, and the learning-rate ``schedule``
    ({"lr_schedule", "warmup"}; default the rows' cosine without warm-up, left out of the string)."""
    opts, _ = ROWS[row]
    edge = EDGE + (f",first_last_act_bits={EDGE_ACT[row]}" if row in EDGE_ACT else "")
    pipe = f"canonicalize,fold-bn,quantize{{{opts},{edge}}}"
    if "ptq" not in row:
        qwd = "" if quant_wd is None else f"quant_weight_decay={quant_wd},"
        qwd += "".join(f"{k}={v}," for k, v in (schedule or {}).items() if SCHEDULES[0][k] != v)
        pipe += (f",finetune{{epochs={epochs},batch_size=128,lr={lr},weight_decay=0.0001,{qwd}kd_weight={kd_weight},"
                 f"temperature=4,bn_batch_epochs={BN_BATCH.get(row, 0) if bn_batch is None else bn_batch},checkpoint={ck},resume=true}}")
    return pipe


def recipe_row(row: str, res: dict) -> str:
    """Whose ``--tune`` record gives a tuned row its recipe: its base row's where that was tuned,
    else the full-scope twin's that the base borrows from (RECIPE_FROM)."""
    base = TUNED[row]
    return base if "bn_batch_frac" in res.get(f"tune/{base}", {}).get("chosen", {}) else RECIPE_FROM.get(base, base)


def tuned_recipe(row: str, res: dict) -> dict:
    """The recipe ``--tune`` chose for a tuned row ({"lr", "quant_weight_decay", "bn_batch_frac",
    ...}): see ``recipe_row``."""
    src = recipe_row(row, res)
    rec = res.get(f"tune/{src}")
    if rec is None or "bn_batch_frac" not in rec.get("chosen", {}):
        raise SystemExit(f"{row}: no recipe chosen yet; run python tools/bench_qat.py --tune {src} first")
    return rec["chosen"]


def run_row(row: str, epochs: int, lr: float, limit: int | None) -> dict:
    import torch
    from cifar_resnet import resnet_cifar

    import graphopt
    from graphopt.backends.lowering import export_file
    from graphopt.passmanager import Context, PassManager, TrainingData

    quant_wd = bn_batch = schedule = None
    kd = KD_WEIGHT
    if row in TUNED:
        recipe = tuned_recipe(row, load())
        lr, quant_wd, bn_batch = recipe["lr"], recipe["quant_weight_decay"], round(recipe["bn_batch_frac"] * epochs)
        kd = recipe.get("kd_weight", KD_WEIGHT)  # searched since 2026-12-07; earlier records ran the shared 0.5
        schedule = {k: recipe.get(k, v) for k, v in SCHEDULES[0].items()}  # searched since 2026-12-07 (stage 4)
    xtr_u8, ytr = cifar10("train")
    xt_u8, yt = cifar10("test")
    xtr, xt = cifar_normalize(xtr_u8[:limit]), cifar_normalize(xt_u8)
    ytr = ytr[:limit]
    model = resnet_cifar(20)
    g = graphopt.from_torch(model, torch.zeros(1, 3, 32, 32))
    calib = xtr[np.random.default_rng(0).permutation(len(xtr))[:512]]
    WORK.mkdir(parents=True, exist_ok=True)
    ck = WORK / f"{key_of(row, epochs)}.pt"
    train = "ptq" not in row
    pipe = row_pipeline(row, epochs, lr, ck, quant_wd, bn_batch, kd, schedule)
    t = time.perf_counter()
    ctx = Context(calib=calib, train=TrainingData(xtr, ytr, cifar_augment), teacher=g.copy())
    r = PassManager(pipe).run(g, ctx)
    secs = time.perf_counter() - t
    q = r.graph
    sim = torch_logits(graphopt.to_torch(q).eval(), xt)
    out = WORK / f"{key_of(row, epochs)}.onnx"
    export_file(q, out, "qdq")
    ort = ort_logits(out, xt)
    out_fq = q.outputs[0].producer  # the logits' own quantizer: its step is the unit of the difference
    step = float(np.asarray(q.const_value(out_fq.inputs[1])).max()) if out_fq.op_type == "FakeQuant" else None
    ft = r.stats.get("finetune", [{}])[0] if train else {}
    ran = ft.get("epochs", 0)  # epochs trained by this invocation (a resumed run trains the rest)
    timing = train_timing(secs, ran, load().get(key_of(row, epochs), {})) if train else \
        {"wall_s": round(secs, 1), "s_per_epoch": None, "threads": torch.get_num_threads()}
    return {"pipeline": pipe, "epochs": epochs if train else 0, "torch_top1": top1_pct(sim, yt),
            "ort_top1": top1_pct(ort, yt), "agree": agree_pct(sim, ort), **timing,
            "max_diff_steps": round(float(np.abs(ort - sim).max()) / step, 3) if step else None,
            "steps": ft.get("steps", 0), "train_images": len(xtr), "mb": round(out.stat().st_size / 1e6, 3),
            "ort_kernels": ort_kernels(out)}


# the Brevitas peer: row -> (weight bits, activation bits, what); same recipe, weights and data
PEER_ROWS = {
    "brevitas-w4a4": (4, 4, "Brevitas QuantConv2d/QuantReLU, float BN (batch statistics)"),
    "brevitas-w2a2": (2, 2, "Brevitas, 8-bit network input and classifier input"),
    "brevitas-w2a2-mse": (2, 2, "Brevitas with its MSE quantizers (Int8WeightPerChannelFloatMSE, "
                                "Uint8ActPerTensorFloatMSE): the calibrated start of graphopt's -mse rows"),
    "brevitas-w4a4-mse": (4, 4, "Brevitas with its MSE quantizers, as brevitas-w2a2-mse"),
    "torchao-w4a4": (4, 4, "torch.ao FX QAT (prepare_qat_fx, ConvBn batch statistics), convert_fx; observers off and BN frozen before scoring"),
}


def ort_kernels(path: Path) -> dict[str, int]:
    """How many Conv/Gemm/MatMul layers onnxruntime's optimized graph runs on integer kernels
    (QLinearConv, QGemm, ...) and how many in float."""
    from graphopt.backends.lowering import ort_kernel_report

    kr = ort_kernel_report(str(path))
    return {"integer": sum(kr["integer"].values()), "float": len(kr["float"])}


def run_peer(row: str, epochs: int, lr: float, limit: int | None) -> dict:
    import importlib

    from cifar_resnet import resnet_cifar

    peer = importlib.import_module("peers.torchao_resnet" if row.startswith("torchao") else "peers.brevitas_resnet")
    export, from_fp32, train = peer.export, peer.from_fp32, peer.train

    wb, ab, _ = PEER_ROWS[row]
    xtr_u8, ytr = cifar10("train")
    xt_u8, yt = cifar10("test")
    xtr, xt = cifar_normalize(xtr_u8[:limit]), cifar_normalize(xt_u8)
    ytr = ytr[:limit]
    fp32 = resnet_cifar(20)
    model = from_fp32(fp32, wb, ab, 8 if ab < 4 else ab, **({"mse": True} if row.endswith("-mse") else {}))
    WORK.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    stats = train(model, fp32, xtr, ytr, cifar_augment, epochs=epochs, lr=lr, checkpoint=WORK / f"{key_of(row, epochs)}.pt")
    secs = time.perf_counter() - t
    if hasattr(peer, "freeze"):  # torch.ao: observers off and BN frozen before anything is scored
        peer.freeze(model)
    sim = torch_logits(model, xt)
    conv = torch_logits(peer.converted(model), xt) if hasattr(peer, "converted") else None
    out = WORK / f"{key_of(row, epochs)}.onnx"
    why = export(model, out)
    res = {"pipeline": f"{row.split('-')[0]} {row}: W{wb}A{ab}, first conv and classifier W8", "epochs": epochs,
           "torch_top1": top1_pct(sim, yt), **train_timing(secs, stats["epochs"], load().get(key_of(row, epochs), {})),
           "steps": stats["steps"], "train_images": len(xtr),
           "ort_top1": None, "agree": None, "mb": None, "export": why or "ok"}
    if conv is not None:  # the peer's own converted model, scored in torch too
        res.update(converted_top1=top1_pct(conv, yt), converted_agree=agree_pct(sim, conv))
    if why is None:
        try:
            bs = 1 if ort_session(out).get_inputs()[0].shape[0] == 1 else 500  # Brevitas exports a fixed batch of one
            ort = ort_logits(out, xt, bs)
            if conv is not None:
                res["ort_agree_converted"] = agree_pct(conv, ort)
            res.update(ort_top1=top1_pct(ort, yt), agree=agree_pct(sim, ort),
                       max_diff=float(np.abs(ort - sim).max()), mb=round(out.stat().st_size / 1e6, 3))
            import onnx

            res["onnx_ops"] = sorted({n.op_type for n in onnx.load(str(out)).graph.node})
            res["ort_kernels"] = ort_kernels(out)
        except Exception as e:
            res["export"] = f"onnxruntime cannot run it: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return res


def table() -> None:
    res = load()
    print("| row | what | epochs | top-1 torch | top-1 onnxruntime | agree | max diff (output steps) | s/epoch "
          "| layers int / float in ORT |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = {**{k: w for k, (_, w) in ROWS.items()}, **{k: w for k, (_, _, w) in PEER_ROWS.items()}}
    fmt = lambda v, unit="": "-" if v is None else f"{v:.2f}{unit}"  # noqa: E731
    for row in with_budgets(rows, res):
        what = rows[base_of(row)]
        r = res.get(row)
        if r and str(r.get("chosen_on", "")).startswith("STALE"):
            what += " (**trained with an earlier choice**; see its chosen_on)"
        if r:
            print(f"| {row} | {what} | {r['epochs']} | {fmt(r['torch_top1'])} | {fmt(r['ort_top1'])} | "
                  f"{fmt(r['agree'], '%')} | {fmt(r.get('max_diff_steps'))} | {r['s_per_epoch'] if r['s_per_epoch'] is not None else '-'} | "
                  f"{kernel_split(r.get('ort_kernels'))} |")


# --choose: where the learned steps start, judged on the untrained graph's top-1 on the validation
# split (CIFAR-10 training images; common.VAL_SPLIT), never on the test images the rows report.
ACT_STARTS = {"paper": "act_init=paper", "calib": "act_init=calib", "calib+mse": f"act_init=calib,{MSE}"}
WEIGHT_STARTS = {"paper": "weight_init=paper", "calib": "weight_init=calib",
                 "calib+mse": "weight_init=calib,weight_method=mse"}


def choose(steps: int = 100) -> dict:
    """Score every start on the validation split and record the choice: the activation start at
    W4A4, W3A3 and W2A2 (weights at the paper's start), then the weight start at W4A4 from the
    chosen activation start. The score is the untrained graph's top-1; where every candidate is
    within 10 points of chance (the untrained graph cannot tell them apart), it is the top-1 after
    ``steps`` fine-tuning steps with the rows' recipe on the training images outside the split.
    Saved under ``choose/...`` in the results."""
    import torch
    from cifar_resnet import resnet_cifar

    import graphopt
    from graphopt.passmanager import Context, PassManager, TrainingData

    xv, yv = cifar_val()
    calib, xk, yk = outside_val()
    g0 = graphopt.from_torch(resnet_cifar(20), torch.zeros(1, 3, 32, 32))
    res = load()

    def score(bits: int, extra: str, train: bool = False) -> float:
        edge = EDGE + (",first_last_act_bits=8" if bits < 4 else "")
        pipe = (f"canonicalize,fold-bn,quantize{{weights=int{bits}:channel,acts=uint{bits}:tensor,qat=lsq,"
                f"{extra},{edge}}}")
        ctx = Context(calib=calib)
        if train:
            pipe += (f",finetune{{epochs=1,max_steps={steps},batch_size=128,lr={LR},weight_decay=0.0001,"
                     f"kd_weight={KD_WEIGHT},temperature=4}}")
            ctx = Context(calib=calib, train=TrainingData(xk, yk, cifar_augment), teacher=g0.copy())
        q = PassManager(pipe).run(g0.copy(), ctx).graph
        return top1_pct(torch_logits(graphopt.to_torch(q).eval(), xv), yv)

    def pick(key: str, bits: int, starts: dict, prefix: str = "") -> str:
        scores = {k: score(bits, prefix + v) for k, v in starts.items()}
        rec = {"val_top1_untrained": scores, "chosen_on": VAL_SPLIT, "rule": "untrained top-1"}
        if max(scores.values()) < 20.0:  # 10 classes: every start within 10 points of chance
            scores = {k: score(bits, prefix + v, train=True) for k, v in starts.items()}
            rec.update(val_top1_after_steps=scores, steps=steps,
                       rule=f"top-1 after {steps} fine-tuning steps (untrained: all within 10 points of chance)")
        rec["chosen"] = max(scores, key=scores.get)
        res[key] = rec
        save(res)
        print(f"{key}: " + "  ".join(f"{k} {v:.2f}" for k, v in scores.items()) + f"  -> {rec['chosen']} "
              f"({rec['rule']})", flush=True)
        return rec["chosen"]

    for bits in (4, 3, 2):
        pick(f"choose/act_init/w{bits}a{bits}", bits, ACT_STARTS)
    act = ACT_STARTS[res["choose/act_init/w4a4"]["chosen"]]
    pick("choose/weight_init/w4a4", 4, WEIGHT_STARTS, prefix=act + ",")
    refresh_chosen_on(res)
    save(res)
    return {k: v for k, v in res.items() if k.startswith("choose/")}


# --tune ROW: the recipe's learning rate, the weight decay on the learned steps and when BN
# freezes, chosen on the validation split. Each candidate trains on the training images outside
# the split (its learning-rate schedule over its budget) and is scored in torch on the split. Stage 1:
# TUNE_GRID at --tune-epochs (default 1); stage 2: stage 1's choice with BN_FRACS of its epochs in
# batch statistics, at twice that budget (one epoch cannot split into two BN phases); stage 3: the
# loss's distillation weight (KD_WEIGHTS) at stage 2's choice and budget; stage 4: the learning-rate
# schedule (SCHEDULES) at stage 3's choice and budget. The proxy budgets stand in for the rows' 20
# epochs (see docs/qat.md). The current recipe comes first in each stage and keeps its place on a tie.
TUNE_GRID = [{"lr": lr, "quant_weight_decay": wd} for lr in (LR, 3 * LR) for wd in (None, 0.0)] + [
    {"lr": LR / 2, "quant_weight_decay": None}]  # 0.003 diverged: a step below the current rate brackets it
# (a best rate on the grid's edge is widened by halving or doubling until bracketed: common.tune_widen)
BN_FRACS = (0.0, 0.5)
KD_WEIGHTS = (KD_WEIGHT, 1.0, 0.25)  # the shared 0.5, distillation alone, mostly labels
# the rows' cosine; the ResNet papers' steps (x0.1 at 1/2 and 3/4); cosine after a 10% linear warm-up
SCHEDULES = ({"lr_schedule": "cosine", "warmup": 0.0}, {"lr_schedule": "step", "warmup": 0.0},
             {"lr_schedule": "cosine", "warmup": 0.1})


def tune(row: str, epochs: int = 1) -> dict:
    """Score the TUNE_GRID recipes, then the BN_FRACS, KD_WEIGHTS and SCHEDULES of the best, for
    ``row`` on the validation split and record the choice as ``tune/ROW`` (each candidate as it finishes: an interrupted
    tuning resumes, its candidates' checkpoints too)."""
    import torch
    from cifar_resnet import resnet_cifar

    import graphopt
    from graphopt.passmanager import Context, PassManager, TrainingData

    if row not in ROWS or "ptq" in row or row in TUNED:
        raise SystemExit(f"--tune takes a trained row of {', '.join(r for r in ROWS if 'ptq' not in r)}")
    xv, yv = cifar_val()
    calib, xk, yk = outside_val()
    g0 = graphopt.from_torch(resnet_cifar(20), torch.zeros(1, 3, 32, 32))
    key = f"tune/{row}"
    rec = tune_record(RESULTS, key, epochs, train_images=len(yk), rule=(
        f"top-1 on the validation split (torch) after {epochs} epoch(s) on the training images outside it for lr "
        f"and quantizer weight decay, then {2 * epochs} epoch(s) for the share of epochs with batch-statistics BN, "
        "then for the distillation weight, then for the learning-rate schedule"))
    work = WORK / "tune"
    work.mkdir(parents=True, exist_ok=True)

    def run(name: str, cand: dict, ep: int) -> dict:
        bn = round(cand.get("bn_batch_frac", 0.0) * ep)
        kd = cand.get("kd_weight", KD_WEIGHT)
        sched = {k: cand.get(k, v) for k, v in SCHEDULES[0].items()}
        ck = work / (f"{row}-lr{cand['lr']}-qwd{cand['quant_weight_decay']}" + (f"-bn{bn}" if ep != epochs else "")
                     + (f"-kd{kd}" if kd != KD_WEIGHT else "")
                     + "".join(f"-{k}{v}" for k, v in sched.items() if SCHEDULES[0][k] != v) + f"-{ep}ep.pt")
        pipe = row_pipeline(row, ep, cand["lr"], ck, cand["quant_weight_decay"], bn, kd, sched)

        def score() -> float:
            ctx = Context(calib=calib, train=TrainingData(xk, yk, cifar_augment), teacher=g0.copy())
            q = PassManager(pipe).run(g0.copy(), ctx).graph
            return top1_pct(torch_logits(graphopt.to_torch(q).eval(), xv), yv)

        return tune_candidate(RESULTS, key, rec, name, cand, ep, score)

    def name(c: dict) -> str:
        return f"lr={c['lr']},quant_wd={c['quant_weight_decay']}"

    first = tune_widen(key, rec, [run(name(c), c, epochs) for c in TUNE_GRID], "lr", 2, lambda lr, best: run(
        name(c := {"lr": lr, "quant_weight_decay": best["quant_weight_decay"]}), c, epochs))
    base = {"lr": first["lr"], "quant_weight_decay": first["quant_weight_decay"]}
    stem = f"lr={base['lr']},quant_wd={base['quant_weight_decay']}"
    second = tune_best(key, rec, [run(f"{stem},bn_frac={f},{2 * epochs}ep", {**base, "bn_batch_frac": f}, 2 * epochs)
                                  for f in BN_FRACS])
    base["bn_batch_frac"] = second["bn_batch_frac"]
    third = tune_best(key, rec, [second] + [  # stage 2's winner is the shared weight's candidate
        run(f"{stem},bn_frac={base['bn_batch_frac']},kd={k},{2 * epochs}ep", {**base, "kd_weight": k}, 2 * epochs)
        for k in KD_WEIGHTS[1:]])
    base["kd_weight"] = third.get("kd_weight", KD_WEIGHT)
    at = f"{stem},bn_frac={base['bn_batch_frac']},kd={base['kd_weight']}"
    fourth = tune_best(key, rec, [third] + [  # stage 3's winner is the rows' schedule's candidate
        run(f"{at},schedule={c['lr_schedule']},warmup={c['warmup']},{2 * epochs}ep", {**base, **c}, 2 * epochs)
        for c in SCHEDULES[1:]])
    base.update({k: fourth.get(k, v) for k, v in SCHEDULES[0].items()})
    rec["chosen"] = dict(sorted(base.items()))  # as the file stores it
    res = load()
    res[key] = rec
    refresh_chosen_on(res)
    save(res)
    print(f"{key}: chose {rec['chosen']}", flush=True)
    return rec


RECIPE_PARTS = {"lr": "lr", "quant_weight_decay": "quantizer weight decay", "bn_batch_frac": "BN phase",
                "kd_weight": "distillation weight", "lr_schedule": "lr schedule"}  # a --tune choice's keys, in words


def full_recipe(recipe: dict) -> dict:
    """A --tune recipe with the parts a record from before stages 3 and 4 did not search filled
    in as the rows' own (what such a record's rows ran)."""
    return {"kd_weight": KD_WEIGHT, **SCHEDULES[0], **recipe}


def refresh_chosen_on(res: dict) -> None:
    """Every measured row (each budget) learns which data chose what it runs, after a --choose or
    --tune changed the records."""
    for k, r in res.items():
        if base_of(k) in ROWS or base_of(k) in PEER_ROWS:
            r["chosen_on"] = chosen_on(base_of(k), res, ran=r.get("recipe"))


def chosen_on(row: str, res: dict, recipe: bool = True, ran: dict | None = None) -> str:
    """Which data chose what a row runs (its JSON's ``chosen_on``): the starts of the learned steps
    come from ``--choose`` on the validation split; everything else in a row is the method as its
    paper states it, or the recipe shared by every row (lr 0.001: 0.01 diverged in training loss).
    ``ran``: the recipe a tuned row trained with, when a later --tune chose another (say so)."""
    if row in PEER_ROWS:
        return "the peer's documented quantizers, as named in the row; nothing chosen on data"
    if row in TUNED:
        src = recipe_row(row, res)
        rec = res.get(f"tune/{src}", {})
        if ran is not None and rec.get("chosen") and full_recipe(ran) != full_recipe(rec["chosen"]):
            return (f"STALE: trained with {full_recipe(ran)}; --tune {src} now chooses "
                    f"{full_recipe(rec['chosen'])} (rerun the row)")
        whose = "" if src == TUNED[row] else f" for {src} (borrowed: {TUNED[row]} was not tuned itself)"
        return (f"recipe {rec.get('chosen')}{whose} chosen by {rec.get('rule')} on {rec.get('chosen_on')}; "
                f"start as {chosen_on(TUNED[row], res, recipe=False)}")
    opts = ROWS[row][0]
    if "qat=" not in opts:
        return "PTQ baseline: nothing chosen"
    bits = next((b for b in (4, 3, 2) if f"acts=uint{b}:" in opts), None)  # the activation width
    act = ("calib+mse" if f"act_init=calib,{MSE}" in opts else "calib" if "act_init=calib" in opts else "paper")
    rec = res.get(f"choose/act_init/w{bits}a{bits}") if bits else None
    if rec is None or "lsq" not in opts:
        return f"activation start {act} (the method's own); no validation choice at this width"
    verdict = "the validation choice" if rec["chosen"] == act else f"NOT the validation choice ({rec['chosen']})"
    out = f"activation start {act}: {verdict}, {rec['rule']} on {rec['chosen_on']}"
    tuned = res.get(f"tune/{row}", {}).get("chosen")
    if recipe and tuned and "bn_batch_frac" in tuned:  # --tune ran for this row: is its recipe the rows' own?
        own = full_recipe(tuned) == full_recipe({**TUNE_GRID[0], "bn_batch_frac": BN_FRACS[0]})
        # (each stage's first candidate: the rows' own)
        parts = ", ".join(w for k, w in RECIPE_PARTS.items() if k in tuned)  # what this record searched
        out += (f"; recipe ({parts}): the --tune choice" if own else
                f"; recipe NOT the --tune choice ({tuned}: see {row}-tuned)")
    return out


def kernel_split(ops: dict[str, int] | None) -> str:
    """'int / float': the layers onnxruntime runs on integer kernels, and in float."""
    return f"{ops['integer']} / {ops['float']}" if ops and "integer" in ops else "-"


def plot(path: Path) -> None:
    """A dot per measured row, in the table's order: top-1 through onnxruntime (torch where the
    export does not run), PTQ baselines, graphopt QAT and the peers in three colours, FP32 as a line."""
    from graphopt.plotting import pyplot, save_png

    plt = pyplot("--plot")

    res = load()
    measured = {base_of(k) for k in res}
    # a row measured only at a longer budget has its line too; a -tuned row's runs go on its base row's
    rows = [r for r in [*ROWS, *PEER_ROWS] if r in measured and r not in TUNED]

    def top1(r: dict) -> float:
        return r["ort_top1"] if r.get("ort_top1") is not None else r["torch_top1"]

    acc = [top1(res[r]) if r in res else None for r in rows]
    # other budgets (row@Nep): a star on their row's line, so the longer run reads against the short one
    # (a -tuned row's runs go on its base row's line, as diamonds)
    line = lambda k: TUNED.get(base_of(k), base_of(k))  # noqa: E731
    longer = [(rows.index(line(k)), top1(r), r["epochs"]) for k, r in res.items()
              if "@" in k and line(k) in rows and base_of(k) not in TUNED]
    tuned = [(rows.index(line(k)), top1(r), r["epochs"]) for k, r in res.items()
             if "@" in k and line(k) in rows and base_of(k) in TUNED]
    kind = ["peer" if r in PEER_ROWS else "PTQ, no training" if "ptq" in r else "graphopt QAT" for r in rows]
    colours = {"PTQ, no training": "0.55", "graphopt QAT": "tab:blue", "peer": "tab:orange"}
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(rows) + 1.4))
    ax.axvline(87.79, color="0.5", ls="--", lw=1, label="FP32 87.79")
    for k, c in colours.items():
        idx = [i for i, x in enumerate(kind) if x == k and acc[i] is not None]
        if idx:
            ax.scatter([acc[i] for i in idx], idx, color=c, s=40, label=k, zorder=3)
    for e in sorted({e for _, _, e in longer}):
        pts = [(a, i) for i, a, ep in longer if ep == e]
        ax.scatter(*zip(*pts), marker="*", s=110, color="tab:green", label=f"the same row, {e} epochs", zorder=4)
        for a, i in pts:
            ax.annotate(f"{a:.2f}", (a, i), xytext=(6, 3), textcoords="offset points", fontsize=7, color="tab:green")
    for e in sorted({e for _, _, e in tuned}):
        pts = [(a, i) for i, a, ep in tuned if ep == e]
        ax.scatter(*zip(*pts), marker="D", s=45, color="tab:purple", zorder=4,
                   label=f"the same row, {e} epochs, recipe chosen by --tune")
        for a, i in pts:
            ax.annotate(f"{a:.2f}", (a, i), xytext=(6, -11), textcoords="offset points", fontsize=7, color="tab:purple")
    for i, a in enumerate(acc):
        if a is not None:
            ax.annotate(f"{a:.2f}", (a, i), xytext=(5, -3), textcoords="offset points", fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.invert_yaxis()
    epochs = "/".join(str(e) for e in sorted({res[r]["epochs"] for r in rows if r in res and res[r]["epochs"]}))
    ax.set_xlabel("top-1 on 10,000 test images (onnxruntime; torch where the export does not run)")
    ax.set_title(f"ResNet-20 / CIFAR-10 QAT, {epochs} epochs per trained row" + (" (stars: longer)" if longer else ""),
                 fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    save_png(fig, path, dpi=120)
    print(f"wrote {path}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--row", help="the row to run (see --list)")
    ap.add_argument("--epochs", type=int, default=3, help="training epochs (the table states them)")
    ap.add_argument("--lr", type=float, default=LR, help="peak learning rate (a BN-folded net diverges at 0.01)")
    ap.add_argument("--limit", type=int, default=None, help="train on the first N training images (smoke runs: own checkpoints, not saved)")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--plot", metavar="FILE.png", help="draw every measured row's top-1 against FP32")
    ap.add_argument("--choose", action="store_true", help="score the LSQ starts on the validation split")
    ap.add_argument("--steps", type=int, default=100, help="--choose: fine-tuning steps where untrained cannot tell")
    ap.add_argument("--tune", metavar="ROW", help="choose ROW's learning rate, quantizer weight decay, BN "
                    "phase, distillation weight and learning-rate schedule on the validation split (the recipe "
                    "of ROW-tuned)")
    ap.add_argument("--tune-epochs", type=int, default=1, help="--tune: epochs per candidate (default %(default)s)")
    args = ap.parse_args()
    if args.choose:
        choose(args.steps)
        return 0
    if args.tune:
        tune(args.tune, args.tune_epochs)
        return 0
    if args.plot:
        plot(Path(args.plot))
        return 0
    if args.list:
        for row, (wb, ab, what) in PEER_ROWS.items():
            print(f"{row:14s} {what}: W{wb}A{ab}")
        for row, (opts, what) in ROWS.items():
            edge = EDGE + (f",first_last_act_bits={EDGE_ACT[row]}" if row in EDGE_ACT else "")
            print(f"{row:14s} {what}: quantize{{{opts},{edge}}}" + (f" + {BN_BATCH[row]} epochs batch-statistics BN" if row in BN_BATCH else ""))
        return 0
    if args.table:
        table()
        return 0
    if args.row not in ROWS and args.row not in PEER_ROWS:
        ap.error(f"--row must be one of {', '.join([*ROWS, *PEER_ROWS])}")
    run = run_peer if args.row in PEER_ROWS else run_row
    if args.limit:  # a smoke run: its own checkpoints (a real run must not resume from them), no result saved
        global WORK
        WORK = WORK / "smoke"
    result = run(args.row, args.epochs, args.lr, args.limit)
    if not args.limit:
        res = load()
        if args.row in TUNED:  # the recipe it trained with: a later --tune that chooses another marks it stale
            result["recipe"] = full_recipe(tuned_recipe(args.row, res))
        res[key_of(args.row, args.epochs)] = {**result, "chosen_on": chosen_on(args.row, res, ran=result.get("recipe"))}
        save(res)
    print(json.dumps({key_of(args.row, args.epochs): result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
