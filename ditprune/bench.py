"""``ditprune bench``: every method x sparsity x reference model in one run (same calibration,
evaluation set and seeds for all), or the ablation grid that decides the ``dit`` defaults."""

from __future__ import annotations

from pathlib import Path

from ._io import atomic_file, strict_json
from .evaluation.harness import Candidate, compare
from .evaluation.report import COLUMNS, markdown_table, pivot_table, plot_quality

__all__ = ["METHOD_CANDIDATES", "run_bench", "tables"]

METHOD_CANDIDATES = [
    Candidate("dense", None),
    Candidate("magnitude", "magnitude"),
    Candidate("ria", "ria"),
    Candidate("wanda", "wanda"),
    Candidate("dit", "dit"),
    Candidate("sparsegpt", "sparsegpt"),
    Candidate("dit+obs", "dit", {"reconstruct": True}),
]
SETTINGS = [{"sparsity": 0.5}, {"sparsity": 0.6}, {"sparsity": 0.7}, {"pattern": "2:4"}]


def _ablation(kind: str, quick: bool, progress: bool) -> list[dict]:
    """Every knob of ``dit``, one at a time against the default, on the same dense model,
    calibration and evaluation seeds."""
    settings = [{"sparsity": 0.5}] if quick else [{"sparsity": 0.5}, {"sparsity": 0.7}]
    C = Candidate
    grid = [C("wanda", "wanda"), C("sparsegpt", "sparsegpt"), C("dit (default)", "dit")]
    grid += [C(f"dit alpha={a}", "dit", {"alpha": a}) for a in (0.3, 0.4, 0.5, 0.6)]
    grid += [C(f"dit granularity={g}", "dit", {"granularity": g}) for g in ("row", "layer")]
    grid += [C("dit refine=0 (no search)", "dit", {"refine": 0}), C("dit refine=4", "dit", {"refine": 4}),
             C("dit refine=16", "dit", {"refine": 16}), C("wanda mask + search", "dit", {"alpha": 0.5, "granularity": "row"})]
    grid += [C("dit shortlist=4", "dit", {"shortlist": 4}), C("dit shortlist=32", "dit", {"shortlist": 32}),
             C("dit sample_rows=64", "dit", {"sample_rows": 64}), C("dit holdout=false", "dit", {"holdout": False}),
             C("dit timestep_weighting=log_decrease", "dit", {"timestep_weighting": "log_decrease"}),
             C("dit whole-model calibration", "dit", {"block_sequential": False})]
    grid += [C("dit reconstruct, polish=4", "dit", {"reconstruct": True, "polish": 4}),
             C("dit reconstruct (polish=6)", "dit", {"reconstruct": True}),
             C("dit reconstruct, polish=16", "dit", {"reconstruct": True, "polish": 16})]
    rows = compare(kind, grid if not quick else grid[:4], settings, progress=progress)
    for n_prompts, steps in ([(4, 2), (16, 10)] if quick else [(4, 2), (4, 10), (16, 2), (16, 10), (32, 10)]):
        for r in compare(kind, [Candidate("wanda", "wanda"), Candidate("dit", "dit")], [{"sparsity": 0.5}],
                         n_prompts=n_prompts, calib_steps=steps, progress=progress):
            r["method"] = f"{r['method']} calib {n_prompts}x{steps}"
            rows.append(r)
    return rows


def tables(rows: list[dict], ablation: bool = False, every_row: bool = True) -> str:
    """The markdown of a bench: denoiser error, judge accuracy (and FD, for the method comparison)
    at a glance, settings as columns, then (``every_row``) every row with its intervals."""
    parts = []
    for metric, higher in (("rel_err", False), ("judge_acc", True)) + (() if ablation else (("fd", False),)):
        better = "higher" if higher else "lower"
        parts.append(f"{COLUMNS[metric][0].replace(' [95%]', '')} ({better} is better; bold: best, and its 95% "
                     "interval overlaps no other method's):\n\n" + pivot_table(rows, metric, higher))
    if every_row:
        parts.append("Every row, with 95% intervals:\n\n" + markdown_table(rows))
    return "\n\n".join(parts)


def run_bench(out: Path, ablation: bool = False, quick: bool = False, progress: bool = True) -> dict:
    kinds = ["flux"] if quick else ["flux", "dit"]
    rows = []
    for kind in kinds:
        if ablation:
            rows += _ablation(kind, quick, progress)
        else:
            settings = SETTINGS[:1] + SETTINGS[-1:] if quick else SETTINGS
            # 1000 samples: judge accuracy to about +-1 point (Wilson); paired changes vs dense are finer
            rows += compare(kind, METHOD_CANDIDATES, settings, n_samples=50 if quick else 1000, progress=progress)
    name = "ablation" if ablation else "bench"
    table = tables(rows, ablation)
    outputs = {}
    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / f"{name}.md") as tmp:
        tmp.write_text(table + "\n")
    outputs["table"] = str(out / f"{name}.md")
    with atomic_file(out / f"{name}.json") as tmp:
        tmp.write_text(strict_json([{k: v for k, v in r.items() if k not in ("samples", "report", "pruned")}
                                    for r in rows]) + "\n")
    outputs["json"] = str(out / f"{name}.json")
    if not ablation:
        outputs["plot"] = str(plot_quality(rows, out / f"{name}.png"))
    console = tables(rows, ablation, every_row=False) + f"\n\nEvery row, with 95% intervals: {name}.md"
    return {"rows": rows, "table": console, "outputs": outputs}
