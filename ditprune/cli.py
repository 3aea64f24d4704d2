"""ditprune: post-training pruning for Diffusion Transformers.

  ditprune prune                         the embedded demo: the shipped FLUX-layout reference DiT,
                                         DiT-Pruning at 50% beside the dense model and Wanda
  ditprune prune CONFIG [key=value ...]  a recipe (see configs/), with overrides
  ditprune eval CONFIG [key=value ...]   a pipeline's dense and pruned transformers: CLIP score,
                                         FID, PSNR/SSIM, on the same prompts and seeds
  ditprune bench [--ablation|--cost|--deploy|--structured]
                                         comparisons, ablation, cost at FLUX.1-dev shapes, size
                                         and speed per export format, heads and channels removed

A user error (a bad key or value, a missing file, an output that would overwrite something)
is one line on stderr and exit code 2, before any work; -v shows the traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

# Importing the ditprune package (before this module) set OMP_WAIT_POLICY=PASSIVE unless the
# user set one: see ditprune/__init__.py.

__all__ = ["main"]

log = logging.getLogger("ditprune")

EXIT_USER_ERROR = 2


def _cmd_prune(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf

    from .recipe import load_recipe
    from .runner import check_run, run_recipe

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not Path(config).exists():
        config, overrides = None, [config, *overrides]  # `ditprune prune key=value` on the demo
    recipe = load_recipe(config, overrides)
    out = check_run(recipe)
    fabric = _fabric(args)
    zero = fabric is None or fabric.global_rank == 0
    if zero:
        print("# resolved recipe\n" + OmegaConf.to_yaml(recipe))
    result = run_recipe(recipe, out, progress=not args.quiet and zero, fabric=fabric)
    if zero:
        print(result["table"])
        print()
        if result["report"].shortfall():
            print("note: " + result["report"].summary().split("; ", 1)[1])
        from .recipe import unused_evaluation

        if note := unused_evaluation(recipe):
            print("note: " + note)
        for what, where in result["outputs"].items():
            print(f"{what:>10}: {where}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from .recipe import load_recipe
    from .runner import run_eval

    recipe = load_recipe(args.config, list(args.overrides))
    fabric = _fabric(args)
    zero = fabric is None or fabric.global_rank == 0
    result = run_eval(recipe, progress=not args.quiet and zero, fabric=fabric)
    if zero:
        print(result["table"])
        print()
        for what, where in result["outputs"].items():
            print(f"{what:>10}: {where}")
    return 0


def _fabric(args: argparse.Namespace):
    """Lightning Fabric over ``--devices`` (several: DDP, one process per device; each rank takes
    its share of prompts), or None for one device."""
    from .errors import InputError

    accelerators = ("auto", "cpu", "cuda", "gpu")
    if args.accelerator not in accelerators:
        raise InputError(f"--accelerator must be one of {list(accelerators)}, got {args.accelerator!r}")
    if args.devices < 1:
        raise InputError(f"--devices must be >= 1, got {args.devices}")
    import torch

    gpu = args.accelerator in ("cuda", "gpu") or (args.accelerator == "auto" and torch.cuda.is_available())
    if gpu and not torch.cuda.is_available():
        raise InputError(f"--accelerator {args.accelerator}: no CUDA device on this machine; use --accelerator cpu")
    have = torch.cuda.device_count() if gpu else (os.cpu_count() or 1)
    if args.devices > have:
        raise InputError(f"--devices {args.devices}: this machine has {have} {'GPUs' if gpu else 'CPU cores'}")
    if args.devices == 1:
        return None
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator=args.accelerator, devices=args.devices, strategy="ddp")
    fabric.launch()
    _CHILDREN[:] = getattr(fabric.strategy.launcher, "procs", []) or []  # rank 0 started them
    return fabric


_CHILDREN: list = []  # the other ranks' processes, on rank 0


def _end_other_ranks() -> None:
    """A rank that fails ends the others: they would wait in a collective until its timeout.
    Rank 0 kills the ranks it started; a failing child exits, and Lightning's observer on rank 0
    then ends every rank."""
    import signal

    for proc in _CHILDREN:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)


BENCH_OUTPUTS = {"cost": ["cost.md", "cost.json"], "deploy": ["deploy.md", "deploy.json"],
                 "ablation": ["ablation.md", "ablation.json"], "bench": ["bench.md", "bench.json", "bench.png"],
                 "structured": ["structured.md", "structured.json"]}


def _bench_mode(args: argparse.Namespace) -> str:
    """The one mode asked for, every flag checked before any work (user errors otherwise)."""
    from .errors import InputError

    modes = [m for m in ("ablation", "cost", "deploy", "structured") if getattr(args, m)]
    if len(modes) > 1:
        raise InputError("bench: choose one of --ablation, --cost, --deploy, --structured "
                         f"(got {', '.join('--' + m for m in modes)})")
    mode = modes[0] if modes else "bench"
    if not 1 <= args.images <= 64:
        raise InputError(f"bench: --images must be in [1, 64], got {args.images}")
    if args.images != 1 and mode != "cost":
        raise InputError("bench: --images applies to --cost only")
    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        raise InputError(f"bench: --device must be cpu or cuda, got {args.device!r}")
    if args.device != "cpu":
        import torch

        if mode not in ("cost", "structured"):
            raise InputError("bench: --device applies to --cost and --structured only")
        if not torch.cuda.is_available():
            raise InputError(f"bench: --device {args.device}: no CUDA device on this machine; use --device cpu")
    if args.dtype not in ("bfloat16", "float32"):
        raise InputError(f"bench: --dtype must be bfloat16 or float32, got {args.dtype!r}")
    if args.dtype != "bfloat16" and mode != "cost":
        raise InputError("bench: --dtype applies to --cost only")
    if args.quick and mode == "deploy":
        raise InputError("bench: --quick does not apply to --deploy")
    return mode


def _cmd_bench(args: argparse.Namespace) -> int:
    from ._io import OutputDir

    mode = _bench_mode(args)
    # the same output rules as `prune`: nothing ditprune did not write is replaced, outputs staged
    with OutputDir(args.out, BENCH_OUTPUTS[mode], key="--out") as o:
        if mode == "cost":
            from .costbench import run_cost

            out = run_cost(o.staging, quick=args.quick, images=args.images, device=args.device,
                           progress=not args.quiet, dtype=args.dtype)
        elif mode == "deploy":
            from .deploybench import run_deploy

            out = run_deploy(o.staging, progress=not args.quiet)
        elif mode == "structured":
            from .structbench import run_structured

            out = run_structured(o.staging, quick=args.quick, progress=not args.quiet, device=args.device)
        else:
            from .bench import run_bench

            out = run_bench(o.staging, ablation=mode == "ablation", quick=args.quick, progress=not args.quiet)
    print(out["table"])
    print()
    for what, where in out["outputs"].items():
        print(f"{what:>10}: {o.final(Path(where).name)}")
    return 0


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="log details, and show tracebacks of errors")
    parser = argparse.ArgumentParser(prog="ditprune", description=__doc__, parents=[common],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prune", parents=[common], help="prune a model as a recipe says (no CONFIG: the embedded demo)",
                       epilog=_prune_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", help="recipe YAML, or the name of a shipped recipe (see below)")
    p.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. pruning.sparsity=0.6 pruning.pattern=2:4")
    p.set_defaults(func=_cmd_prune)
    e = sub.add_parser("eval", parents=[common], help="judge a pruned transformer against its dense pipeline",
                       epilog="keys: evaluation.pruned (the pruned transformer's directory), evaluation.clip_model (a "
                              "local CLIP), evaluation.prompts (MJHQ-30K meta_data.json or a text file), "
                              "evaluation.num_prompts, evaluation.reference_images (real images, for FID), "
                              "evaluation.inception, evaluation.image_reward, evaluation.steps/guidance/resolution")
    e.add_argument("config", help="recipe YAML, or the name of a shipped recipe (e.g. flux_dev)")
    e.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. evaluation.num_prompts=100")
    e.set_defaults(func=_cmd_eval)
    for sp in (p, e):
        sp.add_argument("--devices", type=int, default=1, help="processes, one per device (Lightning Fabric, DDP)")
        sp.add_argument("--accelerator", default="auto", help="with --devices: cpu, cuda or auto")
    b = sub.add_parser("bench", parents=[common], help="every method x sparsity x reference model, one table and plot",
                       epilog="durations on 2 CPU cores: the default comparison about 70 minutes; --ablation about 25; "
                              "--deploy about 3; --structured about 12 (--quick: speed and parameters only, 3); --cost more than an hour (--cost --quick, one 3072x3072 layer "
                              "table and the blocks once: tens of minutes)")
    b.add_argument("--out", default="outputs/bench", help="where the table and plot go")
    b.add_argument("--ablation", action="store_true",
                   help="the ablation grid instead of the method comparison (about 25 minutes)")
    b.add_argument("--quick", action="store_true", help="fewer samples and settings (smoke run)")
    b.add_argument("--cost", action="store_true",
                   help="time and memory of each method at FLUX.1-dev's real shapes (random weights; over an hour "
                        "on a CPU)")
    b.add_argument("--deploy", action="store_true",
                   help="bytes on disk, load and forward time of every export format (dense, compressed, int8, "
                        "...; about 3 minutes)")
    b.add_argument("--structured", action="store_true",
                   help="heads and MLP channels removed: forward speed at FLUX shapes, FLUX.1-dev's parameters, "
                        "quality on the reference models (about 12 minutes; --quick: without the quality)")
    b.add_argument("--images", type=int, default=1, help="--cost: samples per calibration call of the block runs")
    b.add_argument("--device", default="cpu", help="--cost: where to run (cpu, cuda)")
    b.add_argument("--dtype", default="bfloat16",
                   help="--cost: dtype of the block runs (bfloat16, as configs/flux_dev.yaml; float32 on a CPU "
                        "without bf16 matrix units, where bf16 products fall back to a path ~300x slower)")
    b.set_defaults(func=_cmd_bench)
    return parser


def _prune_help() -> str:
    from .recipe import shipped_recipes
    from .sparsifiers import METHODS

    return (
        f"methods (pruning.method): {', '.join(METHODS)}\n"
        f"shipped recipes: {', '.join(shipped_recipes())}   e.g. ditprune prune flux_dev model.source=/path/to/FLUX.1-dev\n\n"
        "main recipe keys (key=value on the command line):\n"
        "  model.source         reference:flux-layout | reference:dit-xl-layout | a pipeline directory | a hub id\n"
        "  model.dtype          float32 | bfloat16 | float16            model.device   cpu | cuda | cuda:N\n"
        "  calibration.prompts  a text file, one prompt a line (default: 80 built-in prompts)\n"
        "  calibration.num_prompts, calibration.steps, calibration.guidance, calibration.resolution\n"
        "  pruning.method       dit (default) | wanda | magnitude | ria | sparsegpt\n"
        "  pruning.sparsity     fraction in [0, 1)         pruning.pattern  N:M, e.g. 2:4 (no quotes needed)\n"
        "  pruning.targets / pruning.ignore   lists of regexes     pruning.offload  cpu\n"
        "  pruning.options      the method's own, e.g. {alpha: 0.4} or {reconstruct: true}\n"
        "  pruning.allocation   uniform (default) | owl | auto: a sparsity per layer, same total\n"
        "  pruning.allocation_range   how far a layer may go from pruning.sparsity (default 0.2)\n"
        "  pruning.allocation_options auto's: {gains: layers|blocks|probes|none, probes, gain_batches, batches, ...}\n"
        "  pruning.max_dense    with a pattern and allocation auto: fraction of weights left dense (default 0)\n"
        "  quantization.config  int8_weight_only | float8_weight_only | intx_weight_only | int8_dynamic\n"
        "  export.output_dir    where outputs go           export.format  diffusers | compressed\n"
        "  export.overwrite     true to replace files ditprune did not write\n"
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.quiet, args.verbose = getattr(args, "quiet", False), getattr(args, "verbose", False)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    _show_stages()
    if not args.verbose:
        _quiet_dependencies()
    from .errors import UserError

    try:
        return args.func(args)
    except UserError as e:
        _end_other_ranks()
        if args.verbose:
            raise
        print(f"ditprune: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except BaseException:
        _end_other_ranks()
        raise


def _show_stages() -> None:
    """The runner's stage lines on stdout, beside the recipe and the table; stderr keeps the
    progress bars and, on a user error, its one line."""
    stages = logging.getLogger("ditprune.stages")
    for handler in list(stages.handlers):  # main() may run more than once in a process
        stages.removeHandler(handler)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("ditprune: %(message)s"))
    stages.addHandler(handler)
    stages.setLevel(logging.INFO)
    stages.propagate = False


def _quiet_dependencies() -> None:
    """The CLI is an application: silence the chatter of torchao, diffusers, transformers and
    Lightning (its tips and device lines; it sets its level when imported, so import it first)."""
    for name in ("torchao", "torch.utils._pytree", "torch._dynamo"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import lightning.fabric  # noqa: F401
    import lightning.pytorch  # noqa: F401
    import transformers

    from ._quiet import diffusers as _diffusers

    diffusers = _diffusers()
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()  # ditprune shows its own progress
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
