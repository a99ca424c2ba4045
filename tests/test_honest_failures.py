"""A bug inside a pass surfaces as a bug: its own type, the pass named, "internal error" in the
CLI. Only a ``GraphOptError`` (the pass refusing the user's input) becomes a ``PassError``."""

from dataclasses import dataclass

import pytest
import torch
from nets import build, export
from test_contract import check_contract

from graphopt import from_torch
from graphopt.cli import main
from graphopt.errors import GraphOptError, PassError
from graphopt.passmanager import Context, Pass, PassManager, PassResult, register_pass


@register_pass("test-keyerror")
@dataclass(kw_only=True)
class KeyErrorPass(Pass):
    """A buggy pass: looks up a key that is not there."""

    def run(self, graph, ctx):
        return PassResult(graph, bool({}["missing"]))


@register_pass("test-refuses")
@dataclass(kw_only=True)
class RefusingPass(Pass):
    """Refuses every graph, as a pass refuses input it cannot handle."""

    def run(self, graph, ctx):
        raise GraphOptError("this graph has no frobnicator")


def _graph():
    model, x = build("mlp")
    return from_torch(model, torch.from_numpy(x))


def test_a_bug_keeps_its_type_and_names_the_pass():
    with pytest.raises(KeyError) as e:
        PassManager("canonicalize,test-keyerror").run(_graph(), Context())
    assert not isinstance(e.value, GraphOptError)
    assert e.value.graphopt_pass == "test-keyerror"
    assert any("internal error in graphopt pass 'test-keyerror'" in n and "canonicalize" in n
               for n in getattr(e.value, "__notes__", []))


def test_a_refusal_is_a_pass_error():
    with pytest.raises(PassError, match="pass 'test-refuses' failed .*no frobnicator") as e:
        PassManager("test-refuses").run(_graph(), Context())
    assert isinstance(e.value.__cause__, GraphOptError)


def test_the_contract_test_fails_on_a_crashing_pass():
    with pytest.raises(KeyError):
        check_contract("test-keyerror", "mlp")
    assert check_contract("test-refuses", "mlp") is not None  # a refusal is reported, not raised


def test_cli_calls_a_pass_bug_an_internal_error(tmp_path, capsys):
    model, x = build("mlp")
    src = tmp_path / "m.onnx"
    src.write_bytes(export(model, x).SerializeToString())
    original = src.read_bytes()
    out = tmp_path / "o.onnx"
    rc = main(["convert", str(src), "-o", str(out), "--pipeline", "test-keyerror"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1, err
    assert "internal error in pass 'test-keyerror': KeyError" in err[0] and "--debug" in err[0], err[0]
    assert not out.exists()
    rc = main(["convert", str(src), "-o", str(out), "--pipeline", "test-refuses"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and "internal error" not in err[0] and "no frobnicator" in err[0], err
    with pytest.raises(KeyError):
        main(["--debug", "convert", str(src), "-o", str(out), "--pipeline", "test-keyerror"])
    assert not out.exists() and src.read_bytes() == original  # nothing half-written, the input untouched
