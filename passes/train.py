"""Training steps that sit in a pipeline next to passes: ``finetune`` (recovery fine-tuning,
with distillation). QAT and lottery-ticket rewinding build on the same step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np

from graphopt.errors import GraphOptError
from graphopt.ir import Graph
from graphopt.passmanager import Context, Pass, PassResult, option, register_pass


@register_pass("finetune")
@dataclass(kw_only=True)
class Finetune(Pass):
    """Train the graph's weights on the Context's training data (needs training data).

    Loss: distillation from a teacher (the Context's teacher, else the graph as the pipeline
    received it, e.g. before pruning), plus cross-entropy when the data has labels (``kd_weight``
    mixes them). SGD or Adam; the learning rate follows ``lr_schedule`` (cosine by default) after
    an optional linear ``warmup``; BatchNormalization trains unless frozen;
    masked weights stay zero; checkpoints and resume as ``graphopt finetune``. After QAT's
    ``quantize``, a BN that fold-bn folded trains with batch statistics for ``bn_batch_epochs``
    and is then folded back and frozen (docs/qat.md). Changes the
    function on purpose; every run trains further."""

    idempotent = False
    needs_input_graph = True

    epochs: int = option(1, "passes over the training data", minimum=1)
    batch_size: int = option(64, "global batch size", minimum=1)
    lr: float = option(0.01, "peak learning rate", minimum=0.0)
    lr_schedule: Literal["cosine", "linear", "step", "constant"] = option(
        "cosine", "learning rate after the warm-up: cosine to 0, linear to 0, step (x0.1 at 1/2 and 3/4 of "
                  "the steps) or constant")
    warmup: float = option(0.0, "share of the steps over which the learning rate first ramps up linearly",
                           minimum=0.0, maximum=0.99)
    optimizer: Literal["sgd", "adam"] = option("sgd", "optimizer")
    weight_decay: float = option(0.0, "L2 weight decay", minimum=0.0)
    quant_weight_decay: Optional[float] = option(
        None, "L2 weight decay on learned quantizer parameters (LSQ steps, PACT clips); default: weight_decay",
        minimum=0.0)
    temperature: float = option(4.0, "distillation temperature", minimum=0.01)
    kd_weight: float = option(0.7, "with labels: weight of the distillation loss (1 - it: cross-entropy)",
                              minimum=0.0, maximum=1.0)
    teacher: Literal["auto", "context", "input", "none"] = option(
        "auto", "auto: the Context's teacher, else the pipeline's input graph; none: labels only")
    freeze_bn: bool = option(False, "keep BatchNormalization statistics fixed")
    bn_batch_epochs: Optional[int] = option(
        None, "QAT: epochs in which a BN folded into a fake-quantized layer normalizes with batch statistics "
              "before it is folded back and frozen (torch.ao ConvBn); default: two thirds of the epochs", minimum=0)
    checkpoint: Optional[str] = option(None, "checkpoint file, written after every epoch")
    resume: bool = option(False, "continue from the checkpoint")
    max_steps: Optional[int] = option(None, "stop after this many steps", minimum=1)
    device: str = option("auto", "where it trains: auto (CUDA when available, else CPU), cpu, cuda, cuda:N, mps")
    amp: Literal["off", "bf16", "fp16"] = option("off", "autocast the forward pass: bf16 or fp16 (quantizer maths "
                                                        "stays float32)")
    seed: int = option(0, "seed for shuffling")

    def run(self, graph: Graph, ctx: Context) -> PassResult:
        from graphopt.training.finetune import FinetuneConfig, finetune

        if ctx.train is None:
            raise GraphOptError("finetune needs training data (Context(train=TrainingData(x, y)), or "
                                "--train X.npy [--train-labels Y.npy] on the command line)")
        if not any(v.const is not None and v.const.ndim >= 1 and v.const.dtype.kind == "f"
                   for v in graph.constants.values()):
            return PassResult(graph, False, {"steps": 0, "reason": "the graph has no float weights to train"})
        teacher = None
        if self.teacher in ("auto", "context"):
            teacher = ctx.teacher
            if teacher is None and self.teacher == "context":
                raise GraphOptError("finetune{teacher=context} but the Context has no teacher (--teacher MODEL)")
        if teacher is None and self.teacher in ("auto", "input"):
            teacher = ctx.input_graph
        if teacher is None and ctx.train.y is None:
            raise GraphOptError("finetune needs labels or a teacher to learn from")
        bn_batch = self.bn_batch_epochs
        if bn_batch is None:
            bn_batch = (2 * self.epochs) // 3 if not self.freeze_bn else 0
        if self.freeze_bn and bn_batch:
            raise GraphOptError("finetune: freeze_bn=true and bn_batch_epochs > 0 contradict each other")
        cfg = FinetuneConfig(bn_batch_epochs=min(bn_batch, self.epochs), epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, optimizer=self.optimizer,
                             lr_schedule=self.lr_schedule, warmup=self.warmup,
                             weight_decay=self.weight_decay, quant_weight_decay=self.quant_weight_decay,
                             temperature=self.temperature,
                             kd_weight=self.kd_weight if teacher is not None else 0.0, checkpoint=self.checkpoint,
                             resume=self.resume, max_steps=self.max_steps, seed=self.seed,
                             transform=ctx.train.transform, train_bn=not self.freeze_bn,
                             progress=ctx.show_progress, amp=self.amp,
                             device=ctx.device if self.device == "auto" and ctx.device else self.device)
        before = {k: v.const.copy() for k, v in graph.constants.items() if v.const is not None}
        stats = finetune(graph, ctx.train.x, ctx.train.y, teacher, cfg)
        after = {k: v.const for k, v in graph.constants.items() if v.const is not None}
        # steps can leave every weight where it was (a student that already equals its teacher)
        changed = before.keys() != after.keys() or any(not np.array_equal(before[k], after[k]) for k in before)
        if stats["interrupted"]:
            raise GraphOptError(f"finetune interrupted after {stats['steps']} steps (the last completed step's "
                                "weights are kept" + (f" in {self.checkpoint})" if self.checkpoint else ")"))
        return PassResult(graph, changed, {"steps": stats["steps"], "epochs": stats["epochs"],
                                                      "loss": stats["loss"][-1] if stats["loss"] else None,
                                                      "distilled": teacher is not None})
