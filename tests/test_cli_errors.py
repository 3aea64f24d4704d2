"""Every user error is one line on stderr and exit code 2, and the checks that need only the
recipe (and the files it names) run before any model is loaded."""

from pathlib import Path

import pytest

import ditprune.runner
from ditprune.cli import main

ROOT = Path(__file__).parent.parent
DEMO = str(ROOT / "configs/demo.yaml")
PIPE = str(ROOT / "configs/dit_xl_256.yaml")


@pytest.fixture
def no_work(monkeypatch):
    """Loading a model or running anything fails the test: errors must come first."""

    def forbidden(*a, **k):
        raise AssertionError("the run started before the error was found")

    monkeypatch.setattr(ditprune.runner, "_run_reference", forbidden)
    monkeypatch.setattr(ditprune.runner, "_run_pipeline", forbidden)


def _one_line_error(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "\n" not in err and "Traceback" not in err and err.startswith("ditprune: error: ")
    return err


CASES = [  # (arguments after `prune`, expected part of the message)
    ([DEMO, "calibration.num_prompts=0"], "calibration.num_prompts must be >= 1, got 0"),
    ([DEMO, "calibration.num_prompts=-1"], "calibration.num_prompts must be >= 1, got -1"),
    ([DEMO, "calibration.steps=-3"], "calibration.steps must be >= 1, got -3"),
    ([DEMO, "model.source=reference:xyz"], "unknown reference model 'xyz'"),
    ([DEMO, 'pruning.targets=["["]'], "pruning.targets: regex '[' does not compile"),
    ([DEMO, 'pruning.ignore=["(a"]'], "pruning.ignore: regex '(a' does not compile"),
    ([DEMO, "quantization.config=bogus"], "quantization.config: unknown 'bogus'"),
    ([DEMO, "pruning.options={alfa: 0.3}"], "pruning.options: method 'dit' got an unknown option"),
    ([DEMO, "pruning.pattern=2-4"], "pattern must look like 'N:M'"),
    ([DEMO, "calibration.prompts=prompts.txt"], "calibration.prompts applies to pipelines"),
    ([DEMO, "calibration.guidance=3.5"], "calibration.guidance applies to pipelines"),
    ([DEMO, "model.dtype=bfloat16"], "model.dtype=bfloat16 applies to pipelines"),
    ([DEMO, "model.device=cuda"], "model.device=cuda applies to pipelines"),
    ([DEMO, "model.subfolder=transformer"], "unknown recipe key 'model.subfolder'"),
    ([DEMO, "export.format=compact"], "export.format must be"),
    ([DEMO, "recovery.steps=-5"], "recovery.steps must be >= 0, got -5"),
    ([DEMO, "evaluation.n_samples=1"], "evaluation.n_samples must be >= 2"),
    ([DEMO, "pruning.overrides=[{targets: [attn]}]"], "pruning.overrides[0]: set sparsity or pattern"),
    ([DEMO, "model.source=${oc.env:SECRET_TOKEN}"], "may not read environment variables"),
    ([DEMO, "calibration.num_prompts=100000000000000000000"], "calibration.num_prompts must be <="),
    ([DEMO, "calibration.seed=100000000000000000000"], "calibration.seed must be <="),
    ([DEMO, "calibration.steps=1000000000"], "calibration.steps must be <= 1000"),
    ([DEMO, "evaluation.n_samples=1000000000000"], "evaluation.n_samples must be <="),
    ([DEMO, "recovery.lr=.inf"], "recovery.lr must be in (0, 1]"),
    ([DEMO, "recovery.lr=0.01"], "recovery.lr applies only with recovery.steps > 0"),
    ([DEMO, "recovery.batch_size=8"], "recovery.batch_size applies only with recovery.steps > 0"),
    ([DEMO, "model.transformer_class=FluxTransformer2DModel"], "model.transformer_class applies to pipelines"),
    ([DEMO, 'export.output_dir="/tmp/a\\0b"'], "NUL byte"),  # YAML's \0 escape
    ([DEMO, "export.output_dir=/tmp/" + "x" * 300], "export.output_dir"),
    ([DEMO, "--devices", "0"], "--devices must be >= 1, got 0"),
    ([DEMO, "--devices", "-1"], "--devices must be >= 1, got -1"),
    ([DEMO, "--devices", "99999", "--accelerator", "cpu"], "--devices 99999: this machine has"),
    ([DEMO, "--accelerator", "banana"], "--accelerator must be one of"),
    ([DEMO, "--devices", "2", "--accelerator", "banana"], "--accelerator must be one of"),
    ([DEMO, "model.source=${oc.decode:'${oc.env:SECRET_TOKEN}'}"], "may not read environment variables"),
    ([DEMO, "model.source=${oc.decode:${calibration.note}}"], "nor call resolvers"),
    ([DEMO, "pruning.sparsty=0.6"], "did you mean 'pruning.sparsity'"),
    (["configs/nope.yaml"], "recipe file not found"),
    ([PIPE, "model.source=/nonexistent/pipeline"], "no such directory '/nonexistent/pipeline'"),
    ([PIPE, "model.source=./relative/missing"], "no such directory"),
    ([PIPE, "model.device=cuda"], "no such CUDA device"),
    ([PIPE, "model.device=tpu"], "is not a device"),
    ([PIPE, "recovery.steps=10"], "recovery.steps > 0 runs only on the reference models"),
    ([PIPE, "evaluation.compare=[wanda]"], "evaluation.compare applies to the reference models"),
    ([PIPE, "evaluation.clip_model=/no/clip"], "evaluation.clip_model: no such directory: /no/clip"),
    ([DEMO, "evaluation.clip_model=/no/clip"], "evaluation.clip_model applies to pipelines"),
    ([DEMO, "export.format=zip"], "export.format must be one of"),
]


@pytest.mark.parametrize("args, message", [
    (["pruning.pattern=2:5"], "pattern 2:5 does not divide layer"),
    (["pruning.targets=[no_such_layer]"], "'no_such_layer' matches no nn.Linear"),
    (["pruning.allocation=best"], "allocation must be one of ['uniform', 'owl', 'auto']"),
    (["pruning.allocation=auto", "pruning.allocation_range=2"], "allocation_range must be a number in [0, 0.99]"),
    (["pruning.allocation=owl", "pruning.pattern=2:4"], "with a pattern every pruned layer keeps it"),
    (["pruning.max_dense=0.1"], "max_dense chooses layers to keep dense under an N:M pattern"),
    (["pruning.allocation=auto", "pruning.allocation_options.gains=fast"], "allocation_options.gains must be one of"),
    (["pruning.allocation=auto", "pruning.allocation_options={gains: probes, probes: 0}"],
     "allocation_options.probes must be a positive integer"),
    (["pruning.targets=attn"], "did you mean pruning.targets=[attn]?"),
])
def test_structural_errors_come_before_calibration(args, message, capsys, tmp_path, monkeypatch):
    import ditprune.evaluation.harness as harness

    def forbidden(*a, **k):
        raise AssertionError("calibration started before the error was found")

    monkeypatch.setattr(harness, "Comparison", forbidden)
    assert message in _one_line_error(capsys, ["prune", DEMO, *args, f"export.output_dir={tmp_path / 'out'}"])


@pytest.mark.parametrize("args, message", CASES, ids=[" ".join(a[1:]) or a[0] for a, _ in CASES])
def test_user_error_is_one_line_and_exit_2_before_any_work(args, message, capsys, no_work, tmp_path, monkeypatch,
                                                            tiny_pipeline_dir):
    monkeypatch.setenv("SECRET_TOKEN", "hunter2")
    monkeypatch.chdir(ROOT)
    if args[0] == PIPE and "model.source" not in " ".join(args):
        args = [PIPE, f"model.source={tiny_pipeline_dir}", *args[1:]]
    if args[0] == PIPE and "model.device" not in " ".join(args):
        args = [*args, "model.device=cpu"]
    if "model.device=cuda" in args:
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has a CUDA device: model.device=cuda is valid here")
    if not any(a.startswith("export.output_dir=") for a in args):
        args = [args[0], f"export.output_dir={tmp_path / 'out'}", *args[1:]]  # before any --flag
    err = _one_line_error(capsys, ["prune", *args])
    assert message in err
    assert "hunter2" not in err


def test_pipeline_preflight_errors(capsys, no_work, tiny_pipeline_dir, tmp_path, monkeypatch):
    src = f"model.source={tiny_pipeline_dir}"
    cases = {
        "calibration.prompts=/no/such/prompts.txt": "calibration.prompts: cannot read /no/such/prompts.txt",
        f"calibration.prompts={tmp_path / 'empty.txt'}": "has no prompts",
        f"model.source={ROOT / 'configs'}": "is not a diffusers pipeline directory",
        f"export.output_dir={ROOT / 'README.md'}": "is a file; give a directory",
        f"export.output_dir={ROOT / 'README.md' / 'out'}": "is a file, not a directory",
    }
    (tmp_path / "empty.txt").write_text("\n\n")
    for arg, message in cases.items():
        argv = ["prune", PIPE, src, "model.device=cpu", f"export.output_dir={tmp_path / 'out'}", arg]
        assert message in _one_line_error(capsys, argv)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    err = _one_line_error(capsys, ["prune", PIPE, "model.device=cpu", f"export.output_dir={tmp_path / 'o'}"])
    assert "not in the local hub cache and HF_HUB_OFFLINE is set" in err


def test_errors_found_on_the_model_come_before_calibration(capsys, tiny_pipeline_dir, tmp_path, monkeypatch):
    import ditprune.models.loading as loading

    monkeypatch.setattr(loading, "pipeline_calibration", lambda *a, **k: pytest.fail("calibrated first"))
    base = ["prune", PIPE, f"model.source={tiny_pipeline_dir}", "model.device=cpu",
            f"export.output_dir={tmp_path / 'out'}"]
    assert "pattern 3:7 does not divide layer" in _one_line_error(capsys, base + ["pruning.pattern=3:7"])
    err = _one_line_error(capsys, base + ["pruning.overrides=[{targets: [ff], sparsity: 0.3}, "
                                          "{targets: [net], sparsity: 0.6}]"])
    assert "overrides 0 (['ff']) and 1 (['net']) both match layer" in err
    assert "matches no nn.Linear" in _one_line_error(capsys, base + ['pruning.targets=["no_such_layer"]'])
    assert not (tmp_path / "out").exists()


def test_verbose_shows_the_traceback(no_work):
    from ditprune.recipe import RecipeError

    with pytest.raises(RecipeError):
        main(["prune", DEMO, "calibration.steps=0", "-v"])


def test_two_four_unquoted_on_the_command_line_and_in_yaml(tmp_path):
    from ditprune.recipe import load_recipe

    assert load_recipe(DEMO, ["pruning.pattern=2:4"]).pruning.pattern == "2:4"
    assert load_recipe(DEMO, ["pruning.pattern=4:8"]).pruning.pattern == "4:8"
    path = tmp_path / "r.yaml"
    path.write_text("pruning:\n  pattern: 2:4\n  overrides:\n    - targets: [ff]\n      pattern: 1:4\n")
    recipe = load_recipe(path)
    assert recipe.pruning.pattern == "2:4" and recipe.pruning.overrides[0].pattern == "1:4"
    assert load_recipe(DEMO, ["pruning.sparsity=0.5"]).pruning.sparsity == 0.5  # numbers stay numbers
    # references between keys still work; only environment variables are refused
    assert load_recipe(DEMO, ["evaluation.n_samples=${calibration.num_prompts}"]).evaluation.n_samples == 16


def test_malformed_yaml_names_the_line(tmp_path, capsys, no_work):
    path = tmp_path / "bad.yaml"
    path.write_text("pruning:\n  sparsity: 0.5\n   method: dit\n")
    assert "not valid YAML (line 3" in _one_line_error(capsys, ["prune", str(path)])


def test_unreachable_sparsity_is_reported(capsys, tiny_pipeline_dir, tmp_path):
    code = main(["-q", "prune", PIPE, f"model.source={tiny_pipeline_dir}", "model.device=cpu", "pruning.method=wanda",
                 "calibration.num_prompts=2", "calibration.steps=2", "pruning.sparsity=0.99999",
                 f"export.output_dir={tmp_path / 'out'}"])
    assert code == 0
    out = capsys.readouterr().out
    assert "layers reached less than asked" in out and "int(in x sparsity)" in out


def test_flags_work_after_the_subcommand(capsys, no_work):
    assert main(["prune", "-q", DEMO, "calibration.steps=0"]) == 2
    assert main(["-q", "prune", DEMO, "calibration.steps=0"]) == 2


def test_evaluation_settings_without_a_clip_are_reported(capsys, tiny_pipeline_dir, tmp_path):
    code = main(["-q", "prune", PIPE, f"model.source={tiny_pipeline_dir}", "model.device=cpu", "pruning.method=wanda",
                 "calibration.num_prompts=2", "calibration.steps=2", "evaluation.num_prompts=10",
                 f"export.output_dir={tmp_path / 'out'}"])
    assert code == 0
    assert "evaluation.num_prompts set, but evaluation.clip_model is not" in capsys.readouterr().out


def test_importing_the_cli_leaves_torch_unloaded_so_the_wait_policy_applies():
    import os
    import subprocess
    import sys

    code = "import os, sys, ditprune.cli; assert 'torch' not in sys.modules; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0 and done.stdout.strip() == "PASSIVE", done.stderr


@pytest.fixture
def no_bench(monkeypatch):
    import ditprune.bench
    import ditprune.costbench
    import ditprune.deploybench

    def forbidden(*a, **k):
        raise AssertionError("the bench started before the error was found")

    for mod, name in ((ditprune.bench, "run_bench"), (ditprune.costbench, "run_cost"),
                      (ditprune.deploybench, "run_deploy")):
        monkeypatch.setattr(mod, name, forbidden)


@pytest.mark.parametrize("extra, message", [
    (["--cost", "--deploy"], "choose one of --ablation, --cost, --deploy"),
    (["--cost", "--images", "0"], "--images must be in [1, 64], got 0"),
    (["--images", "3"], "--images applies to --cost only"),
    (["--cost", "--device", "tpu"], "--device must be cpu or cuda"),
    (["--deploy", "--quick"], "--quick does not apply to --deploy"),
])
def test_bench_flags_are_checked_before_any_work(capsys, no_bench, tmp_path, extra, message):
    assert message in _one_line_error(capsys, ["bench", "--out", str(tmp_path / "b"), *extra])


def test_bench_cuda_without_cuda_is_a_user_error(capsys, no_bench, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: --device cuda is valid here")
    assert "no CUDA device" in _one_line_error(capsys, ["bench", "--cost", "--device", "cuda", "--out", str(tmp_path)])


def test_bench_follows_the_output_rules_of_prune(capsys, no_bench, tmp_path):
    users = tmp_path / "mine"
    users.mkdir()
    (users / "bench.md").write_text("my own notes")
    assert "was not written by ditprune" in _one_line_error(capsys, ["bench", "--out", str(users)])
    assert (users / "bench.md").read_text() == "my own notes"
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert "is a file" in _one_line_error(capsys, ["bench", "--out", str(afile)])
    assert "cannot write into" in _one_line_error(capsys, ["bench", "--out", "/proc/ditprune-bench"])


def test_bench_writes_through_the_staging_directory(capsys, tmp_path, monkeypatch):
    import ditprune.deploybench

    def fake(out, progress=True):
        (out / "deploy.md").write_text("t\n")
        (out / "deploy.json").write_text("[]\n")
        return {"table": "t", "outputs": {"table": str(out / "deploy.md"), "json": str(out / "deploy.json")}}

    monkeypatch.setattr(ditprune.deploybench, "run_deploy", fake)
    for _ in range(2):  # a second run replaces what the first one wrote
        assert main(["-q", "bench", "--deploy", "--out", str(tmp_path / "b")]) == 0
    printed = capsys.readouterr().out
    assert f"table: {tmp_path / 'b' / 'deploy.md'}" in printed
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [".ditprune.json", "deploy.json", "deploy.md"]


def test_a_fifo_or_a_device_is_not_read_as_prompts(capsys, no_work, tiny_pipeline_dir, tmp_path):
    import os

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for source in (fifo, "/dev/zero"):
        err = _one_line_error(capsys, ["prune", PIPE, f"model.source={tiny_pipeline_dir}", "model.device=cpu",
                                       f"calibration.prompts={source}", f"export.output_dir={tmp_path / 'out'}"])
        assert "is not a regular file" in err
    from ditprune.evaluation.pipeline import read_eval_prompts
    from ditprune.errors import InputError

    with pytest.raises(InputError, match="not a regular file"):
        read_eval_prompts(fifo)


def test_a_symlink_loop_as_output_is_a_user_error(capsys, no_work, tmp_path):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    err = _one_line_error(capsys, ["prune", DEMO, f"export.output_dir={loop / 'out'}"])
    assert err.startswith("ditprune: error: export.output_dir")
