"""Tables and pictures of a comparison: markdown, a sample grid, quality vs sparsity plots."""

from __future__ import annotations

from pathlib import Path

import torch

from .._io import atomic_file

__all__ = ["COLUMNS", "markdown_table", "pivot_table", "save_grid", "plot_quality", "plot_allocation", "layer_kind"]

COLUMNS = {
    "model": ("model", "{}"),
    "method": ("method", "{}"),
    "setting": ("setting", "{}"),
    "sparsity": ("sparsity", "{:.3f}"),
    "judge_acc": ("judge acc [95%]", "{:.3f}"),
    "judge_acc_delta": ("acc vs dense [95%]", "{:+.3f}"),
    "judge_prob": ("judge prob", "{:.3f}"),
    "fd": ("FD [95%]", "{:.2f}"),
    "rel_err": ("denoiser rel. err [95%]", "{:.4f}"),
    "psnr": ("PSNR dB", "{:.2f}"),
    "ssim": ("SSIM", "{:.3f}"),
    "prune_s": ("prune s", "{:.1f}"),
    "stats_mb": ("stats MiB", "{:.2f}"),
}


INTERVALS = ("judge_acc", "judge_acc_delta", "fd", "rel_err")  # shown with their 95% interval


def _cell(row: dict, column: str, intervals=INTERVALS) -> str:
    if row.get(column) is None:  # absent, or a non-finite number as strict JSON stores it
        return ""
    spec = COLUMNS[column][1]
    text = spec.format(row[column])
    ci = row.get("ci", {}).get(column)
    if column in intervals and ci:
        text += f" [{spec.format(ci[0])}, {spec.format(ci[1])}]"
    return text


