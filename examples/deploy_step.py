"""A deployment step: compress a model, gate it on size and on an accuracy check you supply, and
ship the artefact with its JSON report, or fail the job with the reason.

    python examples/deploy_step.py MODEL.onnx --calib calib.npy --eval x.npy y.npy \\
        --preset int8 --max-mb 5 --max-drop 1.0 --out dist/

Writes dist/model.onnx and dist/report.json only when every gate passes (exit 0); otherwise
prints one line per failed gate, writes nothing to --out, and exits 1. The accuracy check is
yours: replace ``top1`` with whatever your model is judged by.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

import graphopt


def top1(model_path: str | Path, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 in percent of an ONNX model on (x, y), in onnxruntime: the user's accuracy check."""
    s = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    logits = np.concatenate([s.run(None, {name: x[i:i + 64]})[0] for i in range(0, len(x), 64)])
    return 100.0 * float((logits.argmax(1) == y).mean())


def deploy(model: str, out_dir: str, calib: np.ndarray, x: np.ndarray, y: np.ndarray, preset: str = "int8",
           max_mb: float = 5.0, max_drop: float = 1.0) -> tuple[bool, dict]:
    """Compress, check, and ship; returns (shipped, the report dict with the gates added)."""
    with tempfile.TemporaryDirectory() as tmp:
        cand = Path(tmp) / "model.onnx"
        report = graphopt.convert(model, cand, preset=preset, calib=calib)
        base, acc = top1(model, x, y), top1(cand, x, y)
        mb = report.sizes["output_bytes"] / 1e6
        gates = {"size_mb": {"value": round(mb, 3), "limit": max_mb, "ok": mb <= max_mb},
                 "top1_drop": {"value": round(base - acc, 2), "limit": max_drop, "ok": base - acc <= max_drop,
                               "fp32": round(base, 2), "compressed": round(acc, 2)},
                 "integer_kernels": {"value": len(report.quantization["ort_kernels"]["float"]), "limit": 0,
                                     "ok": not report.quantization["ort_kernels"]["float"]}}
        d = report.to_dict() | {"gates": gates}
        shipped = all(g["ok"] for g in gates.values())
        if shipped:
            dest = Path(out_dir)
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(cand, dest / "model.onnx")
            (dest / "report.json").write_text(json.dumps(d, indent=1) + "\n")
    return shipped, d


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--calib", required=True, help="calibration inputs (.npy)")
    ap.add_argument("--eval", nargs=2, required=True, metavar=("X.npy", "Y.npy"), help="held-out inputs and labels")
    ap.add_argument("--preset", default="int8")
    ap.add_argument("--max-mb", type=float, default=5.0)
    ap.add_argument("--max-drop", type=float, default=1.0, help="top-1 points the compressed model may lose")
    ap.add_argument("--out", default="dist")
    a = ap.parse_args(argv)
    try:
        shipped, d = deploy(a.model, a.out, np.load(a.calib), np.load(a.eval[0]), np.load(a.eval[1]), a.preset,
                            a.max_mb, a.max_drop)
    except graphopt.GraphOptError as e:
        print(f"deploy: {e}", file=sys.stderr)
        return 1
    for name, g in d["gates"].items():
        print(f"{'ok  ' if g['ok'] else 'FAIL'} {name}: {g['value']} (limit {g['limit']})")
    print(f"shipped {a.out}/model.onnx and {a.out}/report.json" if shipped else "not shipped")
    return 0 if shipped else 1


if __name__ == "__main__":
    sys.exit(main())
