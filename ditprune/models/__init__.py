"""Model-family adapters: where a DiT keeps its transformer blocks, in execution order.

Every family's default targets are the ``nn.Linear`` layers inside those blocks; embedders and
the final projection stay dense unless targeted. Unknown models fall back to their largest
``nn.ModuleList`` of blocks, and a model without one to every Linear.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

__all__ = ["Family", "FAMILIES", "family_of", "blocks", "default_targets", "text_layers"]


@dataclass(frozen=True)
class Family:
    name: str
    block_lists: tuple[str, ...]  # attribute names of the block ModuleLists, in execution order
    # regexes of the Linears whose inputs are encoder tokens that the blocks' encoder_attention_mask
    # masks (padding): their statistics skip the masked tokens
    text_inputs: tuple[str, ...] = ()


CROSS_ATTENTION_KV = (r"\.attn2\.to_[kv]$",)
FAMILIES = {
    "FluxTransformer2DModel": Family("flux", ("transformer_blocks", "single_transformer_blocks")),
    "SD3Transformer2DModel": Family("sd3", ("transformer_blocks",)),
    "PixArtTransformer2DModel": Family("pixart", ("transformer_blocks",), CROSS_ATTENTION_KV),
    "DiTTransformer2DModel": Family("dit", ("transformer_blocks",)),
    "SanaTransformer2DModel": Family("sana", ("transformer_blocks",), CROSS_ATTENTION_KV),
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
