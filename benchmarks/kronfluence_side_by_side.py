"""Vestigia's EK-FAC / K-FAC side by side with Kronfluence 1.0.1 (the PyTorch reference), same run.

Setting: the detection benchmark's `mnist_mlp64` (784-64-10 ReLU MLP, 50,880 parameters, every
layer watched, 4,000 training images; see benchmarks/detection/README.md). The Keras model is
trained exactly as that benchmark trains its clean LDS model (same seeded procedure, bit-identical
weights), and its weights are copied into the equivalent PyTorch `nn.Sequential`
(`Linear.weight = Dense.kernel.T`; the logits are checked to agree). Then, for EK-FAC and K-FAC:

* Vestigia: `FirstOrderInfluenceCalculator(..., "ekfac" | "kfac", damping=2e-3, seed=0)` over every
  layer (the benchmark's row); *factors* = building it (covariances, eigendecompositions, EK-FAC's
  eigenvalue refit, first tracing), *scores* = `influence_matrix(test, train)`, `(100, 4000)`.
* Kronfluence: `Analyzer.fit_all_factors` (strategy "ekfac" | "kfac") = *factors*, then
  `compute_pairwise_scores` = *scores*, on the same arrays in the same order, the same batch sizes
  (500 training, 100 queries), `cpu=True`, output written to a temporary folder (part of its
  pipeline, so timed).

Same conventions on both sides: the curvature is the Fisher of the summed-over-examples,
mean-normalised cross-entropy (activation covariance over examples, output-gradient covariance
over examples, one sample per example), bias folded in as an augmented input (only the hidden
layer has one), eigendecompositions in float64, an absolute damping `2 * l2 = 2e-3` added to every
eigenvalue of every layer (Kronfluence's `damping_factor`; Vestigia's `damping`), and the score
`+ g_test^T (F + damping)^-1 g_train` with the test side the gradient of the test example's loss
(Kronfluence's `compute_measurement` returns the summed cross-entropy). Differences, none of them
a choice of this script: the true Fisher's labels are sampled by each library's own generator
(TF's stateless sampler with seed 0, `torch.multinomial` with a generator seeded 0), so the two
factor sets differ by the sampling noise of one label per example; with the empirical Fisher both
use the given labels and differ by float rounding only (Kronfluence preconditions and scores in
float32, Vestigia in float64). The run does both (`--fisher true,empirical`, the default). The
score correlation and largest relative difference printed per method are the direct check that
both compute the same quantity.

LDS: the detection benchmark's protocol and its cached ground truth (50 models retrained on 50%
subsets, correct-class margin of the first 100 test images; `--cache-dir` as run.py's; computed
and cached first if missing), `vestigia.evaluation.linear_datamodeling_score` with its 95%
bootstrap CI over test images, and Vestigia's LDS minus Kronfluence's with a paired bootstrap
interval over test images. Threads: `--threads` (default 2) for TF's and torch's intra-op pools.
Seconds: wall-clock, the fastest of `--repeats` (default 3) runs with the two libraries alternated
(the run least disturbed by other jobs on a shared machine), and the process CPU seconds.
Run the timing through the shared lock (about 4 minutes with a cached ground truth):

    flock /work/coord/bench.lock python benchmarks/kronfluence_side_by_side.py \
        --out benchmarks/results/kronfluence_side_by_side.md
    python benchmarks/kronfluence_side_by_side.py --quick --fisher empirical   # smoke test (tiny setting)

Needs the benchmark-only extra `pip install -e .[bench-torch]` (torch 2.13.0 CPU, kronfluence 1.0.1).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
METHODS = {"ekfac": "EK-FAC", "kfac": "K-FAC"}


def _detection_runner() -> Any:
    """benchmarks/detection/run.py as a module (it puts its folder on `sys.path` for its helpers)."""
    spec = importlib.util.spec_from_file_location("vestigia_detection_bench", HERE / "detection" / "run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def torch_mlp(keras_model: Any) -> Any:
    """The PyTorch twin of a Sequential of `Dense` layers (ReLU between them, linear last):
    `nn.Linear.weight` is the transposed Keras kernel `(in, out) -> (out, in)`, biases copied."""
    import torch
    from torch import nn

    dense = [layer for layer in keras_model.layers if layer.weights]
    modules: list[Any] = []
    for index, layer in enumerate(dense):
        kernel = np.asarray(layer.kernel)
        linear = nn.Linear(kernel.shape[0], kernel.shape[1], bias=layer.use_bias)
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(kernel.T.copy()))
            if layer.use_bias:
                linear.bias.copy_(torch.from_numpy(np.asarray(layer.bias)))
        modules.append(linear)
        if index < len(dense) - 1:
            if layer.activation.__name__ != "relu":
                raise ValueError(f"hidden layer {layer.name!r} must use ReLU, not {layer.activation.__name__}")
            modules.append(nn.ReLU())
    return nn.Sequential(*modules).eval()


def classification_task(seed: int) -> Any:
    """Kronfluence's `Task`: summed cross-entropy; with `sample=True` labels drawn from the model."""
    import torch
    import torch.nn.functional as F
    from kronfluence.task import Task

    class Classification(Task):
        def __init__(self) -> None:
            self.generator = torch.Generator().manual_seed(seed)

        def compute_train_loss(self, batch: Any, model: Any, sample: bool = False) -> Any:
            inputs, labels = batch
            logits = model(inputs)
            if sample:
                with torch.no_grad():
                    probabilities = torch.softmax(logits.detach(), dim=-1)
                    labels = torch.multinomial(probabilities, 1, generator=self.generator).flatten()
            return F.cross_entropy(logits, labels, reduction="sum")

        def compute_measurement(self, batch: Any, model: Any) -> Any:
            inputs, labels = batch
            return F.cross_entropy(model(inputs), labels, reduction="sum")

    return Classification()


