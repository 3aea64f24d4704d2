"""The hub/local-directory path, on a tiny DiT pipeline saved locally: real diffusers loading,
calibration on the pipeline's own sampler, pruning, export, and the CLI around it."""

import json

import pytest
import torch
from safetensors.torch import load_file

from ditprune.cli import main
from ditprune.errors import InputError
from ditprune.models.loading import load_pipeline, pipeline_calibration

from conftest import tree_bytes


def test_pipeline_calibration_records_every_transformer_call(tiny_pipeline_dir):
    pipe = load_pipeline(str(tiny_pipeline_dir), transformer_class="DiTTransformer2DModel")
    batches = pipeline_calibration(pipe, ["tabby", "pizza", "castle"], steps=3, guidance=4.0, batch_size=2,
                                   progress=False)
    assert len(batches) == 2 * 3  # two prompt chunks x three steps (cond+uncond batched in one call)
    assert set(batches[0]) >= {"hidden_states", "timestep", "class_labels"}
    assert batches[0]["hidden_states"].shape[0] == 2 * 2  # guidance > 1: both branches in one call
    with torch.no_grad():
        assert pipe.transformer(**batches[0]).sample.shape[0] == batches[0]["hidden_states"].shape[0]


def test_pipeline_calibration_refuses_what_does_not_apply(tiny_pipeline_dir):
    pipe = load_pipeline(str(tiny_pipeline_dir))
    with pytest.raises(InputError, match="resolution does not apply to a DiTPipeline"):
        pipeline_calibration(pipe, ["tabby"], steps=2, resolution=256, progress=False)
    with pytest.raises(InputError, match="'tabbby' is not a class name of this DiT"):
        pipeline_calibration(pipe, ["tabbby"], steps=2, progress=False)


def test_wrong_transformer_class_is_refused(tiny_pipeline_dir):
    with pytest.raises(InputError, match="holds a DiTTransformer2DModel"):
        load_pipeline(str(tiny_pipeline_dir), transformer_class="FluxTransformer2DModel")


def test_cli_prunes_a_local_pipeline_without_touching_it(tiny_pipeline_dir, tmp_path, capsys):
    before = tree_bytes(tiny_pipeline_dir)
    out = tmp_path / "out"
    code = main(["-q", "prune", "configs/dit_xl_256.yaml", f"model.source={tiny_pipeline_dir}", "model.device=cpu",
                 "calibration.num_prompts=4", "calibration.steps=2", "pruning.sparsity=0.6",
                 f"export.output_dir={out}"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "# resolved recipe" in printed and str(out) in printed
    assert tree_bytes(tiny_pipeline_dir) == before  # the user's pipeline is untouched, byte for byte
    pruned = load_file(str(out / "transformer" / "diffusion_pytorch_model.safetensors"))
    w = pruned["transformer_blocks.0.ff.net.2.weight"]
    assert (w == 0).sum().item() == int(w.shape[1] * 0.6) * w.shape[0]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["sparsity"] == pytest.approx(0.6, abs=0.01) and metrics["calibration_batches"] == 2
    assert (out / "recipe.yaml").read_text().count("sparsity: 0.6") == 1
    assert sorted(p.name for p in out.iterdir()) == [".ditprune.json", "metrics.json", "recipe.yaml", "report.txt",
                                                     "transformer"]
