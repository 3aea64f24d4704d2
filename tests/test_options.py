"""Options and corners of the engine: per-layer overrides, SparseGPT N:M for any M, dead input
channels, a failed Cholesky, reconstruct=True, a fixed alpha, offload."""

import logging

import pytest
import torch
from torch import nn

import ditprune
from ditprune import granularity as G
from ditprune.models.tiny import tiny_batches, tiny_model
from ditprune.sparsegpt import obs_prune
from ditprune.stats import NonFiniteActivationError

from conftest import TwoLinear, linear_batches


class OneLinear(nn.Module):
    def __init__(self, d_in, d_out, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.lin = nn.Linear(d_in, d_out, bias=False)

    def forward(self, x):
        return self.lin(x)


def _gram(batches, d):
    x = torch.cat([b["x"].reshape(-1, d) for b in batches])
    return x, x.T @ x / len(x), (x**2).mean(0)


# -- overrides ----------------------------------------------------------------------------------
class Counting(list):
    def __iter__(self):
        self.passes = getattr(self, "passes", 0) + 1
        return super().__iter__()


def test_overrides_prune_their_layers_in_the_same_single_pass():
    model = tiny_model("dit")
    batches = Counting(tiny_batches(model))
    report = ditprune.prune(model, batches, method="wanda", sparsity=0.5,
                            overrides=[{"targets": [r"ff\.net\.2"], "sparsity": 0.75}, {"targets": ["attn1.to_q"],
                                                                                        "pattern": "1:4"}])
    assert batches.passes == 1
    by_name = {r.name: r for r in report.layers}
    assert len(by_name) == len(report.layers)  # each layer once
    for name, layer in ditprune.resolve_targets(model).items():
        w = layer.weight
        if "ff.net.2" in name:
            assert by_name[name].target == 0.75 and (w == 0).float().mean().item() == 0.75
        elif "attn1.to_q" in name:
            assert by_name[name].pattern == "1:4" and (w != 0).reshape(w.shape[0], -1, 4).sum(-1).eq(1).all()
        else:
            assert (w == 0).float().mean().item() == 0.5


def test_overrides_keep_the_default_ignore_list():
    model = tiny_model("dit")  # its blocks hold timestep embedders (norm1.emb.timestep_embedder...)
    nested = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and "transformer_blocks.0" in n
              and "emb" in n]
    assert nested
    ditprune.prune(model, tiny_batches(model), method="wanda", overrides=[{"targets": ["transformer_blocks.0"],
                                                                           "sparsity": 0.7}])
    for n in nested:
        assert (model.get_submodule(n).weight != 0).all(), n


def test_overlapping_overrides_are_refused_naming_both():
    model = tiny_model("dit")
    with pytest.raises(ValueError, match=r"overrides 0 \(\['ff'\]\) and 1 \(\['net\\\\.2'\]\) both match"):
        ditprune.prune(model, tiny_batches(model), method="wanda",
                       overrides=[{"targets": ["ff"], "sparsity": 0.6}, {"targets": [r"net\.2"], "sparsity": 0.7}])


def test_a_failure_anywhere_leaves_the_model_as_it_was():
    model = tiny_model("dit")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    handle = model.transformer_blocks[1].ff.net[2].register_forward_pre_hook(lambda m, a: (a[0] * float("nan"),))
    with pytest.raises(NonFiniteActivationError):
        ditprune.prune(model, tiny_batches(model), method="sparsegpt",
                       overrides=[{"targets": ["transformer_blocks.0"], "sparsity": 0.7}])
    handle.remove()
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)


# -- SparseGPT corners --------------------------------------------------------------------------
def test_sparsegpt_n_m_is_valid_when_m_does_not_divide_the_block():
    model, batches = OneLinear(384, 32), linear_batches(d_in=384, scale=torch.ones(384))
    report = ditprune.prune(model, batches, method="sparsegpt", pattern="1:3", targets=["lin"])
    keep = model.lin.weight != 0
    assert keep.reshape(32, 128, 3).sum(-1).eq(1).all()  # every group of 3, aligned to the columns
    assert report.layers[0].sparsity == pytest.approx(2 / 3)


