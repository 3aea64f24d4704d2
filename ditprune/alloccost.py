"""What ``allocation="auto"`` adds to a FLUX.1-dev prune (part of ``ditprune bench --cost``).

``auto`` costs three things beyond the prune it steers (:mod:`ditprune.allocating`):

1. *the allocation pass*: the dense model over the calibration, block by block as the prune,
   gathering each layer's statistics (Gram matrices for a method that updates its weights,
   whose curve is SparseGPT's; the diagonal alone otherwise): as costly per sample as the
   prune's own calibration with the same statistics, so it is priced with the block runs'
   measured calibration seconds per sample (the SparseGPT rows with Gram matrices, the Wanda
   rows without);
2. *the removal curves*: timed here (:func:`curve_costs`) on every Linear of a shape-true
   double and single block, through :func:`ditprune.allocating.layer_curve` (and the gain's
   denominator on the Gram matrix, :func:`ditprune.allocation.gram_removed`) with the
   statistics regime of a real run (adaLN: 64 x 28 sampled tokens, the held-out path; the
   others: plenty);
3. *the output gains* (:func:`ditprune.gains.output_gains`): block forwards, counted as that
   function runs them and priced with the block runs' forward seconds per sample (the Wanda
   rows: forward plus the diagonal statistics, an upper bound of the forward): ``gains=layers``
   runs the model from the layer's block on once per targeted layer and gain batch;
   ``gains=blocks`` from each block on once per output stream and gain batch, and the block
   alone ``layers + 2`` times per gain batch. Both run the dense model once per gain batch
   first. ``gains=probes`` (:mod:`ditprune.probes`) is priced as the multiple of a plain
   forward that :func:`probe_costs` measures on its code path, per batch and per probe.

``allocation_options={"batches": k}`` limits the pass to k calibration batches spread over the
timesteps (:func:`ditprune.allocating.pick_batches`; its price scales with them; the curves are
timed on the full run's statistics regime, so with fewer adaLN tokens their time is
overstated).

:func:`allocation_cost` composes them for the whole transformer, for the shipped defaults and
for a cheaper choice of options, beside the prune's own extrapolated hours. Left out as in
the prune's extrapolation: the text encoders, the sampler's steps, the embedders and the final
layer in the gains' forwards.
"""

from __future__ import annotations

import time

import torch

__all__ = ["curve_costs", "probe_costs", "allocation_cost", "rerender", "SETTINGS"]

# (label, allocation_options): what the extrapolation prices
SETTINGS = [("defaults (gains per layer, 4 batches)", {"gains": "layers", "gain_batches": 4}),
            ("gains per block, 1 batch", {"gains": "blocks", "gain_batches": 1}),
            ("gains per block, 1 batch, pass on 32 batches", {"gains": "blocks", "gain_batches": 1, "batches": 32}),
            ("gains per layer, 1 batch, pass on 32 batches", {"gains": "layers", "gain_batches": 1, "batches": 32}),
            ("gains by 16 probes, 4 batches", {"gains": "probes", "gain_batches": 4, "probes": 16}),
            ("gains by 16 probes, 4 batches, pass on 32 batches", {"gains": "probes", "gain_batches": 4, "probes": 16,
                                                                   "batches": 32}),
            ("gains by 16 probes, 1 batch, pass on 32 batches", {"gains": "probes", "gain_batches": 1, "probes": 16,
                                                                 "batches": 32}),
            ("gains by 8 probes, 2 batches, pass on 32 batches", {"gains": "probes", "gain_batches": 2, "probes": 8,
                                                                  "batches": 32}),
            ("gains by 4 probes, 4 batches, pass on 32 batches", {"gains": "probes", "gain_batches": 4, "probes": 4,
                                                                  "batches": 32})]


