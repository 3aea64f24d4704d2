"""Short masked recovery fine-tune of a pruned reference DiT, as a LightningModule, and the
recipe step that runs prune -> recover -> quantize in one ``Trainer.fit``."""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from .reference import NAMES, Conditioning, Denoiser
from .reference.data import digits
from .reference.text import TEMPLATES

__all__ = ["ReferenceRecovery", "reference_dataloader", "recover_and_quantize"]


def reference_dataloader(batch_size: int = 32, seed: int = 0) -> DataLoader:
    """The generator split (the reference models' own training data), shuffled with a seed."""
    x, y = digits("generator")
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True,
                      generator=torch.Generator().manual_seed(seed), drop_last=True)


class ReferenceRecovery(LightningModule):
    """Fine-tunes ``model`` on noised digits. Loss: MSE to the velocity of ``self.teacher`` (a
    frozen dense copy, attached by :class:`ditprune.callbacks.DiTPruning` with ``distill=True``),
    or else the rectified-flow loss itself. ``calibration_inputs`` turns a training batch into
    model inputs for calibration."""

    def __init__(self, model: nn.Module, lr: float = 1e-4, seed: int = 0) -> None:
        super().__init__()
        self.model, self.lr = model, lr
        self.kind = Denoiser(model).kind
        self._gen = torch.Generator().manual_seed(seed)
        self._table = None
        if self.kind == "flux":
            self._table = Conditioning.make("flux", torch.arange(10).repeat_interleave(len(TEMPLATES)),
                                            torch.arange(len(TEMPLATES)).repeat(10))
        self.teacher: nn.Module | None = None

    def _noised(self, batch):
        x0, y = batch
        n = len(y)
        if self._table is None:
            cond = Conditioning(y)
        else:
            cond = self._table[y.cpu() * len(TEMPLATES) + torch.randint(0, len(TEMPLATES), (n,), generator=self._gen)]
        t = torch.sigmoid(torch.randn(n, generator=self._gen))
        noise = torch.randn(x0.shape, generator=self._gen)
        xt = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
        return xt, t, cond, noise - x0

    def calibration_inputs(self, batch) -> list[dict]:
        xt, t, cond, _ = self._noised(batch)
        return [Denoiser(self.model).inputs(xt, t, cond)]

    def loss(self, batch) -> torch.Tensor:
        xt, t, cond, target = self._noised(batch)
        if self.teacher is not None:
            with torch.no_grad():
                target = Denoiser(self.teacher)(xt, t, cond)
        return F.mse_loss(Denoiser(self.model)(xt, t, cond), target)

    def training_step(self, batch, batch_idx):
        loss = self.loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.model.parameters(), lr=self.lr, weight_decay=0.0)


def recover_and_quantize(dense: nn.Module, calibration: list[dict], evaluator, *, method: str, setting: dict,
                         prune_kwargs: dict, steps: int, lr: float = 1e-4, batch_size: int = 32, distill: bool = True,
                         quantize: str | None = None, progress: bool = True, structure: dict | None = None):
    """``method`` at ``setting`` ({"sparsity": s} or {"pattern": "N:M"}, with ``prune_kwargs``),
    pruned -> recovered for ``steps`` -> [quantized] in one ``Trainer.fit`` from a fresh dense copy,
    on ``calibration``; with ``steps=0`` pruned and quantized without training. Returns (model,
    rows): one row after recovery (measured at the end of training, before quantization) when
    ``steps > 0`` and, with ``quantize``, one after it. ``structure``: the callback's
    ``structure``, ``structure_sparsity`` and ``structure_method`` (heads and channels removed
    first)."""
    from lightning.pytorch import Callback

    from ditprune.callbacks import DiTPruning

    model = copy.deepcopy(dense)
    module = ReferenceRecovery(model, lr=lr)
    rows: list[dict] = []
    label = method + (f" + recovered {steps}" if steps else "")
    short = quantize.removesuffix("_weight_only") if quantize else None  # int8_weight_only: "int8" in labels
    report = None

    def row(label: str) -> dict:
        return {"model": NAMES[module.kind], "method": label, "setting": setting.get("pattern") or setting["sparsity"],
                "sparsity": report.sparsity, **evaluator(model), "samples": evaluator.last_samples}

    if steps == 0:
        from .pruning import prune
        from .quantize import quantize as quantize_

        if structure:
            from .structuring import prune_structured

            prune_structured(model, calibration, structure["structure"], structure["structure_sparsity"],
                             structure["structure_method"], progress=progress)
        report = prune(model, calibration, method, **setting, **prune_kwargs)
        if quantize:
            quantize_(model, quantize, targets=[r.name for r in report.layers])
            rows.append(row(f"{label} + {short}"))
        return model, rows

    class _Measure(Callback):  # listed before DiTPruning: runs before it squashes and quantizes
        def on_train_end(self, trainer, pl_module):
            nonlocal report
            report = callback.report
            rows.append(row(label))

    callback = DiTPruning(method, **setting, calibration=calibration, distill=distill, quantize=quantize,
                          **(structure or {}), **prune_kwargs)
    trainer = Trainer(max_steps=steps, callbacks=[_Measure(), callback], accelerator="cpu", logger=False,
                      enable_checkpointing=False, enable_progress_bar=progress, enable_model_summary=False)
    with warnings.catch_warnings():  # the reference DiT trains in eval mode on purpose (no label dropout)
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
        trainer.fit(module, reference_dataloader(batch_size))
    if quantize:
        rows.append(row(f"{label} + {short}"))
    return model, rows
