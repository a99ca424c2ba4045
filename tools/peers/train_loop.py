"""The plain-torch training loop the peers of tools/bench_qat.py and tools/bench_sparsity.py
use: a copy of graphopt's finetune recipe for any ``nn.Module``, so a peer trains with the same
data order, augmentation, optimizer, schedule and loss as graphopt's rows.

The same shuffling (one permutation per epoch from ``seed + epoch``), the same augmentation
generator, SGD with momentum 0.9 and weight decay, graphopt's learning-rate schedule per step
(``lr_factor``: cosine unless ``lr_schedule``/``warmup`` say otherwise), loss =
kd_weight * distillation (T^2-scaled KL at temperature T) + (1 - kd_weight) * cross-entropy, and
an atomic checkpoint after every epoch (a rerun continues from it). ``after_step(model)`` runs
after every optimizer step (a peer's pruning schedule).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from graphopt.training.finetune import lr_factor


def _save(path: Path, model, opt, epoch: int, step: int) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "epoch": epoch, "step": step}, tmp)
    os.replace(tmp, path)


def train(model: nn.Module, teacher: nn.Module, x: np.ndarray, y: np.ndarray, transform, *, epochs: int,
          lr: float, batch_size: int = 128, weight_decay: float = 1e-4, kd_weight: float = 0.5, T: float = 4.0,
          seed: int = 0, checkpoint: Path | None = None, after_step=None, lr_schedule: str = "cosine",
          warmup: float = 0.0) -> dict:
    """graphopt's finetune recipe for a plain torch module (see the module doc)."""
    torch.manual_seed(seed)
    steps_per_epoch = len(x) // batch_size
    total = steps_per_epoch * epochs
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    start, step = 0, 0
    if checkpoint is not None and checkpoint.is_file():
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start, step = state["epoch"] + 1, state["step"]
    step0 = step
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(lr_schedule, s + step0, total, warmup))
    teacher.eval()
    show = sys.stderr.isatty()
    for epoch in range(start, epochs):
        model.train()
        perm = np.random.default_rng(seed + epoch).permutation(len(x))
        aug_rng = np.random.default_rng([seed, 0, epoch])  # as graphopt's: a resumed run sees the same crops
        it = range(steps_per_epoch)
        if show:
            from tqdm import tqdm

            it = tqdm(it, desc=f"peer epoch {epoch + 1}/{epochs}", leave=False)
        for b in it:
            idx = perm[b * batch_size:(b + 1) * batch_size]
            xb = torch.from_numpy(transform(x[idx], aug_rng))
            out = model(xb)
            with torch.no_grad():
                tout = teacher(xb)
            kd = F.kl_div(F.log_softmax(out / T, 1), F.softmax(tout / T, 1), reduction="batchmean") * T * T
            loss = kd_weight * kd + (1 - kd_weight) * F.cross_entropy(out, torch.from_numpy(y[idx]).long())
            if not torch.isfinite(loss):
                raise RuntimeError(f"peer training diverged at step {step + 1} (loss {float(loss)})")
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if after_step is not None:
                after_step(model)
            step += 1
        if checkpoint is not None:
            _save(checkpoint, model, opt, epoch, step)
    model.eval()
    return {"steps": step, "epochs": max(epochs - start, 0)}  # epochs trained by this call (a resumed run trains the rest)