def test_dead_input_channels_are_counted_in_the_report():
    d = 64
    scale = torch.ones(d)
    scale[:10] = 0.0  # ten channels never active in calibration
    model, batches = OneLinear(d, 16), linear_batches(d_in=d, scale=scale)
    report = ditprune.prune(model, batches, method="sparsegpt", sparsity=0.1, targets=["lin"])
    w = model.lin.weight
    assert (w[:, :10] == 0).all()  # the reference's choice: weights of dead inputs are zeroed...
    assert report.layers[0].sparsity == (w == 0).float().mean().item() >= 10 / 64  # ...and counted


def test_failed_cholesky_is_retried_with_more_dampening(caplog):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 16, generator=g)
    h = torch.eye(16)
    h[3, 3] = -0.1  # indefinite: mean diag ~0.93, so percdamp 0.01 adds 0.009 and fails, 0.1 adds 0.093 and fails
    with caplog.at_level(logging.WARNING, logger="ditprune.sparsegpt"):
        new, keep, used = obs_prune(w, h, sparsity=0.5)
    assert used == pytest.approx(1.0) and "succeeded with percdamp=1" in caplog.text
    assert torch.isfinite(new).all() and (~keep).sum() == 64


# -- dit options --------------------------------------------------------------------------------
@pytest.mark.parametrize("refine", [0, 8])
def test_fixed_alpha_mask_recomputed_independently(refine):
    d = 32
    model, batches = OneLinear(d, 16), linear_batches(d_in=d, n=40)  # 80 tokens per input: no held-out split
    w = model.lin.weight.detach().clone()
    _, h, energy = _gram(batches, d)
    ditprune.prune(model, batches, method="dit", sparsity=0.5, targets=["lin"], alpha=0.3, granularity="row",
                   refine=refine)
    scores = (w**2 / (w**2).mean()) ** 0.7 * (energy / energy.mean()) ** 0.3
    order = scores.argsort(dim=1, stable=True)[:, :16]  # the 16 lowest of each row, ties by position
    expected = torch.ones_like(w, dtype=torch.bool).scatter_(1, order, False)
    keep = model.lin.weight != 0
    if not refine:
        assert torch.equal(keep, expected)
    else:  # the search keeps every row's count and only lowers each row's removed energy
        assert torch.equal(keep.sum(1), expected.sum(1))
        lost = lambda k: (((w * ~k) @ h) * (w * ~k)).sum(1)  # noqa: E731
        assert (lost(keep) <= lost(expected) + 1e-6).all() and (lost(keep) < lost(expected)).any()


def test_reconstruct_updates_only_kept_weights_and_lowers_the_error():
    d = 48
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(d, d, generator=g) / d**0.5  # correlated channels, as activations are
    batches = [{"x": torch.randn(2, 40, d, generator=g) @ mix} for _ in range(6)]
    x, _, _ = _gram(batches, d)
    out = {}
    for reconstruct in (False, True):
        model = OneLinear(d, 24)
        dense_w, dense_y = model.lin.weight.detach().clone(), model(x)
        ditprune.prune(model, batches, method="dit", sparsity=0.6, targets=["lin"], reconstruct=reconstruct)
        out[reconstruct] = (model.lin.weight.detach().clone(), ((model(x) - dense_y) ** 2).sum().item())
    (w_mask, err_mask), (w_obs, err_obs) = out[False], out[True]
    assert torch.equal(w_mask != 0, w_obs != 0)  # the same dit mask
    assert torch.equal(w_mask[w_mask != 0], dense_w[w_mask != 0])  # mask only: kept weights untouched
    assert not torch.equal(w_obs[w_obs != 0], dense_w[w_obs != 0])  # OBS: kept weights updated
    assert err_obs < 0.95 * err_mask  # the least-squares fit of the kept weights


def test_offload_keeps_captured_inputs_on_the_offload_device(monkeypatch):
    import ditprune.calibration as cal

    seen = []
    original = cal.to_device

    def spy(obj, device, copy=False):
        seen.append(str(device))
        return original(obj, device, copy)

    model = tiny_model("flux")
    reference = tiny_model("flux")
    ditprune.prune(reference, tiny_batches(reference), method="wanda")
    monkeypatch.setattr(cal, "to_device", spy)
    ditprune.prune(model, tiny_batches(model), method="wanda", offload="cpu")
    assert "cpu" in seen
    for (n, a), (_, b) in zip(ditprune.resolve_targets(model).items(), ditprune.resolve_targets(reference).items()):
        assert torch.equal(a.weight, b.weight), n


