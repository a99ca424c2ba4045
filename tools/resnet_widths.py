"""How much of a MAC reduction onnxruntime turns into speed on CIFAR ResNet-56 shapes.

Builds ResNet-56-shaped networks (random weights: only the shapes matter) with chosen widths
of the residual stream and of each block's inner channels (and, for the "depth" rows, fewer
blocks per stage: what prune-blocks does), and measures onnxruntime latency against
the full-width network in the same run. With --profile, prints onnxruntime's per-op
kernel time for the full network and for halved inner channels (what prune-channels{ratio=0.5}
does to ResNet-56), so the layers that do not speed up are visible.

  python tools/resnet_widths.py [--batch 256] [--rounds 10] [--only NAME_PREFIX ...]
                                [--profile [--profile-config NAME]]
"""

from __future__ import annotations

import argparse
import collections
import json
import sys

import numpy as np
import torch
import torch.nn.functional as F
from common import ort_session, paired_latency_ratios, ratio_summary
from torch import nn

CONFIGS = {  # name: (residual stream widths per stage, inner widths per stage[, blocks per stage])
    "full width": ((16, 32, 64), (16, 32, 64)),
    "inner /2 (graphopt ratio 0.5)": ((16, 32, 64), (8, 16, 32)),
    "inner 16,8,16": ((16, 32, 64), (16, 8, 16)),
    "inner 16,16,32": ((16, 32, 64), (16, 16, 32)),
    "stream and inner 16,16,32": ((16, 16, 32), (16, 16, 32)),
    "stream and inner /2": ((8, 16, 32), (8, 16, 32)),
    "depth: stage 1 of 4 blocks, inner 16,16,32": ((16, 32, 64), (16, 16, 32), (4, 9, 9)),
    "depth: stage 1 of 6, stream 16,16,64, inner 16,16,32": ((16, 16, 64), (16, 16, 32), (6, 9, 9)),
    "depth only: 5,5,4 blocks": ((16, 32, 64), (16, 32, 64), (5, 5, 4)),
    "depth only: 4,5,5 blocks": ((16, 32, 64), (16, 32, 64), (4, 5, 5)),
    "depth only: 5,4,5 blocks": ((16, 32, 64), (16, 32, 64), (5, 4, 5)),
}


class Block(nn.Module):
    def __init__(self, cin: int, mid: int, cout: int, stride: int):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(cin, mid, 3, stride, 1), nn.Conv2d(mid, cout, 3, 1, 1)
        self.stride, self.cin, self.cout = stride, cin, cout

    def forward(self, x):
        out = self.c2(F.relu(self.c1(x)))
        if self.stride != 1 or self.cin != self.cout:  # option A: subsample, zero-pad the channels
            p = self.cout - self.cin
            x = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, p // 2, p - p // 2))
        return F.relu(out + x)


class Net(nn.Module):
    def __init__(self, stream, inner, blocks_per_stage=(9, 9, 9)):
        super().__init__()
        self.stem = nn.Conv2d(3, stream[0], 3, 1, 1)
        blocks, cin = [], stream[0]
        for i in range(3):
            for j in range(blocks_per_stage[i]):
                blocks.append(Block(cin, inner[i], stream[i], 2 if (j == 0 and i) else 1))
                cin = stream[i]
        self.blocks, self.fc = nn.Sequential(*blocks), nn.Linear(cin, 10)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.blocks(F.relu(self.stem(x))), 1).flatten(1))


def profile(model_proto, x: np.ndarray, runs: int = 6) -> tuple[dict, dict]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.enable_profiling = True
    so.intra_op_num_threads = 2
    so.profile_file_prefix = "/tmp/graphopt_resnet_widths"
    sess = ort.InferenceSession(model_proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    for _ in range(runs):
        sess.run(None, {sess.get_inputs()[0].name: x})
    with open(sess.end_profiling()) as f:
        events = json.load(f)
    by_op, by_node, op_of = collections.Counter(), collections.Counter(), {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by_op[e["args"]["op_name"]] += e["dur"] / runs / 1e3
            by_node[e["name"][: -len("_kernel_time")]] += e["dur"] / runs / 1e3
            op_of[e["name"][: -len("_kernel_time")]] = e["args"]["op_name"]
    return by_op, by_node, op_of


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=10, help="paired latency rounds per configuration")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--profile-config", default="inner /2 (graphopt ratio 0.5)", choices=list(CONFIGS),
                    help="the configuration --profile compares with full width")
    ap.add_argument("--only", nargs="*", help="measure only the configurations whose name starts so")
    args = ap.parse_args()
    import graphopt
    from graphopt.analysis import total_macs

    torch.manual_seed(0)
    x = np.random.default_rng(0).standard_normal((args.batch, 3, 32, 32)).astype(np.float32)
    protos, macs = {}, {}
    for name, shape in CONFIGS.items():
        if args.only and name != "full width" and not any(name.startswith(o) for o in args.only):
            continue
        g = graphopt.from_torch(Net(*shape).eval(), torch.from_numpy(x[:2]))
        protos[name], macs[name] = graphopt.to_onnx(g), total_macs(g)
    full = "full width"
    sess = {k: ort_session(p) for k, p in protos.items()}
    feed = {k: {s.get_inputs()[0].name: x} for k, s in sess.items()}
    print(f"onnxruntime, batch {args.batch}: latency ratio against full width, median (quartiles) of "
          f"{args.rounds} paired rounds, and the realized share of the MACs reduction")
    for k in sess:
        if k != full:
            r = paired_latency_ratios(sess[full], sess[k], feed[full], feed[k], args.rounds)
            print(f"  {k:52s} MACs {macs[k] / macs[full]:.3f}: {ratio_summary(r, macs[k] / macs[full])}")
    if args.profile:
        half = args.profile_config
        (op_f, node_f, opn_f), (op_h, node_h, opn_h) = profile(protos[full], x), profile(protos[half], x)
        print(f"\nper-op kernel time, ms per run: {full} -> {half}")
        for op in sorted(set(op_f) | set(op_h), key=lambda o: -op_f.get(o, 0)):
            print(f"  {op:20s} {op_f.get(op, 0):8.1f} -> {op_h.get(op, 0):8.1f}")
        convs = [n for n in node_f if n in node_h and "nchwc" in n]
        print("first conv nodes (stage 1), ms per run:")
        for n in convs[:5]:
            print(f"  {n:40s} {node_f[n]:6.2f} -> {node_h[n]:6.2f}")
        print("Conv kernel time by stage (in execution order: the stem, then two convs a block), ms per run:")

        def by_stage(nodes, ops, shape):
            convs = [v for n, v in nodes.items() if ops[n] == "Conv"]
            ends = np.cumsum([1] + [2 * b for b in (shape[2] if len(shape) > 2 else (9, 9, 9))])
            return [sum(convs[a:b]) for a, b in zip([0, *ends[:-1]], ends)]

        for stage, a, b in zip(("stem", "stage 1", "stage 2", "stage 3"), by_stage(node_f, opn_f, CONFIGS[full]),
                               by_stage(node_h, opn_h, CONFIGS[half])):
            print(f"  {stage:8s} {a:8.1f} -> {b:8.1f}  ({b / a:.3f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
