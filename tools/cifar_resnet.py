"""The CIFAR ResNets of He et al. 2016 (section 4.2) in plain torch, as ../shared/models/README.md
describes them, loaded from the shared .npz (no pickle). Evaluates ResNet-20 (and -56) on the
CIFAR-10 test set through the original module, graphopt's torch back end and onnxruntime on
graphopt's ONNX output.

  python tools/cifar_resnet.py [--depth 20|56] [--limit N]
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from common import SHARED, batched, cifar10, cifar_normalize, need_shared, ort_session
from torch import nn

STATED_FP32 = {20: 87.79, 56: 89.68}


class BasicBlock(nn.Module):
    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.pad = planes // 4 if (stride != 1 or cin != planes) else 0

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.pad:  # option A shortcut: subsample, zero-pad the channels
            x = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad), "constant", 0)
        return F.relu(out + x)


class CifarResNet(nn.Module):
    def __init__(self, depth: int = 20, num_classes: int = 10):
        super().__init__()
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        cin = 16
        for i, planes in enumerate((16, 32, 64), start=1):
            blocks = []
            for j in range(n):
                stride = 2 if (j == 0 and i > 1) else 1
                blocks.append(BasicBlock(cin, planes, stride))
                cin = planes
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.linear(x)


def resnet_cifar(depth: int = 20) -> CifarResNet:
    path = need_shared(SHARED / "models" / f"resnet{depth}_cifar10.npz")
    model = CifarResNet(depth)
    with np.load(path) as d:
        state = {k: torch.from_numpy(d[k]) for k in d.files}
    model.load_state_dict(state)
    return model.eval()


def accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    return float((logits.argmax(1) == y).mean() * 100)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=20, choices=(20, 56))
    ap.add_argument("--limit", type=int, default=None, help="evaluate on N test images (a fixed sample of all classes)")
    args = ap.parse_args()
    import graphopt

    x8, y = cifar10("test")
    x = cifar_normalize(x8[: args.limit])
    y = y[: args.limit]
    model = resnet_cifar(args.depth)
    t0 = time.perf_counter()
    g = graphopt.from_torch(model, torch.from_numpy(x[:2]))
    t_conv = time.perf_counter() - t0
    tm = graphopt.to_torch(g).eval()
    sess = ort_session(graphopt.to_onnx(g))
    with torch.no_grad():
        ref = batched(lambda b: model(torch.from_numpy(b)).numpy(), x, 500)
        via_torch = batched(lambda b: tm(torch.from_numpy(b)).numpy(), x, 500)
    via_ort = batched(lambda b: sess.run(None, {g.inputs[0].name: b})[0], x, 500)
    print(f"ResNet-{args.depth} on CIFAR-10 test ({len(y)} images); front end took {t_conv * 1e3:.0f} ms")
    print(f"{'path':36s} {'top-1 %':>8s} {'rel. err vs module':>20s}")
    rel = lambda a: float(np.linalg.norm(a - ref) / np.linalg.norm(ref))  # noqa: E731
    print(f"{'original nn.Module':36s} {accuracy(ref, y):8.2f} {'-':>20s}")
    print(f"{'from_torch -> to_torch (torch back end)':36s} {accuracy(via_torch, y):8.2f} {rel(via_torch):20.2e}")
    print(f"{'from_torch -> to_onnx -> onnxruntime':36s} {accuracy(via_ort, y):8.2f} {rel(via_ort):20.2e}")
    print(f"stated FP32 in models/README.md: {STATED_FP32[args.depth]:.2f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
