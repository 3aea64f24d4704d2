"""The few-token safeguard does what the README says: the dit choice and search are fitted
without the held-out tokens and judged on them alone; the fallback is exactly Wanda's per-row
mask; reconstruction candidates are fitted without, and judged on, the held-out tokens; the
report names held-out tokens only where they were used."""

import pytest
import torch
from torch import nn

import ditprune
from ditprune import ditmask, sparsifiers, stats as S


class OneLinear(nn.Module):
    def __init__(self, d_in=32, d_out=24, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.lin = nn.Linear(d_in, d_out, bias=False)

    def forward(self, x):
        return self.lin(x)


def _few(d=32, tokens=60, seed=0):
    """60 tokens for 32 inputs (< 16 per input): the few-token regime."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d, generator=g) @ torch.randn(d, d, generator=g) / d**0.5
    return x, [{"x": part.unsqueeze(0)} for part in x.split(7)]


def _split(x):
    h = S.held_out(x)
    assert 0 < int(h.sum()) < len(x)
    fit, held = x[~h], x[h]
    return fit.T @ fit / len(fit), held.T @ held / len(held), x.T @ x / len(x), int(h.sum())


def test_choice_and_search_are_fitted_without_the_held_out_tokens_and_judged_on_them(monkeypatch):
    x, batches = _few()
    fit, held, full, n_held = _split(x)
    searched, judged = [], []
    real_refine, real_choose, real_fall_back = sparsifiers.refine_mask, ditmask.choose, ditmask.fall_back
    monkeypatch.setattr(sparsifiers, "refine_mask", lambda w, k, h, *a, **kw: searched.append(h) or real_refine(w, k, h, *a, **kw))
    monkeypatch.setattr(sparsifiers.D, "choose",
                        lambda w, e, lab, al, gr, se, judge: judged.append((e, judge)) or real_choose(w, e, lab, al, gr, se, judge))
    monkeypatch.setattr(sparsifiers.D, "fall_back",
                        lambda w, a, b, lab, ch, judge: judged.append((None, judge)) or real_fall_back(w, a, b, lab, ch, judge))
    report = ditprune.prune(OneLinear(), batches, method="dit", targets=["lin"])
    assert report.layers[0].info["held_out_tokens"] == n_held
    assert len(judged) == 2
    torch.testing.assert_close(judged[0][0], torch.diagonal(fit))  # candidates scored with the fit tokens' energy
    for _, judge in judged:
        torch.testing.assert_close(judge, held, atol=1e-5, rtol=1e-4)  # judged on the held-out tokens alone
    *fitting, final = searched
    assert fitting and all(torch.allclose(h, fit, atol=1e-5) for h in fitting)
    torch.testing.assert_close(final, full)  # the kept mask is searched again on every token


@pytest.mark.parametrize("setting", [{"sparsity": 0.5}, {"pattern": "2:4"}])
def test_the_fallback_is_exactly_wandas_per_row_mask(monkeypatch, setting):
    x, batches = _few()

    def everyone_falls_back(w, searched, plain, labels, choice, judge):
        for c in choice:
            c["fallback"] = "plain mask (held-out tokens)"

    monkeypatch.setattr(sparsifiers.D, "fall_back", everyone_falls_back)
    dit, wanda = OneLinear(), OneLinear()
    ditprune.prune(dit, batches, method="dit", targets=["lin"], **setting)
    ditprune.prune(wanda, batches, method="wanda", targets=["lin"], **setting)
    assert torch.equal(dit.lin.weight != 0, wanda.lin.weight != 0)


def test_reconstruct_candidates_are_fitted_and_judged_apart(monkeypatch):
    x, batches = _few()
    fit, held, full, _ = _split(x)
    seen = {}
    real = ditmask.reconstruct

    def spy(weight, keep, gram, iters, nm, held_arg=None, **kw):
        seen["gram"], seen["held"] = gram, held_arg
        return real(weight, keep, gram, iters, nm, held_arg, **kw)

    monkeypatch.setattr(sparsifiers.D, "reconstruct", spy)
    model = OneLinear()
    report = ditprune.prune(model, batches, method="dit", targets=["lin"], reconstruct=True)
    rows, fitted, fit_h, judge_h = seen["held"]
    torch.testing.assert_close(fit_h, fit)
    torch.testing.assert_close(judge_h, held)
    torch.testing.assert_close(seen["gram"], full)  # the winner is fitted again on every token
    assert fitted.shape == (len(rows), 32)
    assert "reconstruct" in report.layers[0].info


def test_reconstruct_keeps_the_weights_when_no_update_helps_on_held_out_tokens(monkeypatch):
    """Fit tokens repeat inputs 0-15 as 16-31; held-out tokens repeat them negated. An update fitted
    on the fit tokens moves each pruned weight into its twin, which on the held-out tokens doubles
    the error: judged there, leaving the weights as they are wins."""
    d = 32
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, d, generator=g)
    held = torch.zeros(60, dtype=torch.bool)
    held[::4] = True
    x[:, d // 2:] = torch.where(held.unsqueeze(1), -x[:, : d // 2], x[:, : d // 2])
    monkeypatch.setattr(S, "held_out", lambda t: (t[:, d // 2] == -t[:, 0]) & (t[:, 0] != 0))
    model = OneLinear()
    dense = model.lin.weight.detach().clone()
    report = ditprune.prune(model, [{"x": x.unsqueeze(0)}], method="dit", targets=["lin"], reconstruct=True)
    w = model.lin.weight.detach()
    assert report.layers[0].info["held_out_tokens"] == 15
    assert report.layers[0].info["reconstruct"] == "skipped: no gain on held-out tokens"
    assert torch.equal(w[w != 0], dense[w != 0])


def test_held_out_tokens_are_reported_only_where_used():
    x, batches = _few()
    for options, used in (({}, True), ({"alpha": 0.4, "refine": 0}, False), ({"holdout": False}, False),
                          ({"alpha": 0.4, "refine": 0, "reconstruct": True}, True)):
        report = ditprune.prune(OneLinear(), batches, method="dit", targets=["lin"], **options)
        assert ("held_out_tokens" in report.layers[0].info) == used, options
    many = [{"x": torch.randn(1, 600, 32)}]  # 600 tokens >= 16 x 32: nothing held out
    report = ditprune.prune(OneLinear(), many, method="dit", targets=["lin"])
    assert "held_out_tokens" not in report.layers[0].info
