"""Adapter files: one safetensors file per adapter, self-describing through its metadata.

Tensor keys are ``<layer>.lora_A`` / ``<layer>.lora_B`` (plus ``<module>.bias`` for trainable
biases). The metadata (all strings, as safetensors requires) holds ``format``,
``format_version``, ``convlora_version``, ``adapter_name``, ``layers`` (JSON: per layer its base
type, weight shape, conv settings, rank, alpha, factorisation), ``bias_keys``,
``base_fingerprint`` (SHA-256 over the targeted base weights) and ``user`` (your metadata).
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .errors import (
    AdapterFormatError,
    AdapterMismatchError,
    FingerprintMismatchError,
    MergeStateError,
)
from .fingerprint import fingerprint, sketch, sketches_match
from .functional import lora_shapes
from .layer import LoRALayer
from .management import lora_state_dict
from .surgery import lora_layers, replace_module

__all__ = ["FORMAT", "FORMAT_VERSION", "load_adapter", "read_adapter", "save_adapter"]

FORMAT = "convlora.adapter"
FORMAT_VERSION = "1"


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
                 metadata: dict[str, Any] | None = None) -> Path:
    """Write adapter ``name`` of ``model`` to a ``.safetensors`` file (atomically).

    Args:
        model: A model with LoRA layers.
        path: Destination file.
        name: Which adapter to save.
        metadata: Extra JSON-serialisable information stored under ``user``.
    """
    layers = {n: lyr for n, lyr in lora_layers(model).items() if name in lyr.rank}
    if not layers:
        raise AdapterMismatchError(f"save_adapter(): no layer has an adapter named {name!r}.")
    tensors = {k: v.cpu().contiguous() for k, v in lora_state_dict(model, name).items()}
    bias_keys = [k for k in tensors if k.endswith(".bias")]
    from . import __version__

    bases = {n: lyr.base_weight() for n, lyr in layers.items()}
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "convlora_version": __version__,
            "adapter_name": name, "layers": json.dumps({n: _layer_meta(lyr, name) for n, lyr in layers.items()}),
            "bias_keys": json.dumps(bias_keys), "base_fingerprint": fingerprint(bases),
            "base_sketch": json.dumps(sketch(bases)), "user": json.dumps(metadata or {})}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


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


def read_adapter(path: str | os.PathLike[str]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read and validate an adapter file; returns ``(tensors, metadata)`` with JSON decoded."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter file {str(path)!r} does not exist.")
    raw = _header(path).get("__metadata__") or {}
    if raw.get("format") != FORMAT:
        raise AdapterFormatError(f"{path} is a safetensors file but not a convlora adapter "
                                 f"(format={raw.get('format')!r}, expected {FORMAT!r}).")
    if raw.get("format_version") != FORMAT_VERSION:
        raise AdapterFormatError(f"{path} has adapter format version {raw.get('format_version')!r}; "
                                 f"this convlora reads version {FORMAT_VERSION!r}. Upgrade convlora.")
    meta: dict[str, Any] = dict(raw)
    for key in ("layers", "bias_keys", "base_sketch", "user"):
        meta[key] = json.loads(raw.get(key, "{}" if key != "bias_keys" else "[]"))
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
        sa, sb = lora_shapes(lm["factorization"], tuple(lm["weight_shape"]), lm["rank"], lm["groups"])
        for key, shape in ((f"{lname}.lora_A", sa), (f"{lname}.lora_B", sb)):
            if tuple(tensors[key].shape) != tuple(shape):
                problems.append(f"{key}: shape {tuple(tensors[key].shape)}, expected {tuple(shape)}")
    for key in meta["bias_keys"]:
        owner = model.get_submodule(key.rpartition(".")[0]) if "." in key else model
        b = getattr(owner, "bias", None)
        if b is None or b.shape != tensors[key].shape:
            problems.append(f"{key}: the model has no bias of shape {tuple(tensors[key].shape)}")
    if problems:
        raise AdapterMismatchError(f"{path} does not fit this model:\n  " + "\n  ".join(problems[:20]))
    bases = {n: (m.base_weight() if isinstance(m, LoRALayer) else m.weight)
             for n, m in ((n, modules[n]) for n in layers)}
    if fingerprint(bases) != meta.get("base_fingerprint") and not sketches_match(
            sketch(bases), meta["base_sketch"]):
        return [f"{path}: the base weights differ from the ones adapter {name!r} was trained on "
                f"(fingerprint {fingerprint(bases)[:16]} vs {str(meta.get('base_fingerprint'))[:16]})"]
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
    fp_problems = _check(model, tensors, meta, name, path)
    if fp_problems:
        if strict:
            raise FingerprintMismatchError(fp_problems[0] + "; pass strict=False to load anyway.")
        warnings.warn(fp_problems[0], stacklevel=2)
    others = [a for a in _adapter_names(model) if a != name]
    if meta["bias_keys"] and others:
        warnings.warn(f"{path} carries trained biases {meta['bias_keys'][:3]}...; biases are shared "
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
