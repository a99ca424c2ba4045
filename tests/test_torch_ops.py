"""The ops of modern vision and attention blocks through the torch front end: each test module
goes through the CLI or the API, and onnxruntime and the torch back end both give torch's output."""

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphopt
from graphopt import UnsupportedOpError


def _run_ort(graph, feeds):
    s = ort.InferenceSession(graphopt.to_onnx(graph).SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, feeds)


def _match(m, inputs, atol=1e-5, batch_too=None):
    """``m`` through from_torch: onnxruntime and to_torch equal torch within ``atol``, on the
    example inputs and (``batch_too``) on inputs of another batch size."""
    m = m.eval()
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    g = graphopt.from_torch(m, inputs)
    back = graphopt.to_torch(g)
    for xs in [inputs] + ([batch_too if isinstance(batch_too, tuple) else (batch_too,)] if batch_too is not None else []):
        with torch.no_grad():
            ref = m(*xs)
            ours = back(*xs)
        refs = [r.numpy() for r in (ref if isinstance(ref, tuple) else (ref,))]
        feeds = {v.name: x.numpy() for v, x in zip(g.inputs, xs)}
        for got, want in zip(_run_ort(g, feeds), refs):
            np.testing.assert_allclose(got, want, atol=atol, rtol=1e-5)
        for got, want in zip(ours if isinstance(ours, (tuple, list)) else (ours,), refs):
            np.testing.assert_allclose(got.numpy(), want, atol=atol, rtol=1e-5)
    return g


class SDPA(nn.Module):
    def __init__(self, causal=False, masked=None):
        super().__init__()
        self.causal, self.masked = causal, masked
        self.qkv = nn.Linear(16, 48)

    def forward(self, x, mask=None):
        n, t, _ = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, 2, 8).permute(2, 0, 3, 1, 4).unbind(0) if False else \
            self.qkv(x).reshape(n, t, 3, 2, 8).permute(2, 0, 3, 1, 4).chunk(3, 0)
        q, k, v = q[0], k[0], v[0]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal)
        return y.transpose(1, 2).reshape(n, t, 16)


@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_with_and_without_causal_mask(causal):
    torch.manual_seed(0)
    _match(SDPA(causal=causal), torch.randn(2, 5, 16), batch_too=torch.randn(3, 5, 16))


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_sdpa_with_a_mask_input(kind):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    mask = torch.rand(2, 1, 5, 5) > 0.3 if kind == "bool" else torch.randn(2, 1, 5, 5)
    if kind == "bool":
        mask[..., 0] = True  # no fully masked row
    g = _match(SDPA(), (x, mask))
    assert [v.name for v in g.inputs] == ["x", "mask"]


class MHA(nn.Module):
    def __init__(self, batch_first=True, kdim=None, need_weights=True):
        super().__init__()
        self.att = nn.MultiheadAttention(16, 4, batch_first=batch_first, kdim=kdim, vdim=kdim)
        self.need_weights = need_weights

    def forward(self, q, kv, pad=None, attn=None):
        out, w = self.att(q, kv, kv, key_padding_mask=pad, attn_mask=attn, need_weights=self.need_weights)
        return (out, w) if self.need_weights else out


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_with_weights(batch_first):
    torch.manual_seed(0)
    shape_q, shape_kv = ((2, 5, 16), (2, 7, 16)) if batch_first else ((5, 2, 16), (7, 2, 16))
    _match(MHA(batch_first), (torch.randn(*shape_q), torch.randn(*shape_kv)), atol=1e-5)


def test_multihead_attention_masks_and_kdim():
    torch.manual_seed(0)
    q, kv = torch.randn(2, 5, 16), torch.randn(2, 7, 12)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 5:] = True
    attn = torch.triu(torch.ones(5, 7, dtype=torch.bool), 3)  # True = masked out (MHA's convention)
    _match(MHA(kdim=12, need_weights=False), (q, kv, pad, attn), atol=1e-5)


class DropPath(nn.Module):
    """Stochastic depth as vision libraries write it: random in training, the identity in eval."""

    def __init__(self, p=0.1):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        keep = torch.rand(x.shape[0], 1, 1, 1) >= self.p
        return x * keep / (1 - self.p)