def kronfluence_scores(
    keras_model: Any, split: Any, setting: Any, strategy: str, fisher: str, folder: str
) -> tuple[np.ndarray, float, float]:
    """Kronfluence's pairwise scores `(n_test, n_train)` and its factor / score seconds."""
    import torch
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from torch.utils.data import TensorDataset

    warnings.filterwarnings("ignore", message=".*GradScaler", category=FutureWarning)  # Kronfluence's own calls
    torch.manual_seed(setting.seed)
    task = classification_task(setting.seed)
    model = prepare_model(torch_mlp(keras_model), task)
    train = TensorDataset(torch.from_numpy(split.x_train), torch.from_numpy(split.y_train))
    n_test = setting.lds_n_test
    test = TensorDataset(torch.from_numpy(split.x_test[:n_test]), torch.from_numpy(split.y_test[:n_test]))
    analyzer = Analyzer(
        f"mlp_{strategy}_{fisher}", model, task, cpu=True, disable_tqdm=True, output_dir=folder, log_level=logging.ERROR
    )
    factor_args = FactorArguments(
        strategy=strategy,
        use_empirical_fisher=fisher == "empirical",
        covariance_max_examples=None,
        lambda_max_examples=None,
    )
    start = time.perf_counter()
    analyzer.fit_all_factors(
        "factors",
        train,
        per_device_batch_size=setting.influence_batch_size,
        factor_args=factor_args,
        overwrite_output_dir=True,
    )
    factors_s = time.perf_counter() - start
    start = time.perf_counter()
    analyzer.compute_pairwise_scores(
        "scores",
        "factors",
        test,
        train,
        per_device_query_batch_size=n_test,
        per_device_train_batch_size=setting.influence_batch_size,
        score_args=ScoreArguments(damping_factor=setting.damping),
        overwrite_output_dir=True,
    )
    scores = analyzer.load_pairwise_scores("scores")  # written to disk by the call above
    scores_s = time.perf_counter() - start
    if scores is None:
        raise RuntimeError(f"Kronfluence wrote no pairwise scores under {folder}")
    return scores["all_modules"].double().numpy(), factors_s, scores_s


