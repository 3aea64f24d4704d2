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


@pytest.mark.parametrize("slow,calls", [(1e9, 6), (0.0, 3)])
def test_layer_costs_time_every_method_every_repeat_unless_slow(monkeypatch, slow, calls):
    """With repeats=2 every method is timed twice (best of 2); only a method whose first run took
    more than ``SLOW`` seconds is timed once, however slow the others on that shape are."""
    timed = []
    monkeypatch.setattr(costbench, "SLOW", slow)
    monkeypatch.setattr(costbench, "measure", lambda fn, device, memory=True: (timed.append(fn()) or 1.0, 0))
    layer_costs([("a", 48, 32, None)], METHODS[:3], repeats=2, progress=False)
    assert len(timed) == calls


def test_blocks_extrapolation_and_memory_account():
    rows = block_costs(METHODS[:2], images=1, image_tokens=16, calls=2, progress=False, dims=SMALL)
    assert {(r["block"], r["method"]) for r in rows} == {(b, m) for b in ("double", "single") for m in ("wanda", "sparsegpt")}
    for r in rows:
        k = r["peak_by_kind_mb"]
        assert 0 < k["masks"] <= r["weights_mb"] / 8 + 1e-3  # one bit per weight (bf16: 1/16)
        assert r["extra_mb"] == pytest.approx(r["peak_mb"] - r["weights_mb"])
    sgpt = {r["block"]: r for r in rows if r["method"] == "sparsegpt"}
    kinds = sgpt["double"]["max_by_kind_mb"]
    assert kinds["statistics"] > 0 and kinds["workspace"] > 0 and kinds["backup"] == 0 and kinds["forward"] > 0
    assert sgpt["double"]["extra_mb"] <= sum(v for k, v in kinds.items() if k != "weights") + 1e-6
    [whole] = [w for w in extrapolate(rows) if w["method"] == "sparsegpt"]
    expected = (19 * sgpt["double"]["mask_seconds"] + 38 * sgpt["single"]["mask_seconds"]) / 3600
    assert whole["mask_hours"] == pytest.approx(expected)
    samples = 64 * 28
    assert whole["calibration_hours"] == pytest.approx(
        samples * (19 * sgpt["double"]["observe_seconds_per_sample"] + 38 * sgpt["single"]["observe_seconds_per_sample"]) / 3600)
    memory = memory_account(rows, method="sparsegpt")
    assert memory["masks_gb"] == pytest.approx(11.9e9 / 8 / 2**30, rel=1e-6)
    text = render([], rows, extrapolate(rows), [memory], "test")
    assert "double" in text and "total on the device" in text


def test_gram_flops_of_a_flux_dev_calibration():
    # 64 x 28 samples, 1024 image + 512 text tokens: per double block 2 d^2 (19 (img + txt) + samples),
    # per single block 2 d^2 (26 (img + txt) + samples)
    d, s = 3072, 64 * 28
    tokens = s * (1024 + 512)
    expected = 19 * 2 * d * d * (19 * tokens + s) + 38 * 2 * d * d * (26 * tokens + s)
    assert costbench.gram_flops() == pytest.approx(expected)
    assert 6e16 < expected < 8e16


