"""Saving and loading pruned (and quantized) transformers. Loading executes nothing: JSON, and
tensors through safetensors; a model class must be one of diffusers' own.

Layouts of a transformer directory:

- ``diffusers``: what ``save_pretrained`` writes (dense weights, zeros in place): loads anywhere,
  ``FluxTransformer2DModel.from_pretrained`` and ComfyUI included.
- ``compressed`` and quantized models: ``config.json`` (the diffusers config), ``ditprune.json``
  (the format, below) and ``weights.safetensors``. A 2-D tensor whose zeros make it smaller that
  way is stored as ``<name>.values`` (its non-zero values, row-major, in its own dtype) and
  ``<name>.mask`` (uint8: the non-zero pattern, one bit per entry, row-major, bit i of byte k is
  entry 8k + i); every other tensor is stored as is under its name. At 50% sparsity a bf16
  weight takes 1.125 bytes per entry instead of 2; a 2:4 weight the same (values plus 2-bit
  in-group indices would cost exactly as much, so one encoding serves both). Quantized models
  (torchao ``Int8Tensor``, ``Float8Tensor``, ``IntxUnpackedToInt8Tensor``, ...) are first
  flattened by ``torchao.prototype.safetensors`` into plain tensors plus JSON; the int8 data
  is then compressed like any other tensor, so pruned zeros stay zeros and cost one bit.

``ditprune.json``::

    {"format": "ditprune", "version": 1, "class": "FluxTransformer2DModel",
     "tensors": {"<name>": {"encoding": "bitmask" | "dense", "shape": [...], "dtype": "bfloat16"}},
     "torchao": null | {<the metadata of flatten_tensor_state_dict>}}
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import InputError
from .masks import pack, unpack

__all__ = ["FORMATS", "save_transformer", "load_transformer", "is_quantized", "encode", "decode"]

FORMATS = ("diffusers", "compressed")
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
VERSION = 1


def is_quantized(model: nn.Module) -> bool:
    """Some parameter is a torchao tensor subclass."""
    return any(type(p) not in (torch.Tensor, nn.Parameter) for p in model.parameters())


def encode(tensors: dict[str, torch.Tensor], compress: bool) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """(safetensors entries, per-tensor encodings): 2-D tensors that are smaller as mask + values
    become that when ``compress``; every other tensor is stored as is."""
    out, entries = {}, {}
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        if compress and t.dim() == 2 and (t.is_floating_point() or t.dtype == torch.int8):
            raw = t.view(_BITS[t.element_size()])
            nonzero = raw != 0  # by bits: -0.0 is stored as a value, so it comes back -0.0
            nnz = int(nonzero.sum())
            if nnz * t.element_size() + math.ceil(t.numel() / 8) < t.numel() * t.element_size():
                out[f"{name}.values"] = raw[nonzero].view(t.dtype)
                out[f"{name}.mask"] = pack(nonzero.cpu())
                entries[name] = {"encoding": "bitmask", "shape": list(t.shape), "dtype": str(t.dtype).split(".")[-1]}
                continue
        out[name] = t
        entries[name] = {"encoding": "dense", "shape": list(t.shape), "dtype": str(t.dtype).split(".")[-1]}
    return out, entries


_DTYPES = {str(d).split(".")[-1]: d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8,
                                               torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool,
                                               torch.float8_e4m3fn, torch.float8_e5m2)}


def _shape(e: dict, name: str) -> tuple[int, ...]:
    shape = e.get("shape")
    if not isinstance(shape, list) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
        raise InputError(f"'{name}': declared shape {shape!r} is not a list of non-negative integers")
    return tuple(shape)


def _expect(t: torch.Tensor | None, name: str, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    if t is None:
        raise InputError(f"'{name}' is declared in ditprune.json but not stored")
    if tuple(t.shape) != shape or t.dtype != dtype:
        raise InputError(f"'{name}': stored {tuple(t.shape)} {t.dtype}, declared {shape} {dtype}")
    return t


def decode(stored: dict[str, torch.Tensor], entries: dict[str, dict]) -> dict[str, torch.Tensor]:
    """The tensors :func:`encode` was given. Every declared shape, dtype and count is checked
    against what is stored (so nothing is allocated beyond the bytes present), and every stored
    tensor must be declared."""
    if not isinstance(entries, dict):
        raise InputError("ditprune.json: 'tensors' is not a mapping")
    out, used = {}, set()
    for name, e in entries.items():
        if not isinstance(e, dict) or e.get("dtype") not in _DTYPES:
            raise InputError(f"'{name}': declared dtype {e.get('dtype') if isinstance(e, dict) else e!r} is not "
                             f"one of {sorted(_DTYPES)}")
        shape, dtype = _shape(e, name), _DTYPES[e["dtype"]]
        if e.get("encoding") == "dense":
            out[name] = _expect(stored.get(name), name, shape, dtype)
            used.add(name)
        elif e.get("encoding") == "bitmask":
            numel = math.prod(shape)
            bits = _expect(stored.get(f"{name}.mask"), f"{name}.mask", (math.ceil(numel / 8),), torch.uint8)
            nonzero = unpack(bits, shape)
            values = _expect(stored.get(f"{name}.values"), f"{name}.values", (int(nonzero.sum()),), dtype)
            used.update((f"{name}.mask", f"{name}.values"))
            # scattered as raw bits (every dtype has an integer of its size; float8 has no masked_scatter)
            raw = _BITS[values.element_size()]
            out[name] = torch.zeros(shape, dtype=raw).masked_scatter_(nonzero, values.view(raw)).view(values.dtype)
        else:
            raise InputError(f"'{name}': unknown encoding {e.get('encoding')!r}")
    extra = sorted(set(stored) - used)
    if extra:
        raise InputError(f"weights.safetensors holds tensors ditprune.json does not declare: {extra[:3]}")
    return out


def save_transformer(model: nn.Module, path: str | Path, format: str = "diffusers") -> Path:
    """Write ``model`` (a diffusers model) into the directory ``path``. ``"diffusers"``: dense
    ``save_pretrained`` (a quantized model is written in ditprune's layout, uncompressed:
    diffusers cannot load torchao tensors it did not quantize itself); ``"compressed"``: the
    layout of the module docstring."""
    if format not in FORMATS:
        raise InputError(f"export format must be one of {FORMATS}, got {format!r}")
    path = Path(path)
    quantized = is_quantized(model)
    if format == "diffusers" and not quantized:
        model.save_pretrained(path, safe_serialization=True)
        return path
    path.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    torchao_meta = None
    if quantized:
        from ._quiet import torchao as _torchao

        _torchao()
        from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

        state, torchao_meta = flatten_tensor_state_dict(state)
    stored, entries = encode(state, compress=format == "compressed")
    save_file(stored, str(path / "weights.safetensors"), metadata={"format": "ditprune"})
    model.save_config(path)
    info = {"format": "ditprune", "version": VERSION, "class": type(model).__name__, "tensors": entries,
            "torchao": torchao_meta}
    (path / "ditprune.json").write_text(json.dumps(info, indent=1) + "\n")
    return path


def _model_class(name: str):
    from ._quiet import diffusers as _diffusers

    diffusers = _diffusers()

    cls = getattr(diffusers, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin)):
        raise InputError(f"'{name}' is not a diffusers model class; ditprune only builds diffusers' own classes")
    return cls


def _saved_dtype(path: Path) -> torch.dtype | None:
    """The dtype of the first floating tensor in a diffusers directory's safetensors (header only):
    diffusers would load float32 otherwise."""
    from safetensors import safe_open

    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                t = f.get_slice(key)
                dtype = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}.get(t.get_dtype())
                if dtype is not None:
                    return dtype
    return None


def _read_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{file}: not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise InputError(f"{file}: not a JSON object")
    return data


def _stored_numel(files: list[Path]) -> int:
    """How many numbers the safetensors files hold, from their headers alone."""
    from safetensors import safe_open

    total = 0
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            total += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return total


def _check_config(config: dict, files: list[Path], where: Path) -> None:
    """A config may not ask the loader to build more than the files hold: every integer in it
    (layer counts, widths, heads) is at most the number of stored values (or 65536)."""
    bound = max(_stored_numel(files), 1 << 16)
    for key, value in config.items():
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, int) and not isinstance(v, bool) and not -bound <= v <= bound:
                raise InputError(f"{where}: '{key}' = {v} is larger than the {bound} values the weights hold; "
                                 "the config does not describe these weights")


def _check_dtypes(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """A stored tensor may change a floating parameter's precision, nothing else: integer and
    bool tensors, and float64, stay where the model has them."""
    floats = (torch.float32, torch.float16, torch.bfloat16)
    for name, want in model.state_dict().items():
        got = state.get(name)
        if got is None or type(got) is not torch.Tensor:  # torchao tensors: checked by torchao
            continue
        ok = got.dtype in floats if want.is_floating_point() else got.dtype == want.dtype
        if not ok:
            raise InputError(f"'{name}' is stored as {got.dtype}; the model holds {want.dtype} there")


def load_transformer(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """A transformer saved by ditprune (any layout) or by ``save_pretrained``, in eval mode.
    Nothing is executed, nothing is fetched from a hub (``local_files_only``), and what the
    config and ``ditprune.json`` declare is checked against the bytes present before anything
    is built."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise InputError(f"{path} is not a saved transformer (no config.json)")
    config = _read_json(path / "config.json")
    info_file = path / "ditprune.json"
    if not info_file.is_file():
        cls = _model_class(config.get("_class_name"))
        _check_config(config, sorted(path.glob("*.safetensors")), path / "config.json")
        from ._quiet import quiet_loading

        with quiet_loading():
            return cls.from_pretrained(path, use_safetensors=True, dtype=_saved_dtype(path),
                                       local_files_only=True).to(device).eval()
    info = _read_json(info_file)
    if info.get("format") != "ditprune" or info.get("version") != VERSION:
        raise InputError(f"{info_file}: not a ditprune layout of version {VERSION}")
    cls = _model_class(info.get("class"))
    weights = path / "weights.safetensors"
    if not weights.is_file():
        raise InputError(f"{path}: no weights.safetensors")
    _check_config(config, [weights], path / "config.json")
    try:
        stored = load_file(str(weights))
    except Exception as e:  # safetensors' own header checks: a truncated or malformed file
        raise InputError(f"{weights}: not a valid safetensors file ({e})") from None
    state = decode(stored, info.get("tensors"))
    if info.get("torchao"):
        from ._quiet import torchao as _torchao

        _torchao()
        from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

        state, leftover = unflatten_tensor_state_dict(state, info["torchao"])
        if leftover:
            raise InputError(f"{path}: tensors that torchao's metadata does not describe: {sorted(leftover)[:3]}")
    from accelerate import init_empty_weights

    with init_empty_weights():  # parameters on "meta", buffers computed: the state dict fills the rest
        try:
            model = cls.from_config(cls.load_config(path, local_files_only=True))
        except (TypeError, ValueError) as e:
            raise InputError(f"{path / 'config.json'}: {cls.__name__} cannot be built from it ({e})") from None
    model.requires_grad_(False)
    _check_dtypes(model, state)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise InputError(f"{path}: the stored tensors do not fit {cls.__name__} ({str(e).splitlines()[0]})") from None
    return model.to(device).eval()
