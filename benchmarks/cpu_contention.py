"""Mask time of one FLUX.1-dev attention Linear (3072x3072) on a CPU, alone and beside one busy
process, by OpenMP wait policy: what a user's laptop (always running something else) sees.

    python benchmarks/cpu_contention.py

Each row is a fresh process (libgomp reads OMP_WAIT_POLICY when torch loads). "default" is
libgomp's own policy (threads spin at barriers before sleeping); the ditprune CLI sets PASSIVE.
The competitor is a plain Python process multiplying matrices with as many threads as this one.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

METHODS = ("wanda", "sparsegpt", "dit")


def child() -> None:
    import torch

    from ditprune.costbench import synthetic_stats
    from ditprune.pruning import make_sparsifier

    d = 3072
    stats = synthetic_stats(d, None)
    weight = torch.randn(d, d, generator=torch.Generator().manual_seed(1)) / d**0.5
    warm = make_sparsifier("dit", 0.5, None)
    warm.compute_mask(torch.randn(96, 64), synthetic_stats(64, None), **warm.defaults)  # one-time costs
    for method in METHODS:
        sp = make_sparsifier(method, 0.5, None)
        start = time.perf_counter()
        sp.compute_mask(weight, stats, **sp.defaults)
        print(f"{method} {time.perf_counter() - start:.2f}", flush=True)


def run(policy: str | None, busy: bool) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    competitor = None
    if busy:
        competitor = subprocess.Popen([sys.executable, "-c", "import torch\nx = torch.randn(1024, 1024)\nwhile True: x @ x"],
                                      env=env)
        time.sleep(3)
    try:
        out = subprocess.run([sys.executable, __file__, "--child"], env=env, capture_output=True, text=True, check=True)
    finally:
        if competitor:
            competitor.kill()
            competitor.wait()
    return {m: float(s) for m, s in (line.split() for line in out.stdout.splitlines())}


def main() -> None:
    import torch

    print(f"{torch.get_num_threads()} threads; seconds per 3072x3072 mask (1e6-token covariance)\n")
    print("| machine | OMP_WAIT_POLICY | " + " | ".join(METHODS) + " |")
    print("|---|---|" + "---|" * len(METHODS))
    for busy in (False, True):
        for policy in (None, "PASSIVE"):
            times = run(policy, busy)
            print(f"| {'one busy process beside' if busy else 'idle'} | {policy or 'default'} | "
                  + " | ".join(f"{times[m]:.2f}" for m in METHODS) + " |", flush=True)


if __name__ == "__main__":
    child() if "--child" in sys.argv else main()
