"""Structured pruning, the pass: block by block (each block calibrated on the outputs of the
already-shrunk blocks before it, as the unstructured prune), the input statistics of the Linears
that read the heads and channels (:mod:`ditprune.surgery`), the choice of what goes and the
refit of those Linears (:mod:`ditprune.structured`), then the block shrunk before the next.
A failure puts every module back as it was."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn

from . import distributed, models, provenance
from . import structured as S
from .calibration import run_block_sequential
from .errors import InputError, InputTypeError
from .stats import observe
from .surgery import Unit, group_cols, group_rows, put_back, shrink, units

__all__ = ["STRUCTURES", "StructuredReport", "prune_structured", "check", "check_settings"]

log = logging.getLogger(__name__)

STRUCTURES = {"heads": ("heads",), "mlp": ("mlp",), "heads+mlp": ("heads", "mlp")}


@dataclass
class StructuredReport:
    structure: str
    method: str
    fraction: float
    units: list[dict] = field(default_factory=list)  # name, kind, before, after (groups)
    params_before: int = 0
    params_after: int = 0
    seconds: float = 0.0
    unit_weights: tuple[int, int] = (0, 0)  # weights of the Linears holding heads and channels: before, after
    peak_stats_bytes: int = 0  # not tracked for structured pruning

    @property
    def sparsity(self) -> float:
        """The fraction of the weights of the Linears holding heads and channels that went."""
        before, after = self.unit_weights
        return 1 - after / before if before else 0.0

    def summary(self) -> str:
        kinds = {}
        for u in self.units:
            b, a = kinds.get(u["kind"], (0, 0))
            kinds[u["kind"]] = (b + u["before"], a + u["after"])
        parts = [f"{k}: {a} of {b} kept" for k, (b, a) in kinds.items()]
        return (f"{self.structure} ({self.method}) at {self.fraction:g}: " + ", ".join(parts)
                + f"; parameters {self.params_before:,} -> {self.params_after:,} "
                f"({self.params_after / max(self.params_before, 1):.3f}x) in {self.seconds:.1f} s")


def check_settings(structure, fraction, method) -> None:
    """The arguments alone, before any model is at hand."""
    if structure not in STRUCTURES:
        raise InputError(f"structure must be one of {list(STRUCTURES)}, got {structure!r}")
    if method not in S.STRUCTURE_METHODS:
        raise InputError(f"structured pruning takes method one of {list(S.STRUCTURE_METHODS)}, got {method!r}")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
        raise InputTypeError(f"sparsity must be a number, got {type(fraction).__name__}")
    if not 0 <= fraction < 1:
        raise InputError(f"sparsity must be in [0, 1) (the fraction of heads / channels removed), got {fraction}")


def check(model: nn.Module, structure, fraction, method) -> list[tuple[str, nn.Module, list[Unit]]]:
    """(block name, block, its units of the requested kinds) for every block, after validating
    every argument against the model; nothing is touched."""
    check_settings(structure, fraction, method)
    blocks = models.blocks(model)
    if not blocks:
        raise InputError(f"{type(model).__name__} has no transformer blocks: structured pruning needs them")
    kinds = STRUCTURES[structure]
    out = []
    for name, block in blocks:
        found = [u for u in units(block, name) if u.kind in kinds]
        for kind in kinds:
            if not any(u.kind == kind for u in found):
                what = "attention heads" if kind == "heads" else "MLP hidden channels (a Linear MLP)"
                raise InputError(f"structure {structure!r}: block '{name}' of {type(model).__name__} has no "
                                 f"{what} that ditprune can remove; choose structure="
                                 f"{'heads' if kind == 'mlp' else 'mlp'!r}")
        out.append((name, block, found))
    return out


def prune_structured(model: nn.Module, calibration: Iterable[dict], structure: str = "heads+mlp",
                     sparsity: float = 0.25, method: str = "obs", *, offload=None, progress: bool = False,
                     sync: bool | None = None, percdamp: float = 0.01) -> StructuredReport:
    """Remove the fraction ``sparsity`` of the attention heads of every attention and of the
    hidden channels of every MLP (``structure``) in every transformer block, in place: the
    model keeps its classes with smaller Linears (see :mod:`ditprune.surgery`). ``method``:
    ``"obs"`` (the groups whose removal costs the block's output least after the least-squares
    update of the Linears that read them, then that update), ``"magnitude"`` or
    ``"activation"`` (FLAP-like; neither updates weights; ``"magnitude"`` reads no calibration)."""
    start = time.perf_counter()
    plan = check(model, structure, sparsity, method)
    sync = distributed.active() if sync is None else sync
    before = sum(p.numel() for p in model.parameters())
    report = StructuredReport(structure, method, float(sparsity))
    held = {n for _, _, found in plan for u in found for n in [p for p, _ in u.producers] + [c for c, _ in u.consumers]}
    unit_weights = lambda: sum(model.get_submodule(n).weight.numel() for n in held)  # noqa: E731
    held_before = unit_weights()
    done: list[tuple[dict, list[Unit]]] = []
    by_block = {name: found for name, _, found in plan}
    was_training = model.training
    model.eval()
    try:
        if method == "magnitude":
            for name, _, found in plan:
                done.append(_shrink_block(model, found, None, method, sparsity, percdamp, report))
        else:
            scopes = [b for _, b in models.blocks(model)]

            def calibrate_block(name, block, replay):
                found = by_block[name]
                consumers = {c for u in found for c, _ in u.consumers}
                layers = {f"{c}.weight": model.get_submodule(c) for c in consumers}
                texts = {f"{n}.weight" for n in models.text_layers(model, consumers)}
                with observe(layers, method == "obs", scopes, texts) as stats:
                    replay()
                if sync:
                    distributed.all_reduce_stats({id(s): s for s in stats.values()}.values())
                done.append(_shrink_block(model, found, {c: stats[f"{c}.weight"] for c in consumers}, method,
                                          sparsity, percdamp, report))
                log.info("block %s: %s", name, ", ".join(f"{u['name'].rsplit('.', 1)[-1]} {u['after']}/{u['before']}"
                                                         for u in report.units[-len(found):]))

            run_block_sequential(model, [(n, b) for n, b, _ in plan], calibration, calibrate_block, offload, progress)
    except BaseException:
        for swapped, changed in reversed(done):
            put_back(model, swapped, changed)
        raise
    finally:
        model.train(was_training)
    report.params_before, report.params_after = before, sum(p.numel() for p in model.parameters())
    report.unit_weights = (held_before, unit_weights())
    report.seconds = time.perf_counter() - start
    provenance.record(model, structure={"structure": structure, "method": method, "sparsity": float(sparsity),
                                        "kept": {u["name"]: u["after"] for u in report.units}})
    log.info("%s", report.summary())
    return report


def _shrink_block(model, found: list[Unit], stats, method, fraction, percdamp, report):
    """Choose and remove the groups of one block's units; returns what :func:`put_back` needs."""
    removals, gone = [], {}  # gone: consumer -> columns already removed by an earlier unit of this block
    for unit in found:
        remove = S.removal_count(unit.count, fraction)
        offset = unit.consumers[0][1]  # every consumer of a unit reads it at the same offset
        groups = [group_cols(unit, offset, [g]) for g in range(unit.count)]  # its columns in each consumer
        weights = [model.get_submodule(c).weight.detach() for c, _ in unit.consumers]
        if method == "obs":  # the whole consumer: the columns of its other units compensate too
            pairs = [(W, stats[c].gram) for W, (c, _) in zip(weights, unit.consumers)]
            chosen = S.select_obs(pairs, groups, remove, percdamp=percdamp,
                                  gone=[gone.get(c, []) for c, _ in unit.consumers])
        elif method == "activation":
            pairs = [(W, stats[c].energy) for W, (c, _) in zip(weights, unit.consumers)]
            chosen = S.select_by_score(S.activation_scores(pairs, groups), remove)
        else:
            prods = [model.get_submodule(p).weight.detach() for p, _ in unit.producers]
            rows = [group_rows(unit, unit.producers[0][1], [g]) for g in range(unit.count)]
            chosen = S.select_by_score(S.magnitude_scores(prods, weights, groups, rows), remove)
        for c, _ in unit.consumers:
            gone.setdefault(c, []).extend(x for g in chosen for x in groups[g])
        removals.append((unit, chosen))
        report.units.append({"name": unit.name, "kind": unit.kind, "before": unit.count,
                             "after": unit.count - len(chosen)})
    refitted = None
    if method == "obs":
        refitted = {}
        for c, cols in gone.items():
            W = model.get_submodule(c).weight.detach()
            keep = torch.ones(W.shape[1], dtype=torch.bool)
            keep[cols] = False
            refitted[c] = S.refit(W, stats[c].gram, keep, percdamp)
    swapped = shrink(model, removals, refitted)
    return swapped, [u for u, g in removals if g]
