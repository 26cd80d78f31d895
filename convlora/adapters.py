"""Adapters on a model: save one to an adapter file, load one from a file into a model.

The file format, and reading a file with every field validated, is ``convlora.adapter_format``;
[save_adapter][convlora.save_adapter] writes it from a model's LoRA layers and
[load_adapter][convlora.load_adapter] checks a file's fit to a model before it touches the model.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from ._atomic import write_atomically
from ._version import __version__
from .adapter_format import FORMAT, FORMAT_VERSION, read_adapter
from .errors import AdapterMismatchError, ConvLoRAError, FingerprintMismatchError
from .fingerprint import base_mismatch, dtype_name, fingerprint, sketch
from .layer import LoRALayer
from .management import lora_state_dict
from .surgery import adapt_problems, lora_layers, replace_module
from .trainable import BiasMode, bias_names, check_bias_mode
from .wrappers import WRAPPER_PREFIXES, refuse_distributed, unwrap

__all__ = ["load_adapter", "save_adapter"]


def _layer_meta(layer: LoRALayer, name: str) -> dict[str, Any]:
    meta: dict[str, Any] = {"type": layer.base_type, "weight_shape": list(layer.weight.shape),
                            "groups": layer.groups, "rank": layer.rank[name],
                            "alpha": layer.alpha[name], "factorization": layer.factorization[name],
                            "dropout": layer.dropout[name],
                            "base_dtype": dtype_name(layer.base_weight().dtype),
                            "method": layer.method[name], "rslora": layer.rslora[name]}
    if layer.tucker[name]:  # only then: the entry stays what format version 3 holds
        meta["tucker"] = True
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
    # the oldest version that holds the file: older convlora reads it, or refuses it by version
    version = FORMAT_VERSION if any("tucker" in e for e in entries.values()) else "2" if plain else "3"
    meta = {"format": FORMAT, "format_version": version,
            "convlora_version": __version__, "adapter_name": name, "layers": json.dumps(entries),
            "bias": bias, "bias_keys": json.dumps(bias_keys), "base_fingerprint": fingerprint(bases),
            "base_sketch": json.dumps(sketch(bases)), "user": user}
    return write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


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
                              lm.get("dropout", 0.0), lname, lm["method"], lm["rslora"], lm["tucker"])
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