def markdown_table(rows: list[dict], columns: list[str] | None = None, intervals=INTERVALS) -> str:
    """``columns`` (default: every one some row has) of ``rows``; the ``intervals`` columns with
    their 95% interval in brackets."""
    columns = [c for c in (columns or COLUMNS) if any(c in r for r in rows)]
    head = "| " + " | ".join(COLUMNS[c][0] if c in intervals else COLUMNS[c][0].replace(" [95%]", "")
                             for c in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(_cell(r, c, intervals) for c in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def _clearly_best(entries: dict[str, tuple[float, list | None]], higher_is_better: bool) -> str | None:
    """The method whose value is best and whose 95% interval overlaps no other method's; None
    when intervals overlap or are missing (then no method is clearly best)."""
    if len(entries) < 2:
        return None
    sign = -1 if higher_is_better else 1
    best = min(entries, key=lambda m: sign * entries[m][0])
    ci = entries[best][1]
    if not ci:
        return None
    for method, (_, other) in entries.items():
        if method == best:
            continue
        if not other or (ci[1] >= other[0] if not higher_is_better else ci[0] <= other[1]):
            return None
    return best


def pivot_table(rows: list[dict], metric: str, higher_is_better: bool = False) -> str:
    """``metric`` as one row per (model, method) and one column per setting. A pruned method is
    bold where it is best and its 95% interval overlaps no other pruned method's; the dense
    model's value repeats in every column."""
    spec = COLUMNS[metric][1]
    settings = list(dict.fromkeys(str(r["setting"]) for r in rows if r["method"] != "dense"))
    cells: dict[tuple, dict[str, float]] = {}
    per_setting: dict[tuple, dict[str, tuple]] = {}
    for r in rows:
        if metric in r:
            cells.setdefault((r["model"], r["method"]), {})[str(r["setting"])] = r[metric]
            if r["method"] != "dense":
                per_setting.setdefault((r["model"], str(r["setting"])), {})[r["method"]] = (
                    r[metric], r.get("ci", {}).get(metric))
    best = {key: _clearly_best(entries, higher_is_better) for key, entries in per_setting.items()}
    head = f"| model | method | {' | '.join(settings)} |"
    lines = [head, "|" + "---|" * (2 + len(settings))]
    for (model, method), values in cells.items():
        row = []
        for s in settings:
            v = values.get("-") if method == "dense" else values.get(s)
            text = "" if v is None else spec.format(v)
            row.append(f"**{text}**" if v is not None and method == best.get((model, s)) else text)
        lines.append(f"| {model} | {method} | {' | '.join(row)} |")
    return "\n".join(lines)


def save_grid(rows: dict[str, torch.Tensor], path: str | Path, per_row: int = 10, scale: int = 4) -> Path:
    """One labelled row of samples per entry (images in [-1, 1]) as a PNG."""
    from PIL import Image, ImageDraw

    label_w = 8 + 7 * max(len(k) for k in rows)
    side = next(iter(rows.values())).shape[-1] * scale
    canvas = Image.new("L", (label_w + per_row * (side + 2), len(rows) * (side + 2)), 255)
    draw = ImageDraw.Draw(canvas)
    for r, (label, imgs) in enumerate(rows.items()):
        draw.text((4, r * (side + 2) + side // 2 - 5), label, fill=0)
        for c, img in enumerate(imgs[:per_row]):
            arr = ((img[0].float().clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
            tile = Image.fromarray(arr, mode="L").resize((side, side), Image.NEAREST)
            canvas.paste(tile, (label_w + c * (side + 2), r * (side + 2)))
    path = Path(path)
    with atomic_file(path) as tmp:
        canvas.save(tmp, format="PNG")
    return path


def plot_quality(rows: list[dict], path: str | Path, metrics=("rel_err", "judge_acc")) -> Path:
    """Quality vs sparsity, one line per method, one panel per (model, metric)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(len(models), len(metrics), figsize=(5 * len(metrics), 3.5 * len(models)), squeeze=False)
    for i, model in enumerate(models):
        pruned = [r for r in rows if r["model"] == model and r["method"] != "dense"]
        settings = list(dict.fromkeys(str(r["setting"]) for r in pruned))
        for j, metric in enumerate(metrics):
            ax = axes[i][j]
            x = range(len(settings))
            for method in dict.fromkeys(r["method"] for r in pruned):
                mine = {str(r["setting"]): r for r in pruned if r["method"] == method}
                line = ax.plot(x, [mine[s][metric] if s in mine else float("nan") for s in settings], marker="o",
                               label=method)[0]
                ci = [mine[s].get("ci", {}).get(metric) if s in mine else None for s in settings]
                if any(ci):
                    ax.fill_between(x, [c[0] if c else float("nan") for c in ci], [c[1] if c else float("nan") for c in ci],
                                    color=line.get_color(), alpha=0.15, linewidth=0)
            dense = [r for r in rows if r["model"] == model and r["method"] == "dense"]
            if dense and metric != "rel_err":  # the dense model's error is 0: no place on a log axis
                ax.axhline(dense[0][metric], color="k", ls=":", label="dense")
                if dense[0].get("ci", {}).get(metric):
                    ax.axhspan(*dense[0]["ci"][metric], color="k", alpha=0.06, linewidth=0)
            title = COLUMNS[metric][0].replace(" [95%]", "")
            ax.set_title(f"{model}: {title} (bands: 95% intervals)" + (" - dense: 0" if metric == "rel_err" else ""),
                         fontsize=9)
            ax.set_xticks(list(x), settings)
            ax.set_xlabel("sparsity / pattern")
            if metric == "rel_err":
                ax.set_yscale("log")
            ax.legend(fontsize=7)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    """``fig`` as a PNG at ``path`` (atomically), then closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def layer_kind(name: str) -> str:
    """A targeted Linear's role, from its diffusers name: adaLN modulation, attention or MLP, of
    the image or the text stream (FLUX and SD3 double blocks; cross-attention elsewhere)."""
    leaf = name.split(".")[-1]
    if ".norm" in name and leaf == "linear" or "adaLN" in name or "scale_shift" in name:
        return "adaLN modulation"
    text = any(t in name for t in ("context", "add_", "to_add_out", "attn2"))
    if ".attn" in name:
        return "attention (text)" if text else "attention"
    if any(t in name for t in (".ff", "proj_mlp", "mlp")):
        return "MLP (text)" if text else "MLP"
    if leaf == "proj_out":
        return "attention + MLP output"  # FLUX single blocks read both, concatenated
    return "other"


def plot_allocation(layers, path: str | Path, title: str) -> Path:
    """Sparsity of each targeted layer along the depth (report order), one marker per layer
    kind; ``layers``: a report's :class:`~ditprune.pruning.LayerReport` list."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.2))
    kinds: dict[str, list[tuple[int, float]]] = {}
    for i, layer in enumerate(layers):
        kinds.setdefault(layer_kind(layer.name), []).append((i, layer.sparsity))
    for kind, pts in kinds.items():
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=14, label=kind)
    mean = sum(l.sparsity * l.shape[0] * l.shape[1] for l in layers) / sum(l.shape[0] * l.shape[1] for l in layers)
    ax.axhline(mean, color="k", ls=":", label=f"over all targeted weights: {mean:.3f}")
    ax.set_xlabel("targeted layer, input to output")
    ax.set_ylabel("sparsity (measured)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.2))  # below: no point hidden
    return _save(fig, path)
