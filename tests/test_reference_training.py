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
    assert acc > 0.4  # one epoch learns (0.58 with the fixed seed; chance is 0.1)
    main(["dit", "--steps", "2", "--batch", "4", "--out", str(tmp_path / "dit")])
    record = json.loads((tmp_path / "dit" / "training.json").read_text())
    assert record["steps"] == 2 and "command" in record
    assert sorted(p.name for p in (tmp_path / "dit").iterdir()) == [
        ".ditprune.json", "config.json", "diffusion_pytorch_model.safetensors", "training.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["dit"]  # no temporary leftovers
