"""`vestigia self-influence` and `vestigia explain` on the user's saved model and data.

Both commands check everything they can before the work: the output folder is writable, the
model loads, its loss can be made unreduced, the data's inputs fit the model and its labels fit
the output. Then they score, write `scores.csv`, `results.npz` + `settings.json` (what
`vestigia report` rebuilds the page from) and `report.html`.
"""

from __future__ import annotations

import csv
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from vestigia.app.artefacts import (
    Dataset,
    check_inputs_fit,
    check_output_dir,
    class_indices,
    fit_labels,
    load_data,
    load_model,
    predicted_labels,
    resolve_loss,
)
from vestigia.app.methods import METHODS, Setup, choose_method
from vestigia.errors import InvalidDataError
from vestigia.progress import Progress
from vestigia.report import ReportData, load_noise_mask, write_report

__all__ = ["CommandResult", "Options", "run_explain", "run_self_influence"]

SHOWN = 48  # most suspicious examples kept for the report


@dataclass
class Options:
    """The settings both commands share (the command line's flags)."""

    model: str
    train: str
    output: str
    method: str = "auto"
    layers: str = "last"
    solver: str = "auto"
    damping: float | None = None
    loss: str | None = None
    from_logits: bool | None = None
    checkpoints: str | None = None
    noise_mask: str | None = None
    image_shape: str = "auto"
    seed: int = 0


@dataclass
class CommandResult:
    """What a command wrote and found."""

    output: Path
    method: str
    n_params: int
    scores: np.ndarray
    files: list[Path]
    seconds: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [f"method: {self.method}, {self.n_params} parameters watched"]
        lines += [f"wrote {path}" for path in self.files]
        lines.append(f"time for the {len(self.seconds)} steps: {sum(self.seconds.values()):.1f} s")
        return "\n".join(lines)


def _layers(text: str) -> str | list[str]:
    return text if text in ("last", "all") else [name.strip() for name in text.split(",") if name.strip()]


def _prepare(options: Options, progress: Progress, with_test: str | None = None) -> tuple[Setup, Dataset, Any]:
    """Check the output folder, load and check the model, loss and data; return the `Setup`."""
    if options.method != "auto" and options.method not in METHODS:
        raise InvalidDataError(f"`--method` must be 'auto' or one of {sorted(METHODS)}. Received: {options.method!r}")
    output = check_output_dir(options.output)
    noise = None
    with progress.step(f"loading the model {options.model} and the data {options.train}"):
        model = load_model(options.model)
        loss = resolve_loss(model, options.loss, options.from_logits)
        data = load_data(options.train, model, "--train")
        check_inputs_fit(model, data, "--train")
        y = fit_labels(model, loss, data, "--train")
        test = None
        if with_test is not None:
            test = load_data(with_test, model, "--test")
            check_inputs_fit(model, test, "--test")
            test.y = fit_labels(model, loss, test, "--test")
        if options.noise_mask is not None:
            noise = load_noise_mask(options.noise_mask, len(data))
    setup = Setup(
        model,
        loss,
        data.x,
        y,
        _layers(options.layers),
        options.solver,
        options.damping,
        options.checkpoints,
        options.seed,
    )
    setup.settings.update(
        model=os.path.abspath(options.model),
        train=os.path.abspath(options.train),
        n_train=len(data),
        loss=f"{type(loss).__name__}({getattr(loss, 'name', '')})",
        layers=options.layers,
    )
    return setup, data, (output, test, noise)


def _build(setup: Setup, method: str, progress: Progress) -> tuple[str, Any]:
    name = choose_method(setup, method)
    n = setup.n_params
    setup.settings.update(method=name, method_requested=method, n_params=n)
    with progress.step(f"building {name} on {n} watched parameters"):
        calculator = METHODS[name].build(setup)
    return name, calculator


def _report_data(setup: Setup, data: Dataset, title: str, options: Options) -> ReportData:
    predicted = predicted_labels(setup.model, data.x)
    return ReportData(
        title=title,
        given=class_indices(setup.y),
        predicted=predicted,
        class_names=data.class_names,
        settings=dict(setup.settings),
        image_shape=options.image_shape,
    )


