"""Allocation of sparsity across layers: budgets, bounds, OWL and the measured optimum, by hand."""

import math

import pytest
import torch

from ditprune.allocating import pick_batches
from ditprune.allocation import auto, bounds, fit_budget, outlier_ratio, owl, removal_curve


def _zeros(alloc, sizes):
    return sum(a * n for a, n in zip(alloc, sizes))


def test_fit_budget_is_exact_and_within_bounds():
    sizes = [100, 300, 50, 1000]
    alloc = fit_budget([0.9, 0.2, 0.5, 0.7], sizes, 0.6, 0.4, 0.8)
    assert all(0.4 <= a <= 0.8 for a in alloc)
    assert _zeros(alloc, sizes) == pytest.approx(0.6 * sum(sizes), abs=1e-9)
    assert bounds(0.9, 0.2) == (0.7, 0.99) and bounds(0.1, 0.2) == (0.0, pytest.approx(0.3))


def test_removal_curve_by_hand():
    w = torch.tensor([[1.0, -2.0, 3.0, 4.0], [0.5, 0.0, 1.0, 2.0]])
    a = torch.tensor([4.0, 1.0, 1.0, 0.25])
    # scores w^2 a: row 0 [4, 4, 9, 4] -> sorted 4, 4, 4, 9; row 1 [1, 0, 1, 1] -> 0, 1, 1, 1; total 24
    curve = removal_curve(w, a, grid=4)
    assert curve.tolist() == pytest.approx([0, 4 / 24, 9 / 24, 14 / 24, 1.0])
    # between whole counts, linear: 1.5 of 4 per row removes 4 + 0.5 * 4 and 0 + 0.5 * 1
    assert removal_curve(w, a, grid=8).tolist()[3] == pytest.approx((6 + 0.5) / 24)


def test_owl_gives_more_weights_to_layers_with_more_outliers():
    w = torch.ones(8, 100)
    w[:, :5] = 50.0  # 5% of entries far above the mean
    assert outlier_ratio(w, torch.ones(100), m=5) == pytest.approx(0.05)
    sizes = [1000, 1000, 2000]
    alloc = owl([0.0, 0.05, 0.10], sizes, 0.7, 0.2, lam=0.08)
    assert alloc[0] > alloc[1] > alloc[2]
    assert alloc[0] - alloc[2] == pytest.approx(0.16)  # 2 lam between the extremes, inside the bounds
    assert _zeros(alloc, sizes) == pytest.approx(0.7 * sum(sizes))


def test_auto_equalises_marginal_cost_and_beats_uniform_on_its_objective():
    # e_l(s) = c_l s^2: the optimum under sum n_l s_l = B has c_l s_l / n_l equal (up to the bounds)
    grid = torch.linspace(0, 1, 101, dtype=torch.float64)
    cs, sizes = [1.0, 2.0, 4.0], [100, 100, 100]
    curves = [c * grid**2 for c in cs]
    alloc, predicted = auto(curves, sizes, 0.5, 0.45)
    assert _zeros(alloc, sizes) == pytest.approx(0.5 * sum(sizes), abs=1e-6)
    # closed form: s_l proportional to 1 / c_l
    inv = [1 / c for c in cs]
    expected = [0.5 * 3 * i / sum(inv) for i in inv]
    assert alloc == pytest.approx(expected, abs=0.011)
    assert sum(predicted) < sum(c * 0.25 for c in cs)  # lower than uniform 0.5 everywhere
    assert predicted == pytest.approx([c * s**2 for c, s in zip(cs, alloc)], rel=0.02)


def test_auto_respects_bounds_and_gains():
    grid = torch.linspace(0, 1, 101, dtype=torch.float64)
    curves = [grid**2, grid**2]
    alloc, _ = auto(curves, [100, 100], 0.7, 0.1, gains=[1.0, 100.0])  # layer 1 matters far more
    assert alloc == pytest.approx([0.8, 0.6], abs=1e-9)  # both at their bounds, on budget
    alloc, _ = auto(curves, [100, 100], 0.7, 0.2)
    assert alloc == pytest.approx([0.7, 0.7], abs=0.011)  # alike layers: uniform
    assert math.isclose(sum(alloc), 1.4, abs_tol=1e-9)


def test_whole_rows_are_exact_per_row_and_near_the_budget():
    from ditprune.allocation import whole_rows

    shapes = [(8, 10), (4, 7), (16, 3)]
    alloc = [0.55, 0.62, 0.70]  # 5.5, 4.34, 2.1 zeros per row: not whole
    got = whole_rows(alloc, shapes, 0.6)
    per_row = [g * n_in for g, (_, n_in) in zip(got, shapes)]
    assert all(abs(k - round(k)) < 1e-9 for k in per_row)
    total = sum(o * i for o, i in shapes)
    zeros = sum(o * k for k, (o, _) in zip(per_row, shapes))
    assert abs(zeros - 0.6 * total) <= max(o for o, _ in shapes) / 2


