"""``ditprune.prune``: resolve targets, validate, calibrate, mask, squash; undo on failure."""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from . import models
from .calibration import run_block_sequential, run_whole_model
from .granularity import parse_pattern
from .sparsifiers import METHODS, SaliencySparsifier

__all__ = ["prune", "make_sparsifier", "resolve_targets", "LayerReport", "PruneReport"]

log = logging.getLogger(__name__)

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DEFAULT_IGNORE = (r"embedder", r"\.emb\.")  # timestep/condition embedders nested inside blocks


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]
    sparsity: float
    seconds: float
    info: dict = field(default_factory=dict)


@dataclass
class PruneReport:
    method: str
    target_sparsity: float
    pattern: str | None
    layers: list[LayerReport]
    seconds: float
    peak_stats_bytes: int = 0  # the most calibration statistics held at once
    sparsifier: Any = field(default=None, repr=False)  # set when prune(..., squash=False)

    @property
    def sparsity(self) -> float:
        """Fraction of zeros over all targeted weights."""
        total = sum(r.shape[0] * r.shape[1] for r in self.layers)
        return sum(r.sparsity * r.shape[0] * r.shape[1] for r in self.layers) / max(total, 1)

    def __str__(self) -> str:
        lines = [f"{self.method} ({self.pattern or self.target_sparsity}): {len(self.layers)} layers, "
                 f"sparsity {self.sparsity:.4f}, {self.seconds:.1f}s"]
        for r in self.layers:
            extra = "".join(f" {k}={v}" for k, v in r.info.items())
            lines.append(f"  {r.name:60s} {str(r.shape):14s} {r.sparsity:.4f} {r.seconds * 1e3:8.1f}ms{extra}")
        return "\n".join(lines)


def make_sparsifier(method: str, sparsity: float = 0.5, pattern: str | None = None, **options) -> SaliencySparsifier:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
    try:
        return METHODS[method](sparsity=sparsity, pattern=pattern, **options)
    except TypeError as e:
        import inspect

        valid = [p for p in inspect.signature(METHODS[method]).parameters if p not in ("sparsity", "pattern")]
        raise TypeError(f"method {method!r} got an unknown option ({e}); its options are {valid}") from None


def resolve_targets(
    model: nn.Module, targets: Sequence[str] | None = None, ignore: Sequence[str] | None = None
) -> dict[str, nn.Linear]:
    """Linear layers whose qualified name matches any ``targets`` regex (``re.search``) and no
    ``ignore`` regex. ``targets=None``: the model family's defaults (Linears inside the blocks)."""
    if isinstance(targets, str) or isinstance(ignore, str):
        raise TypeError("targets and ignore are lists of regexes, not a single string")
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    patterns = list(targets) if targets is not None else models.default_targets(model)
    ignore = list(ignore) if ignore is not None else (list(DEFAULT_IGNORE) if targets is None else [])
    chosen: dict[str, nn.Linear] = {}
    for pattern in patterns:
        regex = re.compile(pattern)
        hits = [n for n in linears if regex.search(n)]
        if not hits:
            sample = ", ".join(list(linears)[:5])
            raise ValueError(f"target regex {pattern!r} matches no nn.Linear in the model (names look like: {sample})")
        chosen.update({n: linears[n] for n in hits})
    chosen = {n: m for n, m in chosen.items() if not any(re.search(i, n) for i in ignore)}
    if not chosen:
        raise ValueError("the ignore regexes removed every targeted layer")
    return dict(sorted(chosen.items(), key=lambda nm: list(linears).index(nm[0])))


def _validate_layers(layers: dict[str, nn.Linear], nm: tuple[int, int] | None) -> None:
    for name, m in layers.items():
        if m.weight.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"layer '{name}' has dtype {m.weight.dtype}; ditprune prunes float32, float16 or bfloat16 weights "
                "(prune before quantizing)"
            )
        if nm is not None and m.in_features % nm[1]:
            raise ValueError(
                f"pattern {nm[0]}:{nm[1]} does not divide layer '{name}' with in_features={m.in_features}; "
                "ignore that layer or choose another M"
            )


def _targets_by_block(model: nn.Module, layers: dict[str, nn.Linear]) -> dict[str, list[str]] | None:
    """Block name -> tensor_fqns of its targets, or None when some target lies outside every block."""
    names = [b for b, _ in models.blocks(model)]
    by_block = {b: [f"{n}.weight" for n in layers if n.startswith(b + ".")] for b in names}
    return by_block if names and sum(map(len, by_block.values())) == len(layers) else None