def run_self_influence(options: Options, progress_stream: TextIO | None = sys.stderr) -> CommandResult:
    """Rank the training set by self-influence; write `scores.csv`, `results.npz`, `report.html`."""
    progress = Progress(4, progress_stream)
    setup, data, (output, _, noise) = _prepare(options, progress)
    name, calculator = _build(setup, options.method, progress)
    with progress.step(f"scoring self-influence of {len(data)} examples"):
        start = time.perf_counter()
        scores = np.asarray(calculator.self_influence((setup.x, setup.y)), dtype=np.float64)
        setup.settings["scoring_seconds"] = round(time.perf_counter() - start, 3)
    with progress.step(f"writing {output}"):
        report = _report_data(setup, data, f"Self-influence of {Path(options.train).name}", options)
        report.scores = scores
        order = np.argsort(-scores, kind="stable")
        report.shown_index = order[:SHOWN]
        report.shown_x = data.x[report.shown_index]
        report.noise_mask = noise
        files = [_write_scores(output / "scores.csv", scores, report), *report.save(output)]
        files.append(write_report(report, output / "report.html"))
    return CommandResult(output, name, setup.n_params, scores, files, dict(progress.seconds))


def _queries(text: str | None, n_test: int) -> np.ndarray:
    if text is None:
        return np.arange(min(n_test, 8))
    try:
        chosen = np.array([int(part) for part in text.split(",") if part.strip()], dtype=np.int64)
    except ValueError:
        raise InvalidDataError(f"`--queries` must be a comma list of test indices. Received: {text!r}") from None
    if chosen.size == 0 or chosen.min() < 0 or chosen.max() >= n_test:
        raise InvalidDataError(f"`--queries` must be indices in [0, {n_test}). Received: {text!r}")
    return chosen


def run_explain(
    options: Options, test: str, queries: str | None = None, k: int = 5, progress_stream: TextIO | None = sys.stderr
) -> CommandResult:
    """Top-`k` proponents and opponents of test predictions; write `scores.csv`, `results.npz`, `report.html`."""
    progress = Progress(4, progress_stream)
    setup, data, (output, test_data, noise) = _prepare(options, progress, with_test=test)
    name, calculator = _build(setup, options.method, progress)
    if not METHODS[name].pairwise:
        raise InvalidDataError(
            f"`--method {name}` gives self-influence only; `vestigia explain` needs a pairwise method: "
            f"{sorted(m for m, spec in METHODS.items() if spec.pairwise)}"
        )
    chosen = _queries(queries, len(test_data))
    k = min(k, len(data))
    with progress.step(f"scoring {chosen.size} test examples against {len(data)} training examples"):
        matrix = np.asarray(calculator.influence_matrix((test_data.x[chosen], test_data.y[chosen]), (setup.x, setup.y)))
    with progress.step(f"writing {output}"):
        report = _report_data(setup, data, f"Explanations of {Path(test).name}", options)
        report.settings["test"] = os.path.abspath(test)
        report.noise_mask = noise
        report.set_explanations(
            matrix,
            chosen,
            test_data.x[chosen],
            class_indices(test_data.y[chosen]),
            predicted_labels(setup.model, test_data.x[chosen]),
            data.x,
            k,
        )
        files = [_write_explanations(output / "scores.csv", matrix, chosen, k), *report.save(output)]
        files.append(write_report(report, output / "report.html"))
    return CommandResult(output, name, setup.n_params, matrix, files, dict(progress.seconds))


def _write_scores(path: Path, scores: np.ndarray, report: ReportData) -> Path:
    order = np.argsort(-scores, kind="stable")
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["rank", "index", "given_label", "predicted_label", "self_influence"])
        for rank, i in enumerate(order):
            writer.writerow(
                [
                    rank + 1,
                    int(i),
                    report.label_text(report.given, i),
                    report.label_text(report.predicted, i),
                    repr(float(scores[i])),
                ]
            )
    return path


def _write_explanations(path: Path, matrix: np.ndarray, chosen: np.ndarray, k: int) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["test_index", "kind", "rank", "train_index", "influence"])
        for row, t in enumerate(chosen):
            order = np.argsort(-matrix[row], kind="stable")
            for kind, picked in (("proponent", order[:k]), ("opponent", order[::-1][:k])):
                for rank, i in enumerate(picked):
                    writer.writerow([int(t), kind, rank + 1, int(i), repr(float(matrix[row, i]))])
    return path
