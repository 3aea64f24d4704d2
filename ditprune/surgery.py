"""Structured pruning, the module surgery: find the attention heads and MLP hidden channels of a
transformer block (:func:`units`), and remove some of them (:func:`shrink`), leaving a block of
the same classes with smaller Linears.

A :class:`Unit` is one attention (its heads) or one MLP (its hidden channels): the *producer*
Linears whose output rows make a group (a head's q, k, v rows, of both streams in a joint
attention; an MLP channel's row of ``ff.net.0.proj``, two rows under GEGLU), and the *consumer*
Linears whose input columns read it (``to_out.0``, ``to_add_out``, ``ff.net.2``; a FLUX single
block's ``proj_out``, which reads the attention's output and the MLP's concatenated, at an
offset). Recognised by structure, not by class name: diffusers' ``Attention`` and
``FluxAttention`` (anything with ``to_q``/``to_k``/``to_v``), ``FeedForward`` (``net[0].proj``
then a Linear), FLUX single blocks (``proj_mlp`` + ``proj_out``). Per-head norms of q and k
(over ``head_dim``, as FLUX and SD3 have) need nothing; an attention that normalises q or k
across all heads is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import InputError

__all__ = ["Unit", "units", "shrink", "put_back", "resize", "group_rows", "group_cols"]


@dataclass
class Unit:
    kind: str  # "heads" | "mlp"
    name: str  # the attention or MLP module's qualified name
    count: int  # groups (heads or channels)
    width: int  # rows / columns per group (head_dim, or 1)
    producers: list[tuple[str, list[int]]]  # (Linear, row offsets: group g owns offset + g * width + i)
    consumers: list[tuple[str, int]]  # (Linear, column offset)


def group_rows(unit: Unit, offsets: list[int], groups) -> list[int]:
    return [o + g * unit.width + i for o in offsets for g in groups for i in range(unit.width)]


def group_cols(unit: Unit, offset: int, groups) -> list[int]:
    return [offset + g * unit.width + i for g in groups for i in range(unit.width)]


def _linear(module, name):
    m = getattr(module, name, None)
    if isinstance(m, nn.ModuleList):
        m = m[0] if len(m) and isinstance(m[0], nn.Linear) else None
    return m if isinstance(m, nn.Linear) else None


def units(block: nn.Module, prefix: str) -> list[Unit]:
    """Every attention and MLP unit of ``block`` (qualified names under ``prefix``)."""
    found = []
    proj_out = _linear(block, "proj_out")
    proj_mlp = _linear(block, "proj_mlp")
    for name, m in block.named_modules():
        q, k, v = (_linear(m, n) for n in ("to_q", "to_k", "to_v"))
        if q is None or k is None or v is None:
            continue
        path = f"{prefix}.{name}"
        head_dim = getattr(m, "head_dim", None) or q.out_features // m.heads
        count = q.out_features // head_dim
        if k.out_features != q.out_features or v.out_features != q.out_features or count * head_dim != q.out_features:
            raise InputError(f"attention '{path}': q, k, v widths {q.out_features}, {k.out_features}, "
                             f"{v.out_features} are not {count} heads of {head_dim}; structured pruning of its heads "
                             "is not supported")
        producers = [(f"{path}.{n}", [0]) for n in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")
                     if _linear(m, n) is not None]
        consumers = [(f"{path}.{n}" + (".0" if n == "to_out" else ""), 0) for n in ("to_out", "to_add_out")
                     if _linear(m, n) is not None]
        if not consumers and proj_out is not None and proj_mlp is not None:  # FLUX single block
            consumers = [(f"{prefix}.proj_out", 0)]
        if not consumers:
            raise InputError(f"attention '{path}' has no output projection this ditprune can shrink")
        if len({o for _, o in consumers}) > 1:
            raise InputError(f"attention '{path}': its outputs are read at different offsets")
        across = [n for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k")
                  if getattr(getattr(m, n, None), "weight", None) is not None
                  and getattr(m, n).weight.shape[0] == q.out_features != head_dim]
        if across:
            raise InputError(f"attention '{path}' normalises q/k across all heads ({across[0]}); structured pruning "
                             "of its heads is not supported")
        found.append(Unit("heads", path, count, head_dim, producers, consumers))
    for name, m in block.named_modules():
        net = getattr(m, "net", None)
        if not isinstance(net, nn.ModuleList) or not len(net) or _linear(net[0], "proj") is None:
            continue
        last = [i for i, x in enumerate(net) if isinstance(x, nn.Linear)]
        if not last:
            continue
        path = f"{prefix}.{name}"
        proj, out = net[0].proj, net[last[-1]]
        inner = out.in_features
        if proj.out_features not in (inner, 2 * inner):
            raise InputError(f"MLP '{path}': its first Linear has {proj.out_features} outputs for {inner} hidden "
                             "channels; structured pruning of its channels is not supported")
        offsets = [0] if proj.out_features == inner else [0, inner]  # GEGLU/SwiGLU: value and gate halves
        found.append(Unit("mlp", path, inner, 1, [(f"{path}.net.0.proj", offsets)], [(f"{path}.net.{last[-1]}", 0)]))
    if proj_mlp is not None and proj_out is not None:  # FLUX single block: proj_out reads [attention, MLP]
        offset = proj_out.in_features - proj_mlp.out_features
        found.append(Unit("mlp", f"{prefix}.proj_mlp", proj_mlp.out_features, 1, [(f"{prefix}.proj_mlp", [0])],
                          [(f"{prefix}.proj_out", offset)]))
    return found


@torch.no_grad()
def shrink(model: nn.Module, removals: list[tuple[Unit, list[int]]],
           refitted: dict[str, torch.Tensor] | None = None) -> dict[str, tuple[nn.Module, nn.Module]]:
    """Remove groups: ``removals`` = [(unit, group indices)]; every producer loses their rows,
    every consumer their columns (its new weight from ``refitted[name]`` when given: the kept
    columns' least-squares update). Returns {qualified name: (old module, new module)} so a
    caller can put the old ones back."""
    rows: dict[str, set[int]] = {}
    cols: dict[str, set[int]] = {}
    for unit, groups in removals:
        if not groups:
            continue
        for p, offsets in unit.producers:
            rows.setdefault(p, set()).update(group_rows(unit, offsets, groups))
        for c, offset in unit.consumers:
            cols.setdefault(c, set()).update(group_cols(unit, offset, groups))
    swapped = {}
    for name, drop in rows.items():
        old = model.get_submodule(name)
        keep = torch.tensor([i for i in range(old.out_features) if i not in drop], device=old.weight.device)
        new = nn.Linear(old.in_features, len(keep), bias=old.bias is not None, device=old.weight.device,
                        dtype=old.weight.dtype)
        new.weight.copy_(old.weight[keep])
        if old.bias is not None:
            new.bias.copy_(old.bias[keep])
        swapped[name] = (old, new)
    for name, drop in cols.items():
        old = model.get_submodule(name)
        keep = torch.tensor([i for i in range(old.in_features) if i not in drop], device=old.weight.device)
        new = nn.Linear(len(keep), old.out_features, bias=old.bias is not None, device=old.weight.device,
                        dtype=old.weight.dtype)
        new.weight.copy_(refitted[name] if refitted and name in refitted else old.weight[:, keep])
        if old.bias is not None:
            new.bias.copy_(old.bias)
        swapped[name] = (old, new)
    for name, (_, new) in swapped.items():
        _set(model, name, new)
    _sync(model, [u for u, g in removals if g])
    return swapped


def _sync(model: nn.Module, changed: list[Unit]) -> None:
    """What diffusers reads besides the Linears: an attention's head count (and inner widths)
    from its q rows, a FLUX single block's MLP width and ``proj_out``'s two input blocks."""
    for unit in changed:
        owner = model.get_submodule(unit.name)
        if unit.kind == "heads":
            owner.heads = owner.to_q.out_features // unit.width
            for attr in ("inner_dim", "inner_kv_dim"):
                if isinstance(getattr(owner, attr, None), int):
                    setattr(owner, attr, owner.to_q.out_features)
        block = model.get_submodule(unit.consumers[0][0].rsplit(".", 1)[0])
        if hasattr(block, "proj_mlp") and hasattr(block, "mlp_hidden_dim"):
            block.mlp_hidden_dim = block.proj_mlp.out_features
            block.proj_out._tp_packed_row_blocks = [block.proj_out.in_features - block.proj_mlp.out_features,
                                                    block.proj_mlp.out_features]


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    if isinstance(owner, nn.ModuleList):
        owner[int(leaf)] = module
    else:
        setattr(owner, leaf, module)


def put_back(model: nn.Module, swapped: dict[str, tuple[nn.Module, nn.Module]], changed: list[Unit]) -> None:
    """Undo :func:`shrink`: the old modules back in place, the attributes that follow them too."""
    for name, (old, _) in swapped.items():
        _set(model, name, old)
    _sync(model, changed)


def resize(model: nn.Module, shapes: dict[str, tuple[int, ...]], blocks: list[tuple[str, nn.Module]]) -> None:
    """Give the Linears of the heads and channels of ``blocks`` the
    weight shapes ``shapes`` (tensor name -> shape, e.g. a checkpoint's), as :func:`shrink` left
    them, on the device and in the dtype they have (``meta`` while a loader builds the model);
    nothing outside those units changes, so a checkpoint that does not fit elsewhere still fails
    to load."""
    found = [u for name, b in blocks for u in units(b, name)]
    names = {n for u in found for n in [p for p, _ in u.producers] + [c for c, _ in u.consumers]}
    for name in sorted(names):
        old = model.get_submodule(name)
        shape = tuple(shapes.get(f"{name}.weight", old.weight.shape))
        if shape == tuple(old.weight.shape):
            continue
        if len(shape) != 2:
            raise InputError(f"'{name}.weight' is stored with shape {shape}; a Linear's weight has two dimensions")
        new = nn.Linear(shape[1], shape[0], bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype)
        _set(model, name, new)
    _sync(model, found)
