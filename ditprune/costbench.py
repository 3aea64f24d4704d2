"""``ditprune bench --cost``: what pruning costs at FLUX.1-dev's real shapes (random weights;
time and memory do not depend on the values).

1. *Single Linears* at every FLUX.1-dev shape, each method's own ``compute_mask`` on the same
   statistics. Statistics come from a synthetic correlated covariance (low rank plus a diagonal,
   heavy-tailed channel scales): image-stream layers see millions of tokens in a real run, which
   no CPU can replay, and a mask's cost depends on H, not on how many tokens made it. The adaLN
   shape is the exception: it gets real sampled tokens, as many as ``configs/flux_dev.yaml``
   gives it (64 prompts x 28 steps = 1792, fewer than its 3072 inputs), so it runs the few-token
   path it runs in practice. Each method is timed ``repeats`` times, interleaved, best kept.
2. *One full-width double block and one single block* in bf16, per method, on the code path of
   a ``configs/flux_dev.yaml`` run (:func:`block_costs`): masks attached, real calibration calls
   observed (timed per sample: the block's forward and the statistics), then every layer given
   the statistics regime the real run gives it (adaLN: 64 x 28 = 1792 sampled tokens, the
   few-token path; the others: plenty) and the masks computed (timed). Memory is measured while
   it runs (:class:`ditprune.memory.LiveBytes` on the CPU, the allocator on a GPU), by kind; on
   the CPU the block times therefore include the byte counter's bookkeeping (an upper bound).
3. An *extrapolation* to the whole transformer (19 double + 38 single blocks: mask seconds and
   calibration seconds per sample, times the blocks and the real run's samples; the Gram
   accumulation also in FLOPs) and a *memory account* of a ``configs/flux_dev.yaml`` run composed
   from the measured block runs (:func:`memory_account`; ``tests/test_costbench.py`` checks that a
   real whole-model prune never holds more than the account says).
4. What ``allocation="auto"`` adds to those prunes (:mod:`ditprune.alloccost`): its pass, its
   curves timed on every Linear of the two blocks, its gains' model forwards.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Callable

import torch

from . import alloccost
from .fluxshapes import FLUX_DEV, REAL_RUN, block_batches, flux_blocks, is_adaln, synthetic_stats

__all__ = ["SHAPES", "FLUX_DEV", "synthetic_stats", "layer_costs", "block_costs", "memory_account", "run_cost"]

# (name, out_features, in_features, calibration tokens: None = plenty)
SHAPES = [
    ("attn to_q/k/v, to_out", 3072, 3072, None),
    ("ff.net.0.proj", 12288, 3072, None),
    ("ff.net.2", 3072, 12288, None),
    ("norm1.linear (adaLN)", 18432, 3072, 64 * 28),
    ("single proj_out", 3072, 15360, None),
]
METHODS = [  # (label, method, options, pattern)
    ("wanda", "wanda", {}, None),
    ("sparsegpt", "sparsegpt", {}, None),
    ("dit", "dit", {}, None),
    ("sparsegpt 2:4", "sparsegpt", {}, "2:4"),
    ("dit 2:4", "dit", {}, "2:4"),
    ("dit reconstruct", "dit", {"reconstruct": True}, None),
]


# -- measuring ----------------------------------------------------------------------------------
def measure(fn: Callable[[], object], device: torch.device, memory: bool = True) -> tuple[float, int]:
    """(seconds, peak bytes of the tensors ``fn`` created and held at once; 0 without ``memory``).
    The seconds are a plain run's: on a CPU the bytes are counted on the code path
    (:class:`ditprune.memory.LiveBytes`, a dispatch mode whose per-operation bookkeeping would
    slow code of many small operations, such as the 2:4 search, several-fold) in a second run;
    on a GPU the allocator's own peak comes from the timed run."""
    from .memory import measuring

    device = torch.device(device)
    peak = 0
    if memory and device.type != "cuda":
        with measuring(device) as mem:
            fn()
        peak = mem.peak
    start = time.perf_counter()
    with measuring(device) if device.type == "cuda" else contextlib.nullcontext() as mem:
        fn()
    seconds = time.perf_counter() - start
    return seconds, mem.cuda_peak if device.type == "cuda" else peak


