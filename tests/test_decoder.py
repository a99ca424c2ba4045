"""A decoder-only language model (Llama- and GPT-2-style, from transformers configs, no download)
through both front ends and the 4-bit weight-only path: the converted float model equals torch,
and the MatMulNBits file keeps the logits close and the greedy tokens of a prompt the same.

The models are tiny and trained for a few seconds on a synthetic sequence rule
(x[t+1] = 3 x[t] + 1 mod V), so their next-token choices are confident, as a real checkpoint's
are (a random-weight model's logits are nearly flat, and any rounding flips its argmax)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from nets import rel_err
from torch import nn

import graphopt
from graphopt.backends.lowering import export
from graphopt.passmanager import Context, PassManager

transformers = pytest.importorskip("transformers")
V, T = 64, 16
W4 = "canonicalize,quantize{weights=int4:block32,acts=float,weight_method=gptq}"


class Logits(nn.Module):
    """input_ids -> logits, no KV cache: the form a graph compiler sees."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, input_ids):
        return self.m(input_ids=input_ids, use_cache=False).logits


def _sequences(n, gen):
    x = torch.empty(n, T, dtype=torch.long)
    x[:, 0] = torch.randint(0, V, (n,), generator=gen)
    for t in range(1, T):
        x[:, t] = (3 * x[:, t - 1] + 1) % V
    return x


def _trained(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "llama":
        cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=T,
                                       bos_token_id=0, eos_token_id=1)
        m = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.GPT2Config(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=T,
                                      bos_token_id=0, eos_token_id=1)
        m = transformers.GPT2LMHeadModel(cfg)
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    for _ in range(120):
        x = _sequences(32, gen)
        loss = m(input_ids=x, labels=x, use_cache=False).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return Logits(m).eval()


def _greedy(run, prompt, n=6):
    """Greedy decoding in a fixed window of T tokens: a causal model's logits at t do not see
    the padding after t."""
    buf = np.zeros((1, T), np.int64)
    buf[0, :len(prompt)] = prompt
    for t in range(len(prompt), len(prompt) + n):
        buf[0, t] = int(run(buf)[0, t - 1].argmax())
    return buf[0, len(prompt):len(prompt) + n].tolist()


def _ort(proto):
    s = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return lambda ids: s.run(None, {s.get_inputs()[0].name: ids})[0]


def _check(g: graphopt.Graph, model: nn.Module, n_linear: int):
    gen = torch.Generator().manual_seed(1)
    calib, test = _sequences(32, gen).numpy(), _sequences(8, gen).numpy()
    with torch.no_grad():
        ref = model(torch.from_numpy(test)).numpy()
    torch_run = lambda ids: model(torch.from_numpy(ids)).detach().numpy()  # noqa: E731
    assert rel_err(_ort(graphopt.to_onnx(g))(test), ref) < 1e-5  # the float graph runs at batch 8, equal to torch
    q = PassManager(W4).run(g.copy(), Context(calib=calib)).graph
    proto, rep = export(q, "qoperator")
    assert sum(n.op_type == "MatMulNBits" for n in proto.graph.node) == n_linear == rep.fused
    got = _ort(proto)(test)
    assert rel_err(got, ref) < 0.1
    assert (got.argmax(-1) == ref.argmax(-1)).mean() > 0.95
    prompt = [5, 16, 49]  # the rule's own prefix: 5 -> 16 -> 49 -> ...
    assert _greedy(_ort(proto), prompt) == _greedy(torch_run, prompt)


def test_llama_decoder_from_torch_and_from_its_onnx_export(tmp_path):
    model = _trained("llama")
    ids = torch.zeros(1, T, dtype=torch.long)  # a batch-1 example: the graph must still take any batch
    _check(graphopt.from_torch(model, ids), model, 2 * 7 + 1)  # q, k, v, o, gate, up, down per layer, lm_head
    path = tmp_path / "llama.onnx"
    torch.onnx.export(model, (torch.zeros(2, T, dtype=torch.long),), str(path), dynamo=True,
                      input_names=["input_ids"], dynamic_shapes=({0: torch.export.Dim("batch")},))
    _check(graphopt.load_onnx(str(path)), model, 2 * 7 + 1)


def test_gpt2_decoder_whose_conv1d_layers_are_gemms():
    model = _trained("gpt2")
    _check(graphopt.from_torch(model, torch.zeros(1, T, dtype=torch.long)), model, 2 * 4 + 1)  # c_attn, c_proj,
    # c_fc, mlp.c_proj per layer, lm_head
