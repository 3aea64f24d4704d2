"""``ditprune bench --deploy``: what a pruned transformer costs its user, per export format.

For the shipped FLUX-layout reference model (pruned with Wanda on its calibration) and a
FLUX.1-dev-shaped transformer (one double and one single block at full width, random weights,
magnitude-pruned: a mask is a mask for size and speed), all in bf16: bytes on disk (and the
ratio to the dense bf16 file), time to load with :func:`ditprune.load_transformer`, time of one
forward on this machine, and the largest difference of that forward from the pruned dense one.
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

from .costbench import FLUX_DEV

__all__ = ["run_deploy", "flux_dev_shaped", "flux_dev_bytes"]


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
    """The tensor bytes of a whole FLUX.1-dev transformer (``double`` + ``single`` blocks) from an
    export with fewer blocks: the tensors outside the blocks once, and each kind of block at its
    mean size per block (blocks of a kind have the same shapes, and masks of one sparsity the
    same encoded size) times its count."""
    rest, kinds = 0, {"transformer_blocks.": [0, set(), double], "single_transformer_blocks.": [0, set(), single]}
    for name, n in _tensor_bytes(path).items():
        prefix = next((p for p in kinds if name.startswith(p)), None)
        if prefix is None:
            rest += n
        else:
            kinds[prefix][0] += n
            kinds[prefix][1].add(name[len(prefix):].split(".", 1)[0])  # the block index
    return rest + sum(round(total / len(blocks) * count) for total, blocks, count in kinds.values() if blocks)


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


def _variants(name: str, dense, prune_fn, targets_of) -> list[tuple[str, object, str]]:
    """(label, model, export format) of every variant."""
    from .quantize import quantize

    half = copy.deepcopy(dense)
    targets = targets_of(prune_fn(half, sparsity=0.5))
    two_four = copy.deepcopy(dense)
    prune_fn(two_four, pattern="2:4")
    int8 = copy.deepcopy(half)
    quantize(int8, "int8_weight_only", targets=targets)
    return [("dense", dense, "diffusers"), ("pruned 50%, dense file", half, "diffusers"),
            ("pruned 50%, compressed", half, "compressed"), ("2:4, compressed", two_four, "compressed"),
            ("pruned 50% + int8", int8, "diffusers"), ("pruned 50% + int8, compressed", int8, "compressed")]


def run_deploy(out: Path, progress: bool = True, image_tokens: int = 256, text_tokens: int = 64) -> dict:
    from tqdm import tqdm

    from . import prune
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
            variants = _variants(model_name, dense, prune_fn, lambda r: [layer.name for layer in r.layers])
            reference_out = None
            base_bytes = base_whole = None
            for label, model, fmt in tqdm(variants, desc=f"deploy: {model_name}", disable=not progress):
                path = scratch / f"{len(rows)}"
                save_transformer(model, path, fmt)
                size = _bytes(path)
                base_bytes = base_bytes or size
                whole = flux_dev_bytes(path) if model_name.startswith("FLUX.1-dev") else None
                base_whole = base_whole or whole
                loads = []
                for _ in range(2):
                    start = time.perf_counter()
                    loaded = load_transformer(path)
                    loads.append(time.perf_counter() - start)
                seconds, output = _forward_s(loaded, batch)
                if label == "pruned 50%, dense file":
                    reference_out = output
                diff = (output.float() - reference_out.float()).abs().max().item() if reference_out is not None and "50%" in label else None
                rows.append({"model": model_name, "variant": label, "format": fmt, "bytes": size,
                             "x_dense_bf16": size / base_bytes, "flux_dev_gb": whole / 1e9 if whole else None,
                             "flux_dev_x_dense": whole / base_whole if whole else None, "load_s": min(loads), "forward_s": seconds,
                             "max_abs_diff_vs_pruned_dense": diff})
                shutil.rmtree(path, ignore_errors=True)
                del loaded
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    lines = [f"All in bf16 on {torch.get_num_threads()} CPU threads; forward: one call with {image_tokens} image and "
             f"{text_tokens} text tokens (FLUX.1-dev-shaped) or one calibration batch (reference), median of 3. "
             "Whole FLUX.1-dev: the tensors outside the blocks once, the double block x 19 and the single block x 38 "
             "(`ditprune.deploybench.flux_dev_bytes`).", "",
             "| model | variant | format | MB on disk | x dense bf16 | whole FLUX.1-dev GB (x dense) | load s | forward s "
             "| max abs diff vs pruned dense |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d = "-" if r["max_abs_diff_vs_pruned_dense"] is None else f"{r['max_abs_diff_vs_pruned_dense']:.3g}"
        whole = "-" if r["flux_dev_gb"] is None else f"{r['flux_dev_gb']:.2f} ({r['flux_dev_x_dense']:.3f})"
        lines.append(f"| {r['model']} | {r['variant']} | {r['format']} | {r['bytes'] / 2**20:.1f} | "
                     f"{r['x_dense_bf16']:.3f} | {whole} | {r['load_s']:.2f} | {r['forward_s']:.3f} | {d} |")
    text = "\n".join(lines)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / "deploy.md") as tmp:
        tmp.write_text(text + "\n")
    with atomic_file(out / "deploy.json") as tmp:
        tmp.write_text(json.dumps(rows, indent=1) + "\n")
    return {"table": text, "outputs": {"table": str(out / "deploy.md"), "json": str(out / "deploy.json")}}
