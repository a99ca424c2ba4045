"""How fast the CLI answers: --help, --version, `passes`, and input errors (a missing file, a
file that is not ONNX, a folder), each the median wall time of --runs fresh processes.

    python tools/bench_startup.py [--runs 7] [--table]

Results in tools/results/startup.json. The goal (issue 30): under 1 s for each; the commands
that refuse an input or print help never import onnx or torch (tests/test_startup.py).
`passes` reads its catalogue from a cache keyed by the installed sources; "no cache yet" is a
user's first run (it imports the pass library, torch and onnx included, and writes the cache).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import load_results, save_results  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "startup.json"


def commands(tmp: Path) -> dict[str, list[str]]:
    garbage = tmp / "garbage.onnx"
    garbage.write_bytes(b"this is not a model\n")
    return {"--help": ["--help"], "--version": ["--version"], "passes": ["passes"],
            "passes (no cache yet)": ["passes"],
            "convert missing.onnx": ["convert", str(tmp / "missing.onnx"), "-o", str(tmp / "o.onnx")],
            "convert garbage.onnx": ["convert", str(garbage), "-o", str(tmp / "o.onnx")],
            "inspect FOLDER": ["inspect", str(tmp)]}


def measure(runs: int) -> dict:
    out = {}
    with tempfile.TemporaryDirectory() as d:
        for name, argv in commands(Path(d)).items():
            ts = []
            for i in range(runs):
                env = dict(os.environ)
                if "no cache" in name:  # a fresh cache folder each time: the first run a user sees
                    env["XDG_CACHE_HOME"] = str(Path(d) / f"cache{i}")
                t = time.perf_counter()
                r = subprocess.run([sys.executable, "-m", "graphopt.cli", *argv], capture_output=True, text=True,
                                   env=env)
                ts.append(time.perf_counter() - t)
            out[name] = {"median_s": round(statistics.median(ts), 3), "rc": r.returncode,
                         "line": (r.stderr or r.stdout).strip().splitlines()[0][:100]}
            print(f"{name:<22} {out[name]['median_s']:6.3f} s  rc {r.returncode}  {out[name]['line']}", flush=True)
    return out


def table() -> None:
    res = load_results(RESULTS)
    before = res.get("before", {})
    print("| command | before (s) | now (s) | exit |")
    print("|---|---|---|---|")
    for k, v in res.get("now", {}).items():
        b = before.get(k, {}).get("median_s", "-")
        print(f"| `graphopt {k}` | {b} | {v['median_s']} | {v['rc']} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--as", dest="key", default="now", help="the results key (before | now)")
    ap.add_argument("--table", action="store_true")
    a = ap.parse_args()
    if a.table:
        table()
        return 0
    res = load_results(RESULTS)
    res[a.key] = measure(a.runs)
    save_results(RESULTS, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
