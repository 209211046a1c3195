"""Mislabel detection and LDS benchmark of every available Vestigia method, on offline data.

Per setting (see `detection_setups.SETTINGS` and README.md): train the model on labels of which
10% were flipped (seeded), rank the training set by each method's self-influence, and report
the detection ROC-AUC and the fraction of flipped labels found after inspecting 10% / 20% of
the data. Where the setting asks, the linear datamodeling score (LDS) is measured on the
*clean* labels: the model trained on clean data is attributed by each inner-product method,
and compared with models retrained on random halves of the training set (the ground truth is
cached on disk, so reruns reuse it).

    python benchmarks/detection/run.py                        # full run, writes benchmarks/results/
    python benchmarks/detection/run.py --quick --out-dir /tmp/q   # smoke test, ~1 min
    python benchmarks/detection/run.py --settings mnist_mlp --methods "Influence (exact),TracIn"
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from detection_methods import NEW_METHODS, Context, Method, available, methods_for  # noqa: E402
from detection_report import MethodResult, SettingResult, markdown, plot_curves  # noqa: E402
from detection_setups import SETTINGS, Setting, Split, accuracy, load_split, model_builder, one_hot, quick, trainer  # noqa: E402

from vestigia.evaluation import correct_class_margin, linear_datamodeling_score, mislabel_detection, retrain_on_subsets  # noqa: E402

tf.get_logger().setLevel("ERROR")  # retracing notices of short-lived calculators

REPO = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO / "benchmarks" / "results"
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vestigia" / "detection"

PROTOCOL = """
Protocol. Each setting draws a seeded train/test split, flips exactly 10% of the training labels
(each to a uniformly drawn other class), and trains the model on the noisy labels (Adam, cosine
decay of the learning rate to 0, L2 `l2 * ||W||^2` on every kernel; the last layer is a bias-free
`Dense`). Every method ranks the training set by self-influence (higher = more suspicious).
AUC is the ROC-AUC of that ranking for the flipped labels; "found @x%" the fraction of flipped
labels among the top x% of the ranking (at 10% a perfect ranking finds all). Influence methods
watch the last layer (and every layer for the "(all layers)" variants) with damping
`2 * l2`, the Hessian of the L2 penalty on the watched kernel. LDS (Park et al. 2023) is
measured on the clean labels: each method attributes the model trained on clean data on the
first `lds_n_test` test images (correct-class margin through the loss gradient; positive =
proponent), and the Spearman correlation, over retrained models, between the sum of the kept
attributions and the measured correct-class margin of a model retrained (same seeded
procedure, seed `seed + s`) on each random 50% subset `s` is averaged over test images (95%
bootstrap CI over test images). Times are wall-clock seconds on a shared machine: setup =
building the calculator (Hessian, eigendecomposition, surrogate fit, tracing), self-influence
= scoring every training example, LDS setup / scores = building on the clean model and the
`(n_test, n_train)` attribution matrix.
"""


def tracin_rates(setting: Setting, n_train: int) -> list[float]:
    """Learning-rate weight of each TracIn checkpoint: the mean cosine-decayed learning rate over
    the steps since the previous checkpoint (the steps the checkpoint's gradient stands for)."""
    per_epoch = -(-n_train // setting.batch_size)
    total = setting.epochs * per_epoch
    steps = np.arange(total)
    rates = setting.learning_rate * 0.5 * (1.0 + np.cos(np.pi * steps / total))
    bounds = [0] + [e * per_epoch for e in setting.tracin_epochs]
    return [float(rates[a:b].mean()) for a, b in zip(bounds[:-1], bounds[1:])]


def _fit(setting: Setting, split: Split, labels: np.ndarray, seed: int) -> tuple[keras.Model, list[keras.Model]]:
    """Seeded training of the setting's model on `labels`: the model and its TracIn checkpoints."""
    build = model_builder(setting, split.x_train.shape[1:], split.n_classes)
    keras.utils.set_random_seed(seed)
    model = build()
    checkpoints = trainer(setting)(model, split.x_train, labels, setting.tracin_epochs)
    return model, checkpoints


def train_context(setting: Setting, split: Split, labels: np.ndarray) -> tuple[Context, float]:
    """Seeded training of the setting's model on `labels`; the `Context` methods are built from."""
    start = time.perf_counter()
    model, checkpoints = _fit(setting, split, labels, setting.seed)
    seconds = time.perf_counter() - start
    data = tf.data.Dataset.from_tensor_slices((split.x_train, one_hot(labels, split.n_classes)))
    context = Context(
        setting,
        model,
        checkpoints,
        tracin_rates(setting, len(labels)),
        data.batch(setting.influence_batch_size),
        train_model=lambda seed: _fit(setting, split, labels, seed)[0],
    )
    return context, seconds


def _failure(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".replace("|", "/").replace("\n", " ")
    return "failed: " + (text[:150] + "..." if len(text) > 150 else text)


def _detect(method: Method, cls: Any, context: Context, split: Split, result: MethodResult, log: Any) -> Any:
    """Build the method on the noisy model, score every training example, fill `result`."""
    if method.batch_size is not None:
        context = context.rebatched(method.batch_size(context.setting))
    start = time.perf_counter()
    calculator = method.build(cls, context)
    result.setup_s = time.perf_counter() - start
    start = time.perf_counter()
    scores = np.asarray(calculator.self_influence(context.train), np.float64)
    result.self_influence_s = time.perf_counter() - start
    report = mislabel_detection(scores, split.is_mislabeled, fractions=(0.05, 0.1, 0.2))
    result.auc, result.found, result.area_under_curve = report.auc, report.found, report.area_under_curve
    result.curve = report.curve
    log(f"  {method.name}: AUC {report.auc:.4f}, setup {result.setup_s:.1f} s, scores {result.self_influence_s:.1f} s")
    return calculator


def _lds(method: Method, cls: Any, context: Context, test: tf.data.Dataset, truth: Any, result: MethodResult) -> None:
    """Build the method on the clean model, attribute the LDS test points, fill `result`."""
    if method.batch_size is not None:
        context = context.rebatched(method.batch_size(context.setting))
    start = time.perf_counter()
    calculator = method.build(cls, context)
    result.lds_setup_s = time.perf_counter() - start
    start = time.perf_counter()
    attributions = np.asarray(calculator.influence_matrix(test, context.train), np.float64)
    result.scores_s = time.perf_counter() - start
    lds = linear_datamodeling_score(attributions, truth.masks, truth.outputs, seed=context.setting.seed)
    result.lds, result.lds_ci = lds.mean, (lds.ci_low, lds.ci_high)
    result.lds_per_test = [float(v) for v in lds.per_test]


def _notes(setting: Setting) -> list[str]:
    s = setting
    cg_data = "all training examples" if s.cg_hessian_samples is None else f"{s.cg_hessian_samples} training examples"
    return [
        f"damping {s.damping:g} (= 2 x l2 {s.l2:g}) for every curvature method; exact: dense float64 Hessian, eigh.",
        f"CG: {s.cg_iters} iterations max (tol 1e-5); LiSSA: {s.lissa_iters} iterations, scale {s.lissa_scale:g};"
        f" both on H from {cg_data}. RelatIF reuses the exact solver (its setup is the normalisation only).",
        f"Arnoldi: subspace {s.arnoldi_dim}, top {s.arnoldi_k} eigenvalues by |lambda|, seed {s.seed}.",
        f"TracIn: checkpoints after epochs {list(s.tracin_epochs)}, weighted by the mean learning rate since"
        " the previous checkpoint.",
        f"RPS-L2: lambda {s.rps_lambda:g}, cross-entropy surrogate, <= {s.rps_epochs} Newton steps; by default"
        " it fits the model's own probabilities (Yeh et al.), so the labels, and a flipped one, never enter its"
        " scores; with label targets it fits the labels (the training objective)."
        f" RPS-LJE: H_0 by {'the exact solver' if s.lje_solver == 'exact' else 'CG as above'}, same damping.",
        f"Boundary methods: DeepFool, <= {s.boundary_steps} steps (labels unused); Loss: training loss under the"
        " noisy label; Random: seeded normal scores.",
    ] + (_whole_model_notes(s) if s.all_layer_variants else [])


def _whole_model_notes(s: Setting) -> list[str]:
    return [
        f"(all layers) rows watch every weight of the model. K-FAC / EK-FAC: block-diagonal across layers,"
        f" true Fisher (labels sampled from the model, seed {s.seed}), damping {s.damping:g} on every layer;"
        " EK-FAC refits the eigenvalues from per-example gradients in the Kronecker eigenbasis.",
        f"TRAK: margin gradients projected (seed {s.seed}) to k = 2048 by a dense Rademacher matrix up to 10,000"
        " parameters, else by LoGra's factored projection (k_in = k_out = 40 per layer); kernel damping 1e-3 x its"
        f" mean eigenvalue (the class default). TRAK-{s.ensemble_size} averages {s.ensemble_size} models trained"
        f" independently on the same labels (the setting's model and seeds {s.seed + 1001}, {s.seed + 1002}, ...)."
        " LoGra: factored projection with k_in = k_out = 32 per layer, the class's damping; LoGra K-FAC: the same"
        " projection, K-FAC's inverse of the projected factors (true Fisher, seed"
        f" {s.seed}), damping 0.1 x each layer's mean eigenvalue (the class default).",
        "Grad-Dot / Grad-Cos: full per-example loss gradients. DataInf: the paper's damping (0.1 x mean squared"
        " gradient per parameter of the block), one block per layer, or one Rademacher-projected block of 2,048"
        " where a layer has more than 4,096 parameters.",
    ]


def ground_truth(setting: Setting, split: Split, cache_dir: Path | None, log: Any) -> tuple[Any, str]:
    """Margins of models retrained on random subsets of the clean labels (cached, resumable), and a fact line."""
    build = model_builder(setting, split.x_train.shape[1:], split.n_classes)
    x_lds, y_lds = split.x_test[: setting.lds_n_test], split.y_test[: setting.lds_n_test]
    path = None if cache_dir is None else cache_dir / f"{setting.name}-{setting.fingerprint()}"
    cached = 0 if path is None else len(list(path.glob("outputs/job_*.npy")))
    start = time.perf_counter()
    truth = retrain_on_subsets(
        build,
        trainer(setting),
        split.x_train,
        split.y_train,
        x_lds,
        y_lds,
        n_subsets=setting.lds_subsets,
        fraction=setting.lds_fraction,
        seed=setting.seed,
        path=path,
        measure=correct_class_margin,
        progress=log is not _silent,
    )
    fact = (
        f"{setting.lds_subsets} models retrained on {setting.lds_fraction:.0%} subsets of the clean labels,"
        f" {setting.lds_n_test} test images; {time.perf_counter() - start:.0f} s"
        + ("" if path is None else f" ({cached} of them loaded from the cache)")
    )
    return truth, fact


def _ensemble_fact(facts: dict[str, Any], context: Context, labels: str) -> None:
    if "ensemble_s" in context.shared:
        n = len(context.shared["ensemble"]) - 1
        facts[f"ensemble ({labels} labels)"] = (
            f"{n} more models trained in {context.shared['ensemble_s']:.0f} s (counted in the ensemble methods' setup)"
        )


def run_setting(
    setting: Setting, wanted: set[str] | None, cache_dir: Path | None, lds: bool, log: Any
) -> SettingResult:
    """Train, score every method, measure the LDS where asked; return the setting's rows."""
    split = load_split(setting)
    methods = [m for m in methods_for(setting) if wanted is None or m.name in wanted]
    facts: dict[str, Any] = {
        "split": f"{setting.n_train} train / {setting.n_test} test, {int(split.is_mislabeled.sum())} labels flipped",
        "training": f"Adam lr {setting.learning_rate:g} (cosine decay), batch {setting.batch_size},"
        f" {setting.epochs} epochs, L2 {setting.l2:g}, seed {setting.seed}",
    }
    do_lds = lds and setting.lds
    truth = None
    x_lds, y_lds = split.x_test[: setting.lds_n_test], split.y_test[: setting.lds_n_test]
    if do_lds:
        truth, facts["LDS ground truth"] = ground_truth(setting, split, cache_dir, log)
    context, seconds = train_context(setting, split, split.y_train_noisy)
    model = context.model
    facts["noisy model"] = (
        f"trained in {seconds:.1f} s; accuracy on its (noisy) training labels"
        f" {accuracy(model, split.x_train, split.y_train_noisy):.3f}, on the true training labels"
        f" {accuracy(model, split.x_train, split.y_train):.3f}, test {accuracy(model, split.x_test, split.y_test):.3f}"
    )
    facts["watched parameters"] = (
        f"{context.influence_model().nb_params} (last layer), {context.influence_model(True).nb_params} (all layers)"
    )
    rows, runnable = [], []
    for method in methods:
        row = MethodResult(method.name)
        rows.append(row)
        cls = available(method)
        if method.name in setting.skip:
            row.status = "skipped: " + setting.skip[method.name]
        elif cls is None:
            row.status = "not available"
        else:
            try:
                reason = setting.skip_detection.get(method.name)
                if reason is None:
                    pairwise = hasattr(_detect(method, cls, context, split, row, log), "influence_matrix")
                else:
                    row.detection_status, pairwise = "skipped: " + reason, True  # the LDS pass still builds it
                if do_lds and pairwise:
                    runnable.append((method, cls, row))
                elif do_lds:
                    row.lds_status = "n/a (no pairwise values)"
            except Exception as error:  # noqa: BLE001 - report and go on with the other methods
                row.status = _failure(error)
                log(f"  {method.name}: {row.status}\n{traceback.format_exc()}")
        gc.collect()
    for key in ("exact", "exact (all layers)"):
        if context.shared.get(key) is not None:
            eigenvalues = np.asarray(context.shared[key].eigenvalues)
            facts[f"eigenvalues of H + damping ({key}, noisy model)"] = (
                f"[{eigenvalues.min():.4g}, {eigenvalues.max():.4g}]"
            )
    _ensemble_fact(facts, context, "noisy")
    context.shared.clear()
    if do_lds and runnable:
        clean, seconds = train_context(setting, split, split.y_train)
        facts["clean model (LDS)"] = (
            f"trained in {seconds:.1f} s; test accuracy {accuracy(clean.model, split.x_test, split.y_test):.3f}"
        )
        test = tf.data.Dataset.from_tensor_slices((x_lds, one_hot(y_lds, split.n_classes))).batch(setting.lds_n_test)
        for method, cls, row in runnable:
            try:
                _lds(method, cls, clean, test, truth, row)
                log(f"  {method.name}: LDS {row.lds:.3f}, setup {row.lds_setup_s:.1f} s, scores {row.scores_s:.1f} s")
            except Exception as error:  # noqa: BLE001
                row.lds_status = _failure(error)
                log(f"  {method.name} (LDS): {row.lds_status}\n{traceback.format_exc()}")
            gc.collect()
        _ensemble_fact(facts, clean, "clean")
        clean.shared.clear()
    return SettingResult(setting.name, setting.title, facts, rows, _notes(setting), do_lds)


def _silent(*args: Any) -> None:
    pass


def _machine() -> dict[str, str]:
    model = platform.processor() or "unknown"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if "Model name" in line), model)
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "machine": f"{os.cpu_count()} CPU cores (nproc), {model}; shared with other jobs during the run",
        "software": f"Python {platform.python_version()}, TensorFlow {tf.__version__}, Keras {keras.__version__},"
        f" NumPy {np.__version__}",
        "commit": commit or "unknown",
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated subset of {list(SETTINGS)}")
    parser.add_argument("--methods", default=None, help="comma-separated method names (default: all)")
    parser.add_argument("--quick", action="store_true", help="tiny settings for a smoke test")
    parser.add_argument("--out-dir", default=None, help="where the report, JSON and PNGs go")
    parser.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help="LDS retraining cache ('' = no cache)")
    parser.add_argument("--no-lds", action="store_true", help="skip the LDS (no retraining)")
    parser.add_argument(
        "--truth-only", action="store_true", help="only compute (and cache) the LDS ground truth, then stop"
    )
    parser.add_argument(
        "--replace", action="store_true", help="drop the other settings of an earlier report in --out-dir"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    names = [n.strip() for n in args.settings.split(",") if n.strip()]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        raise SystemExit(f"--settings: unknown {unknown}; choose from {list(SETTINGS)}")
    wanted = None if args.methods is None else {m.strip() for m in args.methods.split(",") if m.strip()}
    default_out = Path(tempfile.gettempdir()) / "vestigia-detection-quick" if args.quick else DEFAULT_OUT
    out_dir = Path(args.out_dir) if args.out_dir else default_out
    out_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(args.cache_dir) / ("quick" if args.quick else "full") if args.cache_dir else None

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    logger = _silent if args.quiet else log
    header = _machine()
    header["command"] = "python benchmarks/detection/run.py " + " ".join(sys.argv[1:] if argv is None else argv)
    earlier = {} if args.replace or args.truth_only else _previous_results(out_dir)
    kept = {n: r for n, r in earlier.items() if n not in names}
    start = time.perf_counter()
    results: dict[str, SettingResult] = {}
    for name in names:
        setting = quick(SETTINGS[name]) if args.quick else SETTINGS[name]
        logger(f"[{name}] {setting.title}")
        if args.truth_only:
            if setting.lds:
                logger("  LDS ground truth: " + ground_truth(setting, load_split(setting), cache_dir, logger)[1])
            continue
        setting_start = time.perf_counter()
        result = run_setting(setting, wanted, cache_dir, not args.no_lds, logger)
        result.facts["setting wall time"] = f"{time.perf_counter() - setting_start:.0f} s"
        result.facts["run"] = f"{header['date']}, commit {header['commit']}"
        curves = out_dir / f"curves_{name}.npz"
        if wanted is not None and name in earlier:  # a run of some methods keeps the earlier rows of the others
            _merge_rows(result, earlier[name][0], setting, dict(np.load(curves)) if curves.exists() else {})
        results[name] = result
        np.savez_compressed(curves, **{r.name: r.curve for r in result.rows if r.curve is not None})
        plot_curves(result, str(out_dir / f"curves_{name}.png"), setting.noise)
        header["total wall time"] = f"{time.perf_counter() - start:.0f} s"
        _write(out_dir, header, {**kept, **results}, args.quick)  # after every setting: a cut run keeps its tables
    if not args.truth_only:
        logger(f"wrote {out_dir / 'detection.md'} ({header['total wall time']})")
    return 0


def _merge_rows(result: SettingResult, earlier: SettingResult, setting: Setting, curves: dict[str, Any]) -> None:
    """Add the rows of `earlier` (with their detection `curves`) that `result` did not run, in the
    order of the method registry, and the earlier facts that this run did not restate."""
    new = {row.name: row for row in result.rows}
    old = {row.name: row for row in earlier.rows}
    for row in old.values():
        row.curve = curves.get(row.name)
    names = [m.name for m in methods_for(setting)]
    names += [n for n in list(new) + list(old) if n not in names]
    result.rows = [new.get(n) or old[n] for n in names if n in new or n in old]
    result.lds = result.lds or earlier.lds
    for key, fact in earlier.facts.items():  # facts of the kept rows (e.g. the exact eigenvalues, the ensembles)
        result.facts.setdefault(key, fact)
    result.facts["run"] += "; rows not in --methods from " + earlier.facts.get("run", "an earlier run")


def _previous_results(out_dir: Path) -> dict[str, tuple[SettingResult, dict[str, Any]]]:
    """The settings of an earlier `detection.json` in `out_dir` (kept in the report unless redone)."""
    path = out_dir / "detection.json"
    if not path.exists():
        return {}
    payload = json.loads(path.read_text())
    kept = {}
    for data in payload.get("results", []):
        result = SettingResult.from_dict(data)
        old = payload.get("header", {})
        result.facts.setdefault("run", f"{old.get('date', '?')}, commit {old.get('commit', '?')}")
        kept[data["name"]] = (result, payload.get("settings", {}).get(data["name"], {}))
    return kept


def _write(out_dir: Path, header: dict[str, str], results: dict[str, Any], is_quick: bool) -> None:
    """`detection.md` and `detection.json` of every setting, in the order of `SETTINGS`."""
    order = [n for n in SETTINGS if n in results] + [n for n in results if n not in SETTINGS]
    rows, settings = [], {}
    for name in order:
        entry = results[name]
        if isinstance(entry, tuple):
            rows.append(entry[0])
            settings[name] = entry[1]
        else:
            rows.append(entry)
            settings[name] = dataclasses.asdict(quick(SETTINGS[name]) if is_quick else SETTINGS[name])
    (out_dir / "detection.md").write_text(markdown(rows, header, PROTOCOL, NEW_METHODS))
    payload = {"header": header, "settings": settings, "results": [r.to_dict() for r in rows]}
    (out_dir / "detection.json").write_text(json.dumps(payload, indent=1, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


if __name__ == "__main__":
    raise SystemExit(main())
