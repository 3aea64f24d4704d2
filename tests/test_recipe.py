from pathlib import Path

import pytest

from ditprune.models import family_of
from ditprune.models.tiny import tiny_model
from ditprune.recipe import RecipeError, evaluation_settings, load_recipe

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
TINY = {"FluxTransformer2DModel": "flux", "SD3Transformer2DModel": "sd3", "PixArtTransformer2DModel": "pixart",
        "DiTTransformer2DModel": "dit", "SanaTransformer2DModel": "sana"}


def test_every_config_is_checked():
    names = {p.stem for p in CONFIGS}
    assert {"demo", "flux_dev", "flux_schnell", "sd3_medium", "pixart_sigma", "dit_xl_256", "sana"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_parses_and_its_model_class_builds_tiny(path):
    recipe = load_recipe(path)
    assert 0 <= recipe.pruning.sparsity < 1
    if recipe.model.source.startswith("reference:"):
        return
    cls = recipe.model.transformer_class
    assert cls in TINY, f"{path.name}: model.transformer_class must name a supported diffusers class"
    model = tiny_model(TINY[cls])
    assert type(model).__name__ == cls and family_of(model).name == TINY[cls]


def test_the_demo_file_is_the_embedded_demo():
    embedded, shipped = load_recipe(None), load_recipe("demo")
    assert evaluation_settings(embedded) == evaluation_settings(shipped)
    for section in ("model", "calibration", "pruning", "recovery", "quantization", "export"):
        assert embedded[section] == shipped[section], section


def test_overrides_and_the_demo_default():
    assert load_recipe(None).model.source == "reference:flux-layout"
    assert load_recipe(Path("configs/demo.yaml"), ["pruning.sparsity=0.6"]).pruning.sparsity == 0.6


@pytest.mark.parametrize(
    "override, message",
    [
        ("pruning.sparsty=0.6", "unknown recipe key 'pruning.sparsty'; did you mean 'pruning.sparsity'"),
        ("modle.source=x", "unknown recipe key 'modle'; did you mean 'model'"),
        ("pruning.sparsity=1.5", r"sparsity must be in \[0, 1\)"),
        ("pruning.sparsity=abc", "bad value for recipe key 'pruning.sparsity'"),
        ("pruning.method=wandda", "unknown method 'wandda'"),
        ("pruning.pattern=2-4", "pattern must look like 'N:M'"),
        ("export.format=zip", "export.format"),
    ],
)
def test_bad_recipes_name_the_key(override, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(Path("configs/demo.yaml"), [override])


def test_missing_file():
    with pytest.raises(RecipeError, match="not found"):
        load_recipe("configs/nope.yaml")


def test_calibration_seed_takes_effect_on_the_reference_path(monkeypatch, tmp_path):
    import torch

    import ditprune.evaluation.harness as harness
    from ditprune.cli import main
    from ditprune.reference import load

    model = load("dit")
    a, b = (harness.reference_calibration(model, 2, 2, seed=s) for s in (0, 1))
    assert not torch.equal(a[0]["hidden_states"], b[0]["hidden_states"])
    seen = {}

    class Stop(Exception):
        pass

    def spy(kind, *args, calibration_seed=0, **kw):
        seen["seed"] = calibration_seed
        raise Stop

    monkeypatch.setattr(harness, "Comparison", spy)
    with pytest.raises(Stop):
        main(["prune", "calibration.seed=7", f"export.output_dir={tmp_path / 'out'}"])
    assert seen["seed"] == 7


def test_allocation_options_reach_the_prune_for_every_compared_method():
    """``pruning.allocation_options`` (the FLUX.1-dev recipe ships the options measured for its
    scale) reach ``prune`` as ``allocation_options``, for the recipe's method and for a
    baseline compared beside it; a command-line override replaces a key."""
    from ditprune.runner import recipe_prune_kwargs

    recipe = load_recipe("flux_dev")
    for method in (recipe.pruning.method, "wanda"):
        assert recipe_prune_kwargs(recipe.pruning, method)["allocation_options"] == {"gains": "probes", "batches": 32}
    recipe = load_recipe("flux_dev", ["pruning.allocation_options.batches=8"])
    assert recipe_prune_kwargs(recipe.pruning, "dit")["allocation_options"] == {"gains": "probes", "batches": 8}
    assert recipe_prune_kwargs(load_recipe("demo").pruning, "dit")["allocation_options"] is None
