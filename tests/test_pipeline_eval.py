"""Judging a pruned pipeline: generation on the same prompts and seeds, CLIP score, Fréchet
distances, PSNR/SSIM with intervals, strict JSON, resumable caches, and the same numbers on 2
processes (Lightning Fabric, gloo) as on one. A tiny FLUX pipeline and a tiny CLIP, built offline."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from ditprune.cli import main
from ditprune.evaluation.pipeline import bootstrap, frechet, read_eval_prompts
from ditprune.models.tiny import save_tiny_clip, save_tiny_flux_pipeline


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    return save_tiny_flux_pipeline(tmp_path_factory.mktemp("tiny_flux") / "pipe")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("tiny_clip") / "clip")


def _flux_args(flux_dir, out, *extra, method="wanda"):
    return ["flux_dev", f"model.source={flux_dir}", "model.device=cpu", "model.dtype=float32",
            "calibration.num_prompts=4", "calibration.steps=2", "calibration.resolution=16", f"pruning.method={method}",
            f"export.output_dir={out}", *extra]


def _eval_keys(clip_dir, n=4):
    return [f"evaluation.clip_model={clip_dir}", f"evaluation.num_prompts={n}", "evaluation.steps=2",
            "evaluation.resolution=32", "evaluation.batch_size=2"]


def _strict(path):
    def refuse(name):
        raise ValueError(name)

    return json.loads(path.read_text(), parse_constant=refuse)


def test_prompts_from_mjhq_metadata_and_text(tmp_path):
    (tmp_path / "meta_data.json").write_text(json.dumps({"b2": {"prompt": "a red fox", "category": "animals"},
                                                         "a1": {"prompt": "a blue car", "category": "vehicles"}}))
    assert read_eval_prompts(tmp_path / "meta_data.json") == ["a blue car", "a red fox"]
    (tmp_path / "p.txt").write_text("one\n\ntwo\nthree\n")
    assert read_eval_prompts(tmp_path / "p.txt", 2) == ["one", "two"]


def test_frechet_and_bootstrap_known_values():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 3, generator=g)
    assert frechet(a, a) == pytest.approx(0.0, abs=1e-6)
    assert frechet(a, a + 2.0) == pytest.approx(12.0, rel=1e-6)  # |mu1 - mu2|^2 = 3 x 4, same covariance
    value, lo, hi = bootstrap(lambda x: x.mean(), torch.ones(50))
    assert value == lo == hi == 1.0


def test_prune_then_evaluate_then_resume(flux_dir, clip_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["-q", "prune", *_flux_args(flux_dir, out, *_eval_keys(clip_dir))]) == 0
    summary = _strict(out / "evaluation.json")
    # the dense images were made before pruning (no second copy of the transformer), then reused
    assert summary["n_images"] == 4 and summary["generated"] == {"dense": 0, "pruned": 4}
    for key in ("clip_score_dense", "clip_score_pruned", "clip_score_delta", "psnr_vs_dense", "ssim_vs_dense",
                "fd_pruned_vs_dense"):
        lo, hi = summary[key]["ci95"]
        assert lo <= summary[key]["value"] <= hi, key
    assert summary["feature_space"] == "FD-CLIP"
    assert (out / "grid.png").stat().st_size > 100 and len(list((out / "images" / "dense").glob("*.png"))) == 4
    assert "clip_score_delta" in capsys.readouterr().out
    # the per-image CLIP scores are torchmetrics' own: recompute the mean with its CLIPScore module
    from PIL import Image
    from torchmetrics.multimodal import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    import numpy as np

    from ditprune.models.loading import builtin_prompts

    from ditprune.evaluation.pipeline import _TensorFeatures

    model, processor = CLIPModel.from_pretrained(clip_dir), CLIPProcessor.from_pretrained(clip_dir)
    metric = CLIPScore(model_name_or_path=lambda: (_TensorFeatures(model), processor))
    for i in range(4):
        img = torch.from_numpy(np.array(Image.open(out / "images" / "dense" / f"{i:06d}.png"))).permute(2, 0, 1)
        metric.update(img, builtin_prompts()[i])
    assert summary["clip_score_dense"]["value"] == pytest.approx(float(metric.compute()), abs=1e-4)
    # ditprune eval on the same output: every image is reused, the numbers are the same
    again = main(["-q", "eval", *_flux_args(flux_dir, out, *_eval_keys(clip_dir), f"evaluation.pruned={out / 'transformer'}",
                                             "export.overwrite=true")])
    assert again == 0
    resumed = _strict(out / "evaluation.json")
    assert resumed["generated"] == {"dense": 0, "pruned": 0}
    assert resumed["clip_score_pruned"]["value"] == pytest.approx(summary["clip_score_pruned"]["value"], abs=1e-6)
    # the report is titled from what the saved model records, and a recipe that says otherwise is refused
    assert f"{flux_dir}: wanda 0.5 vs dense" in (out / "evaluation.md").read_text()
    assert json.loads((out / "transformer" / "config.json").read_text())["_ditprune"]["method"] == "wanda"
    before = (out / "evaluation.json").read_bytes()
    capsys.readouterr()
    wrong = main(["-q", "eval", *_flux_args(flux_dir, out, *_eval_keys(clip_dir), f"evaluation.pruned={out / 'transformer'}",
                                            "export.overwrite=true", "pruning.sparsity=0.7", method="magnitude")])
    err = capsys.readouterr().err.strip().splitlines()
    assert wrong == 2 and len(err) == 1 and "pass pruning.method=wanda pruning.sparsity=0.5" in err[0]
    assert (out / "evaluation.json").read_bytes() == before


@pytest.mark.parametrize("method,options", [("wanda", ()), ("dit", ("pruning.options.reconstruct=true",))],
                         ids=["wanda", "dit+obs"])
def test_two_processes_give_the_numbers_of_one(flux_dir, clip_dir, tmp_path, method, options):
    """`--devices 2 --accelerator cpu`: 2 real processes (gloo). Calibration prompts and images are
    split over the ranks; the masks, the export and the evaluation equal those of one process.
    4 prompts x 2 steps: the adaLN layers see few tokens, so ``dit`` holds tokens out."""
    outs = {}
    for devices in (1, 2):
        out = tmp_path / f"d{devices}"
        cmd = [sys.executable, "-m", "ditprune.cli", "-q", "prune",
               *_flux_args(flux_dir, out, *options, *_eval_keys(clip_dir, 6), method=method),
               "--devices", str(devices), "--accelerator", "cpu"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        outs[devices] = out
    a = load_file(str(outs[1] / "transformer" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(outs[2] / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys()
    if method == "wanda":
        for k in a:
            assert torch.equal(a[k] == 0, b[k] == 0), k  # the same masks
            torch.testing.assert_close(a[k], b[k])
    else:
        # dit+obs: the reconstructed weights solve a least-squares problem whose H is near-singular
        # (cond up to 1e7 on this tiny model): summation-order noise in H (1e-7) moves them along
        # directions the calibration data barely excites (up to 3e-3 here), and the blocks after
        # see those weights' outputs, so their masks agree up to near-ties (test_ddp's bound: 0.1%
        # of the entries). What the weights are for, the model's outputs, must agree: the
        # evaluation numbers below.
        differ = sum(int(((a[k] == 0) != (b[k] == 0)).sum()) for k in a)
        assert differ <= 1e-3 * sum(a[k].numel() for k in a), differ
    ma, mb = _strict(outs[1] / "metrics.json"), _strict(outs[2] / "metrics.json")
    assert mb["ranks"] == 2 and ma["sparsity"] == mb["sparsity"]
    if method == "dit":
        assert "held_out_tokens" in (outs[1] / "report.txt").read_text()  # the few-token regime was exercised
    ea, eb = _strict(outs[1] / "evaluation.json"), _strict(outs[2] / "evaluation.json")
    assert ea["n_images"] == eb["n_images"] == 6
    # dit+obs: 0.03% of mask entries flipped move the numbers by about 1e-4 of themselves (clip
    # 21.2929 vs 21.2955, its 95% interval 8 wide)
    rel = 1e-4 if method == "wanda" else 1e-3
    for key in ("clip_score_dense", "clip_score_pruned", "psnr_vs_dense", "ssim_vs_dense", "fd_pruned_vs_dense"):
        assert eb[key]["value"] == pytest.approx(ea[key]["value"], rel=rel, abs=1e-4), key


@pytest.mark.parametrize("n, identical", [(1, False), (3, True), (1, True)])
def test_summaries_of_one_image_or_identical_images(n, identical):
    from ditprune._io import strict_json
    from ditprune.evaluation.pipeline import summarize

    g = torch.Generator().manual_seed(0)
    data = {"index": torch.arange(n).float(), "clip_dense": torch.rand(n, generator=g),
            "clip_pruned": torch.rand(n, generator=g),
            "psnr": torch.full((n,), float("inf")) if identical else torch.rand(n, generator=g) * 30,
            "ssim": torch.ones(n), "feat_dense": torch.randn(n, 8, generator=g),
            "feat_pruned": torch.randn(n, 8, generator=g), "reward_dense": torch.zeros(0),
            "reward_pruned": torch.zeros(0)}
    out = json.loads(strict_json(summarize(data, bootstrap_n=50)))
    assert out["n_images"] == n
    if identical:
        assert out["psnr_vs_dense"]["value"] is None and out["psnr_vs_dense"]["n"] == 0
    assert ("fd_pruned_vs_dense" in out) == (n > 1)  # one image has no covariance


FAIL_ON_RANK = """
import os, sys
import ditprune.runner as runner
from ditprune.errors import InputError
real = runner.PrunePlan
def failing(*a, **k):
    if os.environ.get("LOCAL_RANK", "0") == sys.argv[1]:
        raise InputError(f"injected failure on rank {sys.argv[1]}")
    return real(*a, **k)
runner.PrunePlan = failing
from ditprune.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("rank", ["0", pytest.param("1", marks=pytest.mark.slow)])  # 1: Lightning's own observer
def test_one_failing_rank_ends_the_others(flux_dir, tmp_path, rank):
    """A rank that fails must not leave the other waiting in a collective (gloo's timeout is 30
    minutes): the run ends promptly with that rank's error."""
    script = tmp_path / "fail.py"
    script.write_text(FAIL_ON_RANK)
    cmd = [sys.executable, str(script), rank, "-q", "prune", *_flux_args(flux_dir, tmp_path / "out"),
           "--devices", "2", "--accelerator", "cpu"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert done.returncode != 0
    assert f"injected failure on rank {rank}" in done.stderr
