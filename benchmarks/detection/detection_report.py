"""Results of the detection benchmark: per-method records, the Markdown report and the curve plots."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class MethodResult:
    """One row of a setting's table. `status` is "ok", "not available", "skipped: ..." or "failed: ..."."""

    name: str
    status: str = "ok"
    detection_status: str = ""
    auc: float = math.nan
    found: dict[float, float] = field(default_factory=dict)
    area_under_curve: float = math.nan
    lds: float = math.nan
    lds_ci: tuple[float, float] = (math.nan, math.nan)
    setup_s: float = math.nan
    self_influence_s: float = math.nan
    lds_setup_s: float = math.nan
    scores_s: float = math.nan
    lds_status: str = ""
    lds_per_test: list[float] | None = field(default=None, repr=False)
    curve: np.ndarray | None = field(default=None, repr=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MethodResult:
        """Inverse of `to_dict` (without the curve)."""
        values = {k: (math.nan if v is None else v) for k, v in data.items() if k in cls.__dataclass_fields__}
        values["found"] = {float(k): v for k, v in data.get("found", {}).items()}
        values["lds_ci"] = tuple(math.nan if v is None else v for v in data.get("lds_ci", (None, None)))
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "curve"}
        out["found"] = {str(k): v for k, v in self.found.items()}
        out["lds_ci"] = list(self.lds_ci)
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in out.items()}


@dataclass
class SettingResult:
    """A setting's rows and facts (sizes, accuracies, training and retraining times)."""

    name: str
    title: str
    facts: dict[str, Any]
    rows: list[MethodResult]
    notes: list[str]
    lds: bool

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SettingResult:
        """Inverse of `to_dict`; the LDS column is shown if any row has an LDS entry."""
        rows = [MethodResult.from_dict(r) for r in data["rows"]]
        lds = any(not math.isnan(r.lds) or r.lds_status for r in rows)
        return cls(data["name"], data["title"], data["facts"], rows, data["notes"], lds)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "facts": self.facts,
            "notes": self.notes,
            "rows": [r.to_dict() for r in self.rows],
        }


def paired_lds_difference(a: MethodResult, b: MethodResult, seed: int = 0, n_bootstrap: int = 2000) -> tuple:
    """`(mean, ci_low, ci_high)` of `LDS(a) - LDS(b)`: the mean over test images of the per-test
    difference of Spearman correlations, 95% bootstrap interval over test images (paired)."""
    diff = np.asarray(a.lds_per_test, float) - np.asarray(b.lds_per_test, float)
    diff = diff[np.isfinite(diff)]
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, diff.size, size=(n_bootstrap, diff.size))].mean(axis=1)
    return float(diff.mean()), float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def comparison(result: SettingResult, new: tuple[str, ...], seed: int = 0) -> list[str]:
    """Lines comparing each new method's LDS with the best LDS of the other (earlier) methods."""
    scored = [r for r in result.rows if r.lds_per_test is not None and not math.isnan(r.lds)]
    before = [r for r in scored if r.name not in new and "baseline" not in r.name]
    if not before:
        return []
    best = max(before, key=lambda r: r.lds)
    lines = []
    for row in (r for r in scored if r.name in new):
        mean, low, high = paired_lds_difference(row, best, seed)
        lines.append(
            f"LDS of {row.name} minus the best earlier method ({best.name}, {best.lds:.3f}):"
            f" {mean:+.3f} [{low:+.3f}, {high:+.3f}] (paired bootstrap over test images)"
        )
    return lines


def _number(value: float, digits: int = 3) -> str:
    return "" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _seconds(value: float) -> str:
    if math.isnan(value):
        return ""
    return f"{value:.2f}" if value < 10 else f"{value:.0f}"


def table(result: SettingResult) -> str:
    """The Markdown table of one setting: one row per method, available or not."""
    header = ["Method", "AUC", "found @10%", "found @20%"]
    if result.lds:
        header += ["LDS [95% CI]"]
    header += ["setup (s)", "self-influence (s)"]
    if result.lds:
        header += ["LDS setup (s)", "scores (s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in result.rows:
        if row.status != "ok":
            cells = [row.name, row.status] + [""] * (len(header) - 2)
        else:
            cells = [
                row.name,
                row.detection_status or _number(row.auc),
                _number(row.found.get(0.1, math.nan)),
                _number(row.found.get(0.2, math.nan)),
            ]
            if result.lds:
                if row.lds_status:
                    cells.append(row.lds_status)
                elif math.isnan(row.lds):
                    cells.append("n/a")
                else:
                    cells.append(f"{row.lds:.3f} [{row.lds_ci[0]:.3f}, {row.lds_ci[1]:.3f}]")
            cells += [_seconds(row.setup_s), _seconds(row.self_influence_s)]
            if result.lds:
                cells += [_seconds(row.lds_setup_s), _seconds(row.scores_s)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(
    results: list[SettingResult], header: dict[str, str], protocol: str, new_methods: tuple[str, ...] = ()
) -> str:
    """The whole report: machine and run facts, then per setting its facts, table, the LDS of
    each of `new_methods` against the best other method, and notes."""
    parts = ["# Mislabel detection and LDS benchmark", ""]
    parts += [f"- {key}: {value}" for key, value in header.items()]
    parts += ["", protocol.strip(), ""]
    for result in results:
        parts += [f"## {result.name}: {result.title}", ""]
        parts += [f"- {key}: {value}" for key, value in result.facts.items()]
        parts += ["", table(result), ""]
        lines = comparison(result, new_methods, seed=0)
        if lines:
            parts += [f"- {line}" for line in lines] + [""]
        if result.notes:
            parts += [f"- {note}" for note in result.notes] + [""]
        parts += [f"![detection curves](curves_{result.name}.png)", ""]
    return "\n".join(parts)


def plot_curves(result: SettingResult, path: str, noise: float) -> None:
    """Detection curves of every method of a setting on one axes, with the ideal and random lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    colors = plt.get_cmap("tab20")(np.arange(20))
    for i, row in enumerate(r for r in result.rows if r.curve is not None):
        curve = np.asarray(row.curve)
        x = np.arange(1, curve.size + 1) / curve.size
        style = "--" if "baseline" in row.name else "-"
        ax.plot(
            x, curve, style, color=colors[(2 * i) % 20 + (2 * i) // 20], lw=1.4, label=f"{row.name} (AUC {row.auc:.3f})"
        )
    ax.plot([0, noise, 1], [0, 1, 1], color="black", lw=0.8, ls=":", label="ideal")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":", label="random order")
    ax.set_xlabel("fraction of the training set inspected (by decreasing self-influence)")
    ax.set_ylabel("fraction of flipped labels found")
    ax.set_xlim(0, 0.5)
    ax.set_ylim(0, 1.01)
    ax.set_title(f"{result.name}: {noise:.0%} labels flipped")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
