"""Least-squares refit of the kept weights for a fixed mask (``reconstruct=True``). Pure:
tensors in, tensors out.

The problem, per output row i with kept set K_i (rows are independent):

    minimise (w_i - v) H_d (w_i - v)^T over v zero outside K_i,
    H_d = H + percdamp * mean(diag H) I   (SparseGPT's dampening, percdamp = 0.01)

whose solution is v_K = (H_d)_KK^-1 (w_i H_d)_K. Solving it exactly costs a |K| x |K|
factorisation per row (out x in^3 / 3 for a layer: about 10x SparseGPT at FLUX.1-dev's
widths), so :func:`polish` runs conjugate gradients on all rows at once, each iteration one
(out x in) @ (in x in) product.

On activations, H_d is ill-conditioned along a few directions, and the masked CG converges
slowly with a diagonal (Jacobi) preconditioner: 8 iterations left 1.03-1.12x the exact error on
the cost bench's inputs (``benchmarks/polish_gap.py``). The preconditioner here
(:func:`spectral_preconditioner`) models the Jacobi-scaled S = D^-1/2 H_d D^-1/2 as
c I + U (diag(lam) - c) U^T, with U, lam its top ``rank`` eigenpairs (randomised subspace
iteration, a fixed seed) and c the mean of the other eigenvalues, and applies the *exact*
inverse of that model restricted to each row's kept set by Woodbury:

    (S_model)_KK^-1 = (I - U_K (c (diag(lam) - c)^-1 + U_K^T U_K)^-1 U_K^T) / c

so the directions that make H_d ill-conditioned are solved per row, and CG only has to deal with
the flat rest. The per-row ``rank x rank`` matrices U_K^T U_K cost one (out x in) @ (in x
rank^2 / 2) product, once; applying the preconditioner costs two thin products per iteration.
It is a valid preconditioner for any U (symmetric positive definite), so an inexact subspace only
slows convergence, never breaks it.
"""

from __future__ import annotations

import math

import torch

__all__ = ["damped", "spectral_preconditioner", "polish", "default_rank"]


