"""Resumable block-by-block prunes: a small checkpoint after every block.

A block-by-block prune of FLUX.1-dev runs for hours on a CPU (many minutes on a GPU); one that
dies at block 40 of 57 should not start again from block 0. :class:`BlockProgress` keeps, in one
directory, a ``progress.json`` (the run's key, e.g. the hash of its recipe, and the finished
blocks with their per-layer reports) and one safetensors file per finished block: each pruned
weight's mask, packed one bit per entry, and its values only where the method changed them
(SparseGPT, ``dit`` with ``reconstruct``). A rerun with the same key restores the finished blocks
from there (the source weights come from disk again, so masks are enough for the others) and
calibrates from the next block on; its result is the uninterrupted run's, bit for bit. Another
key is refused. Every file is written atomically; nothing is unpickled when reading.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from ._io import atomic_file
from .errors import InputError
from .masks import pack, unpack

__all__ = ["BlockProgress", "PROGRESS_DIR"]

PROGRESS_DIR = ".ditprune-progress"
_STATE = "progress.json"


class BlockProgress:
    """The finished blocks of one run (``key``) in ``directory``; see the module docstring."""

    def __init__(self, directory: str | Path, key: str) -> None:
        self.directory, self.key = Path(directory), key
        self.done: dict[str, dict] = {}  # block name -> {"file", "layers": {tensor_fqn: info}}
        state = self.directory / _STATE
        if state.is_file():
            try:
                saved = json.loads(state.read_text())
                saved_key, done = saved["key"], dict(saved["done"])
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise InputError(f"{state} is unreadable ({e}); delete {self.directory} to start over") from None
            if saved_key != key:
                raise InputError(
                    f"{self.directory} holds the progress of a run with another recipe (key {saved_key[:12]}, this "
                    f"run {key[:12]}): rerun that recipe to finish it, or delete {self.directory} to start over")
            self.done = done

    def save(self, block: str, groups: list[dict], state: dict) -> None:
        """Record ``block`` as finished: its groups' masks (and weights a method updated)."""
        tensors, layers = {}, {}
        for g in groups:
            fqn, p = g["tensor_fqn"], g["module"].parametrizations[g["tensor_name"]]
            tensors[f"{fqn}.mask"] = pack(p[0].mask).cpu()
            if state[fqn].get("updated"):
                tensors[f"{fqn}.weight"] = p.original.detach().cpu().contiguous()
            layers[fqn] = json.loads(json.dumps(state[fqn].get("info", {}), default=str))
        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"block-{len(self.done):04d}.safetensors"
        with atomic_file(self.directory / name) as tmp:
            save_file(tensors, str(tmp))
        self.done[block] = {"file": name, "layers": layers}
        with atomic_file(self.directory / _STATE) as tmp:
            tmp.write_text(json.dumps({"key": self.key, "done": self.done}, indent=1))

    def restore(self, block: str, groups: list[dict], state: dict) -> None:
        """Put ``block``'s saved masks (and updated weights) on its groups, as when it was pruned."""
        entry = self.done[block]
        stored = load_file(str(self.directory / entry["file"]))
        for g in groups:
            fqn, p = g["tensor_fqn"], g["module"].parametrizations[g["tensor_name"]]
            bits = stored.get(f"{fqn}.mask")
            if bits is None or bits.numel() != (p.original.numel() + 7) // 8:
                raise InputError(f"{self.directory}: block '{block}' has no mask for '{fqn}' of its shape; delete "
                                 f"{self.directory} to start over")
            if f"{fqn}.weight" in stored:
                p.original.data.copy_(stored[f"{fqn}.weight"])
                state[fqn]["updated"] = True
            p[0].mask = unpack(bits.to(p.original.device), p.original.shape)
            state[fqn]["info"] = {**entry["layers"].get(fqn, {}), "resumed": True}

    def finish(self) -> None:
        """The run succeeded: its progress is no longer needed."""
        shutil.rmtree(self.directory, ignore_errors=True)
