"""The adapter file format: one safetensors file per adapter, self-describing through its metadata.

Tensor keys are ``<layer>.<factor>`` -- ``<layer>.lora_A`` / ``<layer>.lora_B`` for LoRA, the
factors [convlora.methods][] names for the other methods -- plus ``<module>.bias`` for the
biases the bias mode names. The metadata (all strings, as safetensors requires) holds ``format``,
``format_version``, ``convlora_version``, ``adapter_name``, ``layers`` (JSON: per layer its base
type, weight shape, conv settings, rank, alpha, factorisation), ``bias`` (the bias mode, from
version 2), ``bias_keys``, ``base_fingerprint`` (SHA-256 over the targeted base weights),
``base_sketch`` and ``user`` (your metadata). From version 3 each layer entry also holds
``method`` and ``rslora``; a file is written as version 3 only when it needs them (a method other
than ``"lora"`` or rsLoRA scaling), so plain LoRA files stay readable by older convlora. From
version 4 a layer entry may hold ``"tucker": true`` (LoHa/LoKr in the Tucker form, see
[convlora.methods][]); a file is written as version 4 only when a layer has it, so older convlora
refuses such a file by its version instead of misreading its factors. A layer without the field
reads with it off. Files of versions 1 and 2 load as method ``"lora"``; version-1 files (no
``bias``) are still read.

[read_adapter][convlora.read_adapter] checks a file against all of this, without a model;
writing one from a model, and loading one into a model, is ``convlora.adapters``.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from ._values import is_number, short_repr
from ._version import __version__
from .config import alpha_problem
from .errors import AdapterFormatError
from .functional import FACTORIZATIONS, factorization_problem, max_rank
from .methods import METHODS, factor_shapes, method_delta, method_problem, scale_for
from .trainable import BIAS_MODES

__all__ = ["FORMAT", "FORMAT_VERSION", "READABLE_VERSIONS", "read_adapter"]

FORMAT = "convlora.adapter"
FORMAT_VERSION = "4"  # written only when a layer has "tucker"; "3" when one needs "method"/"rslora"; else "2"
READABLE_VERSIONS = ("1", "2", "3", "4")  # "1": no bias mode recorded (biases saved = the trainable ones)


def _is_int(x: object, low: int = 0) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= low


def _header(path: Path) -> dict[str, Any]:
    """Parse and check the safetensors header; catches non-safetensors and truncated files."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise AdapterFormatError(f"{path} is not a safetensors file (only {size} bytes).")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise AdapterFormatError(f"{path} is not a safetensors file or is truncated "
                                     f"(header length {n} for a file of {size} bytes).")
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
            reason = " ".join(str(err).split()) or type(err).__name__
            raise AdapterFormatError(f"{path} is not a safetensors file: bad header ({reason}).") from None
    if not isinstance(header, dict):
        raise AdapterFormatError(f"{path} is not a safetensors file: header is not a JSON object.")
    end = 0
    for key, entry in header.items():
        if key == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise AdapterFormatError(f"{path}: the header's __metadata__ must map names to strings, "
                                         f"found {short_repr(entry)}.")
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
                and offsets[0] <= offsets[1]):
            raise AdapterFormatError(f"{path}: tensor {key!r} has no valid data_offsets in the header "
                                     f"(found {short_repr(entry)}).")
        end = max(end, offsets[1])
    if 8 + n + end != size:
        raise AdapterFormatError(f"{path} is truncated or corrupt: its header describes "
                                 f"{8 + n + end} bytes but the file has {size}.")
    return header


_TYPES = {"Conv1d": 1, "Conv2d": 2, "Conv3d": 3, "Linear": 0,
          "ConvTranspose1d": 1, "ConvTranspose2d": 2, "ConvTranspose3d": 3}
_DTYPES = ("float64", "float32", "float16", "bfloat16")
_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def _ints(value: object, n: int, low: int) -> bool:
    return isinstance(value, list) and len(value) == n and all(_is_int(v, low) for v in value)


