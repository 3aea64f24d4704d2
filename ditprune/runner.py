"""Carry out a recipe: load, calibrate, prune (with per-target overrides), [recover], [quantize],
evaluate beside the baselines, export."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ._io import atomic_dir, atomic_file
from .pruning import PruneReport, prune
from .recipe import pruning_setting

__all__ = ["run_recipe", "prune_with_overrides"]

log = logging.getLogger(__name__)


def prune_with_overrides(model, calibration, method: str, pruning: DictConfig | dict, **kw: Any) -> PruneReport:
    """``prune`` as a recipe's ``pruning`` section says; ``kw`` are further ``prune`` arguments
    (``sparsity`` or ``pattern``, ``progress``). Each override (targets + sparsity/pattern) is a
    prune pass of its own over its targets; the main pass then prunes the remaining targets."""
    p = OmegaConf.to_container(pruning, resolve=True) if isinstance(pruning, DictConfig) else dict(pruning)
    common = dict(method=method, block_sequential=p.get("block_sequential", True), **kw)
    if method == p.get("method"):  # the recipe's options are its method's; baselines keep their defaults
        common.update(p.get("options", {}))
    calibration = list(calibration)
    taken: list[str] = []
    reports = []
    for ov in p.get("overrides", []):
        local = dict(common, sparsity=ov["sparsity"] if ov.get("sparsity") is not None else kw.get("sparsity", 0.5),
                     pattern=ov.get("pattern"))
        reports.append(prune(model, calibration, targets=ov["targets"], ignore=p.get("ignore"), **local))
        taken += ov["targets"]
    main = prune(model, calibration, targets=p.get("targets"), ignore=(p.get("ignore") or []) + taken or None, **common)
    if reports:
        main.layers = [layer for r in reports for layer in r.layers] + main.layers
    return main


def run_recipe(recipe: DictConfig, progress: bool = True) -> dict:
    out = Path(recipe.export.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / "recipe.yaml") as tmp:
        tmp.write_text(OmegaConf.to_yaml(recipe))
    if not recipe.model.source.startswith("reference:"):
        from .models.loading import run_pipeline_recipe

        return run_pipeline_recipe(recipe, out, progress)
    return _run_reference(recipe, out, progress)


def _run_reference(recipe: DictConfig, out: Path, progress: bool) -> dict:
    from .evaluation.harness import Candidate, Comparison
    from .evaluation.report import markdown_table, save_grid

    kind = recipe.model.source.split(":", 1)[1]
    p = recipe.pruning
    setting = pruning_setting(p)
    main_label = f"{p.method} (recipe)"
    candidates = [Candidate("dense", None), Candidate(main_label, p.method)]
    candidates += [Candidate(m, m) for m in recipe.evaluation.compare if m != p.method]

    def prune_fn(model, calibration, method, **kw):
        return prune_with_overrides(model, calibration, method, p, **kw)

    bench = Comparison(kind, recipe.calibration.num_prompts, recipe.calibration.steps,
                       recipe.evaluation.n_samples, recipe.evaluation.steps)
    rows = bench.run(candidates, [setting], progress=progress, keep_models=True, prune_fn=prune_fn)
    main = next(r for r in rows if r["method"] == main_label)
    model = main["pruned"]
    if recipe.recovery.steps > 0 or recipe.quantization.config:
        from .recovery import recover_and_quantize

        model, extra = recover_and_quantize(bench.dense, bench.calibration, recipe, bench.evaluator, progress)
        rows.extend(extra)
    outputs = {}
    if recipe.quantization.config:
        outputs["model"] = "not exported: safetensors cannot hold torchao's quantized tensors (rerun without quantization.config)"
    else:
        with atomic_dir(out / "model") as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
        outputs["model"] = str(out / "model")
    outputs["samples"] = str(save_grid({r["method"]: r["samples"] for r in rows}, out / "samples.png"))
    table = markdown_table(rows)
    metrics = [{k: v for k, v in r.items() if k not in ("samples", "report", "pruned")} for r in rows]
    with atomic_file(out / "metrics.json") as tmp:
        tmp.write_text(json.dumps(metrics, indent=2, default=str) + "\n")
    outputs["metrics"] = str(out / "metrics.json")
    with atomic_file(out / "report.txt") as tmp:
        tmp.write_text(str(main["report"]) + "\n")
    outputs["layers"] = str(out / "report.txt")
    return {"rows": rows, "table": table, "outputs": outputs}
