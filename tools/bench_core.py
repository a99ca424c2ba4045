"""Benchmark: IR parse + round trip cost, and how it scales with graph size.

  python tools/bench_core.py [--model ../shared/models/efficientnet_lite0.onnx] [--repeat 5]

Prints, for the model: graphopt load_onnx + save_onnx next to plain onnx.load + onnx.save of
the same file (median of --repeat runs), and for synthetic graphs of 12.5k..100k nodes: the
time of load + canonicalize + save and the time per node, whose flatness shows linear growth.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import median_time  # noqa: E402

from graphopt import load_onnx, save_onnx  # noqa: E402
from graphopt.passmanager import PassManager  # noqa: E402


def synthetic(n_nodes: int) -> onnx.ModelProto:
    """A chain with side branches: Add(const) / Relu / Mul(const) / Identity, n_nodes in all."""
    nodes, inits = [], []
    prev = "x"
    ops = ("Add", "Relu", "Mul", "Identity")
    for i in range(n_nodes):
        op = ops[i % 4]
        out = f"v{i}"
        if op in ("Add", "Mul"):
            c = f"c{i}"
            inits.append(helper.make_tensor(c, TensorProto.FLOAT, [8], np.full(8, 0.5, np.float32)))
            nodes.append(helper.make_node(op, [prev, c], [out], name=f"n{i}"))
        else:
            nodes.append(helper.make_node(op, [prev], [out], name=f"n{i}"))
        prev = out
    g = helper.make_graph(nodes, "syn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                          [helper.make_tensor_value_info(prev, TensorProto.FLOAT, ["N", 8])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT.parent / "shared" / "models" / "efficientnet_lite0.onnx"))
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--sizes", default="12500,25000,50000,100000")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    from graphopt.passmanager import registry

    registry()  # import the pass library (and torch) once, outside every timed region

    model = Path(args.model)
    print("== parse + round trip of a real model (median of %d runs)" % args.repeat)
    if model.is_file():
        def ours():
            save_onnx(load_onnx(model), tmp / "ours.onnx")

        def plain():
            onnx.save(onnx.load(str(model)), str(tmp / "plain.onnx"))

        t_ours, t_plain = median_time(ours, args.repeat, 0), median_time(plain, args.repeat, 0)
        print(f"{'model':28s} {'graphopt load+save':>20s} {'onnx.load+save':>16s} {'ratio':>7s}")
        print(f"{model.name:28s} {t_ours * 1e3:17.0f} ms {t_plain * 1e3:13.0f} ms {t_ours / t_plain:7.2f}x")
        print(f"budget: < 1 s -> {'PASS' if t_ours < 1.0 else 'FAIL'}")
    else:
        print(f"(skipped: {model} not found)")

    print("\n== scaling on synthetic graphs: load_onnx + canonicalize + save_onnx")
    print(f"{'nodes':>8s} {'load ms':>9s} {'passes ms':>10s} {'save ms':>9s} {'total ms':>9s} {'us/node':>8s}")
    per_node = []
    for n in (int(s) for s in args.sizes.split(",")):
        proto = synthetic(n)
        path = tmp / f"syn{n}.onnx"
        onnx.save(proto, str(path))
        t0 = time.perf_counter()
        g = load_onnx(path)
        t1 = time.perf_counter()
        g = PassManager("canonicalize").run(g).graph
        t2 = time.perf_counter()
        save_onnx(g, tmp / f"syn{n}.out.onnx")
        t3 = time.perf_counter()
        per_node.append((t3 - t0) / n * 1e6)
        print(f"{n:8d} {(t1 - t0) * 1e3:9.0f} {(t2 - t1) * 1e3:10.0f} {(t3 - t2) * 1e3:9.0f} {(t3 - t0) * 1e3:9.0f} "
              f"{per_node[-1]:8.1f}")
    growth = per_node[-1] / per_node[0]
    print(f"time per node, largest / smallest graph: {growth:.2f} (1.0 = linear; 8.0 would be quadratic over 8x size)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