def test_two_linear_smoke_every_method_reports_actual_zeros():
    for method in ("magnitude", "wanda", "ria", "sparsegpt", "dit"):
        model = TwoLinear()
        report = ditprune.prune(model, linear_batches(), method=method, sparsity=0.5)
        for r in report.layers:
            w = model.get_submodule(r.name).weight
            assert r.sparsity == (w == 0).float().mean().item()


def test_polish_only_lowers_the_objective_and_reaches_the_exact_solution():
    """Low-rank inputs (rank 16 for 64 inputs, as a few-token layer): each iteration lowers the
    damped least-squares objective; with as many iterations as kept weights per row (32)
    conjugate gradients reach the exact solution (finite termination, float64); and the shipped
    float32 iterations follow the float64 ones."""
    from ditprune.lsq import polish

    g = torch.Generator().manual_seed(0)
    d = 64
    x = torch.randn(200, 16, generator=g) @ torch.randn(16, d, generator=g)
    h = x.T @ x / 200
    w = torch.randn(10, d, generator=g)
    keep = G.row_mask(w.abs(), 0.5)
    hd = (h + 0.01 * torch.diagonal(h).mean() * torch.eye(d)).double()
    exact = torch.zeros_like(w, dtype=torch.float64)
    for i in range(10):  # per row: solve the kept weights exactly
        k = keep[i]
        exact[i, k] = torch.linalg.solve(hd[k][:, k], hd[k] @ w[i].double())
    loss = lambda v: float((((w.double() - v.double()) @ hd) * (w.double() - v.double())).sum())  # noqa: E731
    previous = loss(w * keep)
    for iters in (1, 2, 4, 8):
        v = polish(w, w * keep, keep, h, iters)
        assert loss(v) <= previous * (1 + 1e-6) and (v[~keep] == 0).all()
        assert loss(v) == pytest.approx(loss(polish(w, w * keep, keep, h, iters, dtype=torch.float64)), rel=1e-4)
        previous = loss(v)
    assert loss(polish(w, w * keep, keep, h, 32, tol=0.0, dtype=torch.float64)) == pytest.approx(loss(exact), rel=1e-5)


def _exact_refit(w: torch.Tensor, keep: torch.Tensor, hd: torch.Tensor) -> torch.Tensor:
    """The damped least-squares refit solved per row with torch.linalg.solve (float64)."""
    wd, hd = w.double(), hd.double()
    exact = torch.zeros_like(wd)
    for i in range(w.shape[0]):
        k = keep[i]
        exact[i, k] = torch.linalg.solve(hd[k][:, k], (wd[i] @ hd)[k])
    return exact


@pytest.mark.parametrize("tokens", [None, 512])
def test_the_shipped_polish_is_within_one_percent_of_the_exact_solution(tokens):
    """The damped least-squares problem the README states, solved per row with
    torch.linalg.solve, against ``polish`` with the shipped iterations and rank, on the cost
    bench's correlated inputs at 1024 inputs: their population covariance, and 512 sampled tokens
    (a few-token layer: H of rank 512 before damping)."""
    from ditprune.costbench import synthetic_stats
    from ditprune.lsq import damped, polish
    from ditprune.sparsifiers import DiTPruningSparsifier

    n = 1024
    iters = DiTPruningSparsifier(reconstruct=True).defaults["polish"]
    h = synthetic_stats(n, tokens).gram
    hd = damped(h)
    w = torch.randn(48, n, generator=torch.Generator().manual_seed(1)) / n**0.5
    keep = G.row_mask(w.abs() * torch.diagonal(h).sqrt(), 0.5)  # Wanda's mask
    wd = w.double()
    exact = _exact_refit(w, keep, hd)
    loss = lambda v: float((((wd - v.double()) @ hd) * (wd - v.double())).sum())  # noqa: E731
    v = polish(w, w * keep, keep, h, iters)
    assert loss(exact) <= loss(v) <= 1.01 * loss(exact)
    assert loss(polish(w, w * keep, keep, h, iters, rank=0)) > 1.01 * loss(exact)  # Jacobi alone is not