# -- 1. single layers ---------------------------------------------------------------------------
# seconds: a method slower than this on a shape is timed once, to bound the bench's time (`dit`
# reconstruct 2:4 takes minutes at the wide shapes); every other method gets every repeat
SLOW = 60.0


def layer_costs(shapes=SHAPES, methods=METHODS, repeats: int = 2, device="cpu", progress: bool = True) -> list[dict]:
    from tqdm import tqdm

    from .pruning import make_sparsifier

    device = torch.device(device)
    warm = synthetic_stats(64, None, device=device)  # first calls pay one-time costs (imports, thread pools)
    for _, method, options, pattern in methods:
        sp = make_sparsifier(method, 0.5, pattern, **options)
        sp.compute_mask(torch.randn(96, 64, device=device), warm, **sp.defaults)
    rows = []
    jobs = [(shape, m) for shape in shapes for m in methods]
    bar = tqdm(total=len(jobs) * repeats, desc="cost: layers", disable=not progress)
    for name, out_f, in_f, tokens in shapes:
        stats = synthetic_stats(in_f, tokens, device=device)
        weight = (torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(1)) / in_f**0.5).to(device)
        best: dict[str, tuple[float, int | None]] = {}
        for rep in range(repeats):  # interleaved, so that a busy machine slows every method alike
            for label, method, options, pattern in methods:
                if rep and best[label][0] > SLOW:  # timed once: see SLOW
                    bar.update()
                    continue
                sp = make_sparsifier(method, 0.5, pattern, **options)
                seconds, peak = measure(lambda: sp.compute_mask(weight, stats, **sp.defaults), device, memory=not rep)
                old = best.get(label)
                best[label] = (min(seconds, old[0]) if old else seconds, max(peak, old[1] if old else 0))
                bar.update()
        for label, (seconds, peak) in best.items():
            rows.append({"shape": name, "out": out_f, "in": in_f, "tokens": tokens or "1e6 (covariance)",
                         "method": label, "seconds": seconds, "peak_mb": peak / 2**20,
                         "x_wanda": seconds / best["wanda"][0], "x_sparsegpt": seconds / best["sparsegpt"][0]})
        del stats, weight
    bar.close()
    return rows


# -- 2. shape-true blocks -----------------------------------------------------------------------
# dit with reconstruct=True in the block runs: its memory (every polish iteration reuses the same
# tensors, so one iteration reaches the peak), not its time (see the single-layer table).
MEMORY_ONLY = ("dit reconstruct (memory; polish=1)", "dit", {"reconstruct": True, "polish": 1}, None)


def _real_regime(plan, adaln_tokens: int, device) -> None:
    """Swap each layer's statistics for ones with the token count a real run gives it: adaLN
    Linears see one token per sample and step (``adaln_tokens``, sampled: the few-token path with
    its held-out tokens); every other layer sees millions (a synthetic covariance: the plenty
    path). Layers that shared statistics keep sharing them."""
    from . import memory

    sp = plan.sparsifier
    swapped: dict[int, object] = {}
    for g in sp.groups:
        st = sp.state[g["tensor_fqn"]].get("stats")
        if st is None:
            continue
        if id(st) not in swapped:
            d = st.sq_sum.numel()
            tokens = adaln_tokens if is_adaln(g["module_fqn"]) else None
            with memory.region("statistics"):  # what the layer holds in a real run, not the forward's
                swapped[id(st)] = synthetic_stats(d, tokens, seed=d, device=device, need_gram=st.gram_sum is not None)
        sp.state[g["tensor_fqn"]]["stats"] = swapped[id(st)]


def _tree_bytes(obj) -> int:
    from torch.utils._pytree import tree_flatten

    return sum(t.numel() * t.element_size() for t in tree_flatten(obj)[0] if isinstance(t, torch.Tensor))


