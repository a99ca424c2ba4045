"""Benchmark structured pruning (what is implemented so far; see issue notes for what is not).

  python tools/bench_prune.py [--ratio 0.3] [--resnet-ratio 0.3] [--repeat 15]

1. EfficientNet-Lite0 ONNX (../shared): `prune-channels{ratio},fold-prune` on every prunable group;
   the MACs ratio next to onnxruntime's measured latency ratio (the realized speed-up).
2. ResNet-56 / CIFAR-10 (../shared): L1 pruning of about half the MACs by graphopt (on the ONNX-
   or torch-born IR) and by Torch-Pruning (DepGraph, `pip install torch-pruning`) on the same
   model and ratio, in the same run: accuracy *before* fine-tuning, MACs and parameter ratios,
   time to prune, and onnxruntime latency. Recovery fine-tuning is not implemented yet.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
from common import SHARED, batched, cifar10, cifar_normalize, median_time, need_shared, ort_session


def interleaved_latency(models: dict, x: np.ndarray, repeat: int) -> dict:
    sess = {k: ort_session(m) for k, m in models.items()}
    names = {k: s.get_inputs()[0].name for k, s in sess.items()}
    for k, s in sess.items():
        s.run(None, {names[k]: x})
    t = {k: [] for k in sess}
    for _ in range(repeat):
        for k, s in sess.items():
            t[k].append(median_time(lambda s=s, k=k: s.run(None, {names[k]: x}), 3, 0))
    return {k: float(np.median(v)) for k, v in t.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--resnet-ratio", type=float, default=0.5, help="channel ratio for ResNet-56's prunable groups")
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--round-to", type=int, default=8, help="keep channel counts multiples of this (SIMD blocks)")
    ap.add_argument("--limit", type=int, default=None, help="CIFAR test images to evaluate")
    ap.add_argument("--finetune-epochs", type=int, default=0,
                    help="recovery fine-tuning budget for ResNet-56 (epochs over the 50k training images)")
    ap.add_argument("--ft-optimizer", default="adam", choices=("adam", "sgd"))
    ap.add_argument("--ft-lr", type=float, default=1e-3)
    args = ap.parse_args()
    import graphopt
    from graphopt.analysis import total_macs
    from graphopt.passmanager import PassManager

    src = need_shared(SHARED / "models" / "efficientnet_lite0.onnx")
    g0 = PassManager("canonicalize").run(graphopt.load_onnx(src)).graph
    t = time.perf_counter()
    r = PassManager(f"prune-channels{{ratio={args.ratio},round_to={args.round_to}}},fold-prune").run(g0.copy())
    dt = time.perf_counter() - t
    small = graphopt.to_onnx(r.graph)
    x1 = np.random.default_rng(0).uniform(-1, 1, (1, 3, 224, 224)).astype(np.float32)
    x32 = np.random.default_rng(0).uniform(-1, 1, (32, 3, 224, 224)).astype(np.float32)
    lat1 = interleaved_latency({"fp32": graphopt.to_onnx(g0), "pruned": small}, x1, args.repeat)
    lat32 = interleaved_latency({"fp32": graphopt.to_onnx(g0), "pruned": small}, x32, max(3, args.repeat // 3))
    mr = total_macs(r.graph) / total_macs(g0)
    print(f"== EfficientNet-Lite0: prune-channels{{ratio={args.ratio},round_to={args.round_to}}},fold-prune in {dt:.2f} s "
          f"({r.stats['prune-channels'][0]['pruned_groups']} groups pruned, "
          f"{len(r.stats['prune-channels'][0]['unprunable'])} layers unprunable)")
    print(f"MACs ratio {mr:.3f}, params ratio {r.graph.num_params() / g0.num_params():.3f}; onnxruntime latency ratio "
          f"batch 1 {lat1['pruned'] / lat1['fp32']:.3f}, batch 32 {lat32['pruned'] / lat32['fp32']:.3f}")
    print(f"realized share of the MACs reduction: batch 1 {(1 - lat1['pruned'] / lat1['fp32']) / (1 - mr):.0%}, "
          f"batch 32 {(1 - lat32['pruned'] / lat32['fp32']) / (1 - mr):.0%} (target >= 80%)")

    from cifar_resnet import resnet_cifar

    x8, y = cifar10("test")
    xt, yt = cifar_normalize(x8[: args.limit]), y[: args.limit]
    model = resnet_cifar(56)
    ex = torch.from_numpy(xt[:2])
    acc = lambda logits: 100 * float((logits.argmax(1) == yt).mean())  # noqa: E731
    g = graphopt.from_torch(model, ex)
    g = PassManager("canonicalize,fold-bn").run(g).graph
    t = time.perf_counter()
    rp = PassManager(f"prune-channels{{ratio={args.resnet_ratio},criterion=l1,round_to={args.round_to}}},"
                     "fold-prune").run(g.copy())
    t_ours = time.perf_counter() - t
    sess_f, sess_p = ort_session(graphopt.to_onnx(g)), ort_session(graphopt.to_onnx(rp.graph))
    run = lambda s: batched(lambda b: s.run(None, {s.get_inputs()[0].name: b})[0], xt, 500)  # noqa: E731
    rows = [("FP32 ResNet-56", acc(run(sess_f)), 1.0, 1.0, None)]
    rows.append(("graphopt prune-channels (L1)", acc(run(sess_p)), total_macs(rp.graph) / total_macs(g),
                 rp.graph.num_params() / g.num_params(), t_ours))
    try:
        import torch_pruning as tp

        m = resnet_cifar(56)
        t = time.perf_counter()
        imp = tp.importance.MagnitudeImportance(p=1)
        pruner = tp.pruner.MagnitudePruner(m, ex, importance=imp, pruning_ratio=args.resnet_ratio,
                                           ignored_layers=[m.linear])
        pruner.step()
        t_tp = time.perf_counter() - t
        macs0, params0 = tp.utils.count_ops_and_params(resnet_cifar(56), ex[:1])
        macs1, params1 = tp.utils.count_ops_and_params(m, ex[:1])
        with torch.no_grad():
            logits = batched(lambda b: m(torch.from_numpy(b)).numpy(), xt, 500)
        rows.append(("Torch-Pruning MagnitudePruner (L1)", acc(logits), macs1 / macs0, params1 / params0, t_tp))
    except ImportError:
        print("(Torch-Pruning row skipped: pip install --no-deps torch-pruning)")
    except Exception as e:  # the peer failing is a result too: print it
        print(f"(Torch-Pruning failed on this model: {type(e).__name__}: {str(e).splitlines()[0]})")
    print(f"\n== ResNet-56 / CIFAR-10 test ({len(yt)} images), channel ratio {args.resnet_ratio}, NO fine-tuning yet")
    print(f"{'method':36s} {'top-1 %':>8s} {'MACs':>6s} {'params':>7s} {'prune s':>8s}")
    for name, a, mr_, pr_, secs in rows:
        print(f"{name:36s} {a:8.2f} {mr_:6.3f} {pr_:7.3f} {'-' if secs is None else f'{secs:8.2f}'}")
    lat = interleaved_latency({"fp32": graphopt.to_onnx(g), "pruned": graphopt.to_onnx(rp.graph)},
                              xt[:256], max(3, args.repeat // 3))
    print(f"graphopt pruned ResNet-56 onnxruntime latency ratio (batch 256): {lat['pruned'] / lat['fp32']:.3f}")
    if args.finetune_epochs:
        from graphopt.finetune import FinetuneConfig, finetune
        from graphopt.util import tune_allocator

        tune_allocator()
        xtr8, ytr = cifar10("train")
        xtr = cifar_normalize(xtr8)
        t = time.perf_counter()
        stats = finetune(rp.graph, xtr, ytr, teacher=g, config=FinetuneConfig(
            epochs=args.finetune_epochs, batch_size=128, lr=args.ft_lr, optimizer=args.ft_optimizer, kd_weight=0.7,
            temperature=4.0, weight_decay=5e-4, transform=cifar_augment))
        dt = time.perf_counter() - t
        a_ft = acc(run(ort_session(graphopt.to_onnx(rp.graph))))
        print(f"after {stats['epochs']} epochs of distillation + labels ({args.ft_optimizer} lr {args.ft_lr}, "
              f"{stats['steps']} steps, {dt / 60:.1f} min on "
              f"{torch.get_num_threads()} threads): top-1 {a_ft:.2f} % vs FP32 {rows[0][1]:.2f} % "
              f"(loss {rows[0][1] - a_ft:+.2f} pt) at {rows[1][2]:.3f} of the MACs")
    return 0


def cifar_augment(batch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random crop with 4-pixel zero padding and random horizontal flip, vectorized."""
    n, c, h, w = batch.shape
    padded = np.pad(batch, ((0, 0), (0, 0), (4, 4), (4, 4)))
    dy, dx = rng.integers(0, 9, n), rng.integers(0, 9, n)
    rows = dy[:, None] + np.arange(h)[None, :]
    cols = dx[:, None] + np.arange(w)[None, :]
    out = padded[np.arange(n)[:, None, None, None], np.arange(c)[None, :, None, None],
                 rows[:, None, :, None], cols[:, None, None, :]]
    flip = rng.random(n) < 0.5
    out[flip] = out[flip][..., ::-1]
    return out


if __name__ == "__main__":
    sys.exit(main())