def test_the_polish_started_from_the_search_residual_is_the_polish():
    """``residual`` = (W - start) @ H (the swap search's, undamped) replaces the polish's first
    product: the damping, and a dead input's unit diagonal, are added by the polish itself, so
    the result is the one it computes alone (float32 rounding apart)."""
    from ditprune.lsq import polish

    g = torch.Generator().manual_seed(4)
    d = 96
    x = torch.randn(400, d, generator=g) @ torch.randn(d, d, generator=g)
    x[:, 5] = 0  # a dead input
    h = x.T @ x / 400
    w = torch.randn(20, d, generator=g)
    keep = G.row_mask(w.abs(), 0.6)
    start = 0.7 * w * keep  # not W * keep: the damping then acts on the kept weights too
    alone = polish(w, start, keep, h)
    started = polish(w, start, keep, h, residual=(w - start) @ h)
    assert (started[~keep] == 0).all()
    torch.testing.assert_close(started, alone, rtol=0, atol=1e-4 * float(alone.abs().max()))


def test_the_polish_handles_rows_that_keep_fewer_weights_than_its_rank():
    """At 99% (10 of 1024 kept, rank 64) and with a row that keeps nothing, the per-row r x r
    matrices are singular up to the model's diagonal: the polish still lowers the objective in
    every row, keeps zeros outside the mask and returns finite weights."""
    from ditprune.costbench import synthetic_stats
    from ditprune.lsq import damped, polish

    n = 1024
    h = synthetic_stats(n, 512).gram
    hd = damped(h).float()
    w = torch.randn(16, n, generator=torch.Generator().manual_seed(2)) / n**0.5
    keep = G.row_mask(w.abs(), 0.99)
    keep[3] = False
    v = polish(w, w * keep, keep, h)
    before = (((w - w * keep) @ hd) * (w - w * keep)).sum(1)
    after = (((w - v) @ hd) * (w - v)).sum(1)
    assert torch.isfinite(v).all() and (v[~keep] == 0).all()
    assert (after <= before * (1 + 1e-5)).all() and (after[:3] < 0.999 * before[:3]).all()


