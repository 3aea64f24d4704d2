"""``ditprune.prune``: resolve targets, validate, calibrate, mask, squash; undo on failure.

:class:`PrunePlan` is the same thing in steps, for callers that must attach the masks before
they can calibrate (the Lightning callback attaches them before DDP wraps the model):
``plan = PrunePlan(model, ...)`` validates and resolves without touching the model;
``plan.attach()`` adds all-ones masks (:class:`~ditprune.masks.PackedSparsity`, one bit per weight); ``plan.calibrate(batches)`` gathers
statistics and writes the masks in place; ``plan.report()``; ``plan.squash()`` or
``plan.restore()``.
"""

from __future__ import annotations

import itertools
import logging
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from . import allocating, distributed, memory, models, provenance
from .calibration import EmptyCalibrationError, run_block_sequential, run_whole_model, timestep_weights
from .errors import InputError, InputTypeError
from .granularity import check_sparsity, parse_pattern
from .progress import BlockProgress
from .sparsifiers import METHODS, SaliencySparsifier

__all__ = ["prune", "PrunePlan", "make_sparsifier", "resolve_targets", "LayerReport", "PruneReport", "DEFAULT_IGNORE"]

log = logging.getLogger(__name__)

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DEFAULT_IGNORE = (r"embedder", r"\.emb\.")  # timestep/condition embedders nested inside blocks


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]
    sparsity: float  # the fraction of zeros actually in the weight
    seconds: float
    target: float = 0.0  # what was asked (1 - N/M for a pattern)
    pattern: str | None = None
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

    def shortfall(self, tol: float = 1e-3) -> list[LayerReport]:
        """Layers that reached less sparsity than asked (per-row methods prune ``int(in * s)`` per row)."""
        return [r for r in self.layers if r.sparsity < r.target - tol]

    def summary(self) -> str:
        line = (f"{self.method} ({self.pattern or self.target_sparsity}): {len(self.layers)} layers, "
                f"sparsity {self.sparsity:.4f}, {self.seconds:.1f}s")
        short = self.shortfall()
        if short:
            low = min(short, key=lambda r: r.sparsity)
            line += (f"; {len(short)} layers reached less than asked (lowest {low.sparsity:.4f} of "
                     f"{low.target:.4f}, {low.name}: its rows prune int(in x sparsity) weights each)")
        return line

    def __str__(self) -> str:
        lines = [self.summary()]
        for r in self.layers:
            extra = "".join(f" {k}={v}" for k, v in r.info.items())
            lines.append(f"  {r.name:60s} {str(r.shape):14s} {r.sparsity:.4f} {r.seconds * 1e3:8.1f}ms{extra}")
        return "\n".join(lines)


def make_sparsifier(method: str, sparsity: float = 0.5, pattern: str | None = None, **options) -> SaliencySparsifier:
    if not isinstance(method, str) or method not in METHODS:
        raise InputError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
    import inspect

    params = inspect.signature(METHODS[method]).parameters
    valid = [p for p, v in params.items() if p not in ("sparsity", "pattern") and v.kind is not v.VAR_KEYWORD]
    unknown = sorted(set(options) - set(valid))
    if unknown:  # every method refuses what it does not take (the base class would store anything)
        raise InputTypeError(f"method {method!r} got an unknown option {unknown[0]!r}; its options are {valid}")
    try:
        return METHODS[method](sparsity=sparsity, pattern=pattern, **options)
    except TypeError as e:
        raise InputTypeError(f"method {method!r}: {e}; its options are {valid}") from None


def compile_regexes(patterns: Sequence[str], what: str) -> list[re.Pattern]:
    """``patterns`` (a list of regex strings) compiled; a user error names ``what`` otherwise."""
    if isinstance(patterns, str):
        raise InputTypeError(f"{what} is a list of regexes, not a single string: write {what}=[{patterns!r}]")
    if not isinstance(patterns, (list, tuple)) or not all(isinstance(p, str) for p in patterns):
        raise InputTypeError(f"{what} is a list of regex strings, got {patterns!r}")
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise InputError(f"{what}: regex {p!r} does not compile ({e})") from None
    return out


