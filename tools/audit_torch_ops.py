"""Audit of the torch front end's fx path: which torch.nn.functional functions, Tensor methods,
torch functions and nn modules the architectures people use call, and which of them graphopt's
fx path converts.

    python tools/audit_torch_ops.py [--md docs/torch_ops.md]

It traces every family of tools/arch_zoo.py with torch.fx (as the front end does), lists each
call with the families that make it, and marks it converted (the fx path has a mapping) or not;
then a curated list of what modern blocks call beyond the zoo (norms in functional form,
split/unbind, reshapes, activations, attention, shifts, casts). Last, each family converted
end to end with exporter="fx" (no fallback) and compared with torch through onnxruntime.
"""

from __future__ import annotations

import argparse
import operator
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import arch_zoo  # noqa: E402

# what modern vision and transformer blocks call, beyond what the zoo's families happen to use
CURATED = {
    "norms": [F.layer_norm, F.group_norm, F.batch_norm, F.instance_norm, F.normalize, nn.LayerNorm, nn.GroupNorm,
              nn.BatchNorm2d, nn.InstanceNorm2d, "Tensor.norm", torch.rsqrt, "Tensor.rsqrt", "Tensor.pow", torch.pow,
              "Tensor.var", torch.var],
    "split": [torch.chunk, "Tensor.chunk", torch.split, "Tensor.split", torch.unbind, "Tensor.unbind",
              torch.tensor_split, torch.narrow, "Tensor.narrow"],
    "reshape": [torch.flatten, "Tensor.flatten", torch.unflatten, "Tensor.unflatten", nn.Flatten, nn.Unflatten,
                "Tensor.view", "Tensor.reshape", torch.permute, "Tensor.permute", torch.transpose, "Tensor.transpose",
                "Tensor.t", torch.t, "Tensor.contiguous", "Tensor.reshape_as", "Tensor.view_as", "Tensor.expand_as",
                "Tensor.type_as", "Tensor.expand", "Tensor.repeat", torch.squeeze, torch.unsqueeze, torch.cat,
                torch.stack, "Tensor.flip", torch.flip, F.pixel_shuffle, nn.PixelShuffle, F.unfold],
    "activations": [F.gelu, nn.GELU, F.silu, nn.SiLU, F.hardswish, nn.Hardswish, F.mish, nn.Mish, F.hardsigmoid,
                    nn.Hardsigmoid, F.relu6, F.elu, nn.ELU, F.softplus, nn.Softplus, torch.sigmoid, torch.tanh,
                    F.log_softmax, torch.softmax, "Tensor.softmax"],
    "attention": [F.scaled_dot_product_attention, nn.MultiheadAttention, torch.matmul, torch.bmm, "Tensor.bmm",
                  torch.einsum, "Tensor.masked_fill", torch.masked_fill, torch.baddbmm],
    "shift / window": [torch.roll, "Tensor.roll", operator.getitem, F.pad, nn.ZeroPad2d, F.interpolate],
    "casts / factories": ["Tensor.to", "Tensor.float", "Tensor.half", torch.zeros_like, torch.ones_like,
                          "Tensor.new_zeros", "Tensor.new_ones", torch.arange, torch.zeros, torch.full, "Tensor.amax",
                          torch.amax],
}


def _name(t) -> str:
    if isinstance(t, str):
        return t
    if isinstance(t, type):
        return f"nn.{t.__name__}" if t.__module__.startswith("torch.nn") else f"{t.__module__}.{t.__name__}"
    mod = getattr(t, "__module__", "") or ""
    mod = {"torch.nn.functional": "F", "torch._C._nn": "F", "torch.functional": "torch", "_operator": "operator",
           "torch._C._VariableFunctions": "torch"}.get(mod, mod)
    return f"{mod}.{getattr(t, '__name__', t)}"


def converts(t) -> bool:
    from graphopt.frontends.torch_fx import _FUNCTIONS, _MODULES

    return t in _MODULES if isinstance(t, type) else t in _FUNCTIONS


def traced_calls() -> dict:
    """{target: set of families} for every call in the fx traces of the zoo."""
    calls: dict = {}
    for name in arch_zoo.NAMES:
        m = getattr(arch_zoo, name)()
        gm = torch.fx.symbolic_trace(m)
        for n in gm.graph.nodes:
            if n.op == "call_function":
                t = n.target
            elif n.op == "call_method":
                t = f"Tensor.{n.target}"
            elif n.op == "call_module":
                t = type(gm.get_submodule(n.target))
                if t.__module__ == arch_zoo.__name__ or t in (nn.Sequential,):
                    continue
            else:
                continue
            calls.setdefault(t, set()).add(name)
    return calls


def end_to_end() -> dict:
    """Each family through the fx path alone: ok / the first op it lacks; max |diff| vs torch."""
    import onnxruntime as ort

    import graphopt

    out = {}
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    for name in arch_zoo.NAMES:
        m = getattr(arch_zoo, name)()
        try:
            g = graphopt.from_torch(m, x, exporter="fx")
        except Exception as e:
            out[name] = ("FAIL", str(e).splitlines()[0][:120])
            continue
        s = ort.InferenceSession(graphopt.to_onnx(g).SerializeToString(), providers=["CPUExecutionProvider"])
        y = s.run(None, {s.get_inputs()[0].name: x.numpy()})[0]
        with torch.no_grad():
            ref = m(x).numpy()
        out[name] = ("ok", f"max |diff| {float(np.abs(y - ref).max()):.2e} (output scale {float(np.abs(ref).max()):.2g})")
    return out


def report() -> str:
    lines = ["## Calls the zoo's families make (torch.fx trace)", "",
             "| call | fx path | families |", "|---|---|---|"]
    calls = traced_calls()
    for t, fams in sorted(calls.items(), key=lambda kv: (converts(kv[0]), _name(kv[0]))):
        lines.append(f"| `{_name(t)}` | {'yes' if converts(t) else '**no**'} | {', '.join(sorted(fams))} |")
    lines += ["", "## What modern blocks call beyond the zoo", "", "| group | call | fx path |", "|---|---|---|"]
    for group, items in CURATED.items():
        for t in items:
            lines.append(f"| {group} | `{_name(t)}` | {'yes' if converts(t) else '**no**'} |")
    lines += ["", "## Each family through the fx path alone (exporter=\"fx\"), against torch in onnxruntime", "",
              "| family | params | fx path | |", "|---|---|---|---|"]
    for name, (ok, what) in end_to_end().items():
        lines.append(f"| {name} | {arch_zoo.params(getattr(arch_zoo, name)()) / 1e6:.1f} M | {ok} | {what} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--md", type=Path, help="also write the report as markdown here")
    a = ap.parse_args()
    text = report()
    print(text)
    if a.md:
        a.md.write_text("# The torch front end's fx path: an audit\n\nWritten by `python tools/audit_torch_ops.py "
                        f"--md {a.md}`.\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
