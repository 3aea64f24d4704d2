"""What a pruned model is worth to its user: compressed and quantized checkpoints that load back
bit for bit, smaller files, pipelines that take them, and 2:4 kernels only where they pay."""

import json

import pytest
import torch
from safetensors.torch import load_file

import ditprune
from ditprune.errors import InputError
from ditprune.export import decode, encode, load_transformer, save_transformer
from ditprune.models.tiny import tiny_batches, tiny_model
from ditprune.quantize import quantize


def _bits(t):
    return t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int16) if t.element_size() == 2 else t


def _pruned(family="flux", dtype=torch.float32, **setting):
    model = tiny_model(family).to(dtype)
    report = ditprune.prune(model, tiny_batches(model), method="wanda", **(setting or {"sparsity": 0.5}))
    return model, [r.name for r in report.layers]


def _size(path):
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and p.suffix == ".safetensors")


def test_encode_decode_hand_computed():
    t = torch.tensor([[0.0, 1.5, 0.0, -2.0], [3.0, 0.0, 0.0, 0.0]])
    stored, entries = encode({"w": t, "b": torch.ones(3)}, compress=True)
    assert entries["w"]["encoding"] == "bitmask" and entries["b"]["encoding"] == "dense"
    assert stored["w.values"].tolist() == [1.5, -2.0, 3.0]
    assert stored["w.mask"].tolist() == [0b00011010]  # bits of entries 1, 3 and 4, little-endian
    assert torch.equal(decode(stored, entries)["w"], t)


@pytest.mark.parametrize("setting", [{"sparsity": 0.5}, {"pattern": "2:4"}])
def test_compressed_is_bit_identical_to_dense_and_smaller(tmp_path, setting):
    model, _ = _pruned(dtype=torch.bfloat16, **setting)
    save_transformer(model, tmp_path / "dense")
    save_transformer(model, tmp_path / "compressed", "compressed")
    dense, compressed = load_transformer(tmp_path / "dense"), load_transformer(tmp_path / "compressed")
    a, b = dense.state_dict(), compressed.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(_bits(a[k]), _bits(b[k])) for k in a)
    info = json.loads((tmp_path / "compressed" / "ditprune.json").read_text())
    packed = [n for n, e in info["tensors"].items() if e["encoding"] == "bitmask"]
    assert len(packed) == len(ditprune.resolve_targets(model))  # every pruned weight, nothing else
    # the pruned weights alone: at most 0.6x their dense bf16 bytes
    raw = load_file(str(tmp_path / "compressed" / "weights.safetensors"))
    packed_bytes = sum(raw[f"{n}.values"].nbytes + raw[f"{n}.mask"].nbytes for n in packed)
    dense_bytes = sum(a[n].nbytes for n in packed)
    assert packed_bytes <= 0.6 * dense_bytes


@pytest.mark.parametrize("config", ["int8_weight_only", "float8_weight_only", "intx_weight_only"])
@pytest.mark.parametrize("fmt", ["diffusers", "compressed"])
def test_quantized_round_trip_keeps_every_pruned_zero(tmp_path, config, fmt):
    model, targets = _pruned()
    zeros = {n: model.get_submodule(n).weight == 0 for n in targets}
    quantize(model, config, targets=targets)
    save_transformer(model, tmp_path / "q", fmt)
    loaded = load_transformer(tmp_path / "q")
    for n in targets:
        before, after = model.get_submodule(n).weight, loaded.get_submodule(n).weight
        assert type(after) is type(before)
        assert all(torch.equal(getattr(before, k), getattr(after, k)) for k in before.tensor_data_names)
        assert (after.dequantize()[zeros[n]] == 0).all(), n
    batch = tiny_batches(model)[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).sample, model(**batch).sample)


def test_sparse_and_int8_take_at_most_a_third_of_dense_bf16(tmp_path):
    model, targets = _pruned(dtype=torch.bfloat16)
    dense_bf16 = sum(model.get_submodule(n).weight.nbytes for n in targets)
    quantize(model, "int8_weight_only", targets=targets)
    save_transformer(model, tmp_path / "q", "compressed")
    raw = load_file(str(tmp_path / "q" / "weights.safetensors"))
    data = sum(t.nbytes for k, t in raw.items() if any(k.startswith(f"{n}._weight_qdata") for n in targets))
    scales = sum(t.nbytes for k, t in raw.items() if any(k.startswith(f"{n}._weight_scale") for n in targets))
    assert data <= 0.35 * dense_bf16  # int8 values of the kept weights + one bit per weight: 0.3125x
    rows = sum(model.get_submodule(n).weight.shape[0] for n in targets)
    assert scales <= 4 * rows  # one float32 scale per output row (0.1% of a 3072-wide FLUX row)


