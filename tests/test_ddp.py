"""The callback under Lightning's ``ddp`` strategy, 2 real CPU processes on gloo: statistics are
summed over the ranks, so both ranks hold the same masks (and, after training, the same
weights), equal to one process pruning on the union of the two shards."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ditprune
from ditprune.reference import load

WORKER = Path(__file__).parent / "ddp_worker.py"


def _run(tmp_path, method):
    done = subprocess.run([sys.executable, str(WORKER), str(tmp_path), method], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "find_unused_parameters" not in done.stderr
    return [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1)]


def _group(d, prefix):
    return {k[len(prefix):]: v for k, v in d.items() if k.startswith(prefix)}


def _batches(d):
    n = len({k.split("/")[0] for k in d if k.startswith("batch")})
    return [_group(d, f"batch{i}/") for i in range(n)]


@pytest.mark.parametrize("method", ["wanda", "dit"])
def test_ddp_ranks_share_masks_and_weights(tmp_path, method):
    r0, r1 = _run(tmp_path, method)
    masks0, masks1 = _group(r0, "mask/"), _group(r1, "mask/")
    assert len(masks0) == 28 and masks0.keys() == masks1.keys()
    for k in masks0:
        assert torch.equal(masks0[k], masks1[k]), k
        assert masks0[k].float().mean().item() == 0.5, k  # exact sparsity
    w0, w1 = _group(r0, "weight/"), _group(r1, "weight/")
    assert w0.keys() == w1.keys()
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    for k, m in masks0.items():  # the pruned zeros survived training
        assert (w0[k][m == 0] == 0).all(), k
    b0, b1 = _batches(r0), _batches(r1)
    assert len(b0) == len(b1) == 2 and not torch.equal(b0[0]["hidden_states"], b1[0]["hidden_states"])  # own shards
    if method == "wanda":
        # one process on the union of both shards: the same masks (the sums are the same sums)
        model = load("dit")
        ditprune.prune(model, b0 + b1, method="wanda", sparsity=0.5)
        for k, m in masks0.items():
            assert torch.equal(model.get_parameter(k) != 0, m.bool()), k
