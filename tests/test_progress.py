"""One progress style: command steps, library bars inside them, silent by default, silenceable."""

from __future__ import annotations

import io

import numpy as np
import pytest
from conftest import logits_loss, make_classification, make_mlp

from vestigia import ExactIHVP, FirstOrderInfluenceCalculator, InfluenceModel, progress
from vestigia.progress import Progress, bar, configure, track


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _reset(monkeypatch):
    monkeypatch.delenv("VESTIGIA_PROGRESS", raising=False)
    configure(None)
    yield
    configure(None)


def test_library_bars_are_silent_by_default_and_shown_when_enabled(capsys, monkeypatch) -> None:
    assert list(track(range(3), "work")) == [0, 1, 2]
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("VESTIGIA_PROGRESS", "1")
    list(track(range(3), "work"))
    assert capsys.readouterr().err.startswith("work: 100% 3/3 [")  # a pipe: one final line
    monkeypatch.setenv("VESTIGIA_PROGRESS", "0")
    with bar(5, "forced", enabled=True) as b:  # a function's own progress=True yields to the global off
        b.advance(5)
    assert capsys.readouterr().err == ""


def test_bars_inside_a_step_share_its_line_on_a_terminal() -> None:
    stream = _Terminal()
    steps = Progress(1, stream)
    with steps.step("scoring"):
        for _ in track(range(4), "batches"):
            pass
    text = stream.getvalue()
    assert "\r[1/1] scoring ... batches:" in text and text.endswith("[1/1] scoring ... done (0.0 s)\n")
    log = io.StringIO()  # a file: the bar adds nothing, the step writes one line
    with Progress(1, log).step("scoring"):
        list(track(range(4), "batches"))
    assert log.getvalue().startswith("[1/1] scoring ... done (") and log.getvalue().count("\n") == 1


def test_the_engine_and_the_hessian_report_through_the_same_bars(capsys) -> None:
    x, y = make_classification(n=40, d=4, classes=3, seed=0)
    model = InfluenceModel(make_mlp(d=4, hidden=5, classes=3), start_layer=-1, loss_function=logits_loss())
    configure(enabled=True, stream=None)
    import tensorflow as tf

    train = tf.data.Dataset.from_tensor_slices((x, y)).batch(10)
    calculator = FirstOrderInfluenceCalculator(model, train, ExactIHVP(model, train, damping=1e-3))
    scores = calculator.self_influence(train)
    err = capsys.readouterr().err
    assert "Hessian (batches): 100% 4/4" in err and "self-influence (batches): 100% 4/4" in err
    configure(enabled=False)
    np.testing.assert_allclose(calculator.self_influence(train), scores)
    assert capsys.readouterr().err == ""
    assert progress.known_length(train) == 4 and progress.known_length([1, 2]) == 2
