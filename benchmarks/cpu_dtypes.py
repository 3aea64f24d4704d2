"""One FLUX.1-dev attention product (tokens x 3072 by 3072 x 3072) on this CPU in float32,
bfloat16 and float16: whether the CPU has matrix units for the half types, or torch takes a
slow fallback (then prune and run bf16 models on a GPU, or in float32 here).

    python benchmarks/cpu_dtypes.py [tokens]     # default 4096, as a FLUX.1-dev 1024x1024 image

Prints a markdown table: seconds per product (one warm-up, then the median of 3, or of 1 when a
product takes over 20 s) and the GFLOP/s that makes.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch


def main(tokens: int = 4096, width: int = 3072) -> None:
    g = torch.Generator().manual_seed(0)
    a, w = torch.randn(tokens, width, generator=g), torch.randn(width, width, generator=g)
    print(f"{torch.get_num_threads()} threads; torch {torch.__version__}; {tokens} x {width} by {width} x {width}\n")
    print("| dtype | seconds | GFLOP/s |\n|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x, y = a.to(dtype), w.to(dtype)
        start = time.perf_counter()
        x @ y  # warm-up (and the measure, if one product is slow enough)
        times = [time.perf_counter() - start]
        if times[0] < 20:
            times = []
            for _ in range(3):
                start = time.perf_counter()
                x @ y
                times.append(time.perf_counter() - start)
        s = statistics.median(times)
        print(f"| {str(dtype).split('.')[-1]} | {s:.3f} | {2 * tokens * width * width / s / 1e9:.1f} |", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 4096)
