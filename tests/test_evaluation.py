import pytest
import torch

from ditprune.evaluation.metrics import frechet_distance, judge_scores, psnr, relative_error, ssim
from ditprune.reference import load, load_judge, training_record
from ditprune.reference.data import SPLITS, digits


@pytest.fixture(scope="module")
def holdout():
    return digits("holdout")


def test_splits_are_disjoint_and_balanced():
    seen = set()
    for split, (lo, hi) in SPLITS.items():
        x, y = digits(split)
        assert torch.bincount(y).tolist() == [hi - lo] * 10
        keys = {tuple(img.flatten()[::7].tolist()) for img in x}
        assert not keys & seen, f"{split} shares images with another split"
        seen |= keys


def test_identical_images_give_infinite_psnr_and_zero_error(holdout):
    x = holdout[0][:20]
    assert psnr(x, x) == float("inf")
    assert ssim(x, x) == pytest.approx(1.0)
    assert relative_error(x, x) == 0.0
    noisy = x + 0.1 * torch.randn_like(x)
    assert 10 < psnr(noisy, x) < 40 and ssim(noisy, x) < 1.0
    assert relative_error(noisy, x) == pytest.approx(((noisy - x) ** 2).sum().item() / (x**2).sum().item())


def test_judge_accuracy_falls_on_shuffled_labels(holdout):
    x, y = holdout
    judge = load_judge()
    acc, prob = judge_scores(judge, x, y)
    assert acc >= 0.9 and prob >= 0.85
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    assert judge_scores(judge, x, shuffled)[0] < 0.3


def test_frechet_distance_separates_real_from_noise(holdout):
    judge = load_judge()
    real_vs_real = frechet_distance(judge, holdout[0], digits("judge")[0])
    noise = torch.rand_like(holdout[0]) * 2 - 1
    assert real_vs_real < 20 < frechet_distance(judge, noise, holdout[0])


def test_judge_record_reproduces():
    x, y = digits("holdout")
    acc, _ = judge_scores(load_judge(), x, y)
    assert acc == pytest.approx(training_record("judge")["holdout_accuracy"], abs=1e-6)


@pytest.mark.parametrize("kind", ["flux", "dit"])
def test_shipped_generators_draw_the_prompted_digit(kind, holdout):
    """The Evaluator's judge accuracy, recomputed here by hand from the same sampler and seeds,
    is high; its FD is far below that of noise."""
    from ditprune.evaluation.harness import EVAL_SEED, GUIDANCE, Evaluator
    from ditprune.reference import Conditioning, Denoiser, sample
    from ditprune.reference.text import TEMPLATES

    model, judge = load(kind), load_judge()
    got = Evaluator(model, n_samples=50, steps=20)(model)
    digits_asked = torch.arange(50) % 10
    cond = Conditioning.make(kind, digits_asked, torch.arange(50) % len(TEMPLATES))
    samples = sample(Denoiser(model), cond, steps=20, seed=EVAL_SEED, guidance=GUIDANCE[kind])
    with torch.no_grad():
        acc = (judge(samples).argmax(1) == digits_asked).float().mean().item()
    assert got["judge_acc"] == pytest.approx(acc, abs=1e-9) and acc >= 0.9
    noise_fd = frechet_distance(judge, torch.rand_like(samples) * 2 - 1, holdout[0])
    assert got["fd"] < 0.2 * noise_fd
    assert got["rel_err"] == 0.0 and got["psnr"] == float("inf")


def test_pivot_table_puts_settings_in_columns_and_bolds_only_a_clear_best():
    from ditprune.evaluation.report import pivot_table

    rows = [
        {"model": "m", "method": "dense", "setting": "-", "rel_err": 0.0, "judge_acc": 0.9},
        {"model": "m", "method": "a", "setting": 0.5, "rel_err": 0.2, "judge_acc": 0.8,
         "ci": {"rel_err": [0.18, 0.22], "judge_acc": [0.75, 0.85]}},
        {"model": "m", "method": "b", "setting": 0.5, "rel_err": 0.1, "judge_acc": 0.7,
         "ci": {"rel_err": [0.09, 0.11], "judge_acc": [0.65, 0.80]}},  # acc intervals touch: no bold
        {"model": "m", "method": "a", "setting": "2:4", "rel_err": 0.3, "judge_acc": 0.6,
         "ci": {"rel_err": [0.25, 0.35], "judge_acc": [0.55, 0.65]}},
        {"model": "m", "method": "b", "setting": "2:4", "rel_err": 0.4, "judge_acc": 0.5,
         "ci": {"rel_err": [0.36, 0.44], "judge_acc": [0.45, 0.549]}},
        {"model": "m", "method": "c", "setting": "2:4", "rel_err": 0.5},  # no interval: never clearly worse
    ]
    assert pivot_table(rows, "rel_err").splitlines() == [
        "| model | method | 0.5 | 2:4 |",
        "|---|---|---|---|",
        "| m | dense | 0.0000 | 0.0000 |",
        "| m | a | 0.2000 | 0.3000 |",
        "| m | b | **0.1000** | 0.4000 |",
        "| m | c |  | 0.5000 |",
    ]
    assert pivot_table(rows, "judge_acc", higher_is_better=True).splitlines()[3:] == [
        "| m | a | 0.800 | **0.600** |",
        "| m | b | 0.700 | 0.500 |",
    ]
