"""The Lottery Ticket Hypothesis loop: pruning by global magnitude, rewinding, the controls, and
resuming from the saved state."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from graphopt import from_torch
from graphopt.errors import GraphOptError
from graphopt.masks import get_mask
from graphopt.training.finetune import FinetuneConfig, finetune
from graphopt.training.lottery import _weights, format_table, lottery_ticket


def _task(seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    x = np.random.default_rng(seed).standard_normal((128, 10)).astype(np.float32)
    y = (x[:, :4] * np.arange(1, 5)).argmax(1)
    return from_torch(net, torch.from_numpy(x[:1])), x, y


def test_rounds_prune_globally_and_rewind_to_the_initial_weights():
    g, x, y = _task()
    init = {v.name: np.asarray(v.const).copy() for v in _weights(g)}
    frozen = FinetuneConfig(epochs=1, batch_size=32, lr=0.0)  # no learning: a round ends where it was rewound
    rows = lottery_ticket(g, x, y, rounds=3, rate=0.5, config=frozen)
    assert [round(r["remaining"], 3) for r in rows] == [1.0, 0.5, 0.25]
    for v in _weights(g):
        m = get_mask(v)
        np.testing.assert_array_equal(np.asarray(v.const), np.where(m.keep, init[v.name], 0))  # rewound survivors
    # global magnitude: the survivors are the largest initial |w| over both layers
    kept = np.concatenate([np.abs(init[v.name])[get_mask(v).keep] for v in _weights(g)])
    dropped = np.concatenate([np.abs(init[v.name])[~get_mask(v).keep] for v in _weights(g)])
    assert kept.min() >= dropped.max()


def test_late_rewinding_controls_and_resume(tmp_path):
    g, x, y = _task()
    cfg = FinetuneConfig(epochs=2, batch_size=32, lr=0.05)
    acc = lambda gr: float((__import__("graphopt").to_torch(gr)(torch.from_numpy(x)).argmax(1).numpy() == y).mean())  # noqa: E731
    st = tmp_path / "lth"
    first = lottery_ticket(g.copy(), x, y, rounds=2, rate=0.3, rewind_step=2, config=cfg, evaluate=acc, state=st)
    assert (tmp_path / "lth.json").is_file() and (tmp_path / "lth.npz").is_file()
    # the survivors rewind to the weights after step 2 of the first training, recomputed here
    snap = finetune(g.copy(), x, y, None, replace(cfg, snapshot_step=2))["snapshot"]
    with np.load(tmp_path / "lth.npz") as d:
        for v in _weights(g):
            np.testing.assert_array_equal(d[f"rewind/{v.name}"], snap[v.name])
            assert not np.array_equal(snap[v.name], np.asarray(v.const))  # step 2 is not the initialization
            # the round-2 network started from them: its pruned weights are zero, the others trained
            keep = d[f"mask/{v.name}"]
            assert not d[f"trained/{v.name}"][~keep].any()
    more = lottery_ticket(g.copy(), x, y, rounds=3, rate=0.3, rewind_step=2, config=cfg, evaluate=acc, state=st)
    assert len(more) == 3 and more[:2] == first and more[2]["remaining"] == pytest.approx(0.49, abs=0.01)
    with pytest.raises(GraphOptError, match="cannot rewind to step 99"):
        lottery_ticket(g.copy(), x, y, rounds=2, rewind_step=99, config=FinetuneConfig(epochs=1, batch_size=32))
    with pytest.raises(GraphOptError, match="written by another run"):
        lottery_ticket(g.copy(), x, y, rounds=3, rate=0.5, rewind_step=2, config=cfg, state=st)
    with pytest.raises(GraphOptError, match="rate per round must be in"):
        lottery_ticket(g.copy(), x, y, rate=1.0)


def _round_masks(state) -> dict[int, dict[str, np.ndarray]]:
    """The mask of each round (2, 3, ...) a run's state recorded, per weight."""
    out: dict[int, dict[str, np.ndarray]] = {}
    with np.load(str(state) + ".npz") as d:
        for k in d.files:
            if k.startswith("round"):
                r, name = k[5:].split("/", 1)
                out.setdefault(int(r), {})[name] = d[k]
    return out


