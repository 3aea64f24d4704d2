"""``ditprune.callbacks.DiTPruning``: prune -> masked recovery fine-tune -> squash -> [quantize],
all inside one ``Trainer.fit``."""

from __future__ import annotations

import copy
from typing import Any, Iterable, Sequence

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.nn.utils import parametrize

from ditprune.pruning import make_sparsifier, prune, resolve_targets

__all__ = ["DiTPruning"]


class DiTPruning(Callback):
    """Prune the LightningModule's DiT at the start of training, keep the masks fixed while it
    fine-tunes, bake them in at the end, then optionally quantize with torchao.

    Lifecycle:
      - ``on_train_start``: calibrate on the first ``calibration_batches`` training batches (each
        turned into ``model(**inputs)`` calls by ``pl_module.calibration_inputs(batch)``, or fed
        as is when the batch is already a dict), keep a frozen dense copy as
        ``pl_module.teacher`` when ``distill``, then prune with the masks left as ``FakeSparsity``
        parametrizations: gradients never revive a pruned weight;
      - checkpoints hold plain weights (masks applied) and the masks in this callback's state, so
        they load into an unpruned model with the zeros in place, and a resumed fit re-applies
        the same masks instead of pruning again;
      - ``on_train_end``: squash the masks into the weights, then ``quantize`` (a torchao config
        name, see :func:`ditprune.quantize.quantize`).

    Args:
        method, sparsity, pattern, targets, ignore, block_sequential, **method_options: as
            :func:`ditprune.prune`.
        model_attr: attribute of the LightningModule holding the DiT (None: the module itself).
        calibration: calibration batches (dicts for ``model(**batch)``) to use instead of the
            first training batches, e.g. the sampler trajectories that ``ditprune prune`` uses.
        calibration_batches: how many training batches calibrate (when ``calibration`` is None).
        distill: attach a frozen dense copy as ``pl_module.teacher`` for a distillation loss.
        quantize: torchao config name applied at the end (None: no quantization).

    Example::

        trainer = Trainer(max_steps=200, callbacks=[DiTPruning(method="dit", sparsity=0.5)])
        trainer.fit(module, dataloader)
    """

    def __init__(
        self,
        method: str = "dit",
        sparsity: float = 0.5,
        pattern: str | None = None,
        targets: Sequence[str] | None = None,
        ignore: Sequence[str] | None = None,
        *,
        model_attr: str | None = "model",
        calibration: Iterable[dict] | None = None,
        calibration_batches: int = 8,
        distill: bool = True,
        quantize: str | None = None,
        block_sequential: bool | None = None,
        **method_options: Any,
    ) -> None:
        if isinstance(method, type) or not isinstance(method, str):
            raise TypeError(f"method is a name such as 'dit' or 'wanda', got {method!r}")
        if not isinstance(calibration_batches, int) or calibration_batches < 1:
            raise ValueError(f"calibration_batches must be a positive int, got {calibration_batches!r}")
        if quantize is not None:
            from ditprune.quantize import check_config

            check_config(quantize)
        make_sparsifier(method, sparsity, pattern, **method_options)  # validates early: errors at construction
        self.method, self.sparsity, self.pattern = method, sparsity, pattern
        self.targets, self.ignore, self.block_sequential = targets, ignore, block_sequential
        self.method_options = method_options
        self.model_attr, self.calibration_batches = model_attr, calibration_batches
        self.calibration = list(calibration) if calibration is not None else None
        self.distill, self.quantize = distill, quantize
        self.sparsifier = None
        self.report = None
        self._restored_masks: dict[str, torch.Tensor] | None = None

    # -- hooks (thin; each delegates) ---------------------------------------------------------
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._restored_masks is not None:
            self._reapply(pl_module)
        else:
            self._prune(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._finish(pl_module)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        self._plain_state_dict(checkpoint["state_dict"])

    def state_dict(self) -> dict[str, Any]:
        return {"masks": self.masks()} if self.sparsifier is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored_masks = state_dict.get("masks")

    # -- work ---------------------------------------------------------------------------------
    def _model(self, pl_module: LightningModule) -> nn.Module:
        if self.model_attr is None:
            return pl_module
        model = getattr(pl_module, self.model_attr, None)
        if not isinstance(model, nn.Module):
            raise AttributeError(
                f"the LightningModule has no nn.Module attribute '{self.model_attr}'; pass "
                "DiTPruning(model_attr=...) naming the DiT, or model_attr=None to prune the module itself"
            )
        return model

    def _calibration(self, trainer: Trainer, pl_module: LightningModule) -> Iterable[dict]:
        if self.calibration is not None:
            return self.calibration
        loader = trainer.train_dataloader
        batches = []
        for i, batch in enumerate(loader):
            if i == self.calibration_batches:
                break
            batch = pl_module.transfer_batch_to_device(batch, pl_module.device, 0)
            if hasattr(pl_module, "calibration_inputs"):
                batches.extend(pl_module.calibration_inputs(batch))
            elif isinstance(batch, dict):
                batches.append(batch)
            else:
                raise TypeError(
                    "training batches are not dicts for model(**batch): define "
                    "calibration_inputs(self, batch) -> list[dict] on the LightningModule"
                )
        return batches

    def _prune(self, trainer: Trainer, pl_module: LightningModule) -> None:
        model = self._model(pl_module)
        self._log("before pruning", resolve_targets(model, self.targets, self.ignore).items())
        calibration = self._calibration(trainer, pl_module)
        if self.distill:
            teacher = copy.deepcopy(model).eval().requires_grad_(False)
            object.__setattr__(pl_module, "teacher", teacher)  # not a submodule: never trained nor saved
        self.report = prune(
            model, calibration, self.method, self.sparsity, self.pattern, self.targets, ignore=self.ignore,
            block_sequential=self.block_sequential, squash=False, **self.method_options,
        )
        self.sparsifier = self.report.sparsifier
        self._log("after pruning")

    def _reapply(self, pl_module: LightningModule) -> None:
        model = self._model(pl_module)
        self.sparsifier = make_sparsifier(self.method, self.sparsity, self.pattern)
        config = [{"tensor_fqn": fqn} for fqn in self._restored_masks]
        self.sparsifier.prepare(model, config)
        for g in self.sparsifier.groups:
            mask = g["module"].parametrizations[g["tensor_name"]][0].mask
            mask.copy_(self._restored_masks[g["tensor_fqn"]].to(mask.device, mask.dtype))
        self._restored_masks = None
        self._log("masks restored from checkpoint")

    def _finish(self, pl_module: LightningModule) -> None:
        if self.sparsifier is None:
            return
        self._log("after recovery")
        self.sparsifier.squash_mask()
        if self.quantize is not None:
            from ditprune.quantize import quantize

            quantize(self._model(pl_module), self.quantize, targets=[g["module_fqn"] for g in self.sparsifier.groups])

    def masks(self) -> dict[str, torch.Tensor]:
        """tensor_fqn -> bool mask (True = kept) of every pruned weight."""
        return {g["tensor_fqn"]: g["module"].parametrizations[g["tensor_name"]][0].mask.bool().cpu()
                for g in self.sparsifier.groups if parametrize.is_parametrized(g["module"], g["tensor_name"])}

    def _plain_state_dict(self, state_dict: dict) -> None:
        """``a.parametrizations.weight.original`` -> ``a.weight`` with the mask applied, in place."""
        if self.sparsifier is None:
            return
        prefix = f"{self.model_attr}." if self.model_attr else ""
        for fqn, mask in self.masks().items():
            module_fqn, name = fqn.rsplit(".", 1)
            key = f"{prefix}{module_fqn}.parametrizations.{name}.original"
            if key in state_dict:
                original = state_dict.pop(key)
                state_dict[f"{prefix}{fqn}"] = original * mask.to(original.device, original.dtype)

    def _log(self, when: str, layers=None) -> None:
        """Per-layer sparsity, from rank zero only."""
        if layers is None:
            layers = [(g["module_fqn"], g["module"]) for g in self.sparsifier.groups]
        rows = [f"  {name:50s} {1.0 - m.weight.count_nonzero().item() / m.weight.numel():.4f}" for name, m in layers]
        rank_zero_info(f"ditprune: per-layer sparsity {when} ({self.method})\n" + "\n".join(rows))
