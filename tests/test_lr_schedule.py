"""The learning-rate schedule (``lr_factor``, the one owner) and the training loop that follows it:
cosine, linear, step and constant, each after an optional linear warm-up, in the API, a pipeline's
``finetune`` step, a resumed run and the CLI."""

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from nets import build

from graphopt import from_torch, to_onnx
from graphopt.errors import GraphOptError
from graphopt.passmanager import Context, PassManager, TrainingData
from graphopt.training.finetune import LR_SCHEDULES, FinetuneConfig, finetune, lr_factor


def test_each_schedule_has_its_shape():
    total = 100
    cos = [lr_factor("cosine", s, total) for s in range(total + 1)]
    assert cos[0] == 1.0 and cos[total] == pytest.approx(0.0, abs=1e-12) and cos[50] == pytest.approx(0.5)
    assert all(a >= b for a, b in zip(cos, cos[1:]))  # never rises
    assert [lr_factor("linear", s, total) for s in (0, 25, 50, 100)] == [1.0, 0.75, 0.5, 0.0]
    assert [lr_factor("step", s, total) for s in (0, 49, 50, 74, 75, 99)] == [1.0, 1.0, 0.1, 0.1, 0.01, 0.01]
    assert {lr_factor("constant", s, total) for s in range(total)} == {1.0}


@pytest.mark.parametrize("schedule", LR_SCHEDULES)
def test_warmup_ramps_to_the_peak_then_runs_the_schedule_over_the_rest(schedule):
    total, warm = 100, 10
    ramp = [lr_factor(schedule, s, total, warm / total) for s in range(warm)]
    np.testing.assert_allclose(ramp, np.arange(1, warm + 1) / warm)
    rest = [lr_factor(schedule, warm + s, total, warm / total) for s in range(total - warm)]
    assert rest == [lr_factor(schedule, s, total - warm) for s in range(total - warm)]


def test_cosine_without_warmup_is_the_schedule_the_rows_trained_with():
    """Results measured before the schedule had an owner stay reproducible: the same floats."""
    total = 1173
    for s in range(0, total + 3, 7):
        assert lr_factor("cosine", s, total) == 0.5 * (1 + math.cos(math.pi * min(s, total) / total))


def test_unknown_schedule_and_bad_warmup_are_errors():
    with pytest.raises(GraphOptError, match="unknown learning-rate schedule 'exp' \\(cosine, linear, step, constant\\)"):
        lr_factor("exp", 0, 10)
    model, x = build("mlp", 0)
    g = from_torch(model, torch.from_numpy(x))
    data = np.random.default_rng(0).standard_normal((32,) + x.shape[1:]).astype(np.float32)
    with pytest.raises(GraphOptError, match="unknown learning-rate schedule 'exp'"):
        finetune(g, data, teacher=g.copy(), config=FinetuneConfig(batch_size=8, lr_schedule="exp"))
    with pytest.raises(GraphOptError, match="warmup is a share of the training steps in \\[0, 1\\), not 1.0"):
        finetune(g, data, teacher=g.copy(), config=FinetuneConfig(batch_size=8, warmup=1.0))
    with pytest.raises(GraphOptError, match="lr_schedule"):
        PassManager("finetune{lr_schedule=exp}").run(g.copy(), Context(train=TrainingData(data)))


def _record_lrs(monkeypatch) -> list[float]:
    """The learning rate of every optimizer step the loop takes."""
    seen: list[float] = []
    orig = torch.optim.SGD.step

    def step(self, *a, **k):
        seen.append(self.param_groups[0]["lr"])
        return orig(self, *a, **k)

    monkeypatch.setattr(torch.optim.SGD, "step", step)
    return seen


def _pair():
    model, x = build("mlp", 0)
    g = from_torch(model, torch.from_numpy(x))
    data = np.random.default_rng(1).standard_normal((64,) + x.shape[1:]).astype(np.float32)
    return g, data


@pytest.mark.parametrize("schedule,warmup", [("cosine", 0.0), ("step", 0.25), ("linear", 0.5), ("constant", 0.125)])
def test_the_training_loop_steps_at_the_schedules_rates(monkeypatch, schedule, warmup):
    g, data = _pair()
    seen = _record_lrs(monkeypatch)
    finetune(g.copy(), data, teacher=g, config=FinetuneConfig(epochs=2, batch_size=8, lr=0.04, lr_schedule=schedule,
                                                              warmup=warmup))
    total = 16
    want = [0.04 * lr_factor(schedule, s, total, warmup) for s in range(total)]
    np.testing.assert_allclose(seen, want, rtol=1e-12)


