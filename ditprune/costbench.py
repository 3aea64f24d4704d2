"""``ditprune bench --cost``: what pruning costs at FLUX.1-dev's real shapes (random weights;
time and memory do not depend on the values).

1. *Single Linears* at every FLUX.1-dev shape, each method's own ``compute_mask`` on the same
   statistics. Statistics come from a synthetic correlated covariance (low rank plus a diagonal,
   heavy-tailed channel scales): image-stream layers see millions of tokens in a real run, which
   no CPU can replay, and a mask's cost depends on H, not on how many tokens made it. The adaLN
   shape is the exception: it gets real sampled tokens, as many as ``configs/flux_dev.yaml``
   gives it (64 prompts x 28 steps = 1792, fewer than its 3072 inputs), so it runs the few-token
   path it runs in practice. Each method is timed ``repeats`` times, interleaved, best kept.
2. *One full-width double block and one single block*, pruned with :func:`ditprune.prune` on
   calibration batches of ``images`` samples at 512x512 (1024 image + 512 text tokens each):
   seconds, peak statistics (shared by q/k/v) and peak memory.
3. An *extrapolation* to the whole transformer (19 double + 38 single blocks) and a *memory
   account* of a ``configs/flux_dev.yaml`` run on one GPU, with their assumptions printed.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import torch

__all__ = ["SHAPES", "FLUX_DEV", "synthetic_stats", "layer_costs", "block_costs", "memory_account", "run_cost"]

# (name, out_features, in_features, calibration tokens: None = plenty)
SHAPES = [
    ("attn to_q/k/v, to_out", 3072, 3072, None),
    ("ff.net.0.proj", 12288, 3072, None),
    ("ff.net.2", 3072, 12288, None),
    ("norm1.linear (adaLN)", 18432, 3072, 64 * 28),
    ("single proj_out", 3072, 15360, None),
]
FLUX_DEV = {"double": 19, "single": 38, "dim": 3072, "heads": 24, "head_dim": 128, "text_tokens": 512,
            "params": 11.90e9}
METHODS = [  # (label, method, options, pattern)
    ("wanda", "wanda", {}, None),
    ("sparsegpt", "sparsegpt", {}, None),
    ("dit", "dit", {}, None),
    ("sparsegpt 2:4", "sparsegpt", {}, "2:4"),
    ("dit 2:4", "dit", {}, "2:4"),
    ("dit reconstruct", "dit", {"reconstruct": True}, None),
]


# -- measuring ----------------------------------------------------------------------------------
def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM, the peak resident set (Linux)
            f.write("5")
    except OSError:
        pass


def _peak_bytes(device: torch.device, baseline: int) -> int | None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - baseline
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 - baseline
    except OSError:
        return None
    return None


def _current_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def measure(fn: Callable[[], object], device: torch.device) -> tuple[float, int | None]:
    """(seconds, peak bytes above what was held before) of one call."""
    base = _current_bytes(device)
    _peak_reset(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return seconds, _peak_bytes(device, base)


# -- inputs -------------------------------------------------------------------------------------
def _basis(d: int, seed: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rank = min(d, 256)
    basis = (torch.randn(rank, d, generator=g) / rank**0.5).to(device)
    spectrum = torch.logspace(0, -2, rank).to(device)
    scale = torch.exp(torch.randn(d, generator=g)).to(device)  # heavy-tailed channel scales
    return basis, spectrum, scale


def synthetic_stats(d: int, tokens: int | None, seed: int = 0, device="cpu", need_gram: bool = True):
    """:class:`~ditprune.stats.InputStats` of correlated inputs: x = (z * spectrum) @ basis + 0.05 e,
    times per-channel scales. ``tokens=None``: the population covariance itself, counted as a
    million tokens; else that many sampled tokens (the few-token path, with held-out statistics)."""
    from .stats import InputStats

    basis, spectrum, scale = _basis(d, seed, device)
    stats = InputStats("synthetic", d, need_gram, device=device)
    if tokens is None:
        n = 1_000_000
        cov = (basis.T * spectrum.pow(2)) @ basis + 0.05**2 * torch.eye(d, device=device)
        cov = cov * scale.unsqueeze(0) * scale.unsqueeze(1)
        stats.sq_sum = torch.diagonal(cov).clone() * n
        if need_gram:
            stats.gram_sum, stats.held_sum = cov * n, None
        stats.count, stats.weight_sum = n, float(n)
        return stats
    g = torch.Generator(device=device).manual_seed(seed + 1)
    for start in range(0, tokens, 1024):
        k = min(1024, tokens - start)
        z = torch.randn(k, basis.shape[0], generator=g, device=device) * spectrum
        x = (z @ basis + 0.05 * torch.randn(k, d, generator=g, device=device)) * scale
        stats.update(x)
    return stats


# -- 1. single layers ---------------------------------------------------------------------------
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
            if rep and max(t for t, _ in best.values()) > 30:
                bar.update(len(methods) * (repeats - rep))
                break  # a shape this slow is timed once: its ratios are not near any limit
            for label, method, options, pattern in methods:
                sp = make_sparsifier(method, 0.5, pattern, **options)
                seconds, peak = measure(lambda: sp.compute_mask(weight, stats, **sp.defaults), device)
                old = best.get(label)
                best[label] = (min(seconds, old[0]) if old else seconds,
                               max(p for p in (peak, old[1] if old else None) if p is not None) if peak is not None else None)
                bar.update()
        for label, (seconds, peak) in best.items():
            rows.append({"shape": name, "out": out_f, "in": in_f, "tokens": tokens or "1e6 (covariance)",
                         "method": label, "seconds": seconds, "peak_mb": peak / 2**20 if peak is not None else None,
                         "x_wanda": seconds / best["wanda"][0], "x_sparsegpt": seconds / best["sparsegpt"][0]})
        del stats, weight
    bar.close()
    return rows


# -- 2. shape-true blocks -----------------------------------------------------------------------
def flux_blocks(device="cpu", dtype=torch.float32, dims: dict | None = None):
    """A full-width FLUX.1-dev double block and single block, random weights (``dims``: other
    ``dim``/``heads``/``head_dim``, for tests)."""
    from ._quiet import diffusers as _diffusers

    _diffusers()
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

    f = {**FLUX_DEV, **(dims or {})}
    torch.manual_seed(0)
    double = FluxTransformerBlock(f["dim"], f["heads"], f["head_dim"]).to(device, dtype).eval()
    single = FluxSingleTransformerBlock(f["dim"], f["heads"], f["head_dim"]).to(device, dtype).eval()
    return double, single


def block_batches(images: int, image_tokens: int = 1024, calls: int = 2, device="cpu", dtype=torch.float32,
                  seed: int = 0, dims: dict | None = None) -> list[dict]:
    """Block inputs of ``calls`` transformer calls with ``images`` samples each (512x512: 1024
    image tokens; 1024x1024: 4096), correlated like the synthetic layer inputs."""
    from ._quiet import diffusers as _diffusers

    _diffusers()
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    f = {**FLUX_DEV, **(dims or {})}
    basis, spectrum, scale = _basis(f["dim"], seed, device)
    g = torch.Generator(device=device).manual_seed(seed + 2)

    def tokens(n):
        z = torch.randn(images, n, basis.shape[0], generator=g, device=device) * spectrum
        return ((z @ basis + 0.05 * torch.randn(images, n, f["dim"], generator=g, device=device)) * scale).to(dtype)

    side = int(math.isqrt(image_tokens))
    img_ids = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(-1, 2)
    ids = torch.cat([torch.zeros(f["text_tokens"], 3), torch.cat([torch.zeros(len(img_ids), 1), img_ids], 1)]).to(device)
    rotary = FluxPosEmbed(theta=10000, axes_dim=[f["head_dim"] // 8, 7 * f["head_dim"] // 16, 7 * f["head_dim"] // 16])(ids)
    return [{"hidden_states": tokens(image_tokens), "encoder_hidden_states": tokens(f["text_tokens"]),
             "temb": torch.randn(images, f["dim"], generator=g, device=device).to(dtype), "image_rotary_emb": rotary}
            for _ in range(calls)]


def block_costs(methods=METHODS[:3], images: int = 1, image_tokens: int = 1024, calls: int = 2, device="cpu",
                progress: bool = True, dims: dict | None = None) -> list[dict]:
    from tqdm import tqdm

    from . import prune

    device = torch.device(device)
    batches = block_batches(images, image_tokens, calls, device, dims=dims)
    rows = []
    for kind in tqdm(("double", "single"), desc="cost: blocks", disable=not progress):
        for label, method, options, pattern in methods:
            block = flux_blocks(device, dims=dims)[0 if kind == "double" else 1]
            holder = {}

            def run():
                holder["report"] = prune(block, batches, method=method, sparsity=0.5, pattern=pattern, targets=[""],
                                         ignore=[], block_sequential=False, **options)

            seconds, peak = measure(run, device)
            report = holder["report"]
            rows.append({"block": kind, "method": label, "layers": len(report.layers), "seconds": seconds,
                         "mask_seconds": sum(r.seconds for r in report.layers),
                         "stats_mb": report.peak_stats_bytes / 2**20,
                         "stats_unshared_mb": _unshared_stats(block, batches, method, options, pattern) / 2**20,
                         "peak_mb": peak / 2**20 if peak is not None else None,
                         "calibration_tokens": calls * images * (image_tokens + {**FLUX_DEV, **(dims or {})}["text_tokens"])})
            del block
    return rows


def _unshared_stats(block, batches, method, options, pattern) -> int:
    """Bytes the statistics of one observation pass would take if no layers shared them."""
    from .pruning import PrunePlan

    plan = PrunePlan(block, method, 0.5, pattern, [""], ignore=[], block_sequential=False, **options)
    plan.attach()
    plan.share_stats = False
    try:
        with plan.sparsifier.observe(None, plan.scopes, plan.text_layers, share=False):
            with torch.no_grad():
                for b in batches:
                    block(**b)
        return plan.sparsifier.peak_stats_bytes
    finally:
        plan.restore()


# -- 3. whole transformer -----------------------------------------------------------------------
def extrapolate(block_rows: list[dict]) -> list[dict]:
    """Mask time of the whole transformer: 19 x double + 38 x single block mask seconds."""
    f = FLUX_DEV
    out = []
    for method in dict.fromkeys(r["method"] for r in block_rows):
        t = {r["block"]: r["mask_seconds"] for r in block_rows if r["method"] == method}
        if {"double", "single"} <= set(t):
            out.append({"method": method, "transformer_mask_hours": (f["double"] * t["double"] + f["single"] * t["single"]) / 3600})
    return out


def memory_account(block_rows: list[dict], layer_rows: list[dict], images: int = 4, image_tokens: int = 1024,
                   calls: int = 64 // 4 * 28) -> dict:
    """GPU memory of a ``configs/flux_dev.yaml`` run (bf16, block by block, captured inputs and
    calibration on the CPU): the transformer's weights, one call's block inputs and activations,
    one block's statistics (measured on the shape-true blocks), the largest layer's workspace
    (measured on the single-layer runs)."""
    f = FLUX_DEV
    gb = 2**30
    seq = image_tokens + f["text_tokens"]
    weights = f["params"] * 2
    call_inputs = images * seq * f["dim"] * 2 + images * f["dim"] * 2 + seq * f["head_dim"] * 4 * 2
    activations = images * seq * f["dim"] * 2 * 12 + images * f["heads"] * seq * seq * 2  # hidden states, mlp, scores
    stats = max((r["stats_mb"] for r in block_rows if r["method"] == "dit"), default=0.0) * 2**20
    workspace = max((r["peak_mb"] or 0 for r in layer_rows if r["method"] in ("dit", "sparsegpt")), default=0.0) * 2**20
    captured_cpu = calls * (call_inputs + images * f["text_tokens"] * 4096 * 2)
    total = weights + call_inputs + activations + stats + workspace
    return {"weights_gb": weights / gb, "one_call_inputs_gb": call_inputs / gb, "activations_gb": activations / gb,
            "block_statistics_gb": stats / gb, "largest_layer_workspace_gb": workspace / gb, "total_gpu_gb": total / gb,
            "captured_inputs_on_cpu_gb": captured_cpu / gb, "within_40_gb": total <= 40 * gb}


def run_cost(out: Path, quick: bool = False, repeats: int = 2, images: int = 1, device: str = "cpu",
             progress: bool = True) -> dict:
    """Everything above; writes ``cost.md`` and ``cost.json`` into ``out``."""
    import json

    from ._io import atomic_file

    shapes = SHAPES[:1] + SHAPES[3:4] if quick else SHAPES
    methods = METHODS[:3] if quick else METHODS
    layer_rows = layer_costs(shapes, methods, 1 if quick else repeats, device, progress)
    block_rows = [] if quick else block_costs(METHODS[:3], images, device=device, progress=progress)
    whole = extrapolate(block_rows)
    memory = memory_account(block_rows, layer_rows)
    machine = (torch.cuda.get_device_name(device) if torch.device(device).type == "cuda"
               else f"CPU, {torch.get_num_threads()} threads")
    text = render(layer_rows, block_rows, whole, memory, machine)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / "cost.md") as tmp:
        tmp.write_text(text + "\n")
    with atomic_file(out / "cost.json") as tmp:
        tmp.write_text(json.dumps({"machine": machine, "layers": layer_rows, "blocks": block_rows, "transformer": whole,
                                   "memory": memory}, indent=1, default=str) + "\n")
    return {"table": text, "outputs": {"table": str(out / "cost.md"), "json": str(out / "cost.json")}}


def render(layer_rows, block_rows, whole, memory, machine: str) -> str:
    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    lines = [f"Machine: {machine}. Random weights, real shapes; statistics as described in "
             "`ditprune/costbench.py`.", "",
             "| shape (out x in) | tokens | method | seconds | x Wanda | x SparseGPT | peak MB |", "|---|---|---|---|---|---|---|"]
    for r in layer_rows:
        lines.append(f"| {r['shape']} ({r['out']}x{r['in']}) | {r['tokens']} | {r['method']} | {r['seconds']:.2f} | "
                     f"{r['x_wanda']:.1f} | {r['x_sparsegpt']:.2f} | {fmt(r['peak_mb'], '.0f')} |")
    if block_rows:
        lines += ["", "| FLUX.1-dev block | method | Linears | seconds (calibration + masks) | mask seconds | "
                      "stats MB (shared) | stats MB if unshared | peak MB | calibration tokens |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in block_rows:
            lines.append(f"| {r['block']} | {r['method']} | {r['layers']} | {r['seconds']:.1f} | {r['mask_seconds']:.1f} | "
                         f"{r['stats_mb']:.0f} | {r['stats_unshared_mb']:.0f} | {fmt(r['peak_mb'], '.0f')} | "
                         f"{r['calibration_tokens']} |")
        lines += ["", "Whole transformer, masks only (19 double + 38 single blocks x the block mask seconds above; "
                      "calibration forward passes not included; same machine):", ""]
        lines += [f"- {w['method']}: {w['transformer_mask_hours']:.2f} h" for w in whole]
    m = memory
    lines += ["", "GPU memory of `configs/flux_dev.yaml` (bf16 weights, block by block, `offload: cpu`; text "
                  "encoders and VAE moved off the GPU once calibration is recorded):", "",
              f"- transformer weights: {m['weights_gb']:.1f} GiB (11.9B parameters x 2 bytes)",
              f"- one call's block inputs: {m['one_call_inputs_gb']:.2f} GiB; activations of one block forward: "
              f"{m['activations_gb']:.2f} GiB (batch of 4 at 512x512)",
              f"- one block's statistics: {m['block_statistics_gb']:.2f} GiB (measured above, double block, dit)",
              f"- largest layer's workspace: {m['largest_layer_workspace_gb']:.2f} GiB (peak of the single-layer runs)",
              f"- total on the GPU: {m['total_gpu_gb']:.1f} GiB ({'within' if m['within_40_gb'] else 'over'} 40 GB); "
              f"captured inputs waiting on the CPU: {m['captured_inputs_on_cpu_gb']:.1f} GiB"]
    return "\n".join(lines)
