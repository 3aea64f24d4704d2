"""Structured pruning: the choice (against brute force), the refit (against lstsq), the surgery
(a shrunk model computes what the dense one does with those groups zeroed, in every family),
the pass (undo on failure, the record, composing with unstructured pruning) and its errors."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

import ditprune
from ditprune import structured as S
from ditprune.errors import InputError
from ditprune.models import blocks
from ditprune.models.tiny import tiny_batches, tiny_model
from ditprune.structuring import prune_structured
from ditprune.surgery import group_cols, shrink, units

FAMILIES = ("flux", "sd3", "pixart", "dit", "sana")


def _problem(seed=0, n=12, out=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(400, n, generator=g, dtype=torch.float64) @ torch.randn(n, n, generator=g, dtype=torch.float64)
    return torch.randn(out, n, generator=g, dtype=torch.float64), x.T @ x / 400


def _error(W, H, keep):
    """tr(D H_d D^T) of the refit on the kept columns, computed from lstsq (independent of refit)."""
    Hd = S.damped(H)
    L = torch.linalg.cholesky(Hd)  # tr(D Hd D^T) = ||D L||^2
    V = torch.linalg.lstsq(L[keep].T, (W @ L).T).solution.T
    full = torch.zeros_like(W)
    full[:, keep] = V
    return float(((W - full) @ L).pow(2).sum()), full


def test_refit_is_the_least_squares_solution():
    W, H = _problem()
    keep = torch.tensor([1, 0, 1, 1, 0, 1, 1, 1, 0, 1, 1, 0], dtype=torch.bool)
    _, full = _error(W, H, keep)
    torch.testing.assert_close(S.refit(W, H, keep), full[:, keep], rtol=1e-9, atol=1e-10)


def test_obs_choice_is_the_greedy_optimum_found_by_brute_force():
    W, H = _problem(1)
    groups = [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]

    def cost(removed):
        keep = torch.ones(12, dtype=torch.bool)
        for g in removed:
            keep[groups[g]] = False
        return _error(W, H, keep)[0]

    first = min(range(4), key=lambda g: cost([g]))
    assert S.select_obs([(W, H)], groups, 1) == [first]
    second = min((g for g in range(4) if g != first), key=lambda g: cost([first, g]))
    assert S.select_obs([(W, H)], groups, 2) == sorted([first, second])
    # two consumers reading the same groups: their costs add
    W2, H2 = _problem(2)
    both = min(itertools.combinations(range(4), 1), key=lambda r: cost(list(r)) + _cost2(W2, H2, groups, r))
    assert S.select_obs([(W, H), (W2, H2)], groups, 1) == list(both)


def _cost2(W, H, groups, removed):
    keep = torch.ones(12, dtype=torch.bool)
    for g in removed:
        keep[groups[g]] = False
    return _error(W, H, keep)[0]


def test_columns_gone_first_are_what_the_rest_is_chosen_after():
    W, H = _problem(3)
    groups = [[4], [5], [6], [7]]
    gone = [0, 1, 2, 3]  # another unit's columns, already removed

    def cost(g):
        keep = torch.ones(12, dtype=torch.bool)
        keep[gone + groups[g]] = False
        return _error(W, H, keep)[0]

    assert S.select_obs([(W, H)], groups, 1, gone=[gone]) == [min(range(4), key=cost)]


def test_baseline_scores_by_hand():
    W = torch.tensor([[1.0, -2.0, 0.5, 0.0], [0.0, 1.0, -1.0, 3.0]])
    a = torch.tensor([4.0, 1.0, 9.0, 0.25])
    groups = [[0, 1], [2, 3]]
    # |W| sqrt(a): [[2, 2, 1.5, 0], [0, 1, 3, 1.5]]
    assert S.activation_scores([(W, a)], groups).tolist() == [5.0, 6.0]
    P = torch.tensor([[1.0], [2.0], [0.0], [1.0]])  # producer rows 0-1 for group 0, 2-3 for group 1
    assert S.magnitude_scores([P], [W], groups).tolist() == [1 + 4 + 1 + 5, 0.25 + 1 + 9 + 1]
    assert S.select_by_score(torch.tensor([3.0, 1.0, 2.0, 1.0]), 2) == [1, 3]
    assert S.removal_count(24, 0.25) == 6 and S.removal_count(2, 0.99) == 1 and S.removal_count(3, 0.3) == 0


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_a_shrunk_block_computes_what_the_dense_one_does_with_those_groups_zeroed(family):
    model = tiny_model(family).eval()
    batch = tiny_batches(model, n=1)[0]
    found = [u for name, b in blocks(model) for u in units(b, name)]
    assert {u.kind for u in found} == ({"heads"} if family == "sana" else {"heads", "mlp"})  # Sana's MLP is a conv
    removals = [(u, [g for g in range(u.count) if g % 2 == 1][: max(1, u.count // 3)]) for u in found if u.count > 1]
    zeroed = copy.deepcopy(model)
    for unit, groups in removals:
        for c, offset in unit.consumers:
            zeroed.get_submodule(c).weight[:, group_cols(unit, offset, groups)] = 0
    before = sum(p.numel() for p in model.parameters())
    shrink(model, removals)
    expected = zeroed(**batch).sample
    torch.testing.assert_close(model(**batch).sample, expected, rtol=1e-4, atol=1e-5)
    assert sum(p.numel() for p in model.parameters()) < before
    for unit, groups in removals:
        if unit.kind == "heads":
            assert model.get_submodule(unit.name).heads == unit.count - len(groups)


@torch.no_grad()
def test_obs_loses_less_than_both_baselines_and_the_record_says_what_was_removed():
    model = tiny_model("flux").eval()
    calib, held = tiny_batches(model, n=4), tiny_batches(model, n=2, seed=7)
    dense = [model(**b).sample for b in held]
    errors = {}
    for method in ("obs", "activation", "magnitude"):
        m = copy.deepcopy(model)
        report = ditprune.prune(m, calib, method="dit" if method == "obs" else method, structure="heads+mlp",
                                sparsity=0.5)
        assert report.method == method
        out = [m(**b).sample for b in held]
        errors[method] = sum(float((o - d).pow(2).sum()) for o, d in zip(out, dense)) / sum(
            float(d.pow(2).sum()) for d in dense)
        assert report.params_after < 0.75 * report.params_before
        assert all(u["after"] == u["before"] - S.removal_count(u["before"], 0.5) for u in report.units)
        rec = m.config["_ditprune"]["structure"]
        assert rec["method"] == method and rec["kept"] == {u["name"]: u["after"] for u in report.units}
    assert errors["obs"] < errors["activation"] and errors["obs"] < errors["magnitude"]


def test_unstructured_pruning_of_what_remains():
    model = tiny_model("flux").eval()
    calib = tiny_batches(model)
    ditprune.prune(model, calib, structure="heads+mlp", sparsity=0.25)
    report = ditprune.prune(model, calib, method="wanda", sparsity=0.5)
    assert report.sparsity == pytest.approx(0.5, abs=1e-3)
    assert model.get_submodule("transformer_blocks.0.ff.net.2").in_features == 96  # 128 channels, 32 removed


def test_a_failed_structured_prune_leaves_the_model_as_it_was(monkeypatch):
    import ditprune.structuring as structuring

    model = tiny_model("flux").eval()
    calib = tiny_batches(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    real, calls = structuring._shrink_block, []

    def fail_on_third(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return real(*a, **k)

    monkeypatch.setattr(structuring, "_shrink_block", fail_on_third)
    with pytest.raises(RuntimeError, match="boom"):
        prune_structured(model, calib, "heads+mlp", 0.5)
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())
    assert model.get_submodule("single_transformer_blocks.0.attn").heads == 2
    assert model.get_submodule("single_transformer_blocks.0").mlp_hidden_dim == 128
    with torch.no_grad():
        model(**calib[0])  # still runs


@pytest.mark.parametrize("kwargs, message", [
    ({"structure": "rows"}, "structure must be one of"),
    ({"structure": "heads", "sparsity": 1.0}, r"in \[0, 1\)"),
    ({"structure": "heads", "sparsity": -0.1}, r"in \[0, 1\)"),
    ({"structure": "heads", "method": "wanda"}, "takes method one of"),
    ({"structure": "heads", "allocation": "auto"}, "does not take"),
])
def test_bad_structured_input_is_one_error_and_the_model_untouched(kwargs, message):
    model = tiny_model("flux")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InputError, match=message):
        ditprune.prune(model, tiny_batches(model), **kwargs)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_a_structure_the_family_cannot_express_is_refused_before_any_work():
    model = tiny_model("sana")
    with pytest.raises(InputError, match="no MLP hidden channels"):
        prune_structured(model, [], "heads+mlp", 0.25)


@pytest.mark.parametrize("family, fmt", [("flux", "diffusers"), ("flux", "compressed"), ("sd3", "compressed"),
                                         ("pixart", "diffusers")])
@torch.no_grad()
def test_a_structurally_pruned_model_saves_and_loads_back(tmp_path, family, fmt):
    from ditprune.export import FORMATS

    if fmt not in FORMATS:
        pytest.skip(f"no {fmt} format")
    model = tiny_model(family).eval()
    calib = tiny_batches(model)
    ditprune.prune(model, calib, structure="heads+mlp", sparsity=0.5)
    ditprune.save_transformer(model, tmp_path / "m", format=fmt)
    back = ditprune.load_transformer(tmp_path / "m")
    assert back.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())
    torch.testing.assert_close(back(**calib[0]).sample, model(**calib[0]).sample)
    assert back.config["_ditprune"]["structure"]["structure"] == "heads+mlp"


def test_flux_dev_parameters_after_a_quarter_of_heads_and_channels_by_hand():
    from ditprune.structbench import flux_dev_counts

    dense, quarter, _ = flux_dev_counts()
    d, h = 3072, 6 * 128  # 6 of 24 heads of 128
    double = 6 * h * (d + 1) + 2 * h * d + 2 * (3072 * (d + 1) + 3072 * d)  # q k v of both streams, 2 outputs; 2 MLPs
    single = 3 * h * (d + 1) + h * d + 3072 * (d + 1) + 3072 * d  # q k v, proj_out's columns; proj_mlp, proj_out
    assert dense["params"] == 11_901_408_320
    assert dense["params"] - quarter["params"] == 19 * double + 38 * single


@pytest.mark.parametrize("where", ["reference", "pipeline"])
def test_a_recipe_removes_heads_and_channels_then_prunes_what_remains_then_quantizes(where, tmp_path, capsys,
                                                                                   request):
    from ditprune.cli import main

    out = tmp_path / "out"
    keys = ["pruning.method=wanda", "pruning.structure=heads+mlp", "pruning.structure_sparsity=0.5",
            "quantization.config=int8_weight_only", "export.format=compressed", f"export.output_dir={out}"]
    if where == "reference":
        keys += ["calibration.num_prompts=1", "calibration.steps=1", "evaluation.n_samples=2", "evaluation.steps=1",
                 "evaluation.compare=[]", "recovery.steps=2", "recovery.batch_size=4"]
    else:
        pipe = request.getfixturevalue("tiny_pipeline_dir")
        keys = ["configs/dit_xl_256.yaml", f"model.source={pipe}", "model.device=cpu", "calibration.num_prompts=2",
                "calibration.steps=1", *keys]
    code = main(["-q", "prune", *keys])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    if where == "pipeline":
        assert "params kept" in captured.out
    model = ditprune.load_transformer(out / "transformer")
    record = model.config["_ditprune"]
    assert record["structure"]["structure"] == "heads+mlp" and record["quantization"] == "int8_weight_only"
    ff = [m for n, m in model.named_modules() if n.endswith("ff.net.2")]
    assert ff and all(m.in_features == m.out_features * 2 for m in ff)  # 4x width MLP, half its channels gone
    assert all(float((m.weight.dequantize() == 0).float().mean()) >= 0.5 for m in ff)


@pytest.mark.parametrize("keys, message", [
    (["pruning.structure=columns"], "structure must be one of"),
    (["pruning.structure=heads", "pruning.structure_sparsity=1.5"], r"in \[0, 1\)"),
    (["pruning.structure=heads", "quantization.config=int8_weight_only"], "export.format must be 'compressed'"),
])
def test_a_bad_structured_recipe_fails_before_any_work(tmp_path, capsys, keys, message):
    import re

    from ditprune.cli import main

    out = tmp_path / "out"
    code = main(["-q", "prune", *keys, f"export.output_dir={out}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and re.search(message, err[0]), err
    assert not out.exists() or not any(out.iterdir())


def test_a_quantized_structured_model_is_saved_compressed_or_refused(tmp_path):
    from ditprune.quantize import quantize

    model = tiny_model("flux").eval()
    calib = tiny_batches(model)
    ditprune.prune(model, calib, structure="heads+mlp", sparsity=0.5)
    quantize(model, "int8_weight_only")
    with pytest.raises(InputError, match="format='compressed'"):
        ditprune.save_transformer(model, tmp_path / "d", format="diffusers")
    assert not (tmp_path / "d").exists()
    ditprune.save_transformer(model, tmp_path / "c", format="compressed")
    back = ditprune.load_transformer(tmp_path / "c")
    with torch.no_grad():
        torch.testing.assert_close(back(**calib[0]).sample, model(**calib[0]).sample)


def test_two_processes_remove_what_one_process_removes_on_the_union(tmp_path):
    """Each rank decides from the statistics summed over both ranks: the ranks agree exactly, and
    with one process on the union of their shards (same heads and channels; weights up to the
    float32 summation order of the statistics)."""
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    worker = Path(__file__).parent / "ddp_structured_worker.py"
    done = subprocess.run([sys.executable, str(worker), str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    r0, r1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    assert r0.keys() == r1.keys() and all(torch.equal(r0[k], r1[k]) for k in r0)
    sys.path.insert(0, str(worker.parent))
    from ddp_structured_worker import shards

    a, b = shards()
    model = ditprune.load_reference("dit")
    ditprune.prune_structured(model, b + a, "heads+mlp", 0.5)
    one = model.state_dict()
    assert one.keys() == r0.keys()
    dense = ditprune.load_reference("dit").state_dict()
    assert any(one[k].shape != dense[k].shape for k in one)  # something was removed
    for k, v in one.items():
        assert v.shape == r0[k].shape, k  # the same heads and channels kept
        torch.testing.assert_close(r0[k], v, rtol=1e-3, atol=1e-4)


def test_an_attention_normalising_across_heads_is_refused():
    from diffusers.models.attention_processor import Attention
    from torch import nn

    block = nn.Module()
    block.attn = Attention(32, heads=4, kv_heads=4, dim_head=8, qk_norm="rms_norm_across_heads")
    with pytest.raises(InputError, match="across all heads"):
        units(block, "b")
