"""The measured output gains of ``allocation="auto"``: how much of a layer's relative output
error reaches the model's output, each layer alone or a block's layers together per stream
(:func:`output_gains`)."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from . import distributed, models, saliency

__all__ = ["gain_groups", "output_gains"]


def _floats(out) -> list[torch.Tensor]:
    """The floating tensors of a block's output (tensor, tuple or list): its streams."""
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return [o for o in outs if torch.is_tensor(o) and o.is_floating_point()]


def _mix(ref, pruned, stream: int):
    """``ref`` (a block's output) with its floating tensor number ``stream`` taken from ``pruned``."""
    if not isinstance(ref, (tuple, list)):
        return pruned
    out, k = [], 0
    for r, p in zip(ref, pruned):
        if torch.is_tensor(r) and r.is_floating_point():
            out.append(p if k == stream else r)
            k += 1
        else:
            out.append(r)
    return type(ref)(out)


def gain_groups(model: nn.Module, names: list[str], per: str = "layers") -> list[tuple[nn.Module | None, list[str]]]:
    """How :func:`output_gains` measures ``names``: ``per="layers"`` (the default): every layer
    alone; ``per="blocks"``: the layers of each transformer block together (the block's module,
    its layers), a layer outside every block alone."""
    inside = {}
    if per == "blocks":
        for b, module in models.blocks(model):
            for n in names:
                if n.startswith(b + "."):
                    inside.setdefault(b, (module, []))[1].append(n)
    grouped = {n for _, ns in inside.values() for n in ns}
    return list(inside.values()) + [(None, [n]) for n in names if n not in grouped]


@torch.no_grad()
def output_gains(model: nn.Module, groups, energies: dict, removed: dict, keep_of, batches: list[dict],
                 sync: bool = False, skip: bool = True) -> dict[str, float]:
    """Layer name -> how much of its relative output error reaches the model's output, on
    ``batches``: the relative change of the model's output when that layer is pruned
    (``keep_of(wanda_scores)``: Wanda's mask at the target sparsity or pattern), over
    ``removed[name]``, the fraction of the layer's output energy that this mask removes.

    ``groups`` (:func:`gain_groups`): a layer alone is pruned alone and the model run (one
    forward per layer and batch). The layers of a block are measured together, per output
    stream s of the block (FLUX's blocks return the text and the image tokens): on the block's
    own (dense) inputs the block runs with each layer pruned alone (change r_ls of stream s)
    and with all of them (r_s), once per batch; then the model runs once per stream and batch
    with the block's stream s replaced by its all-pruned value (change R_s at the output). The
    layer's gain is sum_s R_s r_ls / r_s over ``removed``: within a block each layer's share of
    a stream's error, across blocks and streams how much of it reaches the output (assumed:
    alike whichever layer caused it). That costs one model forward per block and stream instead of
    per layer (about 5x fewer on FLUX.1-dev); see the README for what it costs in quality. With
    ``sync`` every rank's sums are added, so every rank measures alike. The layers carry
    torch.ao parametrizations (their ``original`` is pruned for the measurement and put back).

    Every forward after the dense one starts at the measured block (:class:`_Resume`): the
    blocks before it are dense, so they return the outputs recorded in the dense forward
    instead of running; the gains are the same, bit for bit, and a layer in the j-th of B blocks
    costs (B - j) / B of a forward. ``skip=False`` runs every block (what that saves is measured
    against it: ``benchmarks/gains_resume.py``)."""

    resume = _Resume(model, len(batches) if skip else None)

    def output(i):
        resume.batch = i
        return models.prediction(model(**batches[i])).float()

    with resume.recording():
        dense = [output(i) for i in range(len(batches))]

    def change() -> float:  # the model's output change on the batches, as the model now is
        return sum(float((output(i) - d).pow(2).sum()) for i, d in enumerate(dense))

    originals = {n: model.get_submodule(n).parametrizations.weight.original for g in groups for n in g[1]}
    sums, streams = [], []  # per group: its sums (see below); per block group: its number of streams
    for block, layer_names in groups:
        start = resume.first(block, layer_names)
        keeps = {n: keep_of(saliency.wanda(originals[n], energies[n])) for n in layer_names}
        saved = {n: originals[n].detach().clone() for n in layer_names}

        def prune(which):
            for n in which:
                originals[n].data.masked_fill_(~keeps[n], 0)

        def restore():
            for n in layer_names:
                originals[n].data.copy_(saved[n])

        try:
            with resume.skipping(start):  # the blocks before the group's own run no more
                if block is None or len(layer_names) == 1:  # alone: the model's change with it pruned
                    prune(layer_names)
                    sums.append(change())
                else:
                    n_streams, block_sums = _block_sums(block, layer_names, prune, restore, change, sync)
                    streams.append(n_streams)
                    sums += block_sums
        finally:
            restore()
    sums.append(sum(float(d.pow(2).sum()) for d in dense))
    if sync:
        sums = distributed.sum_over_ranks(sums)
    norm = max(sums[-1], 1e-30)
    gains, at, blocks = {}, 0, iter(streams)
    for block, layer_names in groups:
        if block is None or len(layer_names) == 1:
            n = layer_names[0]
            gains[n] = sums[at] / norm / removed[n] if removed[n] > 0 else 0.0
            at += 1
            continue
        S = next(blocks)
        reach, at = sums[at : at + S], at + S  # R_s
        local = sums[at : at + S * (len(layer_names) + 1)]
        at += S * (len(layer_names) + 1)
        whole = local[-S:]  # r_s
        for i, n in enumerate(layer_names):
            g = sum(reach[k] / norm * local[i * S + k] / whole[k] for k in range(S) if whole[k] > 0)
            gains[n] = g / removed[n] if removed[n] > 0 else 0.0
    return gains


