"""GPTQ (optimal brain quantization): Hessian-aware rounding of a layer's weights onto a grid
(Frantar et al., ICLR 2023). The grid is the weight scheme's own: ``gptq`` takes a function that
rounds one column of weights (every row with its own parameters), so it serves the uniform
scheme and every zoo scheme whose rounding is element-wise (pow2, APoT, PWLQ, binary,
ternary)."""

from __future__ import annotations

import numpy as np
import torch

from graphopt.errors import GraphOptError
from graphopt.quantizers.uniform import uniform_rounding  # noqa: F401  (its home is the uniform scheme)


class HessianObserver:
    """Streams H = sum x x^T of a linear layer's input, im2col-unfolded like the layer reads it,
    one K x K matrix per conv group (K = input channels per group x kernel elements)."""

    def __init__(self, op: str, kernel=None, strides=None, pads=None, dilations=None, groups: int = 1):
        self.op, self.kernel, self.strides, self.pads, self.dilations, self.groups = \
            op, kernel, strides, pads, dilations, groups
        self.H: torch.Tensor | None = None
        self.n = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float()  # products in float32, sums across batches in float64
        if self.op == "Conv":
            nd = len(self.kernel)
            if nd != 2:
                raise GraphOptError("GPTQ supports 2-D convolutions only")
            begin, end = self.pads[:nd], self.pads[nd:]
            if begin != end:
                x = torch.nn.functional.pad(x, [begin[1], end[1], begin[0], end[0]])
                begin = [0, 0]
            cols = torch.nn.functional.unfold(x, self.kernel, self.dilations, begin, self.strides)  # [B, C*k, L]
            b, ck, n_pos = cols.shape
            g = self.groups
            cols = cols.reshape(b, g, ck // g, n_pos).permute(1, 2, 0, 3).reshape(g, ck // g, b * n_pos)
        else:
            cols = x.reshape(-1, x.shape[-1]).T.unsqueeze(0)  # [1, K, M]
        h = (cols @ cols.transpose(1, 2)).double()
        self.H = h if self.H is None else self.H + h
        self.n += cols.shape[-1]

    def result(self):
        return (self.H / max(self.n, 1)).cpu().numpy()


def gptq(w_rows: np.ndarray, H: np.ndarray, round_col, damp: float = 0.01, act_order: bool = True) -> np.ndarray:
    """GPTQ rounding of weights ``w_rows`` [G, R, K] (G groups of R rows over K inputs) with
    input Hessians ``H`` [G, K, K]; ``round_col(column, k)`` maps one column [G, R] (float64),
    input ``k`` in the original order, to its value on the grid (``k`` picks a block's scale). Returns the dequantized weights (on the quantization grid). Columns are rounded in order; each rounding error is
    spread over the columns still to come through the inverse Hessian, which keeps
    E[(W_q x - W x)^2] small. With ``act_order`` the columns whose inputs carry the most energy
    (largest Hessian diagonal, summed over groups) go first."""
    W = torch.from_numpy(np.array(w_rows, np.float64))
    Hm = torch.from_numpy(np.array(H, np.float64))
    perm = None
    if act_order:
        perm = torch.argsort(torch.diagonal(Hm, dim1=1, dim2=2).sum(0), descending=True)
        W, Hm = W[:, :, perm], Hm[:, perm][:, :, perm]
    G, R, K = W.shape
    dead = torch.diagonal(Hm, dim1=1, dim2=2) == 0
    idx = torch.arange(K)
    Hm[:, idx, idx] += damp * torch.diagonal(Hm, dim1=1, dim2=2).mean(1, keepdim=True).clamp_min(1e-12) + dead.double()
    W = W.masked_fill(dead[:, None, :], 0.0)
    L = torch.linalg.cholesky(Hm)
    Hinv = torch.cholesky_inverse(L)
    U = torch.linalg.cholesky(Hinv, upper=True)  # [G, K, K]
    Q = torch.zeros_like(W)
    for j in range(K):  # columns in order; every op is batched over groups and rows
        w = W[:, :, j]
        q = round_col(w, int(perm[j]) if perm is not None else j)
        Q[:, :, j] = q
        err = (w - q) / U[:, j, j][:, None]
        if j + 1 < K:
            W[:, :, j + 1:] -= err[:, :, None] * U[:, j, j + 1:][:, None, :]
    if perm is not None:
        Q = Q[:, :, torch.argsort(perm)]
    return Q.numpy()
