"""The Lottery Ticket Hypothesis loop: pruning by global magnitude, rewinding, the controls, and
resuming from the saved state."""

import numpy as np
import pytest
import torch

from graphopt import from_torch
from graphopt.errors import GraphOptError
from graphopt.masks import get_mask
from graphopt.training.finetune import FinetuneConfig
from graphopt.training.lottery import _weights, lottery_ticket


def _task(seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    x = np.random.default_rng(seed).standard_normal((128, 10)).astype(np.float32)
    y = (x[:, :4] * np.arange(1, 5)).argmax(1)
    return from_torch(net, torch.from_numpy(x[:1])), x, y


def test_rounds_prune_globally_and_rewind_to_the_initial_weights():
    g, x, y = _task()
    init = {v.name: np.asarray(v.const).copy() for v in _weights(g)}
    frozen = FinetuneConfig(epochs=1, batch_size=32, lr=0.0)  # no learning: a round ends where it was rewound
    rows = lottery_ticket(g, x, y, rounds=3, rate=0.5, config=frozen)
    assert [round(r["remaining"], 3) for r in rows] == [1.0, 0.5, 0.25]
    for v in _weights(g):
        m = get_mask(v)
        np.testing.assert_array_equal(np.asarray(v.const), np.where(m.keep, init[v.name], 0))  # rewound survivors
    # global magnitude: the survivors are the largest initial |w| over both layers
    kept = np.concatenate([np.abs(init[v.name])[get_mask(v).keep] for v in _weights(g)])
    dropped = np.concatenate([np.abs(init[v.name])[~get_mask(v).keep] for v in _weights(g)])
    assert kept.min() >= dropped.max()


def test_late_rewinding_controls_and_resume(tmp_path):
    g, x, y = _task()
    cfg = FinetuneConfig(epochs=2, batch_size=32, lr=0.05)
    acc = lambda gr: float((__import__("graphopt").to_torch(gr)(torch.from_numpy(x)).argmax(1).numpy() == y).mean())  # noqa: E731
    st = tmp_path / "lth"
    first = lottery_ticket(g.copy(), x, y, rounds=2, rate=0.3, rewind_step=2, config=cfg, evaluate=acc, state=st)
    assert (tmp_path / "lth.json").is_file() and (tmp_path / "lth.npz").is_file()
    more = lottery_ticket(g.copy(), x, y, rounds=3, rate=0.3, rewind_step=2, config=cfg, evaluate=acc, state=st)
    assert len(more) == 3 and more[:2] == first and more[2]["remaining"] == pytest.approx(0.49, abs=0.01)
    ticket = g.copy()
    lottery_ticket(ticket, x, y, rounds=2, rate=0.5, config=FinetuneConfig(epochs=1, batch_size=32, lr=0.0))
    rand = g.copy()
    lottery_ticket(rand, x, y, rounds=2, rate=0.5, control="random_mask",
                   config=FinetuneConfig(epochs=1, batch_size=32, lr=0.0))
    for a, b in zip(_weights(ticket), _weights(rand)):  # same per-layer counts, other weights kept
        assert get_mask(a).keep.sum() == get_mask(b).keep.sum()
        assert not np.array_equal(get_mask(a).keep, get_mask(b).keep)
    re = g.copy()
    lottery_ticket(re, x, y, rounds=1, rate=0.5, control="reinit", config=FinetuneConfig(epochs=1, batch_size=32, lr=0.0))
    assert not np.allclose(np.asarray(_weights(re)[0].const), np.asarray(_weights(g)[0].const))
    with pytest.raises(GraphOptError, match="cannot rewind to step 99"):
        lottery_ticket(g.copy(), x, y, rounds=2, rewind_step=99, config=FinetuneConfig(epochs=1, batch_size=32))
    with pytest.raises(GraphOptError, match="written by another run"):
        lottery_ticket(g.copy(), x, y, rounds=3, rate=0.5, rewind_step=2, config=cfg, state=st)
    with pytest.raises(GraphOptError, match="rate per round must be in"):
        lottery_ticket(g.copy(), x, y, rate=1.0)
