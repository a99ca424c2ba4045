"""Recovery fine-tuning: distillation lowers the loss, Ctrl-C keeps the last good step,
checkpoints reload with weights_only, and 2 gloo processes match one process."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from nets import build, graphopt_cli, rel_err, run_one_and_two_ranks, run_ort

from graphopt import from_torch, load_onnx, to_onnx
from graphopt.errors import GraphOptError
from graphopt.passmanager import PassManager
from graphopt.training.finetune import FinetuneConfig, finetune


def pruned_pair(seed=0):
    model, x = build("mobilenetv2", seed)
    teacher = PassManager("canonicalize,fold-bn").run(from_torch(model, torch.from_numpy(x))).graph
    student = PassManager("prune-channels{ratio=0.4},fold-prune").run(teacher.copy()).graph
    data = np.random.default_rng(seed).standard_normal((64,) + x.shape[1:]).astype(np.float32)
    return teacher, student, data


def test_distillation_brings_the_student_closer():
    teacher, student, data = pruned_pair()
    before = rel_err(run_ort(to_onnx(student), data), run_ort(to_onnx(teacher), data))
    stats = finetune(student, data, teacher=teacher,
                     config=FinetuneConfig(epochs=4, batch_size=16, lr=0.02, optimizer="adam"))
    after = rel_err(run_ort(to_onnx(student), data), run_ort(to_onnx(teacher), data))
    assert stats["steps"] == 16 and stats["loss"][-1] < stats["loss"][0]
    assert after < before * 0.8, (before, after)


def test_interrupt_keeps_last_completed_step(monkeypatch):
    teacher, student, data = pruned_pair()
    ref = student.copy()
    finetune(ref, data, teacher=teacher, config=FinetuneConfig(batch_size=16, lr=0.05, max_steps=2))
    calls = {"n": 0}
    orig = torch.optim.SGD.step

    def step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return orig(self, *a, **k)

    monkeypatch.setattr(torch.optim.SGD, "step", step)
    stats = finetune(student, data, teacher=teacher, config=FinetuneConfig(batch_size=16, lr=0.05))
    assert stats["interrupted"] and stats["steps"] == 2
    for name, v in ref.constants.items():
        np.testing.assert_array_equal(student.constants[name].const, v.const)


def test_checkpoint_and_resume(tmp_path):
    teacher, student, data = pruned_pair()
    ck = tmp_path / "ck.pt"
    cfg = FinetuneConfig(epochs=1, batch_size=16, lr=0.05, checkpoint=str(ck))
    finetune(student, data, teacher=teacher, config=cfg)
    state = torch.load(ck, weights_only=True)
    assert int(state["epoch"]) == 0 and int(state["step"]) == 4
    cfg2 = FinetuneConfig(epochs=2, batch_size=16, lr=0.05, checkpoint=str(ck), resume=True)
    stats = finetune(student, data, teacher=teacher, config=cfg2)
    assert stats["steps"] == 8 and stats["epochs"] == 1  # only the second epoch ran
    other = PassManager("prune-channels{ratio=0.7},fold-prune").run(teacher.copy()).graph  # other shapes
    with pytest.raises(GraphOptError, match=r"checkpoint .* does not match this model \(size mismatch"):
        finetune(other, data, teacher=teacher, config=cfg2)


def test_a_resumed_run_sees_the_same_augmentation_as_an_uninterrupted_one(tmp_path):
    teacher, student, data = pruned_pair()

    def flip(xb, rng):  # a random horizontal flip: the resumed epoch must draw the same flips
        return np.where(rng.random(len(xb))[:, None, None, None] < 0.5, xb[..., ::-1], xb)

    ck = str(tmp_path / "ck.pt")
    cfg = dict(epochs=2, batch_size=16, lr=0.05, transform=flip)
    first = student.copy()
    finetune(first, data, teacher=teacher, config=FinetuneConfig(**cfg, checkpoint=ck, max_steps=4))  # epoch 1 only
    resumed = student.copy()
    stats = finetune(resumed, data, teacher=teacher, config=FinetuneConfig(**cfg, checkpoint=ck, resume=True))
    assert stats["epochs"] == 1 and stats["steps"] == 8
    straight = student.copy()
    finetune(straight, data, teacher=teacher, config=FinetuneConfig(**cfg))
    for name, v in straight.constants.items():
        np.testing.assert_allclose(resumed.constants[name].const, v.const, rtol=1e-5, atol=1e-6, err_msg=name)


def test_errors():
    teacher, student, data = pruned_pair()
    with pytest.raises(GraphOptError, match="needs a teacher"):
        finetune(student, data)
    with pytest.raises(GraphOptError, match="fewer than one batch"):
        finetune(student, data[:4], teacher=teacher, config=FinetuneConfig(batch_size=16))


DDP_WORKER = r"""
import os, sys, numpy as np, torch
sys.path.insert(0, {tests!r})
import torch.distributed as dist
from graphopt import load_onnx, save_onnx
from graphopt.training.finetune import FinetuneConfig, finetune
rank, world = int(sys.argv[1]), int(sys.argv[2])
if world > 1:
    dist.init_process_group("gloo", init_method="file://" + {store!r}, rank=rank, world_size=world)