def test_controls_follow_the_ticket_round_by_round(tmp_path):
    """Frankle & Carbin's controls, with a real learning rate over 4 rounds: reinit trains each
    round under the ticket's mask of that round from fresh weights; random_mask draws, each round,
    a mask with the ticket's per-layer counts (its masks differ, nested round to round)."""
    g, x, y = _task()
    cfg = FinetuneConfig(epochs=2, batch_size=32, lr=0.05)
    tk = tmp_path / "ticket"
    ticket = g.copy()
    lottery_ticket(ticket, x, y, rounds=4, rate=0.3, config=cfg, state=tk)
    tmasks = _round_masks(tk)
    assert sorted(tmasks) == [2, 3, 4]
    re = g.copy()
    lottery_ticket(re, x, y, rounds=4, rate=0.3, control="reinit", config=cfg, state=tmp_path / "re", ticket=tk)
    rmasks = _round_masks(tmp_path / "re")
    for r in (2, 3, 4):
        for name, m in tmasks[r].items():
            np.testing.assert_array_equal(rmasks[r][name], m)  # the ticket's mask of that round
    for a, b in zip(_weights(re), _weights(ticket)):
        np.testing.assert_array_equal(get_mask(a).keep, get_mask(b).keep)
    # other weights trained under the same masks
    assert not np.allclose(np.concatenate([np.ravel(a.const) for a in _weights(re)]),
                           np.concatenate([np.ravel(b.const) for b in _weights(ticket)]))
    rm = g.copy()
    lottery_ticket(rm, x, y, rounds=4, rate=0.3, control="random_mask", config=cfg, state=tmp_path / "rm", ticket=tk)
    mmasks = _round_masks(tmp_path / "rm")
    differ = 0
    for r in (2, 3, 4):
        for name, m in tmasks[r].items():
            assert mmasks[r][name].sum() == m.sum()  # the ticket's per-layer count of that round
            if 0 < m.sum() < m.size:
                assert not np.array_equal(mmasks[r][name], m)  # but another mask
                differ += 1
            if r > 2:
                assert not (mmasks[r][name] & ~mmasks[r - 1][name]).any()  # drawn among the survivors
    assert differ >= 3  # at least one partly pruned layer in every round
    # the controls refuse to run without the ticket's state, in one line
    with pytest.raises(GraphOptError, match="control=reinit follows the ticket's masks round by round"):
        lottery_ticket(g.copy(), x, y, rounds=2, control="reinit", config=cfg)
    with pytest.raises(GraphOptError, match="no ticket state at"):
        lottery_ticket(g.copy(), x, y, rounds=2, control="random_mask", config=cfg, ticket=tmp_path / "none")
    with pytest.raises(GraphOptError, match="has 4 rounds; the control asks for 5"):
        lottery_ticket(g.copy(), x, y, rounds=5, rate=0.3, control="reinit", config=cfg, ticket=tk)
    with pytest.raises(GraphOptError, match="is the state of a reinit run, not of the ticket"):
        lottery_ticket(g.copy(), x, y, rounds=2, control="reinit", config=cfg, ticket=tmp_path / "re")


def _files(tmp_path):
    from graphopt import save_onnx

    g, x, y = _task()
    save_onnx(g, str(tmp_path / "init.onnx"))
    np.save(tmp_path / "x.npy", x[:96])
    np.save(tmp_path / "y.npy", y[:96])
    np.save(tmp_path / "xv.npy", x[96:])
    np.save(tmp_path / "yv.npy", y[96:])
    return g, x, y


