"""``allocation_options={"gains": "probes"}``: every layer's output gain from random probes of the
model's output (:mod:`ditprune.probes`), recomputed here without autograd."""

import pytest
import torch
from torch import nn

from ditprune import models, saliency
from ditprune.granularity import row_mask
from ditprune.models.tiny import tiny_batches, tiny_model
from ditprune.probes import probed_gains


def _setup(family):
    model = tiny_model(family).double().eval()
    batches = tiny_batches(model, n=2)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    names = names[1::3]  # some inside the blocks, some outside (embedders, the final layer)
    rng = torch.Generator().manual_seed(0)
    energies = {n: torch.rand(model.get_submodule(n).in_features, generator=rng, dtype=torch.float64) + 0.1
                for n in names}
    removed = {n: 0.1 + 0.05 * i for i, n in enumerate(names)}
    return model, batches, names, energies, removed


def _output(model, batch):
    out = model(**batch)
    return getattr(out, "sample", out[0] if isinstance(out, tuple) else out)


@pytest.mark.parametrize("family, eps, rel", [("dit", 1e-4, 1e-5), ("flux", 1e-3, 5e-3)])
def test_probed_gains_are_the_mean_squared_probe_along_each_layers_error(family, eps, rel):
    """The reference formula recomputed independently: for each layer, J_l d_l (the output's
    derivative along the layer's output change d_l = x (W * ~M)^T) by central differences of the
    whole model in float64, then each probe v_k drawn as the module draws it (the batch's seed,
    signs in order), and the gain mean_k (v_k . J_l d_l)^2 summed over the batches, over the
    dense output's energy and ``removed``. Layers inside the (checkpointed) blocks and outside
    them both; on DiT the first block's embedder also runs outside every block (the final
    layer's conditioning). FLUX's rotary embedding is float32 even in a float64 model
    (diffusers' ``FluxPosEmbed``: ``ids.float()``), which bounds how well differences agree there."""
    model, batches, names, energies, removed = _setup(family)
    inside = {n for b, _ in models.blocks(model) for n in names if n.startswith(b + ".")}
    assert inside and set(names) - inside
    keep_of = lambda sc: row_mask(sc, 0.5)  # noqa: E731
    seeds, probes = [11, 12], 5
    gains = probed_gains(model, names, energies, removed, keep_of, batches, seeds, probes)

    num, norm = dict.fromkeys(names, 0.0), 0.0
    with torch.no_grad():
        for batch, seed in zip(batches, seeds):
            base = _output(model, batch)
            norm += float(base.pow(2).sum())
            gen = torch.Generator().manual_seed(seed)
            vs = [(torch.randint(0, 2, base.shape, generator=gen) * 2 - 1).double() for _ in range(probes)]
            for n in names:
                layer = model.get_submodule(n)
                w = layer.weight
                cut = w * ~keep_of(saliency.wanda(w, energies[n]))
                outs = []
                for e in (eps, -eps):
                    h = layer.register_forward_hook(lambda m, a, o, e=e: o + e * nn.functional.linear(a[0], cut))
                    outs.append(_output(model, batch))
                    h.remove()
                jd = (outs[0] - outs[1]) / (2 * eps)
                num[n] += sum(float((v * jd).sum()) ** 2 for v in vs) / probes
    for n in names:
        assert gains[n] == pytest.approx(num[n] / norm / removed[n], rel=rel), n
    assert len({round(g, 9) for g in gains.values()}) == len(names)


def test_checkpointing_changes_nothing_and_no_weight_moves(monkeypatch):
    """The blocks run checkpointed (their layers' d_l computed in the recomputation); with the
    blocks unknown (no checkpointing, the whole graph kept) the gains are the same to rounding.
    No weight changes, no parameter keeps a gradient or loses ``requires_grad``, no block keeps
    the wrapped forward (one with an instance forward of its own gets that back)."""
    model, batches, names, energies, removed = _setup("flux")
    first = models.blocks(model)[0][1]
    wrapped = first.forward
    first.forward = lambda *a, **k: wrapped(*a, **k)  # an instance-level forward, as an offload hook installs
    mine = first.forward
    before = {k: v.clone() for k, v in model.state_dict().items()}
    keep_of = lambda sc: row_mask(sc, 0.7)  # noqa: E731
    ckpt = probed_gains(model, names, energies, removed, keep_of, batches, [1, 2], 3)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert first.forward is mine and all("forward" not in b.__dict__ for _, b in models.blocks(model)[1:])
    import ditprune.probes as P

    monkeypatch.setattr(P.models, "blocks", lambda m: [])
    whole = probed_gains(model, names, energies, removed, keep_of, batches, [1, 2], 3)
    assert whole == pytest.approx(ckpt, rel=1e-9)
    assert whole != probed_gains(model, names, energies, removed, keep_of, batches, [1, 3], 3)  # the seeds count


def test_auto_with_probe_gains_allocates_and_rejects_bad_probe_counts():
    """``gains: probes`` steers ``auto`` (an allocation unlike uniform, the budget kept); a probe
    count that is not a positive integer is one clear error before any work."""
    import ditprune
    from ditprune.errors import InputError

    model = tiny_model("dit")
    batches = tiny_batches(model, n=4)
    report = ditprune.prune(model, batches, method="wanda", sparsity=0.6, allocation="auto",
                            allocation_options={"gains": "probes", "probes": 4}, progress=False)
    targets = [r.target for r in report.layers]
    assert len({round(t, 6) for t in targets}) > 1
    sizes = [r.shape[0] * r.shape[1] for r in report.layers]
    zeros = sum(r.sparsity * n for r, n in zip(report.layers, sizes))
    assert abs(zeros - 0.6 * sum(sizes)) <= sum(r.shape[0] for r in report.layers)
    for bad in (0, -1, 2.5, True, "16"):
        with pytest.raises(InputError, match="probes must be a positive integer"):
            ditprune.prune(tiny_model("dit"), batches, method="wanda", sparsity=0.6, allocation="auto",
                           allocation_options={"gains": "probes", "probes": bad}, progress=False)
