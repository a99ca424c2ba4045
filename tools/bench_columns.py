"""Column combining on ResNet-20 / CIFAR-10 (joint optimization) and on EfficientNet-Lite0's
pointwise layers (post-training), one resumable row at a time, with SCALE-Sim's cycle counts of
the dense layers in the same run.

  python tools/bench_columns.py --row cc-a8-g0.5 [--epochs 5]   # train (or resume) one row
  python tools/bench_columns.py --list
  python tools/bench_columns.py --effnet                         # the post-training EfficientNet rows
  python tools/bench_columns.py --scalesim [--scalesim-python PY] # cycles vs SCALE-Sim, dense layers
  python tools/bench_columns.py --int8-check                     # the int8 row on the array vs onnxruntime
  python tools/bench_columns.py --table
  python tools/bench_columns.py --plot docs/img/columns_tiles.png # tiles against top-1

ResNet-20 rows start from the pretrained FP32 weights (87.79) and fine-tune with the sparsity
benchmark's recipe (SGD momentum 0.9, cosine from lr 0.01, weight decay 1e-4, batch 128, crop +
flip, 0.5 distillation from the FP32 model at T = 4 + 0.5 cross-entropy, BatchNorm training),
for --epochs epochs (the table states them). A column-combining row is
``column-combine{sparsity=0.8,events=10,alpha=A,gamma=G,skip=[conv1,linear]}``: ten magnitude
pruning events over the first half of the steps, the sparsity rising as 0.8 (1 - (1 - i/10)^3),
every layer re-packed after each event (the paper's schedule); the first conv (27 columns) and
the classifier stay dense: each is one tile at every array size. ``magnitude`` is the same
schedule with alpha = 1 (no combining) at the sparsity the main row ended at.
Top-1 is on all 10,000 test images, through torch and through onnxruntime on the exported file
(its weights are the sparse matrices); tiles, utilization and cycles come from
``graphopt.columns`` at N = 32, 64 and 128, as a ratio to the dense network.

EfficientNet-Lite0 (post-training, no training): magnitude pruning of the 1x1 layers to S per
layer, then no packing (alpha 1), packing without pruning (gamma 0) or the paper's alpha 8,
gamma 0.5, each with bias correction of the pruning shift, calibrated on the first 128
imagenet-sample images and scored on the other 372; tiles over the 1x1 layers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import (
    agree_pct,
    cifar10,
    cifar_augment,
    cifar_normalize,
    fp32_file,
    load_results,
    ort_logits,
    ort_top1,
    ptq_data,
    save_results,
    top1_pct,
    torch_logits,
)

RESULTS = Path(__file__).resolve().parent / "results" / "columns.json"
WORK = Path(tempfile.gettempdir()) / "graphopt-columns"
FP32 = 87.79
SIZES = (32, 64, 128)
FT = ("finetune{{epochs={epochs},batch_size=128,lr={lr},weight_decay=0.0001,kd_weight=0.5,temperature=4,"
      "checkpoint={ck},resume=true}}")
CC = "column-combine{{sparsity={s},events=10,alpha={a},gamma={g},scope=layer,skip=[conv1,linear]}}"
# row -> (alpha, gamma); "magnitude" is alpha 1 at the main row's final sparsity
ROWS = {"dense": None, "cc-a8-g0.5": (8, 0.5), "magnitude": (1, 0.0),
        "cc-a2-g0.5": (2, 0.5), "cc-a4-g0.5": (4, 0.5), "cc-a16-g0.5": (16, 0.5),
        "cc-a8-g0.25": (8, 0.25), "cc-a8-g1.0": (8, 1.0), "cc-a8-g0.5-int8": (8, 0.5)}
TRAINS_AS = {"cc-a8-g0.5-int8": "cc-a8-g0.5"}
INT8 = "fold-bn,quantize{weights=int8:channel,acts=uint8:tensor}"


def array_stats(graph, pointwise_only: bool = False) -> dict:
    """Per array size: tiles, cycles (and their ratio to the dense layout), utilization and
    mapping efficiency of the packed network; layers without a plan count as dense."""
    from graphopt.passes.sparsity import prunable_layers

    from graphopt import columns as C
    from graphopt.meta import COLUMN_PLANS
    from graphopt.quantizers import is_fake_quant

    plans = graph.scratch.get(COLUMN_PLANS) or {}
    reps = []
    layers = prunable_layers(graph) or [  # a quantized graph: the weights sit behind their FakeQuant
        n for n in graph.nodes if n.op_type in ("Conv", "Gemm", "MatMul") and not n.domain and len(n.inputs) > 1
        and is_fake_quant(n.inputs[1].producer) and graph.const_value(n.inputs[1].producer.inputs[0]) is not None]
    if pointwise_only:  # EfficientNet: the 1x1 layers column combining packs there
        layers = [n for n in layers if C.pointwise(n, np.shape(graph.const_value(n.inputs[1])))]
    for n in layers:
        v = n.inputs[1]
        if is_fake_quant(v.producer):
            v = v.producer.inputs[0]
        reps.append(C.layer_report(n, np.asarray(graph.const_value(v)), plans.get(v.name), SIZES))
    out = {}
    for m in SIZES:
        t = C.totals(reps, m)
        out[str(m)] = {"tiles": t["packed"]["tiles"], "dense_tiles": t["dense"]["tiles"],
                       "sparse_tiles": t["sparse"]["tiles"],
                       "tiles_ratio": round(t["packed"]["tiles"] / t["dense"]["tiles"], 4),
                       "sparse_ratio": round(t["sparse"]["tiles"] / t["dense"]["tiles"], 4),
                       "utilization": round(t["packed"]["utilization"], 4),
                       "dense_utilization": round(t["dense"]["utilization"], 4),
                       "mapping": round(t["packed"]["mapping"], 4),
                       "cycles_ratio": round(t["packed"]["cycles"] / t["dense"]["cycles"], 4)}
    w = sum(r["weights"] for r in reps)
    nz = sum(r["nonzeros"] for r in reps)
    return {"arrays": out, "sparsity": round(1 - nz / w, 4), "packed_layers": len(plans)}


def run_row(row: str, epochs: int, lr: float, limit: int | None) -> dict:
    import torch
    from cifar_resnet import resnet_cifar

    import graphopt
    from graphopt.backends import systolic
    from graphopt.backends.lowering import export_file
    from graphopt.passmanager import Context, PassManager, TrainingData

    xtr_u8, ytr = cifar10("train")
    xt_u8, yt = cifar10("test")
    xtr, xt = cifar_normalize(xtr_u8[:limit]), cifar_normalize(xt_u8)
    ytr = ytr[:limit]
    g = PassManager("canonicalize").run(graphopt.from_torch(resnet_cifar(20), torch.zeros(1, 3, 32, 32))).graph
    WORK.mkdir(parents=True, exist_ok=True)
    out = WORK / f"{row}.onnx"
    if row == "dense":
        q, pipe, secs, ran = g, "canonicalize", 0.0, 0
    else:
        a, gm = ROWS[row]
        s = 0.8
        if row == "magnitude":
            main = load_results(RESULTS).get("cc-a8-g0.5")
            if not main:
                raise SystemExit("run --row cc-a8-g0.5 first: magnitude prunes to the sparsity it ended at")
            s = main["sparsity"]
        ck = WORK / f"{TRAINS_AS.get(row, row)}.pt"
        pipe = CC.format(s=s, a=a, g=gm) + "," + FT.format(epochs=epochs, lr=lr, ck=ck)
        calib = xtr[np.random.default_rng(0).permutation(len(xtr))[:512]]
        t = time.perf_counter()
        r = PassManager(pipe).run(g.copy(), Context(calib=calib, train=TrainingData(xtr, ytr, cifar_augment),
                                                    teacher=g.copy()))
        secs = time.perf_counter() - t
        q = r.graph
        ran = r.stats["finetune"][0].get("epochs", 0)
        if row.endswith("-int8"):  # the plans stay keyed by the weights fold-bn rewrites in place
            q = PassManager(INT8).run(q, Context(calib=calib)).graph
            pipe += "," + INT8
    sim = torch_logits(graphopt.to_torch(q).eval(), xt)
    export_file(q, out, "qdq" if row.endswith("-int8") else "float")
    ort = ort_logits(out, xt)
    res = {"pipeline": pipe, "epochs": epochs if row != "dense" else 0, "torch_top1": top1_pct(sim, yt),
           "ort_top1": top1_pct(ort, yt), "agree": agree_pct(sim, ort), "train_images": len(xtr),
           "wall_s": round(secs, 1), "s_per_epoch": round(secs / ran, 1) if ran else None, **array_stats(q)}
    if row == "cc-a8-g0.5" or row.endswith("-int8"):
        layers = systolic.packed_layers(q)
        pf = WORK / f"{row}.packed.npz"
        systolic.save_packed(pf, layers, model=out.name)
        res["packed_file"] = {"layers": len(layers), "bytes": pf.stat().st_size,
                              "int8": bool(layers and layers[0].scales is not None)}
    if row != "dense" and not ran:  # re-scored from a finished checkpoint: keep the training's timing
        old = load_results(RESULTS).get(row, {})
        res.update({k: old.get(k) for k in ("wall_s", "s_per_epoch") if k in old})
    return res


# ------------------------------------------------------------------ the simulator against onnxruntime, int8
def int8_check(row: str = "cc-a8-g0.5-int8", images: int = 10000, batch: int = 250, n: int = 64) -> dict:
    """Every packed layer of the int8 row run on the systolic array (``systolic.run_qlinear``: u8 x
    s8 sums, zero points, int32 bias, onnxruntime's requantization) from the uint8 input codes
    onnxruntime computes on the test images, compared code for code with onnxruntime's own
    output codes of that layer. Equal everywhere, the network with every packed layer run on
    the array computes onnxruntime's logits exactly (each layer gets the same input and gives the
    same output; the other ops are unchanged)."""
    import onnx
    import onnxruntime as ortm

    import graphopt
    from graphopt.backends import systolic
    from graphopt.quantizers.packing import codes_of

    path, pf = WORK / f"{row}.onnx", WORK / f"{row}.packed.npz"
    if not path.exists() or not pf.exists():
        raise SystemExit(f"run --row {row} first")
    g = graphopt.load_onnx(str(path))
    layers = {L.source: L for L in systolic.load_packed(pf)}

    def const(v):
        return np.asarray(g.const_value(v))

    plan = []  # (layer, node, x code name, y code name, quantization facts)
    for node in g.nodes:
        if node.op_type not in ("Conv", "Gemm") or node.source not in layers:
            continue
        xdq, wdq = node.inputs[0].producer, node.inputs[1].producer
        bdq = node.inputs[2].producer if len(node.inputs) > 2 and node.inputs[2] is not None else None
        out = node.outputs[0]
        nxt = [u for u, _ in out.uses]
        if len(nxt) == 1 and nxt[0].op_type == "Relu":
            out = nxt[0].outputs[0]
            nxt = [u for u, _ in out.uses]
        q = next(u for u in nxt if u.op_type == "QuantizeLinear")
        L = layers[node.source]
        codes = codes_of(g, wdq.inputs[0])
        if not np.array_equal(L.geometry.from_filter_matrix(L.packed.unpack(), L.shape), codes):
            raise SystemExit(f"{node.source}: the packed file does not hold the model's int8 codes")
        plan.append((L, node, xdq.inputs[0].name, q.outputs[0].name,
                     dict(x_scale=const(xdq.inputs[1]), x_zero=int(const(xdq.inputs[2])), w_scale=const(wdq.inputs[1]),
                          bias_q=None if bdq is None else const(bdq.inputs[0]), y_scale=const(q.inputs[1]),
                          y_zero=int(const(q.inputs[2])))))
    model = onnx.load(str(path))
    names = sorted({p[2] for p in plan} | {p[3] for p in plan})
    have = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.helper.make_tensor_value_info(nm, onnx.TensorProto.UINT8, None)
                              for nm in names if nm not in have)
    so = ortm.SessionOptions()
    so.log_severity_level = 3
    sess = ortm.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    xt_u8, yt = cifar10("test")
    xt = cifar_normalize(xt_u8[:images])
    inp = sess.get_inputs()[0].name
    differ = {p[1].source: 0 for p in plan}
    total = {p[1].source: 0 for p in plan}
    for i in range(0, len(xt), batch):
        outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {inp: xt[i:i + batch]})))
        for L, node, xn, yn, qf in plan:
            y = systolic.run_qlinear(node, L.packed, outs[xn], n=n, **qf)
            differ[node.source] += int((y != outs[yn]).sum())
            total[node.source] += y.size
    res = {"row": row, "images": len(xt), "array": n, "layers": len(plan),
           "codes_compared": int(sum(total.values())), "codes_differing": int(sum(differ.values())),
           "per_layer_differing": {k: v for k, v in differ.items() if v}}
    print(json.dumps(res))
    out = load_results(RESULTS)
    out["int8-check"] = res
    save_results(RESULTS, out)
    return res


# ------------------------------------------------------------------ EfficientNet-Lite0, post-training
def run_effnet(levels=(0.3, 0.5)) -> dict:
    """Post-training rows on EfficientNet-Lite0's 1x1 layers: magnitude pruning alone (alpha 1),
    packing without pruning any conflict (gamma 0) and the paper's alpha 8, gamma 0.5, each with
    bias correction of the pruning shift. Tiles are counted over the 1x1 layers only (the
    depthwise layers are not packed, and their block-diagonal dense layout would swamp the totals)."""
    import graphopt
    from graphopt.backends.lowering import export_file
    from graphopt.passmanager import Context, PassManager

    calib, ycal, xt, yt = ptq_data("effnet")
    src = fp32_file("effnet")
    WORK.mkdir(parents=True, exist_ok=True)
    res = {k: v for k, v in load_results(RESULTS).items() if not k.startswith("effnet/")}
    g0 = PassManager("canonicalize").run(graphopt.load_onnx(str(src))).graph
    res["effnet/dense"] = {"pipeline": "canonicalize", "test": ort_top1(src, xt, yt), "calib": ort_top1(src, calib, ycal),
                           **array_stats(g0, pointwise_only=True)}
    save_results(RESULTS, res)
    print("effnet/dense", json.dumps({k: res["effnet/dense"][k] for k in ("test", "calib", "sparsity")}), flush=True)
    for s in levels:
        for name, a, gm in (("magnitude", 1, 0.0), ("cc-g0", 8, 0.0), ("cc-a8-g0.5", 8, 0.5)):
            key = f"effnet/{name}-{s}+bc"
            pipe = (f"column-combine{{sparsity={s},scope=layer,only=pointwise,alpha={a},gamma={gm},correct_bias=true}}")
            t = time.perf_counter()
            r = PassManager(pipe).run(g0.copy(), Context(calib=calib))
            secs = time.perf_counter() - t
            out = WORK / f"effnet_{name}_{s}.onnx"
            export_file(r.graph, out)
            res[key] = {"pipeline": "canonicalize," + pipe, "test": ort_top1(out, xt, yt), "calib": ort_top1(out, calib, ycal),
                        "convert_s": round(secs, 1), **array_stats(r.graph, pointwise_only=True)}
            save_results(RESULTS, res)
            a64 = res[key]["arrays"]["64"]
            print(key, f"test {res[key]['test']} calib {res[key]['calib']} sparsity {res[key]['sparsity']} "
                  f"tiles(64) {a64['tiles_ratio']}x", flush=True)
    return res


# ------------------------------------------------------------------ SCALE-Sim cross-check
def dense_layers(model: str) -> list[dict]:
    """Every Conv/Gemm of the dense network as a SCALE-Sim topology row, with graphopt's cycle count."""
    import torch
    from graphopt.passes.sparsity import prunable_layers

    import graphopt
    from graphopt import columns as C
    from graphopt.geometry import geometry, window
    from graphopt.passmanager import PassManager

    if model == "resnet20":
        from cifar_resnet import resnet_cifar

        g = graphopt.from_torch(resnet_cifar(20), torch.zeros(1, 3, 32, 32))
    else:
        g = graphopt.load_onnx(str(fp32_file("effnet")))
    g = PassManager("canonicalize,fold-bn").run(g).graph
    rows = []
    for n in prunable_layers(g):
        w = np.asarray(g.const_value(n.inputs[1]))
        f = geometry(n).filter_matrix(w)
        p = C.positions(n)
        if n.op_type == "Conv":
            kh, kw = w.shape[2:]
            st = window(n).strides[0]
            ho, wo = (int(d) for d in n.outputs[0].shape[2:4])
            ih = (ho - 1) * st + kh  # the padded input SCALE-Sim wants, for exactly ho x wo outputs
            iw = (wo - 1) * st + kw
            chans = f.shape[1] // (kh * kw)  # all input channels (a depthwise conv as its block-diagonal GEMM)
        else:
            kh = kw = st = ih = iw = 1
            chans = f.shape[1]
        rows.append({"layer": n.source, "ifmap": [ih, iw], "filter": [kh, kw], "channels": int(chans),
                     "filters": int(f.shape[0]), "stride": st, "positions": p, "groups": int(n.attr("group", 1)),
                     "graphopt": {str(m): C.ws_cycles(f.shape[0], f.shape[1], p, m) for m in SIZES}})
    return rows


