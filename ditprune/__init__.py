"""ditprune: post-training weight pruning for Diffusion Transformers (DiT-Pruning and baselines)."""

from .pruning import LayerReport, PruneReport, make_sparsifier, prune, resolve_targets
from .sparsifiers import (
    METHODS,
    DiTPruningSparsifier,
    MagnitudeSparsifier,
    RIASparsifier,
    SparseGPTSparsifier,
    WandaSparsifier,
)

__version__ = "0.1.0"

__all__ = [
    "prune",
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
