"""Bad input: a clear error, and the model exactly as it was."""

import pytest
import torch
from torch.nn.utils import parametrize

import ditprune
from ditprune.calibration import EmptyCalibrationError
from ditprune.models.tiny import tiny_batches, tiny_model
from ditprune.stats import NonFiniteActivationError

from conftest import TwoLinear, linear_batches


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, before):
    after = model.state_dict()
    return list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before) and not any(
        parametrize.is_parametrized(m) for m in model.modules()
    ) and all(not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 2.0])
def test_sparsity_out_of_range(sparsity):
    model = TwoLinear()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        ditprune.prune(model, linear_batches(), method="wanda", sparsity=sparsity)
    assert _unchanged(model, before)


def test_pattern_that_does_not_divide_names_the_layer():
    model = TwoLinear(d_in=18)
    with pytest.raises(ValueError, match="does not divide layer 'fc1'"):
        ditprune.prune(model, linear_batches(d_in=18), method="wanda", pattern="4:8")


def test_target_regex_matching_nothing():
    with pytest.raises(ValueError, match="'attn_nope' matches no nn.Linear"):
        ditprune.prune(TwoLinear(), linear_batches(), targets=["attn_nope"])


@pytest.mark.parametrize("method", ["dit", "wanda", "sparsegpt"])
def test_empty_calibration(method):
    model = tiny_model("flux")
    before = _snapshot(model)
    with pytest.raises(EmptyCalibrationError, match="calibration is empty"):
        ditprune.prune(model, [], method=method)
    assert _unchanged(model, before)


@pytest.mark.parametrize("block_sequential", [True, False])
def test_nan_in_calibration_names_the_layer_and_restores(block_sequential):
    model = tiny_model("dit")
    batches = tiny_batches(model)
    before = _snapshot(model)
    # a NaN that reaches the second block's feed-forward output layer only
    def poison(module, args):
        return (args[0] * float("nan"),)

    handle = model.transformer_blocks[1].ff.net[2].register_forward_pre_hook(poison, prepend=True)
    with pytest.raises(NonFiniteActivationError, match="transformer_blocks.1.ff.net.2"):
        ditprune.prune(model, batches, method="sparsegpt", block_sequential=block_sequential)
    handle.remove()
    assert _unchanged(model, before)  # block 0 was already pruned and weight-updated: undone


@pytest.mark.parametrize("method", ["dit", "wanda", "magnitude", "ria", "sparsegpt"])
def test_unknown_method_and_unknown_option(method):
    with pytest.raises(ValueError, match="unknown method 'wandda'"):
        ditprune.prune(TwoLinear(), linear_batches(), method="wandda")
    model = TwoLinear()
    before = _snapshot(model)
    with pytest.raises(TypeError, match="unknown option 'bogus_option'.*options are"):
        ditprune.prune(model, linear_batches(), method=method, bogus_option=1)
    assert _unchanged(model, before)
    from ditprune.callbacks import DiTPruning

    with pytest.raises(TypeError, match="unknown option 'bogus_option'"):
        DiTPruning(method, bogus_option=1)


@pytest.mark.parametrize("targets", ["fc1", 3, ["fc1", 2]])
def test_targets_of_the_wrong_type_are_refused(targets):
    model = TwoLinear()
    before = _snapshot(model)
    with pytest.raises(TypeError, match="targets is a list of regex"):
        ditprune.prune(model, linear_batches(), method="wanda", targets=targets)
    with pytest.raises(TypeError, match="ignore is a list of regex"):
        ditprune.prune(model, linear_batches(), method="wanda", ignore=targets)
    assert _unchanged(model, before)
    from ditprune.callbacks import DiTPruning

    with pytest.raises(TypeError, match="targets is a list of regex"):
        DiTPruning("wanda", targets=targets)


def test_unsupported_dtype():
    model = TwoLinear().to(torch.float64)
    with pytest.raises(TypeError, match="float64"):
        ditprune.prune(model, linear_batches(), method="wanda")


def test_batch_that_is_not_a_dict():
    with pytest.raises(TypeError, match="must be a dict"):
        ditprune.prune(TwoLinear(), [torch.randn(2, 16)], method="wanda")


def test_a_weight_shared_by_two_linears_is_pruned_once():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(16, 16, bias=False)
            self.b = torch.nn.Linear(16, 16, bias=False)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(self.a(x))

    for method in ("wanda", "dit", "sparsegpt"):
        model = Tied()
        report = ditprune.prune(model, linear_batches(n=2), method=method, sparsity=0.5)
        assert [r.name for r in report.layers] == ["a"]
        assert (model.a.weight == 0).float().mean().item() == 0.5 and model.b.weight is model.a.weight


@pytest.mark.parametrize("option", [{"refine": 10**9}, {"max_clusters": 10**6}, {"shortlist": 0}, {"polish": -1},
                                    {"sample_rows": True}])
def test_dit_options_out_of_bounds_are_refused(option):
    with pytest.raises(ValueError, match="must be an integer in"):
        ditprune.prune(TwoLinear(), linear_batches(), method="dit", **option)
