"""Quality and fidelity metrics. Images are (B, 1, H, W) in [-1, 1].

Stand-ins on the reference models: the judge's accuracy (and mean probability) on the prompted
digit for CLIP score; the Frechet distance between judge features of generated and held-out real
digits for FID. Fidelity to the dense model with the same seeds: the denoiser's relative error,
PSNR and SSIM of final samples (torchmetrics).
"""

from __future__ import annotations

import torch
from torch import nn
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from torchmetrics.image.fid import FrechetInceptionDistance

__all__ = ["judge_scores", "frechet_distance", "psnr", "ssim", "relative_error"]


@torch.no_grad()
def judge_scores(judge: nn.Module, images: torch.Tensor, digits: torch.Tensor) -> tuple[float, float]:
    """(accuracy, mean probability) of the judge on the digit each image was asked to show."""
    probs = judge(images.float()).softmax(-1)
    return (probs.argmax(-1) == digits).float().mean().item(), probs.gather(1, digits[:, None]).mean().item()


class _JudgeFeatures(nn.Module):
    def __init__(self, judge: nn.Module) -> None:
        super().__init__()
        self.judge = judge

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # torchmetrics feeds [0, 1]
        return self.judge.features(x * 2.0 - 1.0)


@torch.no_grad()
def frechet_distance(judge: nn.Module, fake: torch.Tensor, real: torch.Tensor) -> float:
    """Frechet distance between judge-feature Gaussians of ``fake`` and ``real`` images."""
    fid = FrechetInceptionDistance(
        feature=_JudgeFeatures(judge), normalize=True, input_img_size=tuple(real.shape[1:])
    ).double()
    fid.update((real.float() + 1) / 2, real=True)
    fid.update((fake.float() + 1) / 2, real=False)
    return float(fid.compute())


def psnr(images: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR in dB over the batch; infinite for identical images."""
    return float(peak_signal_noise_ratio(images.float(), reference.float(), data_range=2.0))


def ssim(images: torch.Tensor, reference: torch.Tensor) -> float:
    return float(structural_similarity_index_measure(images.float(), reference.float(), data_range=2.0))


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    """||output - reference||^2 / ||reference||^2."""
    return float((output.float() - reference.float()).pow(2).sum() / reference.float().pow(2).sum())
