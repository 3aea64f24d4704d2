"""The allocation pass: what ``allocation="owl"|"auto"`` measures on the dense model before a
prune (one pass over the calibration for the input statistics, and for ``auto`` each layer's
output gain), then the sparsity per layer from :mod:`ditprune.allocation`'s pure functions."""

from __future__ import annotations

import logging

import torch
from torch import nn

from . import allocation as A
from . import distributed
from .calibration import run_block_sequential, run_whole_model
from .errors import InputError
from .granularity import nm_mask, row_mask
from .gains import gain_groups, output_gains
from .probes import probed_gains
from .stats import observe

__all__ = ["check", "allocate", "layer_curve", "pick_batches"]

log = logging.getLogger(__name__)

OPTIONS = {"m", "lam", "gains", "gain_batches", "gain_sparsities", "curve", "batches", "probes"}
CURVES = ("wanda", "obs", "sparsegpt")
GAINS = ("layers", "blocks", "probes", "none")


def check(allocation, spread, options, pattern, max_dense=0.0) -> str:
    """``allocation`` if it, ``allocation_range``, ``allocation_options`` and ``max_dense`` are
    valid with ``pattern``."""
    if allocation not in A.ALLOCATIONS:
        raise InputError(f"allocation must be one of {list(A.ALLOCATIONS)}, got {allocation!r}")
    if isinstance(spread, bool) or not isinstance(spread, (int, float)) or not 0 <= spread <= 0.99:
        raise InputError(f"allocation_range must be a number in [0, 0.99], got {spread!r}")
    unknown = sorted(set(options or {}) - OPTIONS)
    if unknown:
        raise InputError(f"allocation_options: unknown {unknown}; OWL takes 'm' (outlier threshold) and 'lam', "
                         "auto 'gains' ('layers', 'blocks', 'probes' or 'none'), 'probes' (how many, with gains "
                         "'probes'), 'gain_batches', 'gain_sparsities' (1 or 2), 'curve' ('wanda', 'obs' or "
                         "'sparsegpt') and 'batches' (how many calibration batches the allocation pass reads)")
    gains = (options or {}).get("gains", "layers")
    if gains not in GAINS:
        raise InputError(f"allocation_options.gains must be one of {list(GAINS)}, got {gains!r}")
    curve = (options or {}).get("curve", "wanda")
    if curve not in CURVES:
        raise InputError(f"allocation_options.curve must be one of {list(CURVES)}, got {curve!r}")
    for key, default in (("gain_batches", 4), ("batches", 1), ("probes", 16)):
        n = (options or {}).get(key, default)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InputError(f"allocation_options.{key} must be a positive integer, got {n!r}")
    points = (options or {}).get("gain_sparsities", 1)
    if isinstance(points, bool) or points not in (1, 2):
        raise InputError(f"allocation_options.gain_sparsities must be 1 (gains measured at the sparsity) or 2 (at "
                         f"both ends of the range), got {points!r}")
    if isinstance(max_dense, bool) or not isinstance(max_dense, (int, float)) or not 0 <= max_dense < 1:
        raise InputError(f"max_dense must be a number in [0, 1) (the fraction of targeted weights that may stay "
                         f"dense), got {max_dense!r}")
    if allocation == "owl" and pattern is not None:
        raise InputError("allocation 'owl' spreads an unstructured sparsity over the layers; with a pattern every "
                         "pruned layer keeps it: use allocation='auto' with max_dense (layers kept dense) or 'uniform'")
    if max_dense > 0 and (allocation != "auto" or pattern is None):
        raise InputError(f"max_dense chooses layers to keep dense under an N:M pattern with allocation='auto' "
                         f"(got allocation={allocation!r}, pattern={pattern!r})")
    return allocation


def layer_curve(weight: torch.Tensor, stats, curve: str, lo: float, hi: float, gram: torch.Tensor | None = None
                ) -> torch.Tensor:
    """The removal curve ``curve`` (``obs`` or ``sparsegpt``) of one layer from its input
    statistics (``gram``: their Gram matrix, when the caller holds it already). A layer with few
    tokens (:attr:`ditprune.stats.InputStats.few_tokens`) gets SparseGPT fitted on some tokens
    and judged on the held-out ones, as the prune judges its own fit there; with none to judge
    on, the prune fits nothing and Wanda's curve holds."""
    gram = stats.gram if gram is None else gram
    if curve == "obs":  # measured worse at 80%: opt-in
        return A.obs_curve(weight, gram)
    if not stats.few_tokens:
        return A.sparsegpt_curve(weight, gram, lo, hi)
    held = stats.holdout()
    return A.sparsegpt_curve(weight, held[0], lo, hi, judge=held[1]) if held else A.removal_curve(weight, stats.energy)


