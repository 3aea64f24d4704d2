"""Run recipes: a structured OmegaConf schema (dataclasses), so unknown keys and wrong types are
errors that name the key (and the nearest valid one) before anything runs."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

__all__ = ["Recipe", "RecipeError", "load_recipe", "pruning_setting", "DEMO"]


@dataclass
class ModelConfig:
    source: str = "reference:flux"  # reference:flux | reference:dit | a local diffusers directory | a hub id
    subfolder: Optional[str] = None  # e.g. "transformer" inside a pipeline directory
    dtype: str = "float32"  # float32 | bfloat16 | float16
    transformer_class: Optional[str] = None  # e.g. FluxTransformer2DModel: checked against what loads
    device: str = "cpu"  # where the pipeline runs calibration: cpu | cuda


@dataclass
class CalibrationConfig:
    prompts: Optional[str] = None  # a text file, one prompt per line (DiT: ImageNet class names); None = built-in
    num_prompts: int = 16
    steps: int = 10  # sampler steps; every step's model inputs are calibration batches
    guidance: float = 3.5
    resolution: int = 512
    seed: int = 0


@dataclass
class OverrideConfig:
    targets: list[str] = MISSING  # regexes; matching layers use the settings below instead
    sparsity: Optional[float] = None
    pattern: Optional[str] = None


@dataclass
class PruningConfig:
    method: str = "dit"  # dit | wanda | magnitude | ria | sparsegpt
    sparsity: float = 0.5
    pattern: Optional[str] = None  # "N:M", e.g. "2:4"; wins over sparsity
    targets: Optional[list[str]] = None  # regexes; None = the model family's defaults
    ignore: Optional[list[str]] = None
    overrides: list[OverrideConfig] = field(default_factory=list)
    block_sequential: bool = True
    options: dict[str, Any] = field(default_factory=dict)  # the method's own options, e.g. {alpha: 0.4}


@dataclass
class RecoveryConfig:
    steps: int = 0  # 0 = no recovery fine-tune
    lr: float = 1e-4
    batch_size: int = 32
    distill: bool = True  # match the frozen dense model's outputs (else the model's own loss)


@dataclass
class QuantizationConfig:
    config: Optional[str] = None  # torchao: int8_weight_only | int8_dynamic | int4_weight_only | float8_weight_only


@dataclass
class ExportConfig:
    output_dir: str = "outputs/demo"
    format: str = "diffusers"  # diffusers (dense with zeros) | compact (mask + values)


@dataclass
class EvaluationConfig:
    compare: list[str] = field(default_factory=lambda: ["wanda"])  # baselines run beside it, same data and seeds
    n_samples: int = 100
    steps: int = 20


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    pruning: PruningConfig = field(default_factory=PruningConfig)
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)


DEMO = Recipe()  # the embedded default: `ditprune prune` with no arguments


class RecipeError(ValueError):
    pass


def pruning_setting(pruning) -> dict:
    """The ``prune`` argument a recipe's pruning section sets: ``pattern`` if given, else ``sparsity``."""
    return {"pattern": pruning.pattern} if pruning.pattern else {"sparsity": pruning.sparsity}


def _valid_keys(node, prefix=""):
    for k, v in node.items():
        yield prefix + k
        if isinstance(v, DictConfig):
            yield from _valid_keys(v, prefix + k + ".")


def _explain(err: OmegaConfBaseException, schema: DictConfig) -> str:
    key = getattr(err, "full_key", None) or ""
    if isinstance(err, ConfigKeyError) or "not in" in str(err):
        near = difflib.get_close_matches(key, list(_valid_keys(schema)), n=1, cutoff=0.5)
        hint = f"; did you mean '{near[0]}'?" if near else ""
        return f"unknown recipe key '{key}'{hint}"
    return f"bad value for recipe key '{key}': {str(getattr(err, 'msg', err)).splitlines()[0]}"


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None) -> DictConfig:
    """The recipe at ``path`` (YAML; None = the embedded demo) with ``key=value`` overrides,
    validated against the schema."""
    schema = OmegaConf.structured(Recipe)
    try:
        cfg = schema
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise RecipeError(f"recipe file not found: {path}")
            cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
        if overrides:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        raise RecipeError(_explain(e, schema)) from None
    _check(cfg)
    return cfg


def _check(cfg: DictConfig) -> None:
    from .granularity import check_sparsity, parse_pattern
    from .sparsifiers import METHODS

    p = cfg.pruning
    if p.method not in METHODS:
        raise RecipeError(f"pruning.method: unknown method {p.method!r}; choose one of {sorted(METHODS)}")
    try:
        check_sparsity(p.sparsity)
        if p.pattern is not None:
            parse_pattern(p.pattern)
    except ValueError as e:
        raise RecipeError(f"pruning: {e}") from None
    for name in cfg.evaluation.compare:
        if name not in METHODS:
            raise RecipeError(f"evaluation.compare: unknown method {name!r}; choose from {sorted(METHODS)}")
    if cfg.model.dtype not in ("float32", "bfloat16", "float16"):
        raise RecipeError(f"model.dtype must be float32, bfloat16 or float16, got {cfg.model.dtype!r}")
    if cfg.export.format not in ("diffusers", "compact"):
        raise RecipeError(f"export.format must be 'diffusers' or 'compact', got {cfg.export.format!r}")