def test_cli_runs_every_control_writes_table_plot_and_model_and_resumes(tmp_path, capsys):
    from graphopt import load_onnx
    from graphopt.cli import main

    _files(tmp_path)
    args = ["lottery", str(tmp_path / "init.onnx"), "--data", str(tmp_path / "x.npy"), "--labels",
            str(tmp_path / "y.npy"), "--val-data", str(tmp_path / "xv.npy"), "--val-labels", str(tmp_path / "yv.npy"),
            "--controls", "ticket,reinit,random_mask", "--rounds", "2", "--rate", "0.5", "--epochs", "1",
            "--batch-size", "32", "--lr", "0.01", "--state", str(tmp_path / "st"), "-o", str(tmp_path / "t.onnx"),
            "--plot", str(tmp_path / "lth.png")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| weights remaining | ticket | reinit | random_mask |" in out
    assert "| 50.0% |" in out and "| 100.0% |" in out
    assert (tmp_path / "lth.png").read_bytes()[:4] == b"\x89PNG"
    ticket = load_onnx(str(tmp_path / "t.onnx"))
    ws = [np.asarray(v.const) for v in _weights(ticket)]
    assert sum((w == 0).sum() for w in ws) / sum(w.size for w in ws) == pytest.approx(0.5, abs=0.01)
    assert sorted(p.name for p in (tmp_path / "st").iterdir()) == sorted(
        f"{c}-rewind0.{e}" for c in ("ticket", "reinit", "random_mask") for e in ("json", "npz"))
    # a third round continues from the saved state: round 1 and 2 are not retrained
    first = out.split("| 50.0% |")[1].splitlines()[0]
    assert main([*args[:args.index("--rounds") + 1], "3", *args[args.index("--rounds") + 2:]]) == 0
    again = capsys.readouterr().out
    assert again.split("| 50.0% |")[1].splitlines()[0] == first
    assert "| 25.0% |" in again


@pytest.mark.parametrize("extra, msg", [
    (["--controls", "ticket,lucky"], "--controls takes ticket, reinit, random_mask, not 'ticket,lucky'"),
    (["--rate", "1.5"], "the pruning rate per round must be in (0, 1), not 1.5"),
    (["--val-data", "XV"], "--val-data and --val-labels go together"),
    (["--rewind", "1000"], "cannot rewind to step 1000"),
])
def test_cli_bad_input_is_one_line(tmp_path, capsys, extra, msg):
    from graphopt.cli import main

    _files(tmp_path)
    extra = [str(tmp_path / "xv.npy") if e == "XV" else e for e in extra]
    rc = main(["lottery", str(tmp_path / "init.onnx"), "--data", str(tmp_path / "x.npy"), "--labels",
               str(tmp_path / "y.npy"), "--state", str(tmp_path / "st"), "--epochs", "1", "-o",
               str(tmp_path / "t.onnx"), *extra])
    err = capsys.readouterr().err
    assert rc in (1, 2) and msg in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "t.onnx").exists()


def test_cli_labels_must_match_the_data(tmp_path, capsys):
    from graphopt.cli import main

    _files(tmp_path)
    np.save(tmp_path / "y.npy", np.zeros(10, np.int64))
    rc = main(["lottery", str(tmp_path / "init.onnx"), "--data", str(tmp_path / "x.npy"), "--labels",
               str(tmp_path / "y.npy"), "--state", str(tmp_path / "st")])
    assert rc == 1 and "has 96 samples but" in capsys.readouterr().err


def test_named_scores_are_kept_and_tabled():
    g, x, y = _task()
    cfg = FinetuneConfig(epochs=1, batch_size=32, lr=0.05)
    calls = []

    def both(gr):
        calls.append(1)
        return {"torch": 50.0 + len(calls), "onnxruntime": 40.0 + len(calls)}

    rows = lottery_ticket(g.copy(), x, y, rounds=2, rate=0.5, config=cfg, evaluate=both)
    assert [r["score"] for r in rows] == [51.0, 52.0]  # the first named score
    assert [r["scores"]["onnxruntime"] for r in rows] == [41.0, 42.0]
    table = format_table({"ticket": rows, "old": [{"round": 1, "remaining": 1.0, "score": 9.0, "loss": 1.0}]},
                         key="onnxruntime")
    assert "| 100.0% | 41.00 | - |" in table and "| 50.0% | 42.00 | - |" in table
    with pytest.raises(GraphOptError, match="no scores"):
        lottery_ticket(g.copy(), x, y, rounds=1, config=cfg, evaluate=lambda gr: {})