def curve_costs(device="cpu", dtype=torch.bfloat16, dims: dict | None = None, sparsity: float = 0.7,
                spread: float = 0.2, progress: bool = True) -> list[dict]:
    """Per block kind: the seconds of every targeted Linear's removal curve (``sparsegpt``: what
    an updating method's ``auto`` computes; ``wanda``: the others'), on the real run's
    statistics regime, and the block's output streams (what ``gains=blocks`` measures per)."""
    from tqdm import tqdm

    from . import allocation as A
    from .allocating import layer_curve
    from .fluxshapes import FLUX_DEV, REAL_RUN, block_batches, flux_blocks, is_adaln, synthetic_stats
    from .gains import _floats

    device = torch.device(device)
    real_adaln = REAL_RUN["prompts"] * REAL_RUN["steps"]
    lo, hi = A.bounds(sparsity, spread)
    rows = []
    blocks = flux_blocks(device, dtype, dims)
    f = {**FLUX_DEV, **(dims or {})}
    batch = block_batches(1, REAL_RUN["image_tokens"] if dims is None else 16, 1, device, dtype, dims=dims)[0]
    for kind, block in zip(("double", "single"), blocks):
        with torch.no_grad():
            streams = len(_floats(block(**batch)))
        stats: dict[tuple[int, bool], object] = {}
        seconds = {"sparsegpt": 0.0, "wanda": 0.0}
        linears = [(n, m) for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)]
        for name, module in tqdm(linears, desc=f"cost: curves ({kind})", disable=not progress):
            w = module.weight.detach()
            key = (w.shape[1], is_adaln(name))
            if key not in stats:
                stats[key] = synthetic_stats(w.shape[1], real_adaln if key[1] else None, seed=w.shape[1], device=device)
            st = stats[key]
            start = time.perf_counter()
            h = st.gram  # as the allocation pass: one Gram matrix for the curve and the gain's denominator
            layer_curve(w, st, "sparsegpt", lo, hi, h)
            A.gram_removed(w, h, st.energy, sparsity)
            del h
            seconds["sparsegpt"] += time.perf_counter() - start
            start = time.perf_counter()
            A.removal_curve(w, st.energy)
            seconds["wanda"] += time.perf_counter() - start
        rows.append({"block": kind, "layers": len(linears), "streams": streams,
                     "curve_seconds": seconds, "dim": f["dim"]})
        del stats
    return rows


def probe_costs(width: int | None = None, images: int | None = None, side: int = 32, text: int | None = None,
                probes: tuple[int, int] = (1, 3), device="cpu") -> dict:
    """``gains="probes"`` timed on its code path (:func:`ditprune.probes.probed_gains`) on a
    FLUX.1-dev-shaped transformer of one double and one single block (bf16, random weights, the
    real run's batch: 4 images of 32 x 32 latent tokens, 512 text tokens), against a plain
    forward of the same model: {"forward_s", "base_s" (what one batch does beyond its probes: the
    checkpointed forward, the masks' packing), "probe_s" (each probe: a recomputation and a
    backward), the live tensor bytes above the weights while it runs (the dispatch-mode count of
    :mod:`ditprune.memory`) with one and with two pairs of blocks ("peak_bytes_1",
    "peak_bytes_2") and "flux_peak_bytes", extrapolated to FLUX.1-dev's 57
    blocks by the growth per block between the two (what a block keeps for the whole pass: its
    checkpointed inputs)}. Timed at two probe counts after a warm-up run; the difference gives a
    probe's seconds."""
    from . import membench
    from .fluxshapes import FLUX_DEV, REAL_RUN
    from .granularity import row_mask
    from .memory import measuring
    from .probes import probed_gains

    width, images, text = width or FLUX_DEV["dim"], images or REAL_RUN["batch"], text or FLUX_DEV["text_tokens"]
    def run(model, k):  # the blocks' Linears, random input energies, Wanda's mask at 70%
        names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "transformer_blocks." in n]
        energies = {n: torch.rand(model.get_submodule(n).in_features, device=device) + 0.1 for n in names}
        probed_gains(model, names, energies, dict.fromkeys(names, 1.0), lambda sc: row_mask(sc, 0.7), [batch], [0], k)

    model = membench.flux_shaped(width, 1, 1, device=device)
    batch = membench.flux_shaped_batches(model, 1, images, side, text)[0]
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    with torch.no_grad():
        model(**batch)  # warm-up
        sync()
        start = time.perf_counter()
        model(**batch)
        sync()
        forward = time.perf_counter() - start

    run(model, probes[0])  # warm-up: the allocator's first pages are not per batch
    seconds = []
    for k in probes:
        start = time.perf_counter()
        run(model, k)
        sync()
        seconds.append(time.perf_counter() - start)
    probe = (seconds[1] - seconds[0]) / (probes[1] - probes[0])
    out = {"forward_s": forward, "base_s": seconds[0] - probes[0] * probe, "probe_s": probe, "images": images,
           "image_tokens": side * side, "text_tokens": text, "width": width}
    for pairs in (1, 2):  # memory apart (the counter slows what it counts), at two depths
        if pairs == 2:
            model = membench.flux_shaped(width, 2, 2, device=device)
        with measuring(device, hold=model.parameters()) as live:
            run(model, 1)
        out[f"peak_bytes_{pairs}"] = live.peak - live.peak_by_kind["weights"]
    # each block's checkpointed inputs stay for the whole pass: the peak grows by them per block
    per_block = (out["peak_bytes_2"] - out["peak_bytes_1"]) / 2
    out["flux_peak_bytes"] = out["peak_bytes_1"] + (FLUX_DEV["double"] + FLUX_DEV["single"] - 2) * per_block
    return out


