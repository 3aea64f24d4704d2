"""``dit`` with ``reconstruct=True`` on both reference models: denoiser error, judge accuracy and
prune seconds per setting, for one set of options (so two runs, e.g. at two commits or with two
``polish`` counts, compare on the same models, calibration and seeds).

    python benchmarks/reconstruct.py                               # the shipped defaults
    python benchmarks/reconstruct.py --options '{"polish": 16}' --settings 0.5,0.7
    PYTHONPATH=/path/to/other/checkout python benchmarks/reconstruct.py   # another version

Prints a markdown table (100 evaluation samples per row: compare runs, not intervals)."""

from __future__ import annotations

import argparse
import json

from ditprune.evaluation.harness import Candidate, Comparison


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--options", default="{}", help="JSON: options of the dit method beside reconstruct=True")
    p.add_argument("--settings", default="0.5,0.6,0.7,2:4", help="sparsities and N:M patterns, comma-separated")
    p.add_argument("--models", default="flux,dit")
    args = p.parse_args()
    options = {"reconstruct": True, **json.loads(args.options)}
    settings = [{"pattern": s} if ":" in s else {"sparsity": float(s)} for s in args.settings.split(",")]
    print(f"dit {json.dumps(options)}\n\n| model | setting | denoiser rel. err | judge acc | prune s |\n|---|---|---|---|---|")
    for kind in args.models.split(","):
        rows = Comparison(kind, 16, 10, 100, 20).run([Candidate("dit", "dit", options)], settings, progress=False)
        for r in rows:
            print(f"| {r['model']} | {r['setting']} | {r['rel_err']:.5f} | {r['judge_acc']:.3f} | {r['prune_s']:.1f} |",
                  flush=True)


if __name__ == "__main__":
    main()