def _layer_problem(lm: object) -> str | None:
    """What is wrong with one layer's metadata entry (naming the fields and values), or ``None``."""
    if not isinstance(lm, dict):
        return f"not a JSON object ({short_repr(lm)})"
    kind, shape, groups = lm.get("type"), lm.get("weight_shape"), lm.get("groups")
    ndim = _TYPES.get(kind) if isinstance(kind, str) else None
    shape_ok = isinstance(shape, list) and all(_is_int(d, 1) for d in shape) and (
        len(shape) == ndim + 2 if ndim is not None else len(shape) >= 2)
    checks = {
        "type": ndim is not None,
        "weight_shape": shape_ok,
        "groups": _is_int(groups, 1) and (ndim != 0 or groups == 1)
        and (not shape_ok or shape[0] % groups == 0),  # type: ignore[index, operator]
        "rank": _is_int(lm.get("rank"), 1),
        "alpha": alpha_problem(lm.get("alpha")) is None,
        "factorization": lm.get("factorization") in FACTORIZATIONS,
        "dropout": is_number(lm.get("dropout", 0.0)) and 0 <= lm.get("dropout", 0.0) < 1,
        "base_dtype": lm.get("base_dtype", "float32") in _DTYPES,
        "rslora": isinstance(lm.get("rslora", False), bool),
        "tucker": isinstance(lm.get("tucker", False), bool),
    }
    if ndim:  # conv settings: optional, but well-formed when present
        pad = lm.get("padding", [0] * ndim)
        checks.update({
            "stride": _ints(lm.get("stride", [1] * ndim), ndim, 1),
            "dilation": _ints(lm.get("dilation", [1] * ndim), ndim, 1),
            "padding": pad in ("same", "valid") or _ints(pad, ndim, 0),
            "padding_mode": lm.get("padding_mode", "zeros") in _PADDING_MODES,
        })
    bad = [k for k, ok in checks.items() if not ok]
    method = lm.get("method", "lora")
    if not bad and method not in METHODS:
        return (f"unknown method {short_repr(method, 40)}; this convlora ({__version__}) knows {METHODS}. "
                "Upgrade convlora to load it")
    if not bad:
        return None
    values = ", ".join(f"{k}={short_repr(lm.get(k, '<missing>'), 40)}" for k in bad)
    return f"bad or missing {bad} ({values})"


def _layer_name_ok(name: str) -> bool:
    return bool(name) and all(part for part in name.split("."))


def _decode(path: Path, raw: dict[str, str]) -> dict[str, Any]:
    """Decode and validate the metadata of a readable version; one-line errors name the field."""
    meta: dict[str, Any] = dict(raw)
    defaults = {"layers": "{}", "bias_keys": "[]", "base_sketch": "{}", "user": "{}"}
    for key, default in defaults.items():
        try:
            meta[key] = json.loads(raw.get(key, default))
        except (TypeError, json.JSONDecodeError, RecursionError) as err:
            reason = " ".join(str(err).split()) or type(err).__name__
            raise AdapterFormatError(f"{path}: metadata field {key!r} is not valid JSON ({reason}).") from None
    name, layers, keys = meta.get("adapter_name"), meta["layers"], meta["bias_keys"]
    if not isinstance(name, str) or not name.isidentifier():
        raise AdapterFormatError(f"{path}: metadata adapter_name={short_repr(name)} is not a Python identifier.")
    if not isinstance(meta.get("convlora_version"), str):
        raise AdapterFormatError(f"{path}: metadata lacks the convlora_version string.")
    if not isinstance(meta["user"], dict):
        raise AdapterFormatError(f"{path}: metadata 'user' must be a JSON object, found {short_repr(meta['user'])}.")
    if not isinstance(layers, dict) or not layers:
        raise AdapterFormatError(f"{path}: metadata 'layers' must be a non-empty JSON object, "
                                 f"found {short_repr(layers)}.")
    for lname, lm in layers.items():
        if not _layer_name_ok(lname):
            raise AdapterFormatError(f"{path}: metadata 'layers' names a layer {lname!r}, which is not "
                                     "a dotted module name.")
        problem = _layer_problem(lm)
        if problem:
            raise AdapterFormatError(f"{path}: metadata of layer {lname!r}: {problem}.")
        lm.setdefault("method", "lora")  # versions 1 and 2 hold LoRA adapters only
        lm.setdefault("rslora", False)
        lm.setdefault("tucker", False)  # versions 1 to 3: the flattened LoHa/LoKr factors
        if lm["tucker"] and meta["format_version"] != "4":
            raise AdapterFormatError(f"{path}: metadata of layer {lname!r}: tucker=true, which format "
                                     f"version {meta['format_version']} does not hold (version 4 does).")
    if not isinstance(keys, list) or not all(
            isinstance(k, str) and k.rpartition(".")[2] == "bias" and _layer_name_ok(k) for k in keys) \
            or len(set(keys)) != len(keys):
        raise AdapterFormatError(f"{path}: metadata 'bias_keys' must be a list of distinct "
                                 f"'<module>.bias' names, found {short_repr(keys, 200)}.")
    sk = meta["base_sketch"]
    if not isinstance(sk, dict) or set(sk) != set(layers) or not all(
            isinstance(v, list) and len(v) >= 2 and all(is_number(x) for x in v) for v in sk.values()):
        raise AdapterFormatError(f"{path}: metadata 'base_sketch' must map layers to lists of numbers, "
                                 f"found {short_repr(sk)}.")
    fp = meta.get("base_fingerprint")
    if not isinstance(fp, str) or len(fp) != 64 or any(c not in "0123456789abcdef" for c in fp):
        raise AdapterFormatError(f"{path}: metadata base_fingerprint={short_repr(fp)} is not a SHA-256 hex digest.")
    if meta["format_version"] == "1":
        meta["bias"] = None  # not recorded: version 1 saved the biases that were trainable
        return meta
    bias = meta.get("bias")
    if bias not in BIAS_MODES:
        raise AdapterFormatError(f"{path}: metadata bias={short_repr(bias)} is not one of {BIAS_MODES}.")
    if bias == "none" and keys:
        raise AdapterFormatError(f"{path}: bias mode 'none' but the file lists biases {keys[:3]}.")
    if bias == "lora_only":
        foreign = [k for k in keys if k.rpartition(".")[0] not in layers]
        if foreign:
            raise AdapterFormatError(f"{path}: bias mode 'lora_only' but {foreign[:3]} are not "
                                     "biases of the adapted layers.")
    return meta


