"""Benchmark structured pruning.

  python tools/bench_prune.py [--ratio 0.3] [--effnet-round-to 8 16] [--resnet-ratio 0.5]
                              [--finetune-epochs 20 [--ft-model inner|stream|depth]] [--limit N]

1. EfficientNet-Lite0 ONNX (../shared): `prune-channels{ratio,round_to},fold-prune` on every
   prunable group, one row per round_to; the MACs ratio next to onnxruntime's latency ratio,
   measured as paired rounds (median and quartiles), and the share of the MAC reduction realized.
2. ResNet-56 / CIFAR-10 (../shared): L1/L2 pruning of about half the MACs by graphopt and by
   Torch-Pruning (DepGraph, `pip install --no-deps torch-pruning`) on the same model and ratio, in
   the same run: accuracy *before* fine-tuning (and after graphopt's recalibrate-bn), MACs and
   parameter ratios, time to prune, and onnxruntime latency. Also depth pruning
   (`prune-blocks{target_macs}`, greedy by output error on 512 training images), which has no
   Torch-Pruning counterpart. With --finetune-epochs N: recovery fine-tuning (distillation +
   labels, BN training) of one of graphopt's pruned models (--ft-model), and its accuracy on the
   test set.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
from common import (
    SHARED,
    batched,
    cifar10,
    cifar_augment,
    cifar_normalize,
    need_shared,
    ort_session,
    paired_latency_ratios,
    ratio_summary,
)


def latency(ref, model, x: np.ndarray, rounds: int, macs_ratio: float) -> str:
    """Paired onnxruntime latency ratio model/ref on input x: median (quartiles) and realized share."""
    sr, sm = ort_session(ref), ort_session(model)
    r = paired_latency_ratios(sr, sm, {sr.get_inputs()[0].name: x}, {sm.get_inputs()[0].name: x}, rounds)
    return ratio_summary(r, macs_ratio)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--resnet-ratio", type=float, default=0.5, help="channel ratio for ResNet-56's prunable groups")
    ap.add_argument("--rounds", type=int, default=30, help="paired latency rounds (median and quartiles)")
    ap.add_argument("--round-to", type=int, default=8, help="ResNet-56: keep channel counts multiples of this")
    ap.add_argument("--effnet-round-to", type=int, nargs="+", default=[8, 16],
                    help="EfficientNet-Lite0: one row per value (16 = onnxruntime's NCHWc block on AVX-512)")
    ap.add_argument("--limit", type=int, default=None, help="CIFAR test images to evaluate (a fixed sample of all classes)")
    ap.add_argument("--finetune-epochs", type=int, default=0,
                    help="recovery fine-tuning budget for ResNet-56 (epochs over the 50k training images)")
    ap.add_argument("--ft-optimizer", default="sgd", choices=("adam", "sgd"))
    ap.add_argument("--ft-lr", type=float, default=0.05)
    ap.add_argument("--ft-checkpoint", help="checkpoint file: written every epoch, resumed from if it exists")
    ap.add_argument("--criterion", default="l2", choices=("l1", "l2"), help="the pruned ResNet-56 to fine-tune")
    ap.add_argument("--stream-ratio", type=float, default=0.5,
                    help="channel ratio of stages 2-3 when their residual stream is pruned too")
    ap.add_argument("--ft-model", default="inner", choices=("inner", "stream", "depth"),
                    help="fine-tune the inner-only, the stream-and-inner, or the block-pruned ResNet-56")
    ap.add_argument("--depth-macs", type=float, default=0.52,
                    help="prune-blocks{target_macs}: remove residual blocks until at most this share of the MACs")
    ap.add_argument("--ft-max-steps", type=int, help="stop fine-tuning after this many steps (a smoke run)")
    ap.add_argument("--save", help="write the fine-tuned pruned ResNet-56 here (ONNX)")
    ap.add_argument("--recal-images", type=int, default=512,
                    help="unlabeled training images for the recalibrate-bn rows (adaptive BN)")
    args = ap.parse_args()
    import graphopt
    from graphopt.analysis import total_macs
    from graphopt.passmanager import Context, PassManager

    src = need_shared(SHARED / "models" / "efficientnet_lite0.onnx")
    g0 = PassManager("canonicalize").run(graphopt.load_onnx(src)).graph
    full = graphopt.to_onnx(g0)
    x1 = np.random.default_rng(0).uniform(-1, 1, (1, 3, 224, 224)).astype(np.float32)
    x32 = np.random.default_rng(0).uniform(-1, 1, (32, 3, 224, 224)).astype(np.float32)
    for rt in args.effnet_round_to:
        pipe = f"prune-channels{{ratio={args.ratio},round_to={rt}}},fold-prune"
        t = time.perf_counter()
        r = PassManager(pipe).run(g0.copy())
        dt = time.perf_counter() - t
        small = graphopt.to_onnx(r.graph)
        mr = total_macs(r.graph) / total_macs(g0)
        print(f"== EfficientNet-Lite0: {pipe} in {dt:.2f} s ({r.stats['prune-channels'][0]['pruned_groups']} groups "
              f"pruned, {len(r.stats['prune-channels'][0]['unprunable'])} layers unprunable)")
        print(f"MACs ratio {mr:.3f}, params ratio {r.graph.num_params() / g0.num_params():.3f}; onnxruntime latency "
              f"ratio, median (quartiles) of {args.rounds} paired rounds, and the realized share of the MACs "
              f"reduction (target >= 80%):")
        print(f"  batch  1: {latency(full, small, x1, args.rounds, mr)}")
        print(f"  batch 32: {latency(full, small, x32, max(5, args.rounds // 3), mr)}")

    from cifar_resnet import resnet_cifar

    x8, y = cifar10("test")
    xt, yt = cifar_normalize(x8[: args.limit]), y[: args.limit]
    ex = torch.from_numpy(xt[:2])
    acc = lambda logits: 100 * float((logits.argmax(1) == yt).mean())  # noqa: E731
    # BN stays unfolded through pruning and fine-tuning (it trains as in torch); fold-bn before export
    g_bn = PassManager("canonicalize").run(graphopt.from_torch(resnet_cifar(56), ex)).graph
    folded = lambda gr: PassManager("fold-bn").run(gr.copy()).graph  # noqa: E731
    g = folded(g_bn)
    g_onnx = graphopt.to_onnx(g)
    run = lambda s: batched(lambda b: s.run(None, {s.get_inputs()[0].name: b})[0], xt, 500)  # noqa: E731
    rows = [("FP32 ResNet-56", acc(run(ort_session(g_onnx))), 1.0, 1.0, None)]
    pruned = {}  # (criterion, variant) -> (pruned graph with BN, BN folded, top-1 before fine-tuning)
    # "inner": each block's inner channels only; the residual stream (every layer writing into it,
    # found by the analysis through the option-A padding) is skipped, as Torch-Pruning needs by hand.
    # "stream": the residual stream too, at --stream-ratio, with stage 1 (16 channels wide: one SIMD
    # block of onnxruntime's NCHWc convs on AVX-512) kept whole.
    # "depth": whole residual blocks removed (greedy, least output error on the calibration images).
    chan = "prune-channels{{ratio={},criterion={},round_to={}{}}},fold-prune"
    variants = [(("l1", "inner"), chan.format(args.resnet_ratio, "l1", args.round_to, ",skip=[*conv2]"),
                 "graphopt L1 inner only"),
                (("l2", "inner"), chan.format(args.resnet_ratio, "l2", args.round_to, ",skip=[*conv2]"),
                 "graphopt L2 inner only"),
                ((args.criterion, "stream"), chan.format(args.stream_ratio, args.criterion, args.round_to,
                                                         ",skip=[conv1,layer1.*]"),
                 f"graphopt {args.criterion.upper()} + stream, stage 1 kept, {args.stream_ratio}"),
                (("blocks", "depth"), f"prune-blocks{{target_macs={args.depth_macs}}}", "graphopt prune-blocks")]
    # adaptive BN rows: each pruned model's unfolded BN statistics re-estimated on unlabeled training images
    xtr8, ytr = cifar10("train")
    calib = cifar_normalize(xtr8[np.random.default_rng(0).choice(len(xtr8), args.recal_images, replace=False)])
    for key, pipe, label in variants:
        t = time.perf_counter()
        rp = PassManager(pipe).run(g_bn.copy(), Context(calib=calib))
        t_ours = time.perf_counter() - t
        gf = folded(rp.graph)
        a = acc(run(ort_session(graphopt.to_onnx(gf))))
        pruned[key] = (rp.graph, gf, a)
        if "prune-blocks" in rp.stats:
            label += f", {rp.stats['prune-blocks'][0]['removed']} of 27 blocks"
        rows.append((label, a, total_macs(gf) / total_macs(g), gf.num_params() / g.num_params(), t_ours))
        t = time.perf_counter()
        gr = folded(PassManager("recalibrate-bn").run(rp.graph.copy(), Context(calib=calib)).graph)
        rows.append((f"  + recalibrate-bn ({args.recal_images} images)", acc(run(ort_session(graphopt.to_onnx(gr)))),
                     total_macs(gr) / total_macs(g), gr.num_params() / g.num_params(), time.perf_counter() - t))
    try:
        import torch_pruning as tp

        macs0, params0 = tp.utils.count_ops_and_params(resnet_cifar(56), ex[:1])

        def tp_prune(p: int, manual: bool):
            m = resnet_cifar(56)
            ignored = [m.linear]
            if manual:  # the residual stream, by hand: every layer writing into it
                ignored += [m.conv1] + [b.conv2 for lay in (m.layer1, m.layer2, m.layer3) for b in lay]
            t = time.perf_counter()
            pruner = tp.pruner.MagnitudePruner(m, ex, importance=tp.importance.MagnitudeImportance(p=p),
                                               pruning_ratio=args.resnet_ratio, ignored_layers=ignored,
                                               round_to=args.round_to)
            pruner.step()
            t_tp = time.perf_counter() - t
            macs1, params1 = tp.utils.count_ops_and_params(m, ex[:1])
            with torch.no_grad():
                logits = batched(lambda b: m(torch.from_numpy(b)).numpy(), xt, 500)
            return acc(logits), macs1 / macs0, params1 / params0, t_tp

        try:
            tp_prune(1, manual=False)
            print("(Torch-Pruning with ignored_layers=[linear] ran)")
        except Exception as e:  # the peer failing is a result too: print it
            print(f"Torch-Pruning {tp.__version__} MagnitudePruner with ignored_layers=[linear] fails on this model: "
                  f"{type(e).__name__}: {str(e).splitlines()[0][:120]}")
        for p in (1, 2):
            rows.append((f"Torch-Pruning L{p}, stream ignored by hand", *tp_prune(p, manual=True)))
    except ImportError:
        print("(Torch-Pruning rows skipped: pip install --no-deps torch-pruning)")
    print(f"\n== ResNet-56 / CIFAR-10 test ({len(yt)} images), inner ratio {args.resnet_ratio}, round_to "
          f"{args.round_to}, before fine-tuning")
    print(f"{'method':40s} {'top-1 %':>8s} {'MACs':>6s} {'params':>7s} {'prune s':>8s}")
    for name, a, mr_, pr_, secs in rows:
        print(f"{name:40s} {a:8.2f} {mr_:6.3f} {pr_:7.3f} {'-' if secs is None else f'{secs:8.2f}'}")
    print(f"onnxruntime latency ratio against FP32, median (quartiles) of {args.rounds} paired rounds, and the "
          f"realized share of the MACs reduction (target >= 80%):")
    for key in ((args.criterion, "inner"), (args.criterion, "stream"), ("blocks", "depth")):
        fp = pruned[key][1]
        mr, small = total_macs(fp) / total_macs(g), graphopt.to_onnx(fp)
        for b, rounds in ((256, max(5, args.rounds // 3)), (1, args.rounds)):
            print(f"  graphopt {key[0].upper():6s} {key[1]:6s} (MACs {mr:.3f}) batch {b:3d}: "
                  f"{latency(g_onnx, small, xt[:b], rounds, mr)}")
    if args.finetune_epochs:
        from graphopt.training.finetune import FinetuneConfig, finetune
        from graphopt.util import tune_allocator

        tune_allocator()
        xtr = cifar_normalize(xtr8)
        student, student_folded, a0 = pruned[("blocks" if args.ft_model == "depth" else args.criterion, args.ft_model)]
        mr = total_macs(student_folded) / total_macs(g)
        t = time.perf_counter()
        stats = finetune(student, xtr, ytr, teacher=g, config=FinetuneConfig(
            epochs=args.finetune_epochs, batch_size=128, lr=args.ft_lr, optimizer=args.ft_optimizer, kd_weight=0.7,
            temperature=4.0, weight_decay=5e-4, transform=cifar_augment, checkpoint=args.ft_checkpoint,
            resume=bool(args.ft_checkpoint), max_steps=args.ft_max_steps))
        dt = time.perf_counter() - t
        final = folded(student)
        a_ft = acc(run(ort_session(graphopt.to_onnx(final))))
        if args.save:
            graphopt.save_onnx(final, args.save)
        print(f"\n== fine-tuning budget: {stats['epochs']} epochs over the 50,000 training images "
              f"({args.ft_optimizer} lr {args.ft_lr} cosine, batch 128, distillation from the unpruned model + labels, "
              f"crop/flip; BN trains), {stats['steps']} steps, {dt / 60:.1f} min on {torch.get_num_threads()} threads")
        print(f"top-1 {a0:.2f} % -> {a_ft:.2f} % vs FP32 {rows[0][1]:.2f} % (loss {rows[0][1] - a_ft:+.2f} pt, "
              f"target <= 1.5) at {mr:.3f} of the MACs and {final.num_params() / g.num_params():.3f} of the params")
    return 0


if __name__ == "__main__":
    sys.exit(main())