def _zeros_of(model, names):
    ws = [model.get_submodule(n).weight for n in names]
    return sum(int((w == 0).sum()) for w in ws), sum(w.numel() for w in ws)


@pytest.mark.parametrize("allocation", ["owl", "auto"])
def test_prune_allocates_on_budget_within_range(allocation):
    import ditprune
    from ditprune.models.tiny import tiny_batches, tiny_model

    model = tiny_model("flux")
    report = ditprune.prune(model, tiny_batches(model), method="wanda", sparsity=0.7, allocation=allocation,
                            allocation_range=0.15)
    zeros, total = _zeros_of(model, [r.name for r in report.layers])
    widest = max(r.shape[0] for r in report.layers)
    assert abs(zeros - 0.7 * total) <= widest / 2  # whole rows: within half a layer's rows of the budget
    assert all(0.55 - 1e-9 <= r.sparsity <= 0.85 + 1e-9 for r in report.layers)
    assert all(r.sparsity == pytest.approx(r.target, abs=1e-9) for r in report.layers)  # wanda: whole rows, exact
    assert len({round(r.target, 6) for r in report.layers}) > 1  # not uniform
    from ditprune import provenance

    assert provenance.recorded(model)["allocation"] == allocation


def test_override_layers_keep_their_setting_and_leave_the_budget():
    import ditprune
    from ditprune.models.tiny import tiny_batches, tiny_model

    model = tiny_model("flux")
    overrides = [{"targets": [r"single_transformer_blocks\.1\."], "sparsity": 0.3}]
    report = ditprune.prune(model, tiny_batches(model), method="wanda", sparsity=0.7, allocation="auto",
                            overrides=overrides)
    pinned = [r for r in report.layers if r.name.startswith("single_transformer_blocks.1.")]
    rest = [r for r in report.layers if not r.name.startswith("single_transformer_blocks.1.")]
    assert pinned and all(r.target == 0.3 for r in pinned)
    zeros, total = _zeros_of(model, [r.name for r in rest])
    assert abs(zeros - 0.7 * total) <= max(r.shape[0] for r in rest) / 2


