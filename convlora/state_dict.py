"""Plain state-dict files: one reader and one writer for ``.safetensors`` and ``.pth``, and
merging an adapter file into a state dict without model code.

The format is chosen by the file's suffix. ``.safetensors`` is read and written through
safetensors only (it can never reach ``torch.load``); ``.pth``, ``.pt``, ``.bin`` and ``.ckpt``
are read with ``torch.load(weights_only=True)``, which refuses pickled code. Training
checkpoints often nest the weights; [load_state_dict][convlora.load_state_dict] unwraps them
(see there for the order).
"""

from __future__ import annotations

import os
import re
import struct
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from ._atomic import write_atomically
from .adapter_format import read_adapter
from .errors import AdapterMismatchError, FingerprintMismatchError, StateDictError
from .fingerprint import base_mismatch
from .methods import effective_weight, scale_for

__all__ = ["load_state_dict", "merge_state_dict", "save_state_dict"]

_NESTING_KEYS = ("params_ema", "params", "state_dict", "model")  # tried in this order

_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
_WRITE_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
_MAX_DEPTH = 4


def _describe(obj: object) -> str:
    if isinstance(obj, Mapping):
        keys = list(obj)
        more = f" and {len(keys) - 8} more" if len(keys) > 8 else ""
        return f"a dict with keys {[str(k) for k in keys[:8]]}{more}" if keys else "an empty dict"
    return f"a {type(obj).__name__}"


def _looks_like_safetensors(path: Path) -> bool:
    with path.open("rb") as fh:
        head = fh.read(9)
    return len(head) == 9 and struct.unpack("<Q", head[:8])[0] < path.stat().st_size and head[8:] == b"{"


def _torch_load(path: Path, map_location: str | torch.device) -> object:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for a bad file; name the file
        if _looks_like_safetensors(path):
            raise StateDictError(f"{path} holds safetensors data under a {path.suffix} name; "
                                 "rename it to .safetensors.") from None
        text = str(err)
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if found:
            raise StateDictError(f"{path} holds pickled Python objects ({found.group(1)}), which "
                                 "torch.load(weights_only=True) refuses; save a state dict "
                                 "(model.state_dict()) instead.") from None
        first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
        raise StateDictError(f"{path} is not a readable torch checkpoint "
                             f"({type(err).__name__}: {first[:200]}).") from None


def _safetensors_load(path: Path, map_location: str | torch.device) -> dict[str, Tensor]:
    try:
        return load_file(str(path), device=str(map_location))
    except Exception as err:  # noqa: BLE001 - SafetensorError and friends: name the file
        with path.open("rb") as fh:
            head = fh.read(4)
        hint = ("; it looks like a torch checkpoint: rename it to .pth"
                if head[:2] == b"PK" or head[:1] == b"\x80" else "")
        raise StateDictError(f"{path} is not a readable safetensors file ({err}){hint}.") from None


def _unwrap(obj: object, path: Path, key: str | None) -> Mapping[Any, Any]:
    if key is not None:
        if not isinstance(obj, Mapping) or key not in obj:
            raise StateDictError(f"{path}: key={key!r} is not in the checkpoint, which holds "
                                 f"{_describe(obj)}.")
        obj = obj[key]
    for _ in range(_MAX_DEPTH):
        if not isinstance(obj, Mapping):
            break
        if any(isinstance(v, Tensor) for v in obj.values()):
            return obj
        found = next((k for k in _NESTING_KEYS if k in obj), None)
        if found is None:
            break
        obj = obj[found]
    raise StateDictError(f"{path} holds {_describe(obj)}, not a state dict (a dict of tensors, "
                         f"possibly nested under one of {list(_NESTING_KEYS)}); pass key= to choose "
                         "the entry that holds the weights.")


