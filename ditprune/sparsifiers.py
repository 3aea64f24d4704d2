"""``torch.ao.pruning`` sparsifiers, one per method.

Lifecycle (the torch.optim shape of ``BaseSparsifier``)::

    sparsifier = WandaSparsifier(sparsity=0.5)
    sparsifier.prepare(model, [{"tensor_fqn": "blocks.0.ff.weight"}])  # packed FakeSparsity masks
    with sparsifier.observe():            # input-statistics hooks on every prepared layer
        model(**batch)                    # ... over the calibration batches
    sparsifier.step()                     # update_mask per layer; statistics freed right after
    sparsifier.squash_mask()              # bake masks into the weights

Scores come from :mod:`ditprune.saliency`, comparison groups from :mod:`ditprune.granularity`;
this module only owns state and lifecycle.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import nn
from torch.ao.pruning import BaseSparsifier
from torch.nn.utils import parametrize

from . import ditmask as D
from . import memory
from . import granularity as G
from . import saliency
from .errors import InputError
from .masks import PackedSparsity
from .refine import refine_mask
from .sparsegpt import obs_prune
from .stats import InputStats, observe

__all__ = [
    "DiTPruningSparsifier",
    "MagnitudeSparsifier",
    "RIASparsifier",
    "SaliencySparsifier",
    "SparseGPTSparsifier",
    "WandaSparsifier",
    "METHODS",
]

GRANULARITIES = ("layer", "row", "clusters")


class SaliencySparsifier(BaseSparsifier):
    """Shared lifecycle of the one-shot methods. Subclasses implement :meth:`compute_mask`.

    Args:
        sparsity: fraction of each targeted weight set to zero, in [0, 1).
        pattern: ``"N:M"`` semi-structured sparsity instead (keep N of every M inputs); wins
            over ``sparsity``.
        granularity: comparison group for metric methods: ``"layer"``, ``"row"`` or ``"clusters"``.
    """

    needs_energy = True
    needs_gram = False
    updates_weights = False  # whether compute_mask also returns updated (reconstructed) weights
    default_granularity = "row"

    def __init__(self, sparsity: float = 0.5, pattern: str | None = None, granularity: str | None = None, **defaults):
        nm = G.parse_pattern(pattern) if pattern is not None else None
        sparsity = 1.0 - nm[0] / nm[1] if nm else G.check_sparsity(sparsity)
        granularity = granularity or self.default_granularity
        if granularity not in GRANULARITIES:
            raise InputError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        super().__init__(defaults={"sparsity": sparsity, "nm": nm, "granularity": granularity, **defaults})

    # -- statistics ---------------------------------------------------------------------------
    @contextmanager
    def observe(self, tensor_fqns: Iterable[str] | None = None, scopes: Iterable[nn.Module] = (),
                text_layers: Iterable[str] = (), share: bool = True) -> Iterator[dict[str, InputStats]]:
        """Gather input statistics of the prepared layers (all, or ``tensor_fqns``) while open.
        ``scopes``, ``text_layers`` (tensor_fqns) and ``share`` as :func:`ditprune.stats.observe`."""
        groups = self._groups(tensor_fqns)
        if not (self.needs_energy or self.needs_gram):
            yield {}
            return
        layers = {g["tensor_fqn"]: g["module"] for g in groups}
        with observe(layers, self.needs_gram, scopes, text_layers, share) as stats:
            yield stats
        for fqn, module in layers.items():  # a layer never reached: empty statistics, a clear error later
            if fqn not in stats:
                stats[fqn] = InputStats(fqn, module.in_features, self.needs_gram)
        held = {id(s): s.nbytes for s in stats.values()}
        held.update({id(st["stats"]): st["stats"].nbytes for st in self.state.values() if "stats" in st})
        self.peak_stats_bytes = max(getattr(self, "peak_stats_bytes", 0), sum(held.values()))
        for fqn, st in stats.items():
            self.state[fqn]["stats"] = st

    # -- masks --------------------------------------------------------------------------------
    def step(self, use_path: bool = True, tensor_fqns: Iterable[str] | None = None) -> None:
        """``update_mask`` on every prepared layer, or only on ``tensor_fqns``."""
        if not self.enable_mask_update:
            return
        with torch.no_grad():
            for config in self._groups(tensor_fqns):
                self.update_mask(**config)

    def update_mask(self, module: nn.Module, tensor_name: str, tensor_fqn: str, **group: Any) -> None:
        start = time.perf_counter()
        state = self.state[tensor_fqn]
        stats = state.pop("stats", None)  # freed as soon as the mask is made
        if stats is None and (self.needs_energy or self.needs_gram):
            raise RuntimeError(f"no calibration statistics for '{tensor_fqn}': call step() after observe()")
        if group.get("sparsity") == 0 and group.get("nm") is None:  # kept dense: the all-ones mask stays
            state["info"] = {"removed": 0.0, "seconds": time.perf_counter() - start}
            return
        param = module.parametrizations[tensor_name]
        weight = param.original
        with memory.region("workspace"):
            keep, new_weight, info = self.compute_mask(weight.detach(), stats, **group)
            if stats is not None:
                gram = stats.gram if stats.gram_sum is not None else None
                info = {**info, "removed": round(saliency.removed_energy(weight, keep, new_weight, _energy(stats),
                                                                           gram), 6)}
        if new_weight is not None:
            if self.backup:
                with memory.region("backup"):
                    state.setdefault("dense_backup", weight.detach().to("cpu", copy=True))
            state["updated"] = True
            weight.data.copy_(new_weight)
        param[0].mask = keep
        del keep, new_weight
        if weight.device.type == "cpu":
            memory.release()  # this layer's temporaries go back to the system before the next layer's
        state["info"] = {**info, "seconds": time.perf_counter() - start}

    def compute_mask(
        self, weight: torch.Tensor, stats: InputStats | None, *, sparsity: float, nm, granularity: str, **options
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
        """(keep mask, reconstructed weight or None, per-layer info)."""
        scores = self.score(weight, stats, **options)
        return mask_from_scores(scores, sparsity, nm, granularity), None, {}

    def score(self, weight: torch.Tensor, stats: InputStats | None, **options) -> torch.Tensor:
        raise NotImplementedError

    # -- undo / finish ------------------------------------------------------------------------
    backup = True  # keep a CPU copy of each weight a method updates, so restore() can undo it

    def _prepare(self, *args, **kwargs) -> None:
        """An all-ones :class:`~ditprune.masks.PackedSparsity` (one bit per weight, on the weight's
        device) on every group; ``state[fqn]["mask"]`` is its packed buffer."""
        # Remember each module's parameter order: removing a parametrization re-registers the
        # weight last, which would reorder model.parameters() (and optimizer state built on it).
        self._param_order = {g["tensor_fqn"]: list(g["module"]._parameters) for g in self.groups}
        for g in self.groups:
            module, name = g["module"], g["tensor_name"]
            weight = getattr(module, name)
            with memory.region("masks"):
                p = PackedSparsity(weight.shape, weight.device)
            self.state[g["tensor_fqn"]]["mask"] = p.bits
            # unsafe: skips a trial forward (a weight-sized product per layer); shapes and dtypes hold
            parametrize.register_parametrization(module, name, p, unsafe=True)

    def updated_without_backup(self) -> list[str]:
        """Layers whose weights a method changed and that :meth:`restore` cannot put back."""
        return [f for f, st in self.state.items() if st.get("updated") and "dense_backup" not in st]

    def _reorder(self) -> None:
        for g in self.groups:
            params, order = g["module"]._parameters, self._param_order.get(g["tensor_fqn"], [])
            items = {k: params[k] for k in order if k in params} | dict(params)
            params.clear()
            params.update(items)

    def restore(self) -> None:
        """Take every mask off and put back the dense weights, as before ``prepare``. A layer whose
        weights were updated without a backup (``backup = False``) cannot go back: it keeps its
        mask baked in (pruned and updated, a consistent layer rather than an updated dense one)."""
        for g in self.groups:
            module, name = g["module"], g["tensor_name"]
            state = self.state[g["tensor_fqn"]]
            backup = state.pop("dense_backup", None)
            if backup is not None:
                module.parametrizations[name].original.data.copy_(backup)
            if parametrize.is_parametrized(module, name):
                bake = backup is None and bool(state.get("updated"))
                parametrize.remove_parametrizations(module, name, leave_parametrized=bake)
                if bake:
                    w = getattr(module, name)
                    w.data.masked_fill_(w.data == 0, 0.0)
        self._reorder()
        self.groups.clear()
        self.state.clear()

    def squash_mask(self, tensor_fqns: Iterable[str] | None = None) -> None:
        """Bake the masks into the weights (all, or ``tensor_fqns``), in place: the weight keeps its
        storage and no weight-sized tensor is made. Pruned entries become +0.0 (a mask product
        would leave -0.0 where a weight was negative): one zero, whatever format stores it."""
        with torch.no_grad():
            for g in self._groups(tensor_fqns):
                module, name = g["module"], g["tensor_name"]
                if not parametrize.is_parametrized(module, name):
                    continue  # squashed already (block by block)
                self.state[g["tensor_fqn"]].pop("dense_backup", None)
                p = module.parametrizations[name]
                w = p.original
                w.masked_fill_(~p[0].mask | (w == 0), 0.0)
                parametrize.remove_parametrizations(module, name, leave_parametrized=False)
        self._reorder()

    def _groups(self, tensor_fqns: Iterable[str] | None) -> list[dict]:
        if tensor_fqns is None:
            return list(self.groups)
        wanted = set(tensor_fqns)
        return [g for g in self.groups if g["tensor_fqn"] in wanted]


def mask_from_scores(scores: torch.Tensor, sparsity: float, nm, granularity: str) -> torch.Tensor:
    if nm is not None:
        return G.nm_mask(scores, *nm)
    if granularity == "layer":
        return G.layer_mask(scores, sparsity)
    if granularity == "clusters":
        return G.pooled_mask(scores, G.cluster_rows(_features(scores)), sparsity)
    return G.row_mask(scores, sparsity)


def _energy(stats: InputStats) -> torch.Tensor:
    """Each input's mean square: gathered, or the Gram matrix's diagonal."""
    return stats.energy if stats.sq_sum is not None else torch.diagonal(stats.gram)


def _features(scores: torch.Tensor) -> torch.Tensor:
    # Clusters for a metric that has no energy to offer: rows by their score mass alone.
    return G.row_features(scores, torch.ones(scores.shape[1], device=scores.device))


class MagnitudeSparsifier(SaliencySparsifier):
    """Magnitude pruning: S_ij = |W_ij|, compared over the whole layer. Needs no calibration.

    ``method: magnitude``, ``sparsity: 0.5``.
    """

    needs_energy = False
    default_granularity = "layer"

    def score(self, weight, stats, **options):
        return saliency.magnitude(weight)


class WandaSparsifier(SaliencySparsifier):
    """Wanda (Sun et al., 2023, arXiv 2306.11695): S_ij = |W_ij| * ||X_j||_2, compared per output row
    (N:M: per row within M consecutive inputs), as ``locuslab/wanda`` ``lib/prune.py``.

    ``method: wanda``, ``sparsity: 0.5`` or ``pattern: "2:4"``.
    """

    def score(self, weight, stats, **options):
        return saliency.wanda(weight, stats.energy)


class RIASparsifier(SaliencySparsifier):
    """RIA (Zhang et al., ICLR 2024): S_ij = (|W_ij|/sum_i|W_ij| + |W_ij|/sum_j|W_ij|) * ||X_j||^a,
    a = 0.5, compared over the whole layer.

    ``method: ria``, ``sparsity: 0.5``, ``power: 0.5``.
    """

    default_granularity = "layer"

    def __init__(self, sparsity=0.5, pattern=None, granularity=None, power: float = 0.5):
        super().__init__(sparsity, pattern, granularity, power=power)

    def score(self, weight, stats, *, power, **options):
        return saliency.ria(weight, stats.energy, power)


class SparseGPTSparsifier(SaliencySparsifier):
    """SparseGPT (Frantar & Alistarh, 2023, arXiv 2301.00774): OBS pruning with weight updates,
    H = X X^T / N + 0.01 * mean(diag H) I, 128-column blocks (see :mod:`ditprune.sparsegpt`).
    Keeps a CPU copy of each dense weight until the prune succeeds, so a failure can be undone.

    ``method: sparsegpt``, ``sparsity: 0.5``, ``blocksize: 128``, ``percdamp: 0.01``.
    """

    needs_gram = True
    updates_weights = True

    def __init__(self, sparsity=0.5, pattern=None, granularity=None, blocksize: int = 128, percdamp: float = 0.01):
        super().__init__(sparsity, pattern, granularity, blocksize=blocksize, percdamp=percdamp)

    def compute_mask(self, weight, stats, *, sparsity, nm, granularity, blocksize, percdamp, **options):
        new, keep, used = obs_prune(weight, stats.gram, sparsity, nm, blocksize=blocksize, percdamp=percdamp)
        return keep, new, ({"percdamp": used} if used != percdamp else {})


class DiTPruningSparsifier(SaliencySparsifier):
    """DiT-Pruning (arXiv 2607.00927; the project's reading, see README): energy-balanced
    saliency, clustering-aware groups, and an error-guided swap search.

    S_ij = (W_ij^2 / E_W)^(1 - alpha) * (a_j / E_A)^alpha  (alpha = 0.5 is Wanda's ranking).

    1. Rows are clustered (seeded k-means on :func:`~ditprune.granularity.row_features`, k by
       silhouette, k = 1 allowed).
    2. ``alpha="auto"``: every candidate of ``alphas`` x {per row, cluster-pooled} (N:M: ``alphas``
       alone) is masked, improved by the swap search and judged by the output energy it removes,
       tr(dW H dW^T), on up to ``sample_rows`` rows sampled per cluster (rows are independent,
       so a sample judges for all; on a sample each candidate gets ``refine // 4`` rounds). Each
       cluster takes its best candidate, built on all of its rows.
    3. The chosen mask gets ``refine`` rounds of the swap search
       (:func:`ditprune.refine.refine_mask`: in each row the ``shortlist`` cheapest revivals and
       prunings, swapped pairwise with exact cross terms while the row's error falls).
    4. Few tokens (a layer that saw fewer than 16 tokens per input, e.g. adaLN): about one token
       in 4 is held out (by a hash of its content, so shards agree); the alpha/grouping choice
       and the search are fitted on the other tokens and judged on the held-out ones alone; a
       cluster whose searched mask does not beat Wanda's per-row mask there gets Wanda's per-row
       mask (exactly ``method="wanda"``'s rows). When no token is held out, or none is left to fit
       on: Wanda's mask for the whole layer.
    5. ``reconstruct=True``: the kept weights are refitted by least squares on the damped H
       (``polish`` conjugate-gradient iterations from ``W * mask``, spectrally preconditioned:
       :mod:`ditprune.lsq`); for N:M, SparseGPT's own
       mask and OBS update, refitted the same way, is the other candidate and the one that
       loses less output energy wins per row. With few tokens the candidates, and no update at
       all, are fitted on the sampled rows without the held-out tokens and judged per layer on
       those tokens alone. The choice logic lives in :mod:`ditprune.ditmask` (pure functions).

    ``method: dit``, ``sparsity: 0.5``, ``alpha: auto``, ``alphas: [0.3, 0.4, 0.5]``,
    ``granularity: clusters``, ``max_clusters: 6``, ``refine: 8`` (4 with ``reconstruct``: rounds
    beyond 4 lowered the no-update error the refit then replaces, and changed the refitted
    model's denoiser error by at most 3.5% on both reference models), ``shortlist: 12``,
    ``sample_rows: 256``, ``reconstruct: false``, ``polish: 6``, ``holdout: true`` (false: trust the
    search on few tokens too, as the ablation does to measure what the safeguard costs).

    Lifecycle: as every :class:`SaliencySparsifier`; needs the Gram matrix unless
    ``alpha`` is fixed, ``refine=0`` and ``reconstruct=False``.
    """

    default_granularity = "clusters"

    def __init__(
        self,
        sparsity: float = 0.5,
        pattern: str | None = None,
        granularity: str | None = None,
        alpha: float | str = "auto",
        alphas: Sequence[float] = (0.3, 0.4, 0.5),
        max_clusters: int = 6,
        refine: int | None = None,
        shortlist: int = 12,
        sample_rows: int = 256,
        damp: float = 0.0,
        reconstruct: bool = False,
        polish: int = 6,
        holdout: bool = True,
        seed: int = 0,
    ):
        if alpha != "auto":
            try:
                alpha = float(alpha)
            except (TypeError, ValueError):
                raise InputError(f"alpha must be 'auto' or a number in [0, 1], got {alpha!r}") from None
            if not 0.0 <= alpha <= 1.0:
                raise InputError(f"alpha must be 'auto' or a number in [0, 1], got {alpha}")
        grid = tuple(sorted({float(a) for a in alphas} | {0.5}))  # Wanda's ranking is always a candidate
        if any(not 0.0 <= a <= 1.0 for a in grid):
            raise InputError(f"alphas must lie in [0, 1], got {list(alphas)}")
        if refine is None:  # the refit supersedes what later rounds gain on the no-update error
            refine = 4 if reconstruct else 8
        for name, value, low, high in (("refine", refine, 0, 1000), ("shortlist", shortlist, 1, 4096),
                                       ("sample_rows", sample_rows, 1, 1 << 20), ("max_clusters", max_clusters, 1, 64),
                                       ("polish", polish, 0, 10_000)):
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise InputError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
        super().__init__(
            sparsity, pattern, granularity, alpha=alpha, alphas=grid, max_clusters=max_clusters, refine=refine,
            shortlist=shortlist, sample_rows=sample_rows, damp=float(damp), reconstruct=bool(reconstruct),
            polish=polish, holdout=bool(holdout), seed=int(seed),
        )
        self.needs_gram = alpha == "auto" or bool(reconstruct) or refine > 0
        self.updates_weights = bool(reconstruct)

    def compute_mask(self, weight, stats, *, sparsity, nm, granularity, alpha, alphas, max_clusters, refine,
                     shortlist, sample_rows, damp, reconstruct, polish, holdout, seed, **options):
        energy = stats.energy
        plain = lambda w: D.plain_mask(w, energy, sparsity, nm)  # noqa: E731
        few = self.needs_gram and holdout and stats.few_tokens
        held = stats.holdout() if few else None
        if few and held is None:  # too few tokens to judge anything on: nothing is fitted to them
            return plain(weight), None, {"search": f"skipped: {stats.count} calibration tokens, none to judge on"}
        # few tokens: fit on the others, judge on the held-out ones (see ditprune.ditmask)
        gram = stats.gram if self.needs_gram else None
        fit, judge = held if held is not None else (gram, gram)
        fit_energy = torch.diagonal(fit) if held is not None else energy
        plain_fit = lambda w: D.plain_mask(w, fit_energy, sparsity, nm)  # noqa: E731
        swaps = []

        def search(h, rounds, residual=False):
            if damp and h is not None:
                h = h + damp * torch.diagonal(h).mean() * torch.eye(h.shape[0], device=h.device)

            def run(w, keep):
                if not rounds:
                    return keep
                keep, found, *g = refine_mask(w, keep, h, rounds, shortlist, nm[1] if nm is not None else None,
                                              residual=residual)
                swaps.append(found["swaps"])
                return (keep, g[0]) if residual else keep
            return run

        if granularity == "clusters":
            labels = G.cluster_rows(G.row_features(weight, fit_energy), max_clusters, seed)
        else:
            labels = torch.zeros(weight.shape[0], dtype=torch.long)
        groups = D.groupings(sparsity, nm, granularity)
        sample = saliency.sample_rows(labels, sample_rows, seed)
        rows = torch.arange(weight.shape[0]) if sample is None else sample
        w_s, lab_s = weight[rows.to(weight.device)], labels[rows]
        if alpha == "auto":  # on a sample each candidate gets a quarter of the rounds
            rounds = refine if sample is None else (max(1, refine // 4) if refine else 0)
            # searched on the judge's own H (plenty of tokens, no damping): errors from the search's residual
            choice = D.choose(w_s, fit_energy, lab_s, alphas, groups, search(fit, rounds, held is None and not damp), judge)
        else:
            choice = [{"cluster": c, "alpha": alpha, "grouping": next(iter(groups))} for c in labels.unique().tolist()]
        fitted = None
        if held is not None:  # the search, fitted without the held-out tokens, must beat Wanda's mask on them
            wanda_fit = plain_fit(w_s)
            fitted = search(fit, refine)(w_s, D.build(w_s, fit_energy, lab_s, choice, groups, plain_fit))
            D.fall_back(w_s, fitted, wanda_fit, lab_s, choice, judge)
            fitted = torch.where(_rows_of(lab_s, choice, fallback=True).to(weight.device).unsqueeze(1), wanda_fit, fitted)
        swaps.clear()  # count the swaps of the mask that is kept
        keep = D.build(weight, energy, labels, choice, groups, plain)
        searched = _rows_of(labels, choice, fallback=False).to(weight.device)
        residual = None
        if refine and searched.any():  # all tokens: the final mask
            # the search's residual (W * ~keep) @ H starts the refit when it covers every row, but not
            # on few-token layers: there 2 DDP processes and one on the union of their shards then
            # pruned 0.5% of the reference model's mask entries differently (0 without; tests/test_ddp.py)
            whole = reconstruct and not damp and held is None and bool(searched.all())
            found = search(gram, refine, whole)(weight[searched], keep[searched])
            keep[searched], residual = found if whole else (found, None)
        for c in choice:
            c["rows"] = int((labels == c["cluster"]).sum())
        info = {"clusters": choice, "swaps": sum(swaps)}
        if held is not None:
            info["held_out_tokens"] = stats.held_count
        if not reconstruct:
            return keep, None, info
        keep, new_weight, extra = D.reconstruct(weight, keep, gram, polish, nm, None if held is None else (rows, fitted, *held),
                                                residual=residual)
        return keep, new_weight, {**info, **extra}


def _rows_of(labels: torch.Tensor, choice: list[dict], fallback: bool) -> torch.Tensor:
    """(rows,) bool: the rows of the clusters that fell back to the plain mask (or did not)."""
    chosen = [c["cluster"] for c in choice if bool(c.get("fallback")) == fallback]
    return torch.isin(labels, torch.tensor(chosen, dtype=labels.dtype))


METHODS: dict[str, type[SaliencySparsifier]] = {
    "dit": DiTPruningSparsifier,
    "wanda": WandaSparsifier,
    "magnitude": MagnitudeSparsifier,
    "ria": RIASparsifier,
    "sparsegpt": SparseGPTSparsifier,
}
