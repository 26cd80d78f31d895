"""Command-line side of the DSCLoRA config: ``--key value`` parsing, aliases and typed overrides.

``--section.key VALUE`` sets one key; a key whose last part is unique across sections may be
given without its section (``--teacher`` is ``--model.teacher``). List keys take every value up
to the next ``--option``; ``none``/``null`` clears an optional key. Values arrive as strings and
are typed by the dataclass field they set (:func:`apply_mapping`, also used for YAML files).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from examples.span_sr.yaml_io import parse_scalar

__all__ = ["apply_mapping", "apply_overrides", "parse_args"]


def _field_type(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is list:
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "[]")):
            return []
        items = value if isinstance(value, list) else [value]
        return [_coerce(v, args[0], key) for v in items]
    if isinstance(value, str) and hint is not str:
        value = parse_scalar(value)
    try:
        if hint is bool:
            if not isinstance(value, bool):
                raise ValueError
            return value
        if hint is int:
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise ValueError
            return int(float(value))
        if hint is float:
            return float(value)
        if hint is str:
            return "" if value is None else str(value)
    except (TypeError, ValueError):
        pass
    else:
        return value
    raise ValueError(f"config key {key!r}: {value!r} is not a valid {getattr(hint, '__name__', hint)}; "
                     f"give a value of that type (e.g. --{key} ...)")


def apply_mapping(obj: Any, data: dict[str, Any], prefix: str = "") -> None:
    """Set the fields of the dataclass ``obj`` (sections recursively) from ``data``, typed by the field hints.

    Raises:
        ValueError: an unknown key, a scalar given for a section or a value of the wrong type.
    """
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in data.items():
        full = prefix + key
        if key not in names:
            raise ValueError(f"unknown config key {full!r}; valid keys here: {sorted(names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ValueError(f"config key {full!r} is a section; give a mapping, not {value!r}")
            apply_mapping(current, value, full + ".")
        else:
            setattr(obj, key, _coerce(value, _field_type(type(obj), key), full))


def _leaf_keys(cfg: Any) -> dict[str, str]:
    """Map every dotted key and every unique leaf name to its dotted key."""
    full: dict[str, str] = {}
    leaves: dict[str, list[str]] = {}
    for section in dataclasses.fields(cfg):
        value = getattr(cfg, section.name)
        if dataclasses.is_dataclass(value):
            for f in dataclasses.fields(value):
                dotted = f"{section.name}.{f.name}"
                full[dotted] = dotted
                leaves.setdefault(f.name, []).append(dotted)
        else:
            full[section.name] = section.name
    for leaf, owners in leaves.items():
        if len(owners) == 1 and leaf not in full:
            full[leaf] = owners[0]
    return full


def apply_overrides(cfg: Any, overrides: dict[str, Any]) -> None:
    """Apply dotted (or unique leaf-name) ``overrides`` to the config dataclass ``cfg`` in place.

    Raises:
        ValueError: an unknown option (the message lists the valid ones) or a value of the wrong type.
    """
    keys = _leaf_keys(cfg)
    for key, value in overrides.items():
        if key not in keys:
            raise ValueError(f"unknown option --{key}; valid options: "
                             + ", ".join(f"--{k}" for k in sorted(k for k in keys if "." in k)))
        nested: dict[str, Any] = {}
        node = nested
        *parents, leaf = keys[key].split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
        apply_mapping(cfg, nested)


def parse_args(argv: list[str]) -> tuple[str | None, str | None, dict[str, Any]]:
    """Split ``argv`` into ``(config path, resume dir, overrides)``.

    ``--key value``, ``--key=value`` and ``--key v1 v2 ...`` (lists) are accepted; values stay
    strings here and are typed by :func:`load_config`.
    """
    config: str | None = None
    resume: str | None = None
    overrides: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--") or token == "--":
            raise ValueError(f"unexpected argument {token!r}; options look like --section.key VALUE")
        key, eq, inline = token[2:].partition("=")
        values = [inline] if eq else []
        i += 1
        while not eq and i < len(argv) and not (argv[i].startswith("--") and len(argv[i]) > 2):
            values.append(argv[i])
            i += 1
        if key in ("config", "resume"):
            if len(values) != 1:
                raise ValueError(f"--{key} takes one path, got {values}")
            config, resume = (values[0], resume) if key == "config" else (config, values[0])
            continue
        if not values:
            values = ["true"]  # bare flag: --train.compile
        overrides[key] = values if len(values) > 1 else values[0]
    return config, resume, overrides
