"""Recovery fine-tuning through the torch back end (after pruning; the same loop serves QAT).

``finetune(student, x, y=None, teacher=None, config)`` trains the student graph's weights in
place (written back with ``graph.update_from``):
* **loss:** knowledge distillation from ``teacher`` (KL divergence of temperature-softened
  outputs, scaled by T^2), plus cross-entropy when labels ``y`` are given (``kd_weight``
  mixes the two);
* **optimizer:** SGD with momentum, or Adam; the learning rate follows ``lr_schedule`` (cosine by
  default, linear, step or constant: ``lr_factor``), after an optional linear warm-up over the
  first ``warmup`` share of the steps;
* **BatchNormalization** (when not folded) trains as in torch: batch statistics, running
  statistics updated and written back (``train_bn=False`` freezes them). Under DDP each
  process normalizes with its own share of the batch, as DDP without SyncBatchNorm does;
* **BatchNorm folded into a fake-quantized layer** (QAT) follows a two-phase schedule: for the
  first ``bn_batch_epochs`` epochs the layer's output is normalized with batch statistics
  (``to_torch(folded_bn="batch")``, torch.ao's ConvBn), then the trained BN is folded back into
  the weight, its quantizer's scale and the bias (the integer codes do not move) and the
  remaining epochs train the frozen, folded form the export computes;
* **checkpoints** after every epoch, written atomically (tensors only: ``torch.load`` reads
  them with ``weights_only=True``); ``resume`` continues from one;
* **Ctrl-C** stops cleanly: the weights of the last *completed* step are kept, written back
  and checkpointed;
* **distributed:** under ``torchrun`` (or any initialised ``torch.distributed`` group, e.g. gloo
  on CPU) each process takes its share of every global batch and DDP averages the gradients,
  so N processes compute the same updates as one process with the same global batch.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from graphopt.errors import GraphOptError
from graphopt.ir import Graph

log = logging.getLogger("graphopt.training.finetune")


@dataclass
class FinetuneConfig:
    epochs: int = 1
    batch_size: int = 64
    lr: float = 0.01
    optimizer: str = "sgd"  # sgd | adam
    momentum: float = 0.9
    weight_decay: float = 0.0
    quant_weight_decay: float | None = None  # L2 on learned quantizer parameters (LSQ steps, clips); None: weight_decay
    temperature: float = 4.0
    kd_weight: float = 1.0  # with labels: loss = kd_weight * KD + (1 - kd_weight) * CE
    checkpoint: str | None = None
    resume: bool = False
    seed: int = 0
    progress: bool | None = None
    max_steps: int | None = None  # stop early (tests, time budgets)
    transform: Any = None  # optional callable(batch: np.ndarray, rng) -> np.ndarray, e.g. augmentation
    train_bn: bool = True  # BN layers normalize with batch statistics and update their running statistics
    # QAT's BN schedule: for the first bn_batch_epochs epochs a BN folded into a fake-quantized
    # layer normalizes with batch statistics (torch.ao ConvBn), then it is folded back and frozen
    bn_batch_epochs: int = 0
    snapshot_step: int | None = None  # keep the weights after this many steps (0: before training) in stats["snapshot"]
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps (graphopt.training.device)
    amp: str = "off"  # off | bf16 | fp16: autocast for the forward pass and loss
    lr_schedule: str = "cosine"  # cosine | linear | step | constant (lr_factor)
    warmup: float = 0.0  # share of the steps over which the learning rate ramps up linearly first


LR_SCHEDULES = ("cosine", "linear", "step", "constant")


def lr_factor(schedule: str, step: int, total: int, warmup: float = 0.0) -> float:
    """The learning rate's multiple of its peak before step ``step`` (0-based) of ``total``: a
    linear warm-up to the peak over the first ``warmup`` share of the steps (W = round(warmup x
    total) steps: (step + 1) / W),
    then ``schedule`` over the remaining steps, at their share t in [0, 1] done: cosine
    0.5 (1 + cos(pi t)), linear 1 - t, step 1 / 0.1 / 0.01 from t = 0 / 0.5 / 0.75 (the ResNet
    papers' decays at half and three quarters of training), constant 1. The one owner of the
    schedule: the training loop and its tests read it."""
    warmup_steps = int(round(warmup * total))
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    done, span = min(step - warmup_steps, total - warmup_steps), max(total - warmup_steps, 1)
    t = done / span
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * done / span))
    if schedule == "linear":
        return 1.0 - t
    if schedule == "step":
        return 1.0 if t < 0.5 else 0.1 if t < 0.75 else 0.01
    if schedule == "constant":
        return 1.0
    raise GraphOptError(f"unknown learning-rate schedule '{schedule}' ({', '.join(LR_SCHEDULES)})")


def param_groups(module: torch.nn.Module, cfg: FinetuneConfig) -> list[dict]:
    """The optimizer's parameter groups: the weights (``cfg.weight_decay``) and, when
    ``cfg.quant_weight_decay`` is set, the learned quantizer parameters (LSQ steps, PACT clips:
    the module's ``quant_params``) in a second group with that decay. The groups keep the
    module's parameter order, so a checkpoint's optimizer state loads into the same layout."""
    named = [(k, p) for k, p in module.named_parameters() if p.requires_grad]
    quant = getattr(module, "quant_params", set())
    if cfg.quant_weight_decay is None or not any(k in quant for k, _ in named):
        return [{"params": [p for _, p in named]}]
    return [{"params": [p for k, p in named if k not in quant]},
            {"params": [p for k, p in named if k in quant], "weight_decay": cfg.quant_weight_decay}]


def _dist():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def join_torchrun() -> tuple[int, int]:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) join its process group, from
    the environment it sets (``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``), unless the caller made
    one: NCCL when CUDA is available, else gloo. Returns (rank, world size); (0, 1) outside
    torchrun. The CLI calls it for every command that trains."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and torch.distributed.is_available() \
            and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return _dist()


def is_writer() -> bool:
    """Whether this process writes outputs and checkpoints (rank 0, or the only process)."""
    return _dist()[0] == 0


def _save_checkpoint(path: str, module: torch.nn.Module, epoch: int, step: int, schedule: dict | None = None,
                     opt: torch.optim.Optimizer | None = None, scaler=None) -> None:
    from graphopt.atomic import atomic_paths
    from graphopt.training.device import to_cpu

    state = {"model": to_cpu(module.state_dict()),  # device-independent
             "epoch": torch.tensor(epoch), "step": torch.tensor(step),
             "bn_batch": torch.tensor(int(bool(getattr(module, "bn_folds", None))))}
    if opt is not None:  # momentum (or Adam's moments): a resumed run continues the same trajectory
        state["optimizer"] = to_cpu(opt.state_dict())
    if scaler is not None:
        state["grad_scaler"] = scaler.state_dict()
    plans = ((schedule or {}).get("columns") or {}).get("plans")
    if plans:  # column combining: the groups of the last event, so a resumed run keeps them
        state["column_groups"] = {k: torch.from_numpy(p.group.copy()) for k, p in plans.items()}
    with atomic_paths(path) as (tmp,):
        torch.save(state, tmp)


def _gradual_masks(module, schedule: dict, step: int, total: int) -> None:
    """Tighten the masks of the scheduled weights to the sparsity the schedule asks for at
    ``step``: a magnitude selection over the currently kept weights (global: one threshold over
    all of them), so a pruned weight never comes back. Runs on the module's mask buffers."""
    from graphopt.masks import Mask, global_keep, scheduled_sparsity

    s = scheduled_sparsity(schedule, step, total)
    if s is None:
        return
    names = [n for n in schedule["weights"] if n in module.mask_names]
    params, buffers = dict(module.named_parameters()), dict(module.named_buffers())
    with torch.no_grad():  # the mask owner selects; the buffers only record its choice
        mags = [torch.where(buffers[module.mask_names[n][1]], params[module.mask_names[n][0]].abs(),
                            torch.zeros(())).cpu().numpy() for n in names]
        keeps = global_keep(mags, s) if schedule["scope"] == "global" else [Mask.magnitude(m, s).keep for m in mags]
        cc = schedule.get("columns")
        if cc:  # column combining: re-pack every layer after the event (graphopt.columns owns it)
            from graphopt.columns import group_columns

            plans = cc.setdefault("plans", {})
            for i, (n, m, k) in enumerate(zip(names, mags, keeps)):
                geo = cc["geometry"][n]
                f = geo.filter_matrix(np.where(k, m, 0))
                plans[n] = group_columns(f != 0, cc["alpha"], cc["gamma"], cc["window"])
                keeps[i] = k & geo.from_filter_matrix(plans[n].keep(f), m.shape)
        for n, k in zip(names, keeps):
            buf = buffers[module.mask_names[n][1]]
            buf.copy_(buf & torch.from_numpy(k).to(buf.device))


def finetune(student: Graph, x: np.ndarray, y: np.ndarray | None = None, teacher: Graph | None = None,
             config: FinetuneConfig | None = None) -> dict[str, Any]:
    from graphopt.backends.torch_module import to_torch

    cfg = config or FinetuneConfig()
    for name in ("epochs", "batch_size"):
        if not isinstance(getattr(cfg, name), int) or getattr(cfg, name) < 1:
            raise GraphOptError(f"fine-tuning {name.replace('_', ' ')} must be a positive integer, not {getattr(cfg, name)}")
    if not (math.isfinite(cfg.lr) and cfg.lr >= 0):
        raise GraphOptError(f"fine-tuning learning rate must be a finite number >= 0, not {cfg.lr}")
    if teacher is None and y is None:
        raise GraphOptError("fine-tuning needs a teacher model (distillation) or labels")
    from graphopt.training.device import autocast, check_amp, grad_scaler, resolve_device

    dev = resolve_device(cfg.device)
    check_amp(cfg.amp, dev)
    scaler = grad_scaler(dev, cfg.amp)
    x = np.asarray(x, np.float32)
    from graphopt.training.calibration import check_sample_shape

    if len(student.inputs) == 1:
        check_sample_shape("training samples", x.shape[1:], student.inputs[0])
    if y is not None and len(y) != len(x):
        raise GraphOptError(f"{len(x)} inputs but {len(y)} labels")
    rank, world = _dist()
    if cfg.batch_size % world:
        raise GraphOptError(f"batch size {cfg.batch_size} does not split evenly over {world} processes")
    if cfg.optimizer not in ("sgd", "adam"):
        raise GraphOptError(f"unknown optimizer '{cfg.optimizer}' (sgd, adam)")
    lr_factor(cfg.lr_schedule, 0, 1)  # refuses an unknown schedule before anything is built
    if not 0.0 <= cfg.warmup < 1.0:
        raise GraphOptError(f"warmup is a share of the training steps in [0, 1), not {cfg.warmup}")
    if not isinstance(cfg.bn_batch_epochs, int) or cfg.bn_batch_epochs < 0:
        raise GraphOptError(f"bn batch epochs must be an integer >= 0, not {cfg.bn_batch_epochs}")
    steps_per_epoch = len(x) // cfg.batch_size
    if steps_per_epoch == 0:
        raise GraphOptError(f"{len(x)} samples are fewer than one batch of {cfg.batch_size}")
    total = steps_per_epoch * cfg.epochs
    torch.manual_seed(cfg.seed)

    def phase(epoch: int) -> str:
        return "batch" if epoch < cfg.bn_batch_epochs else "frozen"

    def build(bn_phase: str, at_step: int):
        """The module, its DDP wrapper, optimizer and schedule for a BN phase; the learning-rate
        schedule continues from ``at_step``."""
        m = to_torch(student, train_bn=cfg.train_bn, folded_bn=bn_phase).to(dev)
        ids = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else None
        n = torch.nn.parallel.DistributedDataParallel(m, device_ids=ids) if world > 1 else m
        params = param_groups(m, cfg)
        if cfg.optimizer == "sgd":
            o = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        else:
            o = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        sc = torch.optim.lr_scheduler.LambdaLR(
            o, lambda s: lr_factor(cfg.lr_schedule, s + at_step, total, cfg.warmup))
        return m, n, o, sc

    start_epoch, step = 0, 0
    state = None
    if cfg.resume and cfg.checkpoint and os.path.isfile(cfg.checkpoint):
        state = torch.load(cfg.checkpoint, map_location="cpu", weights_only=True)
        start_epoch, step = int(state["epoch"]) + 1, int(state["step"])
    # a checkpoint holds the module of the phase it was written in (a run may stop inside either)
    bn_phase = phase(start_epoch) if state is None else ("batch" if int(state.get("bn_batch", 0)) else "frozen")
    module, net, opt, sched = build(bn_phase, step)
    if state is not None:
        try:
            module.load_state_dict(state["model"])
        except RuntimeError as e:
            first = next((ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()), str(e))
            raise GraphOptError(f"checkpoint {cfg.checkpoint} does not match this model ({first}); "
                                f"delete it or drop --resume") from None
        if "optimizer" in state:  # older checkpoints hold only the weights: the optimizer restarts
            try:
                opt.load_state_dict(state["optimizer"])  # moves its state onto the parameters' device
            except ValueError as e:
                raise GraphOptError(f"checkpoint {cfg.checkpoint} was written by another optimizer ({e}); "
                                    f"delete it or drop --resume") from None
        if scaler is not None and "grad_scaler" in state:
            scaler.load_state_dict(state["grad_scaler"])
        log.info("resuming from %s at epoch %d", cfg.checkpoint, start_epoch)
    if module.bn_folds:
        log.info("%d folded BatchNorms train with batch statistics for %d epochs", len(module.bn_folds),
                 cfg.bn_batch_epochs)
    t_module = to_torch(teacher).eval().to(dev) if teacher is not None else None
    from graphopt.meta import SPARSITY_SCHEDULE

    schedule = student.scratch.get(SPARSITY_SCHEDULE)
    cc = (schedule or {}).get("columns")
    if cc and state is not None and "column_groups" in state:
        from graphopt.columns import Plan

        cc["plans"] = {k: Plan(v.numpy().astype(np.int64), cc["alpha"], cc["gamma"], cc["window"])
                       for k, v in state["column_groups"].items()}
    show = cfg.progress if cfg.progress is not None else (sys.stderr.isatty() and not os.environ.get("CI"))
    history: list[float] = []
    interrupted = False
    last_good = copy.deepcopy(module.state_dict())
    local = cfg.batch_size // world
    T = cfg.temperature
    snapshot = None

    def take_snapshot():
        st = module.state_dict()
        return {v: st[a].detach().cpu().numpy().copy() for v, a in module.param_names.items()}

    if cfg.snapshot_step == 0 or (cfg.snapshot_step is not None and cfg.snapshot_step == step):
        snapshot = take_snapshot()
    try:
        for epoch in range(start_epoch, cfg.epochs):
            if module.bn_folds and phase(epoch) == "frozen":
                if world > 1:  # every process folds rank 0's running statistics
                    for t in module.state_dict().values():
                        torch.distributed.broadcast(t, 0)
                student.update_from(module)  # fold the trained BNs back; from here on they are frozen
                module, net, opt, sched = build("frozen", step)
                last_good = copy.deepcopy(module.state_dict())
                log.info("epoch %d: BatchNorm statistics frozen and folded", epoch + 1)
            perm = np.random.default_rng(cfg.seed + epoch).permutation(len(x))
            # augmentation draws from its own stream per (rank, epoch): a resumed run sees the same crops
            aug_rng = np.random.default_rng([cfg.seed, rank, epoch])
            net.train()
            losses = []
            it = range(steps_per_epoch)
            if show and rank == 0:
                from tqdm import tqdm

                it = tqdm(it, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False)
            for b in it:
                idx = perm[b * cfg.batch_size:(b + 1) * cfg.batch_size][rank * local:(rank + 1) * local]
                xb_np = x[idx]
                if cfg.transform is not None:
                    xb_np = cfg.transform(xb_np, aug_rng)
                xb = torch.from_numpy(np.ascontiguousarray(xb_np, np.float32)).to(dev, non_blocking=True)
                with autocast(dev, cfg.amp):
                    out = net(xb)
                    loss = torch.zeros((), device=dev)
                    if t_module is not None:
                        with torch.no_grad():
                            tout = t_module(xb)
                        kd = F.kl_div(F.log_softmax(out.float() / T, 1), F.softmax(tout.float() / T, 1),
                                      reduction="batchmean") * T * T
                        loss = loss + (cfg.kd_weight if y is not None else 1.0) * kd
                    if y is not None:
                        ce = F.cross_entropy(out.float(), torch.from_numpy(np.asarray(y)[idx]).long().to(dev))
                        loss = loss + (1.0 - cfg.kd_weight if t_module is not None else 1.0) * ce
                if not torch.isfinite(loss):
                    module.load_state_dict(last_good)
                    student.update_from(module)
                    raise GraphOptError(f"training diverged: the loss is {float(loss.detach())} at step {step + 1}; "
                                        f"nothing was written (the graph holds the weights of step {step}"
                                        + (f"; the last checkpoint is {cfg.checkpoint}" if cfg.checkpoint and
                                           os.path.isfile(cfg.checkpoint) else "")
                                        + f"). Lower the learning rate (now {cfg.lr})")
                opt.zero_grad()
                if scaler is not None:  # fp16: scaled loss, unscaled step (skipped on inf/nan gradients)
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                else:
                    loss.backward()
                    opt.step()
                sched.step()
                if schedule is not None:
                    _gradual_masks(module, schedule, step, total)
                step += 1
                if cfg.snapshot_step is not None and step == cfg.snapshot_step:
                    snapshot = take_snapshot()
                last_good = copy.deepcopy(module.state_dict())
                losses.append(float(loss.detach()))
                if cfg.max_steps is not None and step >= cfg.max_steps:
                    break
            history.append(float(np.mean(losses)) if losses else float("nan"))
            log.info("epoch %d: loss %.4f", epoch + 1, history[-1])
            if cfg.checkpoint and rank == 0:
                _save_checkpoint(cfg.checkpoint, module, epoch, step, schedule, opt, scaler)
            if cfg.max_steps is not None and step >= cfg.max_steps:
                break
    except KeyboardInterrupt:
        interrupted = True
        module.load_state_dict(last_good)  # the weights of the last completed step
        log.warning("interrupted: keeping the weights of step %d", step)
        if cfg.checkpoint and rank == 0:
            _save_checkpoint(cfg.checkpoint, module, max(start_epoch, len(history) + start_epoch - 1), step,
                             schedule, opt, scaler)
    module.eval()
    student.update_from(module)
    if cc and cc.get("plans"):  # the last event's groups: the plan the systolic back end packs by
        from graphopt.meta import COLUMN_PLANS

        student.scratch[COLUMN_PLANS] = {**(student.scratch.get(COLUMN_PLANS) or {}), **cc["plans"]}
    from graphopt.quantizers.base import refresh_bias_scales

    refresh_bias_scales(student)  # biases follow the learned steps, as the export will
    return {"epochs": len(history), "steps": step, "loss": history, "interrupted": interrupted,
            "world_size": world, "snapshot": snapshot, "device": str(dev), "amp": cfg.amp}