class ModernBlock(nn.Module):
    """A ConvNeXt/Swin-style block: channels-last LayerNorm, layer scale, drop-path in eval,
    Identity, interpolate, gather, topk, circular padding, adaptive pooling to 3x3."""

    def __init__(self):
        super().__init__()
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, padding_mode="circular")
        self.norm = nn.LayerNorm(8)
        self.gamma = nn.Parameter(torch.rand(8))
        self.drop_path = DropPath(0.2)
        self.skip = nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d((3, 3))
        self.up = nn.Upsample(scale_factor=2, mode="nearest")

    def forward(self, x):  # [N, 8, 7, 7]
        if torch.jit.is_scripting() or torch.jit.is_tracing():
            x = x * 0
        y = self.dw(x).permute(0, 2, 3, 1)
        y = (self.gamma * self.norm(y)).permute(0, 3, 1, 2)
        y = self.skip(x) + self.drop_path(y)
        y = F.pad(y, (1, 2, 2, 1), mode="circular")  # [N, 8, 10, 10]
        a = F.interpolate(y, size=(13, 11), mode="bilinear", align_corners=False)
        b = F.interpolate(y, scale_factor=0.5, mode="bilinear", align_corners=True)
        p = self.pool(y)  # 10 -> 3: overlapping bins
        u = self.up(p)  # [N, 8, 6, 6]
        flat = a.flatten(2)  # [N, 8, 143]
        vals, idx = flat.topk(4, dim=-1)
        g = torch.gather(flat, 2, idx)
        s = torch.index_select(b, 1, torch.tensor([0, 3, 5]))
        return vals + g, u, s, flat.max(-1).values.unsqueeze(-1) - flat.topk(1, -1).values


def test_modern_vision_ops_match_torch():
    torch.manual_seed(0)
    g = _match(ModernBlock(), torch.randn(2, 8, 7, 7), batch_too=torch.randn(3, 8, 7, 7))
    ops = {n.op_type for n in g.nodes}
    assert {"Resize", "TopK", "GatherElements", "Gather", "LayerNormalization"} <= ops


def test_modern_block_through_the_cli(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "blk.py").write_text(f"import sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
                                     "import torch\nfrom test_torch_ops import ModernBlock\n"
                                     "def build():\n    torch.manual_seed(0)\n    return ModernBlock()\n")
    out = tmp_path / "blk.onnx"
    r = subprocess.run([sys.executable, "-m", "graphopt.cli", "convert", f"{tmp_path / 'blk.py'}:build",
                        "--input-shape", "2,8,7,7", "-o", str(out), "--no-report"], capture_output=True, text=True,
                       cwd="/", timeout=300)
    assert r.returncode == 0, r.stderr
    assert "cannot trace" not in r.stderr  # fx traced it: no fallback
    torch.manual_seed(0)
    m = ModernBlock().eval()
    x = torch.randn(4, 8, 7, 7)
    with torch.no_grad():
        refs = [t.numpy() for t in m(x)]
    s = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for got, want in zip(s.run(None, {s.get_inputs()[0].name: x.numpy()}), refs):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_unsupported_variants_name_the_op():
    """exporter=fx: the fx path names what it cannot map (auto would fall back to the exporter)."""
    class Drop(nn.Module):
        def forward(self, q):
            return F.scaled_dot_product_attention(q, q, q, dropout_p=0.1)

    with pytest.raises(UnsupportedOpError, match="dropout_p > 0"):
        graphopt.from_torch(Drop(), torch.randn(1, 2, 4, 8), exporter="fx")

    class Bicubic(nn.Module):
        def forward(self, x):
            return F.interpolate(x, scale_factor=2, mode="bicubic")

    with pytest.raises(UnsupportedOpError, match="interpolate mode 'bicubic'"):
        graphopt.from_torch(Bicubic(), torch.randn(1, 2, 4, 4), exporter="fx")

    class BatchRange(nn.Module):
        def forward(self, x):
            return x + torch.arange(x.shape[0]).float()[:, None]

    with pytest.raises(UnsupportedOpError, match="arange of a size read from the batch dimension"):
        graphopt.from_torch(BatchRange(), torch.randn(2, 4), exporter="fx")

    class MaxBins(nn.Module):
        def forward(self, x):
            return F.adaptive_max_pool2d(x, 3)

    with pytest.raises(UnsupportedOpError):
        graphopt.from_torch(MaxBins(), torch.randn(1, 2, 10, 10), exporter="fx")


class TinyViT(nn.Module):
    """The ViT pattern that failed before: patch embedding, class token, position embeddings,
    pre-norm blocks whose attention takes an optional attn_mask=None, and a head on token 0."""

    class Block(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
            self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
            self.ls = nn.Parameter(torch.full((d,), 0.5))

        def forward(self, x, attn_mask=None):
            h = self.n1(x)
            x = x + self.ls * self.attn(h, h, h, attn_mask=attn_mask, need_weights=False)[0]
            return x + self.mlp(self.n2(x))

    def __init__(self, d=16):
        super().__init__()
        self.patch = nn.Conv2d(3, d, 4, 4)
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, 17, d))
        self.blocks = nn.ModuleList([self.Block(d), self.Block(d)])
        self.head = nn.Linear(d, 10)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)  # [N, 16, d]
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], 1) + self.pos
        for b in self.blocks:
            t = b(t)
        return self.head(t[:, 0])


