"""Small self-built networks for the tests (no ../shared needed)."""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import torch
from torch import nn


class InvertedResidual(nn.Module):
    def __init__(self, c, expand=4, stride=1):
        super().__init__()
        m = c * expand
        self.pw = nn.Conv2d(c, m, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(m)
        self.dw = nn.Conv2d(m, m, 3, stride, 1, groups=m, bias=False)
        self.bn2 = nn.BatchNorm2d(m)
        self.pwl = nn.Conv2d(m, c, 1)
        self.act = nn.ReLU6()
        self.skip = stride == 1

    def forward(self, x):
        y = self.act(self.bn1(self.pw(x)))
        y = self.act(self.bn2(self.dw(y)))
        y = self.pwl(y)
        return x + y if self.skip else y


class MobileNetV2ish(nn.Module):
    """Depthwise convs, ReLU6, inverted residuals, global pool + linear head."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 2, 1)
        self.act = nn.ReLU6()
        self.b1 = InvertedResidual(8)
        self.b2 = InvertedResidual(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(0.1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        x = self.b2(self.b1(self.act(self.stem(x))))
        return self.fc(self.drop(torch.flatten(self.pool(x), 1)))


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.down is None else self.down(x)))


class ResNetish(nn.Module):
    """Residual adds and a strided downsample."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.l1 = BasicBlock(8, 8, 1)
        self.l2 = BasicBlock(8, 16, 2)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        x = self.l2(self.l1(x))
        return self.fc(x.mean((2, 3)))


class ConcatNet(nn.Module):
    """Two branches joined by channel concat; flatten into a linear layer."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, 1, 1)
        self.b = nn.Conv2d(3, 6, 1)
        self.c = nn.Conv2d(10, 8, 3, 2, 1)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        y = torch.cat([torch.relu(self.a(x)), torch.sigmoid(self.b(x))], 1)
        return self.fc(torch.flatten(torch.relu(self.c(y)), 1))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 4))

    def forward(self, x):
        return self.net(x)


class SplitNet(nn.Module):
    """Split into unequal chunks, process each, concat back."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 12, 3, 1, 1)
        self.a = nn.Conv2d(4, 4, 3, 1, 1, groups=2)
        self.b = nn.Conv2d(8, 8, 1)
        self.head = nn.Conv2d(12, 6, 1)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        p, q = torch.split(y, [4, 8], dim=1)
        return self.head(torch.cat([self.a(p), torch.relu(self.b(q))], dim=1))


class SEBlock(nn.Module):
    """Squeeze-excitation: a [N,C,1,1] gate multiplied onto [N,C,H,W] (broadcast mul)."""

    def __init__(self, c=8):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, 1, 1)
        self.bn = nn.BatchNorm2d(c)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(c, 4, 1)
        self.fc2 = nn.Conv2d(4, c, 1)
        self.out = nn.Conv2d(c, 4, 1)

    def forward(self, x):
        y = torch.nn.functional.silu(self.bn(self.conv(x)))
        gate = torch.sigmoid(self.fc2(torch.relu(self.fc1(self.pool(y)))))
        return self.out(y * gate)


class TinyTransformer(nn.Module):
    """One pre-norm transformer block: LayerNorm, attention (MatMul, Softmax), GELU MLP."""

    def __init__(self, d=16, heads=2):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x):  # x: [N, T, d]
        n, t, d = x.shape
        h = self.heads
        q, k, v = self.qkv(self.ln1(x)).chunk(3, dim=-1)
        q = q.reshape(n, t, h, d // h).transpose(1, 2)
        k = k.reshape(n, t, h, d // h).transpose(1, 2)
        v = v.reshape(n, t, h, d // h).transpose(1, 2)
        att = torch.softmax(q @ k.transpose(-2, -1) * (1.0 / (d // h) ** 0.5), dim=-1)
        y = (att @ v).transpose(1, 2).reshape(n, t, d)
        x = x + self.proj(y)
        return x + self.fc2(self.act(self.fc1(self.ln2(x))))


NETS = {
    "mobilenetv2": (MobileNetV2ish, (2, 3, 16, 16)),
    "resnet": (ResNetish, (2, 3, 16, 16)),
    "concat": (ConcatNet, (2, 3, 8, 8)),
    "mlp": (MLP, (3, 16)),
    "split": (SplitNet, (2, 3, 8, 8)),
    "se": (SEBlock, (2, 3, 8, 8)),
    "transformer": (TinyTransformer, (2, 5, 16)),
}


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give BN layers non-trivial statistics so folding and equivalence tests mean something."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(n, generator=g))
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.5)
    return model


def build(name: str, seed: int = 0) -> tuple[nn.Module, np.ndarray]:
    cls, shape = NETS[name]
    torch.manual_seed(seed)
    model = randomize_bn(cls()).eval()
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return model, x


def export(model: nn.Module, x: np.ndarray, opset: int = 17, fold: bool = True) -> onnx.ModelProto:
    """torch -> ONNX with the TorchScript exporter (dynamic batch)."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.from_numpy(x),), buf, dynamo=False, opset_version=opset,
                          do_constant_folding=fold, input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    return onnx.load_from_string(buf.getvalue())


def run_ort(model: onnx.ModelProto | str, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    sess = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """L2 norm of the difference over the L2 norm of the reference ``b``."""
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / max(np.linalg.norm(b), 1e-30))


def run_one_and_two_ranks(script, one: str, two: str, *args: str, timeout: int = 300) -> None:
    """Run a DDP worker ``script`` (argv: rank, world size, output stem, *args) as one process with
    output ``one``, then as two gloo ranks with output ``two``, at one thread each; fail on a
    non-zero exit with the worker's stderr."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1")
    single = subprocess.run([sys.executable, str(script), "0", "1", str(one), *args], env=env, capture_output=True,
                            text=True, timeout=timeout)
    assert single.returncode == 0, single.stderr
    procs = [subprocess.Popen([sys.executable, str(script), str(r), "2", str(two), *args], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, err


def graphopt_cli(*args: str, nproc: int = 1, port: int = 29531, timeout: int = 300):
    """``python -m graphopt.cli ARGS`` at one thread, or under ``torchrun`` with ``nproc`` processes
    on ``port``; fails on a non-zero exit with its stderr, and returns the completed process."""
    import os
    import subprocess
    import sys

    launch = ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port)] if nproc > 1 \
        else []
    r = subprocess.run([sys.executable, *launch, "-m", "graphopt.cli", *map(str, args)],
                       env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr
    return r
