"""Twelve architecture families in plain torch (random weights, no torchvision or timm), written
the way the popular model zoos write them, for `graphopt convert tools/arch_zoo.py:NAME
--input-shape 1,3,224,224`, the torch front end's audit (tools/audit_torch_ops.py) and the
conversion-time benchmark (tools/bench_convert.py).

The zoo idioms are kept on purpose: BatchNorm + activation as one module calling
``F.batch_norm`` (six of the families), attention splitting q, k, v with ``unbind``,
``F.scaled_dot_product_attention``, channels-last LayerNorm through ``permute``, a
channels-first LayerNorm written with ``mean``/``pow``/``rsqrt``, Swin's window partition and
``torch.roll`` shift with a precomputed mask, MobileViT's unfold into patches by
``reshape``/``transpose``, DenseNet's concatenations, ``flatten``/``unflatten``, ``*_as``.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

NAMES = ("resnet50", "mobilenetv3_large", "efficientnet_b0", "regnety_016", "densenet121", "convnext_tiny",
         "vit_tiny", "deit_tiny_manual", "swin_tiny", "mobilevit_s", "mixer_s16", "poolformer_s12")


# ---------------------------------------------------------------------------- shared blocks
class BatchNormAct2d(nn.BatchNorm2d):
    """BatchNorm + activation in one module, calling the functional form (as timm's does)."""

    def __init__(self, c, act: type[nn.Module] | None = nn.ReLU):
        super().__init__(c)
        self.act = act() if act is not None else nn.Identity()

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return self.act(x)


def conv_bn(cin, cout, k=3, s=1, groups=1, act=nn.ReLU):
    return nn.Sequential(nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False), BatchNormAct2d(cout, act))


class SqueezeExcite(nn.Module):
    def __init__(self, c, rd, gate=nn.Sigmoid, act=nn.ReLU):
        super().__init__()
        self.fc1, self.act, self.fc2, self.gate = nn.Conv2d(c, rd, 1), act(), nn.Conv2d(rd, c, 1), gate()

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)
        return x * self.gate(self.fc2(self.act(self.fc1(s))))


class Mlp(nn.Module):
    def __init__(self, c, hidden, act=nn.GELU):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(c, hidden), act(), nn.Linear(hidden, c)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """ViT attention: one qkv projection, split with ``unbind``; SDPA or the explicit product."""

    def __init__(self, dim, heads, fused=True):
        super().__init__()
        self.heads, self.scale, self.fused = heads, (dim // heads) ** -0.5, fused
        self.qkv, self.proj = nn.Linear(dim, dim * 3), nn.Linear(dim, dim)

    def forward(self, x, bias=None):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        if self.fused and bias is None:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            a = (q * self.scale) @ k.transpose(-2, -1)
            if bias is not None:
                a = a + bias
            x = a.softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    def __init__(self, dim, heads, mlp=4.0, fused=True):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, heads, fused)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), Mlp(dim, int(dim * mlp))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


# ---------------------------------------------------------------------------- CNNs
class Bottleneck(nn.Module):
    def __init__(self, cin, mid, s):
        super().__init__()
        cout = mid * 4
        self.c1, self.c2 = conv_bn(cin, mid, 1), conv_bn(mid, mid, 3, s)
        self.c3 = nn.Sequential(nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.down = None if s == 1 and cin == cout else nn.Sequential(nn.Conv2d(cin, cout, 1, s, bias=False),
                                                                        nn.BatchNorm2d(cout))

    def forward(self, x):
        sc = x if self.down is None else self.down(x)
        return F.relu(self.c3(self.c2(self.c1(x))) + sc)


class ResNet50(nn.Module):
    def __init__(self, classes=1000):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
                                  nn.MaxPool2d(3, 2, 1))
        layers, cin = [], 64
        for mid, n, s in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            for i in range(n):
                layers.append(Bottleneck(cin, mid, s if i == 0 else 1))
                cin = mid * 4
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(2048, classes)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1))


