"""ditprune: post-training weight pruning for Diffusion Transformers (DiT-Pruning and baselines)."""

from .export import load_transformer, save_transformer
from .kernels import accelerate
from .pruning import LayerReport, PrunePlan, PruneReport, make_sparsifier, prune, resolve_targets
from .sparsifiers import (
    METHODS,
    DiTPruningSparsifier,
    MagnitudeSparsifier,
    RIASparsifier,
    SparseGPTSparsifier,
    WandaSparsifier,
)

__version__ = "0.1.0"

_LAZY = {  # imported on first use: they pull in diffusers, torchmetrics
    "load_pipeline": "ditprune.models.loading",
    "pipeline_calibration": "ditprune.models.loading",
    "reference_calibration": "ditprune.evaluation.harness",
    "load_reference": "ditprune.reference",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), "load" if name == "load_reference" else name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ditprune' has no attribute {name!r}")

__all__ = [
    "prune",
    "PrunePlan",
    "save_transformer",
    "load_transformer",
    "accelerate",
    "load_pipeline",
    "pipeline_calibration",
    "reference_calibration",
    "load_reference",
    "make_sparsifier",
    "resolve_targets",
    "PruneReport",
    "LayerReport",
    "METHODS",
    "DiTPruningSparsifier",
    "MagnitudeSparsifier",
    "RIASparsifier",
    "SparseGPTSparsifier",
    "WandaSparsifier",
]
