"""Run SCALE-Sim 3.0.0 (weight stationary, no prefetch) on a list of layers; prints per-layer cycles
as JSON. Runs inside its own venv (SCALE-Sim needs numpy < 2):

  python -m venv /work/scalesim-venv && /work/scalesim-venv/bin/pip install "numpy<2" scalesim==3.0.0
  echo '[{"layer": ..., "ifmap": [H, W], "filter": [kh, kw], "channels": C, "filters": B, "stride": s}]' \\
      | /work/scalesim-venv/bin/python tools/peers/scalesim_layers.py --array 64

The config is ../shared/peers/scalesim.cfg's (every section SCALE-Sim's parser needs) with the
array size and ``Dataflow : ws`` set here. The IFMAP sizes include padding, as SCALE-Sim wants.
"""

import argparse
import csv
import json
import sys
import tempfile
from pathlib import Path

CFG = """[general]
run_name = graphopt

[architecture_presets]
ArrayHeight:    {n}
ArrayWidth:     {n}
IfmapSramSzkB:    1024
FilterSramSzkB:   1024
OfmapSramSzkB:    1024
IfmapOffset:    0
FilterOffset:   10000000
OfmapOffset:    20000000
Dataflow : ws
Bandwidth : 10
ReadRequestBuffer: 32
WriteRequestBuffer: 32

[layout]
IfmapCustomLayout: False
FilterCustomLayout: False
IfmapSRAMBankBandwidth: 10
IfmapSRAMBankNum: 10
IfmapSRAMBankPort: 2
FilterSRAMBankBandwidth: 10
FilterSRAMBankNum: 10
FilterSRAMBankPort: 2

[sparsity]
SparsitySupport : false
SparseRep : ellpack_block
OptimizedMapping : false
BlockSize : 8
RandomNumberGeneratorSeed : 40

[run_presets]
InterfaceBandwidth: CALC
UseRamulatorTrace: False
"""


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--array", type=int, required=True)
    args = ap.parse_args()
    layers = json.load(sys.stdin)
    from scalesim.scale_sim import scalesim

    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        (d / "cfg").write_text(CFG.format(n=args.array))
        with open(d / "topo.csv", "w") as f:
            f.write("Layer name, IFMAP Height, IFMAP Width, Filter Height, Filter Width, Channels, Num Filter, Strides,\n")
            for i, L in enumerate(layers):
                f.write(f"l{i}, {L['ifmap'][0]}, {L['ifmap'][1]}, {L['filter'][0]}, {L['filter'][1]}, "
                        f"{L['channels']}, {L['filters']}, {L['stride']},\n")
        s = scalesim(save_disk_space=True, verbose=False, config=str(d / "cfg"), topology=str(d / "topo.csv"),
                     layout=str(d / "topo.csv"))
        s.run_scale(top_path=str(d / "out"))
        with open(next((d / "out").glob("*/COMPUTE_REPORT.csv"))) as f:
            rows = list(csv.reader(f))[1:]
        print(json.dumps([int(r[2]) for r in rows if r]))  # "Total Cycles" (without prefetch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