class InvertedResidual(nn.Module):
    def __init__(self, cin, mid, cout, k, s, se, act):
        super().__init__()
        self.expand = conv_bn(cin, mid, 1, act=act) if mid != cin else nn.Identity()
        self.dw = conv_bn(mid, mid, k, s, groups=mid, act=act)
        self.se = se(mid) if se else nn.Identity()
        self.project = conv_bn(mid, cout, 1, act=None)
        self.skip = s == 1 and cin == cout

    def forward(self, x):
        y = self.project(self.se(self.dw(self.expand(x))))
        return x + y if self.skip else y


def _mbv3_se(c):
    return SqueezeExcite(c, max(8, c // 4), gate=nn.Hardsigmoid)


def _effnet_se(c):
    return SqueezeExcite(c, max(1, c // 24), act=nn.SiLU)


class MobileNetV3Large(nn.Module):
    CFG = [(3, 16, 16, 1, False, "RE"), (3, 64, 24, 2, False, "RE"), (3, 72, 24, 1, False, "RE"),
           (5, 72, 40, 2, True, "RE"), (5, 120, 40, 1, True, "RE"), (5, 120, 40, 1, True, "RE"),
           (3, 240, 80, 2, False, "HS"), (3, 200, 80, 1, False, "HS"), (3, 184, 80, 1, False, "HS"),
           (3, 184, 80, 1, False, "HS"), (3, 480, 112, 1, True, "HS"), (3, 672, 112, 1, True, "HS"),
           (5, 672, 160, 2, True, "HS"), (5, 960, 160, 1, True, "HS"), (5, 960, 160, 1, True, "HS")]

    def __init__(self, classes=1000):
        super().__init__()
        self.stem = conv_bn(3, 16, 3, 2, act=nn.Hardswish)
        blocks, cin = [], 16
        for k, mid, cout, s, se, a in self.CFG:
            blocks.append(InvertedResidual(cin, mid, cout, k, s, _mbv3_se if se else None,
                                           nn.ReLU if a == "RE" else nn.Hardswish))
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = conv_bn(160, 960, 1, act=nn.Hardswish)
        self.pre = nn.Sequential(nn.Linear(960, 1280), nn.Hardswish(), nn.Dropout(0.2))
        self.fc = nn.Linear(1280, classes)

    def forward(self, x):
        x = self.head(self.blocks(self.stem(x)))
        return self.fc(self.pre(x.mean((2, 3))))


class EfficientNetB0(nn.Module):
    CFG = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3),
           (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)]

    def __init__(self, classes=1000):
        super().__init__()
        self.stem = conv_bn(3, 32, 3, 2, act=nn.SiLU)
        blocks, cin = [], 32
        for e, k, s, cout, n in self.CFG:
            for i in range(n):
                blocks.append(InvertedResidual(cin, cin * e, cout, k, s if i == 0 else 1, _effnet_se, nn.SiLU))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = conv_bn(320, 1280, 1, act=nn.SiLU)
        self.fc = nn.Linear(1280, classes)

    def forward(self, x):
        return self.fc(self.head(self.blocks(self.stem(x))).flatten(2).mean(-1))


class RegNetBlock(nn.Module):
    def __init__(self, cin, cout, s, group_w):
        super().__init__()
        self.a = conv_bn(cin, cout, 1)
        self.b = conv_bn(cout, cout, 3, s, groups=cout // group_w)
        self.se = SqueezeExcite(cout, max(1, cin // 4))
        self.c = conv_bn(cout, cout, 1, act=None)
        self.down = conv_bn(cin, cout, 1, s, act=None) if s != 1 or cin != cout else nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.c(self.se(self.b(self.a(x)))) + self.down(x))


class RegNetY016(nn.Module):
    def __init__(self, classes=1000):
        super().__init__()
        self.stem = conv_bn(3, 32, 3, 2)
        blocks, cin = [], 32
        for w, d in ((48, 2), (120, 6), (336, 17), (888, 2)):
            for i in range(d):
                blocks.append(RegNetBlock(cin, w, 2 if i == 0 else 1, 24))
                cin = w
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(888, classes)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1).flatten(1))


class DenseLayer(nn.Module):
    def __init__(self, cin, growth):
        super().__init__()
        self.n1, self.c1 = BatchNormAct2d(cin), nn.Conv2d(cin, 4 * growth, 1, bias=False)
        self.n2, self.c2 = BatchNormAct2d(4 * growth), nn.Conv2d(4 * growth, growth, 3, 1, 1, bias=False)

    def forward(self, feats: list[torch.Tensor]):
        return self.c2(self.n2(self.c1(self.n1(torch.cat(feats, 1)))))


class DenseNet121(nn.Module):
    def __init__(self, classes=1000, growth=32):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), BatchNormAct2d(64), nn.MaxPool2d(3, 2, 1))
        self.blocks, self.trans, c = nn.ModuleList(), nn.ModuleList(), 64
        for i, n in enumerate((6, 12, 24, 16)):
            self.blocks.append(nn.ModuleList(DenseLayer(c + j * growth, growth) for j in range(n)))
            c += n * growth
            if i < 3:
                self.trans.append(nn.Sequential(BatchNormAct2d(c), nn.Conv2d(c, c // 2, 1, bias=False),
                                                nn.AvgPool2d(2, 2)))
                c //= 2
        self.norm, self.fc = BatchNormAct2d(c), nn.Linear(c, classes)

    def forward(self, x):
        x = self.stem(x)
        for i, block in enumerate(self.blocks):
            feats = [x]
            for layer in block:
                feats.append(layer(feats))
            x = torch.cat(feats, 1)
            if i < len(self.trans):
                x = self.trans[i](x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.norm(x), (1, 1)), 1))


