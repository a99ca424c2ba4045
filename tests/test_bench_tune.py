"""The benchmarks' recipe search bookkeeping (tools/common.py): what --tune reports is chosen by
these helpers, so a resumed search, a diverging candidate and a tie must behave as documented."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from common import load_results, tune_best, tune_candidate, tune_record  # noqa: E402

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