def prune(
    model: nn.Module,
    calibration: Iterable[dict],
    method: str = "dit",
    sparsity: float = 0.5,
    pattern: str | None = None,
    targets: Sequence[str] | None = None,
    *,
    ignore: Sequence[str] | None = None,
    block_sequential: bool | None = None,
    offload: str | torch.device | None = None,
    squash: bool = True,
    progress: bool = False,
    **method_options: Any,
) -> PruneReport:
    """Prune ``model`` in place, one shot, and return a per-layer report.

    Args:
        model: any ``nn.Module``; diffusers DiT transformers are recognised (see :mod:`ditprune.models`).
        calibration: iterable of dicts, each fed as ``model(**batch)`` (prompts x timesteps);
            not read by ``"magnitude"``.
        method: ``"dit"`` | ``"wanda"`` | ``"magnitude"`` | ``"ria"`` | ``"sparsegpt"``.
        sparsity: fraction of each targeted weight set to zero, in [0, 1).
        pattern: ``"N:M"`` (keep N of every M consecutive inputs, e.g. ``"2:4"``); wins over sparsity.
        targets: regexes of Linear names (``re.search``); None = the family's defaults, less
            embedders nested in blocks.
        ignore: regexes of names to leave dense.
        block_sequential: prune block by block, each block calibrated on the outputs of the
            already-pruned blocks before it; False: all statistics from the dense model in one
            pass. None (default): block by block when every target sits in a transformer block.
        offload: device where captured block inputs wait between blocks (e.g. ``"cpu"``).
        squash: bake masks into the weights (False: leave the ``FakeSparsity`` parametrizations,
            e.g. for a masked fine-tune; then ``report`` has the sparsifier as ``.sparsifier``).
        **method_options: the method's own options (e.g. ``alpha=0.4`` for ``"dit"``).

    A failed prune (bad input, NaN activations, ...) raises and leaves the model as it was.
    """
    start = time.perf_counter()
    sparsifier = make_sparsifier(method, sparsity, pattern, **method_options)
    nm = parse_pattern(pattern) if pattern is not None else None
    layers = resolve_targets(model, targets, ignore)
    _validate_layers(layers, nm)

    by_block = _targets_by_block(model, layers) if block_sequential is not False else None
    if block_sequential and by_block is None:
        raise ValueError(
            "block_sequential=True needs every target inside a transformer block (an nn.ModuleList of blocks); "
            "use block_sequential=False"
        )
    block_sequential = by_block is not None

    was_training = model.training
    model.eval()
    sparsifier.prepare(model, [{"tensor_fqn": f"{name}.weight"} for name in layers])
    try:
        if not (sparsifier.needs_energy or sparsifier.needs_gram):
            sparsifier.step()  # data-free (magnitude): calibration is not read
        elif block_sequential:

            def calibrate_block(name, block, replay):
                fqns = by_block[name]
                if not fqns:
                    return
                with sparsifier.observe(fqns):
                    replay()
                sparsifier.step(tensor_fqns=fqns)

            run_block_sequential(model, models.blocks(model), calibration, calibrate_block, offload, progress)
        else:
            with sparsifier.observe():
                run_whole_model(model, calibration, progress)
            sparsifier.step()
    except BaseException:
        sparsifier.restore()
        model.train(was_training)
        raise
    model.train(was_training)

    reports = []
    for g in sparsifier.groups:
        mask = g["module"].parametrizations[g["tensor_name"]][0].mask
        info = dict(sparsifier.state[g["tensor_fqn"]].get("info", {}))
        reports.append(
            LayerReport(g["module_fqn"], tuple(mask.shape), 1.0 - mask.count_nonzero().item() / mask.numel(),
                        info.pop("seconds", 0.0), info)
        )
    report = PruneReport(method, sparsifier.defaults["sparsity"], pattern, reports, time.perf_counter() - start,
                         getattr(sparsifier, "peak_stats_bytes", 0))
    if squash:
        sparsifier.squash_mask()
    else:
        report.sparsifier = sparsifier
    log.info("pruned %d layers with %s to sparsity %.4f", len(reports), method, report.sparsity)
    return report