# ---------------------------------------------------------------------------- ConvNeXt
class LayerNorm2d(nn.Module):
    """Channels-first LayerNorm written out (ConvNeXt's reference code)."""

    def __init__(self, c, eps=1e-6):
        super().__init__()
        self.weight, self.bias, self.eps = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c)), eps

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) * torch.rsqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class ConvNeXtBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c, eps=1e-6)
        self.pw1, self.act, self.pw2 = nn.Linear(c, 4 * c), nn.GELU(), nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(1e-6 * torch.ones(c))

    def forward(self, x):
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.gamma * self.pw2(self.act(self.pw1(self.norm(y))))
        return x + y.permute(0, 3, 1, 2)


class ConvNeXtTiny(nn.Module):
    def __init__(self, classes=1000, dims=(96, 192, 384, 768), depths=(3, 3, 9, 3)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, 4), LayerNorm2d(dims[0]))
        stages = []
        for i, (d, n) in enumerate(zip(dims, depths)):
            down = [] if i == 0 else [LayerNorm2d(dims[i - 1]), nn.Conv2d(dims[i - 1], d, 2, 2)]
            stages.append(nn.Sequential(*down, *[ConvNeXtBlock(d) for _ in range(n)]))
        self.stages = nn.Sequential(*stages)
        self.norm, self.fc = nn.LayerNorm(dims[-1], eps=1e-6), nn.Linear(dims[-1], classes)

    def forward(self, x):
        return self.fc(self.norm(self.stages(self.stem(x)).mean([-2, -1])))


