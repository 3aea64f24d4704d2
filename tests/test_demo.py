"""`ditprune prune` (the README's main job) end to end, on a reduced setting."""

import json

from safetensors.torch import load_file

from ditprune.cli import main
from ditprune.reference import weights_dir


def test_demo_runs_end_to_end(tmp_path, capsys):
    shipped = load_file(str(weights_dir("flux") / "diffusion_pytorch_model.safetensors"))
    out = tmp_path / "demo"
    code = main(["-q", "prune", "evaluation.n_samples=20", "evaluation.steps=4", "calibration.num_prompts=4",
                 "calibration.steps=3", f"export.output_dir={out}"])
    assert code == 0
    text = capsys.readouterr().out
    for expected in ("| dense |", "| dit (recipe) |", "| wanda |", "judge acc", "FD", "PSNR", "samples:"):
        assert expected in text
    metrics = {r["method"]: r for r in json.loads((out / "metrics.json").read_text())}
    assert metrics["dit (recipe)"]["sparsity"] == 0.5 and metrics["wanda"]["sparsity"] == 0.5
    assert (out / "samples.png").stat().st_size > 1000
    pruned = load_file(str(out / "transformer" / "diffusion_pytorch_model.safetensors"))
    w = pruned["single_transformer_blocks.0.proj_out.weight"]
    assert (w == 0).float().mean().item() == 0.5
    assert "embedder" not in " ".join(k for k, v in pruned.items() if (v == 0).float().mean() > 0.4)
    after = load_file(str(weights_dir("flux") / "diffusion_pytorch_model.safetensors"))
    assert all((shipped[k] == after[k]).all() for k in shipped)  # shipped weights untouched


def test_recovery_recipe_runs_prune_recover_quantize(tmp_path, capsys):
    out = tmp_path / "rec"
    code = main(["-q", "prune", "configs/recovery_demo.yaml", "recovery.steps=3", "evaluation.n_samples=10",
                 "evaluation.steps=3", "calibration.num_prompts=4", "calibration.steps=2", f"export.output_dir={out}"])
    assert code == 0
    text = capsys.readouterr().out
    assert "| dit + 3 recovery steps |" in text and "| dit + 3 recovery steps + int8_weight_only |" in text
    assert "not exported" in text and not (out / "transformer").exists()
    rows = {r["method"]: r for r in json.loads((out / "metrics.json").read_text())}
    assert rows["dit + 3 recovery steps"]["sparsity"] == rows["dit (recipe)"]["sparsity"]