@pytest.mark.parametrize("kwargs, message", [
    ({"allocation": "best"}, "allocation must be one of"),
    ({"allocation": "auto", "allocation_range": 1.5}, "allocation_range must be a number in"),
    ({"allocation": "owl", "allocation_options": {"lamda": 1}}, "unknown \\['lamda'\\]"),
    ({"allocation": "auto", "allocation_options": {"gain_batches": 0}}, "gain_batches must be a positive integer"),
    ({"allocation": "auto", "allocation_options": {"batches": 1.5}}, "batches must be a positive integer"),
    ({"allocation": "auto", "allocation_options": {"gain_sparsities": 3}}, "gain_sparsities must be 1"),
    ({"allocation": "auto", "allocation_options": {"gain_sparsities": True}}, "gain_sparsities must be 1"),
    ({"allocation": "owl", "pattern": "2:4"}, "with a pattern every pruned layer keeps it"),
    ({"allocation": "auto", "max_dense": 0.1}, "max_dense chooses layers to keep dense under an N:M pattern"),
    ({"allocation": "uniform", "pattern": "2:4", "max_dense": 0.1}, "max_dense chooses layers"),
    ({"allocation": "auto", "pattern": "2:4", "max_dense": 1.0}, "max_dense must be a number in \\[0, 1\\)"),
])
def test_bad_allocations_are_one_clear_error(kwargs, message):
    import ditprune
    from ditprune.errors import InputError
    from ditprune.models.tiny import tiny_batches, tiny_model

    model = tiny_model("flux")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InputError, match=message):
        ditprune.prune(model, tiny_batches(model), method="wanda", **kwargs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_auto_measures_what_reaches_the_output():
    """A layer whose output the model multiplies by zero has gain 0: auto prunes it to the top of
    the range and gives its budget to the layer that matters (hand-computed: 0.8 and 0.2)."""
    import ditprune

    def toy():
        return _toy_pair(0.0)

    batches = [{"x": torch.randn(128, 16, generator=torch.Generator().manual_seed(i))} for i in range(2)]
    report = ditprune.prune(toy(), batches, method="wanda", sparsity=0.5, targets=["^a$", "^b$"],
                            allocation="auto", allocation_range=0.3)
    # within [0.2, 0.8] whole rows of 16 allow 4/16 to 12/16: b takes the most, a the rest of the budget
    assert {r.name: r.sparsity for r in report.layers} == {"a": 0.25, "b": 0.75}
    report = ditprune.prune(toy(), batches, method="wanda", sparsity=0.5, targets=["^a$", "^b$"],
                            allocation="auto", allocation_range=0.3, allocation_options={"gains": "none"})
    assert {r.name: r.sparsity for r in report.layers} == {"a": 0.5, "b": 0.5}  # alike without the gains


def test_obs_curve_is_wandas_for_uncorrelated_inputs_and_lower_for_correlated_ones():
    from ditprune.allocation import obs_curve

    torch.manual_seed(0)
    w, a = torch.randn(6, 8), torch.rand(8) + 0.5
    # H diagonal: [H^-1]_jj = 1 / a_j, so the OBS cost W^2 / [H^-1]_jj is Wanda's a_j W^2
    assert obs_curve(w, torch.diag(a), percdamp=0.0).tolist() == pytest.approx(removal_curve(w, a).tolist())
    # two copies of every input: a pruned weight's twin takes over its job, nothing is lost at 50%
    x = torch.randn(1000, 4)
    gram = torch.cat([x, x + 1e-3 * torch.randn(1000, 4)], 1)
    gram = gram.T @ gram / 1000
    w = torch.randn(6, 8)
    curve, wanda = obs_curve(w, gram, percdamp=0.0), removal_curve(w, gram.diagonal())
    assert curve[50] < 0.01 < wanda[50]


def test_nm_removed_by_hand():
    from ditprune.allocation import nm_removed

    w = torch.tensor([[1.0, -2.0, 3.0, 4.0], [0.5, 0.0, 1.0, 2.0]])
    a = torch.tensor([4.0, 1.0, 1.0, 0.25])
    # scores w^2 a: row 0 [4, 4, 9, 4], row 1 [1, 0, 1, 1]; total 24
    assert nm_removed(w, a, 2, 4) == pytest.approx((4 + 4 + 0 + 1) / 24)  # the 2 smallest of each 4
    assert nm_removed(w, a, 1, 4) == pytest.approx((12 + 2) / 24)
    assert nm_removed(w, a, 1, 2) == pytest.approx((4 + 4 + 0 + 1) / 24)  # pairs (4, 4) (9, 4) / (1, 0) (1, 1)
    assert nm_removed(torch.zeros(2, 4), a, 2, 4) == 0.0


def test_keep_dense_takes_the_largest_cost_per_weight_that_fits():
    from ditprune.allocation import keep_dense

    costs, sizes = [5.0, 1.0, 3.0, 0.0], [100, 10, 50, 10]  # per weight: 0.05, 0.1, 0.06, 0
    assert keep_dense(costs, sizes, 0.0) == [False] * 4
    assert keep_dense(costs, sizes, 0.35) == [False, True, False, False]  # 10 of 59.5; 50 more does not fit
    assert keep_dense(costs, sizes, 0.40) == [False, True, True, False]  # 60 of 68
    assert keep_dense(costs, sizes, 0.99) == [True, True, True, False]  # a layer that costs nothing stays pruned


def _toy_pair(weight_of_b: float = 0.1):
    """a(x) + weight_of_b * b(x), a and b with the same weights: only the gain tells them apart."""

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(16, 16, bias=False), torch.nn.Linear(16, 16, bias=False)

        def forward(self, x):
            return self.a(x) + weight_of_b * self.b(x)

    torch.manual_seed(0)
    model = Toy()
    model.b.weight.data.copy_(model.a.weight)  # the same weights: only the gain tells them apart
    return model


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_nm_auto_keeps_the_layer_that_reaches_the_output_dense(method):
    import ditprune

    batches = [{"x": torch.randn(128, 16, generator=torch.Generator().manual_seed(i))} for i in range(2)]
    model = _toy_pair()
    dense_a = model.a.weight.detach().clone()
    report = ditprune.prune(model, batches, method=method, pattern="2:4", targets=["^a$", "^b$"],
                            allocation="auto", max_dense=0.5)
    by_name = {r.name: r for r in report.layers}
    assert by_name["a"].sparsity == 0.0 and by_name["a"].pattern is None and "dense" in by_name["a"].info
    assert torch.equal(model.a.weight, dense_a)  # untouched, even by an updating method
    groups = model.b.weight.reshape(16, 4, 4)
    assert by_name["b"].sparsity == 0.5 and bool(((groups == 0).sum(-1) == 2).all())  # exactly 2:4
    assert by_name["a"].info["predicted"] > 10 * by_name["b"].info["predicted"]
    # below one layer's share nothing fits: every layer takes the pattern
    report = ditprune.prune(_toy_pair(), batches, method=method, pattern="2:4", targets=["^a$", "^b$"],
                            allocation="auto", max_dense=0.49)
    assert [r.sparsity for r in report.layers] == [0.5, 0.5]


def test_nm_auto_on_a_tiny_flux_keeps_at_most_max_dense_and_the_pattern_elsewhere():
    import ditprune
    from ditprune.models.tiny import tiny_batches, tiny_model

    model = tiny_model("flux")
    dense = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    report = ditprune.prune(model, tiny_batches(model), method="wanda", pattern="2:4", allocation="auto",
                            max_dense=0.1)
    kept = [r for r in report.layers if r.sparsity == 0.0]
    total = sum(r.shape[0] * r.shape[1] for r in report.layers)
    assert kept and sum(r.shape[0] * r.shape[1] for r in kept) <= 0.1 * total
    for r in report.layers:
        w = model.get_submodule(r.name).weight
        if r in kept:
            assert torch.equal(w, dense[r.name]) and "dense" in r.info
        else:
            assert r.sparsity == 0.5 and bool(((w.reshape(w.shape[0], -1, 4) == 0).sum(-1) >= 2).all())
    # max_dense=0: nothing to choose, the pattern everywhere, as uniform (no allocation pass)
    a, b = tiny_model("flux"), tiny_model("flux")
    ditprune.prune(a, tiny_batches(a), method="wanda", pattern="2:4", allocation="auto")
    ditprune.prune(b, tiny_batches(b), method="wanda", pattern="2:4")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_sparsegpt_curve_is_what_sparsegpt_loses_and_convex():
    from ditprune.allocation import sparsegpt_curve
    from ditprune.sparsegpt import obs_prune

    torch.manual_seed(0)
    x = torch.randn(4000, 8)
    x = torch.cat([x, x + 0.05 * torch.randn(4000, 8)], 1).double()  # twins: a reconstruction recovers much
    h = x.T @ x / 4000
    w = torch.randn(6, 16, dtype=torch.float64)
    curve = sparsegpt_curve(w, h, 0.5, 0.9, points=4)
    assert curve[0] == 0 and bool((curve >= 0).all() and (curve <= 1).all())
    slopes = curve.diff()
    assert bool((slopes.diff() >= -1e-9).all())  # convex
    # at a measured point the curve is what SparseGPT itself loses (or lower: the convex hull)
    new, keep, _ = obs_prune(w, h, 0.7, dtype=torch.float64)
    d = w - new * keep
    lost = float(((d @ h) * d).sum() / ((w @ h) * w).sum())
    assert float(curve[70]) <= lost * (1 + 1e-4) and float(curve[70]) > 0.5 * lost  # float32 vs float64
    assert float(curve[50]) < float(removal_curve(w, h.diagonal())[50])  # below Wanda's: the twins take over


def test_a_layer_with_fewer_tokens_than_inputs_gets_the_loss_sparsegpt_shows_on_unseen_tokens():
    from ditprune.allocating import layer_curve
    from ditprune.allocation import sparsegpt_curve
    from ditprune.sparsegpt import obs_prune
    from ditprune.stats import InputStats

    torch.manual_seed(0)
    mix = torch.randn(96, 96) / 96**0.5
    st = InputStats("adaLN", 96, need_gram=True)
    st.update(torch.randn(60, 96) @ mix)  # fewer tokens than inputs, as FLUX.1-dev's adaLN layers see
    assert st.few_tokens
    w = torch.randn(40, 96)
    unseen = torch.randn(20000, 96) @ mix
    h_unseen = unseen.T @ unseen / 20000
    fit, _ = st.holdout()
    new, keep, _ = obs_prune(w, fit, 0.6)
    d = w - new * keep
    truth = float(((d @ h_unseen) * d).sum() / ((w @ h_unseen) * w).sum())  # the fit's loss on unseen tokens
    held = float(layer_curve(w, st, "sparsegpt", 0.4, 0.8)[60])
    self_judged = float(sparsegpt_curve(w, st.gram, 0.4, 0.8)[60])
    assert self_judged < 0.3 * truth  # judged on its own tokens the fit looks nearly free
    assert 0.5 * truth < held < 2 * truth
    few = InputStats("one token", 96, need_gram=True)
    few.update(torch.randn(1, 96))  # nothing to hold out: Wanda's curve
    assert torch.equal(layer_curve(w, few, "sparsegpt", 0.4, 0.8), removal_curve(w, few.energy))


def test_row_groups_at_their_own_sparsities_are_separate_sparsegpt_calls():
    from ditprune.sparsegpt import obs_prune

    torch.manual_seed(0)
    x = torch.randn(500, 300, dtype=torch.float64) @ torch.randn(300, 300, dtype=torch.float64)
    h = x.T @ x / 500
    w = torch.randn(3, 300, dtype=torch.float64)
    rows = w.repeat(3, 1)
    new, keep, _ = obs_prune(rows, h, [0.3, 0.55, 0.8], dtype=torch.float64)  # 3 blocks of columns, uneven counts
    for g, s in enumerate([0.3, 0.55, 0.8]):
        one, one_keep, _ = obs_prune(w, h, s, dtype=torch.float64)
        assert torch.equal(keep[3 * g : 3 * g + 3], one_keep)
        assert int((~one_keep).sum()) == round(900 * s)
        torch.testing.assert_close(new[3 * g : 3 * g + 3], one, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="equal groups"):
        obs_prune(w, h, [0.5, 0.6])


def test_block_by_block_allocation_pass_allocates_as_the_whole_model_pass():
    import ditprune
    from ditprune.models.tiny import tiny_batches, tiny_model

    targets = {}
    for block_sequential in (True, False):
        model = tiny_model("flux")
        report = ditprune.prune(model, tiny_batches(model), method="sparsegpt", sparsity=0.7, allocation="auto",
                                block_sequential=block_sequential)
        targets[block_sequential] = {r.name: r.target for r in report.layers}
    assert targets[True] == targets[False]
    assert len(set(targets[True].values())) > 1


@pytest.mark.parametrize("block_sequential", [True, False])
def test_batches_limits_the_allocation_pass_to_the_batches_picked(block_sequential):
    """``batches=2`` allocates as a run whose whole calibration is the 2 batches :func:`~ditprune.allocating.pick_batches` picks, and not as the
    pass over all 4 (the prune itself still reads all of them)."""
    import ditprune
    from ditprune.models.tiny import tiny_batches, tiny_model

    def targets(calibration, options):
        model = tiny_model("flux")
        report = ditprune.prune(model, calibration, method="sparsegpt", sparsity=0.7, allocation="auto",
                                allocation_options={"gains": "none", **options}, block_sequential=block_sequential)
        return {r.name: r.target for r in report.layers}

    batches = tiny_batches(tiny_model("flux"))
    assert len(batches) == 4
    chosen = [batches[i] for i in pick_batches(batches, 2)]
    assert len(chosen) == 2
    two = targets(batches, {"batches": 2})
    assert two == targets(chosen, {})
    assert two != targets(batches, {})


def test_pick_batches_takes_the_middle_of_equal_timestep_strata_whatever_the_order():
    """8 batches at timesteps 1.0, 0.9, ..., 0.3: k = 4 strata of 2 in ascending timestep order,
    (0.3, 0.4), ..., (0.9, 1.0), and the middle one of each (index 1 of 2): 0.4, 0.6, 0.8, 1.0, in
    the calibration's order; a shuffled calibration gives the same batches; k >= 8 all of them."""
    batches = [{"timestep": torch.full((2,), 1.0 - 0.1 * i), "x": torch.randn(3, generator=torch.Generator().manual_seed(i))}
               for i in range(8)]
    picked = [batches[i] for i in pick_batches(batches, 4)]
    assert [round(float(b["timestep"][0]), 6) for b in picked] == [1.0, 0.8, 0.6, 0.4]
    shuffled = [batches[i] for i in (5, 2, 7, 0, 3, 6, 1, 4)]
    assert {id(shuffled[i]) for i in pick_batches(shuffled, 4)} == {id(b) for b in picked}
    assert pick_batches(batches, 8) == pick_batches(batches, 9) == list(range(8))


def test_a_method_that_updates_weights_allocates_by_sparsegpt_curves(monkeypatch):
    import ditprune
    import ditprune.allocation as A
    from ditprune.models.tiny import tiny_batches, tiny_model

    calls = []
    real = A.sparsegpt_curve
    monkeypatch.setattr(A, "sparsegpt_curve", lambda *a, **k: calls.append(1) or real(*a, **k))
    for method, options, expected in (("wanda", {}, 0), ("dit", {"refine": 0}, 0), ("dit", {"reconstruct": True}, 1),
                                      ("sparsegpt", {}, 1), ("sparsegpt", {"allocation_options": {"curve": "wanda"}}, 0)):
        calls.clear()
        model = tiny_model("flux")
        report = ditprune.prune(model, tiny_batches(model), method=method, sparsity=0.7, allocation="auto", **options)
        assert (len(calls) == len(report.layers)) if expected else not calls, (method, options)


@torch.no_grad()
@pytest.mark.parametrize("family", ["dit", "flux"])
def test_block_gains_are_each_streams_reach_shared_by_its_layers_changes(family):
    """output_gains with a block's layers measured together, recomputed by hand: per output
    stream of the block, the model's output change with that stream pruned (all the block's
    layers) and the rest dense, shared by each layer's change of that stream (on the block's
    dense inputs) over the whole block's."""
    from torch import nn
    from torch.nn.utils import parametrize

    from ditprune import saliency
    from ditprune.gains import gain_groups, output_gains
    from ditprune.granularity import row_mask
    from ditprune.models import blocks
    from ditprune.models.tiny import tiny_batches, tiny_model

    model = tiny_model(family).eval()
    batches = tiny_batches(model, n=2)
    first = [b for b, _ in blocks(model)][:2]
    names = [n for b in first for n in
             [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith(b + ".")
              and ".emb." not in n][:3]]
    for n in names:  # the prune's layers carry torch.ao parametrizations; output_gains edits their original
        parametrize.register_parametrization(model.get_submodule(n), "weight", nn.Identity())
    rng = torch.Generator().manual_seed(0)
    energies = {n: torch.rand(model.get_submodule(n).in_features, generator=rng) + 0.1 for n in names}
    removed = {n: 0.1 + 0.05 * i for i, n in enumerate(names)}
    keep_of = lambda sc: row_mask(sc, 0.5)  # noqa: E731
    groups = gain_groups(model, names, "blocks")
    assert [(block, ls) for block, ls in groups] == [(dict(blocks(model))[b], names[3 * i : 3 * i + 3])
                                                    for i, b in enumerate(first)]
    gains = output_gains(model, groups, energies, removed, keep_of, batches)

    def run(hook_block=None, hook=None):
        h = hook_block.register_forward_hook(hook) if hook_block is not None else None
        try:
            return [model(**b).sample.float() for b in batches]
        finally:
            if h is not None:
                h.remove()

    def weight(n):
        return model.get_submodule(n).parametrizations.weight.original

    def streams(out):
        return list(out) if isinstance(out, tuple) else [out]

    dense = run()
    norm = sum(float(d.pow(2).sum()) for d in dense)
    for block, layer_names in groups:
        inputs = []
        hook = block.register_forward_pre_hook(lambda m, a, k: inputs.append((a, k)), with_kwargs=True)
        run()
        hook.remove()
        saved = {n: weight(n).detach().clone() for n in layer_names}
        masks = {n: row_mask(saliency.wanda(saved[n], energies[n]), 0.5) for n in layer_names}

        def outputs(which):  # the block's output on each captured (dense) input, ``which`` pruned
            for n in which:
                weight(n).data.mul_(masks[n])
            outs = [block(*a, **k) for a, k in inputs]
            for n in which:
                weight(n).data.copy_(saved[n])
            return outs

        ref, whole = outputs([]), outputs(layer_names)
        n_streams = len(streams(ref[0]))
        assert n_streams == (2 if family == "flux" else 1)

        def change(outs, s):
            return sum(float((streams(o)[s] - streams(r)[s]).pow(2).sum()) for o, r in zip(outs, ref))

        reach = []
        for s in range(n_streams):
            calls = iter(range(len(inputs)))

            def swap(m, a, out, s=s):
                i = next(calls)
                if n_streams == 1:
                    return whole[i]
                mixed = list(ref[i])
                mixed[s] = streams(whole[i])[s]
                return tuple(mixed)

            reach.append(sum(float((o - d).pow(2).sum()) for o, d in zip(run(block, swap), dense)) / norm)
        for n in layer_names:
            own = outputs([n])
            expected = sum(reach[s] * change(own, s) / change(whole, s) for s in range(n_streams)) / removed[n]
            assert gains[n] == pytest.approx(expected, rel=1e-4)
    # every layer alone: the model's output change with that layer pruned
    alone = output_gains(model, gain_groups(model, names, "layers"), energies, removed, keep_of, batches)
    n = names[0]
    saved = weight(n).detach().clone()
    weight(n).data.mul_(row_mask(saliency.wanda(saved, energies[n]), 0.5))
    change = sum(float((o - d).pow(2).sum()) for o, d in zip(run(), dense)) / norm
    weight(n).data.copy_(saved)
    assert alone[n] == pytest.approx(change / removed[n], rel=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("per", ["layers", "blocks"])
@pytest.mark.parametrize("family", ["dit", "flux"])
def test_gains_start_at_the_measured_block_bit_for_bit(family, per):
    """The forwards after the dense one skip the blocks before the measured one (they return
    the dense forward's outputs): the same gains to the bit as running every block, and each
    block runs only for the layers in it or before it (counted on a Linear inside each block)."""
    from torch import nn
    from torch.nn.utils import parametrize

    from ditprune.gains import gain_groups, output_gains
    from ditprune.granularity import row_mask
    from ditprune.models import blocks
    from ditprune.models.tiny import tiny_batches, tiny_model

    model = tiny_model(family).eval()
    batches = tiny_batches(model, n=2)
    found = blocks(model)
    linears = {b: [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith(b + ".")]
               for b, _ in found}
    names = [n for b, _ in found for n in linears[b][:2]]  # two layers of every block
    for n in names:
        parametrize.register_parametrization(model.get_submodule(n), "weight", nn.Identity())
    rng = torch.Generator().manual_seed(0)
    energies = {n: torch.rand(model.get_submodule(n).in_features, generator=rng) + 0.1 for n in names}
    removed = {n: 0.2 for n in names}
    keep_of = lambda sc: row_mask(sc, 0.5)  # noqa: E731
    runs = {b: 0 for b, _ in found}
    probes = {b: model.get_submodule(ls[-1]) for b, ls in linears.items()}  # a Linear the measured layers are not
    hooks = [probes[b].register_forward_hook(lambda *a, b=b: runs.__setitem__(b, runs[b] + 1)) for b in runs]
    groups = gain_groups(model, names, per)
    resumed = output_gains(model, groups, energies, removed, keep_of, batches)
    counted = dict(runs)
    every = output_gains(model, groups, energies, removed, keep_of, batches, skip=False)
    for h in hooks:
        h.remove()
    assert resumed == every  # bit for bit
    assert all(g > 0 for g in resumed.values())
    streams = 2 if family == "flux" else 1
    for j, (b, _) in enumerate(found):
        if per == "layers":  # the dense forward, then one per measured layer in this block or an earlier one
            assert counted[b] == len(batches) * (1 + 2 * (j + 1)), b
        else:  # the dense forward; per earlier block one per stream; its own: layers + 2 alone, then 1 per stream
            assert counted[b] == len(batches) * (1 + streams * j + (2 + 2) + streams), b


def test_skipping_blocks_puts_an_instance_forward_back():
    """A block whose forward is an instance attribute (as an offload hook installs) has it back
    after the gains skipped it; one without gets its class's forward back."""
    from ditprune.gains import _Resume
    from ditprune.models import blocks
    from ditprune.models.tiny import tiny_batches, tiny_model

    model = tiny_model("dit").eval()
    first, second = [m for _, m in blocks(model)][:2]
    wrapped = first.forward
    first.forward = lambda *a, **k: wrapped(*a, **k)  # an instance-level wrapper
    mine = first.forward
    resume = _Resume(model, 1)
    with torch.no_grad(), resume.recording():
        model(**tiny_batches(model, n=1)[0])
    with resume.skipping(2):
        assert first.forward is not mine and "forward" in second.__dict__
    assert first.forward is mine and "forward" not in second.__dict__


def test_the_gains_resume_bench_runs_and_agrees(capsys, monkeypatch):
    """benchmarks/gains_resume.py on a small FLUX layout: fewer block forwards, the same gains."""
    import runpy
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "gains_resume.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--double", "1", "--single", "2", "--heads", "2", "--head-dim", "16",
                                      "--image-tokens", "16", "--text-tokens", "8"])
    runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    whole = int(out.split("| every block |")[1].split("|")[1])
    resumed = int(out.split("| from the measured block (shipped) |")[1].split("|")[1])
    # 14 + 2 x 6 Linears; whole: 1 + 26 forwards of 3 blocks; resumed: the double block's 14 run 3, the singles' 6 run 2 and 1
    assert (whole, resumed) == (3 * 27, 3 + 14 * 3 + 6 * 2 + 6 * 1)
    assert "gains equal bit for bit: True" in out