def test_vit_pattern_converts_and_keeps_the_batch_symbolic():
    torch.manual_seed(0)
    _match(TinyViT(), torch.randn(2, 3, 16, 16), atol=1e-5, batch_too=torch.randn(5, 3, 16, 16))


class Embeds(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(30, 8, padding_idx=0)
        self.pos = nn.Parameter(torch.randn(12, 8))

    def forward(self, ids):
        return self.tok(ids) + F.embedding(torch.arange(ids.shape[1]), self.pos)


def test_embedding_module_and_function():
    torch.manual_seed(0)
    ids = torch.randint(0, 30, (2, 12))
    g = _match(Embeds(), ids, batch_too=torch.randint(0, 30, (5, 12)))
    assert sum(n.op_type == "Gather" for n in g.nodes) >= 2


class _FusedBNAct(nn.BatchNorm2d):
    """A fused BatchNorm + activation module that calls the functional form (as model zoos do)."""

    def forward(self, x):
        return F.relu(F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.1,
                                   self.eps))


class _Patterns(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = _FusedBNAct(6)
        self.bn.running_mean.uniform_(-1, 1)
        self.bn.running_var.uniform_(0.5, 2)
        self.bn.weight.data.uniform_(0.5, 1.5)

    def forward(self, x):
        y = self.bn(self.conv(x))
        q, k, v = y.reshape(y.shape[0], 3, 2, -1).unbind(1)  # attention's q, k, v split
        a = (q * k + v).reshape_as(y[:, :2])
        return a.expand_as(y[:, :2]) + y[:, :2].view_as(a).type_as(a)


def test_functional_batch_norm_unbind_and_as_methods_convert_through_fx(caplog):
    torch.manual_seed(0)
    with caplog.at_level("WARNING"):
        g = _match(_Patterns(), torch.randn(2, 3, 8, 8), batch_too=torch.randn(3, 3, 8, 8))
    assert not caplog.records  # fx converted it: no fallback
    bn = [n for n in g.nodes if n.op_type == "BatchNormalization"]
    assert len(bn) == 1 and bn[0].inputs[3].name == "bn.running_mean"  # the module's own tensors, by name


def test_auto_falls_back_to_the_exporter_when_fx_meets_an_unmapped_op(caplog):
    class Soft(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return torch.tensor_split(self.fc(x), 2, dim=1)[0] * 2

    with pytest.raises(UnsupportedOpError, match="tensor_split at module"):
        graphopt.from_torch(Soft().eval(), torch.randn(2, 4), exporter="fx")
    with caplog.at_level("WARNING"):
        _match(Soft(), torch.randn(2, 4))
    msgs = [r.getMessage() for r in caplog.records if "converted it through" in r.getMessage()]
    assert len(msgs) == 1 and "tensor_split" in msgs[0] and "torch.fx traced Soft" in msgs[0]


class _Norms(nn.Module):
    """Norms as modern blocks write them: ConvNeXt's channels-first LayerNorm (mean, pow,
    rsqrt), variance, L2 normalize, functional group/instance norm, nn.InstanceNorm2d."""

    def __init__(self):
        super().__init__()
        self.w, self.b = nn.Parameter(torch.rand(6) + 0.5), nn.Parameter(torch.randn(6))
        self.inorm = nn.InstanceNorm2d(6, affine=True)

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        ln = (x - u) * torch.rsqrt(s + 1e-6)
        v = x.var(dim=(2, 3), keepdim=True) + torch.var(x, 1, keepdim=True, unbiased=False)
        nz = F.normalize(x, dim=1) + x.norm(dim=1, keepdim=True)
        gn = F.group_norm(x, 2, self.w, self.b, 1e-5) + F.instance_norm(x, weight=self.w, bias=self.b)
        return ln + v + nz + gn + self.inorm(x)


class _Shapes(nn.Module):
    """unflatten (method, torch, nn), t, flip, narrow, pixel_shuffle, ZeroPad2d, floordiv of a
    tensor, amax/amin, zeros_like/ones_like/new_zeros, to(dtype)/to(device), a table indexed by
    a buffer (Swin's relative position bias)."""

    def __init__(self):
        super().__init__()
        self.unf = nn.Unflatten(1, (2, 3))
        self.pad = nn.ZeroPad2d((1, 0, 0, 1))
        self.shuffle = nn.PixelShuffle(2)
        self.table = nn.Parameter(torch.randn(10, 4))
        self.register_buffer("index", torch.tensor([[3, 1], [0, 9]]))

    def forward(self, x):  # x: [B, 12, 4, 4]
        a = x.flatten(2).unflatten(2, (4, 4)) + torch.unflatten(x, 1, (3, -1)).flatten(1, 2)
        b = self.unf(x[:, :6, 0, 0]).flatten(1).t().t()
        c = torch.flip(x, dims=(2,)) + x.flip(-1) + torch.narrow(x, 2, 1, 2).sum(2, keepdim=True)
        d = (self.shuffle(x).mean((2, 3)) + F.pixel_shuffle(x, 2).amax(dim=(2, 3))).sum(1, keepdim=True) - x.amin((2, 3))
        e = self.pad(x)[:, :, :4, 1:] + torch.zeros_like(x) + torch.ones_like(x) + x.new_zeros((4,))
        f = (x * 3) // 2 + x.to(torch.float32) + x.to("cpu")
        bias = self.table[self.index.view(-1)].view(2, 2, 4).permute(2, 0, 1)  # [4, 2, 2]
        return a + c + e + f + d[:, :, None, None] + b.sum(1)[:, None, None, None] + bias.sum()


class _Acts(nn.Module):
    """mish, elu, softplus (with beta and threshold: torch returns x above it), log_softmax,
    bmm as a method, torch.masked_fill, baddbmm."""

    def __init__(self):
        super().__init__()
        self.mish, self.elu, self.sp = nn.Mish(), nn.ELU(0.5), nn.Softplus(beta=2.0, threshold=3.0)

    def forward(self, x):  # [B, 4, 8]
        a = self.mish(x) + F.mish(x) + self.elu(x) + F.elu(x) + self.sp(x * 4) + F.softplus(x)
        b = F.log_softmax(x, dim=-1) + x.log_softmax(-1)
        m = x.transpose(1, 2).bmm(x)  # [B, 8, 8]
        c = torch.masked_fill(m, m > 1.0, 0.5) + torch.baddbmm(m, x.transpose(1, 2), x, beta=0.5, alpha=2.0)
        return a + b + c.sum(1, keepdim=True)


def test_norms_in_functional_and_written_out_forms_convert_through_fx(caplog):
    torch.manual_seed(0)
    with caplog.at_level("WARNING"):
        _match(_Norms(), torch.randn(2, 6, 5, 5), atol=1e-4, batch_too=torch.randn(3, 6, 5, 5))
    assert not [r for r in caplog.records if "converted it through" in r.getMessage()]


def test_reshapes_flips_shuffles_and_table_lookups_convert_through_fx(caplog):
    torch.manual_seed(0)
    with caplog.at_level("WARNING"):
        _match(_Shapes(), torch.randn(2, 12, 4, 4), batch_too=torch.randn(3, 12, 4, 4))
    assert not [r for r in caplog.records if "converted it through" in r.getMessage()]


def test_more_activations_and_batched_products_convert_through_fx(caplog):
    torch.manual_seed(0)
    with caplog.at_level("WARNING"):
        _match(_Acts(), torch.randn(2, 4, 8), atol=1e-4, batch_too=torch.randn(3, 4, 8))
    assert not [r for r in caplog.records if "converted it through" in r.getMessage()]


def test_boolean_mask_indexing_is_refused_by_fx_with_its_reason():
    class M(nn.Module):
        def forward(self, x):
            return x[x > 0].sum()

    with pytest.raises(UnsupportedOpError, match="boolean mask"):
        graphopt.from_torch(M().eval(), torch.randn(2, 4), exporter="fx")


@pytest.mark.parametrize("data_shape,index_shape,batch_dims", [((4, 5, 3), (2, 6, 2), 0), ((4, 5, 3), (7, 1), 0),
                                                               ((3, 5, 6, 2), (3, 4, 2), 1)])
def test_gather_nd_matches_onnxruntime(data_shape, index_shape, batch_dims):
    """GatherND (the dynamo exporter writes it for HF decoders' causal masks) in the torch back end."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    data = rng.standard_normal(data_shape).astype(np.float32)
    k = index_shape[-1]
    dims = data_shape[batch_dims:batch_dims + k]
    idx = np.stack([rng.integers(-d, d, index_shape[:-1]) for d in dims], -1).astype(np.int64)  # negatives too
    node = helper.make_node("GatherND", ["x", "i"], ["y"], batch_dims=batch_dims)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, data_shape),
                                        helper.make_tensor_value_info("i", TensorProto.INT64, index_shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    ref = ort.InferenceSession(model.SerializeToString()).run(None, {"x": data, "i": idx})[0]
    from graphopt.frontends.onnx_file import from_model_proto

    got = graphopt.to_torch(from_model_proto(model))(torch.from_numpy(data), torch.from_numpy(idx))
    np.testing.assert_array_equal(got.numpy(), ref)
