"""No user file is ever overwritten or deleted: the output directory is checked before any work,
outputs are staged and committed together, and a killed run's leftovers are cleaned next time."""

import json
import os
import stat
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ditprune._io import MANIFEST, STAGING_PREFIX, OutputDir
from ditprune.cli import main
from ditprune.errors import InputError
from ditprune.progress import PROGRESS_DIR

from conftest import tree_bytes

ROOT = Path(__file__).parent.parent


def _pipeline_args(source, out, *extra):
    return ["-q", "prune", str(ROOT / "configs/dit_xl_256.yaml"), f"model.source={source}", "model.device=cpu",
            "calibration.num_prompts=2", "calibration.steps=2", "pruning.method=wanda", f"export.output_dir={out}",
            *extra]


# -- OutputDir ----------------------------------------------------------------------------------
def test_outputs_appear_together_only_on_success(tmp_path):
    out = tmp_path / "out"
    with OutputDir(out, ["a.txt", "model"]) as o:
        (o / "a.txt").write_text("1")
        (o / "model").mkdir()
        (o / "model" / "w.bin").write_bytes(b"x")
        assert not (out / "a.txt").exists()  # nothing visible before the commit
    assert (out / "a.txt").read_text() == "1" and (out / "model" / "w.bin").read_bytes() == b"x"
    assert json.loads((out / MANIFEST).read_text())["files"] == ["a.txt", "model"]
    with pytest.raises(RuntimeError, match="boom"):
        with OutputDir(out, ["a.txt"]) as o:
            (o / "a.txt").write_text("2")
            raise RuntimeError("boom")
    assert (out / "a.txt").read_text() == "1"  # the failed run changed nothing
    assert not list(out.glob(STAGING_PREFIX + "*"))


def test_only_what_ditprune_wrote_is_replaced(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "model").mkdir()
    (out / "model" / "mine.bin").write_bytes(b"user")
    with pytest.raises(InputError, match="model exists and was not written by ditprune"):
        OutputDir(out, ["model", "a.txt"])
    with OutputDir(out, ["a.txt"]) as o:  # entries it does not touch are fine
        (o / "a.txt").write_text("1")
    with OutputDir(out, ["a.txt"]) as o:  # its own output from an earlier run is replaced
        (o / "a.txt").write_text("2")
    assert (out / "a.txt").read_text() == "2" and (out / "notes.txt").read_text() == "mine"
    with OutputDir(out, ["model"], overwrite=True) as o:  # only when asked
        (o / "model").mkdir()
    assert not (out / "model" / "mine.bin").exists()


def test_a_plain_file_where_an_output_goes_is_refused(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "transformer").write_text("not a directory")
    with pytest.raises(InputError, match="transformer exists and was not written by ditprune"):
        OutputDir(tmp_path / "out", ["transformer"])
    assert not list((tmp_path / "out").glob(".*"))  # no hidden .old or temp left behind


@pytest.mark.parametrize("where", ["same", "inside", "containing"])
def test_output_overlapping_the_source_is_refused(tmp_path, where):
    src = tmp_path / "model"
    src.mkdir()
    out = {"same": src, "inside": src / "pruned", "containing": tmp_path}[where]
    with pytest.raises(InputError, match="model source"):
        OutputDir(out, ["transformer"], protect=[src])
    assert not (src / "pruned").exists()


def test_output_that_is_a_file_or_under_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(InputError, match="is a file"):
        OutputDir(tmp_path / "f", ["a"])
    with pytest.raises(InputError, match="is a file, not a directory"):
        OutputDir(tmp_path / "f" / "out", ["a"])


def test_files_are_readable_as_umask_allows(tmp_path):
    old = os.umask(0o022)
    try:
        with OutputDir(tmp_path / "out", ["d"]) as o:
            (o / "d").mkdir()
            (o / "d" / "w").write_bytes(b"x")
            os.chmod(o / "d" / "w", 0o600)  # as a temporary file would be
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out" / "d" / "w").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "out" / "d").stat().st_mode) == 0o755


# -- the CLI ------------------------------------------------------------------------------------
def test_cli_refuses_to_write_into_the_model_source(tiny_pipeline_dir, capsys):
    before = tree_bytes(tiny_pipeline_dir)
    assert main(_pipeline_args(tiny_pipeline_dir, tiny_pipeline_dir)) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is the model source" in err
    assert tree_bytes(tiny_pipeline_dir) == before


