"""The ``neuralode`` command line: a thin layer over the experiment modules.

Each module in :data:`COMMAND_MODULES` has ``register(commands, train)`` that adds its sub-commands
(``commands``: top-level, ``train``: under ``neuralode train``) and sets ``func`` on each parser, and
optionally ``register_eval(evals)`` for its ``neuralode eval`` commands.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

import neuralode

COMMAND_MODULES = (
    "neuralode.experiments.spiral",
    "neuralode.experiments.mnist",
    "neuralode.experiments.cnf",
    "neuralode.experiments.latent",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="neuralode",
        description="Neural ODEs in PyTorch: the paper's experiments, each one command.",
    )
    parser.add_argument("--version", action="version", version=f"neuralode {neuralode.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    train_parser = commands.add_parser("train", help="train a model (see `neuralode train -h`)")
    train = train_parser.add_subparsers(dest="experiment", metavar="EXPERIMENT", required=True)
    eval_parser = commands.add_parser(
        "eval", help="re-evaluate a run folder's selected weights on the test split (see `neuralode eval -h`)"
    )
    evals = eval_parser.add_subparsers(dest="experiment", metavar="EXPERIMENT", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # that experiment is not part of this install
                continue
            raise
        module.register(commands, train)
        if hasattr(module, "register_eval"):
            module.register_eval(evals)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    result = args.func(args)
    return int(result) if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
