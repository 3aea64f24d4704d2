"""Model-family adapters: where a DiT keeps its transformer blocks, in execution order.

Every family's default targets are the ``nn.Linear`` layers inside those blocks; embedders and
the final projection stay dense unless targeted. Unknown models fall back to their largest
``nn.ModuleList`` of blocks, and a model without one to every Linear.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass

from torch import nn

__all__ = ["Family", "FAMILIES", "family_of", "blocks", "default_targets", "text_layers", "check_batch",
           "prediction", "forwards_replaced"]


@dataclass(frozen=True)
class Family:
    name: str
    block_lists: tuple[str, ...]  # attribute names of the block ModuleLists, in execution order
    # regexes of the Linears whose inputs are encoder tokens that the blocks' encoder_attention_mask
    # masks (padding): their statistics skip the masked tokens
    text_inputs: tuple[str, ...] = ()
    # keyword arguments a calibration batch must hold (diffusers defaults them to None, then fails)
    required_inputs: tuple[str, ...] = ()


CROSS_ATTENTION_KV = (r"\.attn2\.to_[kv]$",)
FAMILIES = {
    "FluxTransformer2DModel": Family("flux", ("transformer_blocks", "single_transformer_blocks"), (),
                                     ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep",
                                      "img_ids", "txt_ids")),
    "SD3Transformer2DModel": Family("sd3", ("transformer_blocks",), (),
                                    ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep")),
    "PixArtTransformer2DModel": Family("pixart", ("transformer_blocks",), CROSS_ATTENTION_KV,
                                       ("hidden_states", "encoder_hidden_states", "timestep")),
    "DiTTransformer2DModel": Family("dit", ("transformer_blocks",), (), ("hidden_states", "timestep", "class_labels")),
    "SanaTransformer2DModel": Family("sana", ("transformer_blocks",), CROSS_ATTENTION_KV,
                                     ("hidden_states", "encoder_hidden_states", "timestep")),
}


def family_of(model: nn.Module) -> Family:
    for cls in type(model).__mro__:
        if cls.__name__ in FAMILIES:
            return FAMILIES[cls.__name__]
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        return Family("generic", ())  # no blocks: every Linear is a default target, calibrated whole-model
    name = max(lists, key=lambda nm: sum(p.numel() for p in nm[1].parameters()))[0]
    return Family("generic", (name,))


def blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, block) for every transformer block, in execution order."""
    out = []
    for list_name in family_of(model).block_lists:
        for i, block in enumerate(model.get_submodule(list_name)):
            out.append((f"{list_name}.{i}", block))
    return out


def prediction(out):
    """The denoiser's prediction in a model's return value: a diffusers output's ``sample``, the
    first item of a tuple or list, else the value itself."""
    return getattr(out, "sample", out[0] if isinstance(out, (tuple, list)) else out)


@contextlib.contextmanager
def forwards_replaced(modules, make):
    """Inside: the j-th of ``modules`` runs ``make(j, module)`` (called with the module's current
    ``forward``, which it may wrap) as its forward; after, each gets back its own instance
    ``forward`` (e.g. an offload hook's) or its class's."""
    own = [m.__dict__.get("forward") for m in modules]
    for j, m in enumerate(modules):
        m.forward = make(j, m)
    try:
        yield
    finally:
        for m, forward in zip(modules, own):
            if forward is None:
                del m.forward
            else:
                m.forward = forward


def default_targets(model: nn.Module) -> list[str]:
    """Regexes matching every Linear inside the transformer blocks (every Linear if there are none)."""
    lists = family_of(model).block_lists
    if not lists:
        return [""]
    return [rf"^{list_name.replace('.', chr(92) + '.')}\.\d+\." for list_name in lists]


def text_layers(model: nn.Module, names) -> set[str]:
    """Those of ``names`` (Linear names) whose inputs are maskable encoder tokens."""
    patterns = [re.compile(p) for p in family_of(model).text_inputs]
    return {n for n in names if any(p.search(n) for p in patterns)}


def check_batch(model: nn.Module, batch, index: int = 0) -> None:
    """Raise a one-line error naming the key when ``batch`` cannot be a call ``model(**batch)``:
    a key ``forward`` does not take, or one that the model family needs and the batch lacks."""
    import inspect

    from ..errors import InputError, InputTypeError

    if not isinstance(batch, dict):
        raise InputTypeError(f"calibration batch {index} is a {type(batch).__name__}; each must be a dict for "
                             "model(**batch)")
    name = type(model).__name__
    params = inspect.signature(model.forward).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = [k for k in batch if k not in params]
        if unknown:
            raise InputError(f"calibration batch {index} has key {unknown[0]!r}, which {name}.forward does not take "
                             f"(it takes {', '.join(params)})")
    needed = family_of(model).required_inputs or tuple(
        k for k, p in params.items() if p.default is inspect.Parameter.empty
        and p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL))
    missing = [k for k in needed if batch.get(k) is None]
    if missing:
        raise InputError(f"calibration batch {index} has no {missing[0]!r}, which {name}.forward needs; a batch holds "
                         "the keyword arguments of one model call (see ditprune.pipeline_calibration)")
