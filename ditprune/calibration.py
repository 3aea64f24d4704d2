"""Drive a model over calibration batches: block-sequential (default) or whole-model.

Block-sequential: capture the inputs of the first block, then for each block k in execution
order gather the statistics of its targeted layers on its captured inputs, prune it, and run the
*pruned* block to produce the inputs of block k+1. Only one block's statistics exist at a time,
and with ``offload`` the captured activations wait on another device (e.g. CPU) between uses.
Whole-model: statistics of every target from the dense model in one pass, then every mask.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn
from tqdm import tqdm

from . import memory
from .errors import InputError, InputTypeError
from .stats import HookOwner, token_weight

__all__ = ["capture_inputs", "next_inputs", "to_device", "run_block_sequential", "run_whole_model",
           "timestep_weights", "TIMESTEP_WEIGHTINGS", "EmptyCalibrationError"]

TIMESTEP_WEIGHTINGS = ("log_decrease",)

Inputs = list[tuple[tuple, dict]]


class EmptyCalibrationError(InputError):
    pass


def timestep_weights(batches: list[dict], schedule: str) -> list[float]:
    """A weight per calibration batch from its ``timestep``. ``"log_decrease"`` (OBS-Diff, Zhu et
    al., ICLR 2026; our reading of it, their code was not available): the K distinct timesteps,
    ranked from the first sampler step (the largest timestep: the noisiest) k = 0 to the last,
    weigh w_k = 1.2 - 0.4 * log(1 + k) / log(K): 1.2 for the first step, 0.8 for the last, so that
    errors made early, which the rest of the sampling carries, count more."""
    if schedule not in TIMESTEP_WEIGHTINGS:
        raise InputError(f"timestep weighting must be one of {TIMESTEP_WEIGHTINGS}, got {schedule!r}")
    ts = []
    for i, b in enumerate(batches):
        if not isinstance(b, dict) or b.get("timestep") is None:
            raise InputError(f"timestep weighting needs a 'timestep' in every calibration batch; batch {i} has none")
        ts.append(float(torch.as_tensor(b["timestep"]).float().mean()))
    distinct = sorted(set(ts), reverse=True)
    if len(distinct) == 1:
        return [1.0] * len(ts)
    rank = {t: k for k, t in enumerate(distinct)}
    return [1.2 - 0.4 * math.log1p(rank[t]) / math.log(len(distinct)) for t in ts]


class _Captured(Exception):
    pass


def to_device(obj: Any, device, copy: bool = False) -> Any:
    """``obj`` with every tensor inside (nested lists, tuples, dicts) moved to ``device``
    (None: left where it is); ``copy=True`` detaches and copies even on the same device."""
    if device is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.detach().to(device, copy=True) if copy else obj.to(device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(o, device, copy) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device, copy) for k, v in obj.items()}
    return obj


def _batches(calibration: Iterable[dict]) -> Iterable[dict]:
    for i, batch in enumerate(calibration):
        if not isinstance(batch, dict):
            raise InputTypeError(f"calibration batch {i} is a {type(batch).__name__}; each must be a dict for model(**batch)")
        yield batch


@torch.no_grad()
def capture_inputs(model: nn.Module, block: nn.Module, calibration: Iterable[dict], offload=None) -> Inputs:
    """Run the model on each batch up to ``block`` and keep what it would receive (args, kwargs)."""
    captured: Inputs = []

    def grab(_module, args, kwargs):
        captured.append((to_device(args, offload), to_device(kwargs, offload)))
        memory.mark(captured[-1], "captured inputs")
        raise _Captured

    device = _device_of(model)
    with HookOwner() as hooks:
        hooks.add(block.register_forward_pre_hook(grab, with_kwargs=True))
        for batch in _batches(calibration):
            try:
                model(**to_device(batch, device))  # batches may wait on the CPU: one at a time on the device
            except _Captured:
                pass
    if not captured:
        raise EmptyCalibrationError("calibration is empty: pass at least one batch (a dict fed as model(**batch))")
    return captured


def next_inputs(args: tuple, kwargs: dict, output: Any) -> tuple[tuple, dict]:
    """The next block's inputs from this block's output, by the diffusers convention: a tensor is
    the new ``hidden_states``; a pair is ``(encoder_hidden_states, hidden_states)`` (joint blocks)."""
    if isinstance(output, torch.Tensor):
        updates = {"hidden_states": output}
    elif isinstance(output, tuple) and len(output) == 2:
        updates = {"encoder_hidden_states": output[0], "hidden_states": output[1]}
    else:
        raise TypeError(
            f"cannot chain a block that returns {type(output).__name__}: use block_sequential=False for this model"
        )
    args, kwargs = list(args), dict(kwargs)
    for key, value in updates.items():
        if key in kwargs:
            kwargs[key] = value
        elif key == "hidden_states" and args:
            args[0] = value
        elif key == "encoder_hidden_states" and len(args) > 1:
            args[1] = value
        else:
            kwargs[key] = value
    return tuple(args), kwargs


@torch.no_grad()
def run_block_sequential(
    model: nn.Module,
    blocks: list[tuple[str, nn.Module]],
    calibration: Iterable[dict],
    calibrate_block: Callable[[str, nn.Module, Callable[[], None]], None],
    offload=None,
    progress: bool = True,
    weights: Sequence[float] | None = None,
) -> None:
    """For each block: ``calibrate_block(name, block, replay)``, where ``replay()`` runs the block on
    its captured inputs (the callee observes and prunes around it), each batch's tokens weighing
    ``weights[i]``; then the pruned block makes the next block's inputs."""
    inputs = capture_inputs(model, blocks[0][1], calibration, offload)
    device = _device_of(blocks[0][1])
    weights = list(weights) if weights is not None else [1.0] * len(inputs)

    for name, block in tqdm(blocks, desc="pruning blocks", disable=not progress, leave=False):

        def replay(block=block):
            for (args, kwargs), w in zip(inputs, weights):
                with token_weight(w):
                    block(*to_device(args, device), **to_device(kwargs, device))

        calibrate_block(name, block, replay)
        if block is not blocks[-1][1]:
            for i, (args, kwargs) in enumerate(inputs):  # in place: one set of captured inputs at a time
                out = block(*to_device(args, device), **to_device(kwargs, device))
                inputs[i] = tuple(to_device(x, offload) for x in next_inputs(args, kwargs, out))
                memory.mark(inputs[i], "captured inputs")
                del out


@torch.no_grad()
def run_whole_model(model: nn.Module, calibration: Iterable[dict], progress: bool = True,
                    weights: Sequence[float] | None = None) -> None:
    n = 0
    device = _device_of(model)
    for batch in tqdm(_batches(calibration), desc="calibrating", disable=not progress, leave=False):
        with token_weight(weights[n] if weights is not None else 1.0):
            model(**to_device(batch, device))
        n += 1
    if n == 0:
        raise EmptyCalibrationError("calibration is empty: pass at least one batch (a dict fed as model(**batch))")


def _device_of(module: nn.Module):
    p = next(module.parameters(), None)
    return p.device if p is not None else None