def test_loading_builds_only_diffusers_classes(tmp_path):
    model, _ = _pruned()
    save_transformer(model, tmp_path / "m", "compressed")
    info = json.loads((tmp_path / "m" / "ditprune.json").read_text())
    (tmp_path / "m" / "ditprune.json").write_text(json.dumps({**info, "class": "os.system"}))
    with pytest.raises(InputError, match="not a diffusers model class"):
        load_transformer(tmp_path / "m")
    with pytest.raises(InputError, match="no config.json"):
        load_transformer(tmp_path)


@pytest.mark.parametrize("config", ["int8_weight_only", "int8_dynamic", "float8_weight_only"])
def test_quantized_diffusers_export_loads_in_diffusers(tmp_path, config):
    from diffusers import FluxTransformer2DModel

    model, targets = _pruned()
    zeros = {n: model.get_submodule(n).weight == 0 for n in targets}
    quantize(model, config, targets=targets[:-1])  # one targeted Linear left unquantized
    config_before = dict(model.config)
    save_transformer(model, tmp_path / "q", "diffusers")
    assert not hasattr(model, "hf_quantizer") and dict(model.config) == config_before  # the model is as it was
    saved = json.loads((tmp_path / "q" / "config.json").read_text())
    assert saved["quantization_config"]["quant_method"] == "torchao"
    assert saved["_ditprune"]["method"] == "wanda" and saved["_ditprune"]["quantization"] == config
    loaded = FluxTransformer2DModel.from_pretrained(tmp_path / "q", torch_dtype=torch.float32)
    for n in targets:
        before, after = model.get_submodule(n).weight, loaded.get_submodule(n).weight
        assert type(after) is type(before), n
        dense = after.dequantize() if hasattr(after, "dequantize") else after
        assert (dense[zeros[n]] == 0).all(), n
        assert torch.equal(dense, before.dequantize() if hasattr(before, "dequantize") else before), n
    batch = tiny_batches(model)[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).sample, model(**batch).sample)


def test_a_model_quantized_elsewhere_is_refused_for_the_diffusers_format(tmp_path):
    import torchao.quantization as tq

    model, _ = _pruned()
    tq.quantize_(model, tq.Int8WeightOnlyConfig())
    with pytest.raises(InputError, match="quantized outside ditprune"):
        save_transformer(model, tmp_path / "q", "diffusers")
    save_transformer(model, tmp_path / "c", "compressed")  # ditprune's layout needs no config name
    assert (tmp_path / "c" / "weights.safetensors").is_file()


@pytest.mark.parametrize("variant", ["dense", "compressed", "int8"])
def test_exports_load_back_into_their_pipeline(tiny_pipeline_dir, tmp_path, variant):
    import diffusers

    pipe = diffusers.DiTPipeline.from_pretrained(tiny_pipeline_dir)
    transformer = pipe.transformer
    report = ditprune.prune(transformer, tiny_batches(transformer), method="wanda", sparsity=0.5)
    if variant == "int8":
        quantize(transformer, "int8_weight_only", targets=[r.name for r in report.layers])
    save_transformer(transformer, tmp_path / "transformer", "diffusers" if variant == "dense" else "compressed")
    loaded = diffusers.DiTPipeline.from_pretrained(tiny_pipeline_dir,
                                                   transformer=ditprune.load_transformer(tmp_path / "transformer"))
    loaded.set_progress_bar_config(disable=True)
    images = loaded(class_labels=[1, 2], num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                    output_type="pt").images
    reference = pipe(class_labels=[1, 2], num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                     output_type="pt").images
    assert torch.isfinite(images).all()
    torch.testing.assert_close(images, reference)


def test_accelerate_explains_itself_and_keeps_the_outputs():
    """Without a GPU nothing changes and the report says why. With one (bf16, on the device),
    every 2:4 Linear is either converted, with outputs equal to the dense computation, or kept
    dense with its reason."""
    from ditprune.kernels import is_n_m

    model, names = _pruned(pattern="2:4")
    w = model.get_submodule(names[0]).weight
    assert is_n_m(w) and not is_n_m(torch.ones(4, 8))
    if not torch.cuda.is_available():
        report = ditprune.accelerate(model)
        assert report["converted"] == [] and "no CUDA GPU" in report["why"]
        return
    model = model.to("cuda", torch.bfloat16)
    x = torch.randn(4096, w.shape[1], device="cuda", dtype=torch.bfloat16)
    layer = model.get_submodule(names[0])
    before = layer(x)
    report = ditprune.accelerate(model, min_speedup=0.0)  # convert wherever the kernels run
    for name in names:
        assert name in report["converted"] or name in report["dense"], name
    if names[0] in report["converted"]:
        torch.testing.assert_close(layer(x), before, rtol=2e-2, atol=2e-2)


