"""ditprune: post-training pruning for Diffusion Transformers.

  ditprune prune                         the embedded demo: the shipped FLUX-layout reference DiT,
                                         DiT-Pruning at 50% beside the dense model and Wanda
  ditprune prune CONFIG [key=value ...]  a recipe (see configs/), with overrides
  ditprune bench [--ablation]            every method x sparsity x reference model

A user error (a bad key or value, a missing file, an output that would overwrite something)
is one line on stderr and exit code 2, before any work; -v shows the traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

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
    print("# resolved recipe\n" + OmegaConf.to_yaml(recipe))
    result = run_recipe(recipe, out, progress=not args.quiet)
    print(result["table"])
    print()
    short = result["report"].shortfall()
    if short:
        print("note: " + result["report"].summary().split("; ", 1)[1])
    for what, where in result["outputs"].items():
        print(f"{what:>10}: {where}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.cost:
        from .costbench import run_cost

        out = run_cost(Path(args.out), quick=args.quick, images=args.images, device=args.device, progress=not args.quiet)
    else:
        from .bench import run_bench

        out = run_bench(Path(args.out), ablation=args.ablation, quick=args.quick, progress=not args.quiet)
    print(out["table"])
    print()
    for what, where in out["outputs"].items():
        print(f"{what:>10}: {where}")
    return 0


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="log details, and show tracebacks of errors")
    parser = argparse.ArgumentParser(prog="ditprune", description=__doc__, parents=[common],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prune", parents=[common], help="prune a model as a recipe says (no CONFIG: the embedded demo)")
    p.add_argument("config", nargs="?", help="recipe YAML (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. pruning.sparsity=0.6 pruning.pattern=2:4")
    p.set_defaults(func=_cmd_prune)
    b = sub.add_parser("bench", parents=[common], help="every method x sparsity x reference model, one table and plot")
    b.add_argument("--out", default="outputs/bench", help="where the table and plot go")
    b.add_argument("--ablation", action="store_true", help="the ablation grid instead of the method comparison")
    b.add_argument("--quick", action="store_true", help="fewer samples and settings (smoke run)")
    b.add_argument("--cost", action="store_true",
                   help="time and memory of each method at FLUX.1-dev's real shapes (random weights)")
    b.add_argument("--images", type=int, default=1, help="--cost: samples per calibration call of the block runs")
    b.add_argument("--device", default="cpu", help="--cost: where to run (cpu, cuda)")
    b.set_defaults(func=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.quiet, args.verbose = getattr(args, "quiet", False), getattr(args, "verbose", False)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    if not args.verbose:
        _quiet_dependencies()
    from .errors import UserError

    try:
        return args.func(args)
    except UserError as e:
        if args.verbose:
            raise
        print(f"ditprune: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR


def _quiet_dependencies() -> None:
    """The CLI is an application: silence import-time chatter of torchao, diffusers, transformers."""
    for name in ("torchao", "torch.utils._pytree", "torch._dynamo"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()  # ditprune shows its own progress
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