def test_a_resumed_run_continues_the_schedule(monkeypatch, tmp_path):
    g, data = _pair()
    seen = _record_lrs(monkeypatch)
    cfg = dict(epochs=2, batch_size=8, lr=0.04, lr_schedule="step", warmup=0.25)
    finetune(g.copy(), data, teacher=g, config=FinetuneConfig(**cfg))
    straight = list(seen)
    seen.clear()
    ck = str(tmp_path / "ck.pt")
    half = g.copy()
    finetune(half, data, teacher=g, config=FinetuneConfig(**cfg, checkpoint=ck, max_steps=8))  # the first epoch
    finetune(half, data, teacher=g, config=FinetuneConfig(**cfg, checkpoint=ck, resume=True))
    assert seen == straight


def test_a_pipeline_step_takes_the_schedule(monkeypatch):
    g, data = _pair()
    seen = _record_lrs(monkeypatch)
    res = PassManager("finetune{epochs=1,batch_size=8,lr=0.02,lr_schedule=linear,warmup=0.5}").run(
        g.copy(), Context(train=TrainingData(data), teacher=g))
    assert res.modified
    np.testing.assert_allclose(seen, [0.02 * f for f in (0.25, 0.5, 0.75, 1.0, 1.0, 0.75, 0.5, 0.25)])


def test_cli_schedule_flags(tmp_path):
    g, data = _pair()
    (tmp_path / "s.onnx").write_bytes(to_onnx(g).SerializeToString())
    np.save(tmp_path / "d.npy", data)
    base = [sys.executable, "-m", "graphopt.cli", "finetune", str(tmp_path / "s.onnx"), "--data", str(tmp_path / "d.npy"),
            "--teacher", str(tmp_path / "s.onnx"), "--batch-size", "16"]
    r = subprocess.run(base + ["-o", str(tmp_path / "o.onnx"), "--lr-schedule", "step", "--warmup", "0.25"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "o.onnx").is_file()
    r = subprocess.run(base + ["-o", str(tmp_path / "bad.onnx"), "--warmup", "1.5"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and "expected a share in [0, 1), got '1.5'" in r.stderr
    assert not (tmp_path / "bad.onnx").exists()
    r = subprocess.run(base + ["-o", str(tmp_path / "bad.onnx"), "--lr-schedule", "exp"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and "invalid choice: 'exp'" in r.stderr and not (tmp_path / "bad.onnx").exists()


@pytest.mark.parametrize("command", ["finetune", "lottery"])
def test_both_training_commands_turn_the_flags_into_the_recipe(command):
    from graphopt.cli import build_parser, finetune_config

    need = {"finetune": ["-o", "o.onnx", "--data", "x.npy"], "lottery": ["--data", "x.npy", "--labels", "y.npy",
                                                                         "--state", "st"]}[command]
    args = build_parser().parse_args([command, "m.onnx", *need, "--lr-schedule", "linear", "--warmup", "0.05"])
    cfg = finetune_config(args)
    assert (cfg.lr_schedule, cfg.warmup) == ("linear", 0.05)
    default = finetune_config(build_parser().parse_args([command, "m.onnx", *need]))
    assert (default.lr_schedule, default.warmup) == ("cosine", 0.0)


@pytest.mark.parametrize("schedule,warmup", [("cosine", 0.0), ("step", 0.25)])
def test_the_peers_loop_steps_at_graphopts_rates(monkeypatch, schedule, warmup):
    """tools/peers/train_loop.py trains the benchmarks' peers "with the same schedule": the same
    learning rate at every step as graphopt's finetune, read from the same owner."""
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "tools"))
    from peers.train_loop import train

    g, data = _pair()
    labels = np.arange(len(data)) % 4
    seen = _record_lrs(monkeypatch)
    finetune(g.copy(), data, labels, teacher=g, config=FinetuneConfig(
        epochs=2, batch_size=16, lr=0.03, lr_schedule=schedule, warmup=warmup, kd_weight=0.5))
    ours = list(seen)
    seen.clear()
    model, _ = build("mlp", 0)
    train(model, build("mlp", 0)[0], data, labels, lambda xb, rng: xb, epochs=2, lr=0.03, batch_size=16,
          lr_schedule=schedule, warmup=warmup)
    assert len(ours) == 8 and seen == ours


def test_the_pass_and_the_cli_offer_the_schedules_the_owner_knows():
    """The pass's option type and the CLI's choices spell the set out (the CLI must not import
    torch to build its parser); they stay the owner's."""
    import typing

    from graphopt.cli import build_parser

    finetune_pass = type(PassManager("finetune").passes[0])
    assert typing.get_args(typing.get_type_hints(finetune_pass)["lr_schedule"]) == LR_SCHEDULES
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    for command in ("finetune", "lottery"):
        action = next(a for a in sub[command]._actions if a.dest == "lr_schedule")
        assert tuple(action.choices) == LR_SCHEDULES
