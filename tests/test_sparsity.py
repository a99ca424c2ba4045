"""Fine-grained sparsity: magnitude masks (global, per layer, by count or MACs), N:M groups, the
gradual schedule, and masks that hold through training, checkpoints and export."""

import numpy as np
import onnx
import pytest
import torch
from nets import build, run_ort

import graphopt
from graphopt import from_torch
from graphopt.errors import PassError
from graphopt.masks import get_mask
from graphopt.passmanager import Context, PassManager, TrainingData


def _graph(name="resnet"):
    model, x = build(name, 0)
    g = PassManager("canonicalize,fold-bn").run(from_torch(model, torch.from_numpy(x))).graph
    xs = np.random.default_rng(0).standard_normal((64,) + x.shape[1:]).astype(np.float32)
    return g, xs


def _weights(g):
    from graphopt.passes.sparsity import prunable_layers

    return {n.source: np.asarray(g.const_value(n.inputs[1])) for n in prunable_layers(g)}


def _out(g, xs):
    with torch.no_grad():
        return graphopt.to_torch(g)(torch.from_numpy(xs)).numpy()


def test_global_and_layerwise_magnitude_pruning():
    g, xs = _graph()
    r = PassManager("prune-weights{sparsity=0.5}").run(g.copy())
    ws = _weights(r.graph)
    total = sum(w.size for w in ws.values())
    zeros = sum(int((w == 0).sum()) for w in ws.values())
    assert zeros == int(0.5 * total) and r.modified
    per = [float((w == 0).mean()) for w in ws.values()]
    assert max(per) - min(per) > 0.05  # one threshold: the layers end up at different sparsities
    # the global threshold: every kept |w| is at least every dropped one
    orig = _weights(g)
    kept = np.concatenate([np.abs(orig[k])[w != 0] for k, w in ws.items()])
    dropped = np.concatenate([np.abs(orig[k])[w == 0] for k, w in ws.items()])
    assert kept.min() >= dropped.max()
    assert not np.allclose(_out(r.graph, xs), _out(g, xs))
    again = PassManager("prune-weights{sparsity=0.5}").run(r.graph)
    assert not again.modified  # idempotent
    lw = PassManager("prune-weights{sparsity=0.5,scope=layer,skip=[conv]}").run(g.copy()).graph
    per_l = {k: float((w == 0).mean()) for k, w in _weights(lw).items()}
    assert per_l["conv"] == 0.0 and all(abs(v - 0.5) < 0.02 for k, v in per_l.items() if k != "conv")
    assert not PassManager("prune-weights{sparsity=0}").run(g.copy()).modified  # nothing to remove


def test_targets_as_nonzero_params_and_macs():
    g, xs = _graph()
    ws = _weights(g)
    total = sum(w.size for w in ws.values())
    r = PassManager("prune-weights{nonzero_params=1000}").run(g.copy()).graph
    assert sum(int(np.count_nonzero(w)) for w in _weights(r).values()) == 1000
    from graphopt.passes.sparsity import sparsity_report

    m = PassManager("prune-weights{nonzero_macs=0.3}").run(g.copy()).graph
    rep = sparsity_report(m)
    share = sum(r["nonzero_macs"] for r in rep) / sum(r["macs"] for r in rep)
    assert share == pytest.approx(0.3, abs=0.01)
    with pytest.raises(PassError, match=r"sparsity must be in \[0, 1\), not 1.0"):
        PassManager("prune-weights{sparsity=1.0}").run(g.copy())
    with pytest.raises(PassError, match="exactly one of"):
        PassManager("prune-weights{sparsity=0.5,nonzero_params=10}").run(g.copy())
    with pytest.raises(PassError, match=f"more than the {total} prunable weights"):
        PassManager(f"prune-weights{{nonzero_params={total + 1}}}").run(g.copy())