# ---------------------------------------------------------------------------- ViTs
class PatchEmbed(nn.Module):
    def __init__(self, dim, patch=16):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class ViT(nn.Module):
    def __init__(self, classes=1000, dim=192, depth=12, heads=3, fused=True, img=224, patch=16):
        super().__init__()
        self.patch = PatchEmbed(dim, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(0.02 * torch.randn(1, (img // patch) ** 2 + 1, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads, fused=fused) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch(x)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        return self.head(self.norm(self.blocks(x))[:, 0])


def _window_partition(x, w):
    B, H, W, C = x.shape
    x = x.view(B, H // w, w, W // w, w, C)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, w * w, C)


def _window_reverse(windows, w, H, W):
    C = windows.shape[-1]
    x = windows.view(-1, H // w, W // w, w, w, C)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, H, W, C)


class SwinBlock(nn.Module):
    def __init__(self, dim, heads, res, window=7, shift=0):
        super().__init__()
        self.dim, self.heads, self.res, self.window, self.shift = dim, heads, res, window, shift
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads, fused=False)
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim, 4 * dim)
        self.table = nn.Parameter(0.02 * torch.randn((2 * window - 1) ** 2, heads))
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + window - 1
        self.register_buffer("index", rel[..., 0] * (2 * window - 1) + rel[..., 1], persistent=False)
        if shift:
            img = torch.zeros(1, res, res, 1)
            cnt = 0
            for hs in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
                for ws in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
                    img[:, hs, ws, :] = cnt
                    cnt += 1
            mw = _window_partition(img, window).squeeze(-1)
            mask = (mw[:, None, :] - mw[:, :, None]).ne(0).float() * -100.0
        else:
            mask = torch.zeros(1, window * window, window * window)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x):
        B, L, C = x.shape
        H = W = self.res
        y = self.norm1(x).view(B, H, W, C)
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
        win = _window_partition(y, self.window)
        bias = self.table[self.index.view(-1)].view(self.window ** 2, self.window ** 2, -1).permute(2, 0, 1)
        nw = self.mask.shape[0]
        bias = bias.unsqueeze(0) + self.mask.unsqueeze(1)  # [nw, heads, N, N]
        out = self.attn(win, bias.repeat(B, 1, 1, 1) if nw > 1 else bias)
        y = _window_reverse(out, self.window, H, W)
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + y.reshape(B, L, C)
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    def __init__(self, dim, res):
        super().__init__()
        self.res, self.norm, self.red = res, nn.LayerNorm(4 * dim), nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x):
        B, L, C = x.shape
        x = x.view(B, self.res, self.res, C)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.red(self.norm(x.view(B, -1, 4 * C)))


class SwinTiny(nn.Module):
    def __init__(self, classes=1000, dim=96, depths=(2, 2, 6, 2), heads=(3, 6, 12, 24)):
        super().__init__()
        self.patch = nn.Sequential(nn.Conv2d(3, dim, 4, 4))
        self.norm0 = nn.LayerNorm(dim)
        layers, res = [], 56
        for i, (n, h) in enumerate(zip(depths, heads)):
            layers += [SwinBlock(dim, h, res, 7, 0 if j % 2 == 0 or res <= 7 else 3) for j in range(n)]
            if i < 3:
                layers.append(PatchMerging(dim, res))
                dim, res = dim * 2, res // 2
        self.layers = nn.Sequential(*layers)
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, x):
        x = self.norm0(self.patch(x).flatten(2).transpose(1, 2))
        return self.head(self.norm(self.layers(x)).mean(1))


# ---------------------------------------------------------------------------- hybrids and MLPs
class MobileViTBlock(nn.Module):
    def __init__(self, c, dim, depth, patch=2):
        super().__init__()
        self.local = nn.Sequential(conv_bn(c, c, 3, act=nn.SiLU), nn.Conv2d(c, dim, 1, bias=False))
        self.transformer = nn.Sequential(*[Block(dim, 4, mlp=2.0) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.proj, self.fuse, self.p = conv_bn(dim, c, 1, act=nn.SiLU), conv_bn(2 * c, c, 3, act=nn.SiLU), patch

    def forward(self, x):
        B, _, H, W = x.shape
        p = self.p
        y = self.local(x)
        C = y.shape[1]
        # unfold into patches: [B, C, H/p, p, W/p, p] -> [B*p*p, H*W/p^2, C]
        y = y.reshape(B, C, H // p, p, W // p, p).permute(0, 3, 5, 2, 4, 1).reshape(B * p * p, -1, C)
        y = self.norm(self.transformer(y))
        y = y.reshape(B, p, p, H // p, W // p, C).permute(0, 5, 3, 1, 4, 2).reshape(B, C, H, W)
        return self.fuse(torch.cat([x, self.proj(y)], 1))


class MobileViTS(nn.Module):
    def __init__(self, classes=1000):
        super().__init__()
        s = nn.SiLU
        self.net = nn.Sequential(
            conv_bn(3, 16, 3, 2, act=s), InvertedResidual(16, 64, 32, 3, 1, None, s),
            InvertedResidual(32, 128, 64, 3, 2, None, s), InvertedResidual(64, 256, 64, 3, 1, None, s),
            InvertedResidual(64, 256, 96, 3, 2, None, s), MobileViTBlock(96, 144, 2),
            InvertedResidual(96, 384, 128, 3, 2, None, s), MobileViTBlock(128, 192, 4),
            InvertedResidual(128, 512, 160, 3, 1, None, s), MobileViTBlock(160, 240, 3),  # 14x14 at 224
            conv_bn(160, 640, 1, act=s))
        self.fc = nn.Linear(640, classes)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.net(x), 1).flatten(1))


class MixerBlock(nn.Module):
    def __init__(self, tokens, dim):
        super().__init__()
        self.n1, self.tok = nn.LayerNorm(dim, eps=1e-6), Mlp(tokens, 256)
        self.n2, self.ch = nn.LayerNorm(dim, eps=1e-6), Mlp(dim, 4 * dim)

    def forward(self, x):
        x = x + self.tok(self.n1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.ch(self.n2(x))


class MixerS16(nn.Module):
    def __init__(self, classes=1000, dim=512, depth=8):
        super().__init__()
        self.patch = PatchEmbed(dim, 16)
        self.blocks = nn.Sequential(*[MixerBlock(196, dim) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, classes)

    def forward(self, x):
        return self.head(self.norm(self.blocks(self.patch(x))).mean(dim=1))


class PoolFormerBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.n1, self.pool = nn.GroupNorm(1, c), nn.AvgPool2d(3, 1, 1, count_include_pad=False)
        self.n2 = nn.GroupNorm(1, c)
        self.mlp = nn.Sequential(nn.Conv2d(c, 4 * c, 1), nn.GELU(), nn.Conv2d(4 * c, c, 1))
        self.s1, self.s2 = nn.Parameter(1e-5 * torch.ones(c)), nn.Parameter(1e-5 * torch.ones(c))

    def forward(self, x):
        y = self.n1(x)
        x = x + self.s1.unsqueeze(-1).unsqueeze(-1) * (self.pool(y) - y)
        y = F.group_norm(x, 1, self.n2.weight, self.n2.bias, self.n2.eps)  # the functional form, as some zoos write it
        return x + self.s2.unsqueeze(-1).unsqueeze(-1) * self.mlp(y)


class PoolFormerS12(nn.Module):
    def __init__(self, classes=1000, dims=(64, 128, 320, 512), depths=(2, 2, 6, 2)):
        super().__init__()
        self.stem = nn.Conv2d(3, dims[0], 7, 4, 2)
        stages = []
        for i, (d, n) in enumerate(zip(dims, depths)):
            down = [] if i == 0 else [nn.Conv2d(dims[i - 1], d, 3, 2, 1)]
            stages.append(nn.Sequential(*down, *[PoolFormerBlock(d) for _ in range(n)]))
        self.stages = nn.Sequential(*stages)
        self.norm, self.head = nn.GroupNorm(1, dims[-1]), nn.Linear(dims[-1], classes)

    def forward(self, x):
        return self.head(self.norm(self.stages(self.stem(x))).mean([-2, -1]))


# ---------------------------------------------------------------------------- factories
def _init(m: nn.Module) -> nn.Module:
    """Random weights with BatchNorm statistics that keep activations in range (eval mode)."""
    g = torch.Generator().manual_seed(0)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            with torch.no_grad():
                mod.running_mean.normal_(0, 0.1, generator=g)
                mod.running_var.uniform_(0.5, 1.5, generator=g)
                mod.weight.uniform_(0.5, 1.0, generator=g)
    return m.eval()


def resnet50():
    return _init(ResNet50())


def mobilenetv3_large():
    return _init(MobileNetV3Large())


def efficientnet_b0():
    return _init(EfficientNetB0())


def regnety_016():
    return _init(RegNetY016())


def densenet121():
    return _init(DenseNet121())


def convnext_tiny():
    return _init(ConvNeXtTiny())


def vit_tiny():
    return _init(ViT())


def deit_tiny_manual():
    """ViT-Tiny with the attention product written out (q @ k^T, softmax, @ v)."""
    return _init(ViT(fused=False))


def swin_tiny():
    return _init(SwinTiny())


def mobilevit_s():
    return _init(MobileViTS())


def mixer_s16():
    return _init(MixerS16())


def poolformer_s12():
    return _init(PoolFormerS12())


def params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


if __name__ == "__main__":
    x = torch.randn(1, 3, 224, 224)
    for name in NAMES:
        m = globals()[name]()
        with torch.no_grad():
            y = m(x)
        print(f"{name:20s} {params(m) / 1e6:6.2f} M params, output {tuple(y.shape)}, finite {bool(torch.isfinite(y).all())}")
        assert math.isfinite(float(y.abs().max()))
