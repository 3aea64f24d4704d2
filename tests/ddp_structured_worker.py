"""Run as a script by tests/test_structured.py: 2 CPU processes (gloo) each remove heads and MLP
channels from the reference dit-xl-layout model with their own half of the calibration
(statistics summed over the ranks), and write the model they end with to OUT/rank{r}.safetensors.

    python tests/ddp_structured_worker.py OUT
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import save_file


def shards():
    import ditprune

    batches = ditprune.reference_calibration(ditprune.load_reference("dit"), n_prompts=6, steps=3)
    return batches[0::2], batches[1::2]


def run(rank: int, out: Path) -> None:
    import ditprune

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, init_method=f"file://{out / 'rendezvous'}")
    try:
        model = ditprune.load_reference("dit")
        ditprune.prune_structured(model, shards()[rank], "heads+mlp", 0.5)  # sync: a group of 2 is up
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / f"rank{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(run, args=(Path(sys.argv[1]),), nprocs=2)