def allocate(model: nn.Module, names: list[str], allocation: str, sparsity: float, spread: float, options: dict,
             calibration: list[dict], *, nm: tuple[int, int] | None = None, max_dense: float = 0.0, scopes=(),
             text_layers=(), share: bool = True, weights=None, progress: bool = False, sync: bool = False,
             blocks: list | None = None, offload=None, updates: bool = False) -> dict[str, dict]:
    """Layer name -> {"sparsity", "predicted" (``auto``), "dense" (a pattern)} for ``names``:
    one pass of the dense model over ``calibration`` gathers each layer's input statistics
    (summed over ranks) and, for ``auto``, its removal curve; with ``blocks`` (name, module,
    its layer names) the pass runs block by block as the prune does, so Gram matrices (the
    ``obs`` and ``sparsegpt`` curves) exist for one block at a time. Then
    :func:`ditprune.allocation.owl` or :func:`~ditprune.allocation.auto` decides, in whole
    rows; with an N:M pattern ``nm``, :func:`~ditprune.allocation.keep_dense` chooses the
    layers that stay dense. ``curve`` defaults to ``sparsegpt`` for a method that ``updates``
    its weights (its own reconstruction is what the allocation should predict) and to
    ``wanda`` otherwise. The pass costs a calibration pass of its own (``ditprune bench
    --cost``); ``batches`` (default: all) limits it to that many batches spread over the
    calibration's timesteps (:func:`pick_batches`)."""
    curve = options.get("curve", "sparsegpt" if updates else "wanda")
    observed = calibration
    if "batches" in options:
        picked = pick_batches(calibration, options["batches"], sync)
        observed = [calibration[i] for i in picked]
        weights = [weights[i] for i in picked] if weights is not None else None
    gram = nm is None and allocation == "auto" and curve != "wanda"  # these curves need the Gram matrices
    lo, hi = A.bounds(sparsity, spread)
    energy_of: dict[str, torch.Tensor] = {}
    curve_of: dict[str, torch.Tensor] = {}
    # where the gains are measured: the sparsity, or both ends of the range
    points = [sparsity] if options.get("gain_sparsities", 1) == 1 or hi <= lo else [lo, hi]
    removed_of: dict[str, list[float]] = {}  # Wanda's mask's removed energy on the Gram matrix (with those curves)

    def gather(layer_names, run):
        with observe({f"{n}.weight": model.get_submodule(n) for n in layer_names}, gram, scopes, text_layers,
                     share) as stats:
            run()
        if sync:
            distributed.all_reduce_stats({id(st): st for st in stats.values()}.values())
        for n in layer_names:
            st, w = stats[f"{n}.weight"], model.get_submodule(n).weight.detach()
            energy_of[n] = st.energy
            if gram:
                h = st.gram  # one division of the Gram sum per layer, for the curve and the denominators
                curve_of[n] = layer_curve(w, st, curve, lo, hi, h)
                removed_of[n] = [A.gram_removed(w, h, st.energy, p) for p in points]
        stats.clear()  # a block's Gram matrices go before the next block's

    if not observed:  # with batches, a rank may hold none of those picked: it adds zeros to the sums
        for layer_names in [ls for _, _, ls in blocks if ls] if blocks is not None else [names]:
            gather(layer_names, lambda: None)
    elif blocks is not None:
        layers_in = {b: ls for b, _, ls in blocks}
        run_block_sequential(model, [(b, m) for b, m, _ in blocks], observed,
                             lambda b, _block, replay: gather(layers_in[b], replay) if layers_in[b] else None,
                             offload, progress, weights)
    else:
        gather(names, lambda: run_whole_model(model, observed, progress, weights))
    weights_of = [model.get_submodule(n).weight.detach() for n in names]
    energies = [energy_of[n] for n in names]
    sizes = [w.numel() for w in weights_of]
    # the gains' batches spread over the calibration's timesteps like the pass's (pick_batches):
    # the first ones of a sampler's trajectories are all its first steps, near pure noise
    batches = [calibration[i] for i in pick_batches(calibration, options.get("gain_batches", 4), sync)]
    measure = _gain_measure(model, names, energies, options, batches, sync)
    if nm is not None:
        removed = [A.nm_removed(w, e, *nm) for w, e in zip(weights_of, energies)]
        gains = measure(removed, lambda sc: nm_mask(sc, *nm)) if measure else [1.0] * len(names)
        costs = [g * r for g, r in zip(gains, removed)]
        dense = A.keep_dense(costs, sizes, max_dense)
        log.info("allocation auto at %d:%d: %d of %d layers stay dense (%.3f of their weights): %s", *nm, sum(dense),
                 len(names), sum(n for n, d in zip(sizes, dense) if d) / sum(sizes),
                 ", ".join(n for n, d in zip(names, dense) if d) or "none")
        return {n: {"sparsity": 0.0 if d else 1 - nm[0] / nm[1], "dense": d, "predicted": c}
                for n, d, c in zip(names, dense, costs)}
    predicted = None
    if allocation == "owl":
        ratios = [A.outlier_ratio(w, e, options.get("m", 5.0)) for w, e in zip(weights_of, energies)]
        alloc = A.owl(ratios, sizes, sparsity, spread, options.get("lam", 0.08))
    else:
        wanda = [A.removal_curve(w, e) for w, e in zip(weights_of, energies)]
        curves = [curve_of[n] for n in names] if gram else wanda
        at = []  # per point: the gains measured there
        for i, p in enumerate(points if measure else []):
            # the gain's denominator on the same footing as the curve it multiplies
            removed = [removed_of[n][i] for n in names] if gram else [A.value_at(c, p) for c in wanda]
            at.append(measure(removed, lambda sc, p=p: row_mask(sc, p)))
        if len(at) == 2:  # g_l(s) through both ends: the curves carry the gains
            alloc, _ = A.auto([A.gained_curve(c, lo, a, hi, b) for c, a, b in zip(curves, *at)], sizes, sparsity,
                              spread)
            predicted = [A.value_at(c, s) for c, s in zip(curves, alloc)]
        else:
            alloc, predicted = A.auto(curves, sizes, sparsity, spread, at[0] if at else None)
    alloc = A.whole_rows(alloc, [tuple(w.shape) for w in weights_of], sparsity, *A.bounds(sparsity, spread))
    log.info("allocation %s: layer sparsities %.3f-%.3f around %.3f", allocation, min(alloc), max(alloc), sparsity)
    return {n: {"sparsity": a} | ({"predicted": predicted[i]} if predicted else {}) for i, (n, a) in
            enumerate(zip(names, alloc))}


