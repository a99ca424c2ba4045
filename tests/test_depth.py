"""prune-blocks: residual-block detection and removal (depth pruning)."""

import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from graphopt.passes.depth import remove_block, residual_blocks
from nets import build, export, randomize_bn, rel_err, run_ort
from torch import nn

from graphopt import PassError, from_torch, load_onnx, to_onnx
from graphopt.analysis import total_macs
from graphopt.passmanager import Context, PassManager


class Block(nn.Module):
    """conv-BN-ReLU-conv-BN plus a shortcut: identity, option A (subsample and zero-pad the
    channels, as CIFAR ResNets do) or a strided 1x1 conv."""

    def __init__(self, cin: int, cout: int, stride: int = 1, shortcut: str = "identity"):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.kind, self.pad = shortcut, cout - cin
        self.down = nn.Conv2d(cin, cout, 1, stride, bias=False) if shortcut == "conv" else None
        self.removed = False

    def shortcut(self, x):
        if self.kind == "optionA":
            return nn.functional.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return self.down(x) if self.kind == "conv" else x

    def forward(self, x):
        if self.removed:  # what prune-blocks leaves: the shortcut alone
            return torch.relu(self.shortcut(x))
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + self.shortcut(x))


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8)
        self.blocks = nn.Sequential(Block(8, 8), Block(8, 8), Block(8, 16, 2, "optionA"), Block(16, 16),
                                    Block(16, 32, 2, "conv"))
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc(self.blocks(torch.relu(self.bn(self.stem(x)))).mean((2, 3)))


def tiny(seed: int = 0):
    torch.manual_seed(seed)
    model = randomize_bn(TinyResNet()).eval()
    x = np.random.default_rng(seed).standard_normal((4, 3, 16, 16)).astype(np.float32)
    g = PassManager("canonicalize").run(from_torch(model, torch.from_numpy(x))).graph
    return model, x, g


