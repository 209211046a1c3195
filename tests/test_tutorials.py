"""Every tutorial of the documentation runs as written: its ```python blocks, in order, in one
namespace per page, in a fresh folder (the pages hold their own asserts).

Marked slow (about a minute together on 2 cores); `.ci/run` runs them with `pytest -m slow`.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
PAGES = sorted((DOCS / "tutorials").glob("*.md")) + [DOCS / "capture.md", DOCS / "progress.md"]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(page: Path) -> list[str]:
    """The ```python blocks of a Markdown page, in order."""
    return BLOCK.findall(page.read_text())


def test_every_tutorial_has_code() -> None:
    tutorials = sorted(p.name for p in (DOCS / "tutorials").glob("*.md"))
    assert tutorials == ["explain.md", "groups.md", "large-model.md", "migrating.md", "mislabeled.md"]
    assert all(python_blocks(DOCS / "tutorials" / name) for name in tutorials)


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in PAGES if "tutorials" in p.parts], ids=lambda p: p.stem)
def test_tutorial_runs(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": f"tutorial_{page.stem}"}
    for number, code in enumerate(python_blocks(page)):
        exec(compile(code, f"{page.name}[block {number}]", "exec"), namespace)  # noqa: S102
