"""Carry out a recipe: check it, load, calibrate, prune, [recover], [quantize], evaluate beside
the baselines (reference models), export. Every output goes to a staging directory and is
moved into ``export.output_dir`` together at the end (:class:`ditprune._io.OutputDir`)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ._io import OutputDir
from .pruning import PrunePlan, PruneReport, prune
from .recipe import evaluation_settings, is_reference, preflight, pruning_setting, read_prompt_file

__all__ = ["check_run", "run_recipe", "recipe_prune_kwargs"]

log = logging.getLogger(__name__)


def outputs_of(recipe: DictConfig) -> list[str]:
    """The entries a run of ``recipe`` writes into its output directory."""
    names = ["recipe.yaml", "metrics.json", "report.txt"]
    if not recipe.quantization.config:
        names.append("transformer")
    if is_reference(recipe):
        names.append("samples.png")
    return names


def check_run(recipe: DictConfig) -> OutputDir:
    """Every check that can be made before loading anything; returns the run's output directory."""
    return preflight(recipe, outputs_of(recipe))


def recipe_prune_kwargs(pruning: DictConfig, method: str) -> dict[str, Any]:
    """``prune`` keyword arguments from a recipe's pruning section, for ``method`` (the recipe's
    own method gets its options; baselines keep their defaults but prune the same layers)."""
    p = OmegaConf.to_container(pruning, resolve=True)
    kw = dict(targets=p["targets"], ignore=p["ignore"], overrides=p["overrides"] or None,
              block_sequential=p["block_sequential"], offload=p["offload"])
    if method == p["method"]:
        kw.update(p["options"])
    return kw


def run_recipe(recipe: DictConfig, out: OutputDir | None = None, progress: bool = True) -> dict:
    """Run ``recipe``; ``out`` from :func:`check_run` (checked again when None)."""
    out = out or check_run(recipe)
    with out:
        (out / "recipe.yaml").write_text(OmegaConf.to_yaml(recipe))
        result = (_run_reference if is_reference(recipe) else _run_pipeline)(recipe, out, progress)
    result["outputs"] = {what: str(out.final(name)) if name in out.names else name
                         for what, name in result["outputs"].items()}
    return result


def _write(out: OutputDir, report: PruneReport, metrics: Any) -> None:
    (out / "report.txt").write_text(str(report) + "\n")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str, allow_nan=False) + "\n")


def _run_pipeline(recipe: DictConfig, out: OutputDir, progress: bool) -> dict:
    from .models.loading import (BUILTIN_CLASSES, BUILTIN_PROMPTS, cycle_prompts, load_pipeline, pipeline_calibration,
                                 release_components)

    m, c, p = recipe.model, recipe.calibration, recipe.pruning
    pipe = load_pipeline(m.source, m.dtype, m.device, m.transformer_class)
    kw = recipe_prune_kwargs(p, p.method)
    offload = kw.pop("offload")
    plan = PrunePlan(pipe.transformer, p.method, **pruning_setting(p), **kw)  # checks the layers before calibrating
    is_dit = type(pipe).__name__ == "DiTPipeline"
    pool = read_prompt_file(c.prompts) if c.prompts else (BUILTIN_CLASSES if is_dit else BUILTIN_PROMPTS)
    calibration = pipeline_calibration(pipe, cycle_prompts(pool, c.num_prompts), c.steps, c.guidance, c.resolution,
                                       c.seed, progress=progress)  # kept on the CPU, moved a batch at a time
    release_components(pipe)  # text encoders and VAE leave the accelerator: only the transformer is pruned
    plan.attach()
    plan.calibrate(calibration, offload=offload, progress=progress)
    report = plan.report()
    plan.squash()
    pipe.transformer.save_pretrained(out / "transformer", safe_serialization=True)
    summary = {"method": p.method, "sparsity": report.sparsity, "layers": len(report.layers),
               "calibration_batches": len(calibration), "seconds": report.seconds}
    _write(out, report, summary)
    table = "| " + " | ".join(summary) + " |\n|" + "---|" * len(summary) + "\n| " + " | ".join(
        f"{v:.4f}" if isinstance(v, float) else str(v) for v in summary.values()) + " |"
    return {"rows": [summary], "table": table, "report": report,
            "outputs": {"model": "transformer", "layers": "report.txt", "metrics": "metrics.json"}}


def _run_reference(recipe: DictConfig, out: OutputDir, progress: bool) -> dict:
    from .evaluation.harness import Candidate, Comparison
    from .evaluation.report import markdown_table, save_grid

    kind = recipe.model.source.split(":", 1)[1]
    p, ev = recipe.pruning, evaluation_settings(recipe)
    main_label = f"{p.method} (recipe)"
    candidates = [Candidate("dense", None), Candidate(main_label, p.method)]
    candidates += [Candidate(m, m) for m in ev["compare"] if m != p.method]

    def prune_fn(model, calibration, method, **kw):
        return prune(model, calibration, method, **kw, **recipe_prune_kwargs(p, method))

    bench = Comparison(kind, recipe.calibration.num_prompts, recipe.calibration.steps, ev["n_samples"], ev["steps"],
                       calibration_seed=recipe.calibration.seed)
    rows = bench.run(candidates, [pruning_setting(p)], progress=progress, keep_models=True, prune_fn=prune_fn)
    main = next(r for r in rows if r["method"] == main_label)
    model = main["pruned"]
    if recipe.recovery.steps > 0 or recipe.quantization.config:
        from .recovery import recover_and_quantize

        model, extra = recover_and_quantize(bench.dense, bench.calibration, recipe, bench.evaluator, progress)
        rows.extend(extra)
    outputs = {}
    if recipe.quantization.config:
        outputs["model"] = "not exported: quantized export is not built yet (rerun without quantization.config)"
    else:
        model.save_pretrained(out / "transformer", safe_serialization=True)
        outputs["model"] = "transformer"
    save_grid({r["method"]: r["samples"] for r in rows}, out / "samples.png")
    outputs["samples"] = "samples.png"
    metrics = [{k: v for k, v in r.items() if k not in ("samples", "report", "pruned")} for r in rows]
    _write(out, main["report"], _finite(metrics))
    outputs.update(metrics="metrics.json", layers="report.txt")
    return {"rows": rows, "table": markdown_table(rows), "report": main["report"], "outputs": outputs}


def _finite(obj: Any) -> Any:
    """Strict JSON: a non-finite float (the dense model's infinite PSNR) becomes null."""
    if isinstance(obj, float):
        return obj if obj == obj and abs(obj) != float("inf") else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj
