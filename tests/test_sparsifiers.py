"""The torch.ao.pruning contract: prepare -> observe -> step -> squash_mask, and state_dict."""

import torch
from torch.ao.pruning import BaseSparsifier, FakeSparsity
from torch.nn.utils import parametrize

from ditprune import METHODS, WandaSparsifier
from ditprune.masks import unpack

from conftest import TwoLinear, linear_batches


def test_all_methods_are_base_sparsifiers():
    assert all(issubclass(cls, BaseSparsifier) for cls in METHODS.values())


def test_lifecycle_masks_live_in_fake_sparsity_until_squash():
    model = TwoLinear()
    dense = model.fc1.weight.detach().clone()
    sp = WandaSparsifier(sparsity=0.75)
    sp.prepare(model, [{"tensor_fqn": "fc1.weight"}])
    assert isinstance(model.fc1.parametrizations.weight[0], FakeSparsity)
    with sp.observe():
        for b in linear_batches():
            model(**b)
    assert "stats" in sp.state["fc1.weight"]
    sp.step()
    assert "stats" not in sp.state["fc1.weight"]  # freed once the mask is made
    mask = model.fc1.parametrizations.weight[0].mask
    assert mask.dtype == torch.bool and mask.sum().item() == 32 * 4  # 16 inputs, 4 kept per row
    assert torch.equal(model.fc1.weight, dense * mask)  # masked through the parametrization
    assert torch.equal(model.fc1.parametrizations.weight.original, dense)  # dense weight untouched
    packed = sp.state_dict()["state"]["fc1.weight"]["mask"]  # the packed buffer itself, one bit per weight
    assert packed.dtype == torch.uint8 and packed.numel() == 32 * 16 // 8
    assert torch.equal(unpack(packed, (32, 16)), mask)
    sp.squash_mask()
    assert not parametrize.is_parametrized(model.fc1)
    assert torch.equal(model.fc1.weight, dense * mask)


def test_restore_puts_back_dense_weights():
    model = TwoLinear()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sp = METHODS["sparsegpt"](sparsity=0.5)
    sp.prepare(model, [{"tensor_fqn": "fc1.weight"}, {"tensor_fqn": "fc2.weight"}])
    with sp.observe():
        for b in linear_batches():
            model(**b)
    sp.step()
    assert not torch.equal(model.fc1.parametrizations.weight.original, before["fc1.weight"])  # OBS updated
    sp.restore()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
