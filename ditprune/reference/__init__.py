"""The small reference DiTs the project trains and ships, and their judge.

``load("flux")``: FLUX-layout text-to-image (``FluxTransformer2DModel``), captions such as
"a handwritten 7" through an offline MiniLM encoder. ``load("dit")``: class-conditional
DiT-XL/2-layout (``DiTTransformer2DModel``, adaLN-Zero). Both denoise 16x16 digits by rectified
flow; ``load_judge()`` is the classifier that scores them. See ``weights/*/training.json`` for
how each was trained.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import load_file

from .nets import Conditioning, Denoiser, Judge, sample

__all__ = ["KINDS", "NAMES", "kind_of", "weights_dir", "load", "load_judge", "training_record", "Conditioning",
           "Denoiser", "sample"]

KINDS = ("flux", "dit")
# what tables, plots and files call them: "dit" is also the name of a method
NAMES = {"flux": "flux-layout", "dit": "dit-xl-layout"}


def kind_of(name: str) -> str:
    """The reference model a name means: ``flux`` / ``flux-layout``, ``dit`` / ``dit-xl-layout``."""
    for kind, long in NAMES.items():
        if name in (kind, long):
            return kind
    raise ValueError(f"reference model must be one of {list(NAMES.values())}, got {name!r}")


def weights_dir(name: str) -> Path:
    path = Path(str(resources.files(__package__) / "weights" / name))
    if not path.is_dir():
        raise FileNotFoundError(f"no shipped reference weights '{name}' at {path}")
    return path


def load(kind: str = "flux", dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A fresh copy of a shipped reference DiT (diffusers ``from_pretrained``, safetensors)."""
    from .._quiet import diffusers as _diffusers

    diffusers = _diffusers()

    kind = kind_of(kind)
    cls = diffusers.FluxTransformer2DModel if kind == "flux" else diffusers.DiTTransformer2DModel
    from .._quiet import quiet_loading

    with quiet_loading():
        return cls.from_pretrained(weights_dir(kind), dtype=dtype, use_safetensors=True).eval()


def load_judge() -> Judge:
    judge = Judge()
    judge.load_state_dict(load_file(str(weights_dir("judge") / "judge.safetensors")))
    return judge.eval()


def training_record(name: str) -> dict:
    return json.loads((weights_dir(name) / "training.json").read_text())