def test_gram_removed_by_hand():
    """Wanda's mask at 1/3 of 3 inputs drops each row's smallest |W_ij| sqrt(a_j), a = diag H; the
    removed energy is tr(D H D^T) / tr(W H W^T) with H's off-diagonal terms, not its diagonal."""
    from ditprune.allocation import gram_removed

    w = torch.tensor([[1.0, 2.0, 3.0], [-3.0, 1.0, 1.0]])
    h = torch.tensor([[1.0, 0.5, 0.0], [0.5, 1.0, 0.0], [0.0, 0.0, 4.0]])
    # scores |w| sqrt(diag h) = |w| * [1, 1, 2]: row 0 [1, 2, 6] drops input 0; row 1 [3, 1, 2] drops input 1
    d = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    total = sum(float(r @ h @ r) for r in w)  # 1 + 4 + 36 + 2*0.5*2 = 43; 9 + 1 + 4 - 2*0.5*3 = 11
    assert total == pytest.approx(54.0)
    assert gram_removed(w, h, h.diagonal(), 1 / 3) == pytest.approx(float((d @ h * d).sum()) / total)  # 2 / 54
    assert gram_removed(w, h, h.diagonal(), 1 / 3) == pytest.approx(2 / 54)


def test_gains_are_measured_on_batches_spread_over_the_timesteps_and_on_the_curves_footing(monkeypatch):
    """``gain_batches=2`` of 4 calibration batches measures the gains on the 2 that
    :func:`pick_batches` takes across the timesteps, not the first 2 (a sampler's first steps).
    A gain's denominator is Wanda's removed energy on the same footing as the curve it
    multiplies: the diagonal's with Wanda's curve, the Gram matrix's (:func:`gram_removed`) with
    SparseGPT's."""
    import ditprune
    import ditprune.allocating as allocating
    from ditprune.allocation import gram_removed, removal_curve, value_at
    from ditprune.calibration import run_whole_model
    from ditprune.models.tiny import tiny_batches, tiny_model
    from ditprune.stats import observe

    seen = {}
    real = allocating.output_gains

    def spy(model, groups, energies, removed, keep_of, batches, sync=False):
        seen.update(batches=batches, removed=dict(removed), energies=energies,
                    weights={n: model.get_submodule(n).weight.detach().clone() for n in removed})
        return real(model, groups, energies, removed, keep_of, batches, sync)

    monkeypatch.setattr(allocating, "output_gains", spy)
    batches = tiny_batches(tiny_model("dit"))
    picked = pick_batches(batches, 2)
    assert picked != [0, 1]
    ditprune.prune(tiny_model("dit"), batches, method="wanda", sparsity=0.7, allocation="auto",
                   allocation_options={"gain_batches": 2})
    assert [id(b) for b in seen["batches"]] == [id(batches[i]) for i in picked]
    diagonal = {n: value_at(removal_curve(seen["weights"][n], seen["energies"][n]), 0.7) for n in seen["removed"]}
    assert seen["removed"] == pytest.approx(diagonal)

    ditprune.prune(tiny_model("dit"), batches, method="sparsegpt", sparsity=0.7, allocation="auto",
                   allocation_options={"gain_batches": 2})
    dense = tiny_model("dit")
    with observe({f"{n}.weight": dense.get_submodule(n) for n in seen["removed"]}, True) as stats:
        run_whole_model(dense, batches, False, None)
        on_gram = {n: gram_removed(dense.get_submodule(n).weight.detach(), stats[f"{n}.weight"].gram,
                                   stats[f"{n}.weight"].energy, 0.7) for n in seen["removed"]}
    assert seen["removed"] == pytest.approx(on_gram, rel=1e-5)
    assert on_gram != pytest.approx(diagonal, rel=0.05)  # the two footings differ on these layers