@pytest.mark.parametrize("method", ["wanda", pytest.param("dit", marks=pytest.mark.slow)])  # dit: 95 s
def test_measured_peak_of_a_whole_bf16_prune_stays_within_the_account(method):
    """The account composes measured block runs into a whole model; a real block-by-block prune
    of such a model (bf16, 2 double + 2 single blocks, plenty of tokens for every layer but
    adaLN, as a real run) must not hold more than it says."""
    from ditprune import prune
    from ditprune.memory import LiveBytes

    from diffusers import FluxTransformer2DModel

    calls = 6
    rows = block_costs([m for m in METHODS if m[0] == method], images=1, image_tokens=1024, calls=calls,
                       progress=False, dims=SMALL, real={"prompts": calls, "steps": 1})
    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=32,
                                   num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=64,
                                   axes_dims_rope=(8, 12, 12)).to(torch.bfloat16).eval()
    g = torch.Generator().manual_seed(0)
    side, txt = 32, 8
    ids = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(-1, 2)
    batches = [dict(hidden_states=torch.randn(1, side * side, 16, generator=g).bfloat16(),
                    encoder_hidden_states=torch.randn(1, txt, 64, generator=g).bfloat16(),
                    pooled_projections=torch.randn(1, 64, generator=g).bfloat16(),
                    timestep=torch.rand(1, generator=g).bfloat16(),
                    img_ids=torch.cat([torch.zeros(side * side, 1), ids], 1).bfloat16(), txt_ids=torch.zeros(txt, 3).bfloat16())
               for _ in range(calls)]
    params = sum(p.numel() for p in model.parameters())
    targets = sum(m.weight.numel() for m in ditprune_targets(model))
    account = memory_account(rows, method=method, spec={"params": params, "target_params": targets, "calls": calls,
                                                       "batch": 1})
    with LiveBytes() as mem:
        mem.hold(model.parameters())
        prune(model, batches, method, 0.5, backup=False)
    # on one device the captured inputs of every call are held too (no offload)
    allowed = (account["total_gpu_gb"] + account["captured_inputs_on_cpu_gb"]) * 2**30
    assert mem.peak <= allowed, (mem.peak_by_kind, account)


def ditprune_targets(model):
    from ditprune import resolve_targets

    return list(resolve_targets(model).values())


def test_allocation_cost_counts_what_auto_runs():
    """Hand-made block rates and curve seconds: the pass is the calibration per sample of the curve's
    statistics, the gains are output_gains' forwards (per layer: one forward from the layer's block
    on per layer and batch; per block: one from the block on per block and stream, and the block
    alone layers + 2 times per batch), both after one dense forward per batch."""
    from ditprune.alloccost import SETTINGS, allocation_cost

    rate = {("wanda", "double"): 0.5, ("wanda", "single"): 0.25, ("sparsegpt", "double"): 2.0,
            ("sparsegpt", "single"): 1.0}
    blocks = [{"method": m, "block": b, "observe_seconds_per_sample": v} for (m, b), v in rate.items()]
    curves = [{"block": "double", "layers": 14, "streams": 2, "curve_seconds": {"sparsegpt": 10.0, "wanda": 1.0}},
              {"block": "single", "layers": 6, "streams": 2, "curve_seconds": {"sparsegpt": 4.0, "wanda": 0.5}}]
    prunes = [{"method": "wanda", "total_hours": 10.0}, {"method": "sparsegpt", "total_hours": 50.0}]
    probes = {"forward_s": 2.0, "base_s": 3.0, "probe_s": 5.0}
    assert len(allocation_cost(blocks, curves, prunes)) == 2 * sum(o["gains"] != "probes" for _, o in SETTINGS)
    rows = {(r["method"], r["setting"]): r for r in allocation_cost(blocks, curves, prunes, probes=probes)}
    assert len(rows) == 2 * len(SETTINGS)
    samples, batch, model = 64 * 28, 4, 19 * 0.5 + 38 * 0.25  # model forward per sample: the wanda rates
    sgpt = [rows[("sparsegpt", label)] for label, _ in SETTINGS]
    assert sgpt[0]["pass_hours"] == pytest.approx(samples * (19 * 2.0 + 38 * 1.0) / 3600)
    assert sgpt[0]["curve_hours"] == pytest.approx((19 * 10.0 + 38 * 4.0) / 3600)
    # a forward from double block i on: (19 - i) doubles and 38 singles; from single block i on: 38 - i singles
    tail = [(19 - i) * 0.5 + 38 * 0.25 for i in range(19)] + [(38 - i) * 0.25 for i in range(38)]
    per_layer = model + sum(14 * t for t in tail[:19]) + sum(6 * t for t in tail[19:])
    assert sgpt[0]["gain_hours"] == pytest.approx(4 * batch * per_layer / 3600)
    assert per_layer < 0.6 * (1 + 19 * 14 + 38 * 6) * model  # every forward whole: 0.53 of that
    local = 19 * 16 * 0.5 + 38 * 8 * 0.25  # layers + 2 forwards of the block alone, per block
    assert sgpt[1]["gain_hours"] == pytest.approx(batch * (model + 2 * sum(tail) + local) / 3600)
    assert sgpt[2]["pass_hours"] == pytest.approx(32 * batch * (19 * 2.0 + 38 * 1.0) / 3600)
    # probes: per batch the measured multiples of a forward, (3 + probes x 5) / 2 forwards, per gain batch
    probed = [(r, o) for r, (_, o) in zip(sgpt, SETTINGS) if o["gains"] == "probes"]
    assert probed
    for r, o in probed:
        times = (3.0 + o["probes"] * 5.0) / 2.0
        assert r["gain_hours"] == pytest.approx(o["gain_batches"] * batch * model * times / 3600)
    for r in sgpt:
        assert r["fraction"] == pytest.approx((r["pass_hours"] + r["curve_hours"] + r["gain_hours"]) / 50.0)
    wanda = rows[("wanda", SETTINGS[0][0])]
    assert wanda["curve"] == "wanda" and wanda["pass_hours"] == pytest.approx(samples * (19 * 0.5 + 38 * 0.25) / 3600)


