"""Every mask keeps its counts, whatever the weights: exact zeros (a pruned model pruned again),
duplicated values, all-equal rows, dead inputs. Each method's comparison group prunes exactly
its share: per row (Wanda; N:M per group of M), per layer (magnitude, RIA, SparseGPT's blocks
summed, dit's clusters summed)."""

import pytest
import torch
from torch import nn

import ditprune
from ditprune.granularity import prune_count


class OneLinear(nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            self.lin.weight.copy_(weight)

    def forward(self, x):
        return self.lin(x)


def _layer(kind, seed, out=24, d=32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, d, generator=g)
    x = torch.randn(4, 40, d, generator=g)
    if kind == "zeros":  # half the weights already zero, as after a first prune
        w[torch.rand(out, d, generator=g) < 0.5] = 0.0
    elif kind == "duplicates":  # few distinct values: ties everywhere
        w = torch.randint(-2, 3, (out, d), generator=g).float()
    elif kind == "equal_rows":
        w[: out // 2] = 0.7
    elif kind == "dead_inputs":
        x[..., : d // 4] = 0.0
    return w, [{"x": x[i : i + 1]} for i in range(4)]


SETTINGS = [{"sparsity": 0.5}, {"sparsity": 0.3}, {"pattern": "2:4"}, {"pattern": "1:4"}]
CASES = [(m, o) for m, o in [("magnitude", {}), ("wanda", {}), ("ria", {}), ("sparsegpt", {}), ("dit", {}),
                             ("dit", {"granularity": "row"}), ("dit", {"reconstruct": True})]]


@pytest.mark.parametrize("kind", ["zeros", "duplicates", "equal_rows", "dead_inputs"])
@pytest.mark.parametrize("method,options", CASES, ids=[f"{m}{'+' + '+'.join(o) if o else ''}" for m, o in CASES])
def test_every_group_prunes_exactly_its_share(kind, method, options):
    for seed, setting in enumerate(SETTINGS):
        w, batches = _layer(kind, seed)
        model = OneLinear(w)
        report = ditprune.prune(model, batches, method=method, targets=["lin"], squash=False, **setting, **options)
        mask = model.lin.parametrizations.weight[0].mask.bool()  # True = kept
        pruned = ~mask
        out, d = w.shape
        what = f"{method} {options} {setting} on {kind}"
        if "pattern" in setting:
            n, m = map(int, setting["pattern"].split(":"))
            per_group = pruned.reshape(out, -1, m).sum(-1)
            if method == "sparsegpt" and kind == "dead_inputs":  # dead columns are zeroed, as the reference
                assert (per_group >= m - n).all(), what
            else:
                assert (per_group == m - n).all(), what
        elif method == "wanda" or options.get("granularity") == "row":
            assert (pruned.sum(1) == prune_count(d, setting["sparsity"])).all(), what
        elif method in ("dit",):  # clusters: each prunes rows x int(in x s); rows may differ inside
            assert int(pruned.sum()) == out * prune_count(d, setting["sparsity"]), what
        elif method == "sparsegpt" and kind == "dead_inputs":
            assert int(pruned.sum()) >= prune_count(out * d, setting["sparsity"]), what
            assert pruned[:, : d // 4].all(), what
        else:
            assert int(pruned.sum()) == prune_count(out * d, setting["sparsity"]), what
        # every weight the mask keeps, and only those, survives the squash (no other zero is added)
        expected_zeros = int((pruned | (model.lin.parametrizations.weight.original == 0)).sum())
        report.sparsifier.squash_mask()
        assert int((model.lin.weight == 0).sum()) == expected_zeros, what
