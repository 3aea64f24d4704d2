"""A block-by-block ``ditprune prune`` killed after block 2 continues from there, bit for bit."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from ditprune.cli import main
from ditprune.errors import InputError
from ditprune.models.tiny import save_tiny_flux_pipeline
from ditprune.progress import PROGRESS_DIR, BlockProgress

KILL_AFTER_2 = """
import os, signal, sys
import ditprune.progress as P
save = P.BlockProgress.save
def killing_save(self, *a, **k):
    save(self, *a, **k)
    if len(self.done) == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # as an out-of-memory kill or a lost machine would
P.BlockProgress.save = killing_save
from ditprune.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    return save_tiny_flux_pipeline(tmp_path_factory.mktemp("tiny_flux") / "pipe")


def _args(flux_dir, out, method):
    return ["-q", "prune", "flux_dev", f"model.source={flux_dir}", "model.device=cpu", "model.dtype=float32",
            "calibration.num_prompts=4", "calibration.steps=2", "calibration.resolution=16",
            f"pruning.method={method}", f"export.output_dir={out}"]


def _weights(out):
    return load_file(str(out / "transformer" / "diffusion_pytorch_model.safetensors"))


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])  # masks only; masks and updated weights
def test_a_killed_run_resumes_from_its_last_block_and_matches_an_uninterrupted_one(flux_dir, tmp_path, method):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert main(_args(flux_dir, whole, method)) == 0
    assert not (whole / PROGRESS_DIR).exists()  # a finished run leaves no checkpoints

    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_2, *_args(flux_dir, resumed, method)],
                            capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    state = json.loads((resumed / PROGRESS_DIR / "progress.json").read_text())
    assert len(state["done"]) == 2 and not (resumed / "transformer").exists()

    assert main(_args(flux_dir, resumed, method)) == 0
    a, b = _weights(whole), _weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not (resumed / PROGRESS_DIR).exists()
    report = (resumed / "report.txt").read_text()
    assert report.count("resumed=True") == sum(len(b["layers"]) for b in state["done"].values())


def test_another_recipe_refuses_to_resume_and_says_why(flux_dir, tmp_path, capsys):
    out = tmp_path / "out"
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_2, *_args(flux_dir, out, "wanda")],
                            capture_output=True, text=True)
    assert killed.returncode == -9
    assert main(_args(flux_dir, out, "wanda") + ["pruning.sparsity=0.6"]) == 2
    err = capsys.readouterr().err
    assert "another recipe" in err and PROGRESS_DIR in err and err.count("\n") == 1
    assert (out / PROGRESS_DIR / "progress.json").is_file()  # nothing of the first run was lost


def test_progress_keys_and_unreadable_state(tmp_path):
    (tmp_path / "progress.json").write_text("{not json")
    with pytest.raises(InputError, match="unreadable"):
        BlockProgress(tmp_path, "k")
    (tmp_path / "progress.json").write_text(json.dumps({"key": "a", "done": {}}))
    assert BlockProgress(tmp_path, "a").done == {}
    with pytest.raises(InputError, match="another recipe"):
        BlockProgress(tmp_path, "b")
