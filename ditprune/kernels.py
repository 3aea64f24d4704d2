"""2:4 semi-structured kernels, only where they pay.

``torch.sparse.to_sparse_semi_structured`` (cuSPARSELt or CUTLASS) runs 2:4-sparse matmuls on
NVIDIA GPUs of compute capability 8.0 and newer. Whether it is faster than the dense matmul
depends on the shape, the dtype, the GPU and the PyTorch version (measured anywhere from 0.4x
to 1.2x of dense on H100, pytorch#153825, #177866), so :func:`accelerate` measures every
distinct layer shape on the GPU at hand and converts only the layers whose shape gained.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["accelerate", "cuda_ms", "is_n_m"]


def is_n_m(weight: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """At most ``n`` non-zeros in every group of ``m`` consecutive inputs of every row."""
    if weight.dim() != 2 or weight.shape[1] % m:
        return False
    return bool(((weight != 0).reshape(weight.shape[0], -1, m).sum(-1) <= n).all())


def cuda_ms(fn, repeats: int = 50) -> float:
    """Milliseconds per call of ``fn`` on the current CUDA device (after 3 warm-up calls)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def _speedup(weight: torch.Tensor, tokens: int, repeats: int) -> float:
    from torch.sparse import to_sparse_semi_structured

    x = torch.randn(tokens, weight.shape[1], dtype=weight.dtype, device=weight.device)
    sparse = to_sparse_semi_structured(weight.detach().contiguous())
    dense_ms = cuda_ms(lambda: torch.nn.functional.linear(x, weight), repeats)
    sparse_ms = cuda_ms(lambda: torch.nn.functional.linear(x, sparse), repeats)
    return dense_ms / sparse_ms


@torch.no_grad()
def accelerate(model: nn.Module, tokens: int = 4096, min_speedup: float = 1.1, repeats: int = 20) -> dict:
    """Swap the weight of each 2:4-sparse ``nn.Linear`` for a semi-structured sparse tensor where
    a micro-benchmark of its shape on this GPU (``tokens`` rows of input) measured at least
    ``min_speedup`` x the dense speed; the others stay dense. Returns
    ``{"converted": [names], "dense": {name: why}, "speedups": {"out x in dtype": x}, "why": str | None}``;
    on a machine without a suitable GPU nothing changes and ``why`` says so."""
    report = {"converted": [], "dense": {}, "speedups": {}, "why": None}
    if not torch.cuda.is_available():
        report["why"] = ("no CUDA GPU: 2:4 semi-structured kernels (cuSPARSELt / CUTLASS) run on NVIDIA GPUs of "
                         "compute capability 8.0 or newer; nothing converted")
        return report
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        w = module.weight
        if w.device.type != "cuda":
            report["dense"][name] = "not on a CUDA device"
        elif torch.cuda.get_device_capability(w.device) < (8, 0):
            report["dense"][name] = "GPU older than compute capability 8.0"
        elif w.dtype not in (torch.float16, torch.bfloat16):
            report["dense"][name] = f"dtype {w.dtype} (fp16 or bf16 only)"
        elif not is_n_m(w):
            report["dense"][name] = "not 2:4 sparse"
        else:
            key = f"{w.shape[0]}x{w.shape[1]} {str(w.dtype).split('.')[-1]}"
            if key not in report["speedups"]:
                try:
                    report["speedups"][key] = _speedup(w, tokens, repeats)
                except RuntimeError as e:  # a shape the kernels do not take
                    report["speedups"][key] = None
                    report["dense"][name] = f"not supported: {str(e).splitlines()[0]}"
                    continue
            speedup = report["speedups"][key]
            if speedup is None:
                report["dense"][name] = "shape not supported by the kernels"
            elif speedup < min_speedup:
                report["dense"][name] = f"measured {speedup:.2f}x: below {min_speedup}x"
            else:
                from torch.sparse import to_sparse_semi_structured

                module.weight = nn.Parameter(to_sparse_semi_structured(w.detach().contiguous()), requires_grad=False)
                report["converted"].append(name)
    return report