def _gain_forwards(options: dict, layers: dict, streams: dict, blocks: dict) -> dict[str, int]:
    """{block kind: forwards of such a block} per gain batch, as
    :func:`ditprune.gains.output_gains` runs them: the dense model once, then every forward from
    the measured block on (``blocks`` in execution order: FLUX.1-dev's double blocks, then its
    single ones)."""
    order = [k for k in blocks for _ in range(blocks[k])]
    runs = dict(blocks)  # the dense forward
    for p, kind in enumerate(order):
        starts = layers[kind] if options["gains"] == "layers" else streams[kind]  # forwards from block p on
        for q in order[p:]:
            runs[q] += starts
        if options["gains"] == "blocks":
            runs[kind] += layers[kind] + 2  # the block alone, in the first stream's forward
    return runs


def allocation_cost(block_rows: list[dict], curve_rows: list[dict], prune_hours: list[dict],
                    real: dict | None = None, probes: dict | None = None) -> list[dict]:
    """Hours ``auto`` adds to each extrapolated prune (``prune_hours``: rows of
    :func:`ditprune.costbench.extrapolate`), per setting of :data:`SETTINGS`: the allocation
    pass (calibration per sample of the statistics the curve needs x the real run's samples x
    blocks), the curves (measured per block x blocks) and the gains (forwards x the real run's
    batch x forward seconds per sample; for ``gains="probes"``, ``probes`` (:func:`probe_costs`)
    gives the probe path's seconds per batch as a multiple of a plain forward on the same
    shape-true model, applied to the whole transformer's forward: the settings with probes are
    left out without it); and their sum as a fraction of the prune."""
    from .fluxshapes import FLUX_DEV, REAL_RUN

    r = {**REAL_RUN, **(real or {})}
    samples = r["prompts"] * r["steps"]
    blocks = {"double": FLUX_DEV["double"], "single": FLUX_DEV["single"]}
    rate = {(row["method"], row["block"]): row["observe_seconds_per_sample"] for row in block_rows}
    curves = {row["block"]: row for row in curve_rows}
    layers = {k: curves[k]["layers"] for k in blocks}
    streams = {k: curves[k]["streams"] for k in blocks}
    forward = {k: rate[("wanda", k)] for k in blocks}  # forward + the diagonal statistics, per sample
    out = []
    for prune in prune_hours:
        method = prune["method"]
        curve = "sparsegpt" if method == "sparsegpt" or "reconstruct" in method else "wanda"  # allocating's default
        pass_per_sample = sum(blocks[k] * rate[(curve, k)] for k in blocks)
        curve_s = sum(blocks[k] * curves[k]["curve_seconds"][curve] for k in blocks)
        for label, options in SETTINGS:
            if options["gains"] == "probes" and not probes:
                continue
            pass_s = min(samples, options.get("batches", samples) * r["batch"]) * pass_per_sample
            if options["gains"] == "probes":  # a multiple of the dense forward, measured on the code path
                times = (probes["base_s"] + options["probes"] * probes["probe_s"]) / probes["forward_s"]
                per_batch = r["batch"] * sum(blocks[k] * forward[k] for k in blocks) * times
            else:
                runs = _gain_forwards(options, layers, streams, blocks)
                per_batch = r["batch"] * sum(n * forward[k] for k, n in runs.items())
            gains_s = options["gain_batches"] * per_batch
            extra = (pass_s + curve_s + gains_s) / 3600
            out.append({"method": method, "setting": label, "curve": curve, "pass_hours": pass_s / 3600,
                        "curve_hours": curve_s / 3600, "gain_hours": gains_s / 3600, "extra_hours": extra,
                        "prune_hours": prune["total_hours"], "fraction": extra / prune["total_hours"]})
    return out