def vestigia_scores(context: Any, test: Any, build: Callable[[Any, Any], Any]) -> tuple[np.ndarray, float, float]:
    """Vestigia's pairwise values `(n_test, n_train)` and its factor / score seconds."""
    start = time.perf_counter()
    calculator = build(None, context)
    factors_s = time.perf_counter() - start
    start = time.perf_counter()
    values = np.asarray(calculator.influence_matrix(test, context.train), np.float64)
    return values, factors_s, time.perf_counter() - start


def agreement(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    """Pearson correlation of all entries, the mean over test rows of the per-row Pearson, and
    the largest difference relative to the largest score, `max |a - b| / max |b|`."""
    overall = float(np.corrcoef(a.ravel(), b.ravel())[0, 1])
    rows = [np.corrcoef(x, y)[0, 1] for x, y in zip(a, b)]
    return overall, float(np.mean(rows)), float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def paired_difference(a: Any, b: Any, seed: int) -> str:
    """`LDS(a) - LDS(b)` of two `LDSResult`s on the same test images and ground truth, with the
    95% bootstrap interval of the per-test-image differences (paired)."""
    from vestigia.evaluation.lds import bootstrap_mean_interval

    diff = np.asarray(a.per_test, np.float64) - np.asarray(b.per_test, np.float64)
    diff = diff[np.isfinite(diff)]
    low, high = bootstrap_mean_interval(diff, 0.95, 2000, seed)
    return f"{diff.mean():+.3f} [{low:+.3f}, {high:+.3f}]"


def compare(
    work: dict[str, Any], fisher: str, methods: list[str], repeats: int, folder: str, log: Callable[[str], None]
) -> list[str]:
    """Both libraries on every method with one Fisher, `repeats` times (the fastest of the runs, per
    column: the one least disturbed by other jobs; the scores are deterministic): the Markdown lines
    of the two tables."""
    from detection_methods import kronecker

    from vestigia.evaluation import linear_datamodeling_score

    setting, truth = work["setting"], work["truth"]
    rows, comparisons = [], []
    for method in methods:
        name = METHODS[method]
        v_runs, k_runs = [], []
        for _ in range(repeats):  # alternated, so that a change of load hits both libraries
            cpu = time.process_time()
            values, *v_times = vestigia_scores(work["context"], work["test"], kronecker(method, fisher))
            v_runs.append([*v_times, time.process_time() - cpu])
            log(f"  {fisher} Fisher, Vestigia {name}: factors {v_times[0]:.1f} s, scores {v_times[1]:.1f} s")
            cpu = time.process_time()
            reference, *k_times = kronfluence_scores(
                work["context"].model, work["split"], setting, method, fisher, folder
            )
            k_runs.append([*k_times, time.process_time() - cpu])
            log(f"  {fisher} Fisher, Kronfluence {name}: factors {k_times[0]:.1f} s, scores {k_times[1]:.1f} s")
        best = {"Vestigia": np.min(v_runs, axis=0), "Kronfluence": np.min(k_runs, axis=0)}
        lds = {}
        for library, scores in (("Vestigia", values), ("Kronfluence", reference)):
            lds[library] = result = linear_datamodeling_score(scores, truth.masks, truth.outputs, seed=setting.seed)
            factors_s, scores_s, cpu_s = best[library]
            rows.append(
                f"| {library} {name} | {result.mean:.3f} [{result.ci_low:.3f}, {result.ci_high:.3f}] | {factors_s:.2f}"
                f" | {scores_s:.2f} | {factors_s + scores_s:.2f} | {cpu_s:.2f} |"
            )
        v, k = best["Vestigia"], best["Kronfluence"]
        ratios = [k[0] / v[0], k[1] / v[1], (k[0] + k[1]) / (v[0] + v[1]), k[2] / v[2]]
        overall, per_row, gap = agreement(values, reference)
        cells = [f"{r:.2f}" for r in ratios] + [paired_difference(lds["Vestigia"], lds["Kronfluence"], setting.seed)]
        cells += [f"{overall:.6f}", f"{per_row:.6f}", f"{gap:.1e}"]
        comparisons.append(f"| {name} | " + " | ".join(cells) + " |")
    return [
        f"### {fisher} Fisher",
        "",
        "| method | LDS [95% CI] | factors (s) | scores (s) | total (s) | total CPU (s) |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        "| method | Kronfluence / Vestigia time: factors | scores | total | total CPU"
        " | LDS Vestigia - Kronfluence [paired 95% CI] | score correlation (all entries) | (mean per test image)"
        " | max abs difference / max abs score |",
        "|---|---|---|---|---|---|---|---|---|",
        *comparisons,
        "",
    ]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="ekfac,kfac", help="comma-separated subset of ekfac,kfac")
    parser.add_argument(
        "--fisher", default="true,empirical", help="comma-separated Fishers (true, empirical), each for both libraries"
    )
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads of TF and torch")
    parser.add_argument("--repeats", type=int, default=3, help="runs per library and method (fastest kept)")
    parser.add_argument("--quick", action="store_true", help="the detection benchmark's tiny setting (smoke test)")
    parser.add_argument("--cache-dir", default=None, help="LDS ground-truth cache (default: run.py's)")
    parser.add_argument("--out", default=None, help="also write the tables (Markdown) to this file")
    return parser.parse_args(argv)


