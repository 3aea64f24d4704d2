"""Side-by-side comparison on a shipped reference model: one dense model, one calibration set,
one evaluation set and one seed for every method."""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from .. import prune
from ..reference import Conditioning, Denoiser, load, load_judge, sample
from ..reference.data import digits
from ..reference.text import TEMPLATES
from .metrics import bootstrap, frechet, ssim_per_image, wilson

__all__ = ["reference_calibration", "Evaluator", "Candidate", "Comparison", "compare"]

log = logging.getLogger(__name__)

CALIBRATION_SEED = 0  # calibration trajectories; the evaluation uses EVAL_SEED, never the same noise
EVAL_SEED = 1000
GUIDANCE = {"dit": 1.5, "flux": 1.5}  # classifier-free guidance of each reference model's sampler


def reference_calibration(model: nn.Module, n_prompts: int = 16, steps: int = 10, seed: int = CALIBRATION_SEED) -> list[dict]:
    """Calibration batches for a reference model: the inputs of every model call along the dense
    sampler's trajectories (a batch of ``n_prompts`` prompts per timestep and per guidance branch,
    ``steps`` timesteps). Prompts cycle through the digits and use the later caption templates."""
    kind = _kind(model)
    d = torch.arange(n_prompts) % 10
    cond = Conditioning.make(kind, d, (torch.arange(n_prompts) // 10 + 1) % len(TEMPLATES))
    record: list[dict] = []
    sample(Denoiser(model), cond, steps=steps, seed=seed, guidance=GUIDANCE[kind], record=record)
    return record


def _kind(model: nn.Module) -> str:
    return Denoiser(model).kind


class Evaluator:
    """Scores a (pruned) reference model against the dense one it came from.

    - ``judge_acc`` / ``judge_prob``: the judge on the prompted digit (the CLIP-score stand-in);
    - ``fd``: Frechet distance of judge features, generated vs the held-out real digits (FID stand-in);
    - ``rel_err``: denoiser relative error vs the dense model on held-out digits noised at
      ``timesteps``, averaged over them; ``psnr`` / ``ssim``: final samples vs the dense samples.
    """

    def __init__(self, dense: nn.Module, n_samples: int = 100, steps: int = 20, seed: int = EVAL_SEED,
                 timesteps: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)):
        self.kind, self.steps, self.seed = _kind(dense), steps, seed
        self.judge = load_judge()
        self.real, real_digits = digits("holdout")
        self.digits = torch.arange(n_samples) % 10
        self.cond = Conditioning.make(self.kind, self.digits, torch.arange(n_samples) % len(TEMPLATES))
        g = torch.Generator().manual_seed(seed)
        pick = torch.randperm(len(self.real), generator=g)[:n_samples]
        x0, d0 = self.real[pick], real_digits[pick]
        cond0 = Conditioning.make(self.kind, d0, torch.arange(len(d0)) % len(TEMPLATES))  # at most the 500 held-out
        self.noised = []
        for t in timesteps:
            noise = torch.randn(x0.shape, generator=g)
            tt = torch.full((len(x0),), t)
            self.noised.append(((1 - t) * x0 + t * noise, tt, cond0))
        self.dense_samples, self.dense_v = self._run(dense)
        self.dense_correct = self._judge(self.dense_samples)[0]
        self.real_features = self.judge.features(self.real.float()).detach()

    @torch.no_grad()
    def _run(self, model: nn.Module) -> tuple[torch.Tensor, list[torch.Tensor]]:
        was_training = model.training
        model.eval()  # e.g. DiT's label embedding drops labels in training mode
        try:
            den = Denoiser(model)
            samples = sample(den, self.cond, steps=self.steps, seed=self.seed, guidance=GUIDANCE[self.kind])
            return samples, [den(x, t, c) for x, t, c in self.noised]
        finally:
            model.train(was_training)

    @torch.no_grad()
    def _judge(self, samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per sample: correct (0/1), probability of the asked digit, judge features."""
        feats = self.judge.features(samples.float())
        probs = self.judge.head(feats).softmax(-1)
        return (probs.argmax(-1) == self.digits).float(), probs.gather(1, self.digits[:, None]).squeeze(1), feats

    def __call__(self, model: nn.Module, intervals: bool = True) -> dict:
        """The metrics of ``model`` (its samples stay in ``self.last_samples``); with
        ``intervals``, ``"ci"`` holds a 95% interval of each (judge accuracy: Wilson; the others:
        bootstrap over samples) and ``judge_acc_delta`` the paired change against the dense model
        on the same prompts and noise."""
        samples, v = self._run(model)
        self.last_samples = samples
        correct, prob, feats = self._judge(samples)
        err = torch.stack([(a.float() - b.float()).pow(2).flatten(1).sum(1) for a, b in zip(v, self.dense_v)], 1)
        norm = torch.stack([b.float().pow(2).flatten(1).sum(1) for b in self.dense_v], 1)
        mse = (samples.float() - self.dense_samples.float()).pow(2).flatten(1).mean(1)
        ssim_each = ssim_per_image(samples, self.dense_samples)
        rel = lambda e, nrm: (e.sum(0) / nrm.sum(0)).mean()  # noqa: E731  (sums over samples, mean over t)
        psnr_of = lambda m: 10 * torch.log10(4.0 / m.mean()) if m.mean() > 0 else torch.tensor(float("inf"))  # noqa: E731
        out = {"judge_acc": float(correct.mean()), "judge_prob": float(prob.mean()),
               "fd": frechet(feats, self.real_features), "rel_err": float(rel(err, norm)),
               "psnr": float(psnr_of(mse)), "ssim": float(ssim_each.mean())}
        if intervals:
            n = len(correct)
            out["judge_acc_delta"] = float((correct - self.dense_correct).mean())
            out["ci"] = {
                "judge_acc": list(wilson(int(correct.sum()), n)),
                "judge_acc_delta": list(bootstrap(lambda a, b: (a - b).mean(), correct, self.dense_correct)[1:]),
                "judge_prob": list(bootstrap(lambda x: x.mean(), prob)[1:]),
                "fd": list(bootstrap(frechet, feats, self.real_features, n=100, paired=False, centred=True)[1:]),
                "rel_err": list(bootstrap(rel, err, norm, n=500)[1:]),
                "psnr": list(bootstrap(psnr_of, mse)[1:]) if mse.max() > 0 else [float("inf")] * 2,
                "ssim": list(bootstrap(lambda x: x.mean(), ssim_each)[1:]),
            }
        return out


@dataclass
class Candidate:
    """One row of a comparison: a label, a method and its options (method None = the dense model)."""

    label: str
    method: str | None
    options: dict = field(default_factory=dict)


class Comparison:
    """One dense reference model, one calibration set, one evaluator: every method run on them."""

    def __init__(self, kind: str, n_prompts: int = 16, calib_steps: int = 10, n_samples: int = 100, steps: int = 20,
                 calibration_seed: int = CALIBRATION_SEED):
        from ..reference import NAMES, kind_of

        kind = kind_of(kind)
        self.kind, self.name = kind, NAMES[kind]
        self.dense = load(kind)
        self.calibration = reference_calibration(self.dense, n_prompts, calib_steps, calibration_seed)
        self.evaluator = Evaluator(self.dense, n_samples, steps)

    def dense_row(self) -> dict:
        return {"model": self.name, "method": "dense", "setting": "-", "sparsity": 0.0, "prune_s": 0.0,
                "stats_mb": 0.0, **self.evaluator(self.dense), "samples": self.evaluator.last_samples}

    def run(self, candidates: list[Candidate], settings: list[dict], progress: bool = True,
            keep_models: bool = False, prune_fn=None) -> list[dict]:
        """Every candidate x every setting (``{"sparsity": 0.5}`` or ``{"pattern": "2:4"}``): one row
        each with the metrics, pruning time, the peak memory of calibration statistics
        (``stats_mb``: what differs between methods; Gram matrices dominate), the samples, the
        prune report and, with ``keep_models``, the pruned model. ``prune_fn`` (default
        :func:`ditprune.prune`) does the pruning, with prune()'s signature."""
        rows = [self.dense_row()] if any(c.method is None for c in candidates) else []
        jobs = [(c, s) for s in settings for c in candidates if c.method is not None]
        for cand, setting in tqdm(jobs, desc=f"{self.kind}: methods", disable=not progress):
            model = copy.deepcopy(self.dense)
            start = time.perf_counter()
            report = (prune_fn or prune)(model, self.calibration, method=cand.method, **setting, **cand.options,
                                         progress=progress)
            seconds = time.perf_counter() - start
            rows.append({"model": self.name, "method": cand.label, "setting": setting.get("pattern") or setting["sparsity"],
                         "sparsity": report.sparsity, "prune_s": seconds, "stats_mb": report.peak_stats_bytes / 2**20,
                         **self.evaluator(model), "samples": self.evaluator.last_samples, "report": report,
                         "pruned": model if keep_models else None})
        return rows


def compare(kind: str, candidates: list[Candidate], settings: list[dict], n_prompts: int = 16, calib_steps: int = 10,
            n_samples: int = 100, steps: int = 20, progress: bool = True, **run_options) -> list[dict]:
    """:class:`Comparison` in one call."""
    return Comparison(kind, n_prompts, calib_steps, n_samples, steps).run(candidates, settings, progress, **run_options)
