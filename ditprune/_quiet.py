"""Imports of diffusers, torchao and Lightning without their import-time chatter.

torchao warns that it cannot load its CUDA-only extensions on a CPU machine, diffusers that it
cannot import torchao's tensors, torch's pytree about torchao's enums: once, when first
imported. ditprune imports them lazily through :func:`diffusers` / :func:`torchao`, with exactly
those loggers raised to ERROR for the duration of the import and restored afterwards; nothing
else of the user's logging changes.
"""

from __future__ import annotations

import importlib
import logging
from contextlib import contextmanager
from types import ModuleType
from typing import Iterator

__all__ = ["quiet_import", "quiet_loading", "diffusers", "torchao"]

NOISY = ("torchao", "diffusers.quantizers.torchao.torchao_quantizer", "torch.utils._pytree")


@contextmanager
def quiet_import() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in NOISY]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _module(name: str) -> ModuleType:
    with quiet_import():
        return importlib.import_module(name)


def diffusers() -> ModuleType:
    _module("torchao")  # diffusers imports torchao when it is installed: quiet it first
    module = _module("diffusers")
    try:  # imported lazily by from_pretrained, and noisy then: import it now, quietly
        _module("diffusers.quantizers.torchao.torchao_quantizer")
    except ImportError:
        pass
    return module


def torchao() -> ModuleType:
    return _module("torchao")


@contextmanager
def quiet_loading() -> Iterator[None]:
    """diffusers' and transformers' loading progress bars off while loading, as they were after."""
    d = diffusers()
    import transformers

    d_on = d.utils.logging.is_progress_bar_enabled()
    t_on = transformers.utils.logging.is_progress_bar_enabled()
    d.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if d_on:
            d.utils.logging.enable_progress_bar()
        if t_on:
            transformers.utils.logging.enable_progress_bar()
