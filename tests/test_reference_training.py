"""The training scripts work (a few steps each); the shipped weights are not retrained here."""

import json

import torch

from ditprune.reference.nets import Denoiser
from ditprune.reference.train import main, train_generator, train_judge


def test_generators_train_a_few_steps():
    for kind in ("flux", "dit"):
        model, loss = train_generator(kind, steps=3, batch=8, progress=False)
        assert torch.isfinite(torch.tensor(loss)) and Denoiser(model).kind == kind


def test_judge_trains_and_the_cli_writes_atomically(tmp_path):
    judge, acc = train_judge(epochs=1, progress=False)
    assert 0.0 <= acc <= 1.0
    main(["dit", "--steps", "2", "--batch", "4", "--out", str(tmp_path / "dit")])
    record = json.loads((tmp_path / "dit" / "training.json").read_text())
    assert record["steps"] == 2 and "command" in record
    assert sorted(p.name for p in (tmp_path / "dit").iterdir()) == [
        "config.json", "diffusion_pytorch_model.safetensors", "training.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["dit"]  # no temporary leftovers
