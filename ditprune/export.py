"""Saving and loading pruned (and quantized) transformers. Loading executes nothing: JSON, and
tensors through safetensors; a model class must be one of diffusers' own.

Layouts of a transformer directory:

- ``diffusers``: what ``save_pretrained`` writes (dense weights, zeros in place): loads anywhere,
  ``FluxTransformer2DModel.from_pretrained`` and ComfyUI included. A model quantized by
  :func:`ditprune.quantize.quantize` is written as diffusers writes its own ``TorchAoConfig``
  models (``quantization_config`` in ``config.json``, safetensors flattened by torchao), which
  ``from_pretrained`` loads (with ``torch_dtype`` for the layers left unquantized).
- ``compressed``: ``config.json`` (the diffusers config), ``ditprune.json``
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
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from . import memory, provenance
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


_CHUNK = 1 << 20  # entries decoded at once (a multiple of 8: chunks start on a byte of the mask)


def _decode_one(get, name: str, e: dict) -> torch.Tensor:
    """One declared tensor from its stored parts (``get(key)``: the stored tensor or None),
    checked against its declaration; a bitmask is scattered a chunk at a time on the stored
    tensors' device, so the only full-size tensor made is the result."""
    if not isinstance(e, dict) or e.get("dtype") not in _DTYPES:
        raise InputError(f"'{name}': declared dtype {e.get('dtype') if isinstance(e, dict) else e!r} is not "
                         f"one of {sorted(_DTYPES)}")
    shape, dtype = _shape(e, name), _DTYPES[e["dtype"]]
    if e.get("encoding") == "dense":
        return _expect(get(name), name, shape, dtype)
    if e.get("encoding") != "bitmask":
        raise InputError(f"'{name}': unknown encoding {e.get('encoding')!r}")
    numel = math.prod(shape)
    bits = _expect(get(f"{name}.mask"), f"{name}.mask", (math.ceil(numel / 8),), torch.uint8)
    values = get(f"{name}.values")
    if values is None:
        raise InputError(f"'{name}.values' is declared in ditprune.json but not stored")
    if values.dim() != 1 or values.dtype != dtype:
        raise InputError(f"'{name}.values': stored {tuple(values.shape)} {values.dtype}, declared a vector of {dtype}")
    raw = _BITS[values.element_size()]  # scattered as raw bits: float8 has no masked_scatter
    source, out, used = values.view(raw), torch.zeros(numel, dtype=raw, device=values.device), 0
    for start in range(0, numel, _CHUNK):
        stop = min(start + _CHUNK, numel)
        keep = unpack(bits[start // 8: math.ceil(stop / 8)], (stop - start,))
        n = int(keep.sum())
        if used + n <= source.numel():
            out[start:stop].masked_scatter_(keep, source[used:used + n])
        used += n
    if used != source.numel():
        raise InputError(f"'{name}.values': stored {source.numel()} values, the mask marks {used}")
    return out.view(dtype).reshape(shape)


def decode(stored: dict[str, torch.Tensor], entries: dict[str, dict]) -> dict[str, torch.Tensor]:
    """The tensors :func:`encode` was given. Every declared shape, dtype and count is checked
    against what is stored (so nothing is allocated beyond the bytes present), and every stored
    tensor must be declared."""
    if not isinstance(entries, dict):
        raise InputError("ditprune.json: 'tensors' is not a mapping")
    _check_declared(stored.keys(), entries)
    return {name: _decode_one(stored.get, name, e) for name, e in entries.items()}


def _stored_names(name: str, e: dict) -> tuple[str, ...]:
    return (f"{name}.mask", f"{name}.values") if isinstance(e, dict) and e.get("encoding") == "bitmask" else (name,)


def _check_declared(stored, entries: dict[str, dict]) -> None:
    declared = {k for name, e in entries.items() for k in _stored_names(name, e)}
    extra = sorted(set(stored) - declared)
    if extra:
        raise InputError(f"weights.safetensors holds tensors ditprune.json does not declare: {extra[:3]}")


def save_transformer(model: nn.Module, path: str | Path, format: str = "diffusers") -> Path:
    """Write ``model`` (a diffusers model) into the directory ``path``, with its pruning record
    (:mod:`ditprune.provenance`). ``"diffusers"``: ``save_pretrained``; a model quantized by
    :func:`ditprune.quantize.quantize` is written as diffusers writes its own ``TorchAoConfig``
    models, so ``from_pretrained`` loads it. ``"compressed"``: the layout of the module docstring."""
    if format not in FORMATS:
        raise InputError(f"export format must be one of {FORMATS}, got {format!r}")
    path = Path(path)
    quantized = is_quantized(model)
    if format == "diffusers":
        if quantized and provenance.recorded(model).get("structure"):
            raise InputError("a structurally pruned, quantized transformer is saved with format='compressed' "
                             "(diffusers' loader cannot build its smaller quantized Linears)")
        if quantized and getattr(model, "hf_quantizer", None) is None:
            _save_torchao_diffusers(model, path)
        else:
            model.save_pretrained(path, safe_serialization=True)
        _chmod_files(path)
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
            "torchao": torchao_meta, "pruning": provenance.recorded(model)}
    (path / "ditprune.json").write_text(json.dumps(info, indent=1) + "\n")
    _chmod_files(path)
    return path


def _chmod_files(path: Path) -> None:
    """Files as ``open()`` would create them under the umask (safetensors writes 0600)."""
    from ._io import _umask

    mode = 0o666 & ~_umask()
    for file in path.iterdir():
        if file.is_file():
            file.chmod(mode)


def _save_torchao_diffusers(model: nn.Module, path: Path) -> None:
    """What diffusers writes for a model it quantized itself (``TorchAoConfig``): the config
    with its ``quantization_config``, and safetensors flattened by torchao. A diffusers
    quantizer is attached for the write and removed after."""
    name = provenance.recorded(model).get("quantization")
    if name is None:
        raise InputError("this model was quantized outside ditprune, so the torchao config diffusers would record "
                         "is unknown; save it with format='compressed' or quantize with ditprune.quantize")
    from ._quiet import diffusers as _diffusers

    _diffusers()
    from diffusers import TorchAoConfig
    from diffusers.quantizers import DiffusersAutoQuantizer

    from .quantize import torchao_config

    dense = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and type(m.weight) is nn.Parameter]
    config = TorchAoConfig(torchao_config(name), modules_to_not_convert=dense or None)
    quantizer = DiffusersAutoQuantizer.from_config(config, pre_quantized=True)
    quantizer.validate_environment(device_map=None)
    before = dict(model.config)
    model.hf_quantizer = quantizer
    model.register_to_config(quantization_config=config)
    try:
        model.save_pretrained(path, safe_serialization=True)
    finally:
        del model.hf_quantizer
        model._internal_dict = type(model._internal_dict)(before)


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


