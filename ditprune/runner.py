"""Carry out a recipe: check it, load, calibrate, prune, [recover], [quantize], evaluate beside
the baselines (reference models), export. Every output goes to a staging directory and is
moved into ``export.output_dir`` together at the end (:class:`ditprune._io.OutputDir`)."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from . import provenance
from ._io import OutputDir, strict_json
from .progress import PROGRESS_DIR, BlockProgress
from .errors import InputError
from .export import load_transformer, save_transformer
from .pruning import PrunePlan, PruneReport, prune
from .recipe import evaluation_settings, is_reference, preflight, pruning_setting, read_prompt_file

__all__ = ["check_run", "run_recipe", "recipe_prune_kwargs"]

log = logging.getLogger(__name__)


EVAL_OUTPUTS = ["evaluation.json", "evaluation.md", "grid.png"]
CONSOLE_COLUMNS = ["method", "setting", "judge_acc", "fd", "rel_err", "prune_s"]  # fits 100 columns


def evaluates_pipeline(recipe: DictConfig) -> bool:
    return not is_reference(recipe) and recipe.evaluation.clip_model is not None


def outputs_of(recipe: DictConfig) -> list[str]:
    """The entries a run of ``recipe`` writes into its output directory."""
    names = ["recipe.yaml", "metrics.json", "report.txt", "transformer"]
    if is_reference(recipe):
        names += ["samples.png", "results.md"]
    if recipe.pruning.allocation != "uniform":
        names.append("allocation.png")
    if evaluates_pipeline(recipe):
        names += EVAL_OUTPUTS
    return names


def check_run(recipe: DictConfig, names: list[str] | None = None) -> OutputDir:
    """Every check that can be made before loading anything; returns the run's output directory."""
    return preflight(recipe, names or outputs_of(recipe), ["images"] if evaluates_pipeline(recipe) else [])


def recipe_prune_kwargs(pruning: DictConfig, method: str) -> dict[str, Any]:
    """``prune`` keyword arguments from a recipe's pruning section, for ``method`` (the recipe's
    own method gets its options; baselines keep their defaults but prune the same layers). A
    recipe's model comes from disk, where its source stays: no in-memory backup is kept."""
    p = OmegaConf.to_container(pruning, resolve=True)
    kw = dict(targets=p["targets"], ignore=p["ignore"], overrides=p["overrides"] or None,
              block_sequential=p["block_sequential"], offload=p["offload"], backup=False,
              allocation=p["allocation"], allocation_range=p["allocation_range"], max_dense=p["max_dense"],
              allocation_options=p["allocation_options"] or None)
    if method == p["method"]:
        kw.update(p["options"])
    return kw


def _structure_settings(pruning: DictConfig) -> dict | None:
    """The recipe's structured step as the callback's keywords (None: the recipe has none)."""
    if not pruning.structure:
        return None
    return {"structure": pruning.structure, "structure_sparsity": pruning.structure_sparsity,
            "structure_method": pruning.structure_method}


def _structure(model, calibration, pruning: DictConfig, progress: bool):
    """The recipe's structured step (heads and channels removed), before the unstructured prune."""
    s = _structure_settings(pruning)
    if s is None:
        return None
    from .structuring import prune_structured

    return prune_structured(model, calibration, s["structure"], s["structure_sparsity"], s["structure_method"],
                            offload=pruning.offload, progress=progress)


def _recipe_plan(model, pruning: DictConfig) -> PrunePlan:
    """The recipe's prune of ``model`` in steps; building it checks targets and N:M against the
    model without touching it (``offload`` is an argument of ``calibrate``, read from the recipe),
    and the structured step's settings when the recipe has one."""
    if pruning.structure:
        from .structuring import check

        check(model, pruning.structure, pruning.structure_sparsity, pruning.structure_method)
    kw = recipe_prune_kwargs(pruning, pruning.method)
    kw.pop("offload")
    return PrunePlan(model, pruning.method, **pruning_setting(pruning), **kw)