def run_scalesim(python: str, models=("resnet20", "effnet"), sizes=SIZES, max_positions: int | None = None) -> dict:
    """SCALE-Sim's weight-stationary cycles of every dense layer against graphopt's count, one
    (model, array size) at a time, each saved as it finishes (SCALE-Sim takes minutes per size).
    ``max_positions``: only layers streaming at most this many input vectors (SCALE-Sim's time
    grows with them)."""
    res = load_results(RESULTS)
    peer = Path(__file__).resolve().parent / "peers" / "scalesim_layers.py"
    for model in models:
        # depthwise and grouped convs are left out: as one GEMM their block-diagonal matrix has C*K rows
        # (10,368 for a 1152-channel 3x3), which SCALE-Sim simulates fold by fold for hours
        layers = [L for L in dense_layers(model) if L["groups"] == 1
                  and (max_positions is None or L["positions"] <= max_positions)]
        for m in sizes:
            key = f"scalesim/{model}/{m}"
            if key in res:
                continue
            t = time.perf_counter()
            p = subprocess.run([python, str(peer), "--array", str(m)], input=json.dumps(layers), capture_output=True,
                               text=True)
            if p.returncode:
                raise SystemExit(f"SCALE-Sim failed: {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else p.returncode}")
            cyc = json.loads(p.stdout)
            res[key] = {"scalesim_s": round(time.perf_counter() - t, 1), "max_positions": max_positions,
                        "layers": [{"layer": L["layer"], "shape": [L["filters"], L["channels"] * L["filter"][0] *
                                                                   L["filter"][1]], "positions": L["positions"],
                                    "graphopt": L["graphopt"][str(m)], "scalesim": c,
                                    "ratio": round(L["graphopt"][str(m)] / c, 5) if c else None}
                                   for L, c in zip(layers, cyc)]}
            save_results(RESULTS, res)
            rs = [x["ratio"] for x in res[key]["layers"] if x["ratio"]]
            print(f"{model} N={m}: {len(rs)} layers, graphopt / SCALE-Sim cycles {min(rs):.4f}-{max(rs):.4f} "
                  f"({res[key]['scalesim_s']} s)", flush=True)
    return res


# ------------------------------------------------------------------ report
def table() -> None:
    res = load_results(RESULTS)
    print("| row | epochs | sparsity | top-1 torch | top-1 onnxruntime | tiles N=32 / 64 / 128 (x dense) | "
          "utilization N=64 | cycles N=64 (x dense) | s/epoch |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in ROWS:
        r = res.get(row)
        if not r:
            continue
        a = r["arrays"]
        tiles = " / ".join(f"{a[str(m)]['tiles_ratio']:.3f}" for m in SIZES)
        print(f"| {row} | {r['epochs']} | {100 * r['sparsity']:.1f}% | {r['torch_top1']:.2f} | {r['ort_top1']:.2f} | "
              f"{tiles} | {100 * a['64']['utilization']:.1f}% | {a['64']['cycles_ratio']:.3f} | "
              f"{r['s_per_epoch'] if r['s_per_epoch'] is not None else '-'} |")
    eff = [k for k in res if k.startswith("effnet/")]
    if eff:
        print("\n| EfficientNet-Lite0 | sparsity | top-1 test (calib) | tiles N=32 / 64 / 128 (x dense) | "
              "utilization N=64 |")
        print("|---|---|---|---|---|")
        for k in eff:
            r = res[k]
            a = r["arrays"]
            print(f"| {k.split('/')[1]} | {100 * r['sparsity']:.1f}% | {r['test']:.1f} ({r['calib']:.1f}) | "
                  + " / ".join(f"{a[str(m)]['tiles_ratio']:.3f}" for m in SIZES)
                  + f" | {100 * a['64']['utilization']:.1f}% |")
    for model in ("resnet20", "effnet"):
        cells = []
        for m in SIZES:
            s = res.get(f"scalesim/{model}/{m}")
            if not s:
                continue
            rs = [x["ratio"] for x in s["layers"] if x["ratio"]]
            tot_g = sum(x["graphopt"] for x in s["layers"])
            tot_s = sum(x["scalesim"] for x in s["layers"])
            cells.append(f"N={m}: {len(rs)} layers, per layer {min(rs):.4f}-{max(rs):.4f}, total {tot_g / tot_s:.4f}")
        if cells:
            print(f"\nSCALE-Sim ({model}, dense, weight stationary), graphopt / SCALE-Sim cycles: " + "; ".join(cells))


def plot(path: Path) -> None:
    from graphopt.plotting import pyplot, save_png

    plt = pyplot("--plot")
    res = load_results(RESULTS)
    rows = [r for r in ROWS if r in res]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.axhline(FP32, color="0.5", ls="--", lw=1, label=f"FP32 {FP32}")
    ax.axhline(FP32 - 1, color="0.7", ls=":", lw=1, label="FP32 - 1 (the goal)")
    for m, c in zip(SIZES, ("tab:blue", "tab:orange", "tab:green")):
        xs = [res[r]["arrays"][str(m)]["tiles_ratio"] for r in rows]
        ys = [res[r]["ort_top1"] for r in rows]
        ax.scatter(xs, ys, color=c, s=30, label=f"N = {m}", zorder=3)
        if m == 64:
            for x, y, r in zip(xs, ys, rows):
                below = r.endswith("-int8")  # sits on its float row: label it underneath
                ax.annotate(r, (x, y), xytext=(4, -10 if below else 3), textcoords="offset points", fontsize=7)
    ax.axvline(0.25, color="tab:red", lw=0.8, ls=":", label="0.25x tiles (the goal)")
    ep = sorted({res[r]["epochs"] for r in rows if res[r]["epochs"]})
    ax.set_xlabel("systolic-array tiles, x the dense network")
    ax.set_ylabel("top-1 on 10,000 test images (onnxruntime)")
    ax.set_title(f"ResNet-20 column combining, {'/'.join(map(str, ep))} epochs per trained row", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, path, dpi=120)
    print(f"wrote {path}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--row", help="the row to run (see --list)")
    ap.add_argument("--epochs", type=int, default=5, help="training epochs (the table states them)")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--limit", type=int, help="train on the first N images (smoke runs: own checkpoints, not saved)")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--effnet", action="store_true", help="the post-training EfficientNet-Lite0 rows")
    ap.add_argument("--scalesim", action="store_true", help="cycles of the dense layers against SCALE-Sim")
    ap.add_argument("--scalesim-python", default=os.environ.get("GRAPHOPT_SCALESIM_PYTHON", "/work/scalesim-venv/bin/python"),
                    help="python of a venv with scalesim==3.0.0 and numpy<2 (see tools/peers/scalesim_layers.py)")
    ap.add_argument("--sizes", default="32,64,128", help="--scalesim: array sizes")
    ap.add_argument("--models", default="resnet20,effnet", help="--scalesim: models")
    ap.add_argument("--max-positions", type=int, help="--scalesim: only layers with at most this many output pixels")
    ap.add_argument("--int8-check", action="store_true", help="the int8 row's packed layers on the systolic array "
                                                              "against onnxruntime's codes on the test images")
    ap.add_argument("--images", type=int, default=10000, help="--int8-check: test images")
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--plot", metavar="FILE.png")
    args = ap.parse_args()
    if args.table:
        table()
        return 0
    if args.plot:
        plot(Path(args.plot))
        return 0
    if args.list:
        for row, ag in ROWS.items():
            print(f"{row:18s} " + ("FP32, no training" if ag is None else
                                   f"{CC.format(s=0.8, a=ag[0], g=ag[1])}" + (f" + {INT8}" if row in TRAINS_AS else "")))
        return 0
    if args.int8_check:
        int8_check(images=args.images)
        return 0
    if args.effnet:
        run_effnet()
        return 0
    if args.scalesim:
        run_scalesim(args.scalesim_python, args.models.split(","), [int(v) for v in args.sizes.split(",")],
                     args.max_positions)
        return 0
    if args.row not in ROWS:
        ap.error(f"--row must be one of {', '.join(ROWS)}")
    global WORK
    if args.limit:
        WORK = WORK / "smoke"
    result = run_row(args.row, args.epochs, args.lr, args.limit)
    if not args.limit:
        res = load_results(RESULTS)
        res[args.row] = result
        save_results(RESULTS, res)
    print(json.dumps({args.row: {k: v for k, v in result.items() if k != "pipeline"}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
