"""``ditprune bench --deploy``: what a pruned transformer costs its user, per export format.

For the shipped FLUX-layout reference model (pruned with Wanda on its calibration) and a
FLUX.1-dev-shaped transformer (one double and one single block at full width, random weights,
magnitude-pruned: a mask is a mask for size and speed), all in bf16, each variant (dense, int8
alone, 50%, 70% and 2:4 compressed, each with and without int8): bytes on disk, bytes of the
loaded model's tensors, time to load with :func:`ditprune.load_transformer`, time of one forward
on this machine, and the largest difference of that forward from the model before it was
saved. The FLUX.1-dev-shaped rows are scaled to the whole FLUX.1-dev transformer by block count.
"""

from __future__ import annotations

import copy
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from .fluxshapes import FLUX_DEV

__all__ = ["run_deploy", "render", "flux_dev_shaped", "flux_dev_bytes", "flux_dev_total", "resident_bytes"]


def flux_dev_shaped(double: int = 1, single: int = 1):
    """FLUX.1-dev's config with fewer blocks, random weights, bf16."""
    from ._quiet import diffusers as _diffusers

    diffusers = _diffusers()

    torch.manual_seed(0)
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=double, num_single_layers=single, attention_head_dim=FLUX_DEV["head_dim"],
        num_attention_heads=FLUX_DEV["heads"], joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    ).to(torch.bfloat16).eval()


def _flux_inputs(model, image_tokens: int, text_tokens: int) -> dict:
    cfg = model.config
    side = int(image_tokens**0.5)
    g = torch.Generator().manual_seed(0)
    ij = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(-1, 2)
    batch = dict(
        hidden_states=torch.randn(1, side * side, cfg.in_channels, generator=g),
        encoder_hidden_states=torch.randn(1, text_tokens, cfg.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g),
        timestep=torch.tensor([0.5]),
        img_ids=torch.cat([torch.zeros(side * side, 1), ij.float()], 1),
        txt_ids=torch.zeros(text_tokens, 3),
    )
    if cfg.guidance_embeds:
        batch["guidance"] = torch.tensor([3.5])
    dtype = next(model.parameters()).dtype
    return {k: v.to(dtype) if v.is_floating_point() and k not in ("img_ids", "txt_ids") else v for k, v in batch.items()}


