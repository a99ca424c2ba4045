"""DESIGN.md's pass contract, checked for every registered pass on every test network. A new
pass gets these checks by registering; ``SETUP`` and ``OPTIONS`` only say how to give a pass
something to do.

For each pass and network:
* ``modified`` is exactly "the graph changed" (a fingerprint of nodes, attributes, constants
  and scratch data before and after);
* on a graph with nothing to do, ``modified`` is False;
* a second run changes nothing (or refuses with a PreconditionError, as ``quantize`` does on a
  quantized graph), unless the pass declares ``idempotent = False`` (training steps);
* ``verify()`` holds and ``onnx.checker`` accepts the export (lowered to Q/DQ when quantized);
* a pass declared ``preserves_function`` keeps the outputs within 1e-5 (relative L2).
"""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import pytest
import torch
from nets import NETS, build, rel_err, run_ort

import graphopt
from graphopt import from_torch
from graphopt.backends.lowering import is_quantized, lower, to_model
from graphopt.errors import PassError, PreconditionError
from graphopt.ir import Graph
from graphopt.passmanager import Context, PassManager, TrainingData, registry
from graphopt.pipeline import parse_pipeline

# how to give a pass something to do: a pipeline to run first, and the options to run it with
SETUP = {"fold-prune": "prune-channels{ratio=0.5}"}
OPTIONS = {"prune-channels": "{ratio=0.5}", "prune-blocks": "{count=1}", "finetune": "{batch_size=4,lr=0.001}",
           "prune-weights": "{sparsity=0.5}", "column-combine": "{sparsity=0.5}"}
# the passes that refuse a graph with nothing to do, and the one-line reason each gives; every
# other pass must run on it and report modified=False
REFUSES_NOTHING = {"choose-bits": "the model has no layer with quantizable weights",
                   "prune-blocks": "the model has only 0 removable residual blocks",
                   "prune-gradual": "the model has no layer with constant weights"}

PASSES = sorted(n for n in registry() if not n.startswith("test-"))


def fingerprint(g: Graph) -> str:
    h = hashlib.sha256(g.dump(max_attr_len=10**6).encode())
    for name, v in sorted(g.constants.items()):
        h.update(name.encode())
        h.update(np.ascontiguousarray(v.const).tobytes())
    h.update(repr(sorted((k, repr(v)) for k, v in g.scratch.items())).encode())
    return h.hexdigest()


def _prefix(name: str) -> str:
    cls = registry()[name]
    steps = [p for p in cls.after if p in registry()]
    if name in SETUP:
        steps.append(SETUP[name])
    return ",".join(steps)


def _export(g: Graph) -> onnx.ModelProto:
    if is_quantized(g):
        lowered, rep = lower(g, "qdq")
        return to_model(lowered, rep.opset)
    return graphopt.to_onnx(g)


def _run(pipeline: str, g: Graph, ctx: Context):
    return PassManager(pipeline, verify_each=True).run(g, ctx)


# pass name -> networks it ran on without refusing, filled by test_pass_contract
RAN: dict[str, set[str]] = {}


def check_contract(name: str, net: str) -> str | None:
    """Run the contract checks for one pass on one network. Returns the pass's refusal (a one-line
    ``PassError``, the only exception allowed to stop it) or None when every check ran. A bug in
    the pass (any other exception) propagates and fails the caller."""
    model, x = build(net)
    calib = np.random.default_rng(1).standard_normal((8,) + x.shape[1:]).astype(np.float32)
    ctx = Context(calib=calib, train=TrainingData(calib))
    g = from_torch(model, torch.from_numpy(x))
    pre = _prefix(name)
    if pre:
        g = _run(pre, g, ctx).graph
    ref = run_ort(_export(g), x)
    pipeline = name + OPTIONS.get(name, "")
    before = fingerprint(g)
    try:
        r1 = _run(pipeline, g.copy(), ctx)
    except PassError as e:
        # a pass may refuse a network it cannot handle, but only with a one-line reason
        assert "\n" not in str(e) and str(e)
        return str(e)
    RAN.setdefault(name, set()).add(net)
    g1 = r1.graph
    assert r1.modified == (fingerprint(g1) != before), "modified must say exactly whether the graph changed"
    g1.verify()
    proto = _export(g1)
    onnx.checker.check_model(proto, full_check=True)
    if registry()[name].preserves_function:
        assert rel_err(run_ort(proto, x), ref) <= 1e-5
    after1 = fingerprint(g1)
    if not registry()[name].idempotent:
        return None
    try:
        r2 = _run(pipeline, g1, ctx)
    except PassError as e:
        assert isinstance(e.__cause__, PreconditionError), e
        return None
    assert not r2.modified and fingerprint(r2.graph) == after1, "a second run must change nothing"
    return None


@pytest.mark.parametrize("net", sorted(NETS))
@pytest.mark.parametrize("name", PASSES)
def test_pass_contract(name, net):
    refusal = check_contract(name, net)
    if refusal is not None:
        pytest.skip(f"{name} refuses {net}: {refusal}")


@pytest.mark.parametrize("name", PASSES)
def test_every_pass_runs_unskipped_on_some_network(name):
    """A pass that refuses (or skips) every test network is never checked at all: at least one
    network must take it through every contract check. Reuses test_pass_contract's runs when
    they happened in this session (the whole file), else runs the networks itself (``-k``)."""
    if not RAN.get(name):
        for net in sorted(NETS):
            if check_contract(name, net) is None:
                break
    assert RAN.get(name), f"pass '{name}' refused every test network {sorted(NETS)}"


@pytest.fixture(scope="module")
def nothing_to_do():
    """A graph with no layer, no BN, no constant, nothing to fold: y = relu(x)."""
    g = Graph("nothing")
    x = g.add_input("x", onnx.TensorProto.FLOAT, ["N", 4])
    y = g.add_node("Relu", [x], ["y"]).outputs[0]
    y.dtype, y.shape = onnx.TensorProto.FLOAT, ["N", 4]
    g.set_outputs([y])
    return g


@pytest.mark.parametrize("name", PASSES)
def test_nothing_to_do_is_not_modified(name, nothing_to_do):
    g = nothing_to_do.copy()
    before = fingerprint(g)
    data = np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32)
    ctx = Context(calib=data, train=TrainingData(data))
    pm = PassManager(name + OPTIONS.get(name, ""), verify_each=True)
    if name in REFUSES_NOTHING:  # a clear one-line refusal, and only where one is expected
        with pytest.raises(PassError, match=REFUSES_NOTHING[name]) as e:
            pm.run(g, ctx)
        assert "\n" not in str(e.value)
        return
    r = pm.run(g, ctx)
    assert not r.modified and fingerprint(r.graph) == before


def test_every_pass_documents_itself_and_its_order_parses():
    for name in PASSES:
        cls = registry()[name]
        assert cls.summary(), f"{name} has no docstring"
        for other in cls.after + cls.before:
            assert other in registry(), f"{name} orders itself against unknown pass '{other}'"
        parse_pipeline(",".join([*cls.after, name]))  # its declared order is accepted
