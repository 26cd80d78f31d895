"""Adapter files: one safetensors file per adapter, self-describing through its metadata.

Tensor keys are ``<layer>.lora_A`` / ``<layer>.lora_B`` plus ``<module>.bias`` for the biases
the bias mode names. The metadata (all strings, as safetensors requires) holds ``format``,
``format_version``, ``convlora_version``, ``adapter_name``, ``layers`` (JSON: per layer its base
type, weight shape, conv settings, rank, alpha, factorisation), ``bias`` (the bias mode, from
version 2), ``bias_keys``, ``base_fingerprint`` (SHA-256 over the targeted base weights),
``base_sketch`` and ``user`` (your metadata). Version-1 files (no ``bias``) are still read.
"""

from __future__ import annotations

import json
import math
import os
import struct
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ._atomic import write_atomically
from ._version import __version__
from .errors import (
    AdapterFormatError,
    AdapterMismatchError,
    ConvLoRAError,
    FingerprintMismatchError,
    MergeStateError,
)
from .fingerprint import base_mismatch, fingerprint, sketch
from .functional import FACTORIZATIONS, factorization_problem, lora_shapes, max_rank
from .layer import LoRALayer, unsupported_reason
from .management import lora_state_dict
from .surgery import lora_layers, replace_module
from .trainable import BIAS_MODES, BiasMode, bias_names, check_bias_mode

__all__ = ["FORMAT", "FORMAT_VERSION", "READABLE_VERSIONS", "load_adapter", "read_adapter",
           "save_adapter"]

FORMAT = "convlora.adapter"
FORMAT_VERSION = "2"
READABLE_VERSIONS = ("1", "2")  # "1": no bias mode recorded (biases saved = the trainable ones)


def _layer_meta(layer: LoRALayer, name: str) -> dict[str, Any]:
    meta: dict[str, Any] = {"type": layer.base_type, "weight_shape": list(layer.weight.shape),
                            "groups": layer.groups, "rank": layer.rank[name],
                            "alpha": layer.alpha[name], "factorization": layer.factorization[name],
                            "dropout": layer.dropout[name]}
    if layer.ndim:
        meta.update(stride=list(layer.stride), dilation=list(layer.dilation),
                    padding=layer.padding if isinstance(layer.padding, str) else list(layer.padding),
                    padding_mode=layer.padding_mode)
    return meta


def save_adapter(model: nn.Module, path: str | os.PathLike[str], *, name: str = "default",
                 bias: BiasMode = "none", metadata: dict[str, Any] | None = None) -> Path:
    """Write adapter ``name`` of ``model`` to a ``.safetensors`` file (atomically).

    Args:
        model: A model with LoRA layers.
        path: Destination file.
        name: Which adapter to save.
        bias: Which biases go into the file, recorded in it: ``"none"`` (the default: the
            adapter's factors only), ``"lora_only"`` (the biases of the layers carrying the
            adapter) or ``"all"`` (every bias of the model). Use the mode you trained with
            ([mark_only_lora_trainable][convlora.mark_only_lora_trainable]); a warning names
            trainable biases that the mode leaves out.
        metadata: Extra JSON-serialisable information stored under ``user``.

    Returns:
        ``path`` as a ``Path``.
    """
    check_bias_mode(bias, "save_adapter()")
    layers = {n: lyr for n, lyr in lora_layers(model).items() if name in lyr.rank}
    if not layers:
        raise AdapterMismatchError(f"save_adapter(): no layer has an adapter named {name!r}.")
    try:
        user = json.dumps(metadata or {})
    except (TypeError, ValueError) as err:
        raise ConvLoRAError(f"save_adapter(): metadata is not JSON-serialisable ({err}).") from None
    tensors = {k: v.cpu().contiguous() for k, v in lora_state_dict(model, name, bias=bias).items()}
    bias_keys = [k for k in tensors if k.rpartition(".")[2] == "bias"]
    params = dict(model.named_parameters())
    left_out = [k for k in bias_names(model, "all") if params[k].requires_grad and k not in tensors]
    if left_out:
        warnings.warn(f"save_adapter(): biases {left_out[:3]}{'...' if len(left_out) > 3 else ''} "
                      f"are trainable but bias={bias!r} leaves them out of the file; pass "
                      "bias='lora_only' or 'all' to save them.", stacklevel=2)
    bases = {n: lyr.base_weight() for n, lyr in layers.items()}
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "convlora_version": __version__,
            "adapter_name": name, "layers": json.dumps({n: _layer_meta(lyr, name) for n, lyr in layers.items()}),
            "bias": bias, "bias_keys": json.dumps(bias_keys), "base_fingerprint": fingerprint(bases),
            "base_sketch": json.dumps(sketch(bases)), "user": user}
    return write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


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
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise AdapterFormatError(f"{path} is not a safetensors file: bad header ({err}).") from None
    if not isinstance(header, dict):
        raise AdapterFormatError(f"{path} is not a safetensors file: header is not a JSON object.")
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        raise AdapterFormatError(f"{path} is truncated or corrupt: its header describes "
                                 f"{8 + n + end} bytes but the file has {size}.")
    return header


