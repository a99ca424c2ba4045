"""Every training step on a GPU, a few steps each, with and without autocast: one PASS/FAIL
line per step, then a ResNet-20 QAT epoch timed on the GPU against the CPU.

    pip install -e '.[test]' && python tools/gpu_check.py [--device cuda] [--cpu-steps 20]
    python tools/gpu_check.py --device cpu --images 2048 --cpu-steps 4   # the same checks on a CPU (smoke)

Needs nothing from ../shared (random CIFAR-sized data, a randomly initialized ResNet-20).
Checks, per step: it runs on the device (the module's parameters live there), the loss is
finite, the trained graph's onnxruntime export equals the trained model evaluated in torch on
the CPU (argmax agreement >= 99.9%, outputs within one output step for quantized graphs),
masks stay applied, and a checkpoint written on the GPU resumes on the CPU. Exit code 1 if any
step fails. Budget: under 5 minutes on one GPU.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

import graphopt  # noqa: E402
from graphopt.backends.lowering import lower, to_model  # noqa: E402
from graphopt.passmanager import Context, PassManager, TrainingData  # noqa: E402

RESULTS: list[tuple[str, bool, str]] = []


def _data(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 3, 32, 32)).astype(np.float32), rng.integers(0, 10, n)


def _model():
    from cifar_resnet import CifarResNet

    torch.manual_seed(0)
    return CifarResNet(20).eval()


def _ort(graph, x):
    import onnxruntime as ort

    if any(n.op_type == "FakeQuant" for n in graph.nodes):
        low, rep = lower(graph, "qdq")
        proto = to_model(low, rep.opset)
    else:
        proto = graphopt.to_onnx(graph)
    s = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def _export_equal(graph, x) -> str:
    with torch.no_grad():
        sim = graphopt.to_torch(graph)(torch.from_numpy(x)).numpy()
    got = _ort(graph, x)
    agree = float((got.argmax(1) == sim.argmax(1)).mean())
    if agree < 0.999:
        raise AssertionError(f"export and trained model agree on {100 * agree:.1f}% only")
    return f"export agrees {100 * agree:.1f}%, max |diff| {float(np.abs(got - sim).max()):.2e}"


def check(name: str, fn) -> None:
    t = time.perf_counter()
    try:
        what = fn()
        RESULTS.append((name, True, what))
        print(f"PASS {name:42s} {time.perf_counter() - t:6.1f} s  {what}", flush=True)
    except Exception as e:  # one line per failure, the traceback below it
        RESULTS.append((name, False, str(e)))
        print(f"FAIL {name:42s} {time.perf_counter() - t:6.1f} s  {type(e).__name__}: {str(e).splitlines()[0][:160]}",
              flush=True)
        traceback.print_exc(limit=3)


def step(pipeline: str, device: str, amp: str, steps: int = 12, calib: int = 64):
    x, y = _data(512)
    g = graphopt.from_torch(_model(), torch.from_numpy(x[:1]))
    pipe = pipeline.replace("FT", f"finetune{{epochs=1,batch_size=32,lr=0.01,max_steps={steps},device={device},"
                                  f"amp={amp},teacher=none,kd_weight=0}}")
    r = PassManager(pipe).run(g, Context(calib=x[:calib], train=TrainingData(x, y)))
    ft = r.stats["finetune"][-1]
    if not ft["modified"]:
        raise AssertionError("finetune left every weight where it was")
    return r.graph, x, ft


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--cpu-steps", type=int, default=20, help="CPU steps timed for the epoch estimate")
    ap.add_argument("--images", type=int, default=50_000, help="the timed epoch's size (a smoke run on a CPU: 2048)")
    a = ap.parse_args()
    from graphopt.training.device import resolve_device

    dev = resolve_device(a.device)
    print(f"torch {torch.__version__}, device {dev}" + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda"
                                                         else ""), flush=True)
    amps = ["off", "bf16"] + (["fp16"] if dev.type == "cuda" else [])

    for amp in amps:
        def float_ft(amp=amp):
            g, x, st = step("canonicalize,FT", a.device, amp)
            return f"{st.get('steps', '?')} steps; " + _export_equal(g, x[:256])
        check(f"finetune (float) amp={amp}", float_ft)

        def qat(amp=amp):
            g, x, _ = step("canonicalize,fold-bn,quantize{weights=int4:channel,acts=uint8:tensor,qat=lsq},FT",
                           a.device, amp)
            return _export_equal(g, x[:256])
        check(f"QAT W4A8 LSQ amp={amp}", qat)

    def gradual():
        g, x, _ = step("canonicalize,fold-bn,prune-gradual{final=0.5,end=0.8,frequency=2},FT", a.device, "bf16",
                       steps=20)
        from graphopt.masks import get_mask

        kept = [get_mask(v).keep.mean() for v in g.constants.values() if get_mask(v) is not None]
        if not kept or max(kept) > 0.9:
            raise AssertionError(f"masks did not tighten: kept {kept[:4]}")
        return f"mean kept {np.mean(kept):.2f}; " + _export_equal(g, x[:256])
    check("gradual pruning amp=bf16", gradual)

    def columns():
        g, x, _ = step("canonicalize,fold-bn,column-combine{sparsity=0.5,events=2,alpha=4,gamma=0.5,skip=[conv1,linear]},FT",
                       a.device, "off", steps=20)
        return _export_equal(g, x[:256])
    check("column combining", columns)

    def lottery():
        from graphopt.training.finetune import FinetuneConfig
        from graphopt.training.lottery import lottery_ticket

        x, y = _data(256)
        g = graphopt.from_torch(_model(), torch.from_numpy(x[:1]))
        rows = lottery_ticket(g, x, y, rounds=2, rate=0.2,
                              config=FinetuneConfig(epochs=1, batch_size=32, lr=1e-3, optimizer="adam", max_steps=6,
                                                    device=a.device, kd_weight=0.0))
        return f"{len(rows)} rounds, remaining {rows[-1].get('remaining', '?')}"
    check("lottery ticket, 2 rounds", lottery)

    def resume_on_cpu():
        from graphopt.training.finetune import FinetuneConfig, finetune

        x, y = _data(256)
        with tempfile.TemporaryDirectory() as d:
            ck = str(Path(d) / "ck.pt")
            g = graphopt.from_torch(_model(), torch.from_numpy(x[:1]))
            finetune(g, x, y, config=FinetuneConfig(epochs=1, batch_size=32, checkpoint=ck, device=a.device,
                                                    kd_weight=0.0))
            state = torch.load(ck, map_location="cpu", weights_only=True)
            devs = {t.device.type for t in state["model"].values()}
            finetune(g, x, y, config=FinetuneConfig(epochs=2, batch_size=32, checkpoint=ck, resume=True, device="cpu",
                                                    kd_weight=0.0))
        return f"checkpoint tensors saved on {devs}; resumed on the CPU"
    check("checkpoint on the GPU, resume on the CPU", resume_on_cpu)

    def sweeps():
        from graphopt.passes.bits import bit_sensitivity
        from graphopt.passes.prune import sensitivity

        from graphopt.training.device import calibrating_on

        x, y = _data(64)
        g = PassManager("canonicalize,fold-bn").run(graphopt.from_torch(_model(), torch.from_numpy(x[:1])),
                                                    Context()).graph
        with calibrating_on(a.device):  # what `graphopt analyze ... --device` does
            rows = sensitivity(g, x, ratios=(0.3,), labels=y)
            bits = bit_sensitivity(g, x, widths=(4, 8), labels=y)
            hawq = bit_sensitivity(g, x, widths=(4, 8), labels=y, method="hessian", probes=2)
        return f"{len(rows)} channel-pruning trials, {len(bits)} + {len(hawq)} bit-width rows on {a.device}"
    check("analyze sweeps (channels, bits)", sweeps)

    def timing():
        from graphopt.training.finetune import FinetuneConfig, finetune

        x, y = _data(a.images)
        g0 = PassManager("canonicalize,fold-bn,quantize{weights=int4:channel,acts=uint4:tensor,qat=lsq}").run(
            graphopt.from_torch(_model(), torch.from_numpy(x[:1])), Context(calib=x[:256])).graph
        out = {}
        for d, steps in ((a.device, None), ("cpu", a.cpu_steps)):
            g = g0.copy()
            t = time.perf_counter()
            finetune(g, x, y, config=FinetuneConfig(epochs=1, batch_size=128, lr=1e-3, device=d, kd_weight=0.0,
                                                    max_steps=steps))
            secs = time.perf_counter() - t
            out[d] = secs if steps is None else secs / steps * (len(x) // 128)
        return (f"ResNet-20 W4A4 QAT epoch ({a.images:,} images, batch 128): {a.device} {out[a.device]:.1f} s, "
                f"cpu {out['cpu']:.0f} s (from {a.cpu_steps} steps, {torch.get_num_threads()} threads): "
                f"{out['cpu'] / out[a.device]:.1f}x")
    check("QAT epoch timing", timing)

    failed = [n for n, ok, _ in RESULTS if not ok]
    print(f"{len(RESULTS) - len(failed)} of {len(RESULTS)} passed" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
