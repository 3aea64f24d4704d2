"""Run as a script by tests/test_ddp.py: Lightning's ``ddp`` strategy on 2 CPU processes (gloo)
relaunches this file once per rank. Each rank writes its masks, its weights right after pruning
and after training, and the calibration batches it saw to OUT/rank{r}.safetensors.

    python tests/ddp_worker.py OUT METHOD [OPTIONS_JSON]
"""

import json

import sys
from pathlib import Path

import torch
from lightning.pytorch import Trainer
from safetensors.torch import save_file

from ditprune.callbacks import DiTPruning
from ditprune.recovery import ReferenceRecovery, reference_dataloader
from ditprune.reference import load


class Recording(DiTPruning):
    def _calibration(self, trainer, pl_module):
        self.seen = super()._calibration(trainer, pl_module)
        return self.seen

    def _prune(self, trainer, pl_module):
        super()._prune(trainer, pl_module)
        self.pruned = {g["tensor_fqn"]: g["module"].weight.detach().clone() for g in self.plan.sparsifier.groups}


def main(out: Path, method: str, options: dict) -> None:
    torch.manual_seed(0)
    module = ReferenceRecovery(load("dit"), lr=3e-4, seed=0)
    callback = Recording(method, sparsity=0.5, calibration_batches=2, **options)
    trainer = Trainer(max_steps=3, callbacks=[callback], accelerator="cpu", devices=2, strategy="ddp", logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, reference_dataloader(14))
    tensors = {f"mask/{k}": v.to(torch.uint8) for k, v in callback.masks().items()}
    tensors |= {f"weight/{k}": v.detach().clone() for k, v in module.model.state_dict().items()}
    tensors |= {f"pruned/{k}": v for k, v in callback.pruned.items()}
    # each rank's own allocation (computed before the masks are broadcast from rank 0)
    tensors |= {f"alloc/{k}": torch.tensor([v["sparsity"]]) for k, v in callback.plan.allocated.items()}
    for i, batch in enumerate(callback.seen):
        tensors |= {f"batch{i}/{k}": v for k, v in batch.items() if isinstance(v, torch.Tensor)}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / f"rank{trainer.global_rank}.safetensors"))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3]) if len(sys.argv) > 3 else {})
