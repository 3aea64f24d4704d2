"""Wanda and SparseGPT recomputed here from their published algorithms, independently of the
library, on one layer; the library's masks and weights must match."""

import torch
from torch import nn

import ditprune


class OneLinear(nn.Module):
    def __init__(self, d_in, d_out, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.lin = nn.Linear(d_in, d_out, bias=False)

    def forward(self, x):
        return self.lin(x)


def _batches(d_in, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d_in, d_in, generator=g) / d_in**0.5  # correlated channels
    return [{"x": (torch.randn(3, 20, d_in, generator=g) @ mix) * torch.logspace(-1, 1, d_in)} for _ in range(n)]


def wanda_reference(w, batches, sparsity=None, prune_n=0, prune_m=0):
    """locuslab/wanda lib/prune.py + lib/layerwrapper.py, transcribed."""
    scaler_row, nsamples = torch.zeros(w.shape[1]), 0
    for b in batches:
        inp = b["x"]
        tmp = inp.shape[0]
        inp = inp.reshape(-1, inp.shape[-1]).t().float()
        scaler_row *= nsamples / (nsamples + tmp)
        nsamples += tmp
        scaler_row += torch.norm(inp, p=2, dim=1) ** 2 / nsamples
    metric = torch.abs(w) * torch.sqrt(scaler_row.reshape((1, -1)))
    prune = torch.zeros_like(metric, dtype=torch.bool)
    if prune_n:
        for ii in range(metric.shape[1]):
            if ii % prune_m == 0:
                tmp = metric[:, ii : ii + prune_m].float()
                prune.scatter_(1, ii + torch.topk(tmp, prune_n, dim=1, largest=False)[1], True)
    else:
        idx = torch.sort(metric, dim=-1, stable=True)[1][:, : int(metric.shape[1] * sparsity)]
        prune.scatter_(1, idx, True)
    return ~prune


def sparsegpt_reference(w, batches, sparsity, blocksize=128, percdamp=0.01):
    """SparseGPT (arXiv 2301.00774, Alg. 1) without lazy batching: every later column is updated
    right after each column is pruned; the mask of each 128-column block is chosen from the weights
    as they are when the block starts, by w^2 / [H^-1]_jj^2 (exact count per block)."""
    x = torch.cat([b["x"].reshape(-1, w.shape[1]) for b in batches]).double()
    w = w.double().clone()
    H = 2 * x.T @ x / len(x)
    H += percdamp * torch.diag(H).mean() * torch.eye(len(H), dtype=H.dtype)
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    cols = w.shape[1]
    pruned = torch.zeros_like(w, dtype=torch.bool)
    for b0 in range(0, cols, blocksize):
        b1 = min(b0 + blocksize, cols)
        score = w[:, b0:b1] ** 2 / torch.diag(U)[b0:b1] ** 2
        k = int(score.numel() * sparsity)
        flat = torch.zeros(score.numel(), dtype=torch.bool)
        flat[torch.argsort(score.flatten())[:k]] = True
        pruned[:, b0:b1] = flat.reshape(score.shape)
        for j in range(b0, b1):
            q = torch.where(pruned[:, j], 0.0, w[:, j])
            err = (w[:, j] - q) / U[j, j]
            w[:, j:] -= err.unsqueeze(1) * U[j, j:].unsqueeze(0)
            w[:, j] = q
    return w.float(), ~pruned


def test_wanda_matches_reference_unstructured():
    model, batches = OneLinear(48, 24), _batches(48)
    expected = wanda_reference(model.lin.weight.detach().clone(), batches, sparsity=0.5)
    ditprune.prune(model, batches, method="wanda", sparsity=0.5, targets=["lin"], block_sequential=False)
    assert torch.equal(model.lin.weight != 0, expected)


def test_wanda_matches_reference_2_4():
    model, batches = OneLinear(48, 24), _batches(48)
    expected = wanda_reference(model.lin.weight.detach().clone(), batches, prune_n=2, prune_m=4)
    ditprune.prune(model, batches, method="wanda", pattern="2:4", targets=["lin"], block_sequential=False)
    assert torch.equal(model.lin.weight != 0, expected)


def test_sparsegpt_matches_reference_weights_and_mask():
    model, batches = OneLinear(256, 16), _batches(256)  # two 128-column blocks
    expected_w, expected_keep = sparsegpt_reference(model.lin.weight.detach().clone(), batches, 0.5)
    ditprune.prune(model, batches, method="sparsegpt", sparsity=0.5, targets=["lin"], block_sequential=False)
    w = model.lin.weight.detach()
    assert torch.equal(w != 0, expected_keep)
    torch.testing.assert_close(w, expected_w, atol=1e-4, rtol=1e-4)
    assert (w == 0).sum() == 256 * 16 // 2


def test_sparsegpt_lowers_output_error_below_wanda():
    batches = _batches(64)
    x = torch.cat([b["x"].reshape(-1, 64) for b in batches])
    errs = {}
    for method in ("wanda", "sparsegpt"):
        model = OneLinear(64, 32)
        dense = model(x)
        ditprune.prune(model, batches, method=method, sparsity=0.5, targets=["lin"], block_sequential=False)
        errs[method] = ((model(x) - dense) ** 2).sum().item()
    assert errs["sparsegpt"] < errs["wanda"]
