"""No recipe the schema accepts ends in a traceback: every combination of model path (reference,
pipeline) x recovery steps (0, > 0) x quantization (none, each config) x export format runs on
the tiny models, and either works (the export loads back with every pruned zero) or is a one-line
user error, exit 2, before any work."""

import pytest
import torch

import ditprune
from ditprune.cli import main
from ditprune.quantize import CONFIGS

QUANT = [None, *sorted(CONFIGS)]
FORMATS = ["diffusers", "compressed"]
FAST_REFERENCE = ["pruning.method=wanda", "calibration.num_prompts=1", "calibration.steps=1", "evaluation.n_samples=2",
                  "evaluation.steps=1", "evaluation.compare=[]"]


def _cuda_only(q):
    return q is not None and not CONFIGS[q][1] and not torch.cuda.is_available()


def _check(code, err, out, q):
    if _cuda_only(q):
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and "needs a CUDA GPU" in lines[0], err
        assert not (out / "transformer").exists()
        return
    assert code == 0, err
    assert "Traceback" not in err
    model = ditprune.load_transformer(out / "transformer")
    def zeros(w):
        w = w.dequantize() if hasattr(w, "dequantize") else w  # torchao tensors: their values
        return float((w == 0).float().mean())

    pruned = [zeros(m.weight) for n, m in model.named_modules() if n.endswith("ff.net.2")]
    assert pruned and all(z >= 0.5 for z in pruned)  # the pruned zeros survive quantization, export and load


DEFAULT_WITH_RECOVERY = {(None, "diffusers"), ("float8_weight_only", "compressed")}


def _reference_matrix():
    """Every combination. Without recovery all run in the default suite; with recovery steps (about
    12 s each) two do (and ``tests/test_demo.py`` runs recovery + int8), the rest under ``-m slow``."""
    for q in QUANT:
        for fmt in FORMATS:
            yield pytest.param(0, q, fmt, id=f"0-{q}-{fmt}")
            marks = [] if (q, fmt) in DEFAULT_WITH_RECOVERY else [pytest.mark.slow]
            yield pytest.param(2, q, fmt, id=f"2-{q}-{fmt}", marks=marks)


@pytest.mark.parametrize("steps,q,fmt", list(_reference_matrix()))
def test_reference_recipes(tmp_path, capsys, steps, q, fmt):
    out = tmp_path / "out"
    keys = [*FAST_REFERENCE, f"recovery.steps={steps}", f"export.format={fmt}", f"export.output_dir={out}"]
    if steps:
        keys.append("recovery.batch_size=4")  # refused without recovery steps
    if q:
        keys.append(f"quantization.config={q}")
    code = main(["-q", "prune", *keys])
    captured = capsys.readouterr()
    _check(code, captured.err, out, q)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("q", QUANT, ids=[str(q) for q in QUANT])
def test_pipeline_recipes(tiny_pipeline_dir, tmp_path, capsys, q, fmt):
    out = tmp_path / "out"
    keys = ["configs/dit_xl_256.yaml", f"model.source={tiny_pipeline_dir}", "model.device=cpu",
            "calibration.num_prompts=2", "calibration.steps=1", "pruning.method=wanda", f"export.format={fmt}",
            f"export.output_dir={out}"]
    if q:
        keys.append(f"quantization.config={q}")
    code = main(["-q", "prune", *keys])
    _check(code, capsys.readouterr().err, out, q)


def test_pipeline_recovery_is_a_user_error_before_any_work(tiny_pipeline_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["-q", "prune", "configs/dit_xl_256.yaml", f"model.source={tiny_pipeline_dir}", "recovery.steps=2",
                 f"export.output_dir={out}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "recovery.steps > 0 runs only on the reference models" in err[0]
    assert not out.exists() or not any(out.iterdir())
