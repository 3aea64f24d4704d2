"""Run recipes: a structured OmegaConf schema (dataclasses). Unknown keys, wrong types and bad
values are errors that name the key (and the nearest valid one); every key takes effect or is
refused. Two layers of checks, both before any model is loaded:

- :func:`load_recipe` parses (YAML 1.2 numbers: ``pattern: 2:4`` stays the string ``"2:4"``),
  refuses environment-variable interpolation, merges ``key=value`` overrides, and checks values;
- :func:`preflight` checks what the recipe points at: prompt file, model source, device,
  quantization support, output directory.
"""

from __future__ import annotations

import difflib
import re
import typing
from dataclasses import dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from .errors import InputError

__all__ = ["Recipe", "RecipeError", "load_recipe", "find_recipe", "shipped_recipes", "preflight", "pruning_setting",
           "is_reference", "DEMO", "DTYPES"]

DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class ModelConfig:
    source: str = "reference:flux-layout"  # reference:flux-layout | reference:dit-xl-layout | a pipeline directory | a hub id
    dtype: str = "float32"  # float32 | bfloat16 | float16 (pipelines; the reference models run in float32)
    transformer_class: Optional[str] = None  # e.g. FluxTransformer2DModel: checked against what loads
    device: str = "cpu"  # where the pipeline runs: cpu | cuda | cuda:N (pipelines only)


@dataclass
class CalibrationConfig:
    prompts: Optional[str] = None  # pipelines: a text file, one prompt a line (DiT: class names); None = built-in
    num_prompts: int = 16
    steps: int = 10  # sampler steps; every step's model inputs are calibration batches
    guidance: Optional[float] = None  # pipelines: guidance scale; None = the pipeline's default
    resolution: Optional[int] = None  # pipelines: image side in pixels; None = the pipeline's default
    seed: int = 0  # noise of the calibration trajectories


@dataclass
class OverrideConfig:
    targets: list[str] = MISSING  # regexes; matching layers use the settings below instead
    sparsity: Optional[float] = None
    pattern: Optional[str] = None


@dataclass
class PruningConfig:
    method: str = "dit"  # dit | wanda | magnitude | ria | sparsegpt
    sparsity: float = 0.5
    pattern: Optional[str] = None  # "N:M", e.g. 2:4; wins over sparsity
    targets: Optional[list[str]] = None  # regexes; None = the model family's defaults
    ignore: Optional[list[str]] = None  # regexes; None = the defaults (timestep embedders inside blocks)
    overrides: list[OverrideConfig] = field(default_factory=list)
    block_sequential: bool = True
    offload: Optional[str] = None  # where captured block inputs wait between blocks, e.g. cpu
    options: dict[str, Any] = field(default_factory=dict)  # the method's own options, e.g. {alpha: 0.4}
    allocation: str = "uniform"  # uniform | owl | auto: one sparsity per layer under the same budget
    allocation_range: float = 0.2  # each layer within sparsity +- this (clipped to [0, 0.99])
    allocation_options: dict[str, Any] = field(default_factory=dict)  # owl's / auto's, e.g. {gains: probes, batches: 32}
    max_dense: float = 0.0  # with a pattern and allocation auto: fraction of targeted weights that may stay dense
    structure: Optional[str] = None  # heads | mlp | heads+mlp: first remove whole heads / MLP channels
    structure_sparsity: float = 0.25  # the fraction of heads and channels removed in every block
    structure_method: str = "obs"  # obs | activation | magnitude: which go


@dataclass
class RecoveryConfig:
    steps: int = 0  # 0 = no recovery fine-tune (reference models only)
    lr: float = 1e-4
    batch_size: int = 32
    distill: bool = True  # match the frozen dense model's outputs (else the model's own loss)


@dataclass
class QuantizationConfig:
    config: Optional[str] = None  # torchao: int8_weight_only | int8_dynamic | float8_weight_only | ...


@dataclass
class ExportConfig:
    output_dir: str = "outputs/demo"
    format: str = "diffusers"  # diffusers: dense, zeros in place | compressed: bitmask + kept values (smaller)
    overwrite: bool = False  # replace outputs that ditprune did not write