def _block_sums(block: nn.Module, layer_names: list[str], prune, restore, change, sync: bool = False
                ) -> tuple[int, list[float]]:
    """(S, the sums of one block group): R_s for each of the block's S output streams (the
    model's change with stream s all-pruned, the rest dense), then the block's own change r_ls
    of stream s for each layer l pruned alone, then r_s with all of them (see
    :func:`output_gains`). ``prune(names)`` / ``restore()`` edit the layers' weights. The block's
    own forwards run in the first stream's model forwards; the others reuse their outputs (the
    block's inputs are the dense ones every time). With ``sync`` the ranks agree on S (a rank
    without batches sees no output)."""
    local: dict[tuple[int, int], float] = {}  # (layer index or -1 for all, stream) -> block change
    state = {"stream": 0, "busy": False, "call": 0}
    outs: list[tuple] = []  # per call of the block: (dense output, all-pruned output)

    def measure_block(module, args, kwargs):  # on the block's dense inputs (earlier blocks are dense)
        if state["busy"] or state["stream"]:
            return None
        state["busy"] = True
        try:
            ref = module(*args, **kwargs)
            for i, n in enumerate(layer_names + [None]):
                prune([n] if n else layer_names)
                out = module(*args, **kwargs)
                restore()
                for k, (o, r) in enumerate(zip(_floats(out), _floats(ref))):
                    key = (i if n else -1, k)
                    local[key] = local.get(key, 0.0) + float((o.float() - r.float()).pow(2).sum())
            outs.append((ref, out))  # out: all of them pruned
        finally:
            state["busy"] = False
        return None

    def replace_output(module, args, kwargs, out):  # the block's stream s, pruned; the rest dense
        if state["busy"]:
            return None
        ref, pruned = outs[state["call"]]
        state["call"] += 1
        return _mix(ref, pruned, state["stream"])

    hooks = [block.register_forward_pre_hook(measure_block, with_kwargs=True),
             block.register_forward_hook(replace_output, with_kwargs=True)]
    try:
        reach = [change()]
        n_streams = len(_floats(outs[0][0])) if outs else 0
        if sync:
            n_streams = distributed.max_over_ranks(n_streams)
        for s in range(1, n_streams):
            state["stream"], state["call"] = s, 0
            reach.append(change())
    finally:
        for h in hooks:
            h.remove()
    return n_streams, reach[:n_streams] + [local.get((i, k), 0.0) for i in list(range(len(layer_names))) + [-1]
                                           for k in range(n_streams)]


class _Resume:
    """Runs the model from a given transformer block on. :meth:`recording` keeps every block's
    output on each batch of the dense forward (on the CPU: per sample about a block's output
    size times the blocks, 0.5 GB in bfloat16 for FLUX.1-dev at 512x512); inside
    :meth:`skipping` (j) the blocks before the j-th (execution order, :func:`ditprune.models.blocks`)
    return a copy of those outputs instead of running. Exact while the blocks before j are as
    in the dense forward, which the caller ensures (only the measured layers change, all in
    block j or later). Off (every block runs) with ``batches=None``, or unless each block ran
    exactly once per batch."""

    def __init__(self, model: nn.Module, batches: int | None):
        found = models.blocks(model) if batches is not None else []
        self.names, self.modules = [n for n, _ in found], [m for _, m in found]
        self.saved: list[list] | None = [[] for _ in range(batches or 0)]
        self.batch = 0

    @contextlib.contextmanager
    def recording(self):
        def keep(j):  # (j, the output on the CPU, the device it goes back to)
            return lambda module, args, out: self.saved[self.batch].append((j, _to(out, "cpu"), _device(out)))

        hooks = [m.register_forward_hook(keep(j)) for j, m in enumerate(self.modules)]
        try:
            yield
        finally:
            for h in hooks:
                h.remove()
        order = list(range(len(self.modules)))
        if not self.modules or any([r[0] for r in runs] != order for runs in self.saved):
            self.saved = None  # a block ran twice, or not at all, or out of order: run them all
        else:
            self.saved = [[r[1:] for r in runs] for runs in self.saved]

    def first(self, block: nn.Module | None, layer_names: list[str]) -> int:
        """The execution index of the block holding ``block`` or the first of ``layer_names``
        (0, nothing skipped, for a layer outside every block)."""
        if self.saved is None:
            return 0
        if block is not None:
            return self.modules.index(block)
        return next((j for j, b in enumerate(self.names) if layer_names[0].startswith(b + ".")), 0)

    @contextlib.contextmanager
    def skipping(self, start: int):
        skipped = self.modules[:start] if self.saved is not None else []
        with models.forwards_replaced(skipped, lambda j, m: lambda *args, **kwargs: _to(*self.saved[self.batch][j])):
            yield


def _to(out, device):
    """A copy of a block's output (a tensor, or a tuple or list of them and other values) on ``device``."""
    if torch.is_tensor(out):
        return out.detach().to(device, copy=True)
    if isinstance(out, (tuple, list)):
        return type(out)(_to(o, device) for o in out)
    return out


def _device(out) -> torch.device:
    """The device of the first tensor of a block's output (the CPU if it has none)."""
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return next((o.device for o in outs if torch.is_tensor(o)), torch.device("cpu"))