def block_costs(methods=METHODS[:3], images: int = 1, image_tokens: int = 1024, calls: int = 2, device="cpu",
                progress: bool = True, dims: dict | None = None, dtype=torch.bfloat16, real: dict | None = None) -> list[dict]:
    """One shape-true double and single block per method, in ``dtype``, on the code path a
    ``configs/flux_dev.yaml`` run takes: masks attached, ``calls`` real calibration calls of
    ``images`` samples observed (timed: forward + statistics, per sample), then each layer's
    statistics swapped for the real run's regime (see :func:`_real_regime`) and the masks
    computed (timed). Memory: live tensor bytes by kind (:class:`ditprune.memory.LiveBytes`) and,
    on a GPU, the allocator's peak."""
    from tqdm import tqdm

    from .memory import measuring
    from .pruning import PrunePlan

    device = torch.device(device)
    real = {**REAL_RUN, **(real or {})}
    batches = block_batches(images, image_tokens, calls, device, dtype, dims=dims)
    call_bytes = _tree_bytes(batches[0])
    f = {**FLUX_DEV, **(dims or {})}
    rows = []
    for kind in tqdm(("double", "single"), desc="cost: blocks", disable=not progress):
        for label, method, options, pattern in methods:
            block = flux_blocks(device, dtype, dims)[0 if kind == "double" else 1]
            weights = sum(p.numel() * p.element_size() for p in block.parameters())
            targets = sum(m.weight.numel() for m in block.modules() if isinstance(m, torch.nn.Linear))
            plan = PrunePlan(block, method, 0.5, pattern, [""], ignore=[], block_sequential=False, backup=False,
                             **options)
            with measuring(device, block.parameters()) as mem, torch.no_grad():
                plan.attach()
                start = time.perf_counter()
                plan._observe(None, lambda: [block(**b) for b in batches], sync=False)
                observe = time.perf_counter() - start
                _real_regime(plan, real["prompts"] * real["steps"], device)
                start = time.perf_counter()
                plan._step(None, sync=False)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                masks = time.perf_counter() - start
                plan.squash()
            kinds = {k: v / 2**20 for k, v in mem.peak_by_kind.items()}
            rows.append({"block": kind, "method": label, "layers": len(plan.sparsifier.groups),
                         "weights_mb": weights / 2**20, "target_params": targets,
                         "observe_seconds_per_sample": observe / (calls * images), "mask_seconds": masks,
                         "peak_mb": mem.peak / 2**20, "extra_mb": (mem.peak - weights) / 2**20,
                         "peak_by_kind_mb": kinds, "max_by_kind_mb": {k: v / 2**20 for k, v in mem.max_by_kind.items()},
                         "cuda_peak_mb": mem.cuda_peak / 2**20 if mem.cuda_peak is not None else None,
                         "call_input_mb": call_bytes / images / 2**20,  # per sample
                         "calibration_tokens": calls * images * (image_tokens + f["text_tokens"])})
            del block, plan
    return rows


def gram_flops(real: dict | None = None, dims: dict | None = None) -> float:
    """FLOPs of accumulating the Gram matrices of one whole FLUX.1-dev calibration (2 x tokens x
    in^2 per distinct input, shared inputs counted once): what a GPU spends beside the forward."""
    r, f = {**REAL_RUN, **(real or {})}, {**FLUX_DEV, **(dims or {})}
    d, samples = f["dim"], r["prompts"] * r["steps"]
    img, txt = samples * r["image_tokens"], samples * f["text_tokens"]
    double = (2 * 2 * d**2 * (img + txt)  # q/k/v input, to_out input (image stream) ... and text stream
              + 2 * d**2 * (img + txt)  # ff.net.0 inputs (both streams)
              + 2 * (4 * d) ** 2 * (img + txt)  # ff.net.2 inputs (both streams)
              + 2 * d**2 * samples)  # adaLN (temb, shared by the two norms)
    single = (2 * d**2 * (img + txt) + 2 * (5 * d) ** 2 * (img + txt) + 2 * d**2 * samples)
    return f["double"] * double + f["single"] * single


def extrapolate(block_rows: list[dict], real: dict | None = None) -> list[dict]:
    """The whole transformer (19 double + 38 single blocks): mask seconds measured per block x
    the block count; calibration seconds = the measured forward + statistics per sample x the
    real run's samples (64 prompts x 28 steps) x the blocks; the Gram accumulation in FLOPs."""
    f, r = FLUX_DEV, {**REAL_RUN, **(real or {})}
    samples = r["prompts"] * r["steps"]
    out = []
    for method in dict.fromkeys(row["method"] for row in block_rows):
        b = {row["block"]: row for row in block_rows if row["method"] == method}
        if {"double", "single"} <= set(b):
            masks = f["double"] * b["double"]["mask_seconds"] + f["single"] * b["single"]["mask_seconds"]
            calib = samples * (f["double"] * b["double"]["observe_seconds_per_sample"]
                               + f["single"] * b["single"]["observe_seconds_per_sample"])
            out.append({"method": method, "mask_hours": masks / 3600, "calibration_hours": calib / 3600,
                        "total_hours": (masks + calib) / 3600})
    return out