def test_masks_hold_through_finetune_and_export():
    g, xs = _graph()
    ys = np.zeros(len(xs), np.int64)
    r = PassManager("prune-weights{sparsity=0.7},finetune{epochs=2,batch_size=16,lr=0.05,teacher=none,kd_weight=0}"
                    ).run(g.copy(), Context(train=TrainingData(xs, ys)))
    q = r.graph
    for n in q.nodes:
        m = get_mask(n.inputs[1]) if n.op_type in ("Conv", "Gemm") else None
        if m is not None:
            assert m.violations(q.const_value(n.inputs[1])) == 0
    proto = graphopt.to_onnx(q)
    onnx.checker.check_model(proto, full_check=True)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    ws = [inits[n.inputs[1].name] for n in q.nodes if n.op_type in ("Conv", "Gemm") and n.inputs[1].name in inits]
    assert sum(int((w == 0).sum()) for w in ws) / sum(w.size for w in ws) >= 0.7 - 1e-3
    np.testing.assert_allclose(run_ort(proto, xs), _out(q, xs), rtol=1e-4, atol=1e-5)


def test_n_m_groups_hold_after_training_and_export():
    g, xs = _graph()
    ys = np.zeros(len(xs), np.int64)
    r = PassManager("prune-nm{n=2,m=4},finetune{epochs=1,batch_size=16,lr=0.05,teacher=none,kd_weight=0}").run(
        g.copy(), Context(train=TrainingData(xs, ys)))
    st = r.stats["prune-nm"][0]
    assert "conv" in st["dense"] and "not a multiple of 4" in st["dense"]["conv"]  # 3 input channels
    proto = graphopt.to_onnx(r.graph)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    checked = 0
    for n in r.graph.nodes:
        if n.op_type in ("Conv", "Gemm") and n.source not in st["dense"]:
            w = inits[n.inputs[1].name]
            axis = 1
            groups = np.moveaxis(w != 0, axis, -1).reshape(-1, 4)
            assert groups.sum(1).max() <= 2
            checked += 1
    assert checked >= 5
    with pytest.raises(PassError, match="N < M"):
        PassManager("prune-nm{n=4,m=4}").run(g.copy())
    with pytest.raises(PassError, match="layer 'conv'.*not a multiple of 4"):
        PassManager("prune-nm{remainder=error}").run(g.copy())


def test_gradual_schedule_reaches_the_final_sparsity_and_survives_resume(tmp_path):
    from graphopt.passes.sparsity import scheduled_sparsity

    sched = {"final": 0.8, "initial": 0.0, "begin": 0.0, "end": 0.5, "frequency": 2, "power": 3.0}
    vals = [scheduled_sparsity(sched, t, 20) for t in range(20)]
    got = [v for v in vals if v is not None]
    assert got[0] == 0.0 and got[-1] == pytest.approx(0.8) and all(b >= a for a, b in zip(got, got[1:]))
    assert vals[11] is None  # after the end, masks stay
    g, xs = _graph()
    ys = np.zeros(len(xs), np.int64)
    ck = tmp_path / "gmp.pt"
    pipe = (f"prune-gradual{{final=0.8,end=0.5,frequency=2}},finetune{{epochs=2,batch_size=16,lr=0.05,"
            f"teacher=none,kd_weight=0,checkpoint={ck}}}")
    r = PassManager(pipe).run(g.copy(), Context(train=TrainingData(xs, ys)))
    ws = _weights(r.graph)
    sp = sum(int((w == 0).sum()) for w in ws.values()) / sum(w.size for w in ws.values())
    assert sp == pytest.approx(0.8, abs=0.01)
    state = torch.load(ck, weights_only=True)
    masks = [v for k, v in state["model"].items() if k.endswith("_mask")]
    assert masks and 1 - sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks) == pytest.approx(0.8, abs=0.01)
    # resuming the finished run from its checkpoint gives back the same sparse weights
    again = PassManager(pipe[:-1] + ",resume=true}").run(g.copy(), Context(train=TrainingData(xs, ys)))
    assert again.stats["finetune"][0]["steps"] == r.stats["finetune"][0]["steps"]  # nothing left to train
    for k, w in _weights(again.graph).items():
        np.testing.assert_array_equal(w == 0, ws[k] == 0)
    with pytest.raises(PassError, match="initial sparsity 0.9 is above the final 0.5"):
        PassManager("prune-gradual{initial=0.9,final=0.5}").run(g.copy())