LOTTERY_WORKER = r"""
import sys, numpy as np, torch
sys.path.insert(0, {tests!r})
import torch.distributed as dist
from test_lottery import _task
from graphopt.masks import get_mask
from graphopt.training.finetune import FinetuneConfig
from graphopt.training.lottery import _weights, lottery_ticket
rank, world, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
if world > 1:
    dist.init_process_group("gloo", init_method="file://" + {store!r}, rank=rank, world_size=world)
torch.set_num_threads(1)
g, x, y = _task()
rows = lottery_ticket(g, x, y, rounds=3, rate=0.5, rewind_step=2,
                      config=FinetuneConfig(epochs=1, batch_size=32, lr=0.05, kd_weight=0.0))
arrays = {{"w:" + v.name: np.asarray(v.const) for v in _weights(g)}}
arrays.update({{"mask:" + v.name: get_mask(v).keep for v in _weights(g)}})
arrays["remaining"] = np.array([r["remaining"] for r in rows])
np.savez(out + f".rank{{rank}}.npz", **arrays)
if world > 1:
    dist.destroy_process_group()
"""


def test_two_gloo_processes_run_the_same_lottery_rounds_as_one(tmp_path):
    """Under DDP every rank prunes the same trained weights, rewinds to the same late snapshot and
    so holds the same masks round after round, and those are the masks one process finds."""
    import os

    from nets import run_one_and_two_ranks

    script = tmp_path / "worker.py"
    script.write_text(LOTTERY_WORKER.format(tests=os.path.dirname(__file__), store=str(tmp_path / "store")))
    run_one_and_two_ranks(script, tmp_path / "one", tmp_path / "two")
    one = np.load(tmp_path / "one.rank0.npz")
    r0, r1 = np.load(tmp_path / "two.rank0.npz"), np.load(tmp_path / "two.rank1.npz")
    assert set(r0.files) == set(r1.files) == set(one.files)
    np.testing.assert_allclose(r0["remaining"], [1.0, 0.5, 0.25], atol=0.01)
    for k in r0.files:
        assert np.array_equal(r0[k], r1[k]), k  # the ranks never drift apart
        if k.startswith("w:"):
            np.testing.assert_allclose(r0[k], one[k], rtol=1e-4, atol=1e-5, err_msg=k)
        else:
            assert np.array_equal(r0[k], one[k]), k  # the same weights pruned as by one process


def test_cli_lottery_under_torchrun_writes_one_state_and_model_from_rank_0(tmp_path):
    from nets import graphopt_cli

    from graphopt import load_onnx

    _files(tmp_path)
    args = ["lottery", str(tmp_path / "init.onnx"), "--data", str(tmp_path / "x.npy"), "--labels",
            str(tmp_path / "y.npy"), "--rounds", "2", "--rate", "0.5", "--epochs", "1", "--batch-size", "32",
            "--lr", "0.05", "--rewind", "1"]
    graphopt_cli(*args, "--state", tmp_path / "st1", "-o", tmp_path / "one.onnx")
    two = graphopt_cli(*args, "--state", tmp_path / "st2", "-o", tmp_path / "two.onnx", nproc=2, port=29533)
    assert two.stdout.count("| weights remaining |") == 1 and two.stdout.count("wrote") == 1, two.stdout
    assert sorted(p.name for p in (tmp_path / "st2").iterdir()) == ["ticket-rewind1.json", "ticket-rewind1.npz"]
    a, b = load_onnx(str(tmp_path / "one.onnx")), load_onnx(str(tmp_path / "two.onnx"))
    for va, vb in zip(_weights(a), _weights(b)):
        assert np.array_equal(np.asarray(va.const) == 0, np.asarray(vb.const) == 0), va.name  # one mask
        np.testing.assert_allclose(np.asarray(vb.const), np.asarray(va.const), rtol=1e-4, atol=1e-5)