def memory_account(block_rows: list[dict], layer_rows: list[dict] | None = None, method: str = "dit",
                   spec: dict | None = None) -> dict:
    """Device memory of a block-by-block run from measured parts (bytes, see below), for the
    transformer ``spec`` (default FLUX.1-dev: 11.9B bf16 parameters, 19 + 38 blocks, the real
    run's calls): the weights (parameters x bytes per parameter, as stored), the masks (one bit
    per targeted weight, all attached at once), the most any measured block run of ``method``
    held beyond its own weights (statistics, workspace of its largest layer, forward
    activations, its masks: measured together by :class:`ditprune.memory.LiveBytes`), and one
    call's block inputs on the device (the others wait on the CPU with ``offload``: counted
    apart). ``backup`` (the API's default for a method that updates weights) is a CPU copy of the
    weights: counted apart, zero for ``ditprune prune``."""
    s = {"params": FLUX_DEV["params"], "bytes_per_param": 2, "target_params": None,
         "calls": REAL_RUN["prompts"] * REAL_RUN["steps"] // REAL_RUN["batch"], "batch": REAL_RUN["batch"],
         **(spec or {})}
    gb = 2**30
    rows = [r for r in block_rows if r["method"] == method]
    if not rows:
        raise ValueError(f"no block rows for method {method!r}")
    weights = s["params"] * s["bytes_per_param"]
    target = s["target_params"] if s["target_params"] is not None else s["params"]
    masks = math.ceil(target / 8)
    block_extra = max(r["extra_mb"] for r in rows) * 2**20
    call_inputs = max(r["call_input_mb"] for r in rows) * 2**20 * s["batch"]
    total = weights + masks + block_extra + call_inputs
    captured = s["calls"] * call_inputs
    return {"method": method, "weights_gb": weights / gb, "masks_gb": masks / gb,
            "block_extra_gb": block_extra / gb, "one_call_inputs_gb": call_inputs / gb, "total_gpu_gb": total / gb,
            "captured_inputs_on_cpu_gb": captured / gb, "backup_on_cpu_gb_if_api_default": weights / gb,
            "within_40_gb": total <= 40e9, "total_bytes": total}


def run_cost(out: Path, quick: bool = False, repeats: int = 2, images: int = 1, device: str = "cpu",
             progress: bool = True, dtype: str = "bfloat16") -> dict:
    """Everything above, the block runs in ``dtype``; writes ``cost.md`` and ``cost.json`` into ``out``."""
    import json

    from ._io import atomic_file

    shapes = SHAPES[:1] if quick else SHAPES
    layer_rows = layer_costs(shapes, METHODS, 1 if quick else repeats, device, progress)
    block_rows = block_costs(METHODS[:3] + [MEMORY_ONLY], images, calls=1 if quick else 2, device=device,
                             progress=progress, dtype=getattr(torch, dtype))
    whole = extrapolate([r for r in block_rows if r["method"] != MEMORY_ONLY[0]])
    curve_rows = alloccost.curve_costs(device, getattr(torch, dtype), progress=progress)
    probes = alloccost.probe_costs(device=device)
    allocation = alloccost.allocation_cost(block_rows, curve_rows, whole, probes=probes)
    memory = [memory_account(block_rows, method=m) for m in dict.fromkeys(r["method"] for r in block_rows)]
    machine = (torch.cuda.get_device_name(device) if torch.device(device).type == "cuda"
               else f"CPU, {torch.get_num_threads()} threads")
    text = render(layer_rows, block_rows, whole, memory, machine, dtype, allocation, probes)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / "cost.md") as tmp:
        tmp.write_text(text + "\n")
    with atomic_file(out / "cost.json") as tmp:
        tmp.write_text(json.dumps({"machine": machine, "block_dtype": dtype, "layers": layer_rows, "blocks": block_rows, "transformer": whole,
                                   "allocation_curves": curve_rows, "allocation_probes": probes, "allocation": allocation, "memory": memory, "gram_flops": gram_flops()}, indent=1, default=str) + "\n")
    return {"table": text, "outputs": {"table": str(out / "cost.md"), "json": str(out / "cost.json")}}


