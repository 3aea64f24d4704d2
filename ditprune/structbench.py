"""``ditprune bench --structured``: what removing whole attention heads and MLP channels buys
(speed with the ordinary dense kernels, parameters) and costs (quality), measured.

1. Speed: forward time of a FLUX-shaped transformer (width 1536, 2 double + 2 single blocks,
   float32, 256 image + 64 text tokens) and of one FLUX.1-dev double and single block at full
   width (float32), dense and with 25% and 50% of heads and MLP channels removed (the selection
   does not change the shapes, so these are chosen by magnitude); the best of ``repeats`` calls
   after a warm-up, the variants interleaved, on this machine's threads. bf16 is not timed on a CPU without bf16 matrix units
   (its products fall back to a path about 300x slower, ``benchmarks/cpu_dtypes.py``); with a
   CUDA device the same rows run on it in bf16 too.
2. Parameters and bytes (bf16) of the whole FLUX.1-dev transformer after the same removal,
   built without weights.
3. Quality on both reference models at 25% and 50% of heads and channels: the OBS selection
   with the least-squares refit against the magnitude and activation (FLAP-like) baselines,
   and, at the same number of removed weights, unstructured ``dit`` (``reconstruct=True``) so
   the price of the speed is visible; and the composition (25% structured, then ``dit`` 50% on
   what remains, then int8 weight-only).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch

from ._io import atomic_file, strict_json

__all__ = ["run_structured", "speed_rows", "flux_dev_counts"]

FRACTIONS = (0.25, 0.5)


def _forward_seconds(models: list, batch: dict, repeats: int) -> list[float]:
    """Best of ``repeats`` forward times of each model, the models interleaved (so that a busy
    machine slows every variant alike), after one warm-up call each."""
    best = [float("inf")] * len(models)
    with torch.no_grad():
        for m in models:
            m(**batch)
        for _ in range(repeats):
            for i, m in enumerate(models):
                start = time.perf_counter()
                m(**batch)
                if next(m.parameters()).is_cuda:
                    torch.cuda.synchronize()
                best[i] = min(best[i], time.perf_counter() - start)
    return best


def speed_rows(repeats: int = 5, device: str = "cpu", dtype=torch.float32, full_width: bool = True) -> list[dict]:
    """Forward seconds dense vs heads+mlp removed, per model shape (see the module docstring)."""
    from .deploybench import _flux_inputs, flux_dev_shaped
    from .membench import flux_shaped, flux_shaped_batches
    from .structuring import prune_structured

    shapes = [("FLUX-shaped, width 1536, 2+2 blocks", lambda: flux_shaped(1536, 2, 2, dtype, device),
               lambda m: flux_shaped_batches(m, calls=1)[0])]
    if full_width:
        shapes.append(("FLUX.1-dev double + single block, width 3072",
                       lambda: flux_dev_shaped(1, 1).to(device, dtype),
                       lambda m: {k: v.to(device) for k, v in _flux_inputs(m, 256, 64).items()}))
    rows = []
    for label, build, inputs in shapes:
        variants = [build()]
        batch = inputs(variants[0])
        for f in FRACTIONS:
            variants.append(copy.deepcopy(variants[0]))
            prune_structured(variants[-1], [], "heads+mlp", f, "magnitude")
        seconds = _forward_seconds(variants, batch, repeats)
        for f, m, s in zip((0.0,) + FRACTIONS, variants, seconds):
            rows.append({"model": label, "dtype": str(dtype).removeprefix("torch."), "device": device, "removed": f,
                         "params": sum(p.numel() for p in m.parameters()), "seconds": s, "speedup": seconds[0] / s})
        del variants
    return rows


def flux_dev_counts() -> list[dict]:
    """Parameters and bf16 bytes of the whole FLUX.1-dev transformer, dense and with each
    fraction of heads and MLP channels removed (built on the meta device: shapes only)."""
    from accelerate import init_empty_weights

    from . import models
    from ._quiet import diffusers as _diffusers
    from .fluxshapes import FLUX_DEV
    from .structured import removal_count
    from .surgery import shrink, units

    diffusers = _diffusers()
    rows = []
    for f in (0.0,) + FRACTIONS:
        with init_empty_weights():
            model = diffusers.FluxTransformer2DModel(
                patch_size=1, in_channels=64, num_layers=FLUX_DEV["double"], num_single_layers=FLUX_DEV["single"],
                attention_head_dim=FLUX_DEV["head_dim"], num_attention_heads=FLUX_DEV["heads"],
                joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
        found = [u for name, b in models.blocks(model) for u in units(b, name)]
        with init_empty_weights():
            shrink(model, [(u, list(range(removal_count(u.count, f)))) for u in found])
        n = sum(p.numel() for p in model.parameters())
        rows.append({"removed": f, "params": n, "bf16_gb": n * 2 / 1e9})
    return rows


def _quality_rows(kind: str, samples: int, progress: bool) -> list[dict]:
    from .evaluation.harness import Candidate, Comparison
    from .pruning import prune, resolve_targets
    from .quantize import quantize

    bench = Comparison(kind, 16, 10, samples, 20)
    structured = [Candidate(f"heads+mlp {m}", m, {"structure": "heads+mlp"}) for m in ("obs", "activation", "magnitude")]
    rows = bench.run([Candidate("dense", None)] + structured, [{"sparsity": f} for f in FRACTIONS], progress)
    targeted = sum(bench.dense.get_submodule(n).weight.numel() for n in resolve_targets(bench.dense))
    equal = []
    for r in rows:
        if r["method"] == "heads+mlp obs":  # unstructured at the same number of removed weights
            removed = r["report"].unit_weights[0] - r["report"].unit_weights[1]
            equal.append(round(removed / targeted, 4))
    for s, f in zip(equal, FRACTIONS):
        for row in bench.run([Candidate(f"dit reconstruct (same weights as heads+mlp {f:g})", "dit",
                                        {"reconstruct": True})], [{"sparsity": s}], progress):
            rows.append(row)

    def composed(model, calibration, method, sparsity, progress, **_):
        prune(model, calibration, structure="heads+mlp", sparsity=0.25, progress=progress)
        report = prune(model, calibration, method="dit", sparsity=sparsity, progress=progress)
        quantize(model, "int8_weight_only")
        return report

    rows += bench.run([Candidate("heads+mlp obs 0.25, then dit 0.5, then int8", "dit")], [{"sparsity": 0.5}],
                      progress, prune_fn=composed)
    return rows


def render(speed: list[dict], counts: list[dict], quality: list[dict]) -> str:
    from .evaluation.report import markdown_table

    lines = ["Forward time, dense vs heads+mlp removed (best of the calls, variants interleaved; "
             "`ditprune bench --structured`):", "",
             "| model | dtype | device | removed | parameters | forward s | speedup |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['dtype']} | {r['device']} | {r['removed']:.0%} | {r['params']:,} | "
              f"{r['seconds']:.3f} | {r['speedup']:.2f}x |" for r in speed]
    lines += ["", "Whole FLUX.1-dev transformer (shapes only):", "", "| removed | parameters | bf16 GB |",
              "|---|---|---|"]
    lines += [f"| {r['removed']:.0%} | {r['params']:,} | {r['bf16_gb']:.2f} |" for r in counts]
    if quality:
        lines += ["", "Quality (sparsity: the fraction of the weights of the Linears holding heads and channels "
                  "removed; for the unstructured row, of all targeted weights):", "", markdown_table(quality)]
    return "\n".join(lines)


def run_structured(out: Path, quick: bool = False, progress: bool = True, device: str = "cpu") -> dict:
    speed = speed_rows(9, device, torch.float32)
    if device != "cpu":
        speed += speed_rows(9, device, torch.bfloat16)
    counts = flux_dev_counts()
    quality = [] if quick else [r for kind in ("flux", "dit") for r in _quality_rows(kind, 100, progress)]
    table = render(speed, counts, quality)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / "structured.md") as tmp:
        tmp.write_text(table + "\n")
    with atomic_file(out / "structured.json") as tmp:
        tmp.write_text(strict_json({"speed": speed, "flux_dev": counts,
                                    "quality": [{k: v for k, v in r.items() if k not in ("samples", "report", "pruned")}
                                                for r in quality]}) + "\n")
    return {"table": table, "outputs": {"table": str(out / "structured.md"), "json": str(out / "structured.json")}}
