"""Statistics: shared by layers that read one tensor, blind to padding, held out when tokens are
few, weighted by timestep on request; and the few-token safeguard at model level."""

import copy
import math

import pytest
import torch

import ditprune
import ditprune.stats as S
from ditprune.calibration import timestep_weights
from ditprune.models.tiny import tiny_batches, tiny_model
from ditprune.pruning import PrunePlan
from ditprune.stats import InputStats, token_weight


def _stats(model, batches, method="dit"):
    """Statistics of every target after one observe pass (whole-model mode)."""
    plan = PrunePlan(model, method, 0.5, block_sequential=False)
    plan.attach()
    with plan.sparsifier.observe(None, plan.scopes, plan.text_layers) as stats:
        with torch.no_grad():
            for b in batches:
                model(**b)
    plan.restore()
    return stats


def test_layers_reading_one_tensor_share_one_statistics_object():
    model = tiny_model("flux")
    stats = _stats(model, tiny_batches(model))
    qkv = [stats[f"transformer_blocks.0.attn.{n}.weight"] for n in ("to_q", "to_k", "to_v")]
    assert qkv[0] is qkv[1] is qkv[2]
    single = [stats[f"single_transformer_blocks.0.{n}.weight"] for n in ("attn.to_q", "attn.to_k", "proj_mlp")]
    assert single[0] is single[1] is single[2]  # FLUX single blocks: q/k/v and the MLP read one tensor
    assert stats["transformer_blocks.0.attn.add_q_proj.weight"] is not qkv[0]  # the text stream is another
    assert stats["transformer_blocks.0.attn.to_out.0.weight"] is not qkv[0]


def test_sharing_shows_in_stats_mb_on_a_flux_block():
    model = tiny_model("flux")
    batches = tiny_batches(model, n=40, batch=4)  # enough tokens: no held-out statistics
    report = ditprune.prune(model, batches, method="sparsegpt", targets=[r"^transformer_blocks\.0\.(attn|ff\.)"],
                            block_sequential=False)
    size = {r.name: model.get_submodule(r.name).in_features for r in report.layers}
    one = lambda n: (size[n] ** 2 + size[n]) * 4  # noqa: E731  (Gram + energy, float32)
    shared = {"transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v", "transformer_blocks.0.attn.add_k_proj",
              "transformer_blocks.0.attn.add_v_proj"}  # they read the tensor that to_q / add_q_proj read
    assert shared < set(size)
    assert report.peak_stats_bytes == sum(one(n) for n in size if n not in shared)
    assert report.peak_stats_bytes < sum(one(n) for n in size)