def damped(gram: torch.Tensor, percdamp: float = 0.01, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """H + percdamp * mean(diag H) I in ``dtype`` (a dead input, zero diagonal, gets a unit one:
    its weight is removed by every method, and the damping keeps the scale of the live ones)."""
    H = gram.to(dtype).clone()
    d = torch.diagonal(H)
    d[d == 0] = 1.0
    return H + percdamp * d.mean() * torch.eye(H.shape[0], dtype=dtype, device=H.device)


def default_rank(inputs: int) -> int:
    """Directions solved per row: 2 sqrt(inputs) (the per-row Gram matrices then cost two
    iterations' products), at most half the inputs."""
    return max(1, min(inputs // 2, round(2 * math.sqrt(inputs))))


def _top_eigen(S, n: int, rank: int, like: torch.Tensor, power: int = 4, seed: int = 0
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(eigenvalues descending, orthonormal vectors) of the top ``rank`` eigenpairs of the
    symmetric PSD n x n matrix that ``S(X)`` multiplies by, by randomised subspace iteration with
    ``rank // 2`` extra columns and Rayleigh-Ritz (dtype and device of ``like``)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    Q = torch.randn(n, min(n, rank + max(8, rank // 2)), generator=g).to(like)
    for _ in range(power):
        Q = torch.linalg.qr(S(Q)).Q
    lam, E = torch.linalg.eigh(Q.T @ S(Q))
    return lam.flip(0)[:rank], (Q @ E).flip(1)[:, :rank]


def spectral_preconditioner(Hd: torch.Tensor, keep: torch.Tensor, rank: int):
    """``apply(R) -> Z``: the per-row preconditioner described in the module docstring, for
    residuals R (out x in) that are zero outside ``keep``."""
    dtype = Hd.dtype
    s = torch.diagonal(Hd).rsqrt().unsqueeze(1)
    n = Hd.shape[0]
    lam, U = _top_eigen(lambda X: s * (Hd @ (s * X)), n, min(rank, n - 1), Hd)  # S = D^-1/2 H_d D^-1/2
    c = ((n - lam.sum()) / (n - len(lam))).clamp_min(1e-12)  # trace(S) = n
    live = lam > c * (1 + 1e-6)  # a direction no stiffer than the rest needs no special treatment
    lam, U = lam[live], U[:, live]
    s = s.squeeze(1)
    m = keep.to(dtype)
    k = U.shape[1]
    d = s.pow(2) / c  # the model's inverse on the flat rest, in H_d's units
    if k == 0:
        return lambda R: R * d
    a, b = torch.tril_indices(k, k, device=U.device)
    G = torch.zeros(m.shape[0], k * k, dtype=dtype, device=U.device)
    G[:, a * k + b] = m @ (U[:, a] * U[:, b])  # U_K^T U_K per row, one triangle: one product
    G = G.view(-1, k, k)
    G = G + G.mT
    G.diagonal(dim1=1, dim2=2).mul_(0.5).add_(c / (lam - c))
    eye = torch.eye(k, dtype=dtype, device=U.device).expand_as(G)
    L, info = torch.linalg.cholesky_ex(G)
    for ridge in (1e-4, 1e-2, 1.0):  # rounding, or a row keeping fewer weights than k: a ridge on G only
        if not info.any():  # weakens the correction, so the preconditioner stays positive definite
            break
        bad = info > 0
        L[bad], info[bad] = torch.linalg.cholesky_ex(G[bad] + ridge * eye[: int(bad.sum())])
    Li = torch.linalg.solve_triangular(L, eye, upper=False)
    Gi = torch.bmm(Li.mT, Li).div_(c)  # (G c)^-1, formed once: one small product per row and iteration
    del G, L, Li
    Us = U * s.unsqueeze(1)  # H_d's units on both sides: D^-1/2 U

    def apply(R: torch.Tensor) -> torch.Tensor:
        t = torch.bmm(Gi, (R @ Us).unsqueeze(2)).squeeze(2)
        return torch.addcmul(R * d, t @ Us.T, m, value=-1)

    return apply


def _dot(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Row-wise dot products, returned in float64 (the CG scalars)."""
    return torch.linalg.vecdot(A, B, dim=1).to(torch.float64)


@torch.no_grad()
def polish(weight: torch.Tensor, start: torch.Tensor, keep: torch.Tensor, gram: torch.Tensor, iters: int = 6,
           percdamp: float = 0.01, tol: float = 1e-6, dtype: torch.dtype = torch.float32,
           rank: int | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """V minimising tr((W - V) H_d (W - V)^T) over V zero outside ``keep`` (the module docstring's
    problem), by ``iters`` iterations of conjugate gradients on all rows at once with the spectral
    preconditioner (``rank`` directions, default :func:`default_rank`; 0: Jacobi only), from
    ``start`` (``W * keep`` in the ``dit`` method). Every iteration lowers the objective. A row
    stops once its preconditioned residual falls below ``tol`` of its start. Math in ``dtype``.
    ``residual``: (W - start) @ gram (undamped) if the caller has it (the swap search keeps it),
    which saves one (out x in) @ (in x in) product; it may be overwritten. Returns V in
    ``weight``'s dtype."""
    W = weight.to(dtype)
    H = damped(gram.to(W.device), percdamp, dtype)
    rank = default_rank(H.shape[0]) if rank is None else rank
    m = keep.to(device=W.device, dtype=dtype)
    if rank:
        precondition = spectral_preconditioner(H, keep.to(W.device), rank)
    else:
        d = torch.diagonal(H).clone()
        precondition = lambda R: R / d  # noqa: E731
    V = start.to(dtype) * m
    if residual is None:
        R = ((W - V) @ H).mul_(m)  # minus half the gradient, on the kept weights
    else:  # H_d - H is diagonal: the damping (and a dead input's unit diagonal)
        extra = torch.diagonal(H) - torch.diagonal(gram).to(H)
        R = residual.to(dtype).addcmul_(W - V, extra).mul_(m)
    Z = precondition(R)
    P = Z.clone()
    rz = _dot(R, Z)
    stop = tol * rz.clamp_min(0)  # per row: a converged row stops, before rounding noise drives it
    for _ in range(iters):
        live = rz > stop
        if not live.any():
            break
        Q = (P @ H).mul_(m)
        pq = _dot(P, Q)
        a = torch.where(live & (pq > 0), rz / pq.clamp_min(1e-300), torch.zeros_like(pq)).to(dtype)
        V.addcmul_(a.unsqueeze(1), P)
        R.addcmul_(a.unsqueeze(1), Q, value=-1)
        Z = precondition(R)
        rz_new = torch.where(live, _dot(R, Z), rz)
        beta = (rz_new / rz.clamp_min(1e-300)).to(dtype)  # a stopped row's direction is never used again (a = 0)
        P.mul_(beta.unsqueeze(1)).add_(Z)
        rz = rz_new
    return V.mul_(m).to(weight.dtype)
