"""The benchmarks' recipe search bookkeeping (tools/common.py): what --tune reports is chosen by
these helpers, so a resumed search, a diverging candidate and a tie must behave as documented."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from common import load_results, tune_best, tune_candidate, tune_record, tune_widen  # noqa: E402

from graphopt.errors import GraphOptError  # noqa: E402


def test_a_search_records_each_candidate_and_resumes_without_rerunning(tmp_path):
    path, key = tmp_path / "r.json", "tune/row"
    rec = tune_record(path, key, 2, rule="r")
    calls = []

    def score(v):
        return lambda: calls.append(v) or v

    a = tune_candidate(path, key, rec, "a", {"lr": 1}, 2, score(50.0))
    assert a["val_top1"] == 50.0 and load_results(path)[key]["candidates"]["a"]["lr"] == 1
    rec2 = tune_record(path, key, 2, rule="r")  # an interrupted search starts again from the file
    assert tune_candidate(path, key, rec2, "a", {"lr": 1}, 2, score(99.0))["val_top1"] == 50.0
    assert calls == [50.0]
    assert tune_record(path, key, 3, rule="r")["candidates"] == {}  # another budget starts afresh


def test_a_diverging_candidate_loses_and_a_tie_keeps_the_current_recipe(tmp_path):
    path, key = tmp_path / "r.json", "tune/row"
    rec = tune_record(path, key, 1)

    def diverge():
        raise GraphOptError("finetune: the training loss is not finite")

    cands = [tune_candidate(path, key, rec, n, {"lr": lr}, 1, s) for n, lr, s in
             [("own", 1, lambda: 70.0), ("bad", 2, diverge), ("tie", 3, lambda: 70.0)]]
    assert cands[1]["val_top1"] is None and "not finite" in load_results(path)[key]["failed"]["bad"]
    assert tune_best(key, rec, cands)["lr"] == 1
    with pytest.raises(SystemExit, match="every candidate failed"):
        tune_best(key, rec, [cands[1]])


def test_a_bug_in_a_candidate_is_not_recorded_as_a_loss(tmp_path):
    path, key = tmp_path / "r.json", "tune/row"
    rec = tune_record(path, key, 1)

    def bug():
        raise KeyError("oops")

    with pytest.raises(KeyError):
        tune_candidate(path, key, rec, "x", {}, 1, bug)
    assert "x" not in rec["candidates"]


def test_a_best_on_the_grids_edge_is_widened_until_bracketed(tmp_path):
    path, key = tmp_path / "r.json", "tune/row"
    rec = tune_record(path, key, 1)

    def run(lr, _best=None):  # validation top-1 peaks at lr 0.125, outside the grid
        return tune_candidate(path, key, rec, f"lr={lr}", {"lr": lr}, 1, lambda: 90.0 - abs(lr - 0.125) * 10)

    best = tune_widen(key, rec, [run(lr) for lr in (1.0, 2.0, 0.5)], "lr", 2, run)
    assert best["lr"] == 0.125
    assert sorted(c["lr"] for c in rec["candidates"].values()) == [0.0625, 0.125, 0.25, 0.5, 1.0, 2.0]
    rec2 = tune_record(tmp_path / "s.json", key, 1)  # at most `most` steps beyond the grid
    capped = tune_widen(key, rec2, [tune_candidate(tmp_path / "s.json", key, rec2, "a", {"lr": 1.0}, 1, lambda: 1.0),
                                    tune_candidate(tmp_path / "s.json", key, rec2, "b", {"lr": 2.0}, 1, lambda: 0.0)],
                        "lr", 2, lambda lr, _: {"lr": lr, "val_top1": 2.0}, most=1)
    assert capped["lr"] == 0.5


def test_a_failed_candidate_beyond_the_edge_brackets_the_search(tmp_path):
    path, key = tmp_path / "r.json", "tune/row"
    rec = tune_record(path, key, 1)

    def diverge():
        raise GraphOptError("finetune: the training loss is not finite")

    def run(lr, _best=None):
        return tune_candidate(path, key, rec, f"lr={lr}", {"lr": lr}, 1, diverge if lr > 2 else lambda: lr)

    assert tune_widen(key, rec, [run(1.0), run(2.0)], "lr", 3, run)["lr"] == 2.0
    assert set(rec["candidates"]) == {"lr=1.0", "lr=2.0", "lr=6.0"} and "lr=6.0" in rec["failed"]


def test_a_schedule_reaches_the_rows_pipeline_and_the_rows_own_stays_out_of_it(tmp_path):
    import bench_qat

    from graphopt.passmanager import PassManager

    ck = tmp_path / "ck.pt"
    own = bench_qat.row_pipeline("w2a2-lsq-mse", 2, 0.001, ck)
    assert bench_qat.row_pipeline("w2a2-lsq-mse", 2, 0.001, ck, schedule=dict(bench_qat.SCHEDULES[0])) == own
    assert "lr_schedule" not in own and "warmup" not in own  # the strings of rows measured before stage 4
    step = bench_qat.row_pipeline("w2a2-lsq-mse", 2, 0.001, ck, schedule={"lr_schedule": "step", "warmup": 0.1})
    assert "lr_schedule=step,warmup=0.1," in step
    ft = PassManager(step).passes[-1]
    assert (ft.lr_schedule, ft.warmup) == ("step", 0.1)


def test_a_tuned_row_trained_with_an_earlier_choice_is_marked_stale():
    import bench_qat

    chosen = {"bn_batch_frac": 0.5, "kd_weight": 1.0, "lr": 0.0005, "quant_weight_decay": None}
    res = {"tune/w2a2-lsq-mse": {"chosen": chosen, "rule": "r", "chosen_on": "split"}}
    same = bench_qat.chosen_on("w2a2-lsq-mse-tuned", res, ran=bench_qat.full_recipe(chosen))
    assert not same.startswith("STALE") and "chosen by r on split" in same
    res["tune/w2a2-lsq-mse"]["chosen"] = {**chosen, "lr_schedule": "step", "warmup": 0.0}  # a later --tune
    assert bench_qat.chosen_on("w2a2-lsq-mse-tuned", res, ran=bench_qat.full_recipe(chosen)).startswith("STALE")
    # a record from before the schedule was searched ran the rows' cosine: the same recipe, not stale
    res["tune/w2a2-lsq-mse"]["chosen"] = {**chosen, **bench_qat.SCHEDULES[0]}
    assert not bench_qat.chosen_on("w2a2-lsq-mse-tuned", res, ran=chosen).startswith("STALE")


def test_a_scope_row_without_its_own_tune_borrows_its_full_scope_twins_recipe_and_says_so():
    import bench_qat

    chosen = {"bn_batch_frac": 0.5, "kd_weight": 1.0, "lr": 0.0005, "quant_weight_decay": None}
    res = {"tune/w2a2-lsq-mse": {"chosen": chosen, "rule": "r", "chosen_on": "split"}}
    assert bench_qat.recipe_row("w2a2-lsq-mse-in-tuned", res) == "w2a2-lsq-mse"
    assert bench_qat.tuned_recipe("w2a2-lsq-mse-in-tuned", res) == chosen
    assert "borrowed" in bench_qat.chosen_on("w2a2-lsq-mse-in-tuned", res, ran=bench_qat.full_recipe(chosen))
    assert "borrowed" not in bench_qat.chosen_on("w2a2-lsq-mse-tuned", res, ran=bench_qat.full_recipe(chosen))
    # once the -in row is tuned itself, its own choice wins, and a row trained on the borrowed one is stale
    own = {**chosen, "lr": 0.001}
    res["tune/w2a2-lsq-mse-in"] = {"chosen": own, "rule": "r", "chosen_on": "split"}
    assert bench_qat.tuned_recipe("w2a2-lsq-mse-in-tuned", res) == own
    assert bench_qat.chosen_on("w2a2-lsq-mse-in-tuned", res, ran=bench_qat.full_recipe(chosen)).startswith("STALE")
    # neither tuned: the message names the --tune to run
    with pytest.raises(SystemExit, match="--tune w2a2-lsq-mse first"):
        bench_qat.tuned_recipe("w2a2-lsq-mse-in-tuned", {})