def test_whole_flux_size_counts_each_block_19_or_38_times(tmp_path):
    from ditprune.deploybench import flux_dev_bytes

    model = tiny_model("flux").to(torch.bfloat16)  # 1 double, 2 single blocks: same shapes within a kind
    path = save_transformer(model, tmp_path / "t")
    nbytes = {"transformer_blocks.": 0, "single_transformer_blocks.": 0, "": 0}
    for name, t in model.state_dict().items():
        nbytes[next(p for p in nbytes if name.startswith(p))] += t.numel() * 2
    assert flux_dev_bytes(path, double=1, single=2) == sum(nbytes.values())
    per_double, per_single = nbytes["transformer_blocks."], nbytes["single_transformer_blocks."] // 2
    assert flux_dev_bytes(path) == nbytes[""] + 19 * per_double + 38 * per_single


def test_negative_zero_comes_back_negative_zero():
    t = torch.tensor([[-0.0, 1.5, 0.0, 0.0], [0.0, 0.0, -0.0, 2.0]])
    for dtype in (torch.float32, torch.bfloat16):
        stored, entries = encode({"w": t.to(dtype)}, compress=True)
        assert entries["w"]["encoding"] == "bitmask"
        assert torch.equal(_bits(decode(stored, entries)["w"]), _bits(t.to(dtype)))


def _crafted(tmp_path, name, edit_info=None, edit_config=None, edit_tensors=None):
    """A compressed export of a pruned tiny FLUX with one part edited."""
    from safetensors.torch import save_file

    model, _ = _pruned()
    path = save_transformer(model, tmp_path / name, "compressed")
    if edit_info:
        info = json.loads((path / "ditprune.json").read_text())
        edit_info(info)
        (path / "ditprune.json").write_text(json.dumps(info))
    if edit_config:
        config = json.loads((path / "config.json").read_text())
        edit_config(config)
        (path / "config.json").write_text(json.dumps(config))
    if edit_tensors:
        tensors = load_file(str(path / "weights.safetensors"))
        edit_tensors(tensors)
        save_file(tensors, str(path / "weights.safetensors"))
    return path


def _first_bitmask(info):
    return next(k for k, e in info["tensors"].items() if e["encoding"] == "bitmask")


def _truncate(t):
    mask_key = next(k for k in t if k.endswith(".mask"))
    name = mask_key[: -len(".mask")]
    t[mask_key] = t[mask_key][: len(t[mask_key]) // 2].clone()
    ones = int(torch.from_numpy(__import__("numpy").unpackbits(t[mask_key].numpy())).sum())
    t[f"{name}.values"] = t[f"{name}.values"][:ones].clone()  # values cut to match the shorter mask


CRAFTED = {
    "huge declared shape": dict(edit_info=lambda i: i["tensors"][_first_bitmask(i)].update(shape=[100000, 100000])),
    "negative shape": dict(edit_info=lambda i: i["tensors"][_first_bitmask(i)].update(shape=[-4, 8])),
    "declared int64": dict(edit_info=lambda i: i["tensors"][_first_bitmask(i)].update(dtype="int64")),
    "unknown dtype": dict(edit_info=lambda i: i["tensors"][_first_bitmask(i)].update(dtype="object")),
    "truncated mask, values cut to match": dict(edit_tensors=_truncate),
    "undeclared tensor": dict(edit_tensors=lambda t: t.update(extra=torch.zeros(3))),
    "stored as int64": dict(edit_tensors=lambda t: t.update({k: t[k].long() for k in t if k.endswith(".bias")}),
                            edit_info=lambda i: [e.update(dtype="int64") for k, e in i["tensors"].items()
                                                 if k.endswith(".bias")]),
    "ten million layers": dict(edit_config=lambda c: c.update(num_layers=10_000_000)),
    "a million heads": dict(edit_config=lambda c: c.update(num_attention_heads=1_000_000)),
    "tensors not a mapping": dict(edit_info=lambda i: i.update(tensors=[1, 2])),
}


@pytest.mark.parametrize("case", list(CRAFTED))
def test_crafted_exports_are_refused_with_ditprunes_error(tmp_path, case):
    path = _crafted(tmp_path, "m", **CRAFTED[case])
    with pytest.raises(InputError):
        load_transformer(path)


def test_a_plain_diffusers_export_never_reaches_a_hub(tmp_path, monkeypatch):
    model, _ = _pruned()
    path = save_transformer(model, tmp_path / "d", "diffusers")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "_name_or_path": "black-forest-labs/FLUX.1-dev"}))
    import huggingface_hub

    def no_network(*a, **k):
        raise AssertionError("the loader reached for the hub")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    loaded = load_transformer(path)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    (path / "config.json").write_text(json.dumps({**config, "num_layers": 10_000_000}))
    with pytest.raises(InputError, match="num_layers"):
        load_transformer(path)
