"""Conversion time from torch: graphopt's fx path and its exporter path against
``torch.onnx.export`` alone, on the twelve families of tools/arch_zoo.py, and a new user's
``graphopt convert tools/arch_zoo.py:NAME --input-shape 1,3,224,224`` on each.

    python tools/bench_convert.py [--models resnet50,vit_tiny] [--repeat 3] [--table]

Every timing runs in a fresh process (so no path profits from another's warm caches) and times
the conversion call alone, after torch and the model are loaded: ``torch`` is
``torch.onnx.export(dynamo=True)`` to a file, ``torch-dyn`` the same with the dynamic batch
dimension (``Dim.AUTO``) graphopt's exporter path asks for, ``export`` is graphopt's
``from_torch(exporter="export")`` (that export + reading it into the IR), ``fx`` is
``from_torch(exporter="fx")``; each followed by writing the ONNX file. The median of --repeat
processes. Overhead = graphopt's exporter path / torch.onnx.export with the same dynamic batch
- 1 (goal: under 20%). The CLI column
is the wall time of the whole command (process start, imports, conversion, write).
Results: tools/results/convert.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import arch_zoo  # noqa: E402
from common import load_results, save_results  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "convert.json"
HERE = Path(__file__).parent

_ONE = r"""
import sys, time, warnings, logging
warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)
sys.path.insert(0, sys.argv[4])
import torch, arch_zoo
name, mode, out = sys.argv[1], sys.argv[2], sys.argv[3]
m = getattr(arch_zoo, name)()
x = torch.randn(1, 3, 224, 224)
t = time.perf_counter()
if mode == "torch":
    torch.onnx.export(m, (x,), out, dynamo=True, external_data=False)
elif mode == "torch-dyn":  # with the dynamic batch dimension graphopt's exporter path asks for
    from torch.export import Dim
    torch.onnx.export(m, (x,), out, dynamo=True, external_data=False, input_names=["x"],
                      dynamic_shapes={"x": {0: Dim.AUTO}}, opset_version=18)
else:
    import graphopt
    g = graphopt.from_torch(m, x, exporter=mode)
    graphopt.save_onnx(g, out)
print(time.perf_counter() - t)
"""


def one(name: str, mode: str) -> float:
    with tempfile.TemporaryDirectory() as d:
        r = subprocess.run([sys.executable, "-c", _ONE, name, mode, str(Path(d) / "m.onnx"), str(HERE)],
                           capture_output=True, text=True, timeout=900)
        if r.returncode:
            raise RuntimeError(f"{name}/{mode}: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
        return float(r.stdout.strip().splitlines()[-1])


def cli(name: str) -> tuple[float, int, str]:
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "graphopt.cli", "convert", f"{HERE / 'arch_zoo.py'}:{name}",
                            "--input-shape", "1,3,224,224", "-o", str(Path(d) / "m.onnx"), "--no-report"],
                           capture_output=True, text=True, timeout=900)
        return time.perf_counter() - t, r.returncode, (r.stderr.strip().splitlines() or [""])[-1][:120]


def run(models: list[str], repeat: int, modes: list[str], with_cli: bool) -> None:
    res = load_results(RESULTS)
    for name in models:
        row = dict(res.get(name, {}))
        for mode in modes:
            ts = [one(name, mode) for _ in range(repeat)]
            row[f"{mode.replace('-', '_')}_s"] = round(statistics.median(ts), 3)
        if "torch_dyn_s" in row and "export_s" in row:
            row["export_overhead"] = round(row["export_s"] / row["torch_dyn_s"] - 1, 3)
        if "torch_s" in row and "fx_s" in row:
            row["fx_overhead"] = round(row["fx_s"] / row["torch_s"] - 1, 3)
        if with_cli:
            secs, rc, last = cli(name)
            row.update({"cli_s": round(secs, 2), "cli_rc": rc, "cli_last_line": last})
        row.update({"params_m": round(arch_zoo.params(getattr(arch_zoo, name)()) / 1e6, 2), "repeat": repeat})
        res[name] = row
        save_results(RESULTS, res)
        print(name, json.dumps(row), flush=True)


def table() -> None:
    res = load_results(RESULTS)
    print("| family | params | torch.onnx.export (s) | same, dynamic batch (s) | graphopt exporter path (s) | "
          "overhead vs dynamic | graphopt fx path (s) | fx / torch.onnx.export | `graphopt convert` CLI (s) | CLI exit |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in arch_zoo.NAMES:
        r = res.get(name)
        if r:
            dyn = r.get("torch_dyn_s")
            ov = f"{100 * r['export_overhead']:+.0f}%" if dyn else "-"
            print(f"| {name} | {r['params_m']} M | {r['torch_s']} | {dyn or '-'} | {r['export_s']} | {ov} | "
                  f"{r['fx_s']} | {r['fx_s'] / r['torch_s']:.2f}x | {r['cli_s']} | {r['cli_rc']} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(arch_zoo.NAMES))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--modes", default="torch,torch-dyn,export,fx")
    ap.add_argument("--no-cli", action="store_true")
    ap.add_argument("--table", action="store_true")
    a = ap.parse_args()
    if a.table:
        table()
        return 0
    run([m for m in a.models.split(",") if m], a.repeat, a.modes.split(","), not a.no_cli)
    return 0


if __name__ == "__main__":
    sys.exit(main())