def test_inspect_reports_sparsity_and_encodings(tmp_path):
    import subprocess
    import sys

    from graphopt.passes.sparsity import encoded_bits, sparsity_report

    w = np.zeros(64, np.float32)
    w[[0, 1, 40]] = 1.0  # gaps 0, 0, 38: 38 > 15 positions costs two padding entries
    assert encoded_bits(w, "relative") == (3 + 2) * 36
    g, xs = _graph()
    q = PassManager("prune-nm").run(g.copy()).graph
    rep = {r["layer"]: r for r in sparsity_report(q)}
    l1 = rep["l1.conv1"]
    assert l1["nm"] == "2:4" and l1["sparsity"] == 0.5 and l1["nm_bits"] == l1["params"] // 2 * 34
    path = tmp_path / "s.onnx"
    graphopt.save_onnx(q, path)
    r = subprocess.run([sys.executable, "-m", "graphopt.cli", "inspect", str(path), "--sparsity"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "l1.conv1" in r.stdout and "50.0%" in r.stdout and "MB compressed" in r.stdout
    assert "(2:4)" in r.stdout  # recognised from the zeros of the file
    # a very sparse layer matches an N:M pattern by chance; it is stored (and charged) in the smaller form
    sparse = PassManager("prune-weights{sparsity=0.97,scope=layer}").run(g.copy()).graph
    rows = sparsity_report(sparse)
    chance = [r for r in rows if r["nm"] is not None]
    assert chance and all(r["stored"] == "relative" and r["stored_bits"] == r["csr_bits"] < r["nm_bits"] for r in chance)
    assert all(r["stored_bits"] == min(r["csr_bits"], r["params"] * 32, r["nm_bits"] or 1 << 62) for r in rows)


def test_sensitivity_chosen_sparsities_meet_the_target():
    g, xs = _graph()
    r = PassManager("prune-weights{sparsity=0.6,scope=sensitivity,max_samples=32}").run(g.copy(), Context(calib=xs))
    st = r.stats["prune-weights"][0]
    assert st["sparsity"] >= 0.6 - 1e-9 and len(set(st["per_layer"].values())) > 1
    scan = {row["layer"]: row for row in st["scan"]}
    # every layer is hurt by its largest level, and the chosen levels come from the scan
    assert all(row["error"][0] == 0 and row["error"][-1] > 0 for row in scan.values())
    assert all(abs(st["per_layer"][k] - row["chosen"]) < 0.01 for k, row in scan.items())
    with pytest.raises(PassError, match="needs calibration data"):
        PassManager("prune-weights{sparsity=0.6,scope=sensitivity}").run(g.copy(), Context())


def test_analyze_sparsity_cli_prints_the_scan_the_choice_and_a_png(tmp_path, capsys):
    from graphopt.cli import main

    g, xs = _graph()
    model, calib, png = tmp_path / "m.onnx", tmp_path / "x.npy", tmp_path / "scan.png"
    graphopt.save_onnx(g, str(model))
    np.save(calib, xs[:32])
    assert main(["analyze", "sparsity", str(model), "--calib", str(calib), "--levels", "0.5,0.9", "--sparsity",
                 "0.5", "--prepare", "", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    layers = list(_weights(g))
    lines = {ln.split()[0]: ln.split() for ln in out.splitlines() if ln.split() and ln.split()[0] in layers}
    assert set(lines) == set(layers)
    for row in lines.values():  # params, 50%, 90%, chosen
        assert float(row[3]) >= float(row[2]) >= 0 and row[4].endswith("%")
    import re

    pruned = float(re.search(r"([0-9.]+)% of the weights pruned", out).group(1))
    assert 50.0 <= pruned < 60.0  # the target met, by the chosen per-layer levels
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert main(["analyze", "sparsity", str(model), "--calib", str(calib), "--sparsity", "1.5"]) == 1
    assert "--sparsity must be in [0, 1), not 1.5" in capsys.readouterr().err
