"""Loading diffusers pipelines (local directories or hub ids) and recording calibration on their
own sampler: every call of ``pipe.transformer`` while the pipeline generates is one calibration
batch, so the statistics cover the sampler's real timesteps, guidance and resolution."""

from __future__ import annotations

import inspect
import logging
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from ..calibration import to_device
from ..errors import InputError
from .._quiet import quiet_loading
from ..stats import HookOwner

__all__ = ["DTYPES", "load_pipeline", "pipeline_calibration", "release_components", "restore_components", "cycle_prompts", "builtin_prompts",
           "PROMPT_FILE", "BUILTIN_CLASSES"]

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

PROMPT_FILE = Path(__file__).resolve().parent.parent / "data" / "prompts.txt"


@lru_cache(maxsize=1)
def builtin_prompts() -> tuple[str, ...]:
    """80 varied prompts written for this project (photographs, paintings, illustrations, 3D,
    text in images): ``ditprune/data/prompts.txt``."""
    return tuple(line.strip() for line in PROMPT_FILE.read_text(encoding="utf-8").splitlines() if line.strip())
BUILTIN_CLASSES = ["golden retriever", "tabby", "goldfish", "volcano", "espresso", "castle", "pizza", "daisy"]


def cycle_prompts(prompts: list[str], n: int) -> list[str]:
    """``n`` prompts, cycling through ``prompts``."""
    return [prompts[i % len(prompts)] for i in range(n)]


def load_pipeline(source: str, dtype: str = "float32", device: str = "cpu", transformer_class: str | None = None):
    """A diffusers pipeline from a local directory or a hub id, safetensors only (no pickle).
    A source that cannot be loaded raises :class:`~ditprune.errors.InputError` naming it."""
    from .._quiet import diffusers as _diffusers

    diffusers = _diffusers()

    try:
        with quiet_loading():
            pipe = diffusers.DiffusionPipeline.from_pretrained(source, dtype=DTYPES[dtype], use_safetensors=True)
    except (OSError, ValueError, EnvironmentError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"model.source: cannot load {source!r}: {first}") from None
    transformer = getattr(pipe, "transformer", None)
    if transformer is None:
        raise InputError(f"model.source: {source!r} is a {type(pipe).__name__} without a transformer (not a DiT)")
    name = type(transformer).__name__
    if transformer_class is not None and name != transformer_class:
        raise InputError(f"{source} holds a {name}, but the recipe says model.transformer_class={transformer_class}")
    pipe.set_progress_bar_config(disable=True)  # calibration shows its own progress, per prompt chunk
    return pipe.to(device)


@torch.no_grad()
def pipeline_calibration(pipe, prompts: list[str], steps: int, guidance: float | None = None,
                         resolution: int | None = None, seed: int = 0, batch_size: int = 4,
                         progress: bool = True, indices: list[int] | None = None) -> list[dict]:
    """Keyword arguments of every ``pipe.transformer`` call while ``pipe`` samples ``prompts``,
    kept on the CPU. ``guidance`` / ``resolution`` None: the pipeline's defaults. Prompt k draws
    its noise from ``seed + indices[k]`` (default: its position), so how prompts are batched or
    split over ranks never changes what is recorded. DiT pipelines take ImageNet class names
    (or class ids) as prompts and have no resolution."""
    record: list[dict] = []
    transformer: nn.Module = pipe.transformer
    signature = inspect.signature(transformer.forward)
    indices = list(range(len(prompts))) if indices is None else list(indices)

    def grab(_module, args, kwargs):
        bound = signature.bind_partial(*args, **kwargs).arguments  # positional calls get their names
        for name, param in signature.parameters.items():
            if param.kind is inspect.Parameter.VAR_KEYWORD and name in bound:
                bound.update(bound.pop(name))
        record.append(to_device(dict(bound), "cpu", copy=True))

    is_dit = type(pipe).__name__ == "DiTPipeline"
    if is_dit and resolution is not None:
        raise InputError("calibration.resolution does not apply to a DiTPipeline (class-conditional, at the "
                         "model's sample size): remove it")
    extra = {} if guidance is None else {"guidance_scale": guidance}
    if resolution is not None:
        extra.update(height=resolution, width=resolution)
    device = transformer.device if transformer.device.type == "cuda" else torch.device("cpu")
    with HookOwner() as hooks:
        hooks.add(transformer.register_forward_pre_hook(grab, with_kwargs=True))
        for i in tqdm(range(0, len(prompts), batch_size), desc="calibration prompts", disable=not progress):
            chunk = prompts[i : i + batch_size]
            gens = [torch.Generator(device=device).manual_seed(seed + k) for k in indices[i : i + batch_size]]
            if is_dit:
                unknown = [c for c in chunk if not c.isdigit() and c not in pipe.labels]
                if unknown:
                    raise InputError(f"calibration.prompts: {unknown[0]!r} is not a class name of this DiT "
                                     f"(e.g. {', '.join(list(pipe.labels)[:3])}) nor a class id")
                labels = [int(c) if c.isdigit() else pipe.labels[c] for c in chunk]
                pipe(class_labels=labels, num_inference_steps=steps, generator=gens, output_type="pt", **extra)
            else:
                pipe(prompt=chunk, num_inference_steps=steps, generator=gens, output_type="latent", **extra)
    return record


def release_components(pipe) -> dict[str, torch.device]:
    """Move every module of ``pipe`` but the transformer to the CPU (text encoders, VAE): once the
    calibration is recorded they are not needed on the accelerator while the transformer is
    pruned (for FLUX.1-dev: the 9.5 GB T5 encoder). Returns where each was, for
    :func:`restore_components`."""
    devices = {}
    for name, component in pipe.components.items():
        if name != "transformer" and isinstance(component, nn.Module):
            devices[name] = next(component.parameters(), torch.empty(0)).device
            component.to("cpu")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return devices


def restore_components(pipe, devices: dict[str, torch.device]) -> None:
    """Put the modules :func:`release_components` moved back where they were, to generate again."""
    for name, device in devices.items():
        pipe.components[name].to(device)
