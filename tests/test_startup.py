"""The CLI answers cheap commands and input errors without importing onnx or torch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PROBE = r"""
import json, sys
from graphopt.cli import main
try:
    rc = main(sys.argv[1:])
except SystemExit as e:
    rc = e.code
print(json.dumps({"rc": rc, "heavy": sorted(m for m in ("torch", "onnx", "onnxruntime", "numpy") if m in sys.modules)}))
"""


def _probe(*argv):
    r = subprocess.run([sys.executable, "-c", PROBE, *map(str, argv)], capture_output=True, text=True, timeout=120)
    return json.loads(r.stdout.strip().splitlines()[-1]), r.stderr


@pytest.mark.parametrize("argv, rc", [(["--help"], 0), (["--version"], 0), (["convert", "--help"], 0), ([], 2)])
def test_help_and_version_import_nothing_heavy(argv, rc):
    out, _ = _probe(*argv)
    assert out == {"rc": rc, "heavy": []}


def test_input_errors_are_answered_before_onnx_or_torch(tmp_path):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"this is not a model\n")
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    cases = {("convert", tmp_path / "missing.onnx", "-o", tmp_path / "o.onnx"): "no such file",
             ("convert", garbage, "-o", tmp_path / "o.onnx"): "cannot start an ONNX ModelProto",
             ("convert", empty, "-o", tmp_path / "o.onnx"): "it is empty",
             ("inspect", tmp_path): "is a folder",
             ("compress", tmp_path / "model.txt", "-o", tmp_path / "o.gdc"): "no such file"}
    for argv, words in cases.items():
        out, err = _probe(*argv)
        assert out == {"rc": 1, "heavy": []}, (argv, out, err)
        assert words in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert not (tmp_path / "o.onnx").exists()


def test_a_real_onnx_file_passes_the_precheck(tmp_path):
    # the sniff must not refuse what onnx writes (the first field is ir_version), nor any field order
    import onnx
    from onnx import helper

    from graphopt.frontends.sniff import precheck

    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    m = helper.make_model(g)
    p = tmp_path / "m.onnx"
    onnx.save(m, p)
    precheck(p)
    m2 = onnx.ModelProto()
    m2.graph.CopyFrom(g)  # no ir_version: the file starts with the graph field
    p.write_bytes(m2.SerializeToString())
    precheck(p)


def test_passes_catalogue_is_cached_by_the_installed_sources(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))

    def run():
        r = subprocess.run([sys.executable, "-c", PROBE, "passes"], capture_output=True, text=True, timeout=300)
        lines = r.stdout.strip().splitlines()
        return json.loads(lines[-1]), "\n".join(lines[:-1])

    first, text = run()
    assert first["rc"] == 0 and "torch" in first["heavy"]  # built: the pass library imports torch
    assert "quantize" in text and "presets:" in text
    cached = list((tmp_path / "graphopt").glob("passes-*.txt"))
    assert len(cached) == 1
    second, text2 = run()
    assert second == {"rc": 0, "heavy": []} and text2 == text  # read back: nothing heavy, the same text
    import os

    import graphopt.cli as cli
    from graphopt.cli import _catalogue_key

    key = _catalogue_key()
    assert cached[0].name == f"passes-{key}.txt"
    src = cli.__file__  # a changed source changes the key, so a stale catalogue is never read
    st = os.stat(src)
    try:
        os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
        assert _catalogue_key() != key
    finally:
        os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
