from dataclasses import dataclass

import onnx
import pytest

from graphopt import Graph, PassError
from graphopt.errors import PostconditionError, PreconditionError
from graphopt.passmanager import (
    Context,
    DumpIRInstrument,
    Pass,
    PassManager,
    PassResult,
    TimingInstrument,
    register_pass,
)


def tiny():
    g = Graph("t")
    x = g.add_input("x", onnx.TensorProto.FLOAT, (2,))
    n = g.add_node("Identity", [x], ["i"], name="id")
    r = g.add_node("Relu", [n.outputs[0]], ["y"], name="relu")
    g.set_outputs(r.outputs)
    return g


@register_pass("test-break")
@dataclass(kw_only=True)
class Break(Pass):
    """Corrupts the graph (drops a node without rewiring)."""

    def run(self, graph, ctx):
        graph.remove_node(graph.node_by_name("relu"), safe=False)
        return PassResult(graph, True)


@register_pass("test-bad-result")
@dataclass(kw_only=True)
class BadResult(Pass):
    """Returns the wrong type."""

    def run(self, graph, ctx):
        return graph


@register_pass("test-needs-relu")
@dataclass(kw_only=True)
class NeedsRelu(Pass):
    """Requires a Relu; ensures there is still a Relu afterwards (and removes it to break that)."""

    remove: bool = False

    def requires(self, graph):
        if not graph.find_nodes("Relu"):
            raise PreconditionError("no Relu")

    def ensures(self, graph):
        if not graph.find_nodes("Relu"):
            raise PostconditionError("Relu vanished")

    def run(self, graph, ctx):
        if self.remove:
            graph.find_nodes("Relu")[0].op_type = "Neg"
        return PassResult(graph, self.remove)


def test_pass_error_names_pass_and_history():
    with pytest.raises(PassError) as e:
        PassManager("remove-identity,eliminate-dead,test-break", verify_each=True).run(tiny())
    msg = str(e.value)
    assert "pass 'test-break' failed" in msg and "remove-identity, eliminate-dead" in msg
    assert e.value.__cause__ is not None


def test_verify_each_catches_corruption_only_when_on():
    PassManager("test-break").run(tiny())  # no verification: goes through
    with pytest.raises(PassError, match="dangling"):
        PassManager("test-break", verify_each=True).run(tiny())


def test_result_type_checked():
    with pytest.raises(PassError, match="not PassResult"):
        PassManager("test-bad-result").run(tiny())


def test_requires_and_ensures_are_checked():
    PassManager("test-needs-relu").run(tiny())
    with pytest.raises(PassError, match="Relu vanished"):
        PassManager("test-needs-relu{remove=true}").run(tiny())
    g = tiny()
    PassManager("remove-identity").run(g)
    g.find_nodes("Relu")[0].op_type = "Neg"
    with pytest.raises(PassError, match="no Relu"):
        PassManager("test-needs-relu").run(g)


def test_modified_flag_and_analysis_invalidation():
    ctx = Context()
    calls = []
    ctx.analysis("k", lambda: calls.append(1) or 1)
    r = PassManager("remove-identity").run(tiny(), ctx)
    assert r.modified and r.stats["remove-identity"][0]["removed"] == 1
    ctx.analysis("k", lambda: calls.append(1) or 1)
    assert len(calls) == 2  # recomputed after a modifying pass
    r2 = PassManager("remove-identity").run(r.graph, ctx)
    assert not r2.modified
    ctx.analysis("k", lambda: calls.append(1) or 1)
    assert len(calls) == 2  # kept: nothing changed


def test_instruments(tmp_path):
    t = TimingInstrument()
    PassManager("remove-identity,eliminate-dead", instruments=[t, DumpIRInstrument(tmp_path)]).run(tiny())
    assert [n for n, _ in t.timings] == ["remove-identity", "eliminate-dead"]
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["00-input.txt", "01-remove-identity.txt", "02-eliminate-dead.txt"]
    assert "Identity" in (tmp_path / "00-input.txt").read_text()
    assert "Identity" not in (tmp_path / "01-remove-identity.txt").read_text()


def test_fixed_point_repeats_until_unchanged():
    t = TimingInstrument()
    PassManager("remove-identity", fixed_point=True, instruments=[t]).run(tiny())
    assert len(t.timings) == 2  # one modifying round, one confirming round


def test_register_rejects_duplicates():
    with pytest.raises(ValueError, match="already registered"):
        register_pass("canonicalize")(dataclass(type("Other", (Pass,), {"__doc__": "x"})))

