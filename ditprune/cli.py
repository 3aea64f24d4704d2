"""``ditprune prune [CONFIG] [key=value ...]`` and ``ditprune bench``.

With no CONFIG, ``prune`` runs the embedded demo: the shipped FLUX-layout reference model pruned
to 50% with DiT-Pruning, beside the dense model and Wanda, on the same calibration and seeds.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from omegaconf import OmegaConf

__all__ = ["main"]

log = logging.getLogger("ditprune")


def _cmd_prune(args: argparse.Namespace) -> int:
    from .recipe import RecipeError, load_recipe
    from .runner import run_recipe

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not Path(config).exists():
        config, overrides = None, [config, *overrides]  # `ditprune prune key=value` on the demo
    try:
        recipe = load_recipe(config, overrides)
    except RecipeError as e:
        print(f"ditprune: {e}", file=sys.stderr)
        return 2
    print("# resolved recipe\n" + OmegaConf.to_yaml(recipe))
    result = run_recipe(recipe, progress=not args.quiet)
    print(result["table"])
    print()
    for what, where in result["outputs"].items():
        print(f"{what:>10}: {where}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_bench

    out = run_bench(Path(args.out), ablation=args.ablation, quick=args.quick, progress=not args.quiet)
    print(out["table"])
    print()
    for what, where in out["outputs"].items():
        print(f"{what:>10}: {where}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ditprune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    parser.add_argument("-v", "--verbose", action="store_true", help="log per-layer details")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prune", help="prune a model as a recipe says (no CONFIG: the embedded demo)")
    p.add_argument("config", nargs="?", help="recipe YAML (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. pruning.sparsity=0.6")
    p.set_defaults(func=_cmd_prune)
    b = sub.add_parser("bench", help="every method x sparsity x reference model, one table and plot")
    b.add_argument("--out", default="outputs/bench", help="where the table and plot go")
    b.add_argument("--ablation", action="store_true", help="the ablation grid instead of the method comparison")
    b.add_argument("--quick", action="store_true", help="fewer samples and settings (smoke run)")
    b.set_defaults(func=_cmd_bench)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    if not args.verbose:
        _quiet_dependencies()
    return args.func(args)


def _quiet_dependencies() -> None:
    """The CLI is an application: silence import-time chatter of torchao, diffusers, transformers."""
    for name in ("torchao", "torch.utils._pytree", "torch._dynamo"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
