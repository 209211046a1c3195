"""Inline SVG charts for the report: the histogram of self-influence and the detection curve.

Hand-written SVG (no script, no external file): a histogram of `log10` self-influence when the
positive values span more than two decades (else of the values), and the detection curve, the
fraction of known wrong labels found against the fraction of the ranking inspected, with the
random (diagonal) and ideal curves.
"""

from __future__ import annotations

import html

import numpy as np

__all__ = ["detection_curve_svg", "histogram_svg"]

WIDTH, HEIGHT, MARGIN = 560, 240, 44


def _frame(title: str, x_label: str, y_label: str, body: str) -> str:
    w, h, m = WIDTH, HEIGHT, MARGIN
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" '
        f'aria-label="{html.escape(title)}">'
        f'<rect x="0" y="0" width="{w}" height="{h}" fill="#fff"/>'
        f'<line x1="{m}" y1="{h - m}" x2="{w - 10}" y2="{h - m}" stroke="#333"/>'
        f'<line x1="{m}" y1="10" x2="{m}" y2="{h - m}" stroke="#333"/>'
        f"{body}"
        f'<text x="{(w + m) / 2}" y="{h - 8}" font-size="12" text-anchor="middle">{html.escape(x_label)}</text>'
        f'<text x="12" y="{(h - m) / 2}" font-size="12" text-anchor="middle" '
        f'transform="rotate(-90 12 {(h - m) / 2})">{html.escape(y_label)}</text></svg>'
    )


def _ticks(low: float, high: float, axis: str, n: int = 5, fmt: str = "{:.3g}") -> str:
    w, h, m = WIDTH, HEIGHT, MARGIN
    parts = []
    for value in np.linspace(low, high, n):
        share = 0.0 if high == low else (value - low) / (high - low)
        if axis == "x":
            x = m + share * (w - 10 - m)
            parts.append(
                f'<text x="{x:.1f}" y="{h - m + 14}" font-size="10" text-anchor="middle">{fmt.format(value)}</text>'
            )
        else:
            y = h - m - share * (h - m - 10)
            parts.append(
                f'<text x="{m - 4}" y="{y + 3:.1f}" font-size="10" text-anchor="end">{fmt.format(value)}</text>'
            )
    return "".join(parts)


def histogram_svg(scores: np.ndarray, bins: int = 40) -> str:
    """An SVG histogram of `scores` (log10 of the positive ones when they span > 2 decades)."""
    values = np.asarray(scores, dtype=np.float64)
    values = values[np.isfinite(values)]
    positive = values[values > 0]
    log = positive.size == values.size and positive.size > 1 and positive.max() / positive.min() > 100
    shown = np.log10(positive) if log else values
    if shown.size == 0:
        return "<p>No finite score to draw.</p>"
    low, high = float(shown.min()), float(shown.max())
    if high <= low:
        high = low + 1.0
    counts, edges = np.histogram(shown, bins=bins, range=(low, high))
    w, h, m = WIDTH, HEIGHT, MARGIN
    span_x, span_y = w - 10 - m, h - m - 10
    top = max(4, -(-int(counts.max()) // 4) * 4)  # a multiple of 4: whole-number ticks at quarters
    bars = []
    for count, left, right in zip(counts, edges[:-1], edges[1:]):
        x = m + (left - low) / (high - low) * span_x
        width = max((right - left) / (high - low) * span_x - 1, 1)
        height = count / top * span_y
        bars.append(
            f'<rect x="{x:.1f}" y="{h - m - height:.1f}" width="{width:.1f}" height="{height:.1f}" fill="#4c78a8">'
            f"<title>{count} examples in [{left:.3g}, {right:.3g})</title></rect>"
        )
    label = "log10(self-influence)" if log else "self-influence"
    body = "".join(bars) + _ticks(low, high, "x") + _ticks(0, top, "y", fmt="{:.0f}")
    return _frame("Distribution of self-influence", label, "examples", body)


def detection_curve_svg(curve: np.ndarray, share: float) -> str:
    """The detection curve `(n,)` (`vestigia.evaluation.detection_curve`: wrong labels found after
    inspecting the top `i + 1` examples) with the random and ideal curves, as SVG; `share` is the
    fraction of wrong labels in the data."""
    found = np.asarray(curve, dtype=np.float64)
    inspected = np.arange(1, found.size + 1) / found.size
    w, h, m = WIDTH, HEIGHT, MARGIN
    span_x, span_y = w - 10 - m, h - m - 10

    def point(a: float, b: float) -> str:
        return f"{m + a * span_x:.1f},{h - m - b * span_y:.1f}"

    step = max(1, inspected.size // 400)
    line = " ".join(point(a, b) for a, b in zip(inspected[::step], found[::step]))
    line = point(0, 0) + " " + line + " " + point(inspected[-1], found[-1])
    ideal = " ".join([point(0, 0), point(min(share, 1.0), 1.0), point(1, 1)])
    body = (
        f'<polyline points="{point(0, 0)} {point(1, 1)}" fill="none" stroke="#999" stroke-dasharray="4 3"/>'
        f'<polyline points="{ideal}" fill="none" stroke="#59a14f" stroke-dasharray="2 2"/>'
        f'<polyline points="{line}" fill="none" stroke="#e15759" stroke-width="2"/>'
        + _ticks(0, 1, "x", fmt="{:.0%}")
        + _ticks(0, 1, "y", fmt="{:.0%}")
    )
    return _frame("Detection curve", "share of the ranking inspected", "wrong labels found", body)