@dataclass
class EvaluationConfig:  # None = the default shown
    # reference models
    compare: Optional[list[str]] = None  # baselines run beside the recipe's method (default [wanda])
    n_samples: Optional[int] = None  # generated samples per method (default 200)
    steps: Optional[int] = None  # sampler steps (reference default 20; pipelines: the pipeline's default)
    # pipelines: evaluated when clip_model is set (see ditprune/evaluation/pipeline.py)
    clip_model: Optional[str] = None  # a local CLIP directory, e.g. openai/clip-vit-large-patch14
    prompts: Optional[str] = None  # MJHQ-30K meta_data.json or a text file (default: the 80 built-in prompts)
    num_prompts: Optional[int] = None  # the first N prompts (default: all)
    seed: Optional[int] = None  # image i uses seed + i (default 0)
    guidance: Optional[float] = None  # default: the pipeline's
    resolution: Optional[int] = None  # default: the pipeline's
    batch_size: Optional[int] = None  # images per pipeline call (default 4)
    reference_images: Optional[str] = None  # a folder of real images (e.g. MJHQ-30K's) for FID
    inception: Optional[str] = None  # torch-fidelity's Inception weights: FID proper (else FD on CLIP features)
    image_reward: Optional[str] = None  # ImageReward weights (needs the image-reward package)
    pruned: Optional[str] = None  # ditprune eval: the pruned transformer's directory


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
EVALUATION_DEFAULTS = {"compare": ["wanda"], "n_samples": 200, "steps": 20}
REFERENCE_EVAL_KEYS = ("compare", "n_samples")
PIPELINE_EVAL_KEYS = ("clip_model", "prompts", "num_prompts", "seed", "guidance", "resolution", "batch_size",
                      "reference_images", "inception", "image_reward", "pruned")


class RecipeError(InputError):
    pass


def pruning_setting(pruning) -> dict:
    """The ``prune`` argument a recipe's pruning section sets: ``pattern`` if given, else ``sparsity``."""
    return {"pattern": pruning.pattern} if pruning.pattern else {"sparsity": pruning.sparsity}


def is_reference(recipe: DictConfig) -> bool:
    return recipe.model.source.startswith("reference:")


# -- parsing ------------------------------------------------------------------------------------
def _yaml_loader():
    """OmegaConf's YAML loader with YAML 1.2 numbers: no base-60 integers or floats, so ``2:4``
    is the string "2:4" (YAML 1.1 reads it as 124)."""
    from omegaconf._yaml import get_yaml_loader

    base = get_yaml_loader()
    numeric = {"tag:yaml.org,2002:int", "tag:yaml.org,2002:float"}
    resolvers = {
        first: [(tag, re.compile(r"(?!.*:)" + rx.pattern, rx.flags) if tag in numeric else rx) for tag, rx in rs]
        for first, rs in base.yaml_implicit_resolvers.items()
    }
    return type("RecipeLoader", (base,), {"yaml_implicit_resolvers": resolvers})


_LOADER = None


def _parse_yaml(text: str, where: str) -> Any:
    global _LOADER
    _LOADER = _LOADER or _yaml_loader()
    try:
        return yaml.load(text, Loader=_LOADER)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecipeError(f"{where}: not valid YAML{at}: {problem}") from None


_RESOLVER = re.compile(r"\$\{\s*[\w.\-]+\s*:")  # ${name:...}: a resolver call (oc.env, oc.decode, ...)


