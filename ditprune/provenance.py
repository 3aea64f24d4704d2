"""What a transformer went through: the pruning (and quantization) that made it, recorded on the
model when it happens and written with every export, so a report describes the model it
evaluates rather than the command line that evaluates it.

On a diffusers model the record lives in its config under ``"_ditprune"``: ``save_pretrained``
writes it into ``config.json``, and diffusers ignores keys that start with ``_`` when it builds a
model from that file, so the export still loads anywhere. Other modules carry it as an attribute.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

__all__ = ["KEY", "record", "store", "recorded", "read", "describe"]

KEY = "_ditprune"


def recorded(model: nn.Module) -> dict[str, Any]:
    """The record of ``model`` (empty when ditprune never pruned or quantized it)."""
    config = getattr(model, "config", None)
    info = config.get(KEY) if isinstance(config, dict) else None
    if info is None:
        info = model.__dict__.get(KEY)
    return dict(info or {})


def record(model: nn.Module, **info: Any) -> dict[str, Any]:
    """Merge ``info`` into the record of ``model``; returns the new record."""
    from . import __version__

    merged = {**recorded(model), **info, "ditprune": __version__}
    store(model, merged)
    return merged


def store(model: nn.Module, info: dict[str, Any]) -> None:
    """Set the record of ``model`` to ``info`` as it is (e.g. as read from a saved transformer);
    an empty ``info`` leaves the model as it is."""
    if not info:
        return
    if hasattr(model, "register_to_config") and isinstance(getattr(model, "config", None), dict):
        model.register_to_config(**{KEY: dict(info)})
    else:
        model.__dict__[KEY] = dict(info)


def read(path: str | Path) -> dict[str, Any]:
    """The record stored in a saved transformer's ``config.json`` (empty when there is none)."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    info = config.get(KEY) if isinstance(config, dict) else None
    return dict(info) if isinstance(info, dict) else {}


def describe(info: dict[str, Any]) -> str:
    """``"dit 0.5"``, ``"wanda 2:4 + int8_weight_only"``; ``""`` for an empty record."""
    parts = []
    if info.get("method"):
        parts.append(f"{info['method']} {info.get('pattern') or info.get('sparsity')}")
        if info.get("allocation", "uniform") != "uniform":
            parts[-1] += f" ({info['allocation']})"
    if info.get("quantization"):
        parts.append(str(info["quantization"]))
    return " + ".join(parts)
