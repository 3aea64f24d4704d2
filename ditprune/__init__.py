"""ditprune: post-training weight pruning for Diffusion Transformers (DiT-Pruning and baselines)."""

import os as _os
import sys as _sys

__version__ = "0.1.0"

# OpenMP threads that spin at barriers collapse when another process shares the cores: beside one
# busy process on 2 cores, a 3072x3072 SparseGPT mask took 43 s instead of 4.4 s with passive
# waiting (README, "CPU runs"). The policy is read once, when torch starts its thread pool, so it
# is set here only if torch is not loaded yet; a user's own OMP_WAIT_POLICY always wins.
if "torch" not in _sys.modules and "OMP_WAIT_POLICY" not in _os.environ:
    _os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

# Imported on first use: importing ditprune loads nothing heavy (not even torch), so that the CLI
# can set the OpenMP wait policy before torch starts its thread pool (see ditprune.cli).
_LAZY = {
    "load_transformer": "ditprune.export",
    "save_transformer": "ditprune.export",
    "accelerate": "ditprune.kernels",
    **dict.fromkeys(["LayerReport", "PrunePlan", "PruneReport", "make_sparsifier", "prune", "resolve_targets"],
                    "ditprune.pruning"),
    **dict.fromkeys(["METHODS", "DiTPruningSparsifier", "MagnitudeSparsifier", "RIASparsifier",
                     "SparseGPTSparsifier", "WandaSparsifier"], "ditprune.sparsifiers"),
    **dict.fromkeys(["load_pipeline", "pipeline_calibration", "release_components", "restore_components"],
                    "ditprune.models.loading"),
    **dict.fromkeys(["prune_structured", "StructuredReport"], "ditprune.structuring"),
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
    "prune_structured",
    "StructuredReport",
    "PrunePlan",
    "save_transformer",
    "load_transformer",
    "accelerate",
    "load_pipeline",
    "pipeline_calibration",
    "release_components",
    "restore_components",
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


def __dir__():
    return sorted(set(globals()) | set(__all__))