def _refuse_env(node: Any, path: str = "") -> None:
    """Recipes are printed and saved with the run: they may not read environment variables, nor
    call any resolver (``oc.decode`` can build an ``oc.env`` call out of plain strings); plain
    references between keys (``${pruning.sparsity}``) are kept."""
    if isinstance(node, dict):
        for k, v in node.items():
            _refuse_env(v, f"{path}.{k}" if path else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _refuse_env(v, f"{path}[{i}]")
    elif isinstance(node, str) and _RESOLVER.search(node):
        raise RecipeError(f"{path}: recipes may not read environment variables nor call resolvers ({node!r}); "
                          "they are printed and saved with the outputs. Put the value in the recipe or pass it as "
                          "key=value")


def _valid_keys(node, prefix=""):
    for k, v in node.items():
        yield prefix + k
        if isinstance(v, DictConfig):
            yield from _valid_keys(v, prefix + k + ".")


def _is_list_type(t) -> bool:
    """``List[str]`` or ``Optional[List[str]]``."""
    return typing.get_origin(t) is list or any(_is_list_type(a) for a in typing.get_args(t))


def _explain(err: OmegaConfBaseException, schema: DictConfig) -> str:
    key = getattr(err, "full_key", None) or ""
    if isinstance(err, ConfigKeyError) or "not in" in str(err):
        near = difflib.get_close_matches(key, list(_valid_keys(schema)), n=1, cutoff=0.5)
        hint = f"; did you mean '{near[0]}'?" if near else ""
        return f"unknown recipe key '{key}'{hint}"
    given = getattr(err, "value", None)
    owner, name = getattr(err, "object_type", None), getattr(err, "key", None)
    hints = typing.get_type_hints(owner) if isinstance(owner, type) and is_dataclass(owner) else {}
    if _is_list_type(hints.get(name)) and given is not None and not isinstance(given, (list, tuple)):
        return f"recipe key '{key}' is a list; did you mean {key}=[{given}]?"
    return f"bad value for recipe key '{key}': {str(getattr(err, 'msg', err)).splitlines()[0]}"


def shipped_recipes() -> dict[str, Path]:
    """Name -> path of the recipes installed with ditprune (``configs/``)."""
    from importlib import resources

    folder = Path(str(resources.files("ditprune.configs")))
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


def find_recipe(path: str | Path) -> Path:
    """``path`` if it is a file, else the shipped recipe of that name (``flux_dev`` or ``flux_dev.yaml``)."""
    p = Path(path)
    if p.is_file():
        return p
    shipped = shipped_recipes()
    name = p.name[:-5] if p.name.endswith(".yaml") else p.name
    if p.parent in (Path("."), Path("configs")) and name in shipped:
        return shipped[name]
    raise RecipeError(f"recipe file not found: {path} (shipped recipes: {', '.join(shipped)})")


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None) -> DictConfig:
    """The recipe at ``path`` (YAML file, or the name of a shipped recipe; None = the embedded
    demo) with ``key=value`` overrides, validated against the schema. Raises
    :class:`RecipeError` with a one-line message."""
    schema = OmegaConf.structured(Recipe)
    layers: list[DictConfig | dict] = []
    if path is not None:
        path = find_recipe(path)
        try:
            data = _parse_yaml(path.read_text(encoding="utf-8"), str(path))
        except (OSError, UnicodeDecodeError) as e:
            raise RecipeError(f"cannot read recipe {path}: {e}") from None
        if data is not None and not isinstance(data, dict):
            raise RecipeError(f"{path}: a recipe is a YAML mapping of sections (model, calibration, pruning, ...)")
        _refuse_env(data or {})
        layers.append(data or {})
    try:
        for item in overrides or []:
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise RecipeError(f"override {item!r} is not key=value (e.g. pruning.sparsity=0.6)")
            value = _parse_yaml(value, f"override {item!r}") if value else None
            _refuse_env(value, key.strip())
            dot = OmegaConf.create()
            OmegaConf.update(dot, key.strip(), value, merge=True)
            layers.append(dot)
        cfg = schema
        for layer in layers:
            cfg = OmegaConf.merge(cfg, layer)
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        raise RecipeError(_explain(e, schema)) from None
    check_recipe(cfg)
    return cfg


# -- value checks (no file system, no model) ----------------------------------------------------
def _regexes(key: str, patterns) -> None:
    """The same check as the API's (:func:`ditprune.pruning.compile_regexes`), as a recipe error."""
    from .pruning import compile_regexes

    if patterns is None:
        return
    try:
        compile_regexes(list(patterns) if isinstance(patterns, ListConfig) else patterns, key)
    except (TypeError, ValueError) as e:
        raise RecipeError(str(e)) from None


