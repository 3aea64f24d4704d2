"""DiTPruning in a Trainer.fit on the reference DiT: prune -> masked recovery -> squash -> int8."""


import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from ditprune import resolve_targets
from ditprune.callbacks import DiTPruning
from ditprune.errors import InputError
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


def _fit_with_checkpoint(tmp_path, method="magnitude", sparsity=0.6, steps=5):
    torch.manual_seed(0)
    module = ReferenceRecovery(load("dit"))
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=steps, save_last=False, save_top_k=-1)
    pruning = DiTPruning(method, sparsity=sparsity, distill=False)
    _trainer([pruning, ckpt], steps=steps, tmp_path=tmp_path).fit(module, reference_dataloader(32))
    return next(tmp_path.glob("*.ckpt")), pruning


def _target_keys(model, prefix="model."):
    return [f"{prefix}{name}.weight" for name in resolve_targets(model)]


def test_checkpoint_reload_keeps_the_masks(tmp_path):
    path, pruning = _fit_with_checkpoint(tmp_path)
    saved = torch.load(path, weights_only=True)
    keys = _target_keys(load("dit"))
    assert len(keys) == 28 and all(k in saved["state_dict"] for k in keys)  # plain keys, masks applied
    zeros = {k: saved["state_dict"][k] == 0 for k in keys}
    masks = saved["callbacks"]["DiTPruning"]["masks"]
    assert saved["callbacks"]["DiTPruning"]["method"] == "magnitude" and len(masks) == 28
    for k in keys:
        assert torch.equal(zeros[k], ~masks[k[len("model."):]]), k
    # 1) the checkpoint loads into a plain, unpruned module with the zeros in place
    fresh = ReferenceRecovery(load("dit"))
    fresh.load_state_dict(saved["state_dict"])
    assert _zero_fraction(fresh.model) == pytest.approx(0.6, abs=0.01)
    # 2) a resumed fit re-applies the same masks instead of pruning again, and trains masked
    resumed = ReferenceRecovery(load("dit"))
    again = DiTPruning("magnitude", sparsity=0.6, distill=True)
    _trainer([again], steps=10, tmp_path=tmp_path).fit(resumed, reference_dataloader(32), ckpt_path=path)
    assert again.report is None  # no second prune
    state = resumed.state_dict()
    compared = [k for k in keys if torch.equal(state[k] == 0, zeros[k])]
    assert compared == keys
    # the teacher is attached again, and it is the dense model the module was built from
    dense = load("dit")
    assert resumed.teacher is not None
    for k in keys:
        assert torch.equal(resumed.teacher.get_parameter(k[len("model."):]), dense.get_parameter(k[len("model."):]))


@pytest.mark.parametrize("change, message", [
    ({"sparsity": 0.5}, "pruned with sparsity=0.6, this DiTPruning asks sparsity=0.5"),
    ({"method": "wanda"}, "pruned with method='magnitude', this DiTPruning asks method='wanda'"),
])
def test_resume_with_other_settings_is_refused(tmp_path, change, message):
    path, _ = _fit_with_checkpoint(tmp_path)
    settings = {"method": "magnitude", "sparsity": 0.6} | change
    with pytest.raises(InputError, match=message):
        _trainer([DiTPruning(settings.pop("method"), **settings)], steps=8, tmp_path=tmp_path).fit(
            ReferenceRecovery(load("dit")), reference_dataloader(32), ckpt_path=path)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.__setitem__("transformer_blocks.9.ff.net.2.weight", torch.ones(64, 256, dtype=torch.bool)),
     "1 masks without a target"),
    (lambda m: m.pop("transformer_blocks.0.ff.net.2.weight"), "1 targets without a mask"),
    (lambda m: m.__setitem__("transformer_blocks.0.ff.net.2.weight", torch.ones(1, 256, dtype=torch.bool)),
     "has shape \\(1, 256\\), the model's weight \\(64, 256\\)"),
    (lambda m: m.update({k: torch.ones_like(v) for k, v in m.items()}), "prunes 0 of .* the masks do not match"),
    (lambda m: m.__setitem__("transformer_blocks.0.ff.net.2.weight", torch.rand(64, 256) > 0.2), "do not match"),
])
def test_resume_checks_masks_against_the_model(tmp_path, edit, message):
    path, _ = _fit_with_checkpoint(tmp_path)
    ckpt = torch.load(path, weights_only=True)
    edit(ckpt["callbacks"]["DiTPruning"]["masks"])
    torch.save(ckpt, path)
    with pytest.raises(InputError, match=message):
        _trainer([DiTPruning("magnitude", sparsity=0.6)], steps=8, tmp_path=tmp_path).fit(
            ReferenceRecovery(load("dit")), reference_dataloader(32), ckpt_path=path)


