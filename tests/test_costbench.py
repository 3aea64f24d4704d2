"""The cost benchmark's code paths on small shapes (the real run is `ditprune bench --cost`)."""

import pytest
import torch

from ditprune import costbench
from ditprune.costbench import METHODS, block_costs, extrapolate, layer_costs, memory_account, render, synthetic_stats

SMALL = {"dim": 64, "heads": 2, "head_dim": 32, "text_tokens": 8}


def test_synthetic_statistics_plenty_and_few():
    plenty = synthetic_stats(32, None)
    assert not plenty.few_tokens and plenty.count == 1_000_000
    torch.testing.assert_close(torch.diagonal(plenty.gram), plenty.energy)
    few = synthetic_stats(64, 100)
    assert few.few_tokens and few.count == 100 and few.holdout() is not None


def test_layer_costs_rows_and_ratios():
    rows = layer_costs([("a", 48, 32, None), ("b", 64, 32, 40)], METHODS[:3], repeats=1, progress=False)
    assert [(r["shape"], r["method"]) for r in rows] == [(s, m) for s in "ab" for m in ("wanda", "sparsegpt", "dit")]
    by = {(r["shape"], r["method"]): r for r in rows}
    for r in rows:  # each ratio divides by the baseline of the same shape
        assert r["seconds"] > 0
        base = by[(r["shape"], "sparsegpt")]["seconds"]
        assert r["x_sparsegpt"] == pytest.approx(r["seconds"] / base)


def test_blocks_extrapolation_and_memory_account():
    rows = block_costs(METHODS[:2], images=1, image_tokens=16, calls=2, progress=False, dims=SMALL)
    assert {(r["block"], r["method"]) for r in rows} == {(b, m) for b in ("double", "single") for m in ("wanda", "sparsegpt")}
    sgpt = {r["block"]: r for r in rows if r["method"] == "sparsegpt"}
    assert sgpt["double"]["stats_mb"] < sgpt["double"]["stats_unshared_mb"]  # q/k/v share their statistics
    [whole] = [w for w in extrapolate(rows) if w["method"] == "sparsegpt"]
    expected = (19 * sgpt["double"]["mask_seconds"] + 38 * sgpt["single"]["mask_seconds"]) / 3600
    assert whole["transformer_mask_hours"] == pytest.approx(expected)
    memory = memory_account(rows, [{"method": "sparsegpt", "peak_mb": 1024.0}])
    assert memory["largest_layer_workspace_gb"] == pytest.approx(1.0)  # MiB -> GiB
    text = render([], rows, extrapolate(rows), memory, "test")
    assert "double" in text and "total on the GPU" in text