def resolve_targets(
    model: nn.Module, targets: Sequence[str] | None = None, ignore: Sequence[str] | None = None
) -> dict[str, nn.Linear]:
    """Linear layers whose qualified name matches any ``targets`` regex (``re.search``) and no
    ``ignore`` regex. ``targets=None``: the model family's defaults (Linears inside the blocks).
    ``ignore=None``: :data:`DEFAULT_IGNORE` (embedders nested in blocks); ``ignore=[]`` keeps them.
    A weight shared by several Linears (tied) is listed once, under the first name."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    patterns = compile_regexes(targets if targets is not None else models.default_targets(model), "targets")
    ignored = compile_regexes(ignore if ignore is not None else DEFAULT_IGNORE, "ignore")
    chosen: dict[str, nn.Linear] = {}
    for regex in patterns:
        hits = [n for n in linears if regex.search(n)]
        if not hits:
            sample = ", ".join(list(linears)[:5])
            raise InputError(f"target regex {regex.pattern!r} matches no nn.Linear in the model (names look like: {sample})")
        chosen.update({n: linears[n] for n in hits})
    kept = {n: m for n, m in chosen.items() if not any(i.search(n) for i in ignored)}
    if not kept:
        hint = " (the default ignore list skips embedders: pass ignore=[] to prune them)" if ignore is None else ""
        raise InputError(f"the ignore regexes removed every targeted layer{hint}")
    order = list(linears)
    out: dict[str, nn.Linear] = {}
    owner: dict[int, str] = {}
    for name, module in sorted(kept.items(), key=lambda nm: order.index(nm[0])):
        first = owner.setdefault(id(module.weight), name)
        if first == name:
            out[name] = module
        else:  # one weight, two Linears (tied): pruned once, with the first layer's statistics
            log.info("'%s' shares its weight with '%s': pruned once, as '%s'", name, first, first)
    return out


def _setting(sparsity: float | None, pattern: str | None, where: str) -> tuple[float, tuple[int, int] | None]:
    try:
        if pattern is not None:
            n, m = parse_pattern(pattern)
            return 1.0 - n / m, (n, m)
        return check_sparsity(sparsity), None
    except ValueError as e:
        raise InputError(f"{where}: {e}") from None


def _layer_settings(model, targets, ignore, overrides, sparsity, pattern) -> dict[str, dict]:
    """Layer name -> {"sparsity", "nm", "pattern"}: the main setting, or an override's. Every
    override keeps the ignore list; two overrides that match one layer are refused."""
    main = resolve_targets(model, targets, ignore)
    s, nm = _setting(sparsity, pattern, "prune")
    settings = {n: {"sparsity": s, "nm": nm, "pattern": pattern} for n in main}
    owner: dict[str, int] = {}
    for i, ov in enumerate(overrides or []):
        ov = dict(ov)
        if not ov.get("targets"):
            raise InputError(f"override {i}: give 'targets' (a list of regexes)")
        if ov.get("sparsity") is None and ov.get("pattern") is None:
            raise InputError(f"override {i}: set 'sparsity' or 'pattern'")
        s_i, nm_i = _setting(ov.get("sparsity"), ov.get("pattern"), f"override {i}")
        for name in resolve_targets(model, ov["targets"], ignore):
            if name in owner:
                j = owner[name]
                raise InputError(f"overrides {j} ({list(overrides[j]['targets'])}) and {i} ({list(ov['targets'])}) "
                                 f"both match layer '{name}'; make their target regexes disjoint")
            owner[name] = i
            settings[name] = {"sparsity": s_i, "nm": nm_i, "pattern": ov.get("pattern"), "override": True}
    order = [n for n, _ in model.named_modules()]
    return dict(sorted(settings.items(), key=lambda kv: order.index(kv[0])))


def _validate_layers(layers: dict[str, nn.Linear], settings: dict[str, dict]) -> None:
    for name, m in layers.items():
        if m.weight.dtype not in SUPPORTED_DTYPES:
            raise InputTypeError(
                f"layer '{name}' has dtype {m.weight.dtype}; ditprune prunes float32, float16 or bfloat16 weights "
                "(prune before quantizing)"
            )
        nm = settings[name]["nm"]
        if nm is not None and m.in_features % nm[1]:
            raise InputError(
                f"pattern {nm[0]}:{nm[1]} does not divide layer '{name}' with in_features={m.in_features}; "
                "ignore that layer or choose another M"
            )


def _targets_by_block(model: nn.Module, names: Iterable[str]) -> dict[str, list[str]] | None:
    """Block name -> tensor_fqns of its targets, or None when some target lies outside every block."""
    names = list(names)
    blocks = [b for b, _ in models.blocks(model)]
    by_block = {b: [f"{n}.weight" for n in names if n.startswith(b + ".")] for b in blocks}
    return by_block if blocks and sum(map(len, by_block.values())) == len(names) else None


class PrunePlan:
    """One prune, in steps (see the module docstring). Construction validates every argument
    and resolves the targets without touching the model."""

    def __init__(
        self,
        model: nn.Module,
        method: str = "dit",
        sparsity: float = 0.5,
        pattern: str | None = None,
        targets: Sequence[str] | None = None,
        *,
        ignore: Sequence[str] | None = None,
        overrides: Sequence[dict] | None = None,
        block_sequential: bool | None = None,
        backup: bool = True,
        allocation: str = "uniform",
        allocation_range: float = 0.2,
        allocation_options: dict | None = None,
        max_dense: float = 0.0,
        **method_options: Any,
    ) -> None:
        self.model, self.method, self.pattern = model, method, pattern
        self.allocation = allocating.check(allocation, allocation_range, allocation_options, pattern, max_dense)
        self.max_dense = float(max_dense)
        self.allocation_range, self.allocation_options = float(allocation_range), dict(allocation_options or {})
        self.allocated: dict[str, dict] = {}  # layer -> {"sparsity", "predicted"?}, once allocated
        self.sparsifier = make_sparsifier(method, sparsity, pattern, **method_options)
        if not isinstance(backup, bool):
            raise InputTypeError(f"backup is True or False, got {backup!r}")
        self.sparsifier.backup = backup
        self.settings = _layer_settings(model, targets, ignore, overrides, sparsity, pattern)
        layers = {n: model.get_submodule(n) for n in self.settings}
        _validate_layers(layers, self.settings)
        by_block = _targets_by_block(model, layers) if block_sequential is not False else None
        if block_sequential and by_block is None:
            raise InputError(
                "block_sequential=True needs every target inside a transformer block (an nn.ModuleList of "
                "blocks); use block_sequential=False"
            )
        self.by_block = by_block
        self.scopes = [b for _, b in models.blocks(model)]
        self.text_layers = {f"{n}.weight" for n in models.text_layers(model, self.settings)}
        self.share_stats = True  # layers reading one tensor share statistics (off: for measuring the saving)
        self.seconds = 0.0

    @property
    def target_sparsity(self) -> float:
        return self.sparsifier.defaults["sparsity"]

    def attach(self) -> None:
        """All-ones masks on every target (one bit per weight): the model computes as before."""
        config = [{"tensor_fqn": f"{n}.weight", "sparsity": s["sparsity"], "nm": s["nm"]}
                  for n, s in self.settings.items()]
        self.sparsifier.prepare(self.model, config)

    def calibrate(self, calibration: Iterable[dict], *, offload=None, progress: bool | None = None,
                  sync: bool | None = None, timestep_weighting: str | None = None, squash: bool = False,
                  checkpoints: BlockProgress | None = None) -> None:
        """Gather statistics over ``calibration`` and write every mask. Under torch.distributed
        (``sync=None``: whenever a process group of several ranks is up) each rank passes its own
        shard: statistics are summed over ranks and rank 0's masks and weights are broadcast.
        On any error the model is put back as it was before :meth:`attach`, and it re-raises;
        with ``backup=False`` a layer whose weights a method already updated keeps them, pruned
        (the error says how many). ``squash=True`` with ``backup=False`` bakes each block's masks
        in as soon as it is pruned (then a failure leaves those blocks pruned, and says so).
        ``checkpoints`` (block by block only): each finished block is saved there, and blocks it
        already holds are restored instead of pruned again (see :mod:`ditprune.progress`).
        """
        start = time.perf_counter()
        sp = self.sparsifier
        sync = distributed.active() if sync is None else sync
        progress = sys.stderr.isatty() if progress is None else progress
        was_training = self.model.training
        self.model.eval()
        try:
            calibration = _checked(self.model, calibration, sp.needs_energy or sp.needs_gram)
            weights = None
            if timestep_weighting is not None:
                calibration = list(calibration)
                weights = timestep_weights(calibration, timestep_weighting)
            if sync:
                calibration = list(calibration)
                if distributed.min_over_ranks(len(calibration)) == 0:
                    raise EmptyCalibrationError("calibration is empty on at least one rank: give every rank "
                                                "at least one batch")
            if self.allocation != "uniform" and not self.allocated and (self.pattern is None or self.max_dense > 0):
                calibration = list(calibration)  # read twice: the allocation pass, then the prune
                self._allocate(calibration, sync, weights, progress, offload)
            if checkpoints is not None and self.by_block is None:
                raise InputError("checkpoints need a block-by-block prune (every target inside a transformer block)")
            if not (sp.needs_energy or sp.needs_gram):
                self._step(None, sync)  # data-free (magnitude): calibration is not read
            elif self.by_block is not None:

                blocks, done = models.blocks(self.model), []

                def calibrate_block(name, block, replay):
                    fqns, began = self.by_block[name], time.perf_counter()
                    done.append(name)
                    if fqns:
                        if checkpoints is not None and name in checkpoints.done:
                            checkpoints.restore(name, sp._groups(fqns), sp.state)
                            log.info("block %d/%d (%s): restored from %s", len(done), len(blocks), name,
                                     checkpoints.directory)
                        else:
                            self._observe(fqns, replay, sync)
                            self._step(fqns, sync)
                            if checkpoints is not None and distributed.rank() == 0:
                                checkpoints.save(name, sp._groups(fqns), sp.state)
                            log.info("block %d/%d (%s): %d layers pruned in %.1f s", len(done), len(blocks), name,
                                     len(fqns), time.perf_counter() - began)
                        if squash and not sp.backup:
                            for f in fqns:
                                sp.state[f]["updated"] = True  # baked in: restore() cannot undo it
                            sp.squash_mask(fqns)
                    memory.release()  # the block's temporaries go back to the system

                run_block_sequential(self.model, blocks, calibration, calibrate_block, offload, progress, weights)
            else:
                self._observe(None, lambda: run_whole_model(self.model, calibration, progress, weights), sync)
                self._step(None, sync)
        except BaseException as e:
            kept = self.sparsifier.updated_without_backup()
            self.restore()
            if kept:
                e.add_note(f"ditprune: backup=False, so {len(kept)} layers already pruned keep their pruned "
                           f"weights (e.g. '{kept[0]}'); the other layers are as before")
            raise
        finally:
            self.model.train(was_training)
        self.seconds += time.perf_counter() - start

    def _allocate(self, calibration: list[dict], sync: bool, weights, progress: bool, offload=None) -> None:
        """Each non-override layer's sparsity from the allocation pass (:mod:`ditprune.allocating`),
        block by block when the prune is."""
        names = [n for n, s in self.settings.items() if not s.get("override")]
        blocks = None
        if self.by_block is not None:
            wanted = {f"{n}.weight" for n in names}
            blocks = [(b, m, [f[: -len(".weight")] for f in self.by_block.get(b, []) if f in wanted])
                      for b, m in models.blocks(self.model)]
        self.allocated = allocating.allocate(self.model, names, self.allocation, self.target_sparsity,
                                             self.allocation_range, self.allocation_options, calibration,
                                             nm=self.sparsifier.defaults["nm"], max_dense=self.max_dense,
                                             scopes=self.scopes, text_layers=self.text_layers, share=self.share_stats,
                                             weights=weights, progress=progress, sync=sync, blocks=blocks,
                                             offload=offload, updates=self.sparsifier.updates_weights)
        groups = {g["module_fqn"]: g for g in self.sparsifier.groups}
        for n, a in self.allocated.items():
            self.settings[n]["sparsity"] = groups[n]["sparsity"] = a["sparsity"]
            if a.get("dense"):  # N:M: this layer stays dense (a sparsity of 0 prunes nothing)
                self.settings[n].update(nm=None, pattern=None)
                groups[n]["nm"] = None

    def _observe(self, fqns, run, sync: bool) -> None:
        with self.sparsifier.observe(fqns, self.scopes, self.text_layers, self.share_stats) as stats:
            run()
        if sync:
            distributed.all_reduce_stats(self.sparsifier.state[f]["stats"] for f in stats)

    def _step(self, fqns, sync: bool) -> None:
        self.sparsifier.step(tensor_fqns=fqns)
        if sync:
            groups = self.sparsifier._groups(fqns)
            masks = [g["module"].parametrizations[g["tensor_name"]][0] for g in groups]
            distributed.broadcast_(p.bits for p in masks)
            for p in masks:
                p.refresh()
            distributed.broadcast_(g["module"].parametrizations[g["tensor_name"]].original for g in groups)

    def report(self) -> PruneReport:
        sp = self.sparsifier
        layers = []
        for g in sp.groups:
            w = g["module"].weight  # under the parametrization: original * mask
            info = dict(sp.state[g["tensor_fqn"]].get("info", {}))
            allocated = self.allocated.get(g["module_fqn"], {})
            if "predicted" in allocated:
                info["predicted"] = round(allocated["predicted"], 6)
            if allocated.get("dense"):
                info["dense"] = "kept: largest predicted error per weight"
            s = self.settings[g["module_fqn"]]
            layers.append(LayerReport(g["module_fqn"], tuple(w.shape), 1.0 - w.count_nonzero().item() / w.numel(),
                                      info.pop("seconds", 0.0), s["sparsity"], s["pattern"], info))
        report = PruneReport(self.method, self.target_sparsity, self.pattern, layers, self.seconds,
                             getattr(sp, "peak_stats_bytes", 0))
        provenance.record(self.model, method=self.method, sparsity=self.target_sparsity, pattern=self.pattern,
                          allocation=self.allocation, measured_sparsity=round(report.sparsity, 6), layers=len(layers),
                          **({"max_dense": self.max_dense} if self.max_dense else {}))
        return report

    def squash(self) -> None:
        self.sparsifier.squash_mask()

    def restore(self) -> None:
        self.sparsifier.restore()


def _checked(model: nn.Module, calibration: Iterable[dict], read: bool) -> Iterable[dict]:
    """``calibration`` with its first batch checked against the model (nothing read if not ``read``)."""
    if not read:
        return calibration
    it = iter(calibration)
    first = next(it, None)
    if first is None:
        return []
    models.check_batch(model, first)
    return itertools.chain([first], it)


def prune(
    model: nn.Module,
    calibration: Iterable[dict],
    method: str = "dit",
    sparsity: float = 0.5,
    pattern: str | None = None,
    targets: Sequence[str] | None = None,
    *,
    ignore: Sequence[str] | None = None,
    overrides: Sequence[dict] | None = None,
    block_sequential: bool | None = None,
    offload: str | torch.device | None = None,
    squash: bool = True,
    backup: bool = True,
    progress: bool | None = None,
    sync: bool | None = None,
    timestep_weighting: str | None = None,
    allocation: str = "uniform",
    allocation_range: float = 0.2,
    allocation_options: dict | None = None,
    max_dense: float = 0.0,
    structure: str | None = None,
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
        targets: regexes of Linear names (``re.search``); None = the family's defaults.
        ignore: regexes of names to leave dense; None = :data:`DEFAULT_IGNORE` (embedders nested
            in blocks), applied to ``targets`` and to every override.
        overrides: ``[{"targets": [regex, ...], "sparsity": s}]`` or ``{..., "pattern": "N:M"}``:
            those layers take that setting instead (pruned even if ``targets`` misses them); two
            overrides may not match one layer. All layers are pruned in the same single pass.
        block_sequential: prune block by block, each block calibrated on the outputs of the
            already-pruned blocks before it; False: all statistics from the dense model in one
            pass. None (default): block by block when every target sits in a transformer block.
        offload: device where captured block inputs wait between blocks (e.g. ``"cpu"``).
        squash: bake masks into the weights (False: leave the mask parametrizations, one bit per
            weight, e.g. for a masked fine-tune; then ``report`` has the sparsifier as ``.sparsifier``).
        backup: keep a CPU copy of every weight a method updates (``"sparsegpt"``, ``"dit"`` with
            ``reconstruct=True``) until the prune succeeds, so a failure puts the model back
            exactly. False saves that memory (the weights' bytes in host RAM); a failure then
            leaves the layers already updated pruned, and says so.
        progress: progress bars (None, the default: when stderr is a terminal). Either way each
            finished block is one INFO line on the ``ditprune`` logger
            (``logging.basicConfig(level=logging.INFO)`` shows them).
        sync: all-reduce statistics over torch.distributed ranks (None: when a process group
            with several ranks is initialized; every rank then passes its own calibration shard).
        timestep_weighting: ``"log_decrease"`` weighs each batch's tokens by its timestep, the
            first sampler steps more (see :func:`ditprune.calibration.timestep_weights`); None:
            every token alike.
        allocation: ``"uniform"`` (every layer at ``sparsity``), ``"owl"`` or ``"auto"``: each
            targeted layer gets its own sparsity within ``sparsity +- allocation_range`` (clipped
            to [0, 0.99]) so that the zeros over all targeted weights are still ``sparsity`` (see
            :mod:`ditprune.allocation`); one extra pass of the dense model over ``calibration``
            measures what it needs. Override layers keep their setting and stay out of the budget.
        allocation_options: OWL's ``m`` (outlier threshold, default 5) and ``lam`` (default 0.08);
            auto's ``gains`` (``"layers"``: each layer's effect on the output measured alone, the
            default; ``"blocks"``: a block's layers together per stream, cheaper and measured
            somewhat worse, see
            :func:`ditprune.gains.output_gains`; ``"probes"``: every layer at once from
            ``probes`` (default 16) random probes of the output's gradient, linearised, about 5x
            cheaper at FLUX.1-dev's shapes, see :mod:`ditprune.probes`; ``"none"``),
            ``gain_batches`` (default 4, spread
            over the calibration's timesteps), ``gain_sparsities`` (1, the default: gains
            measured at ``sparsity``; 2: at both ends of the range, twice the forwards) and
            ``curve`` (``"sparsegpt"``, the default for methods that update weights: what
            SparseGPT loses on sampled rows; ``"wanda"``, the default otherwise; ``"obs"``); the
            pass's ``batches`` (default: all; that many batches spread over the calibration's
            timesteps, :func:`ditprune.allocating.pick_batches`: the pass costs a calibration
            pass of its own, see ``ditprune bench --cost``).
        max_dense: with ``pattern`` and ``allocation="auto"``: the fraction of the (non-override)
            targeted weights that may stay dense; the layers whose pruning is predicted to cost
            the model's output most per weight stay dense first (their report's ``info`` says
            so). 0 (the default): every layer takes the pattern.
        structure: ``"heads"`` | ``"mlp"`` | ``"heads+mlp"``: remove whole attention heads and
            MLP hidden channels instead, the fraction ``sparsity`` of them in every attention and
            MLP of every block, leaving smaller Linears (see
            :func:`ditprune.structuring.prune_structured`, whose
            :class:`~ditprune.structuring.StructuredReport` is returned). ``method`` then
            chooses which go: ``"obs"`` (also what the default ``"dit"`` selects: the least
            output error after the least-squares update of the Linears that read them),
            ``"magnitude"`` or ``"activation"``. Unstructured pruning of what remains is a
            second call.
        **method_options: the method's own options (e.g. ``alpha=0.4`` for ``"dit"``).

    A failed prune (bad input, NaN activations, ...) raises and leaves the model as it was
    (with ``backup=False``: except the layers already updated, see ``backup``).
    """
    if structure is not None:
        return _structured(model, calibration, structure, method, sparsity, offload, progress, sync,
                           pattern=pattern, targets=targets, overrides=overrides, allocation=allocation,
                           timestep_weighting=timestep_weighting, max_dense=max_dense, **method_options)
    start = time.perf_counter()
    plan = PrunePlan(model, method, sparsity, pattern, targets, ignore=ignore, overrides=overrides,
                     block_sequential=block_sequential, backup=backup, allocation=allocation,
                     allocation_range=allocation_range, allocation_options=allocation_options,
                     max_dense=max_dense, **method_options)
    plan.attach()
    plan.calibrate(calibration, offload=offload, progress=progress, sync=sync, timestep_weighting=timestep_weighting,
                   squash=squash)
    plan.seconds = time.perf_counter() - start
    report = plan.report()
    if squash:
        plan.squash()
    else:
        report.sparsifier = plan.sparsifier
    if report.shortfall():
        log.info("%s", report.summary())
    log.info("pruned %d layers with %s to sparsity %.4f", len(report.layers), method, report.sparsity)
    return report


def _structured(model, calibration, structure, method, sparsity, offload, progress, sync, **unsupported):
    from .structuring import prune_structured

    given = sorted(k for k, v in unsupported.items() if v not in (None, "uniform", 0, 0.0))
    if given:
        raise InputError(f"structure={structure!r} removes whole heads and channels; it does not take {given} "
                         "(prune what remains with a second, unstructured call)")
    progress = sys.stderr.isatty() if progress is None else progress
    return prune_structured(model, calibration, structure, sparsity, "obs" if method == "dit" else method,
                            offload=offload, progress=progress, sync=sync)
