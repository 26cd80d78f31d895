"""Adapter files: one safetensors file per adapter, self-describing through its metadata.

Tensor keys are ``<layer>.<factor>`` -- ``<layer>.lora_A`` / ``<layer>.lora_B`` for LoRA, the
factors [convlora.methods][] names for the other methods -- plus ``<module>.bias`` for the
biases the bias mode names. The metadata (all strings, as safetensors requires) holds ``format``,
``format_version``, ``convlora_version``, ``adapter_name``, ``layers`` (JSON: per layer its base
type, weight shape, conv settings, rank, alpha, factorisation), ``bias`` (the bias mode, from
version 2), ``bias_keys``, ``base_fingerprint`` (SHA-256 over the targeted base weights),
``base_sketch`` and ``user`` (your metadata). From version 3 each layer entry also holds
``method`` and ``rslora``; a file is written as version 3 only when it needs them (a method other
than ``"lora"`` or rsLoRA scaling), so plain LoRA files stay readable by older convlora. Files of
versions 1 and 2 load as method ``"lora"``; version-1 files (no ``bias``) are still read.
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
from .config import alpha_problem
from .errors import (
    AdapterFormatError,
    AdapterMismatchError,
    ConvLoRAError,
    FingerprintMismatchError,
)
from .fingerprint import base_mismatch, dtype_name, fingerprint, sketch
from .functional import FACTORIZATIONS, factorization_problem, max_rank
from .layer import LoRALayer
from .management import lora_state_dict
from .methods import METHODS, factor_shapes, method_delta, method_problem, scale_for
from .surgery import adapt_problems, lora_layers, replace_module
from .trainable import BIAS_MODES, BiasMode, bias_names, check_bias_mode
from .wrappers import WRAPPER_PREFIXES, refuse_distributed, unwrap

__all__ = ["FORMAT", "FORMAT_VERSION", "READABLE_VERSIONS", "load_adapter", "read_adapter",
           "save_adapter"]

FORMAT = "convlora.adapter"
FORMAT_VERSION = "3"  # written only when a layer needs "method"/"rslora"; else "2"
READABLE_VERSIONS = ("1", "2", "3")  # "1": no bias mode recorded (biases saved = the trainable ones)


def _layer_meta(layer: LoRALayer, name: str) -> dict[str, Any]:
    meta: dict[str, Any] = {"type": layer.base_type, "weight_shape": list(layer.weight.shape),
                            "groups": layer.groups, "rank": layer.rank[name],
                            "alpha": layer.alpha[name], "factorization": layer.factorization[name],
                            "dropout": layer.dropout[name],
                            "base_dtype": dtype_name(layer.base_weight().dtype),
                            "method": layer.method[name], "rslora": layer.rslora[name]}
    if layer.ndim:
        meta.update(stride=list(layer.stride), dilation=list(layer.dilation),
                    padding=layer.padding if isinstance(layer.padding, str) else list(layer.padding),
                    padding_mode=layer.padding_mode)
    return meta


def save_adapter(model: nn.Module, path: str | os.PathLike[str], *, name: str = "default",
                 bias: BiasMode = "none", metadata: dict[str, Any] | None = None) -> Path:
    """Write adapter ``name`` of ``model`` to a ``.safetensors`` file (atomically).

    Args:
        model: A model with LoRA layers (a ``torch.compile``/``nn.DataParallel`` wrapper is
            looked through: the file names the unwrapped model's layers).
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
    model = unwrap(model)  # files name the unwrapped model's layers (no _orig_mod./module.)
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
    entries = {n: _layer_meta(lyr, name) for n, lyr in layers.items()}
    plain = all(e["method"] == "lora" and not e["rslora"] for e in entries.values())
    if plain:  # version 2 holds them exactly: keep the file readable by older convlora
        for e in entries.values():
            del e["method"], e["rslora"]
    meta = {"format": FORMAT, "format_version": "2" if plain else FORMAT_VERSION,
            "convlora_version": __version__, "adapter_name": name, "layers": json.dumps(entries),
            "bias": bias, "bias_keys": json.dumps(bias_keys), "base_fingerprint": fingerprint(bases),
            "base_sketch": json.dumps(sketch(bases)), "user": user}
    return write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _is_int(x: object, low: int = 0) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= low


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


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
                                         f"found {_short(entry)}.")
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
                and offsets[0] <= offsets[1]):
            raise AdapterFormatError(f"{path}: tensor {key!r} has no valid data_offsets in the header "
                                     f"(found {_short(entry)}).")
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
        return f"not a JSON object ({_short(lm)})"
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
        "dropout": _is_number(lm.get("dropout", 0.0)) and 0 <= lm.get("dropout", 0.0) < 1,
        "base_dtype": lm.get("base_dtype", "float32") in _DTYPES,
        "rslora": isinstance(lm.get("rslora", False), bool),
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
        return (f"unknown method {_short(method, 40)}; this convlora ({__version__}) knows {METHODS}. "
                "Upgrade convlora to load it")
    if not bad:
        return None
    values = ", ".join(f"{k}={_short(lm.get(k, '<missing>'), 40)}" for k in bad)
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
        raise AdapterFormatError(f"{path}: metadata adapter_name={_short(name)} is not a Python identifier.")
    if not isinstance(meta.get("convlora_version"), str):
        raise AdapterFormatError(f"{path}: metadata lacks the convlora_version string.")
    if not isinstance(meta["user"], dict):
        raise AdapterFormatError(f"{path}: metadata 'user' must be a JSON object, found {_short(meta['user'])}.")
    if not isinstance(layers, dict) or not layers:
        raise AdapterFormatError(f"{path}: metadata 'layers' must be a non-empty JSON object, "
                                 f"found {_short(layers)}.")
    for lname, lm in layers.items():
        if not _layer_name_ok(lname):
            raise AdapterFormatError(f"{path}: metadata 'layers' names a layer {lname!r}, which is not "
                                     "a dotted module name.")
        problem = _layer_problem(lm)
        if problem:
            raise AdapterFormatError(f"{path}: metadata of layer {lname!r}: {problem}.")
        lm.setdefault("method", "lora")  # versions 1 and 2 hold LoRA adapters only
        lm.setdefault("rslora", False)
    if not isinstance(keys, list) or not all(
            isinstance(k, str) and k.rpartition(".")[2] == "bias" and _layer_name_ok(k) for k in keys) \
            or len(set(keys)) != len(keys):
        raise AdapterFormatError(f"{path}: metadata 'bias_keys' must be a list of distinct "
                                 f"'<module>.bias' names, found {_short(keys, 200)}.")
    sk = meta["base_sketch"]
    if not isinstance(sk, dict) or set(sk) != set(layers) or not all(
            isinstance(v, list) and len(v) >= 2 and all(_is_number(x) for x in v) for v in sk.values()):
        raise AdapterFormatError(f"{path}: metadata 'base_sketch' must map layers to lists of numbers, "
                                 f"found {_short(sk)}.")
    fp = meta.get("base_fingerprint")
    if not isinstance(fp, str) or len(fp) != 64 or any(c not in "0123456789abcdef" for c in fp):
        raise AdapterFormatError(f"{path}: metadata base_fingerprint={_short(fp)} is not a SHA-256 hex digest.")
    if meta["format_version"] == "1":
        meta["bias"] = None  # not recorded: version 1 saved the biases that were trainable
        return meta
    bias = meta.get("bias")
    if bias not in BIAS_MODES:
        raise AdapterFormatError(f"{path}: metadata bias={_short(bias)} is not one of {BIAS_MODES}.")
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
        problem = problem or method_problem(lm["method"], lm["factorization"], shape, lm["groups"], lm["rank"])
        limit = max_rank(lm["factorization"], shape, lm["groups"])
        if problem is None and lm["method"] in ("lora", "dora") and lm["rank"] > limit:
            problem = f"rank={lm['rank']} exceeds {limit} for weight {list(shape)}"
        if problem:
            raise AdapterFormatError(f"{path}: metadata of layer {lname!r}: {problem}.")
        specs[lname] = factor_shapes(lm["method"], lm["factorization"], shape, lm["rank"], lm["groups"],
                                     lm["type"].startswith("ConvTranspose"))
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
                                 f"(format={_short(raw.get('format'))}, expected {FORMAT!r}).")
    version = raw.get("format_version")
    if version not in READABLE_VERSIONS:
        raise AdapterFormatError(f"{path} has adapter format version {_short(version)}; convlora "
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


def _unprefixed(model: nn.Module, tensors: dict[str, Tensor], meta: dict[str, Any]
                ) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """A file saved through a wrapper by an older convlora names ``_orig_mod.x`` / ``module.x``:
    strip those prefixes when that, and only that, makes every layer name fit ``model``."""
    modules = dict(model.named_modules())
    names = list(meta["layers"])
    prefix = ""
    while not all(n[len(prefix):] in modules for n in names):
        nxt = next((p for p in WRAPPER_PREFIXES if all(n[len(prefix):].startswith(p) for n in names)), None)
        if nxt is None:
            return tensors, meta
        prefix += nxt
    if not prefix or not all(k.startswith(prefix) for k in [*tensors, *meta["bias_keys"]]):
        return tensors, meta
    meta = dict(meta)
    meta["layers"] = {n[len(prefix):]: v for n, v in meta["layers"].items()}
    meta["base_sketch"] = {n[len(prefix):]: v for n, v in meta["base_sketch"].items()}
    meta["bias_keys"] = [k[len(prefix):] for k in meta["bias_keys"]]
    return {k[len(prefix):]: v for k, v in tensors.items()}, meta


def _check(model: nn.Module, tensors: dict[str, Tensor], meta: dict[str, Any], name: str,
           path: Path) -> list[str]:
    """Validate everything against the model before touching it; returns fingerprint problems."""
    modules = dict(model.named_modules())
    layers: dict[str, dict[str, Any]] = meta["layers"]
    missing_mod = [n for n in layers if n not in modules]
    if missing_mod:
        raise AdapterMismatchError(f"{path}: adapter layers not found in the model: {missing_mod[:10]}"
                                   " (is this adapter for another model?).")
    problems: list[str] = []
    plain = [n for n in layers if not isinstance(modules[n], LoRALayer)
             and isinstance(getattr(modules[n], "weight", None), Tensor)]
    refused = adapt_problems(model, plain)
    for lname, lm in layers.items():
        mod = modules[lname]
        if isinstance(mod, LoRALayer):
            mod.check_can_load(lname, name)
        kind = mod.base_type if isinstance(mod, LoRALayer) else type(mod).__name__
        weight = getattr(mod, "weight", None)
        if not isinstance(weight, Tensor) or list(weight.shape) != lm["weight_shape"] or kind != lm["type"]:
            got = list(weight.shape) if isinstance(weight, Tensor) else None
            problems.append(f"{lname}: the adapter expects a {lm['type']} of weight {lm['weight_shape']}, "
                            f"the model has {kind} of weight {got}")
            continue
        groups = int(getattr(mod, "groups", 1))
        reason = refused.get(lname)
        if reason is None and groups != lm["groups"]:
            reason = f"groups={groups} in the model, {lm['groups']} in the file"
        if reason:
            problems.append(f"{lname}: {reason}")
    for key in meta["bias_keys"]:
        owner = modules.get(key.rpartition(".")[0]) if "." in key else model
        b = owner._parameters.get("bias") if owner is not None else None
        if b is None:
            problems.append(f"{key}: not a bias parameter of this model")
        elif b.shape != tensors[key].shape:
            problems.append(f"{key}: the model's bias has shape {tuple(b.shape)}, the file's "
                            f"{tuple(tensors[key].shape)}")
    if problems:
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        raise AdapterMismatchError(f"{path} does not fit this model: " + "; ".join(problems[:10]) + more)
    bases = {n: (m.base_weight() if isinstance(m, LoRALayer) else m.weight)
             for n, m in ((n, modules[n]) for n in layers)}
    mismatch = base_mismatch(bases, meta["base_fingerprint"], meta["base_sketch"],
                             {n: lm.get("base_dtype") for n, lm in layers.items()})
    if mismatch:
        return [f"{path}: the base weights differ from the ones adapter {name!r} was trained on "
                f"({mismatch})"]
    return []


def _adapter_names(model: nn.Module) -> list[str]:
    return sorted({a for layer in lora_layers(model).values() for a in layer.rank})


def load_adapter(model: nn.Module, path: str | os.PathLike[str], *, name: str | None = None,
                 strict: bool = True) -> str:
    """Load an adapter file into ``model`` as adapter ``name`` and make it active.

    Layers that are not LoRA layers yet are injected from the file's metadata (they take the
    train/eval mode of the layers they replace). Every field of the file, and its fit to the
    model, is checked before the model is touched; if anything still fails while loading, the
    changes made so far are undone. So when an error is raised, the model's module types,
    parameters and state-dict keys are exactly as before.

    Args:
        model: The base model (plain or already with LoRA layers; a ``torch.compile`` /
            ``nn.DataParallel`` wrapper is looked through, DistributedDataParallel is refused:
            load before wrapping).
        path: A file written by [`save_adapter`][convlora.save_adapter].
        name: Adapter name on the model (default: the name stored in the file).
        strict: Raise on a base-weight fingerprint mismatch (else warn and load anyway).

    Returns:
        The adapter's name on the model.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        AdapterFormatError: the file is malformed (the message names the field and value).
        AdapterMismatchError: a well-formed file that does not fit this model.
        FingerprintMismatchError: the base weights are not the ones it was trained on.
        MergeStateError: a layer is merged.
    """
    refuse_distributed(model, "load_adapter")
    model = unwrap(model)
    path = Path(path)
    tensors, meta = read_adapter(path)
    name = name or meta["adapter_name"]
    if not isinstance(name, str) or not name.isidentifier():
        raise ConvLoRAError(f"load_adapter(): name={name!r} must be a Python identifier.")
    tensors, meta = _unprefixed(model, tensors, meta)
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
    _apply(model, tensors, meta, name)
    return name


def _apply(model: nn.Module, tensors: dict[str, Tensor], meta: dict[str, Any], name: str) -> None:
    """Inject and fill adapter ``name``; on any error, undo what was done and re-raise."""
    modules = dict(model.named_modules())
    active = {id(layer): layer.active_adapter for layer in lora_layers(model).values()}
    biases = {key: model.get_parameter(key).detach().clone() for key in meta["bias_keys"]}
    replaced: list[tuple[str, nn.Module]] = []
    added: list[LoRALayer] = []
    try:
        for lname, lm in meta["layers"].items():
            layer = modules[lname]
            if not isinstance(layer, LoRALayer):
                layer = LoRALayer(layer)
                replace_module(model, lname, layer)
                replaced.append((lname, modules[lname]))
            layer.add_adapter(name, lm["rank"], lm["alpha"], lm["factorization"],
                              lm.get("dropout", 0.0), lname, lm["method"], lm["rslora"])
            added.append(layer)
            with torch.no_grad():
                for factor, param in layer.factors(name).items():
                    param.copy_(tensors[f"{lname}.{factor}"])
        with torch.no_grad():
            for key in meta["bias_keys"]:
                model.get_parameter(key).copy_(tensors[key])
        for layer in lora_layers(model).values():
            layer.active_adapter = name if name in layer.rank else None
    except BaseException:
        for layer in added:
            if name in layer.rank:
                layer.delete_adapter(name)
        for lname, original in reversed(replaced):
            replace_module(model, lname, original)
        with torch.no_grad():
            for key, value in biases.items():
                model.get_parameter(key).copy_(value)
        for layer in lora_layers(model).values():
            layer.active_adapter = active.get(id(layer), layer.active_adapter)
        raise