def render(layer_rows, block_rows, whole, memory, machine: str, dtype: str = "bfloat16",
           allocation: list[dict] | None = None, probes: dict | None = None) -> str:
    lines = [f"Machine: {machine}. Random weights, real shapes; statistics as described in "
             "`ditprune/costbench.py`. Peak: live tensor bytes the call created (CPU), the allocator's peak (GPU).", "",
             "| shape (out x in) | tokens | method | seconds | x Wanda | x SparseGPT | peak MiB |", "|---|---|---|---|---|---|---|"]
    for r in layer_rows:
        lines.append(f"| {r['shape']} ({r['out']}x{r['in']}) | {r['tokens']} | {r['method']} | {r['seconds']:.2f} | "
                     f"{r['x_wanda']:.1f} | {r['x_sparsegpt']:.2f} | {r['peak_mb']:.0f} |")
    if block_rows:
        lines += ["", f"Shape-true FLUX.1-dev blocks in {dtype}, pruned on the code path of `configs/flux_dev.yaml`: "
                      "adaLN layers with 64 x 28 = 1792 sampled tokens (the few-token path), the others with plenty "
                      "(a covariance); calibration measured on real calls and scaled per sample. Memory measured "
                      "while it runs: the peak above the block's weights, and each kind's own peak (MiB):", "",
                  "| block | method | Linears | weights MiB | calibration s / sample | mask seconds (counter on) | peak above weights "
                  "| masks | statistics | workspace | forward |",
                  
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in block_rows:
            k = r["max_by_kind_mb"]
            lines.append(f"| {r['block']} | {r['method']} | {r['layers']} | {r['weights_mb']:.0f} | "
                         f"{r['observe_seconds_per_sample']:.2f} | {r['mask_seconds']:.1f} | {r['extra_mb']:.0f} | "
                         f"{k['masks']:.0f} | {k['statistics']:.0f} | {k['workspace']:.0f} | {k['forward']:.0f} |")
        lines += ["", "Whole transformer (19 double + 38 single blocks), extrapolated from the block runs above on the "
                      "same machine: masks = measured block seconds x blocks (timed with the byte counter on, whose "
                      "bookkeeping per operation slows code of many small operations: an upper bound; the first table "
                      "times plain runs); calibration = measured forward and "
                      f"statistics per sample x 1792 samples x blocks. Gram accumulation alone: {gram_flops():.1e} FLOPs "
                      "(about a minute at 1e15 FLOP/s). Left out: the text encoders, the sampler's own steps, "
                      "loading and saving.", "",
                  "| method | masks (h) | calibration (h) | total (h) |", "|---|---|---|---|"]
        lines += [f"| {w['method']} | {w['mask_hours']:.2f} | {w['calibration_hours']:.2f} | {w['total_hours']:.2f} |"
                  for w in whole]
    if allocation:
        lines += alloccost.render(allocation, probes)
    if memory:
        lines += ["", "Device memory of `configs/flux_dev.yaml` (bf16, block by block, `offload: cpu`), composed "
                      "from the measured block runs (GiB): weights (bf16) + masks (1 bit per weight) + the most a "
                      f"block run held beyond its weights (measured in {dtype}) + one call's inputs. CPU: the captured inputs of every call; "
                      "`ditprune.prune(..., backup=True)` adds a CPU copy of the weights for updating methods.", "",
                  "| method | weights | masks | block run | one call | total on the device | within 40 GB | "
                  "CPU: captured inputs |", "|---|---|---|---|---|---|---|---|"]
        for m in memory:
            lines.append(f"| {m['method']} | {m['weights_gb']:.1f} | {m['masks_gb']:.2f} | {m['block_extra_gb']:.2f} | "
                         f"{m['one_call_inputs_gb']:.2f} | {m['total_gpu_gb']:.1f} | "
                         f"{'yes' if m['within_40_gb'] else 'no'} | {m['captured_inputs_on_cpu_gb']:.1f} |")
    return "\n".join(lines)