class _Scratch:
    """The outputs of a rank other than 0: written to a temporary directory and dropped (rank 0
    writes the real ones); persistent entries (the image cache) are shared."""

    def __init__(self, real: OutputDir):
        self.real, self.names = real, real.names

    def __enter__(self) -> "_Scratch":
        self.dir = Path(tempfile.mkdtemp(prefix="ditprune-rank-"))
        return self

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def __truediv__(self, name: str) -> Path:
        return self.dir / name

    def final(self, name: str) -> Path:
        return self.real.final(name)

    def persistent(self, name: str) -> Path:
        return self.real.path / name


def run_recipe(recipe: DictConfig, out: OutputDir | None = None, progress: bool = True, fabric=None) -> dict:
    """Run ``recipe``; ``out`` from :func:`check_run` (checked again when None). Under Lightning
    Fabric with several devices every rank takes its share and rank 0 writes the outputs."""
    out = out or check_run(recipe)
    rank = fabric.global_rank if fabric is not None else 0
    target = out if rank == 0 else _Scratch(out)
    checkpoints = None
    with target:
        (target / "recipe.yaml").write_text(OmegaConf.to_yaml(recipe))
        if is_reference(recipe):
            if fabric is not None and fabric.world_size > 1:
                raise InputError("several devices apply to pipelines; the reference models run in one process")
            result = _run_reference(recipe, target, progress)
        else:
            checkpoints = BlockProgress(out.final(PROGRESS_DIR), recipe_key(recipe))
            result = _run_pipeline(recipe, target, progress, fabric, checkpoints)
    if checkpoints is not None and rank == 0:
        checkpoints.finish()  # committed: the per-block checkpoints are no longer needed
    result["outputs"] = {what: str(out.final(name)) if name in out.names else name
                         for what, name in result["outputs"].items()}
    return result


def _plot_allocation(recipe: DictConfig, report: PruneReport, out, model: str) -> dict:
    """``allocation.png`` when the recipe allocates sparsity per layer."""
    p = recipe.pruning
    if p.allocation == "uniform":
        return {}
    from .evaluation.report import plot_allocation

    setting = (f"at {p.pattern}, max_dense {p.max_dense}" if p.pattern else
               f"at {p.sparsity} (range +-{p.allocation_range})")
    plot_allocation(report.layers, out / "allocation.png", f"{model}: {p.method}, allocation '{p.allocation}' {setting}")
    return {"allocation": "allocation.png"}


STAGES = logging.getLogger("ditprune.stages")  # the CLI shows it on stdout (ditprune.cli)


def _stage(progress: bool, text: str) -> None:
    """One line per stage of a run (with progress shown: not -q, rank 0), at INFO on the
    ``ditprune.stages`` logger."""
    if progress:
        STAGES.info("%s", text)


def _write(out: OutputDir, report: PruneReport, metrics: Any) -> None:
    (out / "report.txt").write_text(str(report) + "\n")
    (out / "metrics.json").write_text(strict_json(metrics, indent=2, default=str) + "\n")


def _eval_job(recipe: DictConfig):
    from .evaluation.pipeline import EvalJob, read_eval_prompts
    from .models.loading import builtin_prompts

    ev = recipe.evaluation
    prompts = read_eval_prompts(ev.prompts, ev.num_prompts) if ev.prompts else list(builtin_prompts())[: ev.num_prompts]
    return EvalJob(prompts, seed=ev.seed or 0, steps=ev.steps, guidance=ev.guidance, resolution=ev.resolution,
                   batch_size=ev.batch_size or 4)


def _device(recipe: DictConfig, fabric) -> str:
    return str(fabric.device) if fabric is not None and fabric.world_size > 1 else recipe.model.device


def recipe_key(recipe: DictConfig) -> str:
    """What a resumed run must share with the one that saved the checkpoints: the model, the
    calibration and the pruning sections, and this version of ditprune."""
    from . import __version__

    parts = {k: OmegaConf.to_container(recipe[k], resolve=True) for k in ("model", "calibration", "pruning")}
    return hashlib.sha256(json.dumps({**parts, "ditprune": __version__}, sort_keys=True, default=str).encode()).hexdigest()


