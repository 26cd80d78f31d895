"""PEFT adapter folders: read what PEFT trains, write what PEFT loads, with the same outputs.

A PEFT LoRA folder holds ``adapter_config.json`` and ``adapter_model.safetensors``. For a conv
with ``groups=1``, PEFT's LoRA is convlora's ``"kernel"`` factorisation: ``lora_A`` is a
kernel-sized conv ``(r, in, *k)`` and ``lora_B`` a 1x1 conv ``(out, r, 1...)``; for
``nn.Linear`` the factors are ``(r, in)`` and ``(out, r)``. Keys sit under
``base_model.model.<layer>.lora_A.weight`` / ``lora_B.weight``; trained biases under
``base_model.model.<layer>.base_layer.bias`` (adapted layers) or ``base_model.model.<module>.bias``;
whole-module copies (``modules_to_save``) under ``base_model.model.<module>.<key>``.

Every field of ``adapter_config.json`` is honoured, ignored because it only affects how PEFT
initialises or runs training (``init_lora_weights`` True/False/"gaussian"/"orthogonal"/"eva",
``inference_mode``, ``task_type``, ...), or refused with a one-line
[AdapterFormatError][convlora.AdapterFormatError] naming it (``use_dora``, ``lora_bias``,
``fan_in_fan_out``, base-modifying initialisations such as PiSSA, unknown fields that are set).
``use_rslora`` maps exactly onto alpha: PEFT scales by ``lora_alpha / sqrt(r)``, convlora by
``alpha / rank``, so ``alpha = lora_alpha * sqrt(r)``.

PEFT is exact only for zero padding and dilation 1: its ``lora_A`` conv takes the base conv's
kernel size, stride and padding but neither its ``padding_mode`` nor its ``dilation``. Such
layers are refused both ways. For a grouped conv (``groups=g``) PEFT's ``lora_A`` is dense over
all input channels and ``lora_B`` is grouped (``r % g == 0``), which is a side path, not a weight
delta, unless ``lora_A`` is block-diagonal by group. Importing is therefore refused unless it is;
exporting a convlora grouped adapter of rank ``r`` is exact: rank ``r*g``, a block-diagonal
``lora_A`` repeating convlora's ``A`` per group, and convlora's ``B`` as the grouped ``lora_B``
(importing such a file gives back rank ``r`` and the same tensors, bit for bit). The
``"loralib"`` factorisation has no PEFT layout and is refused on export.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import shutil
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .adapter_format import read_adapter
from .adapters import save_adapter
from .errors import (
    AdapterFormatError,
    AdapterMismatchError,
    ConvLoRAError,
    UnsupportedLayerError,
)
from .layer import LoRALayer, unsupported_reason
from .surgery import lora_layers, replace_module
from .trainable import BIAS_MODES, BiasMode, bias_names, check_bias_mode

__all__ = [
    "PEFT_CONFIG",
    "PEFT_WEIGHTS",
    "convlora_to_peft",
    "load_peft_adapter",
    "peft_to_convlora",
    "read_peft_adapter",
    "save_peft_adapter",
]

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_CONV_TYPES = {"Conv1d": 1, "Conv2d": 2, "Conv3d": 3}

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
    "lora_dropout",
}
# Fields that change what the adapter computes in ways convlora does not implement: refused
# unless off (null, false or empty).
_REFUSED = {
    "use_dora": "DoRA rescales the weight by a learned magnitude; convlora has no DoRA layer",
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


def _fmt(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _bad(where: Path, field: str, value: object, why: str) -> AdapterFormatError:
    return AdapterFormatError(f"{where}: {PEFT_CONFIG} field {field!r}={_fmt(value)} {why}.")


def _is_off(value: object) -> bool:
    return value is None or value is False or (isinstance(value, (list, dict, str)) and not value)


def _str_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_regex(where: Path, field: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as err:
        raise _bad(where, field, pattern, f"is not a valid regular expression ({err})") from None


def _parse_config(raw: object, where: Path) -> dict[str, Any]:
    """Validate a decoded ``adapter_config.json``; returns the honoured fields, normalised."""
    if not isinstance(raw, dict):
        raise AdapterFormatError(f"{where}: {PEFT_CONFIG} is not a JSON object.")
    for field, value in raw.items():
        if field in _REFUSED and not _is_off(value):
            raise _bad(where, field, value, f"is not supported: {_REFUSED[field]}")
        if field not in _REFUSED and field not in _IGNORED and field not in _HONOURED \
                and not _is_off(value):
            raise _bad(where, field, value, "is unknown to convlora, so it cannot honour it")
    if raw.get("peft_type") != "LORA":
        raise _bad(where, "peft_type", raw.get("peft_type"), "is not 'LORA'; convlora reads LoRA adapters")
    init = raw.get("init_lora_weights", True)
    if isinstance(init, str) and init.startswith(_BASE_MODIFYING):
        raise _bad(where, "init_lora_weights", init, "modifies the base weights at initialisation, so the "
                   "adapter only fits that modified base; convert it with PEFT's "
                   "path_initial_model_for_weight_conversion first")
    if init not in _INITS:
        raise _bad(where, "init_lora_weights", init, f"is not one of {_INITS}, which only set initial values")
    cfg: dict[str, Any] = {}
    r = raw.get("r", 8)
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise _bad(where, "r", r, "must be an integer >= 1")
    alpha = raw.get("lora_alpha", 8)
    if not _number(alpha) or alpha <= 0:
        raise _bad(where, "lora_alpha", alpha, "must be a positive number")
    cfg["r"], cfg["lora_alpha"] = r, alpha
    for field, check, what in (("rank_pattern", lambda v: isinstance(v, int) and not isinstance(v, bool)
                                and v >= 1, "integers >= 1"),
                               ("alpha_pattern", lambda v: _number(v) and v > 0, "positive numbers")):
        pat = raw.get(field) or {}
        if not isinstance(pat, dict) or not all(check(v) for v in pat.values()):
            raise _bad(where, field, pat, f"must map patterns to {what}")
        for key in pat:
            _check_regex(where, field, key)
        cfg[field] = pat
    targets = raw.get("target_modules")
    if targets == "all-linear" or targets is None:
        raise _bad(where, "target_modules", targets, "is resolved by PEFT from a transformers model "
                   "type; list the layers or give a regular expression")
    if isinstance(targets, str):
        _check_regex(where, "target_modules", targets)
    elif not _str_list(targets):
        raise _bad(where, "target_modules", targets, "must be a regular expression or a list of names")
    cfg["target_modules"] = targets
    exclude = raw.get("exclude_modules")
    if isinstance(exclude, str):
        _check_regex(where, "exclude_modules", exclude)
    elif exclude is not None and not _str_list(exclude):
        raise _bad(where, "exclude_modules", exclude, "must be a regular expression or a list of names")
    cfg["exclude_modules"] = exclude
    layers = raw.get("layers_to_transform")
    if not (layers is None or (isinstance(layers, int) and not isinstance(layers, bool)) or (
            isinstance(layers, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in layers))):
        raise _bad(where, "layers_to_transform", layers, "must be an integer or a list of integers")
    pattern = raw.get("layers_pattern")
    if isinstance(pattern, str):
        pattern = [pattern]
    if not (pattern is None or _str_list(pattern)):
        raise _bad(where, "layers_pattern", pattern, "must be a name or a list of names")
    if isinstance(targets, str) and not (_is_off(layers) and _is_off(pattern)):
        raise _bad(where, "layers_to_transform", layers, "cannot be used with a regular-expression "
                   "target_modules (PEFT refuses it too)")
    for p in pattern or []:
        _check_regex(where, "layers_pattern", p)
    cfg["layers_to_transform"], cfg["layers_pattern"] = layers, pattern
    use_rslora = raw.get("use_rslora", False)
    if not isinstance(use_rslora, bool):
        raise _bad(where, "use_rslora", use_rslora, "must be true or false")
    cfg["use_rslora"] = use_rslora
    bias = raw.get("bias", "none")
    if bias not in BIAS_MODES:
        raise _bad(where, "bias", bias, f"is not one of {BIAS_MODES}")
    cfg["bias"] = bias
    mts = raw.get("modules_to_save")
    if not (mts is None or _str_list(mts)):
        raise _bad(where, "modules_to_save", mts, "must be a list of module names")
    for m in mts or []:
        _check_regex(where, "modules_to_save", m)
    cfg["modules_to_save"] = list(mts or [])
    dropout = raw.get("lora_dropout", 0.0)
    if not _number(dropout) or not 0.0 <= dropout < 1.0:
        raise _bad(where, "lora_dropout", dropout, "must be a number in [0, 1)")
    cfg["lora_dropout"] = float(dropout)
    return cfg


def read_peft_adapter(folder: str | os.PathLike[str]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read and validate a PEFT LoRA folder.

    Args:
        folder: A folder with ``adapter_config.json`` and ``adapter_model.safetensors``.

    Returns:
        ``(tensors, config)``: the tensors with the ``base_model.model.`` prefix removed, and the
        honoured config fields, validated and normalised (``rank_pattern``/``alpha_pattern``
        always dicts, ``modules_to_save`` always a list, ``layers_pattern`` a list or ``None``).

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
    foreign = [k for k in tensors if not k.startswith(_PREFIX)]
    if foreign:
        raise AdapterFormatError(f"{weights}: keys {foreign[:3]} do not start with {_PREFIX!r}, "
                                 "as PEFT's keys do.")
    return {k[len(_PREFIX):]: v for k, v in tensors.items()}, cfg


# -- PEFT's name matching (reimplemented: peft is not a dependency) ---------------------------
def _layer_index_ok(cfg: dict[str, Any], name: str) -> bool:
    indexes = cfg["layers_to_transform"]
    if indexes is None or (isinstance(indexes, list) and not indexes):
        return True
    patterns = cfg["layers_pattern"]
    match = None
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        for p in patterns:
            match = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", name)
            if match:
                break
    if match is None:
        return False
    idx = int(match.group("idx"))
    return idx == indexes if isinstance(indexes, int) else idx in indexes


def _peft_targets(cfg: dict[str, Any], name: str) -> bool:
    """Whether PEFT's ``check_target_module_exists`` selects the module ``name``."""
    exclude = cfg["exclude_modules"]
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, name):
                return False
        elif name in exclude or any(name.endswith(f".{e}") for e in exclude):
            return False
    if any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in cfg["modules_to_save"]):
        return False
    targets = cfg["target_modules"]
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    if name in targets:
        return True
    return any(name.endswith(f".{t}") for t in targets) and _layer_index_ok(cfg, name)


