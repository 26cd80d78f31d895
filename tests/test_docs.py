"""Documentation checks that run with the tests, not only in ``mkdocs build``.

The API page renders the docstrings of ``convlora`` with mkdocstrings, which prints Sphinx roles
(``:func:`x```) verbatim; ``docs/hooks/no_raw_roles.py`` fails the docs build on one, and the test
here fails the test run on one, naming the file and line.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _hook():
    spec = importlib.util.spec_from_file_location(
        "no_raw_roles", REPO / "docs/hooks/no_raw_roles.py"
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _docstrings(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                yield node.body[0].lineno, doc


def test_no_raw_sphinx_roles_in_convlora_docstrings() -> None:
    pattern = _hook().RAW_ROLE
    found = []
    for path in sorted((REPO / "convlora").rglob("*.py")):
        for line, doc in _docstrings(path):
            found += [
                f"{path.relative_to(REPO)}:{line}: {m.group(0)}" for m in pattern.finditer(doc)
            ]
    assert not found, "raw Sphinx roles (use [convlora.x][] or [`x`][convlora.x]):\n" + "\n".join(
        found
    )


@pytest.mark.parametrize(
    "text",
    [":func:`inject`", ":class:`~convlora.LoRAConfig`", "see :meth:<code>remove</code>"],
)
def test_hook_rejects_a_rendered_raw_role(text: str) -> None:
    pytest.importorskip("mkdocs")
    hook = _hook()
    from mkdocs.exceptions import PluginError

    class _Page:
        class file:  # noqa: N801 - mimics mkdocs' page.file.src_path
            src_path = "api.md"

    with pytest.raises(PluginError, match="api.md: raw Sphinx role"):
        hook.on_page_content(f"<p>{text}</p>", page=_Page())
    assert (
        hook.on_page_content("<p>[convlora.inject][]</p>", page=_Page())
        == "<p>[convlora.inject][]</p>"
    )