@pytest.mark.parametrize("key", ["method", "sparsity", "pattern"])
def test_resume_without_its_settings_is_refused(tmp_path, key):
    path, _ = _fit_with_checkpoint(tmp_path)
    ckpt = torch.load(path, weights_only=True)
    del ckpt["callbacks"]["DiTPruning"][key]
    torch.save(ckpt, path)
    with pytest.raises(InputError, match=f"no '{key}'"):
        _trainer([DiTPruning("magnitude", sparsity=0.6)], steps=8, tmp_path=tmp_path).fit(
            ReferenceRecovery(load("dit")), reference_dataloader(32), ckpt_path=path)


def test_checkpoint_saved_after_fit_still_resumes_masked(tmp_path):
    torch.manual_seed(0)
    module = ReferenceRecovery(load("dit"), lr=1e-3)
    pruning = DiTPruning("wanda", sparsity=0.5, calibration_batches=1, distill=False)
    trainer = _trainer([pruning], steps=3, tmp_path=tmp_path)
    trainer.fit(module, reference_dataloader(32))
    trainer.save_checkpoint(tmp_path / "after.ckpt")
    masks = torch.load(tmp_path / "after.ckpt", weights_only=True)["callbacks"]["DiTPruning"]["masks"]
    assert len(masks) == 28
    resumed = ReferenceRecovery(load("dit"), lr=1e-3)
    again = DiTPruning("wanda", sparsity=0.5, distill=False)
    _trainer([again], steps=20, tmp_path=tmp_path).fit(resumed, reference_dataloader(32),
                                                       ckpt_path=tmp_path / "after.ckpt")
    assert again.report is None and _zero_fraction(resumed.model) == 0.5  # fine-tuning revived nothing
    for fqn, m in masks.items():
        assert (resumed.model.get_parameter(fqn)[~m] == 0).all()


def test_int8_weight_only_keeps_zeros():
    module = ReferenceRecovery(load("dit"))
    pruning = DiTPruning("dit", sparsity=0.5, calibration_batches=2, distill=False, quantize="int8_weight_only")
    _trainer([pruning], steps=3).fit(module, reference_dataloader(32))
    masks = pruning.masks()
    assert len(masks) == len(pruning.report.layers) == 28
    for name in [r.name for r in pruning.report.layers]:
        w = module.model.get_submodule(name).weight
        assert type(w).__name__ == "Int8Tensor"
        dense = w.dequantize()
        keep = masks[f"{name}.weight"]
        assert (dense[~keep] == 0).all(), name  # every pruned zero is still zero
        assert 0.5 <= (dense == 0).float().mean().item() < 0.501, name  # int8 may round a tiny kept weight to 0
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
    with pytest.raises(TypeError, match="unknown option"):
        DiTPruning("dit", alfa=0.3)


class FailsAt(ReferenceRecovery):
    def __init__(self, *args, fail_at=1, **kw):
        super().__init__(*args, **kw)
        self.fail_at = fail_at

    def training_step(self, batch, batch_idx):
        if batch_idx == self.fail_at:
            raise RuntimeError("boom in training_step")
        return super().training_step(batch, batch_idx)


def test_a_failed_fit_leaves_a_plain_model_and_the_callback_fits_again(tmp_path):
    from torch.nn.utils import parametrize

    import ditprune

    torch.manual_seed(0)
    module = FailsAt(load("dit"), lr=3e-4)
    pruning = DiTPruning("wanda", sparsity=0.5, calibration_batches=1)
    with pytest.raises(RuntimeError, match="boom"), pytest.warns(UserWarning, match="the fit failed after pruning"):
        _trainer([pruning], steps=5).fit(module, reference_dataloader(16))
    model = module.model
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert not hasattr(module, "teacher") or module.teacher is None
    assert _zero_fraction(model) >= 0.5  # pruned (and partly trained) weights stay, as plain weights
    for fmt in ("diffusers", "compressed"):  # the model saves and loads as any other
        ditprune.save_transformer(model, tmp_path / fmt, fmt)
        assert _zero_fraction(ditprune.load_transformer(tmp_path / fmt)) == _zero_fraction(model)
    module.fail_at = -1  # the same callback, fitted again
    _trainer([pruning], steps=2).fit(module, reference_dataloader(16))
    assert pruning.report.sparsity == 0.5 and _zero_fraction(model) == 0.5
    assert not any(parametrize.is_parametrized(m) for m in model.modules())


def test_the_callback_allocates_sparsity_per_layer():
    torch.manual_seed(0)
    module = ReferenceRecovery(load("dit"))
    pruning = DiTPruning("wanda", sparsity=0.6, calibration_batches=2, distill=False, allocation="auto",
                         allocation_range=0.2)
    _trainer([pruning], steps=2).fit(module, reference_dataloader(32))
    layers = pruning.report.layers
    assert len({round(r.sparsity, 4) for r in layers}) > 1 and all(0.4 - 1e-9 <= r.sparsity <= 0.8 + 1e-9 for r in layers)
    zeros = sum(r.sparsity * r.shape[0] * r.shape[1] for r in layers)
    assert abs(zeros - 0.6 * sum(r.shape[0] * r.shape[1] for r in layers)) <= max(r.shape[0] for r in layers) / 2
    with pytest.raises(InputError, match="allocation must be one of"):
        DiTPruning("wanda", allocation="most")
