"""Output gains of every layer at once, from random probes of the model's output
(``allocation_options={"gains": "probes"}``): one forward and a few backward passes per batch
instead of one forward per layer (:func:`ditprune.gains.output_gains`).

A layer l pruned with Wanda's mask changes its output by ``d_l = x_l (W_l * ~M_l)^T`` (the
removed weights' part) and, to first order, the model's output by ``J_l d_l``. For a random sign
vector v on the output, ``E_v (v . J_l d_l)^2 = ||J_l d_l||^2`` (Hutchinson), and
``v . J_l d_l = (J_l^T v) . d_l``: one backward pass from v gives ``J_l^T v`` at every layer's
output, so one probe measures every layer. The gain is the mean over probes and batches of
``((J_l^T v) . d_l)^2``, over the dense output's energy and the fraction ``removed[l]`` of the
layer's output energy that the mask removes (what ``output_gains`` divides by). Assumed: the
model is linear in the pruning error around the point where the Jacobian is taken. Its noise:
one probe's relative standard deviation is about sqrt(2), so ``probes`` x batches of them give
sqrt(2 / (probes * batches)) (0.18 with the defaults 16 x 4).

Memory: every transformer block (:func:`ditprune.models.blocks`) runs under activation
checkpointing (``torch.utils.checkpoint``, non-reentrant): the forward keeps each block's
inputs, and each backward recomputes one block at a time, whose layers' ``d_l`` are computed
from their inputs in that recomputation and dropped with it. So a probe costs about a forward
(the recomputation and the ``d_l``) plus a backward of activation gradients only (no parameter
takes a gradient), and the memory beyond the weights is the blocks' inputs, one block's
activations and the ``d_l`` of the layers outside the blocks, not the whole model's graph."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from torch import nn

from . import distributed, models, saliency
from .masks import pack, unpack

__all__ = ["probed_gains"]


def probed_gains(model: nn.Module, names: list[str], energies: dict, removed: dict, keep_of, batches: list[dict],
                 seeds: list[int], probes: int = 16, sync: bool = False) -> dict[str, float]:
    """Layer name -> its output gain (see the module docstring) on ``batches``, one probe stream
    per batch seeded by ``seeds`` (from the batch's content, so N processes draw what one process
    draws on their union; with ``sync`` the sums are added over the ranks). ``keep_of(scores)``
    is the mask measured (True: kept) from Wanda's scores with ``energies``. No weight changes;
    gradients flow to no parameter."""
    sums = [0.0] * (len(names) + 1)  # per layer: mean over probes of ((J^T v) . d)^2; last: the output's energy
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    bits: dict[int, torch.Tensor] = {}  # layer -> its mask, packed (kept over the batches)
    try:
        for batch, seed in zip(batches, seeds):
            for i, s in enumerate(_Probe(model, names, energies, keep_of, bits).run(batch, seed, probes)):
                sums[i] += s
    finally:
        for p in frozen:
            p.requires_grad_(True)
    if sync:
        sums = distributed.sum_over_ranks(sums)
    norm = max(sums[-1], 1e-30)
    return {n: sums[i] / norm / removed[n] if removed[n] > 0 else 0.0 for i, n in enumerate(names)}


class _Probe:
    """One batch's probes: hooks on the measured layers, checkpointed blocks."""

    def __init__(self, model, names, energies, keep_of, bits):
        self.model, self.names, self.energies, self.keep_of, self.bits = model, names, energies, keep_of, bits
        self.layers = [model.get_submodule(n) for n in names]
        self.blocks = [m for _, m in models.blocks(model)]
        self.lifts: dict[torch.device, torch.Tensor] = {}  # per device a zero leaf: puts every layer's output on the graph
        self.dots = torch.zeros(0)  # (layer, probe) -> (J^T v) . d over the layer's calls
        self.probe = 0
        self.backward = False  # True while the probes run: a block's forward then is its recomputation
        self.current: int | None = None  # the block whose forward runs now (None: outside the blocks)
        self.calls: dict[tuple, int] = {}  # (block or None, layer) -> calls so far (a block's count afresh each run)
        self.kept: dict[tuple, torch.Tensor] = {}  # (block or None, layer, call) -> its d

    def delta(self, i, module, x) -> torch.Tensor:
        """The layer's output change with its mask, ``x (W * ~M)^T`` (M packed once per layer, one bit per weight)."""
        w = module.weight.detach()
        if i not in self.bits:
            self.bits[i] = pack(self.keep_of(saliency.wanda(w, self.energies[self.names[i]])))
        return F.linear(x.detach(), w.masked_fill(unpack(self.bits[i], w.shape), 0))

    def hook(self, i):
        def run(module, args, out):
            # a call is known by where it runs and its count there: a layer may run in its block
            # and outside every block too (DiT's final layer calls the first block's embedder)
            where = self.current
            c = self.calls[where, i] = self.calls.get((where, i), -1) + 1
            key = (where, i, c)
            if self.backward or where is None:  # a block's layers: in its recomputation, one block at a time
                self.kept[key] = self.delta(i, module, args[0])
            if out.device not in self.lifts:
                self.lifts[out.device] = torch.zeros((), device=out.device, requires_grad=True)
            y = out + self.lifts[out.device].to(out.dtype)  # the same operations in a recomputation (checkpoint checks them)
            if not self.backward:
                y.register_hook(lambda g: self.dot(i, key, g))
            return y
        return run

    def dot(self, i, key, g):
        d = self.kept[key] if key[0] is None else self.kept.pop(key)
        self.dots[i, self.probe] += float((g.float() * d.float()).sum())

    def checkpointed(self, j, block):
        forward = block.forward

        def recompute(*args, **kwargs):
            if self.backward:  # this block's calls are counted afresh
                for key in [k for k in self.calls if k[0] == j]:
                    del self.calls[key]
            outer, self.current = self.current, j
            try:
                return forward(*args, **kwargs)
            finally:
                self.current = outer
        return lambda *args, **kwargs: checkpoint(recompute, *args, use_reentrant=False, **kwargs)

    def run(self, batch, seed, probes) -> list[float]:
        self.dots = torch.zeros(len(self.layers), probes, dtype=torch.float64)
        handles = [m.register_forward_hook(self.hook(i)) for i, m in enumerate(self.layers)]
        try:
            with models.forwards_replaced(self.blocks, self.checkpointed), torch.enable_grad():
                out = models.prediction(self.model(**batch))
                gen = torch.Generator().manual_seed(seed)
                self.backward = True
                for k in range(probes if self.lifts else 0):  # no measured layer ran: nothing to probe
                    self.probe = k
                    v = (torch.randint(0, 2, out.shape, generator=gen) * 2 - 1).to(out.device, out.dtype)
                    torch.autograd.backward(out, v, retain_graph=k < probes - 1, inputs=list(self.lifts.values()))
        finally:
            for h in handles:
                h.remove()
        return self.dots.pow(2).mean(1).tolist() + [float(out.detach().float().pow(2).sum())]