def _check_dtypes(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> None:
    """A stored tensor may change a floating parameter's precision, nothing else: integer and
    bool tensors, and float64, stay where the model has them."""
    floats = (torch.float32, torch.float16, torch.bfloat16)
    for name, got in state.items():
        want = expected.get(name)
        if want is None or type(got) is not torch.Tensor:  # torchao tensors: checked by torchao
            continue
        ok = got.dtype in floats if want.is_floating_point() else got.dtype == want.dtype
        if not ok:
            raise InputError(f"'{name}' is stored as {got.dtype}; the model holds {want.dtype} there")


def _module_of(name: str) -> str:
    """``"a.b"`` for ``"a.b.weight"`` and for torchao's flattened ``"a.b._weight_qdata"``."""
    return name.rsplit(".", 1)[0] if "." in name else ""


def _stream(weights: Path, entries: dict, keys: set[str], torchao: dict | None, device: torch.device, where: Path):
    """(module name, its decoded state) one module at a time, read onto ``device`` (``keys``: the
    names the file stores, from its header). The file is opened (memory-mapped) per module and
    closed before decoding, so what the host holds at once beyond the model is one module's
    stored bytes."""
    if torchao:
        from ._quiet import torchao as _torchao

        _torchao()
        from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict
    groups: dict[str, list[str]] = {}
    for name in entries:
        groups.setdefault(_module_of(name), []).append(name)
    names = json.loads(torchao["tensor_names"]) if torchao else []
    by_module: dict[str, list[str]] = {}
    for n in names:
        by_module.setdefault(_module_of(n), []).append(n)
    for prefix, members in groups.items():
        try:
            with safe_open(str(weights), framework="pt", device=str(device)) as f:
                stored = {k: f.get_tensor(k) for name in members for k in _stored_names(name, entries[name])
                          if k in keys}
        except Exception as e:  # safetensors' own checks: a truncated or malformed file
            raise InputError(f"{weights}: not a valid safetensors file ({e})") from None
        part = {name: _decode_one(stored.get, name, entries[name]) for name in members}
        del stored  # safetensors' CPU tensors map the file: a dense one is copied out so the mapping goes
        part = {n: t.clone() if t.device.type == "cpu" and entries[n].get("encoding") == "dense" else t
                for n, t in part.items()}
        memory.release()  # the decoding's temporaries back to the system (see ditprune.memory.release)
        if torchao:
            mine = by_module.get(prefix, [])
            meta = {n: torchao[n] for n in mine if n in torchao}
            part, leftover = unflatten_tensor_state_dict(part, {**meta, "tensor_names": json.dumps(mine)})
            if leftover:
                raise InputError(f"{where}: tensors that torchao's metadata does not describe: {sorted(leftover)[:3]}")
        yield prefix, part


def _load_structured(cls, path: Path, device: torch.device) -> nn.Module:
    """A diffusers export of a structurally pruned model (its record says so): built from the
    config without weights, its heads and channels resized to the stored shapes
    (:func:`ditprune.surgery.resize`), then every stored tensor assigned; the same checks of
    names and dtypes as the other layouts."""
    from accelerate import init_empty_weights
    from safetensors.torch import load_file

    from . import models
    from .surgery import resize

    files = sorted(path.glob("*.safetensors"))
    shapes = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    with init_empty_weights():
        model = cls.from_config(cls.load_config(path, local_files_only=True))
    model.requires_grad_(False)
    resize(model, shapes, models.blocks(model))
    expected = model.state_dict()
    state = {}
    for file in files:
        state.update(load_file(str(file), device=str(device)))
    _check_dtypes(expected, state)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise InputError(f"{path}: the stored tensors do not fit {cls.__name__} "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise InputError(f"{path}: the stored tensors do not fit {cls.__name__} ({str(e).splitlines()[0]})") from None
    provenance.store(model, provenance.read(path))
    return model.to(device).eval()


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
        if provenance.read(path).get("structure"):  # smaller Linears than the config says: not from_pretrained's
            return _load_structured(cls, path, torch.device(device))
        from ._quiet import quiet_loading

        with quiet_loading():
            model = cls.from_pretrained(path, use_safetensors=True, dtype=_saved_dtype(path), local_files_only=True)
        provenance.store(model, provenance.read(path))
        return model.to(device).eval()
    info = _read_json(info_file)
    if info.get("format") != "ditprune" or info.get("version") != VERSION:
        raise InputError(f"{info_file}: not a ditprune layout of version {VERSION}")
    cls = _model_class(info.get("class"))
    weights = path / "weights.safetensors"
    if not weights.is_file():
        raise InputError(f"{path}: no weights.safetensors")
    _check_config(config, [weights], path / "config.json")
    entries = info.get("tensors")
    if not isinstance(entries, dict):
        raise InputError(f"{info_file}: 'tensors' is not a mapping")
    try:
        with safe_open(str(weights), framework="pt") as f:  # the header only
            keys = set(f.keys())
        _check_declared(keys, entries)
    except InputError:
        raise
    except Exception as e:  # safetensors' own header checks: a truncated or malformed file
        raise InputError(f"{weights}: not a valid safetensors file ({e})") from None
    from accelerate import init_empty_weights

    with init_empty_weights():  # parameters on "meta", buffers computed: the stored tensors fill the rest
        try:
            model = cls.from_config(cls.load_config(path, local_files_only=True))
        except (TypeError, ValueError) as e:
            raise InputError(f"{path / 'config.json'}: {cls.__name__} cannot be built from it ({e})") from None
    model.requires_grad_(False)
    if provenance.read(path).get("structure"):
        from . import models
        from .surgery import resize

        shapes = {n.removesuffix("._weight_qdata") + ".weight" if n.endswith("._weight_qdata") else n: _shape(e, n)
                  for n, e in entries.items()}  # a torchao weight's data has the weight's shape
        resize(model, shapes, models.blocks(model))
    expected = model.state_dict()
    for prefix, part in _stream(weights, entries, keys, info.get("torchao"), torch.device(device), path):
        _check_dtypes(expected, part)
        try:
            module = model.get_submodule(prefix) if prefix else model
        except AttributeError:
            raise InputError(f"{path}: {cls.__name__} has no module '{prefix}' for the stored tensors") from None
        local = {k[len(prefix) + 1 if prefix else 0:]: v for k, v in part.items()}
        try:
            result = module.load_state_dict(local, strict=False, assign=True)
        except RuntimeError as e:
            raise InputError(f"{path}: the stored tensors do not fit {cls.__name__} ({str(e).splitlines()[0]})") from None
        if result.unexpected_keys:
            raise InputError(f"{path}: {cls.__name__} has no '{prefix}.{result.unexpected_keys[0]}'")
        for k in part:
            expected.pop(k, None)
    if expected:
        raise InputError(f"{path}: {cls.__name__} needs tensors that are not stored: {sorted(expected)[:3]}")
    provenance.store(model, provenance.read(path))
    return model.to(device).eval()
