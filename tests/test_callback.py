"""DiTPruning in a Trainer.fit on the reference DiT: prune -> masked recovery -> squash -> int8."""


import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from ditprune import resolve_targets
from ditprune.callbacks import DiTPruning
from ditprune.recovery import ReferenceRecovery, reference_dataloader
from ditprune.reference import load


def _trainer(callbacks, steps, tmp_path=None, **kw):
    return Trainer(max_steps=steps, callbacks=callbacks, accelerator="cpu", logger=False, enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=tmp_path is not None,
                   default_root_dir=tmp_path, **kw)


def _zero_fraction(model):
    ws = [m.weight for m in resolve_targets(model).values()]
    return sum((w == 0).sum().item() for w in ws) / sum(w.numel() for w in ws)


class DistillProbe(Callback):
    """Distillation loss on fixed batches right after pruning and at the end of training."""

    def __init__(self):
        self.losses = []

    def _measure(self, pl_module):
        batches = list(reference_dataloader(64, seed=123))[:3]
        gen = pl_module._gen
        pl_module._gen = torch.Generator().manual_seed(7)
        with torch.no_grad():
            self.losses.append(sum(pl_module.loss(b).item() for b in batches))
        pl_module._gen = gen

    def on_train_start(self, trainer, pl_module):
        self._measure(pl_module)

    def on_train_end(self, trainer, pl_module):
        self._measure(pl_module)


def test_prune_then_recover_keeps_sparsity_and_lowers_distillation_loss():
    torch.manual_seed(0)
    module = ReferenceRecovery(load("dit"), lr=3e-4)
    pruning, probe = DiTPruning("wanda", sparsity=0.5, calibration_batches=2), DistillProbe()
    seen = {}

    class Mid(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            seen.setdefault("mid", _zero_fraction(pl_module.model))

    _trainer([pruning, probe, Mid()], steps=40).fit(module, reference_dataloader(32))
    assert pruning.report.sparsity == 0.5  # right after pruning
    assert seen["mid"] == 0.5  # during recovery: gradients do not revive pruned weights
    assert _zero_fraction(module.model) == 0.5  # after squash
    assert probe.losses[1] < probe.losses[0]
    assert module.teacher is not None and "teacher.pos_embed" not in str(module.state_dict().keys())


def test_checkpoint_reload_keeps_the_masks(tmp_path):
    torch.manual_seed(0)
    module = ReferenceRecovery(load("dit"))
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=5, save_last=False, save_top_k=-1)
    pruning = DiTPruning("magnitude", sparsity=0.6, distill=False)
    _trainer([pruning, ckpt], steps=5, tmp_path=tmp_path).fit(module, reference_dataloader(32))
    path = next(tmp_path.glob("*.ckpt"))
    saved = torch.load(path, weights_only=True)
    zeros = {k: v == 0 for k, v in saved["state_dict"].items() if "transformer_blocks" in k and k.endswith("weight")}
    # 1) the checkpoint loads into a plain, unpruned module with the zeros in place
    fresh = ReferenceRecovery(load("dit"))
    fresh.load_state_dict(saved["state_dict"])
    assert _zero_fraction(fresh.model) == pytest.approx(0.6, abs=0.01)
    # 2) a resumed fit re-applies the same masks instead of pruning again
    resumed = ReferenceRecovery(load("dit"))
    again = DiTPruning("magnitude", sparsity=0.6, distill=False)
    _trainer([again], steps=10, tmp_path=tmp_path).fit(resumed, reference_dataloader(32), ckpt_path=path)
    assert again.report is None  # no second prune
    state = resumed.state_dict()
    for key, was_zero in zeros.items():
        if key.startswith("model.") and key in state and "norm1.emb" not in key:
            assert torch.equal(state[key] == 0, was_zero), key


def test_int8_weight_only_keeps_zeros():
    module = ReferenceRecovery(load("dit"))
    pruning = DiTPruning("dit", sparsity=0.5, calibration_batches=2, distill=False, quantize="int8_weight_only")
    _trainer([pruning], steps=3).fit(module, reference_dataloader(32))
    for name in [r.name for r in pruning.report.layers]:
        w = module.model.get_submodule(name).weight
        dense = w.dequantize()
        assert (dense == 0).float().mean().item() == 0.5, name
    x = module.calibration_inputs(next(iter(reference_dataloader(8))))[0]
    with torch.no_grad():
        assert torch.isfinite(module.model(**x).sample).all()


def test_callback_validates_its_arguments():
    with pytest.raises(ValueError, match="sparsity"):
        DiTPruning("wanda", sparsity=1.2)
    with pytest.raises(TypeError, match="name such as"):
        DiTPruning(DiTPruning)
    with pytest.raises(ValueError, match="unknown quantization"):
        DiTPruning("wanda", quantize="int3")
    with pytest.raises(ValueError, match="calibration_batches"):
        DiTPruning("wanda", calibration_batches=0)
