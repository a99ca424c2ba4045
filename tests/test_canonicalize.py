import numpy as np
import onnx
import pytest
from nets import NETS, build, export, rel_err, run_ort
from onnx import TensorProto, helper

from graphopt import load_onnx, to_onnx
from graphopt.passmanager import Context, PassManager
from graphopt.pipeline import parse_pipeline


def run(text, g):
    (p,) = parse_pipeline(text).passes
    return p(g, Context())


def _model(nodes, inits=(), out_shape=(2, 3)):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, list(out_shape))
    return helper.make_model(helper.make_graph(nodes, "g", [x], [y], list(inits)),
                             opset_imports=[helper.make_opsetid("", 17)])


def check_same(before: onnx.ModelProto, g, x):
    out = to_onnx(g)
    onnx.checker.check_model(out, full_check=True)
    assert rel_err(run_ort(out, x), run_ort(before, x)) <= 1e-6


X = np.random.default_rng(1).standard_normal((2, 3)).astype(np.float32)


def test_remove_identity_and_dropout():
    proto = _model([helper.make_node("Identity", ["x"], ["a"]), helper.make_node("Relu", ["a"], ["b"]),
                    helper.make_node("Dropout", ["b"], ["c"]), helper.make_node("Identity", ["c"], ["y"])])
    g = load_onnx(proto)
    r = run("remove-identity", g)
    assert r.modified and r.stats["removed"] == 3
    assert [n.op_type for n in g.nodes] == ["Relu"] and g.outputs[0].name == "y"
    check_same(proto, g, X)
    assert not run("remove-identity", g).modified  # idempotent


def test_remove_identity_drops_a_pad_that_pads_nothing():
    zero = helper.make_tensor("p0", TensorProto.INT64, [4], [0, 0, 0, 0])
    some = helper.make_tensor("p1", TensorProto.INT64, [4], [0, 1, 0, 1])
    proto = _model([helper.make_node("Pad", ["x", "p0"], ["a"], mode="reflect"), helper.make_node("Relu", ["a"], ["b"]),
                    helper.make_node("Pad", ["b", "p1"], ["y"])], [zero, some], out_shape=(2, 5))
    g = load_onnx(proto)
    r = run("remove-identity", g)
    assert r.modified and r.stats["removed"] == 1  # the Pad that pads by 1 stays
    assert [n.op_type for n in g.nodes] == ["Relu", "Pad"]
    check_same(proto, g, X)
    assert not run("remove-identity", g).modified


def test_remove_identity_negative_cases():
    # a training-mode Dropout and an Identity joining graph input to output must stay
    t = helper.make_tensor("tm", TensorProto.BOOL, [], [True])
    proto = _model([helper.make_node("Dropout", ["x", "", "tm"], ["y"])], [t])
    g = load_onnx(proto)
    assert not run("remove-identity", g).modified
    g = load_onnx(_model([helper.make_node("Identity", ["x"], ["y"])]))
    r = run("remove-identity", g)
    assert not r.modified and len(g) == 1


def test_fold_constants():
    c1 = helper.make_tensor("c1", TensorProto.FLOAT, [3], [1, 2, 3])
    nodes = [helper.make_node("Constant", [], ["k"], value=helper.make_tensor("v", TensorProto.FLOAT, [3], [2, 2, 2])),
             helper.make_node("Mul", ["c1", "k"], ["m"]),  # constant subexpression
             helper.make_node("Shape", ["x"], ["s"]),  # static shape
             helper.make_node("Add", ["x", "m"], ["a"]),
             helper.make_node("Reshape", ["a", "s"], ["y"])]
    proto = _model(nodes, [c1])
    g = load_onnx(proto)
    r = run("fold-constants", g)
    assert r.modified and r.stats["folded"] == 3
    assert sorted(n.op_type for n in g.nodes) == ["Add", "Reshape"]
    check_same(proto, g, X)
    assert not run("fold-constants", g).modified


def test_fold_constants_leaves_dequantize_and_dynamic_shapes():
    q = helper.make_tensor("q", TensorProto.INT8, [3], [1, 2, 3])
    s = helper.make_tensor("s", TensorProto.FLOAT, [], [0.5])
    nodes = [helper.make_node("DequantizeLinear", ["q", "s"], ["w"]), helper.make_node("Add", ["x", "w"], ["y"])]
    g = load_onnx(_model(nodes, [q, s]))
    assert not run("fold-constants", g).modified
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])
    y = helper.make_tensor_value_info("y", TensorProto.INT64, [2])
    dyn = helper.make_model(helper.make_graph([helper.make_node("Shape", ["x"], ["y"])], "g", [x], [y]),
                            opset_imports=[helper.make_opsetid("", 17)])
    assert not run("fold-constants", load_onnx(dyn)).modified


def test_fold_constants_size_limit():
    shape = helper.make_tensor("sh", TensorProto.INT64, [2], [1000, 1000])
    nodes = [helper.make_node("ConstantOfShape", ["sh"], ["big"]), helper.make_node("ReduceSum", ["big"], ["r"]),
             helper.make_node("Add", ["x", "r"], ["y"])]
    g = load_onnx(_model(nodes, [shape]))
    r = run("fold-constants{max_elements=1000}", g)
    assert not r.modified and "ConstantOfShape" in [n.op_type for n in g.nodes]


def test_eliminate_dead():
    proto = _model([helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Neg", ["x"], ["dead"]),
                    helper.make_node("Exp", ["dead"], ["dead2"])],
                   [helper.make_tensor("unused", TensorProto.FLOAT, [1], [1.0])])
    g = load_onnx(proto)
    r = run("eliminate-dead", g)
    assert r.modified and r.stats == {"nodes": 2, "constants": 1}
    check_same(proto, g, X)
    assert not run("eliminate-dead", g).modified


@pytest.mark.parametrize("name", list(NETS))
def test_canonicalize_preserves_function_and_is_idempotent(name):
    model, x = build(name)
    proto = export(model, x, fold=False)
    g = load_onnx(proto)
    n0 = len(g)
    r = PassManager("canonicalize", verify_each=True).run(g)
    assert len(r.graph) <= n0
    check_same(proto, r.graph, x)
    assert not PassManager("canonicalize").run(r.graph).modified


def test_canonicalize_effnet(effnet_path):
    g = load_onnx(effnet_path)
    r = PassManager("canonicalize", verify_each=True).run(g)
    assert r.modified and not g.find_nodes("Constant")
    x = np.random.default_rng(0).uniform(-1, 1, (1, 3, 224, 224)).astype(np.float32)
    assert rel_err(run_ort(to_onnx(r.graph), x), run_ort(str(effnet_path), x)) <= 1e-5


def test_simplify_with_onnxsim():
    # a Shape->Gather->Unsqueeze->Concat->Reshape chain over a dynamic batch, as torch exports for flatten
    model, x = build("concat")
    proto = export(model, x, fold=False)
    g = load_onnx(proto)
    r = PassManager("simplify").run(g)
    check_same(proto, r.graph, x)
    again = PassManager("simplify").run(r.graph)
    assert not again.modified
