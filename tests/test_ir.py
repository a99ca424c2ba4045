import numpy as np
import onnx
import pytest

from graphopt import Graph, GraphError
from graphopt.ir import Value


def small_graph():
    g = Graph("t")
    x = g.add_input("x", onnx.TensorProto.FLOAT, ("N", 4))
    w = g.add_const(np.ones((4, 3), np.float32), "w")
    mm = g.add_node("MatMul", [x, w], ["y"], name="mm", source="layer.fc")
    r = g.add_node("Relu", [mm.outputs[0]], ["z"], name="relu")
    g.set_outputs(r.outputs)
    g.infer_shapes()
    return g, x, w, mm, r


def test_build_links_and_provenance():
    g, x, w, mm, r = small_graph()
    assert x.uses == [(mm, 0)] and w.uses == [(mm, 1)]
    assert mm.outputs[0].producer is mm and mm.outputs[0].users() == [r]
    assert mm.source == "layer.fc" and r.source == "relu"
    assert r.outputs[0].shape == ("N", 3)
    g.verify()


def test_safe_remove_refuses_while_used():
    g, x, w, mm, r = small_graph()
    with pytest.raises(GraphError, match="still used by relu"):
        g.remove_node(mm)
    with pytest.raises(GraphError, match="graph outputs"):
        g.remove_node(r)
    assert mm in g and r in g  # nothing changed


def test_replace_all_uses_keeps_output_name():
    g, x, w, mm, r = small_graph()
    g.replace_all_uses(r.outputs[0], mm.outputs[0])
    g.remove_node(r)
    assert [o.name for o in g.outputs] == ["z"] and g.outputs[0] is mm.outputs[0]
    g.verify()


def test_verify_finds_dangling_input():
    g, x, w, mm, r = small_graph()
    stray = Value("stray")
    r.inputs[0] = stray
    with pytest.raises(GraphError, match="dangling"):
        g.verify()


def test_verify_finds_cycle():
    g, x, w, mm, r = small_graph()
    add = g.add_node("Add", [mm.outputs[0], mm.outputs[0]], ["a"], name="add")
    g.set_input(add, 1, r.outputs[0])
    g.set_input(r, 0, add.outputs[0])
    with pytest.raises(GraphError, match="cycle"):
        g.verify()


def test_verify_finds_const_and_type_mismatch():
    g, x, w, mm, r = small_graph()
    w.shape = (4, 5)  # recorded shape disagrees with the array
    with pytest.raises(GraphError, match="constant 'w'"):
        g.verify()
    g, x, w, mm, r = small_graph()
    r.outputs[0].shape = ("N", 7)  # inference says [N,3]
    with pytest.raises(GraphError, match="inference gives"):
        g.verify()


def test_duplicate_names_refused():
    g, *_ = small_graph()
    with pytest.raises(GraphError, match="duplicate value name"):
        g.add_input("x")
    c = g.add_const(np.zeros(2, np.float32), "w")  # non-exact names are made unique
    assert c.name != "w"


def test_toposort_stable_and_after_append():
    g, x, w, mm, r = small_graph()
    # a node added last but consumed by a node added earlier
    neg = g.add_node("Neg", [x], ["n"], name="neg")
    g.set_input(mm, 0, neg.outputs[0])
    g.toposort()
    assert [n.name for n in g.nodes] == ["neg", "mm", "relu"]


def test_copy_is_independent_and_shares_arrays():
    g, x, w, mm, r = small_graph()
    c = g.copy()
    c.verify()
    c.remove_node(c.node_by_name("relu"), safe=False)
    assert len(g) == 2 and len(c) == 1
    assert c.constants["w"].const is w.const


def test_dump_is_readable():
    g, *_ = small_graph()
    text = g.dump()
    assert "%y: f32[N,3] = MatMul(%x, %w)" in text and "# mm <- layer.fc" in text
