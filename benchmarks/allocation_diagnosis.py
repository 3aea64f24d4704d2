"""Why ``allocation="auto"`` gains less on one reference model than on the other: its own
prediction beside the measurement, for ``dit`` with ``reconstruct=True``.

    python benchmarks/allocation_diagnosis.py --model dit --sparsities 0.7,0.8 [--range 0.2] [--method wanda]

For each sparsity, three prunes of the same dense model on the same calibration and seeds:
``uniform``; ``auto`` as shipped (SparseGPT's removal curves); and ``auto`` with each layer's
curve measured by the method itself (``dit`` with ``reconstruct=True`` on the whole layer at the
same 9 sparsities plus 0, the fraction of the layer's output energy it loses on the calibration
Gram matrix, lower convex hull), a diagnosis only: at FLUX.1-dev's shapes it costs several times
SparseGPT's curve. Each row prints the measured denoiser error as a multiple of uniform's and
what ``auto`` itself predicted: ``sum_l g_l e_l(s_l)`` at its allocation over the same sum at
the uniform sparsity (its curves and measured gains), and the relative error energy of the
model's output on the calibration batches themselves, where the prediction is made (again
over uniform's). ``--method wanda``: the first two rows for Wanda (its curve is the shipped
one). A prediction near 1 means the allocation sees little to gain within the range; a
calibration ratio above the prediction means the curves, the gains or the additivity they
assume miss what the prune does; an evaluation ratio above the calibration's, that the
evaluation's inputs (held-out digits noised at 5 timesteps) differ from the calibration's
(the dense sampler's trajectories).
"""

from __future__ import annotations

import argparse

import torch


def method_curve(weight: torch.Tensor, stats, lo: float, hi: float) -> torch.Tensor:
    """The output energy ``dit`` with ``reconstruct=True`` loses on the whole layer at 9
    sparsities across [lo, hi] (and 0), as a fraction of the layer's, on the Gram matrix."""
    from ditprune.allocation import hull_curve
    from ditprune.sparsifiers import DiTPruningSparsifier

    h, w = stats.gram.double(), weight.double()
    total = float(((w @ h) * w).sum())
    xs = sorted({0.0, *(lo + (hi - lo) * k / 8 for k in range(9))})
    ys = [0.0]
    for s in xs[1:]:
        sp = DiTPruningSparsifier(sparsity=s, reconstruct=True)
        keep, new, _ = sp.compute_mask(weight.detach(), stats, **sp.defaults)
        d = w - (new.double() if new is not None else w) * keep.double()
        ys.append(min(1.0, float(((d @ h) * d).sum()) / max(total, 1e-300)))
    return hull_curve(xs, ys)


@torch.no_grad()
def calibration_error(dense, pruned, batches: list[dict]) -> float:
    """The pruned model's output error energy on ``batches`` over the dense output's."""
    from ditprune.models import prediction

    def out(model, b):
        return prediction(model(**b)).float()

    err = total = 0.0
    for b in batches:
        d = out(dense, b)
        err += float((out(pruned, b) - d).pow(2).sum())
        total += float(d.pow(2).sum())
    return err / total


def main(argv: list[str] | None = None) -> None:
    import ditprune.allocating as allocating
    import ditprune.allocation as A
    from ditprune.evaluation.harness import Candidate, Comparison

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="dit", help="flux (flux-layout) or dit (dit-xl-layout)")
    p.add_argument("--sparsities", default="0.7,0.8")
    p.add_argument("--range", type=float, default=0.2, help="allocation_range")
    p.add_argument("--samples", type=int, default=50, help="evaluation samples per row")
    p.add_argument("--method", default="dit+rec", choices=["dit+rec", "wanda"])
    args = p.parse_args(argv)

    shipped_curve, shipped_auto = allocating.layer_curve, A.auto
    mode, seen = {"curve": "shipped"}, {}

    def curve(weight, stats, kind, lo, hi, gram=None):
        if mode["curve"] == "method":
            return method_curve(weight, stats, lo, hi)
        return shipped_curve(weight, stats, kind, lo, hi, gram)

    def auto(curves, sizes, sparsity, spread, gains=None):
        alloc, predicted = shipped_auto(curves, sizes, sparsity, spread, gains)
        g = gains or [1.0] * len(curves)
        seen["uniform"] = sum(gi * A.value_at(c, sparsity) for c, gi in zip(curves, g))
        seen["auto"] = sum(gi * A.value_at(c, s) for c, gi, s in zip(curves, g, alloc))
        return alloc, predicted

    allocating.layer_curve, A.auto = curve, auto
    bench = Comparison(args.model, 16, 10, args.samples, 20)
    method, options = ("dit", {"reconstruct": True}) if args.method == "dit+rec" else ("wanda", {})
    variants = [("uniform", "-", "uniform"), ("auto", "shipped", "auto")] + (
        [("auto", "method", "auto")] if args.method == "dit+rec" else [])
    print(f"{bench.name}, {args.method}, allocation_range {args.range}, {args.samples} evaluation samples\n")
    print("| sparsity | allocation | curves | denoiser rel. err | x uniform | predicted x uniform "
          "| on the calibration x uniform |")
    print("|---|---|---|---|---|---|---|", flush=True)
    for s in (float(x) for x in args.sparsities.split(",")):
        base = base_cal = None
        for label, curves, allocation in variants:
            mode["curve"] = curves
            seen.clear()
            cand = Candidate(label, method, {**options, "allocation": allocation, "allocation_range": args.range})
            row = bench.run([cand], [{"sparsity": s}], progress=False, keep_models=True)[0]
            cal = calibration_error(bench.dense, row["pruned"], bench.calibration)
            base, base_cal = base or row["rel_err"], base_cal or cal
            predicted = f"{seen['auto'] / seen['uniform']:.2f}" if seen else "-"
            print(f"| {s} | {label} | {curves} | {row['rel_err']:.4f} | {row['rel_err'] / base:.2f} | {predicted} "
                  f"| {cal / base_cal:.2f} |", flush=True)


if __name__ == "__main__":
    main()
