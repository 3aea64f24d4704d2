"""``ditprune.callbacks.DiTPruning``: prune -> masked recovery fine-tune -> squash -> [quantize],
all inside one ``Trainer.fit``, single process or under Lightning's DDP."""

from __future__ import annotations

import copy
import logging
from typing import Any, Iterable, Sequence

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from ditprune.errors import InputError, InputTypeError
from ditprune.granularity import prune_count
from ditprune.pruning import PrunePlan, compile_regexes, make_sparsifier

__all__ = ["DiTPruning"]

log = logging.getLogger(__name__)


class DiTPruning(Callback):
    """Prune the LightningModule's DiT when training starts, keep the masks fixed while it
    fine-tunes, bake them in at the end, then optionally quantize with torchao.

    The LightningModule must hold the DiT as ``model_attr`` (default ``module.model``) and either
    yield training batches that are dicts for ``model(**batch)`` or define
    ``calibration_inputs(batch) -> list[dict]``; with ``distill=True`` it finds a frozen dense copy
    of the DiT as ``module.teacher`` (not a submodule: never trained nor saved) for its loss.

    Lifecycle:
      - ``setup``: the dense teacher is copied and all-ones masks (one bit per weight) are attached,
        before the strategy wraps the model (DDP sees the final parameters: no
        ``find_unused_parameters``);
      - ``on_train_start``: calibration on the first ``calibration_batches`` training batches of
        each rank (or ``calibration=``); under DDP the statistics are summed over the ranks and
        rank 0's masks broadcast, so every rank holds the same masks. The masks are written in
        place; gradients never revive a pruned weight;
      - checkpoints hold plain weights (masks applied: they load into an unpruned model) and, in
        this callback's state, the masks, method and sparsity. Resuming checks them against the
        model and this callback's settings (names, shapes, method, sparsity: a mismatch is an
        error) and re-applies the masks instead of pruning again; the teacher is the model as the
        module held it before the checkpoint loaded, so build the module from the dense weights;
      - ``on_train_end``: squash the masks into the weights, then ``quantize`` (a torchao config
        name, see :func:`ditprune.quantize.quantize`). The masks stay in the callback's state,
        so a checkpoint written after ``fit`` still resumes masked.

    Args:
        method, sparsity, pattern, targets, ignore, overrides, block_sequential, offload, backup,
            allocation, allocation_range, allocation_options, max_dense, **method_options: as
            :func:`ditprune.prune`.
        model_attr: attribute of the LightningModule holding the DiT (None: the module itself).
        calibration: calibration batches (dicts for ``model(**batch)``) to use instead of the
            first training batches, e.g. the sampler trajectories that ``ditprune prune`` uses.
        calibration_batches: how many training batches calibrate (when ``calibration`` is None).
        distill: attach a frozen dense copy as ``pl_module.teacher`` for a distillation loss.
        quantize: torchao config name applied at the end (None: no quantization).
        structure, structure_sparsity, structure_method: first remove that fraction of whole heads
            and/or MLP channels (:func:`ditprune.structuring.prune_structured`), in ``setup``,
            before the masks are attached and before the optimizer and DDP see the parameters
            (so it needs ``calibration=``, except with ``"magnitude"``); the unstructured prune
            then works on what remains. The teacher is the dense model.

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
        overrides: Sequence[dict] | None = None,
        model_attr: str | None = "model",
        calibration: Iterable[dict] | None = None,
        calibration_batches: int = 8,
        distill: bool = True,
        quantize: str | None = None,
        block_sequential: bool | None = None,
        offload: str | torch.device | None = None,
        backup: bool = True,
        allocation: str = "uniform",
        allocation_range: float = 0.2,
        allocation_options: dict | None = None,
        max_dense: float = 0.0,
        structure: str | None = None,
        structure_sparsity: float = 0.25,
        structure_method: str = "obs",
        **method_options: Any,
    ) -> None:
        if structure is not None:
            from ditprune.structuring import check_settings

            check_settings(structure, structure_sparsity, structure_method)
            if calibration is None and structure_method != "magnitude":
                raise InputError("structure: heads and channels are removed in setup, before the optimizer sees the "
                                 "parameters, where no training batch is at hand: pass calibration=...")
        self.structure = (dict(structure=structure, sparsity=structure_sparsity, method=structure_method)
                          if structure is not None else None)
        self.structured = None  # its StructuredReport, once done
        if isinstance(method, type) or not isinstance(method, str):
            raise InputTypeError(f"method is a name such as 'dit' or 'wanda', got {method!r}")
        if not isinstance(calibration_batches, int) or calibration_batches < 1:
            raise InputError(f"calibration_batches must be a positive int, got {calibration_batches!r}")
        if quantize is not None:
            from ditprune.quantize import check_config

            check_config(quantize)
        make_sparsifier(method, sparsity, pattern, **method_options)  # validates early: errors at construction
        from ditprune.allocating import check as check_allocation

        check_allocation(allocation, allocation_range, allocation_options, pattern, max_dense)
        self.allocation = dict(allocation=allocation, allocation_range=allocation_range,
                               allocation_options=allocation_options, max_dense=max_dense)
        for what, patterns in (("targets", targets), ("ignore", ignore)):
            if patterns is not None:
                compile_regexes(patterns, what)
        self.method, self.sparsity, self.pattern = method, sparsity, pattern
        self.targets, self.ignore, self.overrides = targets, ignore, overrides
        if not isinstance(backup, bool):
            raise InputTypeError(f"backup is True or False, got {backup!r}")
        self.block_sequential, self.offload, self.method_options = block_sequential, offload, method_options
        self.backup = backup
        self.model_attr, self.calibration_batches = model_attr, calibration_batches
        self.calibration = list(calibration) if calibration is not None else None
        self.distill, self.quantize = distill, quantize
        self.plan: PrunePlan | None = None
        self.report = None
        self._masks: dict[str, torch.Tensor] | None = None  # kept after squash, for checkpoints
        self._restored = False
        self._hooks: list = []
        self._teacher: nn.Module | None = None
        self._prefix = ""

    # -- hooks (thin; each delegates) ---------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self._attach(pl_module)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume(state_dict)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._restored and self._masks is None:
            self._prune(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._finish(trainer, pl_module)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._abandon(pl_module)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        self._plain_state_dict(checkpoint["state_dict"])

    def state_dict(self) -> dict[str, Any]:
        masks = self.masks()
        if masks is None:
            return {}
        return {"method": self.method, "sparsity": self.sparsity, "pattern": self.pattern, "masks": masks}

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

    def _attach(self, pl_module: LightningModule) -> None:
        if self.plan is not None:  # a second fit with the same callback: masks are already there
            return
        model = self._model(pl_module)
        if self.distill:
            self._teacher = copy.deepcopy(model).eval().requires_grad_(False)
            object.__setattr__(pl_module, "teacher", self._teacher)  # not a submodule: never trained nor saved
        if self.structure is not None and self.structured is None:
            from ditprune.structuring import prune_structured

            s = self.structure
            self.structured = prune_structured(model, self.calibration or [], s["structure"], s["sparsity"],
                                               s["method"], offload=self.offload)
        self.plan = PrunePlan(model, self.method, self.sparsity, self.pattern, self.targets, ignore=self.ignore,
                              overrides=self.overrides, block_sequential=self.block_sequential,
                              backup=self.backup, **self.allocation, **self.method_options)
        self.plan.attach()
        self._prefix = f"{self.model_attr}." if self.model_attr else ""
        for g in self.plan.sparsifier.groups:
            self._hooks.append(g["module"].register_load_state_dict_pre_hook(_plain_keys_loader(g["tensor_name"])))

    def _calibration(self, trainer: Trainer, pl_module: LightningModule) -> list[dict]:
        if self.calibration is not None:
            return self.calibration
        batches = []
        for i, batch in enumerate(trainer.train_dataloader):
            if i == self.calibration_batches:
                break
            batch = pl_module.transfer_batch_to_device(batch, pl_module.device, 0)
            if hasattr(pl_module, "calibration_inputs"):
                batches.extend(pl_module.calibration_inputs(batch))
            elif isinstance(batch, dict):
                batches.append(batch)
            else:
                raise InputTypeError(
                    "training batches are not dicts for model(**batch): define "
                    "calibration_inputs(self, batch) -> list[dict] on the LightningModule"
                )
        return batches

    def _prune(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log(trainer, "before pruning")
        self.plan.calibrate(self._calibration(trainer, pl_module), offload=self.offload)
        self.report = self.plan.report()
        self._log(trainer, "after pruning")

    def _resume(self, state: dict[str, Any]) -> None:
        """Check a checkpoint's masks against the model and these settings, then apply them."""
        masks = state.get("masks")
        if not masks:
            return  # a checkpoint from before pruning: prune as usual at train start
        if self.plan is None:
            raise InputError("DiTPruning state loaded outside of a fit: resume with trainer.fit(..., ckpt_path=...)")
        asked = {"method": self.method, "sparsity": self.sparsity, "pattern": self.pattern}
        for key, value in asked.items():
            if key not in state:
                raise InputError(f"the checkpoint's DiTPruning state has masks but no {key!r}: it was not written by "
                                 "DiTPruning; start a new fit from the dense model")
            if state[key] != value:
                raise InputError(f"the checkpoint was pruned with {key}={state[key]!r}, this DiTPruning asks "
                                 f"{key}={value!r}: resume with the checkpoint's settings, or start a new fit from "
                                 "the dense model")
        groups = {g["tensor_fqn"]: g for g in self.plan.sparsifier.groups}
        missing, extra = sorted(set(groups) - set(masks)), sorted(set(masks) - set(groups))
        if missing or extra:
            raise InputError(f"the checkpoint's masks do not fit this model's targets: "
                             f"{len(missing)} targets without a mask (e.g. {missing[:2]}), "
                             f"{len(extra)} masks without a target (e.g. {extra[:2]})")
        for fqn, mask in masks.items():
            shape = groups[fqn]["module"].parametrizations[groups[fqn]["tensor_name"]][0].shape
            if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != shape:
                raise InputError(f"the checkpoint's mask for '{fqn}' has shape {tuple(getattr(mask, 'shape', ()))}, "
                                 f"the model's weight {shape}")
            _check_mask(fqn, mask.to(torch.bool), self.plan.settings[groups[fqn]["module_fqn"]])
        for fqn, mask in masks.items():
            g = groups[fqn]
            g["module"].parametrizations[g["tensor_name"]][0].mask = mask.to(torch.bool)
        self._restored = True
        self._check_teacher(masks)
        rank_zero_info(f"ditprune: {len(masks)} masks restored from the checkpoint ({self.method}, "
                       f"{self.pattern or self.sparsity}); not pruning again")

    def _check_teacher(self, masks: dict[str, torch.Tensor]) -> None:
        teacher = self._teacher
        if teacher is None:
            return
        pruned_already = all(
            (teacher.get_submodule(fqn.rsplit(".", 1)[0]).weight[~m.to(torch.bool)] == 0).all() for fqn, m in masks.items()
        )
        if pruned_already:
            rank_zero_warn("ditprune: the distillation teacher already has the pruned zeros: build the "
                           "LightningModule from the dense weights before resuming, or distill=False")

    def _finish(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.plan is None or self._masks is not None:
            return
        self._log(trainer, "after recovery")
        self._masks = self.masks()
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self.plan.squash()
        if self.quantize is not None:
            from ditprune.quantize import quantize

            quantize(self._model(pl_module), self.quantize, targets=[g["module_fqn"] for g in self.plan.sparsifier.groups])

    def _abandon(self, pl_module: LightningModule) -> None:
        """A fit that failed: no parametrization, hook or teacher stays on the model. Once pruned,
        the masks are baked into the weights as they stand (a plain model that saves and loads);
        before that, the model is as it was. A later fit with this callback starts afresh."""
        if self.plan is None or self._masks is not None:
            return
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if self.report is not None or self._restored:
            self.plan.squash()
            rank_zero_warn("ditprune: the fit failed after pruning; the model keeps its pruned weights as they "
                           "stood (masks baked in)")
        else:
            self.plan.restore()
        self.plan, self.report, self._restored, self._teacher = None, None, False, None
        if getattr(pl_module, "teacher", None) is not None:
            object.__setattr__(pl_module, "teacher", None)

    def masks(self) -> dict[str, torch.Tensor] | None:
        """tensor_fqn -> bool mask (True = kept) of every pruned weight; None before pruning."""
        if self._masks is not None:
            return self._masks
        if self.plan is None or not (self._restored or self.report is not None):
            return None
        return {g["tensor_fqn"]: g["module"].parametrizations[g["tensor_name"]][0].mask.bool().cpu()
                for g in self.plan.sparsifier.groups}

    def _plain_state_dict(self, state_dict: dict) -> None:
        """``a.parametrizations.weight.original`` -> ``a.weight`` with the mask applied, in place."""
        if self.plan is None or self._masks is not None:
            return
        for g in self.plan.sparsifier.groups:
            fqn, name = g["module_fqn"], g["tensor_name"]
            key = f"{self._prefix}{fqn}.parametrizations.{name}.original"
            if key in state_dict:
                original = state_dict.pop(key)
                mask = g["module"].parametrizations[name][0].mask.to(original.device, torch.bool)
                state_dict[f"{self._prefix}{fqn}.{name}"] = original.masked_fill(~mask, 0.0)  # +0.0, never -0.0

    def _log(self, trainer: Trainer, when: str) -> None:
        """One line on the console (rank zero); per-layer sparsity to the trainer's logger and
        to the ``ditprune`` Python logger at DEBUG."""
        rows = {g["module_fqn"]: 1.0 - g["module"].weight.count_nonzero().item() / g["module"].weight.numel()
                for g in self.plan.sparsifier.groups}
        total = sum(g["module"].weight.numel() for g in self.plan.sparsifier.groups)
        zeros = sum(r * g["module"].weight.numel() for r, g in zip(rows.values(), self.plan.sparsifier.groups))
        rank_zero_info(f"ditprune: {when} ({self.method}, {self.pattern or self.sparsity}): {len(rows)} layers, "
                       f"sparsity {zeros / max(total, 1):.4f}")
        for name, s in rows.items():
            log.debug("sparsity %s %s: %.4f", when, name, s)
        if trainer.logger is not None and trainer.is_global_zero:
            trainer.logger.log_metrics({f"sparsity/{when.replace(' ', '_')}/{n}": s for n, s in rows.items()},
                                       step=trainer.global_step)


def _check_mask(fqn: str, keep: torch.Tensor, setting: dict) -> None:
    """A resumed mask must be one this setting could have made: N:M valid in every group, or at
    least the per-row count pruned (a method may prune more, e.g. SparseGPT's dead inputs)."""
    out, cols = keep.shape
    if setting["nm"] is not None:
        n, m = setting["nm"]
        if cols % m or (keep.reshape(out, -1, m).sum(-1) > n).any():
            raise InputError(f"the checkpoint's mask for '{fqn}' is not {n}:{m}: resume with the checkpoint's "
                             "settings, or start a new fit from the dense model")
        return
    need = out * prune_count(cols, setting["sparsity"])
    if int((~keep).sum()) < need:
        raise InputError(f"the checkpoint's mask for '{fqn}' prunes {int((~keep).sum())} of {keep.numel()} weights, "
                         f"sparsity {setting['sparsity']} prunes at least {need}: the masks do not match their settings")


def _plain_keys_loader(tensor_name: str):
    """A load_state_dict pre-hook for a parametrized module: checkpoints hold ``prefix.weight``
    (masked); the module expects ``prefix.parametrizations.weight.original`` (the packed mask
    buffer is not persistent: the masks travel in the callback's state)."""

    def hook(module, state_dict, prefix, *args):
        plain = prefix + tensor_name
        if plain in state_dict:
            state_dict[f"{prefix}parametrizations.{tensor_name}.original"] = state_dict.pop(plain)

    return hook
