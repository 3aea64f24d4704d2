"""Sparsity per layer: ``uniform`` vs ``owl`` vs ``auto`` on a shipped reference model, every
method on the same dense model, calibration (16 prompts x 10 steps) and evaluation seeds.

    python benchmarks/allocation.py --model flux --methods wanda,dit+rec --sparsities 0.7,0.8 \\
        --variants uniform,owl,auto,auto:none [--samples 50] [--out benchmarks/results/allocation.md]

A variant is an allocation, with ``:none`` for ``auto`` without the measured output gains
(``allocation_options={"gains": "none"}``: every layer's relative error counts alike),
``:blocks`` for gains measured for a block's layers together (``{"gains": "blocks"}``, see
``ditprune.gains.output_gains``; the default measures every layer alone) and
``:obs`` for ``auto`` with Optimal Brain Surgeon removal curves (``{"curve": "obs"}``),
``:sgpt`` for ``auto`` with curves SparseGPT measures on sampled rows (``{"curve": "sparsegpt"}``) and
``:dense0.1`` for ``auto`` with ``max_dense=0.1`` (with an N:M setting, e.g. ``--sparsities 2:4``:
which layers stay dense; ``auto:dense0.1+none`` without the gains), ``:gb1`` for ``gain_batches=1`` and
``:gs2`` for gains measured at both ends of the range (``gain_sparsities=2``), ``:probes`` for
gains from random probes of the output (``{"gains": "probes"}``; ``:probes8`` with 8 probes),
``:pass4`` for an allocation pass on 4 calibration batches (``{"batches": 4}``), ``:range0.3`` for
``allocation_range=0.3``; parts combine with ``+``
(``auto:blocks+gb1+pass4``); ``dit+rec`` is ``dit`` with ``reconstruct=True``. Prints one markdown
row per run as it ends. ``--diagonal-gains`` (an ablation, for the whole run): a gain's
denominator is Wanda's removed energy by the diagonal also with SparseGPT's curves, as before
837eb5c, instead of on the Gram matrix (:func:`ditprune.allocation.gram_removed`).

    python benchmarks/allocation.py --model flux --methods wanda,sparsegpt,dit+rec --sparsities 2:4 \\
        --variants uniform,auto:dense0.1
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    from ditprune.evaluation.harness import Candidate, Comparison

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="flux", help="flux (flux-layout) or dit (dit-xl-layout)")
    p.add_argument("--methods", default="wanda,dit+rec")
    p.add_argument("--sparsities", default="0.7,0.8")
    p.add_argument("--variants", default="uniform,owl,auto")
    p.add_argument("--samples", type=int, default=50, help="evaluation samples per row")
    p.add_argument("--out", help="also write the table to this markdown file")
    p.add_argument("--diagonal-gains", action="store_true", help="ablation: gains' denominators by the diagonal")
    args = p.parse_args(argv)
    if args.diagonal_gains:
        import ditprune.allocation as A

        A.gram_removed = lambda w, gram, energy, s, rows=128: A.value_at(A.removal_curve(w, energy), s)
    bench = Comparison(args.model, 16, 10, args.samples, 20)
    candidates = []
    for m in args.methods.split(","):
        method, options = ("dit", {"reconstruct": True}) if m == "dit+rec" else (m, {})
        for v in args.variants.split(","):
            allocation, _, variant = v.partition(":")
            options_of = {"": {}, "none": {"gains": "none"}, "blocks": {"gains": "blocks"}, "obs": {"curve": "obs"}, "sgpt": {"curve": "sparsegpt"}}
            extra = {"allocation": allocation}
            for part in filter(None, variant.split("+")):  # e.g. auto:dense0.1+none, auto:blocks+gb1+pass4
                if part.startswith("dense"):
                    extra["max_dense"] = float(part[len("dense"):])
                elif part.startswith("gb"):
                    extra["allocation_options"] = {**extra.get("allocation_options", {}), "gain_batches": int(part[2:])}
                elif part.startswith("gs"):
                    extra["allocation_options"] = {**extra.get("allocation_options", {}), "gain_sparsities": int(part[2:])}
                elif part.startswith("probes"):  # probes16: gains by 16 probes (probes alone: the default count)
                    extra["allocation_options"] = {**extra.get("allocation_options", {}), "gains": "probes",
                                                   **({"probes": int(part[6:])} if part[6:] else {})}
                elif part.startswith("pass"):
                    extra["allocation_options"] = {**extra.get("allocation_options", {}), "batches": int(part[4:])}
                elif part.startswith("range"):
                    extra["allocation_range"] = float(part[len("range"):])
                else:
                    extra["allocation_options"] = {**extra.get("allocation_options", {}), **options_of[part]}
            candidates.append(Candidate(f"{m} {v}", method, {**options, **extra}))
    lines = [f"{bench.name}, {args.samples} evaluation samples per row", "",
             "| method, allocation | setting | sparsity | denoiser rel. err [95%] | judge acc [95%] | prune s |",
             "|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for s in args.sparsities.split(","):
        setting = {"pattern": s} if ":" in s else {"sparsity": float(s)}
        for row in bench.run(candidates, [setting], progress=False):
            ci = row["ci"]
            lines.append(f"| {row['method']} | {row['setting']} | {row['sparsity']:.3f} | {row['rel_err']:.4f} "
                         f"[{ci['rel_err'][0]:.4f}, {ci['rel_err'][1]:.4f}] | {row['judge_acc']:.2f} "
                         f"[{ci['judge_acc'][0]:.2f}, {ci['judge_acc'][1]:.2f}] | {row['prune_s']:.1f} |")
            print(lines[-1], flush=True)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
