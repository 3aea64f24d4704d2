"""How far ``reconstruct``'s least-squares polish is from the exact solution of the problem it
states: min tr((W - V) H_d (W - V)^T) over V zero outside the mask, H_d = H + 0.01 mean(diag H) I.

For a fixed mask (Wanda's here: the gap depends on H and the mask's density, not on how the mask
was chosen) and the cost bench's synthetic inputs (``ditprune.costbench``), each row's exact
solution is computed with ``torch.linalg.solve`` and the polish's error is printed as a multiple
of it, per iteration count, from ``W * mask``, in float32 as shipped: with the shipped spectral
preconditioner (``ditprune.lsq``, rank 2 sqrt(inputs)) and with the Jacobi preconditioner alone
(``rank=0``, what the polish used before).

    python benchmarks/polish_gap.py [--rows 256] [--inputs 1024]
"""

from __future__ import annotations

import argparse

import torch

from ditprune.costbench import synthetic_stats
from ditprune.ditmask import plain_mask
from ditprune.lsq import damped, default_rank, polish

ITERS = (0, 1, 2, 4, 6, 8, 16)


def exact(w: torch.Tensor, keep: torch.Tensor, hd: torch.Tensor) -> torch.Tensor:
    v = torch.zeros_like(w)
    rhs = w @ hd
    for i in range(w.shape[0]):
        k = keep[i]
        v[i, k] = torch.linalg.solve(hd[k][:, k], rhs[i, k])
    return v


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--inputs", type=int, default=1024)
    args = p.parse_args()
    n = args.inputs
    regimes = {"covariance (plenty of tokens)": None, f"{n // 2} sampled tokens (few-token layer)": n // 2,
               f"{n // 4} sampled tokens": n // 4}
    print(f"Error of the polish / error of the exact solution, {args.rows} x {n} Linear, float32, "
          f"spectral rank {default_rank(n)}:\n")
    print("| inputs | sparsity | preconditioner | " + " | ".join(f"{i} it" for i in ITERS) + " |")
    print("|---|---|---|" + "---|" * len(ITERS))
    for label, tokens in regimes.items():
        h = synthetic_stats(n, tokens).gram
        hd = damped(h)
        w = torch.randn(args.rows, n, generator=torch.Generator().manual_seed(1)) / n**0.5
        wd = w.double()
        for s in (0.5, 0.7):
            keep = plain_mask(w, torch.diagonal(h), s, None)
            loss = lambda v: float((((wd - v.double()) @ hd) * (wd - v.double())).sum())  # noqa: E731
            best = loss(exact(wd, keep, hd))
            for name, rank in (("spectral", None), ("Jacobi", 0)):
                gaps = [loss(polish(w, w * keep, keep, h, i, tol=0.0, rank=rank)) / best for i in ITERS]
                print(f"| {label} | {s} | {name} | " + " | ".join(f"{g:.3f}" for g in gaps) + " |", flush=True)


if __name__ == "__main__":
    main()