def _is_int(x: object, low: int = 0) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= low


def _layer_problem(lm: object) -> str | None:
    """What is wrong with one layer's metadata entry, or ``None``."""
    if not isinstance(lm, dict):
        return "not a JSON object"
    shape = lm.get("weight_shape")
    checks = {
        "type": isinstance(lm.get("type"), str),
        "weight_shape": isinstance(shape, list) and len(shape) >= 2 and all(_is_int(d, 1) for d in shape),
        "groups": _is_int(lm.get("groups"), 1),
        "rank": _is_int(lm.get("rank"), 1),
        "alpha": isinstance(lm.get("alpha"), (int, float)) and not isinstance(lm.get("alpha"), bool)
        and math.isfinite(lm["alpha"]),
        "factorization": lm.get("factorization") in FACTORIZATIONS,
        "dropout": isinstance(lm.get("dropout", 0.0), (int, float)) and 0 <= lm.get("dropout", 0.0) < 1,
    }
    bad = [k for k, ok in checks.items() if not ok]
    return f"bad or missing {bad}" if bad else None


def _decode(path: Path, raw: dict[str, str]) -> dict[str, Any]:
    """Decode and validate the metadata of a readable version; one-line errors name the field."""
    meta: dict[str, Any] = dict(raw)
    defaults = {"layers": "{}", "bias_keys": "[]", "base_sketch": "{}", "user": "{}"}
    for key, default in defaults.items():
        try:
            meta[key] = json.loads(raw.get(key, default))
        except (TypeError, json.JSONDecodeError) as err:
            raise AdapterFormatError(f"{path}: metadata field {key!r} is not valid JSON ({err}).") from None
    name, layers, keys = meta.get("adapter_name"), meta["layers"], meta["bias_keys"]
    if not isinstance(name, str) or not name.isidentifier():
        raise AdapterFormatError(f"{path}: metadata adapter_name={name!r} is not a Python identifier.")
    if not isinstance(layers, dict) or not layers:
        raise AdapterFormatError(f"{path}: metadata 'layers' must be a non-empty JSON object.")
    for lname, lm in layers.items():
        problem = _layer_problem(lm)
        if problem:
            raise AdapterFormatError(f"{path}: metadata of layer {lname!r}: {problem}.")
    if not isinstance(keys, list) or not all(isinstance(k, str) and k.rpartition(".")[2] == "bias"
                                             for k in keys):
        raise AdapterFormatError(f"{path}: metadata 'bias_keys' must be a list of '<module>.bias' "
                                 f"names, found {keys!r:.200}.")
    sk = meta["base_sketch"]
    if not isinstance(sk, dict) or not all(isinstance(v, list) and all(
            isinstance(x, (int, float)) for x in v) for v in sk.values()):
        raise AdapterFormatError(f"{path}: metadata 'base_sketch' must map layers to lists of numbers.")
    if not isinstance(meta.get("base_fingerprint"), str):
        raise AdapterFormatError(f"{path}: metadata lacks the base_fingerprint string.")
    if meta["format_version"] == "1":
        meta["bias"] = None  # not recorded: version 1 saved the biases that were trainable
        return meta
    bias = meta.get("bias")
    if bias not in BIAS_MODES:
        raise AdapterFormatError(f"{path}: metadata bias={bias!r} is not one of {BIAS_MODES}.")
    if bias == "none" and keys:
        raise AdapterFormatError(f"{path}: bias mode 'none' but the file lists biases {keys[:3]}.")
    if bias == "lora_only":
        foreign = [k for k in keys if k.rpartition(".")[0] not in layers]
        if foreign:
            raise AdapterFormatError(f"{path}: bias mode 'lora_only' but {foreign[:3]} are not "
                                     "biases of the adapted layers.")
    return meta


