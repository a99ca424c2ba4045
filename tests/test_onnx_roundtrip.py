import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from nets import NETS, build, export, rel_err, run_ort
from onnx import TensorProto, helper

from graphopt import FrontendError, load_onnx, save_onnx, to_onnx


@pytest.mark.parametrize("name", list(NETS))
def test_roundtrip_matches_onnxruntime(name, tmp_path):
    model, x = build(name)
    proto = export(model, x)
    g = load_onnx(proto)
    g.verify()
    out = to_onnx(g)
    onnx.checker.check_model(out, full_check=True)
    assert rel_err(run_ort(out, x), run_ort(proto, x)) <= 1e-5
    # and via a file
    save_onnx(g, tmp_path / "m.onnx")
    assert rel_err(run_ort(str(tmp_path / "m.onnx"), x), run_ort(proto, x)) <= 1e-5
    assert [n.name for n in load_onnx(tmp_path / "m.onnx").nodes] == [n.name for n in g.nodes]


def test_provenance_is_onnx_node_name():
    model, x = build("resnet")
    g = load_onnx(export(model, x))
    assert any(n.source.startswith("/l1/conv1") for n in g.nodes)


def test_effnet_roundtrip(effnet_path):
    g = load_onnx(effnet_path)
    g.verify()
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 224, 224)).astype(np.float32)
    assert rel_err(run_ort(to_onnx(g), x), run_ort(str(effnet_path), x)) <= 1e-5


def _custom_model():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    n = helper.make_node("Frobnicate", ["x"], ["y"], domain="my.domain", name="frob",
                         alpha=0.5, mode="fast", sizes=[1, 2, 3])
    n.attribute.append(helper.make_attribute("empty_floats", [], attr_type=onnx.AttributeProto.FLOATS))
    g = helper.make_graph([n], "g", [x], [y])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("my.domain", 1)])


def test_unknown_op_passes_through_with_attributes():
    proto = _custom_model()
    out = to_onnx(load_onnx(proto))
    a, b = proto.graph.node[0], out.graph.node[0]
    assert (b.op_type, b.domain, b.name) == ("Frobnicate", "my.domain", "frob")
    assert {x.name: (x.type, helper.get_attribute_value(x)) for x in a.attribute} == \
           {x.name: (x.type, helper.get_attribute_value(x)) for x in b.attribute}


def _if_model():
    cond = helper.make_tensor_value_info("cond", TensorProto.BOOL, [])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])
    dbl = helper.make_node("Add", ["xr", "xr"], ["t"])  # captures the outer value 'xr'
    neg = helper.make_node("Neg", ["xr"], ["e"])
    then_g = helper.make_graph([dbl], "then", [], [helper.make_tensor_value_info("t", TensorProto.FLOAT, [3])])
    else_g = helper.make_graph([neg], "else", [], [helper.make_tensor_value_info("e", TensorProto.FLOAT, [3])])
    nodes = [helper.make_node("Relu", ["x"], ["xr"], name="relu"),
             helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then_g, else_branch=else_g)]
    return helper.make_model(helper.make_graph(nodes, "g", [cond, x], [y]), opset_imports=[helper.make_opsetid("", 17)])


def test_control_flow_kept_intact_and_captures_tracked():
    import onnxruntime as ort

    proto = _if_model()
    g = load_onnx(proto)
    node = g.node_by_name("if")
    assert [v.name for v in node.implicit_inputs] == ["xr"]
    relu = g.node_by_name("relu")
    with pytest.raises(Exception, match="still used"):
        g.remove_node(relu)  # the subgraph uses it
    out = to_onnx(g)
    onnx.checker.check_model(out, full_check=True)
    assert out.graph.node[1].attribute[0] == proto.graph.node[1].attribute[0]
    sess = ort.InferenceSession(out.SerializeToString())
    xv = np.array([-1, 2, 3], np.float32)
    np.testing.assert_array_equal(sess.run(None, {"cond": np.array(True), "x": xv})[0], [0, 4, 6])


def test_external_data_is_memory_mapped_and_roundtrips(tmp_path):
    model, x = build("mlp")
    g = load_onnx(export(model, x))
    save_onnx(g, tmp_path / "ext.onnx", external_data=True, external_threshold=16)
    assert (tmp_path / "ext.onnx.data").is_file()
    assert (tmp_path / "ext.onnx").stat().st_size < 4096  # weights are not inline
    g2 = load_onnx(tmp_path / "ext.onnx")
    big = [v for v in g2.constants.values() if v.const.nbytes >= 16]
    assert big and all(isinstance(v.const.base, np.memmap) or isinstance(v.const, np.memmap) for v in big)
    assert rel_err(run_ort(to_onnx(g2), x), model(__import__("torch").from_numpy(x)).detach().numpy()) <= 1e-5


def test_external_data_path_escaping_model_folder_is_refused(tmp_path):
    w = helper.make_tensor("w", TensorProto.FLOAT, [2], [1.0, 2.0])
    proto = helper.make_model(helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])], [w]), opset_imports=[helper.make_opsetid("", 17)])
    t = proto.graph.initializer[0]
    t.ClearField("float_data")
    t.data_location = TensorProto.EXTERNAL
    t.external_data.append(onnx.StringStringEntryProto(key="location", value="../secret.bin"))
    (tmp_path / "sub").mkdir()
    (tmp_path / "secret.bin").write_bytes(np.zeros(2, np.float32).tobytes())
    path = tmp_path / "sub" / "m.onnx"
    path.write_bytes(proto.SerializeToString())
    with pytest.raises(FrontendError, match="escapes the model folder"):
        load_onnx(path)


def test_old_opset_refused_with_hint():
    model, x = build("mlp")
    proto = export(model, x, opset=11)
    with pytest.raises(FrontendError, match="opset 11 .*version_converter"):
        load_onnx(proto)


@pytest.mark.parametrize("opset", [13, 21])
def test_opset_range(opset):
    model, x = build("concat")
    proto = export(model, x, opset=min(opset, 20))
    proto.opset_import[0].version = opset
    g = load_onnx(proto)
    assert g.opset_imports[""] == opset
    assert rel_err(run_ort(to_onnx(g), x), run_ort(proto, x)) <= 1e-5


def test_corrupt_and_missing_files(tmp_path):
    with pytest.raises(FrontendError, match="no such file"):
        load_onnx(tmp_path / "none.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(os.urandom(512))
    with pytest.raises(FrontendError, match="not a valid ONNX"):
        load_onnx(bad)


def test_save_is_atomic_on_failure(tmp_path, monkeypatch):
    model, x = build("mlp")
    g = load_onnx(export(model, x))
    target = tmp_path / "out.onnx"
    target.write_bytes(b"old")
    import graphopt.serialize as be

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(be, "to_onnx", boom)
    with pytest.raises(RuntimeError):
        save_onnx(g, target)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in Path(tmp_path).iterdir()) == ["out.onnx"]
