"""docs/guarantees.md names, for each promise, the test that shows it: those tests must exist."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_test_the_guarantees_page_names_exists() -> None:
    text = (REPO / "docs" / "guarantees.md").read_text(encoding="utf-8")
    named = re.findall(r"`(?:(test_\w+\.py))?::(test_\w+)`", text)
    assert len(named) > 20
    current, missing = None, []
    for file, test in named:
        current = file or current  # `::test_x` continues the file named before it
        assert current is not None
        tree = ast.parse((REPO / "tests" / current).read_text(encoding="utf-8"))
        if test not in {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}:
            missing.append(f"{current}::{test}")
    assert not missing, f"docs/guarantees.md names tests that do not exist: {missing}"
    files = set(re.findall(r"`(test_\w+\.py)`", text))
    assert all((REPO / "tests" / f).is_file() for f in files)