def _positive(key: str, value, minimum: int = 1, maximum: int | None = None) -> None:
    if value is None or value < minimum:
        raise RecipeError(f"{key} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise RecipeError(f"{key} must be <= {maximum}, got {value} (a bound against runs that cannot end)")


# upper bounds: far above any real run, low enough that a typo cannot start one that never ends
MAX_PROMPTS, MAX_STEPS, MAX_RESOLUTION, MAX_BATCH, MAX_SAMPLES = 100_000, 1000, 8192, 4096, 1_000_000


def check_recipe(cfg: DictConfig) -> None:
    """Every check that needs nothing but the recipe itself."""
    from .granularity import check_sparsity, parse_pattern
    from .pruning import make_sparsifier
    from .quantize import CONFIGS
    from .sparsifiers import METHODS

    m, c, p, r, e, ev = cfg.model, cfg.calibration, cfg.pruning, cfg.recovery, cfg.export, cfg.evaluation
    reference = is_reference(cfg)
    # model
    if reference:
        from .reference import NAMES, kind_of

        try:
            kind_of(m.source.split(":", 1)[1])
        except ValueError:
            raise RecipeError(f"model.source: unknown reference model {m.source.split(':', 1)[1]!r}; choose one of "
                              f"{['reference:' + k for k in NAMES.values()]}, a pipeline directory or a hub id") from None
        for key, default in (("dtype", "float32"), ("device", "cpu")):
            if m[key] != default:
                raise RecipeError(f"model.{key}={m[key]} applies to pipelines; the reference models run in "
                                  "float32 on the CPU: remove it")
    if reference and m.transformer_class is not None:
        raise RecipeError("model.transformer_class applies to pipelines; the reference models know their class: "
                          "remove it")
    if m.dtype not in DTYPES:
        raise RecipeError(f"model.dtype must be one of {list(DTYPES)}, got {m.dtype!r}")
    if m.transformer_class is not None:
        from ._quiet import diffusers as _diffusers

        diffusers = _diffusers()

        cls = getattr(diffusers, m.transformer_class, None)
        if not (isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin)):
            raise RecipeError(f"model.transformer_class: {m.transformer_class!r} is not a diffusers model class "
                              "(e.g. FluxTransformer2DModel)")
    # calibration
    _positive("calibration.num_prompts", c.num_prompts, 1, MAX_PROMPTS)
    _positive("calibration.steps", c.steps, 1, MAX_STEPS)
    _positive("calibration.seed", c.seed, 0, 2**32 - 1)
    if reference:
        for key, what in (("prompts", "take digits, not a prompt file"), ("guidance", "sample with guidance 1.5"),
                          ("resolution", "are 16x16")):
            if c[key] is not None:
                raise RecipeError(f"calibration.{key} applies to pipelines; the reference models {what}: remove it")
    elif c.resolution is not None:
        _positive("calibration.resolution", c.resolution, 8, MAX_RESOLUTION)
    if c.guidance is not None and not 0 <= c.guidance <= 1000:
        raise RecipeError(f"calibration.guidance must be in [0, 1000], got {c.guidance}")
    # pruning
    if p.method not in METHODS:
        raise RecipeError(f"pruning.method: unknown method {p.method!r}; choose one of {sorted(METHODS)}")
    try:
        check_sparsity(p.sparsity)
        if p.pattern is not None:
            parse_pattern(p.pattern)
    except ValueError as err:
        raise RecipeError(f"pruning: {err}") from None
    _regexes("pruning.targets", p.targets)
    _regexes("pruning.ignore", p.ignore)
    for i, ov in enumerate(p.overrides):
        key = f"pruning.overrides[{i}]"
        if not ov.targets:
            raise RecipeError(f"{key}.targets: give at least one regex")
        _regexes(f"{key}.targets", ov.targets)
        if ov.sparsity is None and ov.pattern is None:
            raise RecipeError(f"{key}: set sparsity or pattern (an override with neither changes nothing)")
        try:
            if ov.sparsity is not None:
                check_sparsity(ov.sparsity)
            if ov.pattern is not None:
                parse_pattern(ov.pattern)
        except ValueError as err:
            raise RecipeError(f"{key}: {err}") from None
    try:
        make_sparsifier(p.method, 0.5, None, **OmegaConf.to_container(p.options))
    except (TypeError, ValueError) as err:
        raise RecipeError(f"pruning.options: {err}") from None
    # recovery, quantization, export, evaluation
    _positive("recovery.steps", r.steps, 0, MAX_SAMPLES)
    _positive("recovery.batch_size", r.batch_size, 1, MAX_BATCH)
    if not 0 < r.lr <= 1:
        raise RecipeError(f"recovery.lr must be in (0, 1], got {r.lr}")
    if r.steps == 0:
        defaults = RecoveryConfig()
        for key in ("lr", "batch_size", "distill"):
            if r[key] != getattr(defaults, key):
                raise RecipeError(f"recovery.{key} applies only with recovery.steps > 0: set recovery.steps or "
                                  "remove it")
    if r.steps > 0 and not reference:
        raise RecipeError("recovery.steps > 0 runs only on the reference models: for a pipeline, put "
                          "ditprune.callbacks.DiTPruning in your own Trainer with your data")
    if cfg.quantization.config is not None and cfg.quantization.config not in CONFIGS:
        raise RecipeError(f"quantization.config: unknown {cfg.quantization.config!r}; choose one of {sorted(CONFIGS)}")
    from .export import FORMATS

    if e.format not in FORMATS:
        raise RecipeError(f"export.format must be one of {list(FORMATS)}, got {e.format!r}")
    if p.structure:
        from .structuring import check_settings

        try:
            check_settings(p.structure, p.structure_sparsity, p.structure_method)
        except InputError as err:
            raise RecipeError(f"pruning.structure: {err}") from None
        if cfg.quantization.config and e.format == "diffusers":
            raise RecipeError("pruning.structure with quantization.config: export.format must be 'compressed' "
                              "(diffusers' loader cannot build a quantized model's smaller Linears)")
    if not e.output_dir:
        raise RecipeError("export.output_dir is empty")
    if ev.steps is not None:
        _positive("evaluation.steps", ev.steps, 1, MAX_STEPS)
    if reference:
        for name in ev.compare or []:
            if name not in METHODS:
                raise RecipeError(f"evaluation.compare: unknown method {name!r}; choose from {sorted(METHODS)}")
        if ev.n_samples is not None:
            _positive("evaluation.n_samples", ev.n_samples, 2, MAX_SAMPLES)
        for key in PIPELINE_EVAL_KEYS:
            if ev[key] is not None:
                raise RecipeError(f"evaluation.{key} applies to pipelines; the reference models are judged by "
                                  "their judge: remove it")
    else:
        for key in REFERENCE_EVAL_KEYS:
            if ev[key] is not None:
                raise RecipeError(f"evaluation.{key} applies to the reference models; for a pipeline set "
                                  "evaluation.clip_model (and prompts, num_prompts, ...): remove it")
        for key, top in (("num_prompts", MAX_PROMPTS), ("batch_size", MAX_BATCH)):
            if ev[key] is not None:
                _positive(f"evaluation.{key}", ev[key], 1, top)
        if ev.resolution is not None:
            _positive("evaluation.resolution", ev.resolution, 8, MAX_RESOLUTION)