def test_cli_refuses_a_users_transformer_dir_then_overwrite_replaces_it(tiny_pipeline_dir, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "transformer").mkdir(parents=True)
    (out / "transformer" / "my_weights.safetensors").write_bytes(b"precious")
    assert main(_pipeline_args(tiny_pipeline_dir, out)) == 2
    assert "not written by ditprune" in capsys.readouterr().err
    assert (out / "transformer" / "my_weights.safetensors").read_bytes() == b"precious"
    assert not (out / "recipe.yaml").exists()  # nothing of the refused run
    assert main(_pipeline_args(tiny_pipeline_dir, out, "export.overwrite=true")) == 0
    assert sorted(p.name for p in (out / "transformer").iterdir()) == ["config.json",
                                                                       "diffusion_pytorch_model.safetensors"]


def test_a_killed_run_loses_nothing_and_the_next_run_cleans_up(tiny_pipeline_dir, tmp_path):
    out = tmp_path / "out"
    assert main(_pipeline_args(tiny_pipeline_dir, out)) == 0
    first = tree_bytes(out)
    killer = (
        "import os, signal, sys, diffusers\n"
        "orig = diffusers.ModelMixin.save_pretrained\n"
        "def save_then_die(self, *a, **k):\n"
        "    orig(self, *a, **k)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "diffusers.ModelMixin.save_pretrained = save_then_die\n"
        "from ditprune.cli import main\n"
        f"sys.exit(main({_pipeline_args(tiny_pipeline_dir, out, 'pruning.sparsity=0.7')!r}))\n"
    )
    killed = subprocess.run([sys.executable, "-c", killer], capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9
    ours = (STAGING_PREFIX, PROGRESS_DIR)  # its staging directory, and the per-block checkpoints it finished
    assert tree_bytes(out) == {**first, **{k: v for k, v in tree_bytes(out).items() if k.startswith(ours)}}
    [leftover] = out.glob(STAGING_PREFIX + "*")
    assert (leftover / "transformer" / "diffusion_pytorch_model.safetensors").exists()  # died after the save
    again = subprocess.run([sys.executable, "-m", "ditprune.cli", *_pipeline_args(tiny_pipeline_dir, out)],
                           capture_output=True, text=True, timeout=300)
    # another recipe than the killed run's: refused, its checkpoints kept, the dead staging removed
    assert again.returncode == 2 and "another recipe" in again.stderr, again.stderr
    assert "leftovers of an interrupted run" in again.stderr
    assert not list(out.glob(STAGING_PREFIX + "*")) and (out / PROGRESS_DIR).is_dir()
    assert {k: v for k, v in tree_bytes(out).items() if not k.startswith(PROGRESS_DIR)} == first
    shutil.rmtree(out / PROGRESS_DIR)  # what the message says to do to start over
    assert main(_pipeline_args(tiny_pipeline_dir, out)) == 0
    assert tree_bytes(out).keys() == first.keys()


KILL_MID_COMMIT = """
import os, sys
from pathlib import Path
import ditprune._io as io
from ditprune._io import OutputDir
real = io._put
calls = []
def dying(staged, target, aside):
    real(staged, target, aside)
    calls.append(target.name)
    if len(calls) == 1:
        os._exit(9)  # killed between the first and the second entry of the commit
io._put = dying
with OutputDir(Path(sys.argv[1]), ["model", "metrics.json"]) as o:
    (o / "model").mkdir()
    (o / "model" / "w.bin").write_bytes(b"new")
    (o / "metrics.json").write_text("new")
"""


def test_a_run_killed_while_committing_never_loses_the_set(tmp_path):
    out = tmp_path / "out"
    with OutputDir(out, ["model", "metrics.json"]) as o:
        (o / "model").mkdir()
        (o / "model" / "w.bin").write_bytes(b"old")
        (o / "metrics.json").write_text("old")
    done = subprocess.run([sys.executable, "-c", KILL_MID_COMMIT, str(out)], capture_output=True, text=True)
    assert done.returncode == 9, done.stderr
    # at the instant of the kill every entry is in place, old or new
    assert (out / "model" / "w.bin").read_bytes() == b"new" and (out / "metrics.json").read_text() == "old"
    # a later run that fails on a user error before it starts touches nothing
    with pytest.raises(InputError):
        OutputDir(out, ["model"], protect=[out / "model"])
    assert (out / "model" / "w.bin").read_bytes() == b"new" and len(list(out.glob(STAGING_PREFIX + "*"))) == 1
    # the next run into the directory finishes the dead run's commit: the whole new set
    with OutputDir(out, ["report.txt"]) as o:
        (o / "report.txt").write_text("r")
    assert (out / "model" / "w.bin").read_bytes() == b"new" and (out / "metrics.json").read_text() == "new"
    assert not list(out.glob(STAGING_PREFIX + "*"))
    assert json.loads((out / MANIFEST).read_text())["files"] == ["metrics.json", "model", "report.txt"]
