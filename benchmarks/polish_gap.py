"""How far ``reconstruct``'s least-squares polish is from the exact solution of the problem it
states: min tr((W - V) H_d (W - V)^T) over V zero outside the mask, H_d = H + 0.01 mean(diag H) I.

For a fixed mask (Wanda's here: the gap depends on H and the mask's density, not on how the mask
was chosen) and the cost bench's synthetic inputs (``ditprune.costbench``), each row's exact
solution is computed with ``torch.linalg.solve`` and the polish's error is printed as a multiple
of it, per iteration count, from ``W * mask``, in float32 as shipped: with the shipped spectral
preconditioner (``ditprune.lsq``, rank 2 sqrt(inputs)) and with the Jacobi preconditioner alone
(``rank=0``, what the polish used before).

    python benchmarks/polish_gap.py [--rows 256] [--inputs 1024] [--tokens 512,256] [--ranks default,0]
        [--iters 0,1,2,4,6,8,16] [--sparsities 0.5,0.7]
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
    p.add_argument("--tokens", help="sampled-token regimes, comma-separated (default: inputs/2, inputs/4)")
    p.add_argument("--ranks", default="default,0", help="preconditioner ranks ('default': 2 sqrt(inputs); 0: Jacobi)")
    p.add_argument("--iters", default=",".join(map(str, ITERS)))
    p.add_argument("--sparsities", default="0.5,0.7")
    args = p.parse_args()
    n = args.inputs
    tokens = [int(t) for t in args.tokens.split(",")] if args.tokens else [n // 2, n // 4]
    regimes = {"covariance (plenty of tokens)": None, **{f"{t} sampled tokens": t for t in tokens}}
    ranks = [default_rank(n) if r == "default" else int(r) for r in args.ranks.split(",")]
    iters = [int(i) for i in args.iters.split(",")]
    print(f"Error of the polish / error of the exact solution, {args.rows} x {n} Linear, float32 "
          f"(spectral rank {default_rank(n)} by default; rank 0: Jacobi alone):\n")
    print("| inputs | sparsity | rank | " + " | ".join(f"{i} it" for i in iters) + " |")
    print("|---|---|---|" + "---|" * len(iters))
    for label, t in regimes.items():
        h = synthetic_stats(n, t).gram
        hd = damped(h)
        w = torch.randn(args.rows, n, generator=torch.Generator().manual_seed(1)) / n**0.5
        wd = w.double()
        for s in (float(x) for x in args.sparsities.split(",")):
            keep = plain_mask(w, torch.diagonal(h), s, None)
            loss = lambda v: float((((wd - v.double()) @ hd) * (wd - v.double())).sum())  # noqa: E731
            best = loss(exact(wd, keep, hd))
            for rank in ranks:
                gaps = [loss(polish(w, w * keep, keep, h, i, tol=0.0, rank=rank)) / best for i in iters]
                print(f"| {label} | {s} | {rank} | " + " | ".join(f"{g:.4f}" for g in gaps) + " |", flush=True)


if __name__ == "__main__":
    main()
