"""The callback under Lightning's ``ddp`` strategy, 2 real CPU processes on gloo, against one
process pruning on the union of the two shards: the same masks (up to float ties) and the same
removed output energy, for ``dit`` (its adaLN layers in the few-token regime, where tokens are
held out) and ``dit`` with ``reconstruct=True``. (``wanda`` on 2 processes: the CLI test in
``test_pipeline_eval.py``.) Two rounds of the search keep the run short; equality is the point."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ditprune
from ditprune.reference import load
from ditprune.stats import observe

WORKER = Path(__file__).parent / "ddp_worker.py"


def _run(tmp_path, method, options):
    done = subprocess.run([sys.executable, str(WORKER), str(tmp_path), method, json.dumps(options)], capture_output=True,
                          text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "find_unused_parameters" not in done.stderr
    return [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1)]


def _group(d, prefix):
    return {k[len(prefix):]: v for k, v in d.items() if k.startswith(prefix)}


def _batches(d):
    n = len({k.split("/")[0] for k in d if k.startswith("batch")})
    return [_group(d, f"batch{i}/") for i in range(n)]


def removed_energy(dense, pruned, batches):
    """sum over layers of tr(dW H dW^T), dW = dense - pruned weights (masked, and updated where the
    method updates), H from the dense model's inputs on ``batches``: one yardstick for two runs."""
    layers = {k[: -len(".weight")]: dense.get_submodule(k[: -len(".weight")]) for k in pruned}
    with observe(layers, need_gram=True, share=False) as stats, torch.no_grad():
        for b in batches:
            dense(**b)
    total = 0.0
    for n, layer in layers.items():
        d = (layer.weight.detach() - pruned[f"{n}.weight"]).double()
        total += float(((d @ stats[n].gram.double()) * d).sum())
    return total


@pytest.mark.parametrize("options", [{"refine": 2}, {"refine": 2, "reconstruct": True}], ids=["dit", "dit+obs"])
def test_two_processes_prune_as_one_process_on_the_union(tmp_path, options):
    method = "dit"
    r0, r1 = _run(tmp_path, method, options)
    masks = _group(r0, "mask/")
    assert len(masks) == 28
    for k, m in masks.items():
        assert m.float().mean().item() == 0.5, k  # exact sparsity
    w0 = _group(r0, "weight/")
    for k, m in masks.items():  # the pruned zeros survived training
        assert (w0[k][m == 0] == 0).all(), k
    b0, b1 = _batches(r0), _batches(r1)
    assert len(b0) == len(b1) == 2 and not torch.equal(b0[0]["hidden_states"], b1[0]["hidden_states"])  # own shards
    # one process on the union of both shards
    dense = load("dit")
    model = copy.deepcopy(dense)
    # rank 1's shard first, batches of 14 (not a multiple of 4): any split of the tokens that follows
    # their arrival order would differ from the ranks'
    report = ditprune.prune(model, b1 + b0, method=method, sparsity=0.5, **options)
    assert any("held_out_tokens" in r.info for r in report.layers)  # the few-token regime was exercised
    weights = {f"{r.name}.weight": model.get_parameter(f"{r.name}.weight").detach() for r in report.layers}
    one = {k: w != 0 for k, w in weights.items()}
    assert one.keys() == masks.keys()
    differ = sum(int((one[k] != masks[k].bool()).sum()) for k in masks)
    total = sum(m.numel() for m in masks.values())
    assert differ <= 1e-3 * total, f"{differ} of {total} mask entries differ"
    # the weights themselves may differ where H is near-singular (see test_pipeline_eval); what
    # they are for, the output energy they remove, may not
    e_one, e_two = removed_energy(dense, weights, b0 + b1), removed_energy(dense, _group(r0, "pruned/"), b0 + b1)
    assert e_two == pytest.approx(e_one, rel=1e-3)


@pytest.mark.parametrize("setting", [{"allocation_range": 0.2}, {"pattern": "2:4", "max_dense": 0.2},
                                     {"allocation_options": {"gain_batches": 2, "batches": 2}},
                                     {"allocation_options": {"gain_batches": 1, "gains": "blocks"}},
                                     {"allocation_options": {"gain_batches": 2, "gains": "probes", "probes": 4}}],
                         ids=["sparsity", "2:4 layers kept dense", "pass on 2 of 4 batches",
                              "block gains on 1 batch: rank 1 measures none", "gains by probes"])
def test_every_rank_allocates_alike_and_as_one_process_on_the_union(tmp_path, setting):
    """Each rank computes the allocation itself from its shard (statistics and measured gains
    summed over the ranks) before rank 0's masks are broadcast: the two must agree, and agree
    with one process on the union. ``gain_batches=2`` counts over the ranks: the gains are
    measured on the 2 of the 4 batches that ``pick_batches`` picks from all ranks' batches by
    timestep, each rank those it holds; with each rank measuring 2 of its own the union run
    would differ. With a pattern the allocation is which layers stay dense (sparsity 0). With
    ``batches=2`` the pass reads those 2 batches too. With ``gain_batches=1`` one rank measures
    the batch picked and the other none (it adds zeros, and learns the blocks' stream counts
    from the other). With probes each batch draws its probes from a seed of its content, so a
    rank draws for a batch what one process draws for it."""
    options = {"allocation": "auto", "allocation_options": {"gain_batches": 2}, **setting}
    r0, r1 = _run(tmp_path, "wanda", options)
    a0, a1 = _group(r0, "alloc/"), _group(r1, "alloc/")
    assert len(a0) == 28 and a0.keys() == a1.keys()
    assert all(torch.equal(a0[k], a1[k]) for k in a0)
    assert len({round(float(v), 6) for v in a0.values()}) > 1  # really allocated, not uniform
    b0, b1 = _batches(r0), _batches(r1)
    report = ditprune.prune(load("dit"), [b0[0], b1[0], b0[1], b1[1]], method="wanda", sparsity=0.5, **options)
    one = {r.name: r for r in report.layers}
    assert one.keys() == a0.keys()
    for k, r in one.items():  # the same allocation, up to one zero per row of a layer
        assert abs(r.target - float(a0[k])) <= 1 / r.shape[1] + 1e-9, (k, r.target, float(a0[k]))
