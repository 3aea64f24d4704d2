"""Loading diffusers pipelines (local directories or hub ids) and calibrating on their own
sampler: every call of ``pipe.transformer`` while the pipeline generates is one calibration
batch, so the statistics cover the sampler's real timesteps, guidance and resolution."""

from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn
from tqdm.auto import tqdm

from .._io import atomic_dir, atomic_file
from ..calibration import to_device
from ..stats import HookOwner

__all__ = ["DTYPES", "load_pipeline", "pipeline_calibration", "read_prompts", "run_pipeline_recipe", "BUILTIN_PROMPTS"]

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

BUILTIN_PROMPTS = [
    "a photo of a red fox in fresh snow, morning light",
    "an astronaut riding a horse on the moon, detailed illustration",
    "a bowl of ramen on a wooden table, studio photograph",
    "a watercolor painting of a lighthouse in a storm",
    "portrait of an old fisherman, dramatic lighting, 85mm",
    "a futuristic city skyline at dusk, neon reflections on water",
    "a close-up of a hummingbird drinking from a flower",
    "an isometric pixel-art castle on a floating island",
]
BUILTIN_CLASSES = ["golden retriever", "tabby", "goldfish", "volcano", "espresso", "castle", "pizza", "daisy"]


def read_prompts(path: str | None, n: int, class_conditional: bool = False) -> list[str]:
    """``n`` prompts cycled from a text file (one a line) or the built-in set."""
    if path is None:
        prompts = BUILTIN_CLASSES if class_conditional else BUILTIN_PROMPTS
    else:
        prompts = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"prompt file {path} has no prompts")
    return [prompts[i % len(prompts)] for i in range(n)]


def load_pipeline(source: str, dtype: str = "float32", device: str = "cpu", transformer_class: str | None = None):
    """A diffusers pipeline from a local directory or a hub id, safetensors only."""
    import diffusers

    pipe = diffusers.DiffusionPipeline.from_pretrained(source, torch_dtype=DTYPES[dtype], use_safetensors=True)
    name = type(pipe.transformer).__name__
    if transformer_class is not None and name != transformer_class:
        raise ValueError(f"{source} holds a {name}, but the recipe says model.transformer_class={transformer_class}")
    return pipe.to(device)


@torch.no_grad()
def pipeline_calibration(pipe, prompts: list[str], steps: int, guidance: float, resolution: int, seed: int = 0,
                         batch_size: int = 4, progress: bool = True) -> list[dict]:
    """Keyword arguments of every ``pipe.transformer`` call while ``pipe`` samples ``prompts``,
    kept on the CPU. DiT pipelines take ImageNet class names (or class ids) as prompts."""
    record: list[dict] = []
    transformer: nn.Module = pipe.transformer

    signature = inspect.signature(transformer.forward)

    def grab(_module, args, kwargs):
        bound = signature.bind_partial(*args, **kwargs).arguments  # positional calls get their names
        for name, param in signature.parameters.items():
            if param.kind is inspect.Parameter.VAR_KEYWORD and name in bound:
                bound.update(bound.pop(name))
        record.append(to_device(dict(bound), "cpu", copy=True))

    is_dit = type(pipe).__name__ == "DiTPipeline"
    with HookOwner() as hooks:
        hooks.add(transformer.register_forward_pre_hook(grab, with_kwargs=True))
        for i in tqdm(range(0, len(prompts), batch_size), desc="calibration prompts", disable=not progress):
            chunk = prompts[i : i + batch_size]
            g = torch.Generator().manual_seed(seed + i)
            if is_dit:
                labels = [int(c) if c.isdigit() else pipe.get_label_ids([c])[0] for c in chunk]
                pipe(class_labels=labels, num_inference_steps=steps, guidance_scale=guidance,
                     generator=g, output_type="pt")  # DiTPipeline always decodes
            else:
                pipe(prompt=chunk, num_inference_steps=steps, guidance_scale=guidance, height=resolution,
                     width=resolution, generator=g, output_type="latent")
    return record


def run_pipeline_recipe(recipe: DictConfig, out: Path, progress: bool = True) -> dict:
    """Prune the transformer of a diffusers pipeline as the recipe says; save it as a diffusers
    model directory under ``out/transformer``."""
    from ..recipe import pruning_setting
    from ..runner import prune_with_overrides

    m, c, p = recipe.model, recipe.calibration, recipe.pruning
    if recipe.recovery.steps > 0:
        raise ValueError(
            "recovery.steps > 0 runs only on the reference models: for a hub model, put "
            "ditprune.callbacks.DiTPruning in your own Trainer with your data"
        )
    pipe = load_pipeline(m.source, m.dtype, m.device, m.transformer_class)
    prompts = read_prompts(c.prompts, c.num_prompts, class_conditional=type(pipe).__name__ == "DiTPipeline")
    calibration = pipeline_calibration(pipe, prompts, c.steps, c.guidance, c.resolution, c.seed, progress=progress)
    calibration = to_device(calibration, m.device)
    report = prune_with_overrides(pipe.transformer, calibration, p.method, p, **pruning_setting(p), progress=progress)
    if recipe.quantization.config:
        from ..quantize import quantize

        quantize(pipe.transformer, recipe.quantization.config, targets=[r.name for r in report.layers])
    outputs = {}
    if not recipe.quantization.config:
        with atomic_dir(out / "transformer") as tmp:
            pipe.transformer.save_pretrained(tmp, safe_serialization=True)
        outputs["model"] = str(out / "transformer")
    with atomic_file(out / "report.txt") as tmp:
        tmp.write_text(str(report) + "\n")
    outputs["layers"] = str(out / "report.txt")
    summary = {"method": p.method, "sparsity": report.sparsity, "layers": len(report.layers),
               "calibration_batches": len(calibration), "seconds": report.seconds}
    with atomic_file(out / "metrics.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
    outputs["metrics"] = str(out / "metrics.json")
    table = "| " + " | ".join(summary) + " |\n|" + "---|" * len(summary) + "\n| " + " | ".join(
        f"{v:.4f}" if isinstance(v, float) else str(v) for v in summary.values()) + " |"
    return {"rows": [summary], "table": table, "outputs": outputs}