def _pattern_value(patterns: Mapping[str, Any], name: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key``: the first pattern ``p`` with ``re.match(f"(.*\\.)?({p})$")``."""
    for p in patterns:
        if re.match(rf"(.*\.)?({p})$", name):
            return patterns[p]
    return default


# -- layer descriptions ---------------------------------------------------------------------
def _module_spec(module: nn.Module) -> dict[str, Any] | None:
    """Type, weight shape and conv settings of a conv/linear (or LoRA) layer, else ``None``."""
    if isinstance(module, LoRALayer):
        kind = module.base_type
    elif isinstance(module, nn.Linear):
        kind = "Linear"
    elif isinstance(module, nn.modules.conv._ConvNd) and not isinstance(
            module, nn.modules.conv._ConvTransposeNd):
        kind = f"Conv{len(module.kernel_size)}d"
    else:
        return None
    spec: dict[str, Any] = {"type": kind, "weight_shape": list(module.weight.shape),  # type: ignore[union-attr]
                            "groups": int(getattr(module, "groups", 1))}
    if kind != "Linear":
        pad = module.padding
        spec.update(dilation=list(module.dilation),  # type: ignore[arg-type]
                    padding=pad if isinstance(pad, str) else list(pad),  # type: ignore[arg-type]
                    padding_mode=str(module.padding_mode))
    return spec


def _peft_problem(spec: Mapping[str, Any]) -> str | None:
    """Why PEFT computes something else than this conv's weight delta, or ``None``."""
    if spec["type"] == "Linear":
        return None
    kernel = spec["weight_shape"][2:]
    dilation, padding, mode = spec.get("dilation"), spec.get("padding"), spec.get("padding_mode", "zeros")
    if dilation is not None and any(d != 1 and k > 1 for d, k in zip(dilation, kernel)):
        return (f"it has dilation {tuple(dilation)}, which PEFT's lora_A conv ignores, so PEFT would "
                "compute another (or mis-shaped) output than this weight delta")
    padded = (padding == "same" and any(k > 1 for k in kernel)) if isinstance(padding, str) else \
        any(p > 0 for p in (padding or []))
    if mode != "zeros" and padded:
        return (f"it pads with padding_mode={mode!r}, while PEFT's lora_A conv pads with zeros, so "
                "PEFT would compute another output than this weight delta")
    return None


def _times(alpha: float, g: int) -> float:
    """A float ``x`` close to ``alpha * g`` with ``x / g == alpha`` exactly (when one exists)."""
    x = alpha * g
    for cand in (x, math.nextafter(x, math.inf), math.nextafter(x, -math.inf)):
        if cand / g == alpha:
            return cand
    return x


def _to_peft_factors(spec: Mapping[str, Any], a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, int, float]:
    """convlora ``(A, B, rank, alpha)`` of one layer in PEFT's layout: ``(lora_A, lora_B, r, lora_alpha)``."""
    r, alpha, g = int(spec["rank"]), float(spec["alpha"]), int(spec["groups"])
    shape = spec["weight_shape"]
    if spec["type"] == "Linear":
        return a.contiguous(), b.contiguous(), r, alpha
    out, cin_g, kernel = shape[0], shape[1], shape[2:]
    a4 = a.reshape(r, cin_g, *kernel)
    b4 = b.reshape(out, r, *([1] * len(kernel))).contiguous()
    if g == 1:
        return a4.contiguous(), b4, r, alpha
    big = a.new_zeros((r * g, cin_g * g, *kernel))
    for j in range(g):
        big[j * r:(j + 1) * r, j * cin_g:(j + 1) * cin_g] = a4
    return big, b4, r * g, _times(alpha, g)


def _from_peft_factors(lname: str, spec: Mapping[str, Any], a: Tensor, b: Tensor, r: int,
                       lora_alpha: float, rslora: bool) -> tuple[Tensor, Tensor, int, float]:
    """PEFT ``(lora_A, lora_B)`` of one layer as convlora ``(A, B, rank, alpha)``, exactly."""
    shape, g = spec["weight_shape"], int(spec["groups"])
    out = shape[0]
    if spec["type"] == "Linear":
        want_a, want_b = (r, shape[1]), (out, r)
    else:
        if r % g:
            raise AdapterMismatchError(f"layer {lname!r}: rank {r} is not divisible by groups={g}, "
                                       "which PEFT requires of grouped convs.")
        want_a, want_b = (r, shape[1] * g, *shape[2:]), (out, r // g, *([1] * (len(shape) - 2)))
    for key, t, want in (("lora_A", a, want_a), ("lora_B", b, want_b)):
        if tuple(t.shape) != tuple(want):
            raise AdapterMismatchError(f"{lname}.{key}.weight has shape {tuple(t.shape)}; this layer "
                                       f"(weight {tuple(shape)}, groups={g}) with r={r} needs {tuple(want)}.")
    root = math.sqrt(r) if rslora else 1.0
    if g == 1:
        return a.reshape(r, -1), b.reshape(out, r), r, lora_alpha * root
    rg, cin_g, og = r // g, shape[1], out // g
    blocks = []
    for j in range(g):
        rows = a[j * rg:(j + 1) * rg]
        inside = rows[:, j * cin_g:(j + 1) * cin_g]
        if rows.count_nonzero() != inside.count_nonzero():
            raise UnsupportedLayerError(
                f"layer {lname!r} is a grouped conv (groups={g}) and its PEFT lora_A is dense across "
                "the groups: the adapter is a side path, not a weight delta of this conv, so convlora "
                "cannot hold it exactly. Leave the layer out (exclude_modules) when training with PEFT.")
        blocks.append(inside.reshape(rg, -1))
    if all(torch.equal(blk, blocks[0]) for blk in blocks[1:]):
        return blocks[0], b.reshape(out, rg), rg, lora_alpha * root / g
    big_b = b.new_zeros((out, r))
    for j in range(g):
        big_b[j * og:(j + 1) * og, j * rg:(j + 1) * rg] = b[j * og:(j + 1) * og].reshape(og, rg)
    return torch.cat(blocks), big_b, r, lora_alpha * root


def _export_problem(lname: str, spec: Mapping[str, Any]) -> UnsupportedLayerError | None:
    if spec["type"] not in ("Linear", *_CONV_TYPES):
        return UnsupportedLayerError(f"layer {lname!r}: PEFT has no LoRA for {spec['type']!r} here.")
    if spec.get("method", "lora") != "lora" or spec.get("rslora", False):
        what = "rsLoRA scaling" if spec.get("method", "lora") == "lora" else f"method {spec['method']!r}"
        return UnsupportedLayerError(
            f"layer {lname!r} uses {what}; the PEFT export writes plain LoRA adapters only. "
            "Merge the adapter instead (convlora.unload or convlora merge).")
    if spec["factorization"] != "kernel":
        return UnsupportedLayerError(
            f"layer {lname!r} uses the {spec['factorization']!r} factorization, which PEFT's format cannot "
            "hold: PEFT's conv LoRA is a kernel-sized conv to r channels then a 1x1 conv (convlora's "
            "'kernel' factorization), while loralib's factors are blocks of the reshaped weight. "
            "Train with factorization='kernel' to export, or merge the adapter instead.")
    problem = _peft_problem(spec)
    if problem:
        return UnsupportedLayerError(f"layer {lname!r} cannot be exported to PEFT: {problem}.")
    return None


def _anchored(name: str) -> str:
    return "^" + re.escape(name)


def _peft_folder(specs: Mapping[str, Mapping[str, Any]], factors: Mapping[str, tuple[Tensor, Tensor]],
                 extra: Mapping[str, Tensor], bias: str,
                 modules_to_save: Sequence[str]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The config and tensors of a PEFT folder (``extra`` keys already in PEFT naming)."""
    for lname, spec in specs.items():
        err = _export_problem(lname, spec)
        if err:
            raise err
    dropouts = {float(s.get("dropout", 0.0)) for s in specs.values()}
    if len(dropouts) > 1:
        raise UnsupportedLayerError(f"the adapter's layers use several dropouts {sorted(dropouts)}; "
                                    "PEFT's lora_dropout is one value for all layers.")
    tensors: dict[str, Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for lname, spec in specs.items():
        a, b, r, alpha = _to_peft_factors(spec, *factors[lname])
        tensors[f"{_PREFIX}{lname}.lora_A.weight"] = a.detach().cpu().contiguous()
        tensors[f"{_PREFIX}{lname}.lora_B.weight"] = b.detach().cpu().contiguous()
        ranks[lname], alphas[lname] = r, alpha
    for key, t in extra.items():
        tensors[_PREFIX + key] = t.detach().cpu().contiguous()
    r0 = min(Counter(ranks.values()).most_common(), key=lambda kv: (-kv[1], kv[0]))[0]
    a0 = min(Counter(alphas.values()).most_common(), key=lambda kv: (-kv[1], kv[0]))[0]
    config: dict[str, Any] = {
        "peft_type": "LORA", "task_type": None, "r": r0, "lora_alpha": a0,
        # A regular expression of the exact names: a list entry would also match longer names
        # ending with it (PEFT matches list entries as name suffixes).
        "target_modules": "(?:" + "|".join(re.escape(n) for n in specs) + ")",
        "rank_pattern": {_anchored(n): r for n, r in ranks.items() if r != r0},
        "alpha_pattern": {_anchored(n): a for n, a in alphas.items() if a != a0},
        "lora_dropout": dropouts.pop(), "bias": bias, "use_rslora": False, "use_dora": False,
        "lora_bias": False, "fan_in_fan_out": False, "init_lora_weights": True,
        "modules_to_save": list(modules_to_save) or None, "exclude_modules": None,
        "layers_to_transform": None, "layers_pattern": None, "inference_mode": True,
    }
    return config, tensors


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


def _write_peft(folder: Path, config: dict[str, Any], tensors: dict[str, Tensor]) -> Path:
    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})
        (tmp / PEFT_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n",
                                       encoding="utf-8")
    return _new_folder(folder, write)


def _peft_bias_key(pname: str, lora_names: set[str]) -> str:
    owner = pname.rpartition(".")[0]
    return f"{owner}.base_layer.bias" if owner in lora_names else pname


def save_peft_adapter(model: nn.Module, folder: str | os.PathLike[str], *, name: str = "default",
                      bias: BiasMode = "none", modules_to_save: Sequence[str] | None = None) -> Path:
    """Write adapter ``name`` of ``model`` as a PEFT LoRA folder that PEFT loads with the same outputs.

    The folder is new (or empty) and is written through a temporary folder and one rename, so
    no partial output is ever left. Load it with ``PeftModel.from_pretrained(base, folder)``.

    Args:
        model: A model with LoRA layers.
        folder: The folder to create.
        name: Which adapter to write.
        bias: Which biases go into the folder, recorded as PEFT's bias mode: ``"none"``,
            ``"lora_only"`` (biases of the layers carrying the adapter) or ``"all"`` (every bias
            of the model), as in [save_adapter][convlora.save_adapter].
        modules_to_save: Qualified names of modules copied whole (e.g. a new classifier head),
            as PEFT's ``modules_to_save``. Each must be named unambiguously for PEFT, which
            matches entries as name suffixes, and must not contain adapted layers.

    Returns:
        ``folder`` as a ``Path``.

    Raises:
        UnsupportedLayerError: a layer uses the ``"loralib"`` factorization, non-zero
            ``padding_mode`` with padding, or dilation (PEFT computes those differently).
    """
    check_bias_mode(bias, "save_peft_adapter()")
    all_lora = lora_layers(model)
    layers = {n: lyr for n, lyr in all_lora.items() if name in lyr.rank}
    if not layers:
        raise AdapterMismatchError(f"save_peft_adapter(): no layer has an adapter named {name!r}.")
    specs: dict[str, dict[str, Any]] = {}
    for lname, lyr in layers.items():
        spec = _module_spec(lyr) or {}
        spec.update(rank=lyr.rank[name], alpha=lyr.alpha[name], factorization=lyr.factorization[name],
                    dropout=lyr.dropout[name], method=lyr.method[name], rslora=lyr.rslora[name])
        specs[lname] = spec
        err = _export_problem(lname, spec)
        if err:
            raise err
    modules = dict(model.named_modules())
    extra: dict[str, Tensor] = {}
    for m in modules_to_save or []:
        if m not in modules or not m:
            raise ConvLoRAError(f"modules_to_save entry {m!r} is not a module of this model.")
        also = [n for n in modules if n.endswith(m) and n != m]
        if also:
            raise ConvLoRAError(f"modules_to_save entry {m!r} would also select {also[:3]} in PEFT, "
                                "which matches entries as name suffixes.")
        inside = [n for n in all_lora if n == m or n.startswith(f"{m}.")]
        if inside:
            raise ConvLoRAError(f"modules_to_save entry {m!r} contains LoRA layers {inside[:3]}; "
                                "PEFT does not adapt layers inside modules it copies whole.")
        extra.update({f"{m}.{k}": v for k, v in modules[m].state_dict().items()})
    params = dict(model.named_parameters())
    for pname in bias_names(model, bias, name):
        key = _peft_bias_key(pname, set(all_lora))
        extra.setdefault(key, params[pname])
    factors = {n: (lyr.lora_A[name], lyr.lora_B[name]) for n, lyr in layers.items()}
    config, tensors = _peft_folder(specs, factors, extra, bias, list(modules_to_save or []))
    return _write_peft(Path(folder), config, tensors)


def _plan(model: nn.Module, tensors: dict[str, Tensor], cfg: dict[str, Any], name: str,
          where: Path) -> tuple[dict[str, tuple[Tensor, Tensor, int, float]], dict[str, Tensor],
                                dict[str, dict[str, Tensor]]]:
    """Validate everything against ``model``; returns factors, biases and module copies to apply."""
    lora_owned = {n for n, m in model.named_modules() if isinstance(m, LoRALayer)}
    modules = {n: m for n, m in model.named_modules()
               if not any(n.startswith(f"{o}.") for o in lora_owned)}
    lora_keys = {k.rpartition(".lora_")[0] for k in tensors if re.search(r"\.lora_[AB]\.weight$", k)}
    saved = [m for m in modules if m and any(m.endswith(e) for e in cfg["modules_to_save"])]
    factors: dict[str, tuple[Tensor, Tensor, int, float]] = {}
    biases: dict[str, Tensor] = {}
    copies: dict[str, dict[str, Tensor]] = {m: {} for m in saved}
    used: set[str] = set()
    for lname in sorted(lora_keys):
        if lname not in modules:
            raise AdapterMismatchError(f"{where}: the adapter has factors for {lname!r}, which is not "
                                       "a module of this model (is it for another model?).")
        mod = modules[lname]
        spec = _module_spec(mod)
        if spec is None:
            raise AdapterMismatchError(f"{where}: {lname!r} is a {type(mod).__name__}, not a conv or "
                                       "linear layer.")
        reason = None if isinstance(mod, LoRALayer) else unsupported_reason(mod)
        if reason:
            raise UnsupportedLayerError(f"layer {lname!r} cannot take a LoRA adapter: {reason}.")
        if isinstance(mod, LoRALayer):
            mod.check_can_load(lname, name)
        problem = _peft_problem(spec)
        if problem:
            raise UnsupportedLayerError(f"layer {lname!r}: {problem}; convlora does not import it.")
        for part in ("A", "B"):
            if f"{lname}.lora_{part}.weight" not in tensors:
                raise AdapterFormatError(f"{where}: {lname}.lora_{part}.weight is missing.")
        r = _pattern_value(cfg["rank_pattern"], lname, cfg["r"])
        alpha = float(_pattern_value(cfg["alpha_pattern"], lname, cfg["lora_alpha"]))
        a, b = tensors[f"{lname}.lora_A.weight"], tensors[f"{lname}.lora_B.weight"]
        a_c, b_c, rank, alpha_c = _from_peft_factors(lname, spec, a, b, r, alpha, cfg["use_rslora"])
        probe = mod if isinstance(mod, LoRALayer) else LoRALayer(mod)
        limit = probe.adapter_problem(rank, "kernel")
        if limit:
            raise UnsupportedLayerError(f"layer {lname!r}: {limit}.")
        factors[lname] = (a_c, b_c, rank, alpha_c)
        used |= {f"{lname}.lora_A.weight", f"{lname}.lora_B.weight"}
    if not factors:
        raise AdapterFormatError(f"{where}: {PEFT_WEIGHTS} holds no lora_A/lora_B factors.")
    selected = {n for n, m in modules.items() if n and _module_spec(m) is not None and _peft_targets(cfg, n)}
    if selected != set(factors):
        extra, lacking = sorted(set(factors) - selected), sorted(selected - set(factors))
        raise AdapterFormatError(
            f"{where}: {PEFT_CONFIG} target_modules={_fmt(cfg['target_modules'])} (with exclude_modules, "
            f"layers_to_transform and modules_to_save) does not select the layers the weights adapt: "
            f"factors for unselected layers {extra[:5]}, no factors for selected layers {lacking[:5]}.")
    params = dict(model.named_parameters())
    for key, t in tensors.items():
        if key in used:
            continue
        owner = next((m for m in saved if key.startswith(f"{m}.")), None)
        if owner is not None:
            rest = key[len(owner) + 1:]
            if rest.startswith(("original_module.", "modules_to_save.")):
                continue  # PEFT's bias="all" also saves its wrapper's inner copies; the values are in <module>.<key>
            state = modules[owner].state_dict()
            if rest not in state or state[rest].shape != t.shape:
                raise AdapterMismatchError(f"{where}: {key} (shape {tuple(t.shape)}) does not fit module "
                                           f"{owner!r} of this model.")
            copies[owner][rest] = t
            continue
        if key.rpartition(".")[2] != "bias":
            raise AdapterFormatError(f"{where}: unexpected tensor {key!r} (not a LoRA factor, a bias or "
                                     f"part of modules_to_save={cfg['modules_to_save']}).")
        owner_name = key.rpartition(".")[0]
        if owner_name.endswith(".base_layer"):
            owner_name = owner_name[: -len(".base_layer")]
            if owner_name not in factors:
                raise AdapterFormatError(f"{where}: {key!r} is the bias of {owner_name!r}, which the "
                                         "adapter does not adapt.")
        if cfg["bias"] == "none" or (cfg["bias"] == "lora_only" and owner_name not in factors):
            raise _bad(where / PEFT_CONFIG, "bias", cfg["bias"], f"does not allow the bias tensor {key!r} "
                       "the weights hold")
        pname = f"{owner_name}.bias"
        if pname not in params or params[pname].shape != t.shape:
            raise AdapterMismatchError(f"{where}: {key} (shape {tuple(t.shape)}) has no bias of that "
                                       "shape in this model.")
        biases[pname] = t
    return factors, biases, copies


def load_peft_adapter(model: nn.Module, folder: str | os.PathLike[str], *,
                      name: str = "default") -> str:
    """Load a PEFT LoRA folder into ``model`` as adapter ``name`` and make it active.

    Layers that are not LoRA layers yet are injected. The model then computes what PEFT computes
    with the same folder (up to float rounding: PEFT adds a side path, convlora one merged-weight
    conv). Trained biases are copied into the model, and so are ``modules_to_save`` (whole
    modules, e.g. a new head); both are shared by all adapters of the model. Nothing changes
    when an error is raised.

    Args:
        model: The base model PEFT was given (plain, or with other convlora adapters).
        folder: A folder with ``adapter_config.json`` and ``adapter_model.safetensors``.
        name: Adapter name on the model.

    Returns:
        The adapter's name on the model.

    Raises:
        AdapterFormatError: malformed or refused config fields (named in the message), or
            weights that do not match the config.
        AdapterMismatchError: tensors that do not fit this model.
        UnsupportedLayerError: a layer PEFT mishandles (non-zero padding_mode, dilation) or a
            grouped conv whose ``lora_A`` is not block-diagonal by group.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ConvLoRAError(f"name={name!r} must be a Python identifier.")
    folder = Path(folder)
    tensors, cfg = read_peft_adapter(folder)
    factors, biases, copies = _plan(model, tensors, cfg, name, folder)
    modules = dict(model.named_modules())
    for lname, (a, b, rank, alpha) in factors.items():
        layer = modules[lname]
        if not isinstance(layer, LoRALayer):
            layer = LoRALayer(layer).train(layer.training)  # an eval model stays in eval mode
            replace_module(model, lname, layer)
        layer.add_adapter(name, rank, alpha, "kernel", cfg["lora_dropout"], lname)
        with torch.no_grad():
            layer.lora_A[name].copy_(a)
            layer.lora_B[name].copy_(b)
    with torch.no_grad():
        for pname, t in biases.items():
            model.get_parameter(pname).copy_(t)
        for mname, state in copies.items():
            target = model.get_submodule(mname)
            own = target.state_dict(keep_vars=True)
            for key, t in state.items():
                own[key].copy_(t)
    for layer in lora_layers(model).values():
        layer.active_adapter = name if name in layer.rank else None
    return name


# -- file-to-file conversion (the command line's ``convert``) --------------------------------
def convlora_to_peft(adapter: str | os.PathLike[str], folder: str | os.PathLike[str]) -> Path:
    """Convert a convlora adapter file into a new PEFT folder, without model code.

    The file's metadata records each layer's type, weight shape, groups and conv settings,
    which is all the conversion needs. Its biases go along, with its bias mode (a version-1
    file, which records none, gets ``"lora_only"`` when it only holds biases of adapted layers,
    else ``"all"``).

    Args:
        adapter: A file written by [save_adapter][convlora.save_adapter].
        folder: The PEFT folder to create (it must not exist, or be empty).

    Returns:
        ``folder`` as a ``Path``.
    """
    tensors, meta = read_adapter(adapter)
    specs: dict[str, dict[str, Any]] = meta["layers"]
    keys = list(meta.get("bias_keys", []))
    bias = meta.get("bias")
    if bias is None:
        bias = "none" if not keys else "lora_only" if all(
            k.rpartition(".")[0] in specs for k in keys) else "all"
    extra = {_peft_bias_key(k, set(specs)): tensors[k] for k in keys}
    factors = {n: (tensors[f"{n}.lora_A"], tensors[f"{n}.lora_B"]) for n in specs}
    config, out = _peft_folder(specs, factors, extra, str(bias), [])
    return _write_peft(Path(folder), config, out)


def _skeleton(tensors: Mapping[str, Tensor], base: Mapping[str, Tensor], where: Path) -> nn.Module:
    """A module tree with the adapted layers (shapes read off the factors, weights from ``base``)
    and holders of the biases the folder carries."""
    root = nn.Module()

    def place(name: str, module: nn.Module) -> None:
        parent = root
        *path, leaf = name.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, module)

    names = sorted({k.rpartition(".lora_")[0] for k in tensors if re.search(r"\.lora_[AB]\.weight$", k)})
    for lname in names:
        w, a = base.get(f"{lname}.weight"), tensors.get(f"{lname}.lora_A.weight")
        if w is None or a is None or w.dim() not in (2, 3, 4, 5) or a.dim() != w.dim():
            raise AdapterMismatchError(f"{where}: the base has no weight {lname}.weight that fits "
                                       f"{lname}.lora_A.weight (shape {None if a is None else tuple(a.shape)}).")
        has_bias = f"{lname}.bias" in base
        if w.dim() == 2:
            mod: nn.Module = nn.Linear(w.shape[1], w.shape[0], bias=has_bias)
        else:
            cin = a.shape[1]
            if cin % w.shape[1]:
                raise AdapterMismatchError(f"{where}: {lname}.lora_A.weight has {cin} input channels, "
                                           f"not a multiple of the base weight's {w.shape[1]}.")
            conv = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}[w.dim()]
            kernel: Any = tuple(w.shape[2:])
            mod = conv(cin, w.shape[0], kernel, groups=cin // w.shape[1], bias=has_bias)
        with torch.no_grad():
            mod.weight = nn.Parameter(w.detach().clone(), requires_grad=False)
            if has_bias:
                mod.bias = nn.Parameter(base[f"{lname}.bias"].detach().clone(), requires_grad=False)
        place(lname, mod)
    for key in tensors:
        owner = key.rpartition(".")[0]
        if key.endswith(".bias") and not owner.endswith((".base_layer", ".lora_B")) and owner not in names:
            b = base.get(key)
            if b is None:
                raise AdapterMismatchError(f"{where}: the folder holds {key!r}, which the base lacks.")
            holder = nn.Module()
            holder.bias = nn.Parameter(b.detach().clone(), requires_grad=False)
            place(owner, holder)
    return root


def peft_to_convlora(folder: str | os.PathLike[str], base: Mapping[str, Tensor],
                     out: str | os.PathLike[str], *, name: str = "default") -> Path:
    """Convert a PEFT folder into a convlora adapter file, given the base model's state dict.

    The layer shapes are read off the factors and the base weights; the base is needed because a
    convlora file records a fingerprint of the base weights it fits. A state dict does not hold
    the conv settings (stride, padding, dilation, padding mode), so this conversion cannot refuse
    the layers PEFT mishandles, and the file it writes records placeholder conv settings (stride
    1, no padding) and says so in its ``user`` metadata; [load_peft_adapter][convlora.load_peft_adapter]
    on the model checks everything. ``modules_to_save`` cannot go into a convlora file and is refused.

    Args:
        folder: A PEFT LoRA folder.
        base: The base model's state dict (``<layer>.weight`` keys).
        out: The adapter file to write; it must not be one of the inputs.
        name: The adapter name stored in the file.

    Returns:
        ``out`` as a ``Path``.
    """
    folder, out = Path(folder), Path(out)
    if out.resolve().parent == folder.resolve() and out.name in (PEFT_CONFIG, PEFT_WEIGHTS):
        raise ConvLoRAError(f"{out} is one of the input files; choose another output.")
    tensors, cfg = read_peft_adapter(folder)
    if cfg["modules_to_save"]:
        raise _bad(folder / PEFT_CONFIG, "modules_to_save", cfg["modules_to_save"],
                   "cannot go into a convlora adapter file, which holds factors and biases only; use "
                   "load_peft_adapter(model, folder) to copy these modules into a model")
    model = _skeleton(tensors, base, folder)
    load_peft_adapter(model, folder, name=name)
    user = {"converted_from": "peft", "conv_settings": "not recorded: a PEFT folder and a state dict "
            "do not hold stride, padding or dilation; the values recorded are placeholders"}
    return save_adapter(model, out, name=name, bias=cfg["bias"], metadata=user)
