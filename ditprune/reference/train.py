"""Train the shipped reference models. The suite runs a few steps of each; the shipped weights
came from the commands recorded in each model's ``training.json``.

    python -m ditprune.reference.train judge --out ditprune/reference/weights/judge
    python -m ditprune.reference.train flux --steps 4000 --out ditprune/reference/weights/flux
    python -m ditprune.reference.train dit --steps 4000 --out ditprune/reference/weights/dit
    python -m ditprune.reference.train record   # dense metrics of the shipped models, for the tests
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from .._io import OutputDir
from .data import digits
from .nets import Conditioning, Denoiser, Judge, build
from .text import TEMPLATES

__all__ = ["train_generator", "train_judge", "main"]


def train_generator(kind: str, steps: int, batch: int = 64, lr: float = 5e-4, seed: int = 0, progress=True,
                    drop: float = 0.1):
    """Rectified flow: v = noise - x0 at x_t = (1 - t) x0 + t noise, t ~ logit-normal; the
    condition is dropped with probability ``drop`` (FLUX: empty caption; DiT: its label embedding
    drops labels itself) so that classifier-free guidance works. Returns (EMA model, mean loss
    of the last 200 steps)."""
    torch.manual_seed(seed)
    images, labels = digits("generator")
    model = build(kind).train()
    ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.999))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 200) * 0.5 * (1 + math.cos(math.pi * min(s / max(steps, 1), 1.0)))
    )
    table = None
    if kind == "flux":  # every caption of every digit, encoded once
        table = Conditioning.make("flux", torch.arange(10).repeat_interleave(len(TEMPLATES)),
                                  torch.arange(len(TEMPLATES)).repeat(10))
        null = table[:1].null()
    denoiser = Denoiser(model)
    losses = []
    for _ in tqdm(range(steps), desc=f"train {kind}", disable=not progress):
        idx = torch.randint(0, len(images), (batch,))
        x0, y = images[idx], labels[idx]
        if table is None:
            cond = Conditioning(y)
        else:
            cond = table[y * len(TEMPLATES) + torch.randint(0, len(TEMPLATES), (batch,))]
            dropped = torch.rand(batch) < drop
            cond.tokens[dropped], cond.pooled[dropped] = null.tokens[0], null.pooled[0]
        t = torch.sigmoid(torch.randn(batch))
        noise = torch.randn_like(x0)
        xt = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
        loss = F.mse_loss(denoiser(xt, t, cond), noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        ema.update_parameters(model)
        losses.append(loss.item())
    final = ema.module.eval()
    return final, sum(losses[-200:]) / len(losses[-200:])


def train_judge(epochs: int = 20, seed: int = 0, progress=True) -> tuple[Judge, float]:
    """Judge classifier on the ``judge`` split (small random shifts); returns (judge, holdout accuracy)."""
    torch.manual_seed(seed)
    x, y = digits("judge")
    judge = Judge()
    opt = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=1e-4)
    for _ in tqdm(range(epochs), desc="train judge", disable=not progress):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            xb, yb = x[perm[i : i + 64]], y[perm[i : i + 64]]
            dx, dy = torch.randint(-1, 2, (2,)).tolist()
            xb = torch.roll(xb, shifts=(dx, dy), dims=(2, 3))
            loss = F.cross_entropy(judge(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    judge.eval()
    hx, hy = digits("holdout")
    with torch.no_grad():
        acc = (judge(hx).argmax(1) == hy).float().mean().item()
    return judge, acc


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=["flux", "dit", "judge", "record"])
    p.add_argument("--out", type=Path)
    p.add_argument("--steps", type=int, default=4000, help="generator optimizer steps")
    p.add_argument("--epochs", type=int, default=20, help="judge epochs")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace files in --out that ditprune did not write")
    args = p.parse_args(argv)
    if args.kind == "record":
        return record_dense_metrics()
    if args.out is None:
        p.error("--out is required to train")
    start = time.time()
    record = {"command": "python -m ditprune.reference.train " + shlex.join(argv if argv is not None else sys.argv[1:]),
              "torch": torch.__version__, "threads": torch.get_num_threads()}
    names = ["judge.safetensors"] if args.kind == "judge" else ["config.json", "diffusion_pytorch_model.safetensors"]
    with OutputDir(args.out, names + ["training.json"], overwrite=args.overwrite, key="--out") as out:
        if args.kind == "judge":
            judge, acc = train_judge(args.epochs, args.seed)
            save_file(judge.state_dict(), str(out / "judge.safetensors"))
            record.update(epochs=args.epochs, holdout_accuracy=acc)
        else:
            model, loss = train_generator(args.kind, args.steps, args.batch, args.lr, args.seed)
            model.save_pretrained(out.staging, safe_serialization=True)
            record.update(steps=args.steps, batch=args.batch, lr=args.lr, final_loss=loss)
        record["seconds"] = round(time.time() - start, 1)
        (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


def record_dense_metrics() -> None:
    """Evaluate each shipped generator as the harness does by default and store the numbers
    beside its weights (``dense_metrics.json``); the suite checks that they reproduce."""
    from ..evaluation.harness import Evaluator
    from . import load, weights_dir

    for kind in ("flux", "dit"):
        model = load(kind)
        metrics = {k: v for k, v in Evaluator(model)(model).items() if k in ("judge_acc", "judge_prob", "fd")}
        (weights_dir(kind) / "dense_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        print(kind, metrics)


if __name__ == "__main__":
    main()