@pytest.mark.parametrize("chunk", [2048, 2])
def test_the_spectral_preconditioner_is_the_exact_inverse_of_its_model_on_each_kept_set(chunk, monkeypatch):
    """apply(R) = D^-1/2 (S_KK)^-1 D^-1/2 R per row, S = c I + U (diag(lam) - c) U^T built from
    the top eigenpairs of the Jacobi-scaled damped H (torch.linalg.eigh here, not the solver's
    subspace iteration: the two must agree on a matrix with a clear spectral gap). ``chunk``: the
    per-row matrices built 2 rows at a time (and factorised on 2 threads) as well as at once."""
    from ditprune import lsq
    from ditprune.lsq import damped, spectral_preconditioner

    monkeypatch.setattr(lsq, "_CHUNK", chunk)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # the factorisations split over 2 threads

    g = torch.Generator().manual_seed(3)
    n, k = 40, 4
    x = torch.randn(400, 6, generator=g, dtype=torch.float64) @ torch.randn(6, n, generator=g, dtype=torch.float64)
    hd = damped(x.T @ x / 400 + 1e-3 * torch.eye(n, dtype=torch.float64))
    keep = torch.rand(5, n, generator=g) < 0.5
    r = torch.randn(5, n, generator=g, dtype=torch.float64) * keep
    got = spectral_preconditioner(hd, keep, k)(r, torch.empty_like(r), torch.empty_like(r))
    s = torch.diagonal(hd).rsqrt()
    lam, u = torch.linalg.eigh(hd * s.unsqueeze(0) * s.unsqueeze(1))
    lam, u = lam.flip(0), u.flip(1)
    c = (n - lam[:k].sum()) / (n - k)
    model = c * torch.eye(n, dtype=torch.float64) + u[:, :k] @ torch.diag(lam[:k] - c) @ u[:, :k].T
    for i in range(5):
        kk = keep[i]
        want = torch.zeros(n, dtype=torch.float64)
        want[kk] = s[kk] * torch.linalg.solve(model[kk][:, kk], s[kk] * r[i, kk])
        torch.testing.assert_close(got[i], want, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("setting", [{"sparsity": 0.5}, {"pattern": "2:4"}])
def test_reconstruct_is_never_worse_than_sparsegpt_on_the_calibration_objective(setting):
    d = 64
    g = torch.Generator().manual_seed(1)
    mix = torch.randn(d, d, generator=g) / d**0.5
    batches = [{"x": torch.randn(4, 64, d, generator=g) @ mix} for _ in range(8)]  # 32 tokens per input
    x, h, _ = _gram(batches, d)
    lost = {}
    for method, kw in (("sparsegpt", {}), ("dit", {}), ("dit", {"reconstruct": True, "polish": 0}),
                       ("dit", {"reconstruct": True})):
        model = OneLinear(d, 32)
        dense = model.lin.weight.detach().clone()
        report = ditprune.prune(model, batches, method=method, targets=["lin"], block_sequential=False, **setting, **kw)
        w = model.lin.weight.detach()
        lost[(method, kw.get("polish", 6) if kw else None)] = float((((dense - w) @ h) * (dense - w)).sum())
        if "pattern" in setting:
            assert (w != 0).reshape(32, -1, 4).sum(-1).le(2).all()
        assert report.layers[0].sparsity >= 0.5
    dense = OneLinear(d, 32).lin.weight.detach()
    mask_only = OneLinear(d, 32)
    ditprune.prune(mask_only, batches, method="dit", targets=["lin"], block_sequential=False, **setting)
    dit_keep = mask_only.lin.weight != 0
    if "pattern" in setting:
        # with no least-squares iterations, each row takes the dit mask as it is or SparseGPT's
        # mask and OBS update, whichever loses less: recomputed here
        cands = [dense * dit_keep, obs_prune(dense, h, 0.5, (2, 4), dtype=torch.float64)[0]]
        per_row = torch.stack([(((dense - c) @ h) * (dense - c)).sum(1) for c in cands])
        assert lost[("dit", 0)] == pytest.approx(float(per_row.min(0).values.sum()), rel=1e-4)
    else:  # unstructured: no iterations, no update
        assert lost[("dit", 0)] == pytest.approx(lost[("dit", None)], rel=1e-6)
    assert lost[("dit", 6)] < 0.9 * lost[("dit", 0)]  # the least-squares fit lowers it further...
    assert lost[("dit", 6)] < lost[("sparsegpt", None)]  # ...below SparseGPT's


def test_the_polish_time_bench_reports_the_energy_the_refit_leaves(capsys, monkeypatch):
    """benchmarks/polish_time.py on a small shape: the energy it prints lies between the exact
    per-row solution's (within the shipped polish's 1%) and the unrefitted mask's."""
    import runpy
    import sys
    from pathlib import Path

    import ditprune.costbench as cb
    from ditprune import granularity as G
    from ditprune.lsq import damped
    from ditprune.saliency import wanda

    monkeypatch.setattr(cb, "SHAPES", [("tiny", 24, 48, None)])
    script = Path(__file__).parents[1] / "benchmarks" / "polish_time.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--shapes", "0", "--repeats", "1"])
    runpy.run_path(str(script), run_name="__main__")
    left = float(capsys.readouterr().out.split("| tiny (24x48) | plenty |")[1].split("|")[1])
    stats = cb.synthetic_stats(48, None)
    w = torch.randn(24, 48, generator=torch.Generator().manual_seed(1)) / 48**0.5
    keep = G.row_mask(wanda(w, stats.energy), 0.5)
    hd = damped(stats.gram, dtype=torch.float64)
    energy = lambda v: float((((w.double() - v) @ hd) * (w.double() - v)).sum())  # noqa: E731
    exact, masked = energy(_exact_refit(w, keep, hd)), energy(w.double() * keep)
    assert exact * (1 - 1e-4) <= left <= exact * 1.01 < masked