def _tensor_bytes(path: Path) -> dict[str, int]:
    """Bytes of every tensor in the safetensors files under ``path`` (from their JSON headers)."""
    sizes = {}
    for file in path.glob("*.safetensors"):
        with open(file, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        sizes.update({k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"})
    return sizes


def flux_dev_bytes(path: Path, double: int = FLUX_DEV["double"], single: int = FLUX_DEV["single"]) -> int:
    """The tensor bytes on disk of a whole FLUX.1-dev transformer from an export with fewer
    blocks (see :func:`flux_dev_total`)."""
    return flux_dev_total(_tensor_bytes(path), double, single)


def flux_dev_total(sizes: dict[str, int], double: int = FLUX_DEV["double"], single: int = FLUX_DEV["single"]) -> int:
    """The bytes of a whole FLUX.1-dev transformer (``double`` + ``single`` blocks) from the
    per-tensor bytes of one with fewer blocks: the tensors outside the blocks once, and each kind
    of block at its mean size per block (blocks of a kind have the same shapes, and masks of one
    sparsity the same encoded size) times its count."""
    rest, kinds = 0, {"transformer_blocks.": [0, set(), double], "single_transformer_blocks.": [0, set(), single]}
    for name, n in sizes.items():
        prefix = next((p for p in kinds if name.startswith(p)), None)
        if prefix is None:
            rest += n
        else:
            kinds[prefix][0] += n
            kinds[prefix][1].add(name[len(prefix):].split(".", 1)[0])  # the block index
    return rest + sum(round(total / len(blocks) * count) for total, blocks, count in kinds.values() if blocks)


def resident_bytes(model) -> dict[str, int]:
    """Bytes each state-dict tensor of ``model`` holds in memory (a torchao tensor: its parts)."""
    sizes = {}
    for name, t in model.state_dict().items():
        parts = [getattr(t, a) for a in getattr(t, "tensor_data_names", ())] or [t]
        sizes[name] = sum(p.numel() * p.element_size() for p in parts if isinstance(p, torch.Tensor))
    return sizes


def _bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _forward_s(model, batch, repeats: int = 3) -> tuple[float, torch.Tensor]:
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            out = model(**batch).sample
            times.append(time.perf_counter() - start)
    return statistics.median(times), out


SETTINGS = (("50%", {"sparsity": 0.5}), ("70%", {"sparsity": 0.7}), ("2:4", {"pattern": "2:4"}))


def _variants(dense, prune_fn, targets) -> list[tuple[str, object, str]]:
    """(label, model, export format) of every variant: dense, int8 alone, and each sparsity
    compressed, with and without int8."""
    from .quantize import quantize

    int8 = copy.deepcopy(dense)
    quantize(int8, "int8_weight_only", targets=targets)
    out = [("dense", dense, "diffusers"), ("int8 only", int8, "diffusers")]
    for label, setting in SETTINGS:
        pruned = copy.deepcopy(dense)
        prune_fn(pruned, **setting)
        both = copy.deepcopy(pruned)
        quantize(both, "int8_weight_only", targets=targets)
        if label == "50%":
            out.append(("50%, dense file", pruned, "diffusers"))
        out += [(f"{label}, compressed", pruned, "compressed"), (f"{label} + int8, compressed", both, "compressed")]
    return out


def run_deploy(out: Path, progress: bool = True, image_tokens: int = 256, text_tokens: int = 64) -> dict:
    from tqdm import tqdm

    from . import prune, resolve_targets
    from ._io import atomic_file
    from .evaluation.harness import reference_calibration
    from .export import load_transformer, save_transformer
    from .reference import load

    reference = load("flux", dtype=torch.float32)
    calibration = reference_calibration(reference, 8, 4)
    reference = reference.to(torch.bfloat16)
    ref_cal = [{k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() and k not in ("img_ids", "txt_ids")
                else v for k, v in b.items()} for b in calibration]

    models = {
        f"flux-layout reference ({sum(p.numel() for p in reference.parameters()) / 1e6:.2f}M parameters)": (
            reference, lambda m, **s: prune(m, ref_cal, "wanda", **s), ref_cal[0]),
        "FLUX.1-dev-shaped, 1 double + 1 single block": (
            flux_dev_shaped(), lambda m, **s: prune(m, [], "magnitude", **s), None),
    }
    rows = []
    scratch = Path(tempfile.mkdtemp(prefix="ditprune-deploy-"))
    try:
        for model_name, (dense, prune_fn, batch) in models.items():
            batch = batch if batch is not None else _flux_inputs(dense, image_tokens, text_tokens)
            variants = _variants(dense, prune_fn, resolve_targets(dense))
            flux = model_name.startswith("FLUX.1-dev")
            base = {}
            for label, model, fmt in tqdm(variants, desc=f"deploy: {model_name}", disable=not progress):
                path = scratch / f"{len(rows)}"
                save_transformer(model, path, fmt)
                loads = []
                for _ in range(2):
                    start = time.perf_counter()
                    loaded = load_transformer(path)
                    loads.append(time.perf_counter() - start)
                seconds, output = _forward_s(loaded, batch)
                with torch.no_grad():
                    before = model(**batch).sample
                row = {"model": model_name, "variant": label, "format": fmt, "bytes": _bytes(path),
                       "memory_bytes": sum(resident_bytes(loaded).values()), "load_s": min(loads),
                       "forward_s": seconds, "max_abs_diff_vs_saved": (output.float() - before.float()).abs().max().item()}
                if flux:
                    row["flux_dev_disk_bytes"] = flux_dev_bytes(path)
                    row["flux_dev_memory_bytes"] = flux_dev_total(resident_bytes(loaded))
                base = base or row
                row["x_dense_disk"] = row["bytes"] / base["bytes"]
                row["x_dense_memory"] = row["memory_bytes"] / base["memory_bytes"]
                rows.append(row)
                shutil.rmtree(path, ignore_errors=True)
                del loaded
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    text = render(rows, image_tokens, text_tokens)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / "deploy.md") as tmp:
        tmp.write_text(text + "\n")
    with atomic_file(out / "deploy.json") as tmp:
        tmp.write_text(json.dumps(rows, indent=1) + "\n")
    return {"table": text, "outputs": {"table": str(out / "deploy.md"), "json": str(out / "deploy.json")}}


def render(rows: list[dict], image_tokens: int = 256, text_tokens: int = 64) -> str:
    """Two tables: the whole FLUX.1-dev transformer (from the FLUX.1-dev-shaped rows), and every
    measured row. Files in GB/MB (10^9, 10^6 bytes), memory in GiB/MiB."""
    lines = [f"All in bf16 on {torch.get_num_threads()} CPU threads. Whole FLUX.1-dev: the tensors outside the "
             "blocks once, the double block x 19 and the single block x 38 (`ditprune.deploybench.flux_dev_total`); "
             "memory: the bytes of the loaded model's tensors (a compressed export is decoded to dense on load).", "",
             "| whole FLUX.1-dev transformer | GB on disk | x dense | GiB in memory | x dense |", "|---|---|---|---|---|"]
    flux = [r for r in rows if "flux_dev_disk_bytes" in r]
    for r in flux:
        lines.append(f"| {r['variant']} | {r['flux_dev_disk_bytes'] / 1e9:.2f} | "
                     f"{r['flux_dev_disk_bytes'] / flux[0]['flux_dev_disk_bytes']:.3f} | "
                     f"{r['flux_dev_memory_bytes'] / 2**30:.2f} | "
                     f"{r['flux_dev_memory_bytes'] / flux[0]['flux_dev_memory_bytes']:.3f} |")
    lines += ["", f"Measured (forward: one call with {image_tokens} image and {text_tokens} text tokens, FLUX.1-dev-shaped, "
              "or one calibration batch, reference; median of 3; diff: the loaded model's output against the model "
              "before it was saved):", "",
              "| model | variant | format | MB on disk | x dense | MiB in memory | load s | forward s | diff |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['variant']} | {r['format']} | {r['bytes'] / 1e6:.1f} | "
                     f"{r['x_dense_disk']:.3f} | {r['memory_bytes'] / 2**20:.1f} | {r['load_s']:.2f} | "
                     f"{r['forward_s']:.3f} | {r['max_abs_diff_vs_saved']:.3g} |")
    return "\n".join(lines)
