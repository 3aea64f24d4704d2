"""What pruning holds in memory, measured on the code path (``ditprune.memory.LiveBytes``)."""

import pytest
import torch

import ditprune
from ditprune.masks import PackedSparsity, pack, unpack
from ditprune.memory import LiveBytes, region
from ditprune.models.tiny import tiny_batches, tiny_model
from ditprune.pruning import PrunePlan


def _weight_bytes(model):
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters())


def test_pack_is_numpys_little_endian_packbits_and_round_trips():
    np = pytest.importorskip("numpy")
    g = torch.Generator().manual_seed(0)
    m = torch.rand(7, 13, generator=g) > 0.4  # 91 entries: the last byte is partial
    bits = pack(m)
    assert torch.equal(bits, torch.from_numpy(np.packbits(m.reshape(-1).numpy(), bitorder="little")))
    assert torch.equal(unpack(bits, m.shape), m)


def test_packed_mask_reads_writes_and_keeps_its_buffer():
    p = PackedSparsity((4, 8))
    buf = p.bits
    assert p.mask.all() and buf.numel() == 4
    keep = torch.eye(4, 8, dtype=torch.bool)
    p.mask = keep
    assert p.bits is buf and torch.equal(p.mask, keep)  # written in place, as torch.ao asks
    x = torch.randn(4, 8)
    assert torch.equal(p(x), x * keep)
    with pytest.raises(ValueError):
        p.mask = torch.ones(8, 4, dtype=torch.bool)


def test_masks_after_attach_cost_at_most_an_eighth_of_bf16_weights():
    model = tiny_model("flux").to(torch.bfloat16)
    plan = PrunePlan(model, "wanda", 0.5)
    plan.attach()
    groups = plan.sparsifier.groups
    weights = sum(g["module"].parametrizations.weight.original.nbytes for g in groups)
    held = sum(b.nbytes for g in groups for b in g["module"].parametrizations.weight[0].buffers())
    assert held <= weights / 8, (held, weights)
    assert held == sum((g["module"].weight.numel() + 7) // 8 for g in groups)  # one bit per weight, exactly
    plan.restore()


@pytest.mark.parametrize("options", [{"method": "wanda"},
                                     pytest.param({"method": "dit", "reconstruct": True}, marks=pytest.mark.slow)])
def test_block_by_block_bf16_prune_holds_masks_of_at_most_an_eighth_of_the_weights(options):
    model = tiny_model("flux").to(torch.bfloat16)
    batches = [{k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in b.items()}
               for b in tiny_batches(model, n=2)]
    weights = _weight_bytes(model)
    with LiveBytes() as mem:
        mem.hold(model.parameters())
        report = ditprune.prune(model, batches, sparsity=0.5, backup=False, **options)
    assert report.sparsity > 0.45
    assert 0 < mem.peak_by_kind["masks"] <= weights / 8
    assert mem.peak_by_kind["backup"] == 0  # backup=False keeps no copy
    assert mem.peak >= weights  # the weights are counted


def test_backup_is_on_the_cpu_and_counted():
    model = tiny_model("flux").to(torch.bfloat16)
    batches = [{k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in b.items()}
               for b in tiny_batches(model, n=2)]
    with LiveBytes() as mem:
        mem.hold(model.parameters())
        report = ditprune.prune(model, batches, method="sparsegpt", sparsity=0.5, squash=False, backup=True)
    weights = sum(g["module"].parametrizations.weight.original.nbytes for g in report.sparsifier.groups)
    assert mem.by_kind["backup"] == weights  # a CPU copy of every updated weight, held until squash
    assert all(st["dense_backup"].device.type == "cpu" for st in report.sparsifier.state.values())
    report.sparsifier.squash_mask()
    assert mem.by_kind["backup"] == 0


def test_a_failure_with_backup_false_keeps_updated_layers_pruned_and_says_so():
    model = tiny_model("flux")
    batches = tiny_batches(model, n=2)
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    last = len(model.single_transformer_blocks) - 1

    def boom(module, args):  # the last block's first call: every earlier block is pruned by then
        raise RuntimeError("boom")

    handle = model.single_transformer_blocks[last].register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="boom") as info:
        ditprune.prune(model, batches, method="sparsegpt", sparsity=0.5, backup=False)
    handle.remove()
    assert any("backup=False" in note for note in getattr(info.value, "__notes__", []))
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, dense[n])]
    assert changed and not any(n.startswith(f"single_transformer_blocks.{last}.") for n in changed)
    for n in changed:  # pruned and updated: half zeros, no parametrization left
        assert (model.get_parameter(n) == 0).float().mean() >= 0.5
    assert not any("parametrizations" in n for n, _ in model.named_parameters())


def test_live_bytes_counts_by_kind_and_frees():
    with LiveBytes() as mem:
        a = torch.ones(1000)
        with region("statistics"):
            b = torch.zeros(500)
        del a
    assert mem.peak == 6000 and mem.peak_by_kind["statistics"] == 2000
    assert mem.live == 2000 and b.numel() == 500


@pytest.mark.slow
def test_the_1gb_bar_a_prune_adds_under_a_third_of_the_weights_to_the_resident_set():
    """A bf16 FLUX-shaped transformer of about 1 GB (width 1536, 4 double + 4 single blocks),
    pruned block by block with backup=False in a fresh process (``benchmarks/memory_bar.py``
    prints the same for every method): the peak resident set it adds stays under 0.35x of the
    weights' bytes (it was 2.19x with a full-size mask per weight)."""
    import json
    import subprocess
    import sys

    code = ("import json; from ditprune.membench import run_memory; "
            "print(json.dumps(run_memory(method='wanda', backup=False)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    r = json.loads(done.stdout.strip().splitlines()[-1])
    assert 0.9e9 < r["weights_bytes"] < 1.1e9
    assert r["rss_added_bytes"] is not None and r["rss_added_bytes"] < 0.35 * r["weights_bytes"], r
    assert r["peak_by_kind"]["masks"] <= r["weights_bytes"] / 16 + 4096
