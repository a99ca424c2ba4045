"""onnxruntime's quantize_static with its SmoothQuant option, run in its own environment.

The option imports neural-compressor's ONNX adaptor, which exists only in neural-compressor 2.x,
and 2.x pins numpy < 2 (the main environment has numpy 2), so it gets a venv of its own:

  python -m venv /tmp/inc-venv
  /tmp/inc-venv/bin/pip install onnxruntime==1.32.0 "neural-compressor==2.6" onnx six

Usage: /tmp/inc-venv/bin/python tools/peers/ort_smoothquant.py MODEL.onnx CALIB.npz OUT.onnx [ALPHA]
(tools/bench_bert.py --inc-python /tmp/inc-venv/bin/python does this for its table). The
settings are the bench's quantize_static row's (QDQ, per-channel int8 weights, uint8 MinMax
activations) plus SmoothQuant at alpha 0.5, onnxruntime's documented default.
"""

import sys
import time

import numpy as np
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static


def main() -> int:
    src, calib_npz, out = sys.argv[1:4]
    alpha = float(sys.argv[4]) if len(sys.argv) > 4 else 0.5
    calib = dict(np.load(calib_npz))
    n = len(next(iter(calib.values())))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{k: v[i:i + 1] for k, v in calib.items()} for i in range(n)])

        def get_next(self):
            return next(self.items, None)

        def rewind(self):
            self.__init__()

    t = time.perf_counter()
    quantize_static(src, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    extra_options={"SmoothQuant": True, "SmoothQuantAlpha": alpha})
    print(f"seconds {time.perf_counter() - t:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
