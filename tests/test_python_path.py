"""The Python path is the CLI's: the OpenMP wait policy on import, a log line per block, the
text encoders and VAE off the accelerator while pruning, files as the umask allows."""

import logging
import os
import subprocess
import sys

import torch

import ditprune
from ditprune.models.tiny import tiny_batches, tiny_model

POLICY = "import os, sys; {first}import ditprune; print(os.environ.get('OMP_WAIT_POLICY'))"


def _policy(first: str = "", **env) -> str:
    environ = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | env
    done = subprocess.run([sys.executable, "-c", POLICY.format(first=first)], env=environ, capture_output=True,
                          text=True, check=True)
    return done.stdout.strip()


def test_importing_ditprune_sets_a_passive_wait_policy_unless_too_late_or_set():
    assert _policy() == "PASSIVE"
    assert _policy(OMP_WAIT_POLICY="ACTIVE") == "ACTIVE"  # the user's own wins
    assert _policy(first="import torch; ") == "None"  # torch read it already: not pretended


def test_prune_logs_one_info_line_per_block(caplog):
    model = tiny_model("flux")
    with caplog.at_level(logging.INFO, logger="ditprune"):
        ditprune.prune(model, tiny_batches(model), method="wanda", sparsity=0.5)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("block ")]
    blocks = len(model.transformer_blocks) + len(model.single_transformer_blocks)
    assert [line.split(" (")[0] for line in lines] == [f"block {i}/{blocks}" for i in range(1, blocks + 1)]
    assert "transformer_blocks.0" in lines[0] and "layers pruned in" in lines[0]


def test_release_and_restore_components_move_all_but_the_transformer():
    class Recorder(torch.nn.Linear):  # no second device here: record where it is sent
        def __init__(self):
            super().__init__(2, 2)
            self.sent = []

        def to(self, device):
            self.sent.append(str(device))
            return self

    class Pipe:
        components = {"transformer": Recorder(), "vae": Recorder(), "text_encoder": Recorder(), "tokenizer": object()}

    pipe = Pipe()
    where = ditprune.release_components(pipe)
    assert set(where) == {"vae", "text_encoder"}  # modules only, never the transformer
    assert pipe.components["vae"].sent == ["cpu"] and pipe.components["transformer"].sent == []
    ditprune.restore_components(pipe, where)
    assert pipe.components["vae"].sent == ["cpu", "cpu"] and pipe.components["text_encoder"].sent == ["cpu", "cpu"]


def test_saved_files_are_readable_as_the_umask_allows(tmp_path):
    model = tiny_model("flux")
    ditprune.prune(model, tiny_batches(model), method="wanda", sparsity=0.5)
    old = os.umask(0o022)
    try:
        for fmt in ("diffusers", "compressed"):
            ditprune.save_transformer(model, tmp_path / fmt, fmt)
    finally:
        os.umask(old)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in tmp_path.rglob("*") if p.is_file()}
    assert modes and set(modes.values()) == {"0o644"}, modes