def _run_pipeline(recipe: DictConfig, out, progress: bool, fabric=None, checkpoints: BlockProgress | None = None) -> dict:
    from .evaluation.pipeline import ImageStore, generate
    from .models.loading import (BUILTIN_CLASSES, builtin_prompts, cycle_prompts, load_pipeline, pipeline_calibration,
                                 release_components, restore_components)

    m, c, p = recipe.model, recipe.calibration, recipe.pruning
    rank, world = (fabric.global_rank, fabric.world_size) if fabric is not None else (0, 1)
    _stage(progress, f"loading the pipeline {m.source} ({m.dtype})")
    pipe = load_pipeline(m.source, m.dtype, _device(recipe, fabric), m.transformer_class)
    plan = _recipe_plan(pipe.transformer, p)  # checks the layers before calibrating
    job = _eval_job(recipe) if evaluates_pipeline(recipe) else None
    if job is not None:  # the dense images first: no second copy of the transformer is needed
        generate(pipe, ImageStore(out.persistent("images"), "dense"), job, list(range(rank, len(job.prompts), world)),
                 progress, "generating with the dense transformer")
    is_dit = type(pipe).__name__ == "DiTPipeline"
    pool = read_prompt_file(c.prompts) if c.prompts else (BUILTIN_CLASSES if is_dit else list(builtin_prompts()))
    mine = list(range(rank, c.num_prompts, world))  # this rank's share of the calibration prompts
    prompts = cycle_prompts(pool, c.num_prompts)
    _stage(progress, f"recording calibration: {c.num_prompts} prompts x {c.steps} sampler steps")
    calibration = pipeline_calibration(pipe, [prompts[i] for i in mine], c.steps, c.guidance, c.resolution, c.seed,
                                       progress=progress, indices=mine)  # kept on the CPU, a batch at a time
    text_modules = release_components(pipe)  # text encoders and VAE off the accelerator while pruning
    structured = None
    if p.structure:
        _stage(progress, f"removing {p.structure_sparsity:g} of the {p.structure} ({p.structure_method})")
        structured = _structure(pipe.transformer, calibration, p, progress)
        log.info("%s", structured.summary())
        plan = _recipe_plan(pipe.transformer, p)  # the unstructured prune of what remains
    plan.attach()
    _stage(progress, f"pruning {len(plan.settings)} layers with {p.method}")
    if plan.by_block is None:
        checkpoints = None  # a whole-model prune has no blocks to resume from
    elif checkpoints is not None and checkpoints.done:
        log.warning("resuming: %d blocks restored from %s", len(checkpoints.done), checkpoints.directory)
    plan.calibrate(calibration, offload=p.offload, progress=progress, squash=True,  # statistics summed over ranks
                   checkpoints=checkpoints)
    report = plan.report()
    plan.squash()
    if recipe.quantization.config:
        from .quantize import quantize

        _stage(progress, f"quantizing {len(report.layers)} layers: {recipe.quantization.config}")
        quantize(pipe.transformer, recipe.quantization.config, targets=[r.name for r in report.layers])
    _stage(progress, f"saving the transformer ({recipe.export.format})")
    save_transformer(pipe.transformer, out / "transformer", recipe.export.format)
    removed = sorted(r.info["removed"] for r in report.layers if "removed" in r.info)
    summary = {"method": p.method, "sparsity": report.sparsity, "layers": len(report.layers),
               "calibration_batches": len(calibration), "ranks": world, "seconds": report.seconds}
    if structured is not None:  # what the structured step kept of the transformer's parameters
        summary["params_kept"] = structured.params_after / structured.params_before
    if removed:  # a signal of quality without a CLIP: output energy lost per layer, on the calibration
        summary.update(removed_median=removed[len(removed) // 2], removed_worst=removed[-1])
    _write(out, report, summary)
    outputs = {"model": "transformer", "layers": "report.txt", "metrics": "metrics.json"}
    outputs.update(_plot_allocation(recipe, report, out, m.source))
    heads = {"calibration_batches": "batches", "removed_median": "removed (median)", "removed_worst": "removed (worst)",
             "params_kept": "params kept"}
    table = "| " + " | ".join(heads.get(k, k) for k in summary) + " |\n|" + "---|" * len(summary) + "\n| " + " | ".join(
        f"{v:.4f}" if isinstance(v, float) else str(v) for v in summary.values()) + " |"
    if job is not None:
        restore_components(pipe, text_modules)
        evaluation = _evaluate(recipe, pipe, None, pipe.transformer, job, out, progress, rank, world)
        table += "\n\n" + evaluation
        outputs.update(evaluation="evaluation.md", grid="grid.png")
    return {"rows": [summary], "table": table, "report": report, "outputs": outputs}


def _recorded_label(recipe: DictConfig) -> str:
    """``ditprune eval``: what the model in ``evaluation.pruned`` records it is; a recipe whose
    pruning section says otherwise is refused (the report would be titled with the wrong model)."""
    info = provenance.read(recipe.evaluation.pruned)
    p = recipe.pruning
    if not info.get("method"):
        return f"{p.method} {p.pattern or p.sparsity} (as the recipe says: the model records no pruning)"
    wrong = [k for k in ("method", "pattern") if info.get(k) != p[k]]
    if not p.pattern and not math.isclose(float(info.get("sparsity") or -1), p.sparsity, abs_tol=1e-9):
        wrong.append("sparsity")
    if wrong:
        fix = " ".join(f"pruning.{k}={'null' if info.get(k) is None else info[k]}" for k in wrong)
        raise InputError(f"{recipe.evaluation.pruned} was pruned as {provenance.describe(info)} (its config.json says "
                         f"so), the recipe says {p.method} {p.pattern or p.sparsity}: pass {fix}")
    return provenance.describe(info)


def _evaluate(recipe, pipe, dense, pruned, job, out, progress, rank, world, label: str | None = None) -> str:
    """Generate (or reuse) images, score them, and (rank 0) write the evaluation outputs."""
    from .evaluation.pipeline import ImageStore, Scorer, evaluate_pipeline, markdown_report, save_pairs

    ev = recipe.evaluation
    _stage(progress and rank == 0, f"evaluating {len(job.prompts)} prompts against the dense transformer")
    scorer = Scorer(ev.clip_model, pruned.device, ev.inception, ev.image_reward)
    summary = evaluate_pipeline(pipe, dense, pruned, job, out.persistent("images"), scorer, ev.reference_images,
                                rank, world, progress)
    label = label or provenance.describe(provenance.recorded(pruned))
    title = f"{recipe.model.source}: {label} vs dense"
    text = markdown_report(summary, title)
    (out / "evaluation.json").write_text(strict_json(summary) + "\n")
    (out / "evaluation.md").write_text(text + "\n")
    store_d, store_p = ImageStore(out.persistent("images"), "dense"), ImageStore(out.persistent("images"), "pruned")
    save_pairs(store_d, store_p, job, out / "grid.png", label=label)
    return text


def run_eval(recipe: DictConfig, progress: bool = True, fabric=None) -> dict:
    """``ditprune eval``: the dense pipeline against ``evaluation.pruned``, same prompts and seeds."""
    from .models.loading import load_pipeline

    if not evaluates_pipeline(recipe) or recipe.evaluation.pruned is None:
        raise InputError("ditprune eval needs a pipeline (model.source), evaluation.clip_model and "
                         "evaluation.pruned (the pruned transformer's directory)")
    label = _recorded_label(recipe)
    out = check_run(recipe, ["eval_recipe.yaml"] + EVAL_OUTPUTS)  # never over a prune run's recipe.yaml
    rank, world = (fabric.global_rank, fabric.world_size) if fabric is not None else (0, 1)
    target = out if rank == 0 else _Scratch(out)
    m = recipe.model
    with target:
        (target / "eval_recipe.yaml").write_text(OmegaConf.to_yaml(recipe))
        pipe = load_pipeline(m.source, m.dtype, _device(recipe, fabric), m.transformer_class)
        pruned = load_transformer(recipe.evaluation.pruned, pipe.transformer.device)
        text = _evaluate(recipe, pipe, pipe.transformer, pruned, _eval_job(recipe), target, progress, rank, world,
                         label)
    return {"table": text, "outputs": {"evaluation": str(out.final("evaluation.md")), "json": str(out.final("evaluation.json")),
                                       "grid": str(out.final("grid.png")), "images": str(out.path / "images")}}


def _run_reference(recipe: DictConfig, out: OutputDir, progress: bool) -> dict:
    from .evaluation.harness import Candidate, Comparison
    from .evaluation.report import markdown_table, save_grid

    from .reference import load

    kind = recipe.model.source.split(":", 1)[1]  # flux-layout / dit-xl-layout (or their short names)
    p, ev = recipe.pruning, evaluation_settings(recipe)
    _recipe_plan(load(kind), p)  # targets and N:M checked before calibrating
    main_label = f"{p.method} (recipe)"
    candidates = [Candidate("dense", None), Candidate(main_label, p.method)]
    candidates += [Candidate(m, m) for m in ev["compare"] if m != p.method]

    def prune_fn(model, calibration, method, **kw):  # every candidate after the same structured step
        _structure(model, calibration, p, False)
        return prune(model, calibration, method, **kw, **recipe_prune_kwargs(p, method))

    _stage(progress, f"loading {kind}, recording its calibration ({recipe.calibration.num_prompts} prompts x "
                     f"{recipe.calibration.steps} steps) and its evaluation set ({ev['n_samples']} samples)")
    bench = Comparison(kind, recipe.calibration.num_prompts, recipe.calibration.steps, ev["n_samples"], ev["steps"],
                       calibration_seed=recipe.calibration.seed)
    _stage(progress, f"pruning and evaluating: {', '.join(c.label for c in candidates)}")
    rows = bench.run(candidates, [pruning_setting(p)], progress=progress, keep_models=True, prune_fn=prune_fn)
    main = next(r for r in rows if r["method"] == main_label)
    model = main["pruned"]
    if recipe.recovery.steps > 0 or recipe.quantization.config:
        from .recovery import recover_and_quantize

        r = recipe.recovery
        stages = ([f"recovering ({r.steps} steps)"] if r.steps else []) + (
            [f"quantizing ({recipe.quantization.config})"] if recipe.quantization.config else [])
        _stage(progress, " then ".join(stages))
        model, extra = recover_and_quantize(bench.dense, bench.calibration, bench.evaluator, method=p.method,
                                            setting=pruning_setting(p), prune_kwargs=recipe_prune_kwargs(p, p.method),
                                            steps=r.steps, lr=r.lr, batch_size=r.batch_size, distill=r.distill,
                                            quantize=recipe.quantization.config, progress=progress,
                                            structure=_structure_settings(p))
        rows.extend(extra)
    _stage(progress, f"saving the transformer ({recipe.export.format})")
    save_transformer(model, out / "transformer", recipe.export.format)
    outputs = {"model": "transformer"}
    save_grid({r["method"]: r["samples"] for r in rows}, out / "samples.png")
    outputs["samples"] = "samples.png"
    metrics = [{k: v for k, v in r.items() if k not in ("samples", "report", "pruned")} for r in rows]
    _write(out, main["report"], metrics)
    (out / "results.md").write_text(f"# {rows[0]['model']}\n\n{markdown_table(rows)}\n")
    outputs.update(metrics="metrics.json", layers="report.txt", results="results.md")
    outputs.update(_plot_allocation(recipe, main["report"], out, rows[0]["model"]))
    table = f"{rows[0]['model']} (every column, with intervals: results.md)\n\n" + markdown_table(
        rows, CONSOLE_COLUMNS, intervals=("judge_acc", "rel_err"))
    return {"rows": rows, "table": table, "report": main["report"], "outputs": outputs}


