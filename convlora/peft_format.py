"""PEFT adapter folders on disk: the two files, the config fields, reading and writing a folder.

A PEFT LoRA folder holds ``adapter_config.json`` and ``adapter_model.safetensors``. Its tensor keys
sit under ``base_model.model.``: ``<layer>.lora_A.weight`` / ``lora_B.weight`` for the factors,
``<layer>.lora_magnitude_vector`` for DoRA's magnitude (``use_dora: true``; shape ``(out,)`` for
``nn.Linear``, ``(1, out, 1...)`` for a conv), ``<layer>.base_layer.bias`` (adapted layers) or
``<module>.bias`` for trained biases, and ``<module>.<key>`` for whole-module copies
(``modules_to_save``).

Every field of ``adapter_config.json`` is honoured, ignored because it only affects how PEFT
initialises or runs training (``init_lora_weights`` True/False/"gaussian"/"orthogonal"/"eva",
``inference_mode``, ``task_type``, ...), or refused with a one-line
[AdapterFormatError][convlora.AdapterFormatError] naming it (``lora_bias``,
``fan_in_fan_out``, base-modifying initialisations such as PiSSA, unknown fields that are set).
[read_peft_adapter][convlora.peft_format.read_peft_adapter] validates a folder without a model;
what its factors mean for convlora's layers is ``convlora.peft_mapping``.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from ._values import is_number, short_repr
from .errors import AdapterFormatError, ConvLoRAError
from .trainable import BIAS_MODES

__all__ = ["PEFT_CONFIG", "PEFT_PREFIX", "PEFT_WEIGHTS", "config_error", "read_peft_adapter", "write_peft_folder"]

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."

# Fields that only shape how PEFT initialises or trains an adapter, or name the base it came
# from: the loaded factors do not depend on them.
_IGNORED = {
    "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "megatron_core", "qalora_group_size", "runtime_config", "loftq_config",
    "eva_config", "corda_config", "lora_ga_config", "ensure_weight_tying", "init_lora_weights",
}
# Fields convlora honours (read below).
_HONOURED = {
    "peft_type", "r", "lora_alpha", "target_modules", "exclude_modules", "layers_to_transform",
    "layers_pattern", "rank_pattern", "alpha_pattern", "use_rslora", "bias", "modules_to_save",
    "lora_dropout", "use_dora",
}
# Fields that change what the adapter computes in ways convlora does not implement: refused
# unless off (null, false or empty).
_REFUSED = {
    "lora_bias": "lora_B carries its own bias; convlora adapters have none (merge it in PEFT first)",
    "fan_in_fan_out": "it is for transformers' Conv1D layers, which convlora does not adapt",
    "megatron_config": "Megatron parallel layers are not convlora layers",
    "trainable_token_indices": "trainable embedding tokens are not conv/linear adapters",
    "velora_config": "VeLoRA changes the adapter's forward",
    "alora_invocation_tokens": "activated LoRA depends on input tokens",
    "use_qalora": "QA-LoRA pools inputs of quantised layers",
    "monteclora_config": "MonteCLoRA samples its factors",
    "layer_replication": "it duplicates base layers",
    "target_parameters": "it adapts raw nn.Parameters, not conv/linear layers",
    "use_bdlora": "block-diagonal LoRA shares factors differently",
    "arrow_config": "Arrow routes between several adapters",
    "kasa_config": "KaSA changes the adapter's forward",
}
_INITS = (True, False, "gaussian", "orthogonal", "eva")
_BASE_MODIFYING = ("pissa", "olora", "corda", "lora_ga", "loftq")


def config_error(where: Path, field: str, value: object, why: str) -> AdapterFormatError:
    """The one-line error for ``field=value`` of the ``adapter_config.json`` at ``where``."""
    return AdapterFormatError(f"{where}: {PEFT_CONFIG} field {field!r}={short_repr(value)} {why}.")


def _is_off(value: object) -> bool:
    return value is None or value is False or (isinstance(value, (list, dict, str)) and not value)


def _str_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _check_regex(where: Path, field: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as err:
        raise config_error(where, field, pattern, f"is not a valid regular expression ({err})") from None


def _parse_config(raw: object, where: Path) -> dict[str, Any]:
    """Validate a decoded ``adapter_config.json``; returns the honoured fields, normalised."""
    if not isinstance(raw, dict):
        raise AdapterFormatError(f"{where}: {PEFT_CONFIG} is not a JSON object.")
    for field, value in raw.items():
        if field in _REFUSED and not _is_off(value):
            raise config_error(where, field, value, f"is not supported: {_REFUSED[field]}")
        if field not in _REFUSED and field not in _IGNORED and field not in _HONOURED \
                and not _is_off(value):
            raise config_error(where, field, value, "is unknown to convlora, so it cannot honour it")
    if raw.get("peft_type") != "LORA":
        raise config_error(where, "peft_type", raw.get("peft_type"), "is not 'LORA'; convlora reads LoRA adapters")
    init = raw.get("init_lora_weights", True)
    if isinstance(init, str) and init.startswith(_BASE_MODIFYING):
        raise config_error(where, "init_lora_weights", init, "modifies the base weights at initialisation, so the "
                           "adapter only fits that modified base; convert it with PEFT's "
                           "path_initial_model_for_weight_conversion first")
    if init not in _INITS:
        raise config_error(where, "init_lora_weights", init, f"is not one of {_INITS}, which only set initial values")
    cfg: dict[str, Any] = {}
    r = raw.get("r", 8)
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise config_error(where, "r", r, "must be an integer >= 1")
    alpha = raw.get("lora_alpha", 8)
    if not is_number(alpha) or alpha <= 0:
        raise config_error(where, "lora_alpha", alpha, "must be a positive number")
    cfg["r"], cfg["lora_alpha"] = r, alpha
    for field, check, what in (("rank_pattern", lambda v: isinstance(v, int) and not isinstance(v, bool)
                                and v >= 1, "integers >= 1"),
                               ("alpha_pattern", lambda v: is_number(v) and v > 0, "positive numbers")):
        pat = raw.get(field) or {}
        if not isinstance(pat, dict) or not all(check(v) for v in pat.values()):
            raise config_error(where, field, pat, f"must map patterns to {what}")
        for key in pat:
            _check_regex(where, field, key)
        cfg[field] = pat
    targets = raw.get("target_modules")
    if targets == "all-linear" or targets is None:
        raise config_error(where, "target_modules", targets, "is resolved by PEFT from a transformers model "
                           "type; list the layers or give a regular expression")
    if isinstance(targets, str):
        _check_regex(where, "target_modules", targets)
    elif not _str_list(targets):
        raise config_error(where, "target_modules", targets, "must be a regular expression or a list of names")
    cfg["target_modules"] = targets
    exclude = raw.get("exclude_modules")
    if isinstance(exclude, str):
        _check_regex(where, "exclude_modules", exclude)
    elif exclude is not None and not _str_list(exclude):
        raise config_error(where, "exclude_modules", exclude, "must be a regular expression or a list of names")
    cfg["exclude_modules"] = exclude
    layers = raw.get("layers_to_transform")
    if not (layers is None or (isinstance(layers, int) and not isinstance(layers, bool)) or (
            isinstance(layers, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in layers))):
        raise config_error(where, "layers_to_transform", layers, "must be an integer or a list of integers")
    pattern = raw.get("layers_pattern")
    if isinstance(pattern, str):
        pattern = [pattern]
    if not (pattern is None or _str_list(pattern)):
        raise config_error(where, "layers_pattern", pattern, "must be a name or a list of names")
    if isinstance(targets, str) and not (_is_off(layers) and _is_off(pattern)):
        raise config_error(where, "layers_to_transform", layers, "cannot be used with a regular-expression "
                           "target_modules (PEFT refuses it too)")
    for p in pattern or []:
        _check_regex(where, "layers_pattern", p)
    cfg["layers_to_transform"], cfg["layers_pattern"] = layers, pattern
    use_rslora = raw.get("use_rslora", False)
    if not isinstance(use_rslora, bool):
        raise config_error(where, "use_rslora", use_rslora, "must be true or false")
    cfg["use_rslora"] = use_rslora
    use_dora = False if raw.get("use_dora") is None else raw["use_dora"]
    if not isinstance(use_dora, bool):
        raise config_error(where, "use_dora", use_dora, "must be true or false")
    cfg["use_dora"] = use_dora
    bias = raw.get("bias", "none")
    if bias not in BIAS_MODES:
        raise config_error(where, "bias", bias, f"is not one of {BIAS_MODES}")
    cfg["bias"] = bias
    mts = raw.get("modules_to_save")
    if not (mts is None or _str_list(mts)):
        raise config_error(where, "modules_to_save", mts, "must be a list of module names")
    for m in mts or []:
        _check_regex(where, "modules_to_save", m)
    cfg["modules_to_save"] = list(mts or [])
    dropout = raw.get("lora_dropout", 0.0)
    if not is_number(dropout) or not 0.0 <= dropout < 1.0:
        raise config_error(where, "lora_dropout", dropout, "must be a number in [0, 1)")
    cfg["lora_dropout"] = float(dropout)
    return cfg


def read_peft_adapter(folder: str | os.PathLike[str]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read and validate a PEFT LoRA folder.

    Args:
        folder: A folder with ``adapter_config.json`` and ``adapter_model.safetensors``.

    Returns:
        ``(tensors, config)``: the tensors with the ``base_model.model.`` prefix removed, and the
        honoured config fields, validated and normalised (``rank_pattern``/``alpha_pattern``
        always dicts, ``modules_to_save`` always a list, ``layers_pattern`` a list or ``None``,
        ``use_rslora``/``use_dora`` booleans).

    Raises:
        FileNotFoundError: the folder or one of its two files does not exist.
        AdapterFormatError: malformed JSON, a field convlora refuses or cannot read (the message
            names it and its value), or weights that are not safetensors.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"PEFT adapter folder {str(folder)!r} does not exist.")
    cfg_path, weights = folder / PEFT_CONFIG, folder / PEFT_WEIGHTS
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{folder} has no {PEFT_CONFIG}; is it a PEFT adapter folder?")
    if not weights.is_file():
        other = " (it has adapter_model.bin: convlora reads safetensors only; re-save it with " \
                "save_pretrained(safe_serialization=True))" if (folder / "adapter_model.bin").exists() else ""
        raise FileNotFoundError(f"{folder} has no {PEFT_WEIGHTS}{other}.")
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdapterFormatError(f"{cfg_path} is not valid JSON ({err}).") from None
    cfg = _parse_config(raw, cfg_path)
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterFormatError(f"{weights} could not be read as safetensors: {err}") from None
    foreign = [k for k in tensors if not k.startswith(PEFT_PREFIX)]
    if foreign:
        raise AdapterFormatError(f"{weights}: keys {foreign[:3]} do not start with {PEFT_PREFIX!r}, "
                                 "as PEFT's keys do.")
    return {k[len(PEFT_PREFIX):]: v for k, v in tensors.items()}, cfg


def _new_folder(folder: Path, write: Callable[[Path], None]) -> Path:
    """Write a fresh folder through a temporary sibling and one rename (no partial output)."""
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise ConvLoRAError(f"{folder} already exists and is not an empty folder; convlora does not "
                            "overwrite it. Choose a new folder or remove it first.")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.{secrets.token_hex(6)}.tmp"
    tmp.mkdir()
    try:
        write(tmp)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return folder


def write_peft_folder(folder: Path, config: dict[str, Any], tensors: dict[str, Tensor]) -> Path:
    """Write ``config`` and ``tensors`` (keys already prefixed) as the new PEFT folder ``folder``."""
    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})
        (tmp / PEFT_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n",
                                       encoding="utf-8")
    return _new_folder(folder, write)

