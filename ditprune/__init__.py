"""ditprune: post-training weight pruning for Diffusion Transformers (DiT-Pruning and baselines)."""

__version__ = "0.1.0"

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


def __dir__():
    return sorted(set(globals()) | set(__all__))
