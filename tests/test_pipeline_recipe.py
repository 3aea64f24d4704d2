"""The hub/local-directory path, on a tiny DiT pipeline saved locally: real diffusers loading,
calibration on the pipeline's own sampler, pruning, export, and the CLI around it."""

import json

import pytest
import torch
from safetensors.torch import load_file

from ditprune.cli import main
from ditprune.models.loading import load_pipeline, pipeline_calibration
from ditprune.models.tiny import tiny_model


@pytest.fixture(scope="module")
def tiny_pipeline_dir(tmp_path_factory):
    import diffusers

    path = tmp_path_factory.mktemp("tiny_dit_pipeline")
    transformer = tiny_model("dit")
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                                  up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), latent_channels=4,
                                  norm_num_groups=4, sample_size=8)
    scheduler = diffusers.DDIMScheduler()
    id2label = {str(i): name for i, name in enumerate(["golden retriever", "tabby", "goldfish", "volcano",
                                                         "espresso", "castle", "pizza", "daisy", "tench", "robin"])}
    diffusers.DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler, id2label=id2label).save_pretrained(path)
    index = json.loads((path / "model_index.json").read_text())  # as on the hub: labels live in model_index.json
    (path / "model_index.json").write_text(json.dumps({**index, "id2label": id2label}))
    return path


def test_pipeline_calibration_records_every_transformer_call(tiny_pipeline_dir):
    pipe = load_pipeline(str(tiny_pipeline_dir), transformer_class="DiTTransformer2DModel")
    batches = pipeline_calibration(pipe, ["tabby", "pizza", "castle"], steps=3, guidance=4.0, resolution=8,
                                   batch_size=2, progress=False)
    assert len(batches) == 2 * 3  # two prompt chunks x three steps (cond+uncond batched in one call)
    assert set(batches[0]) >= {"hidden_states", "timestep", "class_labels"}
    with torch.no_grad():
        assert pipe.transformer(**batches[0]).sample.shape[0] == batches[0]["hidden_states"].shape[0]


def test_wrong_transformer_class_is_refused(tiny_pipeline_dir):
    with pytest.raises(ValueError, match="holds a DiTTransformer2DModel"):
        load_pipeline(str(tiny_pipeline_dir), transformer_class="FluxTransformer2DModel")


def test_cli_prunes_a_local_pipeline_without_touching_it(tiny_pipeline_dir, tmp_path, capsys):
    source = tiny_pipeline_dir / "transformer" / "diffusion_pytorch_model.safetensors"
    before = load_file(str(source))
    out = tmp_path / "out"
    code = main(["-q", "prune", "configs/dit_xl_256.yaml", f"model.source={tiny_pipeline_dir}", "model.device=cpu",
                 "calibration.num_prompts=4", "calibration.steps=2", "pruning.sparsity=0.6",
                 f"export.output_dir={out}"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "# resolved recipe" in printed and str(out) in printed
    after = load_file(str(source))
    assert all(torch.equal(before[k], after[k]) for k in before)  # the user's weights are untouched
    pruned = load_file(str(out / "transformer" / "diffusion_pytorch_model.safetensors"))
    w = pruned["transformer_blocks.0.ff.net.2.weight"]
    assert (w == 0).sum().item() == int(w.shape[1] * 0.6) * w.shape[0]
    assert json.loads((out / "metrics.json").read_text())["sparsity"] == pytest.approx(0.6, abs=0.01)
    assert (out / "recipe.yaml").read_text().count("sparsity: 0.6") == 1


def test_cli_reports_a_misspelled_key(capsys):
    assert main(["prune", "configs/demo.yaml", "pruning.sparsty=0.6"]) == 2
    assert "did you mean 'pruning.sparsity'" in capsys.readouterr().err
