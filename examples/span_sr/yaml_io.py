"""YAML for the DSCLoRA configs: a reader with a built-in fallback and a writer both readers accept.

PyYAML is used when installed; without it :func:`parse_yaml_subset` handles the subset these
configs use (nested mappings, scalars, ``[a, b]`` and ``- item`` lists), so training also runs
on a machine with nothing but torch and numpy. :func:`dump_yaml` writes what both readers read
back unchanged (``config.yaml`` in a run folder).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["dump_yaml", "parse_scalar", "parse_yaml_subset", "read_yaml"]


def _outside_quotes(text: str) -> list[bool]:
    """For each character: is it outside a quoted string?"""
    flags, quote = [], ""
    for ch in text:
        if quote:
            flags.append(False)
            quote = "" if ch == quote else quote
        else:
            quote = ch if ch in "\"'" else ""
            flags.append(not quote)
    return flags


def _strip_comment(line: str) -> str:
    out = _outside_quotes(line)
    for i, ch in enumerate(line):
        if ch == "#" and out[i] and (i == 0 or line[i - 1] in " \t"):
            return line[:i].rstrip()
    return line.rstrip()


def _split_items(inner: str) -> list[str]:
    out, items, start = _outside_quotes(inner), [], 0
    for i, ch in enumerate(inner):
        if ch == "," and out[i]:
            items.append(inner[start:i])
            start = i + 1
    return items + [inner[start:]]


def parse_scalar(text: str) -> Any:
    """One YAML scalar or flow list: ``null``/``none`` -> None, booleans, ints, floats, quoted or plain text."""
    text = text.strip()
    if text == "" or text in ("null", "~", "None", "none"):
        return None
    if text[0] in "\"'":
        return json.loads(text) if text[0] == '"' else text[1:-1].replace("''", "'")
    if text.startswith("[") and text.endswith("]"):
        inner = text[1:-1].strip()
        return [] if not inner else [parse_scalar(part) for part in _split_items(inner)]
    low = text.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_yaml_subset(text: str, source: str) -> dict[str, Any]:
    """Read nested mappings, scalars and lists (the subset of YAML the configs use).

    Raises:
        ValueError: a line outside that subset (the message gives ``source:line``).
    """
    lines = []
    for number, raw in enumerate(text.splitlines(), 1):
        body = _strip_comment(raw)
        if body.strip():
            lines.append((number, len(body) - len(body.lstrip()), body.strip()))
    root: dict[str, Any] = {}
    stack: list[tuple[int, Any]] = [(-1, root)]
    pending: tuple[dict[str, Any], str, int] | None = None  # key waiting for a nested block
    for number, indent, body in lines:
        if pending is not None:
            parent, key, key_indent = pending
            if indent > key_indent:
                parent[key] = [] if body.startswith("- ") or body == "-" else {}
                stack.append((indent, parent[key]))
            pending = None
        while stack and indent < stack[-1][0]:
            stack.pop()
        container = stack[-1][1]
        if body.startswith("- ") or body == "-":
            if not isinstance(container, list):
                raise ValueError(f"{source}:{number}: list item {body!r} outside a list")
            container.append(parse_scalar(body[1:]))
            continue
        if ":" not in body or not isinstance(container, dict):
            raise ValueError(f"{source}:{number}: cannot read {body!r} (expected 'key: value')")
        key, _, value = body.partition(":")
        if value.strip():
            container[key.strip()] = parse_scalar(value)
        else:
            container[key.strip()] = None
            pending = (container, key.strip(), indent)
    return root


def read_yaml(path: Path) -> dict[str, Any]:
    """The mapping in the YAML file ``path`` (PyYAML when installed, else the built-in reader)."""
    text = path.read_text()
    try:
        import yaml
    except ImportError:
        return parse_yaml_subset(text, str(path))
    data = yaml.safe_load(text)
    return data if data is not None else {}


def _emit(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return repr(value)
    if isinstance(value, float):  # YAML 1.1 (PyYAML) needs a dot in the mantissa: 3.0e-05, not 3e-05
        text = repr(value)
        mantissa, e, exponent = text.partition("e")
        return f"{mantissa}.0e{exponent}" if e and "." not in mantissa else text
    if isinstance(value, list):
        return "[" + ", ".join(_emit(v) for v in value) + "]"
    text = str(value)
    plain = text and text == text.strip() and not any(c in text for c in ":#[],'\"{}&*!|>%@`")
    return text if plain and not isinstance(parse_scalar(text), (bool, int, float, type(None))) else json.dumps(text)


def dump_yaml(data: dict[str, Any], indent: int = 0) -> str:
    """Write a nested dict of scalars/lists as YAML readable by PyYAML and the built-in reader."""
    out = []
    for key, value in data.items():
        if isinstance(value, dict):
            out.append(" " * indent + f"{key}:\n" + dump_yaml(value, indent + 2))
        else:
            out.append(" " * indent + f"{key}: {_emit(value)}\n")
    return "".join(out)