def unused_evaluation(cfg: DictConfig) -> str | None:
    """A note when a pipeline recipe sets evaluation keys but not ``evaluation.clip_model`` (they
    describe an evaluation that ``ditprune prune`` does not run without a CLIP)."""
    ev = cfg.evaluation
    if is_reference(cfg) or ev.clip_model is not None:
        return None
    keys = [k for k in PIPELINE_EVAL_KEYS if k != "pruned" and ev[k] is not None]
    if ev.steps is not None:
        keys.append("steps")
    if keys:
        return (f"evaluation.{', evaluation.'.join(keys)} set, but evaluation.clip_model is not: the pruned "
                "transformer is not evaluated (set evaluation.clip_model to a local CLIP directory to evaluate it)")
    return ("no images were scored (evaluation.clip_model is not set): the 'removed' columns above are the "
            "fractions of a layer's output energy lost on the calibration inputs, not image quality; set evaluation.clip_model to a local CLIP directory "
            "for CLIP score, FD, PSNR and SSIM against the dense transformer")


def evaluation_settings(cfg: DictConfig) -> dict:
    """The reference evaluation's settings, defaults filled in."""
    ev = cfg.evaluation
    return {k: (list(ev[k]) if isinstance(ev[k], ListConfig) else ev[k]) if ev[k] is not None else v
            for k, v in EVALUATION_DEFAULTS.items()}