def rerender(results, probe: bool = False) -> None:
    """Recompute the allocation rows of a ``ditprune bench --cost`` run from its stored
    measurements (``cost.json`` in ``results``) with the current :data:`SETTINGS`, and rewrite
    ``cost.json`` and ``cost.md`` there: no measurement is redone, except :func:`probe_costs`
    with ``probe`` (``python -m ditprune.alloccost benchmarks/results --probes``)."""
    import json
    from pathlib import Path

    from . import costbench
    from ._io import atomic_file

    results = Path(results)
    data = json.loads((results / "cost.json").read_text())
    if probe:  # measure the probes now (the other rows' measurements are kept)
        data["allocation_probes"] = probe_costs()
    data["allocation"] = allocation_cost(data["blocks"], data["allocation_curves"], data["transformer"],
                                         probes=data.get("allocation_probes"))
    text = costbench.render(data["layers"], data["blocks"], data["transformer"], data["memory"], data["machine"],
                            data["block_dtype"], data["allocation"], data.get("allocation_probes"))
    with atomic_file(results / "cost.md") as tmp:
        tmp.write_text(text + "\n")
    with atomic_file(results / "cost.json") as tmp:
        tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")


def render(rows: list[dict], probes: dict | None = None) -> list[str]:
    """Markdown lines for :func:`allocation_cost`'s rows (and :func:`probe_costs`'s measurement)."""
    lines = ["", "What `allocation=\"auto\"` adds to those prunes (whole transformer, extrapolated from the block runs "
                 "above and curves timed on every Linear of a shape-true block; see `ditprune/alloccost.py`). "
                 "The allocation pass is a second calibration pass with the statistics the curve needs; "
                 "the gains are model forwards:", "",
             "| method | options | curve | allocation pass (h) | curves (h) | gains (h) | added (h) | prune (h) | added / prune |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['setting']} | {r['curve']} | {r['pass_hours']:.2f} | {r['curve_hours']:.2f} | "
              f"{r['gain_hours']:.2f} | {r['extra_hours']:.2f} | {r['prune_hours']:.2f} | {r['fraction']:.0%} |"
              for r in rows]
    if probes:
        gib = 2**30
        lines += ["", f"Gains by probes (`ditprune.probes`), timed on their code path on a FLUX.1-dev-shaped transformer "
                      f"of one double and one single block ({probes['images']} images, {probes['image_tokens']} image and "
                      f"{probes['text_tokens']} text tokens, bf16): a plain forward {probes['forward_s']:.2f} s; per batch "
                      f"{probes['base_s']:.2f} s ({probes['base_s'] / probes['forward_s']:.1f} forwards: the checkpointed "
                      f"forward and the masks' packing, after a warm-up run; a prune packs them once, priced here per batch: "
                      f"an upper bound) plus {probes['probe_s']:.2f} s per probe "
                      f"({probes['probe_s'] / probes['forward_s']:.1f} forwards: a recomputation with the layers' error "
                      "terms and a backward). The rows above price the whole transformer's gains as those multiples of "
                      "its forward. Memory above the weights while they run (live tensor bytes): "
                      f"{probes['peak_bytes_1'] / gib:.2f} GiB with one pair of blocks, {probes['peak_bytes_2'] / gib:.2f} "
                      f"GiB with two; at 57 blocks, by that growth per block, {probes['flux_peak_bytes'] / gib:.2f} GiB."]
    return lines


if __name__ == "__main__":  # python -m ditprune.alloccost benchmarks/results [--probes]
    import sys

    rerender(next((a for a in sys.argv[1:] if not a.startswith("--")), "benchmarks/results"), "--probes" in sys.argv)
