import numpy as np
import pytest
import torch
from nets import build

from graphopt import GraphOptError, from_torch
from graphopt.training.calibration import CalibrationData, Collect, MinMax, Moments, collect, observe


@pytest.fixture(scope="module")
def resnet():
    model, x = build("resnet")
    g = from_torch(model, torch.from_numpy(x))
    names = [n.outputs[0].name for n in g.find_nodes("Conv")][:2]
    data = np.random.default_rng(3).standard_normal((37, 3, 16, 16)).astype(np.float32)
    full = collect(g, data, names, batch_size=37)  # one batch: the reference
    return g, names, data, full


def test_streaming_stats_equal_full_pass(resnet):
    g, names, data, full = resnet
    r = observe(g, data, {names[0]: [MinMax(axis=1), MinMax(), Moments(axis=1)], names[1]: Moments(axis=None)},
                batch_size=5)
    a = full[names[0]]
    per_c = a.transpose(1, 0, 2, 3).reshape(a.shape[1], -1)
    np.testing.assert_array_equal(r[names[0]][0]["min"], per_c.min(1))
    np.testing.assert_array_equal(r[names[0]][0]["max"], per_c.max(1))
    np.testing.assert_array_equal(r[names[0]][1]["max"], [a.max()])
    np.testing.assert_allclose(r[names[0]][2]["mean"], per_c.mean(1, dtype=np.float64), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(r[names[0]][2]["var"], per_c.var(1, dtype=np.float64), rtol=1e-5, atol=1e-7)
    b = full[names[1]]
    assert r[names[1]]["count"] == b.size
    np.testing.assert_allclose(r[names[1]]["mean"], [b.mean(dtype=np.float64)], rtol=1e-6, atol=1e-7)


def test_sources_npy_iterable_and_images(resnet, tmp_path):
    from PIL import Image

    g, names, data, full = resnet
    np.save(tmp_path / "c.npy", data)
    a = collect(g, tmp_path / "c.npy", names[:1], batch_size=8)[names[0]]
    np.testing.assert_allclose(a, full[names[0]], rtol=1e-5, atol=1e-5)
    it = [data[i:i + 10] for i in range(0, 37, 10)]
    b = collect(g, it, names[:1])[names[0]]
    np.testing.assert_allclose(b, full[names[0]], rtol=1e-5, atol=1e-5)
    # an image folder: resize short side to 20, center crop 16, normalize
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (24 + i, 30, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    data_img = CalibrationData(folder, batch_size=2, resize=20, crop=16, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert len(data_img) == 3 and data_img.sample_shape == (3, 16, 16)
    batches = list(data_img)
    assert [b.shape for b in batches] == [(2, 3, 16, 16), (1, 3, 16, 16)]
    assert batches[0].min() >= -1 and batches[0].max() <= 1
    out = collect(g, data_img, names[:1])[names[0]]
    assert out.shape == (3, 8, 16, 16)


def test_collect_limit(resnet):
    g, names, data, full = resnet
    r = observe(g, data, {names[0]: Collect(max_items=7)}, batch_size=5)
    assert r[names[0]].shape[0] == 7


def test_bad_calibration_inputs(resnet, tmp_path):
    g, names, data, full = resnet
    with pytest.raises(GraphOptError, match=r"samples have shape \[3, 8, 8\]"):
        observe(g, np.zeros((4, 3, 8, 8), np.float32), {names[0]: MinMax()})
    with pytest.raises(GraphOptError, match="not found"):
        CalibrationData(tmp_path / "missing.npy")
    with pytest.raises(GraphOptError, match="no images"):
        (tmp_path / "empty").mkdir()
        CalibrationData(tmp_path / "empty")


def _two_input_model():
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Cast", ["mask"], ["mf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["x", "mf"], ["xm"]), helper.make_node("MatMul", ["xm", "w"], ["y"], name="mm")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
                                       helper.make_tensor_value_info("mask", TensorProto.INT64, ["N", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], [w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_several_inputs_calibrate_from_a_dict_or_npz(tmp_path):
    """One array per input name, each in its own dtype (int64 masks stay int64)."""
    import graphopt
    from graphopt.passmanager import Context, PassManager
    from graphopt.training.calibration import CalibrationData, collect

    rng = np.random.default_rng(1)
    data = {"x": rng.standard_normal((10, 4)).astype(np.float32), "mask": rng.integers(0, 2, (10, 4))}
    g = graphopt.load_onnx(_two_input_model())
    got = collect(g, data, ["y"])["y"]
    w = np.asarray(g.const_value(g.values["w"]))
    np.testing.assert_allclose(got, (data["x"] * data["mask"]) @ w, rtol=1e-5)
    np.savez(tmp_path / "c.npz", **data)
    q = PassManager("quantize").run(g.copy(), Context(calib=str(tmp_path / "c.npz"))).graph
    assert any(n.op_type == "FakeQuant" and n.attr("kind") == "weight" for n in q.nodes)
    with pytest.raises(GraphOptError, match=r"do not match the model inputs.*missing \['mask'\]"):
        CalibrationData({"x": data["x"]}).check_against(g)
    with pytest.raises(GraphOptError, match="different sample counts"):
        CalibrationData({"x": data["x"], "mask": data["mask"][:3]})
    with pytest.raises(GraphOptError, match="give a .npz"):
        CalibrationData(data["x"]).check_against(g)