def _names(text: str, allowed: Sequence[str], flag: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names or any(n not in allowed for n in names):
        raise SystemExit(f"{flag}: choose from {list(allowed)}; received {text!r}")
    return names


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    methods = _names(args.methods, list(METHODS), "--methods")
    fishers = _names(args.fisher, ("true", "empirical"), "--fisher")
    import tensorflow as tf
    import torch

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    torch.set_num_threads(args.threads)
    runner = _detection_runner()
    from detection_setups import SETTINGS, load_split, one_hot, quick

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    setting = quick(SETTINGS["mnist_mlp64"]) if args.quick else SETTINGS["mnist_mlp64"]
    cache_root = Path(args.cache_dir) if args.cache_dir else runner.DEFAULT_CACHE
    split = load_split(setting)
    truth, truth_fact = runner.ground_truth(setting, split, cache_root / ("quick" if args.quick else "full"), log)
    context, train_s = runner.train_context(setting, split, split.y_train)
    n_test = setting.lds_n_test
    x_test, y_test = split.x_test[:n_test], split.y_test[:n_test]
    test = tf.data.Dataset.from_tensor_slices((x_test, one_hot(y_test, split.n_classes))).batch(n_test)
    with torch.no_grad():
        torch_logits = torch_mlp(context.model)(torch.from_numpy(x_test)).numpy()
    logit_gap = float(np.max(np.abs(torch_logits - np.asarray(context.model(x_test)))))
    work = {"setting": setting, "split": split, "truth": truth, "context": context, "test": test}

    lines = [
        f"## Kronfluence side by side: {setting.name}",
        "",
        f"- setting: {setting.title}; damping {setting.damping:g} on every layer; {n_test} test x"
        f" {setting.n_train} train pairwise scores",
        f"- threads {args.threads} (TF intra-op, torch); torch {torch.__version__}, TF {tf.__version__};"
        f" seconds: the fastest of {args.repeats} alternated runs (each builds everything anew, tracing"
        " included); CPU: process CPU seconds of factors and scores",
        f"- clean model trained in {train_s:.1f} s; max |logits(Keras) - logits(torch)| = {logit_gap:.2e}",
        f"- LDS ground truth: {truth_fact}",
        "",
    ]
    with tempfile.TemporaryDirectory(prefix="kronfluence-") as folder:
        for fisher in fishers:
            lines += compare(work, fisher, methods, args.repeats, folder, log)
    lines.append(f"Load average at the end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}.")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