def torch_out(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def without_blocks(model, removed: list[str]):
    """The TinyResNet with the blocks prune-blocks names (their Add nodes: add, add_1, ...) removed."""
    for name in removed:
        i = 0 if name == "add" else int(name.removeprefix("add_"))
        model.blocks[i].removed = True
    return model


def test_finds_every_residual_block_with_its_branch_and_shortcut():
    _, _, g = tiny()
    blocks = residual_blocks(g)
    assert len(blocks) == 5
    for b in blocks:
        assert [n.op_type for n in b.branch if n.op_type == "Conv"] == ["Conv", "Conv"]  # the 3x3 path, not the 1x1
    assert [b.shortcut.producer.op_type for b in blocks[:2]] == ["Relu", "Relu"]  # identity: the block input
    assert blocks[2].shortcut.producer.op_type == "Pad" and blocks[4].shortcut.producer.op_type == "Conv"


@pytest.mark.parametrize("i", range(5))
def test_removing_a_block_equals_the_network_without_its_branch(i):
    model, x, g = tiny()
    relus = len(g.find_nodes("Relu"))
    assert remove_block(g, residual_blocks(g)[i])
    g.verify()
    model.blocks[i].removed = True
    assert rel_err(run_ort(to_onnx(g), x), torch_out(model, x)) < 1e-5
    assert len(residual_blocks(g)) == 4
    # an identity block's outer ReLU applies to a ReLU output and goes with the branch's ReLU
    assert relus - len(g.find_nodes("Relu")) == (2 if i in (0, 1, 3) else 1)


def test_inverted_residual_without_activation_after_the_add():
    model, x = build("mobilenetv2")
    g = PassManager("canonicalize").run(from_torch(model, torch.from_numpy(x))).graph
    blocks = residual_blocks(g)
    assert len(blocks) == 2 and all(sum(n.op_type == "Conv" for n in b.branch) == 3 for b in blocks)
    assert remove_block(g, blocks[1])
    model.b2.forward = lambda t: t  # the skip alone
    assert rel_err(run_ort(to_onnx(g), x), torch_out(model, x)) < 1e-5


def test_sensitivity_removes_the_block_that_matters_least():
    model, x, g = tiny()
    with torch.no_grad():  # block 3's branch barely contributes
        model.blocks[3].bn2.weight.mul_(1e-3)
        model.blocks[3].bn2.bias.mul_(1e-3)
    g = PassManager("canonicalize").run(from_torch(model, torch.from_numpy(x))).graph
    calib = np.random.default_rng(1).standard_normal((32, 3, 16, 16)).astype(np.float32)
    r = PassManager("prune-blocks{count=1}", verify_each=True).run(g, Context(calib=calib))
    assert r.modified and r.stats["prune-blocks"][0]["removed"] == 1
    model.blocks[3].removed = True
    assert rel_err(run_ort(to_onnx(r.graph), x), torch_out(model, x)) < 1e-5
    assert r.stats["prune-blocks"][0]["output_error"] < 1e-2
    # the same options again: counted from the unpruned model, so nothing more goes
    again = PassManager("prune-blocks{count=1}").run(r.graph, Context(calib=calib))
    assert not again.modified and len(residual_blocks(again.graph)) == 4


def test_target_macs_stops_at_the_first_block_below_the_target():
    model, x, g = tiny()
    m0 = total_macs(g)
    calib = np.random.default_rng(1).standard_normal((16, 3, 16, 16)).astype(np.float32)
    r = PassManager("prune-blocks{target_macs=0.6}", verify_each=True).run(g.copy(), Context(calib=calib))
    got = total_macs(r.graph)
    biggest = max(b.macs for b in residual_blocks(g))
    assert got <= 0.6 * m0 and got > 0.6 * m0 - biggest  # at most one block past the target
    assert r.stats["prune-blocks"][0]["removed"] == 5 - len(residual_blocks(r.graph)) >= 2
    model = without_blocks(model, r.stats["prune-blocks"][0]["blocks"])
    assert rel_err(run_ort(to_onnx(r.graph), x), torch_out(model, x)) < 1e-5
    assert not PassManager("prune-blocks{target_macs=0.6}").run(r.graph, Context(calib=calib)).modified


def test_random_needs_no_data_and_follows_its_seed():
    _, _, g = tiny()
    a = PassManager("prune-blocks{count=2,criterion=random,seed=3}").run(g.copy()).stats["prune-blocks"][0]
    b = PassManager("prune-blocks{count=2,criterion=random,seed=3}").run(g.copy()).stats["prune-blocks"][0]
    assert a["blocks"] == b["blocks"] and len(a["blocks"]) == 2


def test_skip_keeps_matching_blocks():
    _, _, g = tiny()
    names = [b.name for b in residual_blocks(g)]
    r = PassManager(f"prune-blocks{{count=4,criterion=random,skip=[{names[2]}]}}").run(g)
    assert [b.name for b in residual_blocks(r.graph)] == [names[2]]


class NotBlocks(nn.Module):
    """Adds that are not residual blocks: a broadcast [N,1,H,W] operand, two paths from two
    different inputs, and a branch whose inner value is read elsewhere too."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 3, padding=1)
        self.one = nn.Conv2d(4, 1, 1)

    def forward(self, x, y):
        u = torch.relu(self.a(x))
        v = u + self.one(u)  # broadcast
        w = self.b(y) + v  # paths from two inputs
        t = torch.relu(self.c(w))
        return w + self.c(t), t  # t is also an output


def test_adds_that_are_not_blocks_are_left_alone():
    model = NotBlocks().eval()
    x = torch.randn(2, 3, 8, 8)
    g = PassManager("canonicalize").run(from_torch(model, (x, x.clone()))).graph
    assert len(g.find_nodes("Add")) >= 3 and residual_blocks(g) == []
    with pytest.raises(PassError, match="only 0 removable residual blocks"):
        PassManager("prune-blocks{count=1,criterion=random}").run(g)
    res = PassManager("prune-blocks{target_macs=0.5,criterion=random}").run(g)
    assert not res.modified and res.stats["prune-blocks"][0]["reason"] == "no residual block found"


@pytest.mark.parametrize("opts, msg", [
    ("", "exactly one of count=N or target_macs=F"),
    ("{count=1,target_macs=0.5}", "exactly one of count=N or target_macs=F"),
    ("{count=6,criterion=random}", "has only 5 removable residual blocks"),
    ("{count=1}", "needs calibration data"),
])
def test_errors(opts, msg):
    _, _, g = tiny()
    with pytest.raises(PassError, match=msg):
        PassManager(f"prune-blocks{opts}").run(g)


def test_cli_prune_blocks_then_fold_bn(tmp_path):
    model, x, g = tiny()
    p, out = tmp_path / "m.onnx", tmp_path / "small.onnx"
    p.write_bytes(to_onnx(g).SerializeToString())
    np.save(tmp_path / "c.npy", np.random.default_rng(0).standard_normal((16, 3, 16, 16)).astype(np.float32))
    cli = [sys.executable, "-m", "graphopt.cli", "convert", str(p), "-o", str(out), "--pipeline"]
    r = subprocess.run(cli + ["prune-blocks{count=2},fold-bn", "--calib", str(tmp_path / "c.npy")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    small = load_onnx(out)
    onnx.checker.check_model(to_onnx(small), full_check=True)
    assert len(residual_blocks(small)) == 3 and not small.find_nodes("BatchNormalization")
    # the same blocks as the API removes on the same data, and the network without them
    api = PassManager("prune-blocks{count=2}").run(g.copy(), Context(calib=np.load(tmp_path / "c.npy")))
    model = without_blocks(model, api.stats["prune-blocks"][0]["blocks"])
    assert rel_err(run_ort(to_onnx(small), x), torch_out(model, x)) < 1e-5
    out.unlink()
    r = subprocess.run(cli + ["prune-blocks{count=2},fold-bn"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "needs calibration data" in r.stderr and not out.exists()
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_block_sensitivity_and_cli_analyze_blocks(tmp_path):
    from graphopt.passes.depth import block_sensitivity

    model, x, _ = tiny()
    with torch.no_grad():
        model.blocks[1].bn2.weight.mul_(1e-3)
        model.blocks[1].bn2.bias.mul_(1e-3)
    g = PassManager("canonicalize").run(from_torch(model, torch.from_numpy(x))).graph
    calib = np.random.default_rng(1).standard_normal((16, 3, 16, 16)).astype(np.float32)
    labels = torch_out(model, calib).argmax(1)
    rows = block_sensitivity(g, calib, labels)
    assert len(rows) == 5 and int(np.argmin([r["rel_error"] for r in rows])) == 1
    assert rows[1]["top1"] == 100.0 and min(r["top1"] for r in rows) < 100.0
    assert all(0 < r["macs_saved"] < 0.5 for r in rows)
    p = tmp_path / "m.onnx"
    p.write_bytes(to_onnx(g).SerializeToString())
    np.save(tmp_path / "c.npy", calib)
    np.save(tmp_path / "y.npy", labels)
    r = subprocess.run([sys.executable, "-m", "graphopt.cli", "analyze", "blocks", str(p), "--calib",
                        str(tmp_path / "c.npy"), "--eval", str(tmp_path / "y.npy")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0] == "intact model: top-1 100.00 %"
    assert len(lines) == 7 and "top-1" in lines[1] and rows[1]["block"] in lines[3] and "100" in lines[3]
    flat = tmp_path / "flat.onnx"
    flat.write_bytes(export(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval(), calib[:2]).SerializeToString())
    r = subprocess.run([sys.executable, "-m", "graphopt.cli", "analyze", "blocks", str(flat), "--calib",
                        str(tmp_path / "c.npy")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "no removable residual block" in r.stderr


class WholeModelBlock(nn.Module):
    """One block from the graph input to the graph output: removing it would make the output
    the input itself, which ONNX names cannot express, so it stays."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return x + self.b(torch.relu(self.a(x)))


def test_a_block_the_graph_names_pin_is_kept(caplog):
    g = PassManager("canonicalize").run(from_torch(WholeModelBlock().eval(), torch.randn(2, 4, 8, 8))).graph
    assert len(residual_blocks(g)) == 1
    n = len(g.nodes)
    with caplog.at_level("WARNING"):
        r = PassManager("prune-blocks{count=1,criterion=random}").run(g)
    assert not r.modified and len(r.graph.nodes) == n and "no removable block left" in caplog.text
    r = PassManager("prune-blocks{count=1}").run(g, Context(calib=np.zeros((2, 4, 8, 8), np.float32)))
    assert not r.modified and len(r.graph.nodes) == n