torch.set_num_threads(1)
student, teacher = load_onnx({student!r}), load_onnx({teacher!r})
data = np.load({data!r})
finetune(student, data, teacher=teacher, config=FinetuneConfig(batch_size=16, lr=0.05, max_steps=3))
if rank == 0:
    save_onnx(student, sys.argv[3])
if world > 1:
    dist.destroy_process_group()
"""


def test_two_gloo_processes_match_one(tmp_path):
    teacher, student, data = pruned_pair()
    (tmp_path / "s.onnx").write_bytes(to_onnx(student).SerializeToString())
    (tmp_path / "t.onnx").write_bytes(to_onnx(teacher).SerializeToString())
    np.save(tmp_path / "d.npy", data)
    script = tmp_path / "worker.py"
    script.write_text(DDP_WORKER.format(tests=os.path.dirname(__file__), store=str(tmp_path / "store"),
                                        student=str(tmp_path / "s.onnx"), teacher=str(tmp_path / "t.onnx"),
                                        data=str(tmp_path / "d.npy")))
    run_one_and_two_ranks(script, tmp_path / "one.onnx", tmp_path / "two.onnx")
    one, two = load_onnx(tmp_path / "one.onnx"), load_onnx(tmp_path / "two.onnx")
    start = load_onnx(tmp_path / "s.onnx")
    changed = 0
    for name, v in one.constants.items():
        np.testing.assert_allclose(two.constants[name].const, v.const, rtol=1e-4, atol=1e-6)
        changed += not np.array_equal(v.const, start.constants[name].const)
    assert changed > 0  # training really moved the weights


def test_cli_finetune(tmp_path):
    teacher, student, data = pruned_pair()
    (tmp_path / "s.onnx").write_bytes(to_onnx(student).SerializeToString())
    (tmp_path / "t.onnx").write_bytes(to_onnx(teacher).SerializeToString())
    np.save(tmp_path / "d.npy", data)
    r = subprocess.run([sys.executable, "-m", "graphopt.cli", "finetune", str(tmp_path / "s.onnx"), "-o",
                        str(tmp_path / "o.onnx"), "--data", str(tmp_path / "d.npy"), "--teacher",
                        str(tmp_path / "t.onnx"), "--batch-size", "16", "--epochs", "2", "--checkpoint",
                        str(tmp_path / "ck.pt")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "fine-tuned 8 steps over 2 epoch(s) on 1 process(es)" in r.stdout and (tmp_path / "ck.pt").is_file()
    assert load_onnx(tmp_path / "o.onnx").num_params() == student.num_params()
    r = subprocess.run([sys.executable, "-m", "graphopt.cli", "finetune", str(tmp_path / "s.onnx"), "-o",
                        str(tmp_path / "o2.onnx"), "--data", str(tmp_path / "missing.npy")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "training data file not found" in r.stderr and not (tmp_path / "o2.onnx").exists()


def test_divergence_is_a_clear_error_and_keeps_finite_weights():
    teacher, student, data = pruned_pair()
    with pytest.raises(GraphOptError, match="training diverged"):
        finetune(student, data, teacher=teacher, config=FinetuneConfig(batch_size=16, lr=1e12, optimizer="sgd"))
    assert all(np.isfinite(v.const).all() for v in student.constants.values())


@pytest.mark.parametrize("train_bn", [True, False])
def test_unfolded_bn_trains_its_statistics_unless_frozen(train_bn):
    model, x = build("resnet", 0)
    teacher = PassManager("canonicalize").run(from_torch(model, torch.from_numpy(x))).graph
    student = PassManager("prune-channels{ratio=0.4},fold-prune").run(teacher.copy()).graph
    bn = student.find_nodes("BatchNormalization")[0]
    mean0 = student.const_value(bn.inputs[3]).copy()
    data = np.random.default_rng(1).standard_normal((32,) + x.shape[1:]).astype(np.float32) * 3 + 1
    finetune(student, data, teacher=teacher,
             config=FinetuneConfig(epochs=1, batch_size=16, lr=1e-3, optimizer="adam", train_bn=train_bn))
    moved = not np.allclose(student.const_value(bn.inputs[3]), mean0)
    assert moved == train_bn


def test_finetune_step_in_a_pipeline_distills_from_the_pipeline_input():
    """prune, fold, finetune in one pipeline: with no teacher given, the step distills from the
    graph as the pipeline received it, and the student gets closer to it."""
    from graphopt.passmanager import Context, TrainingData

    model, x = build("mobilenetv2")
    g = PassManager("canonicalize,fold-bn").run(from_torch(model, torch.from_numpy(x))).graph
    data = np.random.default_rng(0).standard_normal((64,) + x.shape[1:]).astype(np.float32)
    ref = run_ort(to_onnx(g), data)
    pruned = PassManager("prune-channels{ratio=0.4},fold-prune").run(g.copy()).graph
    before = rel_err(run_ort(to_onnx(pruned), data), ref)
    r = PassManager("prune-channels{ratio=0.4},fold-prune,finetune{epochs=4,batch_size=16,lr=0.02,optimizer=adam}",
                    verify_each=True).run(g.copy(), Context(train=TrainingData(data)))
    st = r.stats["finetune"][0]
    assert st["modified"] and st["steps"] == 16 and st["distilled"]
    assert rel_err(run_ort(to_onnx(r.graph), data), ref) < before * 0.8
    with pytest.raises(GraphOptError, match="finetune needs training data"):
        PassManager("finetune").run(g.copy(), Context())
    with pytest.raises(GraphOptError, match="needs labels or a teacher"):
        PassManager("finetune{teacher=none}").run(g.copy(), Context(train=TrainingData(data)))
    with pytest.raises(GraphOptError, match="64 training inputs but 3 labels"):
        TrainingData(data, np.zeros(3, np.int64))


def test_convert_runs_a_training_step(tmp_path):
    from nets import export

    model, x = build("mlp")
    p = tmp_path / "m.onnx"
    p.write_bytes(export(model, x).SerializeToString())
    rng = np.random.default_rng(0)
    np.save(tmp_path / "x.npy", rng.standard_normal((32, 16)).astype(np.float32))
    np.save(tmp_path / "y.npy", rng.integers(0, 4, 32))
    pipe = "finetune{epochs=2,batch_size=8,teacher=none}"
    r = subprocess.run([sys.executable, "-m", "graphopt.cli", "convert", str(p), "-o", str(tmp_path / "o.onnx"),
                        "--pipeline", pipe, "--train", str(tmp_path / "x.npy"), "--train-labels",
                        str(tmp_path / "y.npy")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "finetune" in r.stdout and "steps=8" in r.stdout
    assert not np.allclose(run_ort(str(tmp_path / "o.onnx"), x), run_ort(str(p), x))
    r = subprocess.run([sys.executable, "-m", "graphopt.cli", "convert", str(p), "-o", str(tmp_path / "o2.onnx"),
                        "--pipeline", pipe], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "finetune needs training data" in r.stderr and len(r.stderr.splitlines()) == 1
    assert not (tmp_path / "o2.onnx").exists()


def test_cli_finetune_under_torchrun_joins_one_group(tmp_path):
    """`torchrun --nproc_per_node 2 graphopt finetune ...` trains once on two processes (each its
    share of every batch), writes one output from rank 0, equal to the single-process result."""
    teacher, student, data = pruned_pair()
    (tmp_path / "s.onnx").write_bytes(to_onnx(student).SerializeToString())
    (tmp_path / "t.onnx").write_bytes(to_onnx(teacher).SerializeToString())
    np.save(tmp_path / "d.npy", data)
    args = ["finetune", str(tmp_path / "s.onnx"), "--data", str(tmp_path / "d.npy"), "--teacher",
            str(tmp_path / "t.onnx"), "--batch-size", "16", "--lr", "0.05", "--max-steps", "3"]
    graphopt_cli(*args, "-o", tmp_path / "one.onnx")
    two = graphopt_cli(*args, "-o", tmp_path / "two.onnx", "--checkpoint", tmp_path / "ck.pt", nproc=2, port=29531)
    assert two.stdout.count("on 2 process(es)") == 1 and two.stdout.count("wrote") == 1, two.stdout
    a, b = load_onnx(tmp_path / "one.onnx"), load_onnx(tmp_path / "two.onnx")
    start = load_onnx(tmp_path / "s.onnx")
    moved = 0
    for name, v in a.constants.items():
        np.testing.assert_allclose(b.constants[name].const, v.const, rtol=1e-4, atol=1e-6)
        moved += not np.array_equal(v.const, start.constants[name].const)
    assert moved > 0 and (tmp_path / "ck.pt").is_file()


DDP_PIPELINE_WORKER = r"""
import sys, numpy as np, torch
sys.path.insert(0, {tests!r})
import torch.distributed as dist
from nets import build
import graphopt
from graphopt.masks import get_mask
from graphopt.passmanager import Context, PassManager, TrainingData
rank, world, out, pipe = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
if world > 1:
    dist.init_process_group("gloo", init_method="file://" + {store!r}, rank=rank, world_size=world)