def test_a_shared_input_that_stops_being_shared_is_an_error():
    class Flip(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            return self.a(x) + self.b(x if self.calls == 1 else x * 2)

    model = Flip()
    batches = [{"x": torch.randn(4, 8)} for _ in range(2)]
    with pytest.raises(RuntimeError, match="data flow changes"):
        ditprune.prune(model, batches, method="wanda", targets=["a", "b"])


@pytest.mark.parametrize("family", ["pixart", "sana"])
def test_padding_does_not_reach_the_statistics(family):
    """The same prompts, padded (garbage in the padded tokens, masked out) or not: the same statistics."""
    model = tiny_model(family)
    g = torch.Generator().manual_seed(0)
    batches = tiny_batches(model, n=3)
    padded = []
    for b in batches:
        text = b["encoder_hidden_states"]
        junk = torch.randn(text.shape[0], 5, text.shape[2], generator=g) * 7
        mask = torch.cat([torch.ones(text.shape[:2]), torch.zeros(text.shape[0], 5)], 1)
        padded.append({**b, "encoder_hidden_states": torch.cat([text, junk], 1), "encoder_attention_mask": mask})
    clean = _stats(model, batches)
    dirty = _stats(model, padded)
    kv = [n for n in clean if "attn2.to_k" in n or "attn2.to_v" in n]
    assert kv
    for name in clean:
        assert clean[name].count == dirty[name].count, name
        torch.testing.assert_close(dirty[name].gram, clean[name].gram, rtol=1e-4, atol=1e-5)
    ignored = _stats(model, [{k: v for k, v in b.items() if k != "encoder_attention_mask"} for b in padded])
    assert ignored[kv[0]].count > clean[kv[0]].count  # without the mask the padding is counted


def test_held_out_tokens_depend_on_content_not_order_or_batching():
    """Which tokens are held out is a function of each token alone: the same tokens, shuffled and
    cut into other batches (as shards of several processes would be), give the same split."""
    torch.manual_seed(0)
    x = torch.randn(40, 8)
    h = S.held_out(x)
    assert 4 <= int(h.sum()) <= 20
    expected_fit = x[~h].T @ x[~h] / int((~h).sum())
    expected_held = x[h].T @ x[h] / int(h.sum())
    whole, parts = InputStats("x", 8, need_gram=True), InputStats("x", 8, need_gram=True)
    whole.update(x)
    for part in x[torch.randperm(40)].split([3, 17, 20]):
        parts.update(part)
    for s in (whole, parts):
        assert s.few_tokens and s.held_count == int(h.sum())
        fit, held = s.holdout()
        torch.testing.assert_close(fit, expected_fit)
        torch.testing.assert_close(held, expected_held)
    s = whole
    s.update(torch.randn(200, 8))
    assert not s.few_tokens and s.holdout() is None and s.held_sum is None  # 240 >= 16 x 8
    share = float(S.held_out(torch.randn(20000, 64)).float().mean())
    assert 0.23 < share < 0.27  # about one token in HOLDOUT_EVERY


def test_no_split_when_nothing_is_held_out_or_nothing_is_left():
    s = InputStats("x", 8, need_gram=True)
    s.update(torch.zeros(5, 8))  # five equal tokens hash alike: all held out or none
    assert s.few_tokens and s.holdout() is None


def test_token_weights_scale_every_statistic():
    x1, x2 = torch.randn(5, 4), torch.randn(7, 4)
    s = InputStats("x", 4, need_gram=True)
    with token_weight(1.2):
        s.update(x1)
    with token_weight(0.8):
        s.update(x2)
    expected = (1.2 * x1.T @ x1 + 0.8 * x2.T @ x2) / (1.2 * 5 + 0.8 * 7)
    torch.testing.assert_close(s.gram, expected)
    assert s.count == 12


def test_log_decrease_weights_by_timestep():
    batches = [{"timestep": torch.tensor([t, t])} for t in (1.0, 0.75, 0.5, 0.25, 1.0)]
    w = timestep_weights(batches, "log_decrease")
    K = 4
    assert w == pytest.approx([1.2, 1.2 - 0.4 * math.log(2) / math.log(K), 1.2 - 0.4 * math.log(3) / math.log(K), 0.8,
                               1.2])
    with pytest.raises(ValueError, match="needs a 'timestep'"):
        timestep_weights([{"x": 1}], "log_decrease")


def test_few_tokens_dit_is_not_worse_than_wanda_on_other_samples():
    """The reference FLUX model calibrated on 1 prompt x 2 steps: its adaLN layers see 4 tokens for
    64 inputs. Scored on held-out digits with other noise, dit is no worse than Wanda."""
    from ditprune.evaluation.harness import Evaluator, reference_calibration
    from ditprune.reference import load

    dense = load("flux")
    calibration = reference_calibration(dense, n_prompts=1, steps=2)
    evaluator = Evaluator(dense, n_samples=4, steps=2)
    errors = {}
    for method in ("wanda", "dit"):
        model = copy.deepcopy(dense)
        report = ditprune.prune(model, calibration, method=method, sparsity=0.5)
        errors[method] = evaluator(model)["rel_err"]
        if method == "dit":
            adaln = [r for r in report.layers if r.name.endswith(("norm1.linear", "norm.linear"))]
            assert adaln and all(model.get_submodule(r.name).in_features > 4 for r in adaln)
            assert all("search" in r.info or "held_out_tokens" in r.info for r in adaln)
    assert errors["dit"] <= errors["wanda"]


def test_holdout_threshold_is_per_input(monkeypatch):
    monkeypatch.setattr(S, "HOLDOUT_BELOW", 2)
    s = InputStats("x", 4, need_gram=True)
    s.update(torch.randn(9, 4))
    assert not s.few_tokens
