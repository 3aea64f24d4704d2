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
from concurrent.futures import ThreadPoolExecutor

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
    """``apply(R, out, work) -> out``: the per-row preconditioner described in the module
    docstring, for residuals R (out x in) that are zero outside ``keep``, written into ``out``;
    ``work`` is overwritten. Both are as large as R: buffers the caller reuses, since a fresh
    tensor of a FLUX.1-dev layer's size costs its page faults."""
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
        return lambda R, out, work: torch.mul(R, d, out=out)
    diag = c / (lam - c)
    Us = U * s.unsqueeze(1)  # H_d's units on both sides: D^-1/2 U
    Gi = torch.empty(m.shape[0], k, k, dtype=dtype, device=U.device)
    pairs = torch.tril_indices(k, k, device=U.device)
    UU = U[:, pairs[0]] * U[:, pairs[1]]
    G = torch.zeros(min(_CHUNK, m.shape[0]), k * k, dtype=dtype, device=U.device)  # upper triangle stays 0
    for r0 in range(0, m.shape[0], _CHUNK):  # row chunks: the (rows, k, k) temporaries stay small
        mc = m[r0:r0 + _CHUNK]
        Gc = G[: mc.shape[0]]
        Gc[:, pairs[0] * k + pairs[1]] = mc @ UU  # U_K^T U_K per row, lower triangle only: one product
        Gc = Gc.view(-1, k, k)
        Gc.diagonal(dim1=1, dim2=2).add_(diag)
        _inverse(Gc, out=Gi[r0:r0 + _CHUNK]).div_(c)  # (G c)^-1, formed once: one small product per row and iteration
    del UU, G

    def apply(R: torch.Tensor, out: torch.Tensor, work: torch.Tensor) -> torch.Tensor:
        t = torch.bmm(Gi, (R @ Us).unsqueeze(2)).squeeze(2)
        return torch.mul(R, d, out=out).addcmul_(torch.mm(t, Us.T, out=work), m, value=-1)

    return apply


_CHUNK = 2048  # rows per chunk of the preconditioner's per-row matrices


def _inverse(G: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out`` = G^-1 for a batch of symmetric positive definite matrices of which only the lower
    triangle is read (LAPACK's Cholesky reads no other), by Cholesky. A matrix whose
    factorisation fails (rounding, or a row keeping fewer weights than k: G then has a near-null
    direction) is retried with a ridge of 1e-4, 1e-2 and 1 (a ridge on G only weakens the
    correction, so the preconditioner stays positive definite). On the CPU the batch is split
    over the intra-op threads: a batched factorisation there loops over its matrices on one."""
    L = torch.empty_like(G)
    info = torch.empty(G.shape[0], dtype=torch.int32, device=G.device)
    eye = torch.eye(G.shape[1], dtype=G.dtype, device=G.device)
    _split(lambda i: torch.linalg.cholesky_ex(G[i], out=(L[i], info[i])), len(G), G.device)
    for ridge in (1e-4, 1e-2, 1.0):
        if not info.any():
            break
        bad = info > 0
        L[bad], info[bad] = torch.linalg.cholesky_ex(G[bad] + ridge * eye)
    Li = torch.empty_like(G)
    _split(lambda i: torch.linalg.solve_triangular(L[i], eye.expand_as(L[i]), upper=False, out=Li[i]), len(G), G.device)
    return torch.bmm(Li.mT, Li, out=out)


def _split(fn, n: int, device: torch.device) -> None:
    """``fn(rows)`` for ``torch.get_num_threads()`` slices of ``range(n)``, on as many threads on
    the CPU (in place: every slice writes its own rows), at once elsewhere."""
    parts = min(n, torch.get_num_threads()) if device.type == "cpu" else 1
    bounds = [n * j // parts for j in range(parts + 1)]
    slices = [slice(a, b) for a, b in zip(bounds, bounds[1:])]
    if len(slices) < 2:
        return fn(slice(0, n))
    with ThreadPoolExecutor(len(slices)) as pool:
        list(pool.map(fn, slices))


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
    ``weight``'s dtype. The iterations allocate nothing as large as W: five (out x in) buffers
    are reused."""
    W = weight.to(dtype)
    H = damped(gram.to(W.device), percdamp, dtype)
    rank = default_rank(H.shape[0]) if rank is None else rank
    m = keep.to(device=W.device, dtype=dtype)
    if rank:
        precondition = spectral_preconditioner(H, keep.to(W.device), rank)
    else:
        d = torch.diagonal(H).clone()
        precondition = lambda R, out, work: torch.div(R, d, out=out)  # noqa: E731
    V = start.to(dtype) * m
    scratch = torch.sub(W, V)

    def dot(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:  # row-wise, in float64 (the CG scalars)
        return torch.mul(A, B, out=scratch).sum(1).to(torch.float64)

    if residual is None:
        R = (scratch @ H).mul_(m)  # minus half the gradient, on the kept weights
    else:  # H_d - H is diagonal: the damping (and a dead input's unit diagonal)
        extra = torch.diagonal(H) - torch.diagonal(gram).to(H)
        R = residual.to(dtype).addcmul_(scratch, extra).mul_(m)
    Z, Q = torch.empty_like(R), torch.empty_like(R)
    P = precondition(R, torch.empty_like(R), Q)
    rz = dot(R, P)
    stop = tol * rz.clamp_min(0)  # per row: a converged row stops, before rounding noise drives it
    for _ in range(iters):
        live = rz > stop
        if not live.any():
            break
        torch.mm(P, H, out=Q).mul_(m)
        pq = dot(P, Q)
        a = torch.where(live & (pq > 0), rz / pq.clamp_min(1e-300), torch.zeros_like(pq)).to(dtype)
        V.addcmul_(a.unsqueeze(1), P)
        R.addcmul_(a.unsqueeze(1), Q, value=-1)
        precondition(R, Z, Q)  # Q is free until the next product
        rz_new = torch.where(live, dot(R, Z), rz)
        beta = (rz_new / rz.clamp_min(1e-300)).to(dtype)  # a stopped row's direction is never used again (a = 0)
        P.mul_(beta.unsqueeze(1)).add_(Z)
        rz = rz_new
    return V.mul_(m).to(weight.dtype)