def test_gained_curve_by_hand_and_convex():
    """g log-linear through (0.5, 1) and (0.9, 2) times e(s) = s^2: at 0.7, g = sqrt(2); with
    g_lo = 0, g linear from 0; a product that is not convex gets its lower convex hull."""
    from ditprune.allocation import gained_curve

    grid = torch.linspace(0, 1, 101, dtype=torch.float64)
    c = gained_curve(grid**2, 0.5, 1.0, 0.9, 2.0)
    assert float(c[50]) == pytest.approx(0.25) and float(c[90]) == pytest.approx(0.81 * 2)
    assert float(c[70]) == pytest.approx(0.49 * math.sqrt(2))
    assert float(c[100]) > 1  # not a fraction any more: not clipped
    assert float(gained_curve(grid**2, 0.5, 0.0, 0.9, 2.0)[70]) == pytest.approx(0.49 * 1.0)
    falling = gained_curve(grid, 0.5, 10.0, 0.9, 0.1)  # s * g(s), g falling 100x: not convex
    g = 10.0 * torch.exp((grid - 0.5) / 0.4 * math.log(0.01))
    assert (falling <= grid * g + 1e-12).all()
    steps = falling.diff()
    assert (steps.diff() >= -1e-12).all()  # convex


def test_gains_at_both_ends_of_the_range(monkeypatch):
    """``gain_sparsities=2``: the gains are measured twice, with Wanda's mask at s - r and at
    s + r (each with its own denominator), and the allocation differs from the one gain at s."""
    import ditprune
    import ditprune.allocating as allocating
    from ditprune.allocation import removal_curve, value_at
    from ditprune.models.tiny import tiny_batches, tiny_model

    calls = []
    real = allocating.output_gains

    def spy(model, groups, energies, removed, keep_of, batches, sync=False):
        w = {n: model.get_submodule(n).weight.detach().clone() for n in removed}
        calls.append({"removed": dict(removed),
                      "kept": {n: float(keep_of(w[n].abs() + 1).float().mean()) for n in removed},
                      "diag": {n: [value_at(removal_curve(w[n], energies[n]), x) for x in (0.5, 0.9)] for n in removed}})
        return real(model, groups, energies, removed, keep_of, batches, sync)

    monkeypatch.setattr(allocating, "output_gains", spy)
    batches = tiny_batches(tiny_model("dit"))
    targets = {}
    for points in (1, 2):
        calls.clear()
        report = ditprune.prune(tiny_model("dit"), batches, method="wanda", sparsity=0.7, allocation="auto",
                                allocation_options={"gain_sparsities": points})
        targets[points] = {r.name: r.target for r in report.layers}
        assert len(calls) == points
    for call, x, i in ((calls[0], 0.5, 0), (calls[1], 0.9, 1)):
        for n, kept in call["kept"].items():
            assert kept == pytest.approx(1 - x, abs=1 / 16)  # Wanda's mask at that end
            assert call["removed"][n] == pytest.approx(call["diag"][n][i])  # its own denominator
    assert targets[1] != targets[2]