def pick_batches(calibration: list[dict], k: int, sync: bool = False) -> list[int]:
    """The positions of this rank's batches among ``k`` spread evenly over the whole calibration's timesteps:
    every rank's batches ordered by their mean ``timestep`` (ties, or batches without one, by a
    fingerprint of their content), and the middle batch of each of k equal strata taken. The
    choice depends on the batches, not on their order or on how they are sharded, so N
    processes read the batches one process reads on their union. All of them if k covers the
    calibration."""
    keys = [_key(b) for b in calibration]
    everyone = sorted(distributed.gather_rows(keys) if sync else keys)
    n = len(everyone)
    if k >= n:
        return list(range(len(calibration)))
    chosen = {everyone[(2 * i + 1) * n // (2 * k)] for i in range(k)}
    return [i for i, key in enumerate(keys) if key in chosen]


def _key(batch: dict) -> tuple[float, float]:
    """(mean timestep or 0, a fingerprint of the batch's floating tensors) of one batch."""
    t = batch.get("timestep")
    step = float(t.double().mean()) if torch.is_tensor(t) and t.numel() else float(t) if isinstance(t, (int, float)) else 0.0
    mark = 0.0
    for name in sorted(batch):
        v = batch[name]
        if torch.is_tensor(v) and v.is_floating_point() and v.numel():
            x = v.detach().flatten()[:4096].double().cpu()
            mark += float((x * torch.arange(1, len(x) + 1, dtype=torch.float64).sin()).sum())
    return step, mark


def _gain_measure(model, names, energies, options, batches, sync):
    """``(removed, keep_of) -> [gain per name]``, measured as ``options["gains"]`` says
    (:func:`ditprune.gains.output_gains` per layer or per block, :func:`ditprune.probes.probed_gains`
    by probes), on ``batches``; None with ``"none"``."""
    per, energy = options.get("gains", "layers"), dict(zip(names, energies))
    if per == "none":
        return None
    if per == "probes":
        seeds, probes = [_seed(b) for b in batches], options.get("probes", 16)

        def run(removed, keep_of):
            return probed_gains(model, names, energy, removed, keep_of, batches, seeds, probes, sync)
    else:
        groups = gain_groups(model, names, per)

        def run(removed, keep_of):
            return output_gains(model, groups, energy, removed, keep_of, batches, sync)
    return lambda removed, keep_of: list(map(run(dict(zip(names, removed)), keep_of).get, names))


def _seed(batch: dict) -> int:
    """A probe seed from a batch's content (:func:`_key`): the same batch draws the same probes on any rank."""
    step, mark = _key(batch)
    return int.from_bytes(torch.tensor([step, mark], dtype=torch.float64).numpy().tobytes(), "little") % (2**63)