# -- preflight: what the recipe points at --------------------------------------------------------
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _check_source(source: str) -> None:
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "model_index.json").is_file():
            raise RecipeError(f"model.source: {source} is not a diffusers pipeline directory (no model_index.json)")
        return
    if not _HUB_ID.match(source) or source.startswith((".", "/", "~")):
        raise RecipeError(f"model.source: no such directory {source!r}, and it is not a hub id (org/name)")
    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE and not isinstance(try_to_load_from_cache(source, "model_index.json"), str):
        raise RecipeError(f"model.source: {source!r} is not in the local hub cache and HF_HUB_OFFLINE is set; "
                          "download it first or give a local pipeline directory")


def _check_device(device: str) -> None:
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise RecipeError(f"model.device: {device!r} is not a device (cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise RecipeError(f"model.device={device}: no such CUDA device on this machine; use model.device=cpu")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise RecipeError(f"model.device={device}: MPS is not available; use model.device=cpu")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise RecipeError(f"model.device: {device!r} is not supported (cpu, cuda, cuda:N, mps)")


MAX_PROMPT_BYTES = 64 << 20  # MJHQ-30K's meta_data.json is about 10 MB


def check_prompt_file(p: Path, key: str) -> None:
    """A prompt file must be a regular file of at most ``MAX_PROMPT_BYTES`` (a FIFO or a device
    would hang or never end); a missing one is left to the reader's own error."""
    if p.exists() and not p.is_file():
        raise RecipeError(f"{key}: {p} is not a regular file")
    if p.is_file() and p.stat().st_size > MAX_PROMPT_BYTES:
        raise RecipeError(f"{key}: {p} is {p.stat().st_size} bytes; a prompt file is at most "
                          f"{MAX_PROMPT_BYTES >> 20} MiB")


def read_prompt_file(path: str, key: str = "calibration.prompts") -> list[str]:
    p = Path(path).expanduser()
    try:
        check_prompt_file(p, key)
        prompts = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    except OSError as e:
        raise RecipeError(f"{key}: cannot read {path} ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{key}: {path} is not UTF-8 text (one prompt a line)") from None
    if not prompts:
        raise RecipeError(f"{key}: {path} has no prompts (one a line)")
    return prompts


def preflight(cfg: DictConfig, outputs: list[str], persistent: list[str] = ()) -> "Any":
    """Check what the recipe points at, before any model is loaded; returns the
    :class:`~ditprune._io.OutputDir` the run will write ``outputs`` (and, in place,
    ``persistent``) into."""
    from ._io import OutputDir
    from .quantize import CONFIGS

    m, c = cfg.model, cfg.calibration
    protect: list[str] = []
    if is_reference(cfg):
        from .reference import kind_of, weights_dir

        protect.append(str(weights_dir(kind_of(m.source.split(":", 1)[1]))))
    else:
        _check_source(m.source)
        _check_device(m.device)
        if Path(m.source).expanduser().exists():
            protect.append(m.source)
        else:
            from huggingface_hub import constants

            protect.append(constants.HF_HUB_CACHE)
        if c.prompts is not None:
            read_prompt_file(c.prompts)
        ev = cfg.evaluation
        for key, kind in (("clip_model", "dir"), ("prompts", "file"), ("reference_images", "dir"), ("inception", "file"),
                          ("image_reward", "file"), ("pruned", "dir")):
            value = ev[key]
            if value is not None and not (Path(value).expanduser().is_dir() if kind == "dir"
                                          else Path(value).expanduser().is_file()):
                raise RecipeError(f"evaluation.{key}: no such {'directory' if kind == 'dir' else 'file'}: {value}")
    q = cfg.quantization.config
    if q is not None and not CONFIGS[q][1]:
        import torch

        if not torch.cuda.is_available():
            raise RecipeError(f"quantization.config={q} needs a CUDA GPU; on CPU use one of "
                              f"{[n for n, (_, cpu) in CONFIGS.items() if cpu]}")
    if cfg.pruning.offload is not None:
        _check_device(cfg.pruning.offload)
    return OutputDir(cfg.export.output_dir, outputs, protect=protect, overwrite=cfg.export.overwrite,
                     persistent=persistent)
