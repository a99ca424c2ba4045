"""The Brevitas peer of tools/bench_qat.py: ResNet-20 with Brevitas quantized layers, trained
with the recipe graphopt's rows use, then exported with Brevitas's own QCDQ ONNX export.

What a Brevitas user writes: ``QuantConv2d`` / ``QuantLinear`` with per-channel float-scaled
weights (``Int8WeightPerChannelFloat`` at ``weight_bit_width``), ``QuantReLU`` activations
(``Uint8ActPerTensorFloat``: learned scale after a statistics warm-up) at ``act_bit_width``, a
``QuantIdentity`` on the network input and before the classifier, and BatchNorm kept as float
``nn.BatchNorm2d`` modules that train with batch statistics (Brevitas does not fold BN during
QAT). Weights come from the same pretrained FP32 ResNet-20; the first conv and the classifier
have 8-bit weights, as graphopt's rows do.

It trains with ``peers.train_loop.train``, the plain-torch copy of graphopt's finetune recipe.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peers.train_loop import train  # noqa: E402,F401  (the peers' shared loop)


def _layers(mse: bool = False):
    """Brevitas's stock quantizers (max-|w| weight scale, statistics-initialized activation scale),
    or with ``mse`` its MSE-searched variants: the calibrated-range start graphopt's -mse rows use."""
    import brevitas.nn as qnn
    from brevitas import quant as bq

    if mse:
        return qnn, bq.Int8WeightPerChannelFloatMSE, bq.Uint8ActPerTensorFloatMSE, bq.Int8ActPerTensorFloatMSE
    return qnn, bq.Int8WeightPerChannelFloat, bq.Uint8ActPerTensorFloat, bq.Int8ActPerTensorFloat


class QuantBlock(nn.Module):
    def __init__(self, cin: int, planes: int, stride: int, wb: int, ab: int, mse: bool = False):
        super().__init__()
        qnn, WQ, AQ, _ = _layers(mse)
        self.conv1 = qnn.QuantConv2d(cin, planes, 3, stride, 1, bias=False, weight_quant=WQ, weight_bit_width=wb)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = qnn.QuantReLU(act_quant=AQ, bit_width=ab)
        self.conv2 = qnn.QuantConv2d(planes, planes, 3, 1, 1, bias=False, weight_quant=WQ, weight_bit_width=wb)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = qnn.QuantReLU(act_quant=AQ, bit_width=ab)
        self.pad = planes // 4 if (stride != 1 or cin != planes) else 0

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.pad:  # option A shortcut, as the FP32 model
            x = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad), "constant", 0)
        return self.relu2(out + x)


class QuantResNet20(nn.Module):
    """ResNet-20 (He et al. 2016, option A) with Brevitas layers at W``wb``/A``ab``; ``edge_ab``:
    the bits of the network input and of the classifier's input."""

    def __init__(self, wb: int, ab: int, edge_ab: int, num_classes: int = 10, mse: bool = False):
        super().__init__()
        qnn, WQ, AQ, SAQ = _layers(mse)
        self.inp = qnn.QuantIdentity(act_quant=SAQ, bit_width=edge_ab)
        self.conv1 = qnn.QuantConv2d(3, 16, 3, 1, 1, bias=False, weight_quant=WQ, weight_bit_width=8)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu1 = qnn.QuantReLU(act_quant=AQ, bit_width=ab)
        cin = 16
        for i, planes in enumerate((16, 32, 64), start=1):
            blocks = []
            for j in range(3):
                blocks.append(QuantBlock(cin, planes, 2 if (j == 0 and i > 1) else 1, wb, ab, mse))
                cin = planes
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
        self.pool_q = qnn.QuantIdentity(act_quant=AQ, bit_width=edge_ab)
        self.linear = qnn.QuantLinear(64, num_classes, bias=True, weight_quant=WQ, weight_bit_width=8)

    def forward(self, x):
        x = self.relu1(self.bn1(self.conv1(self.inp(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.pool_q(F.adaptive_avg_pool2d(x, 1).flatten(1))
        return self.linear(x)


def from_fp32(fp32: nn.Module, wb: int, ab: int, edge_ab: int, mse: bool = False) -> QuantResNet20:
    """The Brevitas network with the FP32 model's weights and BN statistics (``mse``: its MSE
    quantizers)."""
    model = QuantResNet20(wb, ab, edge_ab, mse=mse)
    missing, unexpected = model.load_state_dict(fp32.state_dict(), strict=False)
    if unexpected or any(not ("quant" in k or "scaling" in k) for k in missing):
        raise RuntimeError(f"weights do not map onto the Brevitas model: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    return model


def export(model: nn.Module, path: Path) -> str | None:
    """Brevitas's QCDQ export (standard QuantizeLinear / Clip / DequantizeLinear); None, or why it failed."""
    from brevitas.export import export_onnx_qcdq

    try:
        # the TorchScript exporter Brevitas's export handlers are written for (torch's dynamo
        # exporter lifts their constants into graph inputs)
        export_onnx_qcdq(model.eval(), args=torch.zeros(1, 3, 32, 32), export_path=str(path), dynamo=False)
    except Exception as e:  # the peer's failure is a result, not a crash of the benchmark
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return None