def test_curve_costs_time_every_linear_of_both_blocks():
    from ditprune.alloccost import curve_costs

    rows = curve_costs(dims=SMALL, progress=False)
    assert [(r["block"], r["layers"], r["streams"]) for r in rows] == [("double", 14, 2), ("single", 6, 2)]
    assert all(r["curve_seconds"]["sparsegpt"] > 0 and r["curve_seconds"]["wanda"] > 0 for r in rows)


def test_rerender_recomputes_the_allocation_rows_from_a_stored_run(tmp_path):
    import json

    from ditprune.alloccost import SETTINGS, rerender

    blocks = [{"method": m, "block": b, "observe_seconds_per_sample": 1.0, "layers": 1, "weights_mb": 1.0,
               "mask_seconds": 1.0, "extra_mb": 1.0, "max_by_kind_mb": {k: 0.0 for k in
                                                                         ("masks", "statistics", "workspace", "forward")}}
              for m in ("wanda", "sparsegpt") for b in ("double", "single")]
    curves = [{"block": b, "layers": 2, "streams": 2, "curve_seconds": {"sparsegpt": 1.0, "wanda": 1.0}}
              for b in ("double", "single")]
    stored = {"machine": "test", "block_dtype": "bfloat16", "layers": [], "blocks": blocks,
              "transformer": [{"method": "sparsegpt", "mask_hours": 1.0, "calibration_hours": 9.0, "total_hours": 10.0}],
              "allocation_curves": curves, "allocation": [], "memory": [],
              "allocation_probes": {"forward_s": 1.0, "base_s": 2.0, "probe_s": 3.0, "images": 4, "image_tokens": 1024,
                                    "text_tokens": 512, "peak_bytes_1": 2**30, "peak_bytes_2": 2**31,
                                    "flux_peak_bytes": 29.5 * 2**30}}
    (tmp_path / "cost.json").write_text(json.dumps(stored))
    rerender(tmp_path)
    data = json.loads((tmp_path / "cost.json").read_text())
    assert [r["setting"] for r in data["allocation"]] == [label for label, _ in SETTINGS]
    assert data["blocks"] == blocks  # the measurements are kept as they were
    text = (tmp_path / "cost.md").read_text()
    assert all(label in text for label, _ in SETTINGS) and "added / prune" in text
    assert "3.00 s per probe" in text and "at 57 blocks, by that growth per block, 29.50 GiB" in text


def test_probe_costs_on_the_code_path_and_their_memory_by_depth():
    """probe_costs times probed_gains at two probe counts on a small FLUX-shaped model and
    counts its memory with one and two pairs of blocks; the whole-transformer figure is the
    one-pair peak plus the growth per block times the 55 further blocks."""
    from ditprune.alloccost import probe_costs

    r = probe_costs(width=256, images=1, side=8, text=16)
    assert r["forward_s"] > 0 and r["base_s"] + r["probe_s"] > 0
    assert r["peak_bytes_2"] > r["peak_bytes_1"] > 0  # deeper: more checkpointed inputs held
    assert r["flux_peak_bytes"] == pytest.approx(r["peak_bytes_1"] + 55 * (r["peak_bytes_2"] - r["peak_bytes_1"]) / 2)
