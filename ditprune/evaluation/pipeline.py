"""Judge a pruned pipeline the way the field does (deepcompressor's and OBS-Diff's protocols):
the dense and the pruned transformer generate from the same prompts with the same seeds, then

- CLIP score of each image against its prompt (torchmetrics ``clip_score``, a local CLIP);
- Fréchet distances: pruned and dense against a local reference image folder (e.g. MJHQ-30K's
  images), and pruned against dense. With local Inception weights (``inception``, the
  torch-fidelity file) this is FID proper; without, the features are the local CLIP's image
  embeddings (FD-CLIP: same formula, not comparable to published FID numbers) and the report
  says which;
- PSNR and SSIM of each pruned image against the dense image of the same prompt and seed;
- ImageReward when the ``image-reward`` package is installed and its weights are local;

each with a bootstrap 95% interval (images resampled; paired where the metric is paired; for
Fréchet distances, which resampling biases upward, the resamples' spread around the estimate). Images
are cached as PNG per (transformer, prompt index) under ``cache``: a rerun reuses what exists.
Under Lightning Fabric with several devices each rank generates and scores its share
(indices rank, rank + world, ...), and torchmetrics gathers the per-image values.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .._io import strict_json  # noqa: F401 (part of this module's API)
from ..errors import InputError
from .metrics import bootstrap, frechet

__all__ = ["EvalJob", "read_eval_prompts", "ImageStore", "generate", "Scorer", "frechet", "bootstrap",
           "evaluate_pipeline", "markdown_report", "save_pairs", "strict_json"]


@dataclass
class EvalJob:
    prompts: list[str]
    seed: int = 0  # image i uses seed + i
    steps: int | None = None  # None: the pipeline's default
    guidance: float | None = None
    resolution: int | None = None
    batch_size: int = 4
    extra: dict = field(default_factory=dict)  # further pipeline arguments


def read_eval_prompts(path: str | Path, n: int | None = None) -> list[str]:
    """Prompts from MJHQ-30K's ``meta_data.json`` ({id: {"prompt": ...}}, in id order) or a text
    file (one a line); the first ``n``."""
    path = Path(path)
    from ..recipe import check_prompt_file

    try:
        check_prompt_file(path, "evaluation.prompts")
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"evaluation.prompts: {path} is not UTF-8 text") from None
    except OSError as e:
        raise InputError(f"evaluation.prompts: cannot read {path} ({e.strerror or e})") from None
    if path.suffix == ".json":
        try:
            data = json.loads(text)
            prompts = [data[k]["prompt"] for k in sorted(data)]
        except (ValueError, KeyError, TypeError):
            raise InputError(f"evaluation.prompts: {path} is not MJHQ's meta_data.json ({{id: {{\"prompt\": ...}}}})") from None
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise InputError(f"evaluation.prompts: {path} has no prompts")
    return prompts[:n] if n else prompts


class ImageStore:
    """PNG images of one transformer, ``root/tag/000123.png``, written atomically."""

    def __init__(self, root: str | Path, tag: str):
        self.dir = Path(root) / tag

    def path(self, i: int) -> Path:
        return self.dir / f"{i:06d}.png"

    def save(self, i: int, image: torch.Tensor) -> None:
        from PIL import Image

        from .._io import atomic_file

        arr = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        with atomic_file(self.path(i)) as tmp:
            Image.fromarray(arr).save(tmp, format="PNG")

    def load(self, i: int) -> torch.Tensor:
        from PIL import Image

        with Image.open(self.path(i)) as im:
            return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1).float() / 255


@torch.no_grad()
def generate(pipe, store: ImageStore, job: EvalJob, indices: list[int], progress: bool = True, desc: str = "") -> int:
    """Images of ``indices`` not yet in ``store``, in batches (each prompt its own seeded noise, so
    a batch's composition never changes an image); returns how many were made."""
    from tqdm import tqdm

    todo = [i for i in indices if not store.path(i).exists()]
    kwargs = dict(job.extra, output_type="pt")
    if job.steps is not None:
        kwargs["num_inference_steps"] = job.steps
    if job.guidance is not None:
        kwargs["guidance_scale"] = job.guidance
    if job.resolution is not None:
        kwargs.update(height=job.resolution, width=job.resolution)
    device = pipe.transformer.device if hasattr(pipe.transformer, "device") else torch.device("cpu")
    gen_device = device if device.type == "cuda" else torch.device("cpu")
    chunks = [todo[k : k + job.batch_size] for k in range(0, len(todo), job.batch_size)]
    for chunk in tqdm(chunks, desc=desc or f"generating {store.dir.name}", disable=not progress):
        gens = [torch.Generator(device=gen_device).manual_seed(job.seed + i) for i in chunk]
        images = pipe(prompt=[job.prompts[i] for i in chunk], generator=gens, **kwargs).images
        for i, image in zip(chunk, images):
            store.save(i, image)
    return len(todo)


class _TensorFeatures(torch.nn.Module):
    """A CLIPModel whose ``get_*_features`` return the projected embeddings as tensors:
    transformers 5 returns output objects, which torchmetrics 1.9's ``clip_score`` cannot use."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    @staticmethod
    def _tensor(out):
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, *args, **kwargs):
        return self._tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs):
        return self._tensor(self.model.get_text_features(*args, **kwargs))


class Scorer:
    """Per-image scores with a local CLIP (and optional local Inception / ImageReward)."""

    def __init__(self, clip_path: str | Path, device="cpu", inception: str | Path | None = None,
                 image_reward: str | Path | None = None):
        from transformers import CLIPModel, CLIPProcessor

        try:
            self.model = CLIPModel.from_pretrained(clip_path, local_files_only=True).to(device).eval()
            self.processor = CLIPProcessor.from_pretrained(clip_path, local_files_only=True)
        except OSError as e:
            raise InputError(f"evaluation.clip_model: cannot load a CLIP model from {clip_path} "
                             f"({str(e).splitlines()[0]})") from None
        self.device = torch.device(device)
        self.inception = self._inception(inception) if inception else None
        self.reward = self._image_reward(image_reward) if image_reward else None
        self.feature_name = "FID (Inception)" if self.inception is not None else "FD-CLIP"

    def _inception(self, path):
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError:
            raise InputError("evaluation.inception needs the torch-fidelity package (pip install torch-fidelity)") from None
        return FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path)).to(
            self.device).eval()

    def _image_reward(self, path):
        try:
            import ImageReward
        except ImportError:
            raise InputError("evaluation.image_reward needs the image-reward package (pip install image-reward)") from None
        return ImageReward.load(str(path), device=str(self.device))

    @torch.no_grad()
    def clip_scores(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """CLIP score of each image with its prompt: torchmetrics' max(100 cos(E_I, E_C), 0)."""
        from torchmetrics.functional.multimodal import clip_score

        pair = (_TensorFeatures(self.model), self.processor)
        return torch.stack([clip_score((img * 255).to(torch.uint8).to(self.device), text, model_name_or_path=lambda: pair)
                            .float().cpu() for img, text in zip(images, prompts)])

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        if self.inception is not None:
            return self.inception((images * 255).to(torch.uint8).to(self.device))[0].float().cpu()
        inputs = self.processor(images=[(i * 255).to(torch.uint8) for i in images], return_tensors="pt")
        out = _TensorFeatures(self.model).get_image_features(pixel_values=inputs["pixel_values"].to(self.device))
        return out.float().cpu()

    @torch.no_grad()
    def rewards(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor | None:
        if self.reward is None:
            return None
        from PIL import Image

        pil = [Image.fromarray((i.permute(1, 2, 0).numpy() * 255).astype(np.uint8)) for i in images]
        return torch.tensor([float(self.reward.score(p, [im])) for p, im in zip(prompts, pil)])


def paired_scores(images: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(PSNR dB, SSIM) of each image against its reference, images in [0, 1]."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    psnr = torch.stack([peak_signal_noise_ratio(a[None], b[None], data_range=1.0) for a, b in zip(images, reference)])
    ssim = torch.stack([structural_similarity_index_measure(a[None], b[None], data_range=1.0)
                        for a, b in zip(images, reference)])
    return psnr.float(), ssim.float()


def _gather(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-image values of every rank, concatenated (torchmetrics syncs under torch.distributed)."""
    from torchmetrics.aggregation import CatMetric

    out = {}
    for k, v in values.items():
        metric = CatMetric()
        metric.update(v.float() if v.numel() else torch.zeros((0,) + tuple(v.shape[1:])))
        out[k] = metric.compute()
    return out


def _load_folder(folder: Path, size: int | None) -> list[torch.Tensor]:
    from PIL import Image

    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    if not files:
        raise InputError(f"evaluation.reference_images: no images in {folder}")
    out = []
    for p in files:
        with Image.open(p) as im:
            im = im.convert("RGB")
            if size:
                im = im.resize((size, size), Image.BICUBIC)
            out.append(torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 255)
    return out


def evaluate_pipeline(pipe, dense: torch.nn.Module | None, pruned: torch.nn.Module, job: EvalJob, cache: str | Path,
                      scorer: Scorer, reference_images: str | Path | None = None, rank: int = 0, world: int = 1,
                      progress: bool = True, bootstrap_n: int = 1000) -> dict:
    """Generate (or reuse) the dense and pruned images of this rank's share, score them, gather,
    and return the summary (on every rank): ``{metric: {"value", "ci95", "n"}}``. ``dense`` None:
    its images must all be in ``cache`` already (generated before pruning)."""
    n = len(job.prompts)
    mine = list(range(rank, n, world))
    dense_store, pruned_store = ImageStore(cache, "dense"), ImageStore(cache, "pruned")
    before = pipe.transformer
    made = {}
    try:
        for tag, transformer, store in (("dense", dense, dense_store), ("pruned", pruned, pruned_store)):
            if transformer is None:
                missing = [i for i in mine if not store.path(i).exists()]
                if missing:
                    raise InputError(f"{len(missing)} dense images are not in {store.dir}, and no dense transformer")
                made[tag] = 0
                continue
            pipe.transformer = transformer
            made[tag] = generate(pipe, store, job, mine, progress, f"generating with the {tag} transformer")
    finally:
        pipe.transformer = before
    values = {k: [] for k in ("index", "clip_dense", "clip_pruned", "psnr", "ssim", "feat_dense", "feat_pruned",
                              "reward_dense", "reward_pruned")}
    for k in range(0, len(mine), job.batch_size):
        idx = mine[k : k + job.batch_size]
        dense = torch.stack([dense_store.load(i) for i in idx])
        pruned_img = torch.stack([pruned_store.load(i) for i in idx])
        texts = [job.prompts[i] for i in idx]
        values["index"].append(torch.tensor(idx, dtype=torch.float32))
        values["clip_dense"].append(scorer.clip_scores(dense, texts))
        values["clip_pruned"].append(scorer.clip_scores(pruned_img, texts))
        psnr, ssim = paired_scores(pruned_img, dense)
        values["psnr"].append(psnr)
        values["ssim"].append(ssim)
        values["feat_dense"].append(scorer.features(dense))
        values["feat_pruned"].append(scorer.features(pruned_img))
        for tag, imgs in (("dense", dense), ("pruned", pruned_img)):
            r = scorer.rewards(imgs, texts)
            if r is not None:
                values[f"reward_{tag}"].append(r)
    stacked = {k: torch.cat(v) if v else torch.zeros(0) for k, v in values.items()}
    if reference_images is not None:
        files = _load_folder(Path(reference_images), job.resolution)
        ref = [files[i] for i in range(rank, len(files), world)]
        stacked["feat_reference"] = torch.cat([scorer.features(torch.stack(ref[k : k + job.batch_size]))
                                               for k in range(0, len(ref), job.batch_size)]) if ref else torch.zeros(0)
    data = _gather(stacked)
    order = data["index"].argsort()
    for k in list(data):
        if k != "feat_reference" and len(data[k]) == len(order):
            data[k] = data[k][order]
    return summarize(data, scorer.feature_name, bootstrap_n) | {"generated": made}


def summarize(data: dict[str, torch.Tensor], feature_name: str = "FD-CLIP", bootstrap_n: int = 1000) -> dict:
    mean = lambda x: x.mean()  # noqa: E731
    out = {"n_images": int(len(data["index"])), "feature_space": feature_name}
    for key, label in (("clip_dense", "clip_score_dense"), ("clip_pruned", "clip_score_pruned"), ("psnr", "psnr_vs_dense"),
                       ("ssim", "ssim_vs_dense"), ("reward_dense", "image_reward_dense"),
                       ("reward_pruned", "image_reward_pruned")):
        x = data.get(key)
        if x is not None and len(x):
            finite = x[torch.isfinite(x)]
            if len(finite):
                v, lo, hi = bootstrap(mean, finite, n=bootstrap_n)
                out[label] = {"value": v, "ci95": [lo, hi], "n": int(len(finite))}
            else:  # every pair identical (PSNR infinite): null in strict JSON, and said
                out[label] = {"value": float(x.mean()), "ci95": [float(x.min()), float(x.max())], "n": 0,
                              "note": "every image identical to the dense one"}
    if len(data["clip_pruned"]):
        v, lo, hi = bootstrap(lambda a, b: (a - b).mean(), data["clip_pruned"], data["clip_dense"], n=bootstrap_n)
        out["clip_score_delta"] = {"value": v, "ci95": [lo, hi], "n": int(len(data["clip_pruned"]))}
    fd_n = max(20, bootstrap_n // 20)  # a matrix square root each: fewer resamples
    pairs = [("fd_pruned_vs_dense", "feat_pruned", "feat_dense", True)]
    if "feat_reference" in data and len(data["feat_reference"]):
        pairs += [("fd_pruned_vs_reference", "feat_pruned", "feat_reference", False),
                  ("fd_dense_vs_reference", "feat_dense", "feat_reference", False)]
    for label, a, b, paired in pairs:
        if len(data[a]) > 1 and len(data[b]) > 1:
            v, lo, hi = bootstrap(frechet, data[a], data[b], n=fd_n, paired=paired, centred=True)
            out[label] = {"value": v, "ci95": [lo, hi], "n": [int(len(data[a])), int(len(data[b]))]}
    out["lpips"] = "not computed: LPIPS needs torchvision's pretrained networks, which ditprune does not depend on"
    return out


def save_pairs(dense: ImageStore, pruned: ImageStore, job: EvalJob, path: str | Path, n: int = 8,
               label: str = "pruned") -> Path:
    """A PNG grid: the first ``n`` prompts, dense above, pruned (``label``) below, same prompt and
    seed; rows named on the left, each column's prompt and seed below it."""
    import textwrap

    from PIL import Image, ImageDraw

    from .._io import atomic_file

    idx = [i for i in range(min(n, len(job.prompts))) if dense.path(i).exists() and pruned.path(i).exists()]
    if not idx:
        raise InputError("no image pairs to show")
    tiles = [[Image.open(store.path(i)).convert("RGB") for i in idx] for store in (dense, pruned)]
    w, h = tiles[0][0].size
    col = max(w, 96)  # room for a caption under small images
    chars = max(col // 6, 8)  # PIL's default font: about 6 pixels a character, 15 a line of multiline text
    captions = [textwrap.wrap(f"seed {job.seed + i}: {job.prompts[i]}", chars)[:4] for i in idx]
    names = ["dense", *textwrap.wrap(label, 20)[:1]]
    left, below = 6 * max(len(x) for x in names) + 12, 15 * max(len(c) for c in captions) + 8
    canvas = Image.new("RGB", (left + len(idx) * (col + 4), 2 * (h + 4) + below), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(tiles):
        draw.text((4, r * (h + 4) + h // 2 - 5), names[r], fill=(0, 0, 0))
        for c, tile in enumerate(row):
            canvas.paste(tile, (left + c * (col + 4), r * (h + 4)))
    for c, lines in enumerate(captions):
        draw.multiline_text((left + c * (col + 4), 2 * (h + 4) + 2), "\n".join(lines), fill=(0, 0, 0))
    path = Path(path)
    with atomic_file(path) as tmp:
        canvas.save(tmp, format="PNG")
    return path


def markdown_report(summary: dict, title: str) -> str:
    rows = [f"# {title}", "", f"{summary['n_images']} images per transformer; intervals: bootstrap 95%. "
            f"Fréchet distances in the {summary['feature_space']} feature space.", "",
            "| metric | value | 95% interval | n |", "|---|---|---|---|"]
    for k, v in summary.items():
        if isinstance(v, dict) and "value" in v:
            rows.append(f"| {k} | {v['value']:.4f} | [{v['ci95'][0]:.4f}, {v['ci95'][1]:.4f}] | {v['n']} |")
    rows += ["", f"LPIPS: {summary['lpips']}."]
    return "\n".join(rows)
