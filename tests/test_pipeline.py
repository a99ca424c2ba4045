from dataclasses import dataclass
from typing import Literal, Optional

import pytest

from graphopt import PipelineError
from graphopt.passmanager import Pass, PassResult, option, register_pass
from graphopt.pipeline import parse_pipeline, presets


@register_pass("test-typed")
@dataclass(kw_only=True)
class Typed(Pass):
    """A pass used only to test option parsing."""

    n: int = option(3, "an int", minimum=0)
    x: float = option(0.5, "a float")
    flag: bool = option(False, "a bool")
    mode: Literal["a", "b"] = option("a", "a choice")
    names: list[str] = option([], "a list")
    label: Optional[str] = option(None, "optional string")

    def run(self, graph, ctx):
        return PassResult(graph, False)


@pytest.mark.parametrize("text", [
    "canonicalize",
    "canonicalize{max_rounds=3},eliminate-dead",
    "test-typed{n=7,x=0.25,flag=true,mode=b,names=[conv1,\"fc,1\"],label=\"none\"}",
    "test-typed{label=\"a{b}\"}",
    "fold-constants{max_elements=10,shapes=false},remove-identity{dropout=false}",
])
def test_round_trip(text):
    p = parse_pipeline(text)
    assert parse_pipeline(str(p)) == p
    assert str(parse_pipeline(str(p))) == str(p)


def test_values_are_typed():
    (p,) = parse_pipeline(" test-typed { n = 7 , x=1e-3, flag=yes, names=[a,b], label=none } ").passes
    assert (p.n, p.x, p.flag, p.names, p.label) == (7, 1e-3, True, ["a", "b"], None)
    assert str(p) == "test-typed{n=7,x=0.001,flag=true,names=[a,b]}"


def test_defaults_print_bare():
    assert str(parse_pipeline("test-typed{n=3}")) == "test-typed"


@pytest.mark.parametrize("text,col,pattern", [
    ("canonicalise", 1, "unknown pass 'canonicalise'; did you mean 'canonicalize'"),
    ("canonicalize,eliminate-deaf", 14, "did you mean 'eliminate-dead'"),
    ("test-typed{nn=1}", 12, "no option 'nn'; did you mean 'n'"),
    ("test-typed{n=abc}", 14, "expects an integer, got 'abc'"),
    ("test-typed{n=-1}", 14, "must be >= 0"),
    ("test-typed{mode=c}", 17, "expects one of a|b"),
    ("test-typed{n=1,n=2}", 16, "given twice"),
    ("test-typed{n=1", 15, "expected '}'"),
    ("canonicalize,", 14, "expected a pass name"),
    ("", 1, "empty"),
    ("remove-identity{foo=1}", 17, "no option 'foo'"),
    ('test-typed{label="abc', 18, "unterminated"),
])
def test_errors_name_position_and_nearest(text, col, pattern):
    with pytest.raises(PipelineError, match=pattern) as e:
        parse_pipeline(text)
    assert e.value.column == col
    assert f"column {col}" in str(e.value) and "\n" not in str(e.value)


def test_presets_expand():
    pre = presets()
    assert "default" in pre
    assert str(parse_pipeline("default")) == pre["default"][0]
