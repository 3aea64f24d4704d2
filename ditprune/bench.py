"""``ditprune bench``: every method x sparsity x reference model in one run (same calibration,
evaluation set and seeds for all), or the ablation grid that decides the ``dit`` defaults."""

from __future__ import annotations

import json
from pathlib import Path

from ._io import atomic_file
from .evaluation.harness import Candidate, compare
from .evaluation.report import markdown_table, plot_quality

__all__ = ["METHOD_CANDIDATES", "run_bench"]

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
    rows = []
    settings = [{"sparsity": 0.5}] if quick else [{"sparsity": 0.5}, {"sparsity": 0.7}]
    balance = [Candidate("wanda", "wanda"), Candidate("dit alpha=auto", "dit")]
    balance += [Candidate(f"dit alpha={a}", "dit", {"alpha": a}) for a in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)]
    grouping = [Candidate(f"dit {g}", "dit", {"granularity": g}) for g in ("row", "layer", "clusters")]
    grouping += [Candidate("dit refine=0", "dit", {"refine": 0}),
                 Candidate("wanda mask + refine", "dit", {"alpha": 0.5, "granularity": "row"}),
                 Candidate("dit refine=256", "dit", {"refine": 256})]
    engine = [Candidate("dit whole-model", "dit", {"block_sequential": False})]
    rows += compare(kind, balance + grouping + engine, settings, progress=progress)
    for n_prompts, steps in ([(4, 2), (16, 10)] if quick else [(4, 2), (4, 10), (16, 2), (16, 5), (16, 10), (32, 10)]):
        for r in compare(kind, [Candidate("wanda", "wanda"), Candidate("dit", "dit")], [{"sparsity": 0.5}],
                         n_prompts=n_prompts, calib_steps=steps, progress=progress):
            r["method"] = f"{r['method']} calib {n_prompts}x{steps}"
            rows.append(r)
    return rows


def run_bench(out: Path, ablation: bool = False, quick: bool = False, progress: bool = True) -> dict:
    kinds = ["flux"] if quick else ["flux", "dit"]
    rows = []
    for kind in kinds:
        if ablation:
            rows += _ablation(kind, quick, progress)
        else:
            settings = SETTINGS[:1] + SETTINGS[-1:] if quick else SETTINGS
            rows += compare(kind, METHOD_CANDIDATES, settings, n_samples=50 if quick else 100, progress=progress)
    name = "ablation" if ablation else "bench"
    table = markdown_table(rows)
    outputs = {}
    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / f"{name}.md") as tmp:
        tmp.write_text(table + "\n")
    outputs["table"] = str(out / f"{name}.md")
    with atomic_file(out / f"{name}.json") as tmp:
        tmp.write_text(json.dumps([{k: v for k, v in r.items() if k not in ("samples", "report", "pruned")}
                                   for r in rows], indent=2, default=str) + "\n")
    outputs["json"] = str(out / f"{name}.json")
    if not ablation:
        outputs["plot"] = str(plot_quality(rows, out / f"{name}.png"))
    return {"rows": rows, "table": table, "outputs": outputs}
