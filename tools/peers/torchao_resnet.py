"""The torch.ao peer of tools/bench_qat.py: PyTorch's own FX-graph-mode QAT on the same
pretrained ResNet-20, trained with the recipe graphopt's rows use, then converted and exported.

What a torch.ao user writes: ``prepare_qat_fx`` with a ``QConfigMapping`` whose fake quantizers
are ``FakeQuantize`` modules with moving-average min/max observers, per-channel symmetric
weights at ``wb`` bits (``quant_min``/``quant_max`` restricted inside qint8) and per-tensor
affine activations at ``ab`` bits (inside quint8); the first conv and the classifier get 8-bit
weights, as graphopt's rows do. ``prepare_qat_fx`` fuses each Conv+BN(+ReLU) into torch.ao's
ConvBn QAT modules, which fold BN into the weight before fake-quantizing it and train with batch
statistics. After training, ``convert_fx`` gives the quantized model (quint8/qint8 kernels) and
``torch.onnx.export`` (TorchScript) writes it as ONNX.

It trains with ``peers.train_loop.train``, the plain-torch copy of graphopt's finetune recipe.
"""

from __future__ import annotations

import copy
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peers.train_loop import train  # noqa: E402,F401  (the peers' shared loop)


def _qconfig(wb: int, ab: int):
    from torch.ao.quantization import (
        FakeQuantize,
        MovingAverageMinMaxObserver,
        MovingAveragePerChannelMinMaxObserver,
        QConfig,
    )

    act = FakeQuantize.with_args(observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=(1 << ab) - 1,
                                 dtype=torch.quint8, qscheme=torch.per_tensor_affine)
    wt = FakeQuantize.with_args(observer=MovingAveragePerChannelMinMaxObserver, quant_min=-(1 << (wb - 1)),
                                quant_max=(1 << (wb - 1)) - 1, dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
    return QConfig(activation=act, weight=wt)


def from_fp32(fp32: nn.Module, wb: int, ab: int, edge_ab: int) -> nn.Module:
    """The prepared (fake-quant) QAT model, from a copy of the FP32 model's weights."""
    from torch.ao.quantization import QConfigMapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    mapping = QConfigMapping().set_global(_qconfig(wb, ab))
    for name in ("conv1", "linear"):  # 8-bit weights at the edges; activations at edge_ab
        mapping = mapping.set_module_name(name, _qconfig(8, edge_ab))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return prepare_qat_fx(copy.deepcopy(fp32).train(), mapping, (torch.zeros(1, 3, 32, 32),))


def freeze(model: nn.Module) -> nn.Module:
    """torch.ao's recipe before scoring and converting: observers off (``FakeQuantize`` observes
    whenever its observer is enabled, whatever ``.eval()`` says, so its ranges would keep
    adapting to the images being scored) and BN statistics frozen."""
    from torch.ao.nn.intrinsic.qat import freeze_bn_stats
    from torch.ao.quantization import disable_observer

    model.apply(disable_observer)
    model.apply(freeze_bn_stats)
    return model.eval()


def converted(model: nn.Module) -> nn.Module:
    """``convert_fx`` of a frozen copy: torch.ao's own quantized model (quint8/qint8 kernels)."""
    from torch.ao.quantization.quantize_fx import convert_fx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert_fx(copy.deepcopy(model).eval())


def export(model: nn.Module, path: Path) -> str | None:
    """convert_fx, then torch.onnx.export; None, or why it failed."""
    try:
        q = converted(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(q, (torch.zeros(1, 3, 32, 32),), str(path), dynamo=False, opset_version=17,
                              input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    except Exception as e:  # the peer's failure is a result, not a crash of the benchmark
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return None
