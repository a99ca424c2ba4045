"""Peer runner: AIMET-ONNX cross-layer equalization on an ONNX file.

Runs inside a Python environment that has aimet-onnx (it needs its own torch), e.g.:
  python -m venv /tmp/aimetenv && /tmp/aimetenv/bin/pip install aimet-onnx
  /tmp/aimetenv/bin/python tools/peers/aimet_equalize.py IN.onnx OUT.onnx
Prints one JSON line: {"seconds": wall time of equalize_model}.
"""

import json
import sys
import time

import onnx
from aimet_onnx.cross_layer_equalization import equalize_model

model = onnx.load(sys.argv[1])
t = time.perf_counter()
equalize_model(model)
dt = time.perf_counter() - t
onnx.save(model, sys.argv[2])
print(json.dumps({"seconds": dt}))