def load_state_dict(path: str | os.PathLike[str], *, key: str | None = None,
                    map_location: str | torch.device = "cpu",
                    strip_prefix: str = "module.") -> dict[str, Tensor]:
    """Read a state dict (``{name: tensor}``) from a ``.safetensors`` or torch checkpoint file.

    The suffix chooses the reader: ``.safetensors`` goes through safetensors (never
    ``torch.load``); ``.pth``, ``.pt``, ``.bin`` and ``.ckpt`` through
    ``torch.load(weights_only=True)``. A torch checkpoint whose top level holds no tensor is
    unwrapped through the first of these keys it holds -- ``params_ema`` (the exponential moving average that BasicSR-style trainers store next to
    ``params`` and evaluate with), ``params``, ``state_dict`` (Lightning and most training
    scripts), ``model`` -- repeatedly, up to four levels.

    Args:
        path: The file.
        key: Take the weights from this top-level entry instead of the first nesting key found
            (e.g. ``key="params"`` for the raw weights of a BasicSR checkpoint); the entry is
            unwrapped further in the same way.
        map_location: Device the tensors are loaded to.
        strip_prefix: Removed from every key when *every* key starts with it (the ``module.``
            that ``DataParallel``/``DistributedDataParallel`` add); ``""`` keeps keys unchanged.

    Returns:
        A new dict of tensors (a torch file keeps its order; safetensors files store none).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        StateDictError: unknown suffix, unreadable file, or no dict of tensors found (the
            message names the file and what it holds).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".safetensors", *_TORCH_SUFFIXES):
        raise StateDictError(f"{path}: unknown state-dict suffix {path.suffix!r}; use .safetensors "
                             f"or one of {', '.join(_TORCH_SUFFIXES)}.")
    if not path.is_file():
        raise FileNotFoundError(f"state-dict file {str(path)!r} does not exist.")
    if suffix == ".safetensors":
        if key is not None:
            raise StateDictError(f"{path}: key={key!r} applies to torch checkpoints; a safetensors "
                                 "file is always a flat state dict.")
        state: Mapping[Any, Any] = _safetensors_load(path, map_location)
    else:
        state = _unwrap(_torch_load(path, map_location), path, key)
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise StateDictError(f"{path}: the state dict has {len(bad)} entries that are not "
                             f"name -> tensor pairs, e.g. {[str(k) for k in bad[:3]]}.")
    if strip_prefix and state and all(k.startswith(strip_prefix) for k in state):
        return {k[len(strip_prefix):]: v for k, v in state.items()}
    return dict(state)


def _plain_tensors(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """CPU, contiguous tensors that own their memory (safetensors refuses shared storage)."""
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise StateDictError(f"save_state_dict(): {len(bad)} entries are not name -> tensor pairs, "
                             f"e.g. {[str(k) for k in bad[:3]]}.")
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for k, v in state.items():
        t = v.detach().cpu().contiguous()
        storage = t.untyped_storage()
        whole = storage.nbytes() == t.numel() * t.element_size()
        if storage.data_ptr() in seen or not whole:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[k] = t
    return out


def save_state_dict(state: Mapping[str, Tensor], path: str | os.PathLike[str]) -> Path:
    """Write a state dict in the format ``path``'s suffix names, atomically.

    ``.safetensors`` is written with safetensors; ``.pth``, ``.pt`` and ``.bin`` with
    ``torch.save`` of a plain dict of CPU tensors (readable with ``weights_only=True``). Any other
    suffix is refused before anything is written.

    Args:
        state: ``{name: tensor}``.
        path: Destination file; missing parent folders are created.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        StateDictError: an unknown suffix, or an entry that is not a name -> tensor pair.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _WRITE_SUFFIXES:
        raise StateDictError(f"{path}: unknown state-dict suffix {path.suffix!r}; write "
                             f"{', '.join(_WRITE_SUFFIXES)}.")
    tensors = _plain_tensors(state)
    if suffix == ".safetensors":
        return write_atomically(path, lambda tmp: save_file(tensors, tmp))
    return write_atomically(path, lambda tmp: torch.save(tensors, tmp))


def merge_state_dict(base: Mapping[str, Tensor], adapter_path: str | os.PathLike[str], *,
                     strict: bool = True) -> dict[str, Tensor]:
    """Fold an adapter file into a plain state dict (``<layer>.weight`` keys), without model code.

    The delta is added in at least float32 (float64 for a float64 weight) and cast back to each
    weight's dtype, exactly as [merge][convlora.merge] does; biases stored in the adapter replace the base's. The result
    equals the state dict of [unload][convlora.unload] applied to the model with the adapter.

    Args:
        base: The base model's state dict (e.g. from [load_state_dict][convlora.load_state_dict]);
            it is not modified.
        adapter_path: A file written by [save_adapter][convlora.save_adapter].
        strict: Raise when the base weights are not the ones the adapter was trained on; with
            ``False``, warn and merge anyway.

    Returns:
        A new state dict with the merged weights.

    Raises:
        AdapterMismatchError: a layer's weight or a bias is missing or of another shape.
        FingerprintMismatchError: other base weights (unless ``strict=False``).
    """
    tensors, meta = read_adapter(adapter_path)
    layers = meta["layers"]
    problems = []
    for lname, lm in layers.items():
        w = base.get(f"{lname}.weight")
        if not isinstance(w, Tensor) or list(w.shape) != lm["weight_shape"]:
            problems.append(f"{lname}.weight: expected shape {lm['weight_shape']}, "
                            f"found {list(w.shape) if isinstance(w, Tensor) else None}")
        elif not w.is_floating_point():
            problems.append(f"{lname}.weight: dtype {w.dtype} is not floating point")
    for key in meta["bias_keys"]:
        if key not in base or base[key].shape != tensors[key].shape:
            problems.append(f"{key}: missing or of another shape in the base")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise AdapterMismatchError(f"{adapter_path} does not fit these weights: "
                                   + "; ".join(problems[:5]) + more + ".")
    bases = {n: base[f"{n}.weight"] for n in layers}
    mismatch = base_mismatch(bases, meta["base_fingerprint"], meta["base_sketch"],
                             {n: lm.get("base_dtype") for n, lm in layers.items()})
    if mismatch:
        msg = f"{adapter_path} was trained on other base weights ({mismatch})"
        if strict:
            raise FingerprintMismatchError(msg + "; pass strict=False (convlora merge --force) "
                                           "to merge anyway.")
        warnings.warn(msg, stacklevel=2)
    out = dict(base)
    for lname, lm in layers.items():
        w = base[f"{lname}.weight"]
        factors = {k.rpartition(".")[2]: t for k, t in tensors.items()
                   if k.rpartition(".")[0] == lname and k.rpartition(".")[2] != "bias"}
        out[f"{lname}.weight"] = effective_weight(
            lm["method"], w, factors, scale_for(lm["alpha"], lm["rank"], lm["rslora"]), lm["groups"],
            lm["type"].startswith("ConvTranspose"))
    for key in meta["bias_keys"]:
        out[key] = tensors[key].to(base[key].dtype)
    return out