def _check_tensors(path: Path, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    """The tensors against the file's own metadata: names, shapes, dtypes, finite values and deltas."""
    layers: dict[str, dict[str, Any]] = meta["layers"]
    specs: dict[str, dict[str, tuple[int, ...]]] = {}
    for lname, lm in layers.items():
        shape = tuple(lm["weight_shape"])
        problem = factorization_problem(lm["factorization"], shape, lm["groups"])
        problem = problem or method_problem(lm["method"], lm["factorization"], shape, lm["groups"],
                                            lm["rank"], lm["tucker"])
        limit = max_rank(lm["factorization"], shape, lm["groups"])
        if problem is None and lm["method"] in ("lora", "dora") and lm["rank"] > limit:
            problem = f"rank={lm['rank']} exceeds {limit} for weight {list(shape)}"
        if problem:
            raise AdapterFormatError(f"{path}: metadata of layer {lname!r}: {problem}.")
        specs[lname] = factor_shapes(lm["method"], lm["factorization"], shape, lm["rank"], lm["groups"],
                                     lm["type"].startswith("ConvTranspose"), lm["tucker"])
    expected = {f"{n}.{f}" for n, fs in specs.items() for f in fs} | set(meta["bias_keys"])
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise AdapterFormatError(f"{path}: tensors missing from the file: {missing[:10]}; "
                                 f"unexpected tensors: {unexpected[:10]}.")
    for key, t in tensors.items():
        if not t.is_floating_point():
            raise AdapterFormatError(f"{path}: tensor {key!r} has dtype {t.dtype}; adapter tensors "
                                     "are floating point.")
        if not bool(torch.isfinite(t).all()):
            raise AdapterFormatError(f"{path}: tensor {key!r} holds NaN or infinite values.")
    for key in meta["bias_keys"]:
        if tensors[key].dim() != 1:
            raise AdapterFormatError(f"{path}: bias {key!r} has shape {tuple(tensors[key].shape)}, not 1-D.")
    for lname, lm in layers.items():
        shape = tuple(lm["weight_shape"])
        for factor, want in specs[lname].items():
            t = tensors[f"{lname}.{factor}"]
            if tuple(t.shape) != tuple(want):
                raise AdapterFormatError(f"{path}: {lname}.{factor}: shape {tuple(t.shape)}, expected "
                                         f"{tuple(want)} from the layer's metadata.")
        additive = "lora" if lm["method"] == "dora" else lm["method"]  # DoRA: its W + delta
        factors = {f: tensors[f"{lname}.{f}"] for f in specs[lname] if f != "lora_magnitude"}
        delta = method_delta(additive, factors, shape, scale_for(lm["alpha"], lm["rank"], lm["rslora"]))
        if not bool(torch.isfinite(delta).all()):
            raise AdapterFormatError(f"{path}: metadata of layer {lname!r}: alpha={lm['alpha']!r} with "
                                     f"rank={lm['rank']} gives a non-finite delta weight.")


def read_adapter(path: str | os.PathLike[str]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read and validate an adapter file; returns ``(tensors, metadata)`` with JSON decoded.

    Everything in the file is checked before it is returned: the header, every metadata field
    (types and ranges, as [inject][convlora.inject] checks its arguments), and the tensors
    against the metadata (names, shapes, floating dtypes, finite values, a finite delta).

    The metadata's ``bias`` is the file's bias mode, or ``None`` for a version-1 file (which
    recorded none: it holds the biases that were trainable when it was saved).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        AdapterFormatError: not safetensors, truncated, not an adapter, a format version this
            convlora cannot read, or invalid metadata or tensors (the message names the field
            and its value).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter file {str(path)!r} does not exist.")
    raw = _header(path).get("__metadata__") or {}
    if raw.get("format") != FORMAT:
        raise AdapterFormatError(f"{path} is a safetensors file but not a convlora adapter "
                                 f"(format={short_repr(raw.get('format'))}, expected {FORMAT!r}).")
    version = raw.get("format_version")
    if version not in READABLE_VERSIONS:
        raise AdapterFormatError(f"{path} has adapter format version {short_repr(version)}; convlora "
                                 f"{__version__} reads versions {', '.join(map(repr, READABLE_VERSIONS))}. "
                                 "Upgrade convlora.")
    meta = _decode(path, raw)
    try:
        tensors = load_file(str(path))
    except Exception as err:  # noqa: BLE001 - surface any reader failure as a format error
        reason = " ".join(str(err).split()) or type(err).__name__
        raise AdapterFormatError(f"{path} could not be read as safetensors: {reason}") from None
    _check_tensors(path, tensors, meta)
    return tensors, meta
