"""The report page: one self-contained HTML file (inline CSS, embedded PNGs and SVG, no network).

Sections, each present when its data is: the most suspicious training examples (thumbnail,
index, given and predicted label, score), the distribution of self-influence, the detection
curve (with a known noise mask), per query its top proponents and opponents, and the settings
and versions. A four-line inline script marks each image with its decoded width once the page
has loaded (`data-rendered`), which a headless browser test reads back.
"""

from __future__ import annotations

import datetime
import html
import json
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np

from vestigia.report.charts import detection_curve_svg, histogram_svg
from vestigia.report.data import ReportData
from vestigia.report.render import example_html

__all__ = ["render_report", "write_report"]

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:1.5em;margin-bottom:4px}h2{font-size:1.2em;margin-top:28px;border-bottom:1px solid #ddd}
.sub{color:#666;margin-top:0}.grid{display:flex;flex-wrap:wrap;gap:10px}
.card{border:1px solid #ddd;border-radius:6px;padding:6px;width:150px;font-size:12px;background:#fafafa}
.card.flag{border-color:#e15759;background:#fff4f4}.card .meta{margin-top:4px;line-height:1.35}
.thumb{image-rendering:pixelated;display:block;margin:auto;background:#000}
.features,.text{font-family:ui-monospace,monospace;font-size:11px;word-break:break-all;max-height:90px;overflow:auto}
.query{display:flex;gap:16px;align-items:flex-start;margin:12px 0;padding:8px;border:1px solid #eee;border-radius:6px}
.row-label{font-weight:600;font-size:12px;margin:2px 0}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
.pos{color:#1a7f37}.neg{color:#c62828}
"""

SCRIPT = """window.addEventListener("load",function(){var imgs=document.images,ok=0;
for(var i=0;i<imgs.length;i++){imgs[i].setAttribute("data-rendered",String(imgs[i].naturalWidth));
if(imgs[i].naturalWidth>0){ok++;}}
document.body.setAttribute("data-images-rendered",ok+"/"+imgs.length);});"""


def versions() -> dict[str, str]:
    """Versions of Vestigia and of what it runs on."""
    import keras
    import tensorflow as tf

    import vestigia

    return {
        "vestigia": vestigia.__version__,
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def _card(report: ReportData, index: int, x: Any, score: float, score_name: str, flagged: bool = False) -> str:
    given, predicted = report.label_text(report.given, index), report.label_text(report.predicted, index)
    differs = report.given is not None and report.predicted is not None and given != predicted
    lines = [f"#{index}"]
    if given:
        lines.append(f"given: {html.escape(given)}")
    if predicted:
        lines.append(f"predicted: {html.escape(predicted)}")
    lines.append(f"{score_name}: {_fmt(score)}")
    if flagged:
        lines.append("<b>known wrong label</b>")
    cls = "card flag" if differs or flagged else "card"
    picture = example_html(x, report.image_shape, f"training example {index}")
    return f'<div class="{cls}">{picture}<div class="meta">{"<br>".join(lines)}</div></div>'


def _suspicious(report: ReportData) -> str:
    if report.scores is None or report.shown_index is None or report.shown_x is None:
        return ""
    cards = []
    for index, x in zip(report.shown_index, report.shown_x):
        flagged = bool(report.noise_mask[index]) if report.noise_mask is not None else False
        cards.append(_card(report, int(index), x, float(report.scores[index]), "self-influence", flagged))
    note = (
        "Highest self-influence first: the examples the model found hardest to fit with their label "
        "(mislabeled, ambiguous or atypical). Red cards: the prediction differs from the given label."
    )
    return (
        f'<h2>Most suspicious training examples</h2><p class="sub">{note}</p><div class="grid">{"".join(cards)}</div>'
    )


def _distribution(report: ReportData) -> str:
    if report.scores is None:
        return ""
    s = np.asarray(report.scores, dtype=np.float64)
    stats = f"n = {s.size}, min {_fmt(s.min())}, median {_fmt(float(np.median(s)))}, max {_fmt(s.max())}"
    negative = int((s < 0).sum())
    warn = f" {negative} negative values (indefinite curvature or low damping)." if negative else ""
    return f'<h2>Distribution of self-influence</h2><p class="sub">{stats}.{warn}</p>{histogram_svg(s)}'


def _detection(report: ReportData) -> str:
    if report.scores is None or report.noise_mask is None or not report.noise_mask.any():
        return ""
    from vestigia.evaluation import mislabel_detection

    result = mislabel_detection(report.scores, report.noise_mask, fractions=(0.05, 0.1, 0.2))
    found = ", ".join(f"{share:.1%} in the top {fraction:.0%}" for fraction, share in result.found.items())
    share = float(np.mean(report.noise_mask))
    text = f"{int(report.noise_mask.sum())} known wrong labels ({share:.1%}); found: {found}; ROC-AUC {result.auc:.3f}."
    legend = "red: this ranking; grey dashes: random order; green dots: ideal."
    return f'<h2>Detection curve</h2><p class="sub">{text} {legend}</p>{detection_curve_svg(result.curve, share)}'


def _explanations(report: ReportData) -> str:
    if not report.explanations:
        return ""
    blocks = []
    for item in report.explanations:
        label = report.label_text(np.asarray([item.label]), 0)
        predicted = report.label_text(np.asarray([item.predicted]), 0)
        query = (
            f'<div class="card">{example_html(item.x, report.image_shape, f"test example {item.index}")}'
            f'<div class="meta">test #{item.index}<br>label: {html.escape(label)}<br>predicted: '
            f"{html.escape(predicted)}</div></div>"
        )
        rows = []
        for title, indices, values, xs, cls in (
            ("Proponents (support the prediction)", item.proponents, item.proponent_values, item.proponent_x, "pos"),
            ("Opponents (oppose it)", item.opponents, item.opponent_values, item.opponent_x, "neg"),
        ):
            cards = "".join(_card(report, int(i), x, float(v), "influence") for i, v, x in zip(indices, values, xs))
            rows.append(f'<div class="row-label {cls}">{title}</div><div class="grid">{cards}</div>')
        blocks.append(f'<div class="query">{query}<div>{"".join(rows)}</div></div>')
    note = "Influence of each training example on the query's loss: positive = proponent (removing it raises the loss)."
    return f'<h2>Explanations</h2><p class="sub">{note}</p>{"".join(blocks)}'


def _settings(report: ReportData) -> str:
    rows = []
    for title, items in (("settings", report.settings), ("versions", versions())):
        for key, value in items.items():
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            rows.append(
                f"<tr><th>{html.escape(title)}</th><td>{html.escape(key)}</td><td>{html.escape(text)}</td></tr>"
            )
    return f"<h2>Settings and versions</h2><table>{''.join(rows)}</table>"


def render_report(report: ReportData) -> str:
    """The report as one HTML string (no external resource)."""
    created = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    method = report.settings.get("method", "?")
    n_train = report.settings.get("n_train", "?")
    subtitle = f"method {method}, {n_train} training examples, made {created} by Vestigia"
    body = "".join(
        [_suspicious(report), _distribution(report), _detection(report), _explanations(report), _settings(report)]
    )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(report.title)}</title><style>{CSS}</style></head>"
        f'<body><h1>{html.escape(report.title)}</h1><p class="sub">{html.escape(subtitle)}</p>{body}'
        f"<script>{SCRIPT}</script></body></html>\n"
    )


def write_report(report: ReportData, path: str | os.PathLike[str]) -> Path:
    """Write `render_report(report)` to `path` (UTF-8) and return the path."""
    target = Path(path)
    target.write_text(render_report(report), encoding="utf-8")
    return target
