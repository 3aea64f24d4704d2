"""Quantization after pruning with torchao ``quantize_``; zeros must stay exactly zero.

| name | torchao config | runs on CPU |
|---|---|---|
| int8_weight_only | Int8WeightOnlyConfig | yes |
| int8_dynamic | Int8DynamicActivationInt8WeightConfig | yes |
| float8_weight_only | Float8WeightOnlyConfig | yes (storage; fast kernels need a GPU) |
| intx_weight_only | IntxWeightOnlyConfig | yes |
| int4_weight_only | Int4WeightOnlyConfig | no: needs a CUDA GPU (and the mslk kernels) |

Symmetric schemes map 0 to the integer 0, so the zeros of a pruned weight survive; ``quantize``
checks this on the dequantized weights and raises if any zero moved.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from . import provenance

__all__ = ["CONFIGS", "check_config", "quantize", "torchao_config"]

CONFIGS = {
    "int8_weight_only": ("Int8WeightOnlyConfig", True),
    "int8_dynamic": ("Int8DynamicActivationInt8WeightConfig", True),
    "float8_weight_only": ("Float8WeightOnlyConfig", True),
    "intx_weight_only": ("IntxWeightOnlyConfig", True),
    "int4_weight_only": ("Int4WeightOnlyConfig", False),
}


def check_config(name: str) -> None:
    if name not in CONFIGS:
        raise ValueError(f"unknown quantization config {name!r}; choose one of {sorted(CONFIGS)}")


def torchao_config(name: str):
    """The torchao config object that ``name`` stands for."""
    check_config(name)
    from ._quiet import torchao as _torchao

    _torchao()
    import torchao.quantization as tq

    return getattr(tq, CONFIGS[name][0])()


def quantize(model: nn.Module, name: str, targets: Sequence[str] | None = None) -> list[str]:
    """Quantize the Linears named in ``targets`` (None: every Linear) in place; returns their names."""
    check_config(name)
    cls_name, on_cpu = CONFIGS[name]
    if not on_cpu and not torch.cuda.is_available():
        raise RuntimeError(f"quantization {name!r} needs a CUDA GPU; on CPU use one of "
                           f"{[n for n, (_, cpu) in CONFIGS.items() if cpu]}")
    wanted = set(targets) if targets is not None else None
    zeros = {n: m.weight == 0 for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and (wanted is None or n in wanted)}
    if not zeros:
        raise ValueError("no nn.Linear to quantize among the targets")
    config = torchao_config(name)
    import torchao.quantization as tq

    tq.quantize_(model, config, filter_fn=lambda m, fqn: fqn in zeros and isinstance(m, nn.Linear))
    for n, was_zero in zeros.items():
        w = model.get_submodule(n).weight
        dense = w.dequantize() if hasattr(w, "dequantize") else w
        if (dense[was_zero] != 0).any():
            raise RuntimeError(f"quantization {name!r} turned pruned zeros of '{n}' into non-zeros")
    provenance.record(model, quantization=name, quantized_layers=len(zeros))
    return list(zeros)
