"""The layout rules of the developers' guide, checked on the source itself.

Every module under ``convlora/`` and ``examples/`` is parsed (with :mod:`ast`, nothing is
imported) and every import is followed, at the top of a module or inside a function. The test
fails when a module is part of an import cycle, or when a module other than a package's
``__init__.py`` lists in ``__all__`` names that it only imports (a re-export facade). The two
planted trees at the end show that the checks catch what they are meant to catch.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("convlora", "examples")


def _modules(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    mods = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            mods[".".join(parts)] = path
    return mods


def _known(name: str, mods: dict[str, Path]) -> str | None:
    """The longest prefix of the dotted ``name`` that is one of ``mods``."""
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def _imports(mod: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """Modules of ``mods`` that ``mod`` imports anywhere in its file (functions included)."""
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if base else a.name for a in node.names]
        else:
            continue
        for target in targets:
            hit = _known(target, mods)
            if hit and hit != mod:
                found.add(hit)
    return found


def import_cycles(root: Path, packages: tuple[str, ...] = PACKAGES) -> list[list[str]]:
    """Groups of modules that reach each other through imports (a package importing its own submodules is no cycle)."""
    mods = _modules(root, packages)
    graph = {m: _imports(m, p, mods) for m, p in mods.items()}
    reach: dict[str, set[str]] = {}
    for start in graph:  # the graphs are small: a search from every module is fast enough
        seen, todo = set(), list(graph[start])
        while todo:
            node = todo.pop()
            if node not in seen:
                seen.add(node)
                todo.extend(graph[node])
        reach[start] = seen
    cycles, placed = [], set()
    for mod in sorted(graph):
        if mod in placed or mod not in reach[mod]:
            continue
        group = sorted(m for m in reach[mod] if mod in reach[m])
        placed.update(group)
        real = [m for m in group if not any(o.startswith(m + ".") for o in group)]
        if len(real) > 1:
            cycles.append(group)
    return cycles


def reexports(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, list[str]]:
    """For each module other than an ``__init__.py``: the names its ``__all__`` lists that it only imports."""
    found = {}
    for mod, path in _modules(root, packages).items():
        if path.name == "__init__.py":
            continue
        imported, defined, exported = set(), set(), []
        for node in ast.parse(path.read_text(), str(path)).body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                imported.update((a.asname or a.name).split(".")[0] for a in node.names)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                defined.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    if not isinstance(target, ast.Name):
                        continue
                    if target.id == "__all__" and isinstance(node.value, (ast.List, ast.Tuple)):
                        exported = [e.value for e in node.value.elts if isinstance(e, ast.Constant)]
                    else:
                        defined.add(target.id)
        passed_on = [n for n in exported if n in imported and n not in defined]
        if passed_on:
            found[mod] = passed_on
    return found


def test_no_import_cycle() -> None:
    assert import_cycles(REPO) == []


def test_no_module_re_exports_names_it_imports() -> None:
    assert reexports(REPO) == {}


def test_the_checks_see_the_whole_tree() -> None:
    mods = _modules(REPO, PACKAGES)
    assert "examples.span_sr.train" in mods and "convlora.distill.distiller" in mods


def _plant(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_a_function_level_cycle_is_caught(tmp_path: Path) -> None:
    root = _plant(tmp_path, {
        "examples/__init__.py": "",
        "examples/pkg/__init__.py": "",
        "examples/pkg/a.py": "from examples.pkg.b import g\n\ndef f():\n    return g()\n",
        "examples/pkg/b.py": "def g():\n    from examples.pkg import a  # dodged by importing late\n    return a\n",
        "examples/pkg/c.py": "from . import a\n",  # imports a, but nothing imports c back
        "convlora/__init__.py": "",
    })
    assert import_cycles(root) == [["examples.pkg.a", "examples.pkg.b"]]


def test_a_facade_is_caught(tmp_path: Path) -> None:
    root = _plant(tmp_path, {
        "examples/__init__.py": "",
        "examples/real.py": "__all__ = ['load']\n\ndef load():\n    return 1\n",
        "examples/facade.py": "from examples.real import load\n\n__all__ = ['load', 'save']\n\ndef save():\n    pass\n",
        "examples/user.py": "from examples.real import load\n\n__all__ = ['twice']\n\ndef twice():\n    return 2 * load()\n",
        "convlora/__init__.py": "from examples.real import load\n\n__all__ = ['load']\n",  # a package's front door
    })
    assert reexports(root) == {"examples.facade": ["load"]}
    assert import_cycles(root) == []
