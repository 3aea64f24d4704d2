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

__all__ = ["judge_scores", "frechet_distance", "frechet", "psnr", "ssim", "ssim_per_image", "relative_error",
           "bootstrap", "wilson"]


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


def frechet(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to feature sets ``a`` and ``b`` (rows), in float64."""
    import numpy as np
    from scipy import linalg

    import warnings

    a, b = a.double().cpu().numpy(), b.double().cpu().numpy()
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    # fewer samples than features: singular, handled below; a zero product (identical constant
    # features) makes sqrtm's own error estimate 0/0, which is not a problem of the result
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean, _ = linalg.sqrtm(s1 @ s2, disp=False)
        if not np.isfinite(covmean).all():
            eps = 1e-6 * np.eye(s1.shape[0])
            covmean = linalg.sqrtm((s1 + eps) @ (s2 + eps))
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean.real))


def bootstrap(fn, *arrays: torch.Tensor, n: int = 1000, seed: int = 0, paired: bool = True,
              centred: bool = False) -> tuple[float, float, float]:
    """(estimate, 2.5%, 97.5%) of ``fn(*arrays)`` with rows resampled (together when ``paired``).
    ``centred``: for a statistic that resampling biases (a Fréchet distance grows when images are
    duplicated), the resamples' spread is moved to sit around the estimate:
    [est + q2.5 - mean, est + q97.5 - mean], at least 0."""
    import numpy as np

    g = torch.Generator().manual_seed(seed)
    estimate = float(fn(*arrays))
    stats = []
    for _ in range(n):
        if paired:
            idx = torch.randint(0, len(arrays[0]), (len(arrays[0]),), generator=g)
            stats.append(float(fn(*(x[idx] for x in arrays))))
        else:
            stats.append(float(fn(*(x[torch.randint(0, len(x), (len(x),), generator=g)] for x in arrays))))
    lo, hi = np.percentile(stats, [2.5, 97.5])
    if centred:
        shift = estimate - float(np.mean(stats))
        return estimate, max(0.0, float(lo) + shift), max(0.0, float(hi) + shift)
    return estimate, float(lo), float(hi)


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score 95% interval of a binomial proportion."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


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


def ssim_per_image(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """SSIM of each image against its reference (images in [-1, 1])."""
    return structural_similarity_index_measure(images.float(), reference.float(), data_range=2.0,
                                               reduction="none").float()


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    """||output - reference||^2 / ||reference||^2."""
    return float((output.float() - reference.float()).pow(2).sum() / reference.float().pow(2).sum())