def read_adapter(path: str | os.PathLike[str]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read and validate an adapter file; returns ``(tensors, metadata)`` with JSON decoded.

    The metadata's ``bias`` is the file's bias mode, or ``None`` for a version-1 file (which
    recorded none: it holds the biases that were trainable when it was saved).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        AdapterFormatError: not safetensors, truncated, not an adapter, a format version this
            convlora cannot read, or invalid metadata.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter file {str(path)!r} does not exist.")
    raw = _header(path).get("__metadata__") or {}
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        found = raw.get("format") if isinstance(raw, dict) else None
        raise AdapterFormatError(f"{path} is a safetensors file but not a convlora adapter "
                                 f"(format={found!r}, expected {FORMAT!r}).")
    version = raw.get("format_version")
    if version not in READABLE_VERSIONS:
        raise AdapterFormatError(f"{path} has adapter format version {version!r}; convlora "
                                 f"{__version__} reads versions {', '.join(map(repr, READABLE_VERSIONS))}. "
                                 "Upgrade convlora.")
    meta = _decode(path, raw)
    try:
        tensors = load_file(str(path))
    except Exception as err:  # noqa: BLE001 - surface any reader failure as a format error
        raise AdapterFormatError(f"{path} could not be read as safetensors: {err}") from None
    return tensors, meta


def _check(model: nn.Module, tensors: dict[str, Tensor], meta: dict[str, Any], name: str,
           path: Path) -> list[str]:
    """Validate everything before touching the model; returns problems that are fingerprint-only."""
    modules = dict(model.named_modules())
    layers: dict[str, dict[str, Any]] = meta["layers"]
    missing_mod = [n for n in layers if n not in modules]
    if missing_mod:
        raise AdapterMismatchError(f"{path}: adapter layers not found in the model: {missing_mod[:10]}"
                                   " (is this adapter for another model?).")
    expected = {f"{n}.{s}" for n in layers for s in ("lora_A", "lora_B")} | set(meta["bias_keys"])
    missing = sorted(expected - set(tensors))
    unexpected = sorted(set(tensors) - expected)
    if missing or unexpected:
        raise AdapterMismatchError(f"{path}: tensors missing from the file: {missing[:10]}; "
                                   f"unexpected tensors: {unexpected[:10]}.")
    problems: list[str] = []
    for lname, lm in layers.items():
        mod = modules[lname]
        if isinstance(mod, LoRALayer):
            if mod.merged_adapter is not None:
                raise MergeStateError(f"layer {lname!r} is merged; unmerge() before loading adapters.")
            if name in mod.rank:
                raise AdapterMismatchError(f"layer {lname!r} already has an adapter {name!r}; "
                                           "load it under another name= or delete_adapter() first.")
        weight = getattr(mod, "weight", None)
        if weight is None or list(weight.shape) != lm["weight_shape"] or type(mod).__name__ not in (
                lm["type"], "LoRALayer"):
            got = None if weight is None else list(weight.shape)
            problems.append(f"{lname}: the adapter expects a {lm['type']} of weight {lm['weight_shape']}, "
                            f"the model has {type(mod).__name__} of weight {got}")
            continue
        shape, groups = tuple(lm["weight_shape"]), int(getattr(mod, "groups", 1))
        reason = None if isinstance(mod, LoRALayer) else unsupported_reason(mod)
        if reason is None and groups != lm["groups"]:
            reason = f"groups={groups} in the model, {lm['groups']} in the file"
        if reason is None:
            reason = factorization_problem(lm["factorization"], shape, groups)
        if reason is None and lm["rank"] > max_rank(lm["factorization"], shape, groups):
            reason = f"rank {lm['rank']} exceeds {max_rank(lm['factorization'], shape, groups)}"
        if reason:
            problems.append(f"{lname}: {reason}")
            continue
        sa, sb = lora_shapes(lm["factorization"], shape, lm["rank"], lm["groups"])
        for key, shape in ((f"{lname}.lora_A", sa), (f"{lname}.lora_B", sb)):
            if tuple(tensors[key].shape) != tuple(shape):
                problems.append(f"{key}: shape {tuple(tensors[key].shape)}, expected {tuple(shape)}")
    for key in meta["bias_keys"]:
        owner = modules.get(key.rpartition(".")[0])
        b = getattr(owner, "bias", None)
        if b is None or b.shape != tensors[key].shape:
            problems.append(f"{key}: the model has no bias of shape {tuple(tensors[key].shape)}")
    if problems:
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        raise AdapterMismatchError(f"{path} does not fit this model: " + "; ".join(problems[:10]) + more)
    bases = {n: (m.base_weight() if isinstance(m, LoRALayer) else m.weight)
             for n, m in ((n, modules[n]) for n in layers)}
    mismatch = base_mismatch(bases, meta["base_fingerprint"], meta["base_sketch"])
    if mismatch:
        return [f"{path}: the base weights differ from the ones adapter {name!r} was trained on "
                f"({mismatch})"]
    return []


def _adapter_names(model: nn.Module) -> list[str]:
    return sorted({a for layer in lora_layers(model).values() for a in layer.rank})


def load_adapter(model: nn.Module, path: str | os.PathLike[str], *, name: str | None = None,
                 strict: bool = True) -> str:
    """Load an adapter file into ``model`` as adapter ``name`` and make it active.

    Layers that are not LoRA layers yet are injected from the file's metadata. Nothing changes
    when an error is raised.

    Args:
        model: The base model (plain or already with LoRA layers).
        path: A file written by [`save_adapter`][convlora.save_adapter].
        name: Adapter name on the model (default: the name stored in the file).
        strict: Raise on a base-weight fingerprint mismatch (else warn and load anyway).

    Returns:
        The adapter's name on the model.
    """
    path = Path(path)
    tensors, meta = read_adapter(path)
    name = name or meta["adapter_name"]
    if not isinstance(name, str) or not name.isidentifier():
        raise ConvLoRAError(f"load_adapter(): name={name!r} must be a Python identifier.")
    fp_problems = _check(model, tensors, meta, name, path)
    if fp_problems:
        if strict:
            raise FingerprintMismatchError(fp_problems[0] + "; pass strict=False to load anyway.")
        warnings.warn(fp_problems[0], stacklevel=2)
    others = [a for a in _adapter_names(model) if a != name]
    if meta["bias_keys"] and others:
        warnings.warn(f"{path} carries biases {meta['bias_keys'][:3]}...; biases are shared "
                      f"by all adapters of a model, so loading it changes the base seen by {others}.",
                      stacklevel=2)
    modules = dict(model.named_modules())
    for lname, lm in meta["layers"].items():
        layer = modules[lname]
        if not isinstance(layer, LoRALayer):
            layer = LoRALayer(layer)
            replace_module(model, lname, layer)
        layer.add_adapter(name, lm["rank"], lm["alpha"], lm["factorization"], lm.get("dropout", 0.0),
                          lname)
        with torch.no_grad():
            layer.lora_A[name].copy_(tensors[f"{lname}.lora_A"])
            layer.lora_B[name].copy_(tensors[f"{lname}.lora_B"])
    with torch.no_grad():
        for key in meta["bias_keys"]:
            model.get_parameter(key).copy_(tensors[key])
    for layer in lora_layers(model).values():
        layer.active_adapter = name if name in layer.rank else None
    return name