torch.set_num_threads(1)
model, x = build("resnet", 0)
rng = np.random.default_rng(0)
xs = rng.standard_normal((128,) + x.shape[1:]).astype(np.float32)
with torch.no_grad():
    ys = model(torch.from_numpy(xs)).argmax(1).numpy()
g = graphopt.from_torch(model, torch.from_numpy(x))
r = PassManager(pipe).run(g, Context(calib=xs[:32], train=TrainingData(xs, ys)))
arrays = {{k: v.const for k, v in r.graph.constants.items() if v.const is not None}}
arrays.update({{"mask:" + k: get_mask(v).keep for k, v in r.graph.constants.items() if get_mask(v) is not None}})
np.savez(out + f".rank{{rank}}.npz", **arrays)
if world > 1:
    dist.destroy_process_group()
"""


# BatchNorm frozen: with batch statistics each rank normalizes its own half batch (torch's DDP
# without SyncBatchNorm), which one process cannot reproduce
@pytest.mark.parametrize("pipe", [
    "canonicalize,fold-bn,quantize{weights=int4:channel,acts=uint8:tensor,qat=lsq},"
    "finetune{batch_size=16,lr=0.01,max_steps=4,teacher=none,kd_weight=0,freeze_bn=true}",
    "canonicalize,prune-gradual{final=0.6,end=0.8,frequency=1},"
    "finetune{batch_size=16,lr=0.01,max_steps=4,teacher=none,kd_weight=0,freeze_bn=true}",
], ids=["qat-lsq", "gradual"])
def test_two_gloo_processes_keep_learned_steps_and_masks_identical(tmp_path, pipe):
    script = tmp_path / "worker.py"
    script.write_text(DDP_PIPELINE_WORKER.format(tests=os.path.dirname(__file__), store=str(tmp_path / "store")))
    run_one_and_two_ranks(script, tmp_path / "one", tmp_path / "two", pipe)
    one = np.load(tmp_path / "one.rank0.npz")
    r0, r1 = np.load(tmp_path / "two.rank0.npz"), np.load(tmp_path / "two.rank1.npz")
    assert set(r0.files) == set(r1.files) == set(one.files)
    masks = [k for k in r0.files if k.startswith("mask:")]
    assert ("gradual" in pipe) == bool(masks)
    for k in r0.files:
        assert np.array_equal(r0[k], r1[k]), k  # the ranks never drift apart: weights, steps, masks
        if k.startswith("mask:"):
            assert np.array_equal(r0[k], one[k]), k  # the same weights pruned as one process
        else:
            np.testing.assert_allclose(r0[k], one[k], rtol=1e-4, atol=1e-5, err_msg=k)
