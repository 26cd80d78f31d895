"""PEFT adapter folders on a model, and converted to and from convlora adapter files.

[save_peft_adapter][convlora.save_peft_adapter] writes what PEFT loads with the same outputs, and
[load_peft_adapter][convlora.load_peft_adapter] reads what PEFT trains, with every tensor checked
against the model before it is touched. The command line's ``convert`` is
[convlora_to_peft][convlora.peft.convlora_to_peft] and [peft_to_convlora][convlora.peft.peft_to_convlora],
which need no model code. The folder's files and fields are ``convlora.peft_format``; how PEFT's
factors and names correspond to convlora's layers (and which layers PEFT computes differently,
so that they are refused) is ``convlora.peft_mapping``.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ._values import short_repr
from .adapter_format import read_adapter
from .adapters import save_adapter
from .errors import AdapterFormatError, AdapterMismatchError, ConvLoRAError, UnsupportedLayerError
from .layer import LoRALayer, unsupported_reason
from .peft_format import (
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    config_error,
    read_peft_adapter,
    write_peft_folder,
)
from .peft_mapping import (
    PEFT_MAGNITUDE,
    export_problem,
    from_peft_factors,
    from_peft_magnitude,
    module_spec,
    pattern_value,
    peft_bias_key,
    peft_contents,
    peft_problem,
    peft_targets,
)
from .surgery import lora_layers, replace_module
from .trainable import BiasMode, bias_names, check_bias_mode

__all__ = ["convlora_to_peft", "load_peft_adapter", "peft_to_convlora", "save_peft_adapter"]


def save_peft_adapter(model: nn.Module, folder: str | os.PathLike[str], *, name: str = "default",
                      bias: BiasMode = "none", modules_to_save: Sequence[str] | None = None) -> Path:
    """Write adapter ``name`` of ``model`` as a PEFT LoRA folder that PEFT loads with the same outputs.

    A ``method="lora"`` adapter becomes a plain LoRA folder, a ``method="dora"`` one a DoRA folder
    (``use_dora: true``, with each layer's magnitude); the other methods are refused. An rsLoRA
    adapter (``rslora=True``) is written with ``use_rslora: true`` and its alphas as
    ``lora_alpha`` (PEFT's scale ``lora_alpha / sqrt(r)`` is convlora's). The folder
    is new (or empty) and is written through a temporary folder and one rename, so no partial
    output is ever left. Load it with ``PeftModel.from_pretrained(base, folder)``.

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
            ``padding_mode`` with padding, or dilation (PEFT computes those differently), a
            method other than ``"lora"``/``"dora"``, rsLoRA on a grouped conv whose groups are
            not a power of 4 (PEFT's rank ``r*g`` has no float ``lora_alpha`` with the same
            scale), or the adapter mixes LoRA and DoRA layers or rsLoRA and alpha/rank layers
            (PEFT's ``use_dora`` and ``use_rslora`` are one value for the folder).
    """
    check_bias_mode(bias, "save_peft_adapter()")
    all_lora = lora_layers(model)
    layers = {n: lyr for n, lyr in all_lora.items() if name in lyr.rank}
    if not layers:
        raise AdapterMismatchError(f"save_peft_adapter(): no layer has an adapter named {name!r}.")
    specs: dict[str, dict[str, Any]] = {}
    for lname, lyr in layers.items():
        spec = module_spec(lyr) or {}
        spec.update(rank=lyr.rank[name], alpha=lyr.alpha[name], factorization=lyr.factorization[name],
                    dropout=lyr.dropout[name], method=lyr.method[name], rslora=lyr.rslora[name])
        specs[lname] = spec
        err = export_problem(lname, spec)
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
        key = peft_bias_key(pname, set(all_lora))
        extra.setdefault(key, params[pname])
    factors = {n: lyr.factors(name) for n, lyr in layers.items()}
    config, tensors = peft_contents(specs, factors, extra, bias, list(modules_to_save or []))
    return write_peft_folder(Path(folder), config, tensors)


def _plan(model: nn.Module, tensors: dict[str, Tensor], cfg: dict[str, Any], name: str,
          where: Path) -> tuple[dict[str, tuple[dict[str, Tensor], int, float, bool]], dict[str, Tensor],
                                dict[str, dict[str, Tensor]]]:
    """Validate everything against ``model``; returns factors (by convlora name, with rank, alpha
    and rsLoRA flag), biases and module copies to apply."""
    lora_owned = {n for n, m in model.named_modules() if isinstance(m, LoRALayer)}
    modules = {n: m for n, m in model.named_modules()
               if not any(n.startswith(f"{o}.") for o in lora_owned)}
    lora_keys = {k.rpartition(".lora_")[0] for k in tensors if re.search(r"\.lora_[AB]\.weight$", k)}
    saved = [m for m in modules if m and any(m.endswith(e) for e in cfg["modules_to_save"])]
    factors: dict[str, tuple[dict[str, Tensor], int, float, bool]] = {}
    method = "dora" if cfg["use_dora"] else "lora"
    biases: dict[str, Tensor] = {}
    copies: dict[str, dict[str, Tensor]] = {m: {} for m in saved}
    used: set[str] = set()
    for lname in sorted(lora_keys):
        if lname not in modules:
            raise AdapterMismatchError(f"{where}: the adapter has factors for {lname!r}, which is not "
                                       "a module of this model (is it for another model?).")
        mod = modules[lname]
        spec = module_spec(mod)
        if spec is None:
            raise AdapterMismatchError(f"{where}: {lname!r} is a {type(mod).__name__}, not a conv or "
                                       "linear layer.")
        reason = None if isinstance(mod, LoRALayer) else unsupported_reason(mod)
        if reason:
            raise UnsupportedLayerError(f"layer {lname!r} cannot take a LoRA adapter: {reason}.")
        if isinstance(mod, LoRALayer):
            mod.check_can_load(lname, name)
        problem = peft_problem(spec)
        if problem:
            raise UnsupportedLayerError(f"layer {lname!r}: {problem}; convlora does not import it.")
        keys = [f"{lname}.lora_A.weight", f"{lname}.lora_B.weight"]
        if cfg["use_dora"]:
            keys.append(f"{lname}.{PEFT_MAGNITUDE}")
        for key in keys:
            if key not in tensors:
                why = " (the config has use_dora=true: every DoRA layer has a magnitude)" \
                    if key.endswith(PEFT_MAGNITUDE) else ""
                raise AdapterFormatError(f"{where}: {key} is missing{why}.")
        r = pattern_value(cfg["rank_pattern"], lname, cfg["r"])
        alpha = float(pattern_value(cfg["alpha_pattern"], lname, cfg["lora_alpha"]))
        a, b = tensors[keys[0]], tensors[keys[1]]
        a_c, b_c, rank, alpha_c, rslora = from_peft_factors(lname, spec, a, b, r, alpha, cfg["use_rslora"],
                                                            dora=cfg["use_dora"])
        found = {"lora_A": a_c, "lora_B": b_c}
        if cfg["use_dora"]:
            found["lora_magnitude"] = from_peft_magnitude(lname, spec, tensors[keys[2]])
        probe = mod if isinstance(mod, LoRALayer) else LoRALayer(mod)
        limit = probe.adapter_problem(rank, "kernel", method)
        if limit:
            raise UnsupportedLayerError(f"layer {lname!r}: {limit}.")
        factors[lname] = (found, rank, alpha_c, rslora)
        used |= set(keys)
    if not factors:
        raise AdapterFormatError(f"{where}: {PEFT_WEIGHTS} holds no lora_A/lora_B factors.")
    selected = {n for n, m in modules.items() if n and module_spec(m) is not None and peft_targets(cfg, n)}
    if selected != set(factors):
        extra, lacking = sorted(set(factors) - selected), sorted(selected - set(factors))
        raise AdapterFormatError(
            f"{where}: {PEFT_CONFIG} target_modules={short_repr(cfg['target_modules'])} (with exclude_modules, "
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
        if key.endswith(f".{PEFT_MAGNITUDE}"):
            raise config_error(where / PEFT_CONFIG, "use_dora", cfg["use_dora"], f"does not allow the DoRA "
                               f"magnitude {key!r} the weights hold (is the config from another adapter?)")
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
            raise config_error(where / PEFT_CONFIG, "bias", cfg["bias"], f"does not allow the bias tensor {key!r} "
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
    conv). A ``use_rslora: true`` folder loads as ``rslora=True`` adapters with ``alpha =
    lora_alpha`` (except on grouped convs, see ``convlora.peft_mapping``). A DoRA folder
    (``use_dora: true``) loads as ``method="dora"`` adapters; convlora's DoRA
    has no dropout, so a ``lora_dropout`` above 0 is dropped with a warning (it acts only while
    training: eval outputs are PEFT's). Trained biases are copied into the model, and so are ``modules_to_save`` (whole
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
            grouped conv whose ``lora_A`` is not block-diagonal by group (for DoRA: whose blocks
            also differ, with several output channels per group).
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ConvLoRAError(f"name={name!r} must be a Python identifier.")
    folder = Path(folder)
    tensors, cfg = read_peft_adapter(folder)
    factors, biases, copies = _plan(model, tensors, cfg, name, folder)
    method, dropout = ("dora", 0.0) if cfg["use_dora"] else ("lora", cfg["lora_dropout"])
    if cfg["use_dora"] and cfg["lora_dropout"] > 0:
        warnings.warn(f"{folder}: lora_dropout={cfg['lora_dropout']} is not loaded: convlora's DoRA has no "
                      "dropout (it rescales W + delta). Outputs in eval mode are PEFT's; training differs.",
                      stacklevel=2)
    modules = dict(model.named_modules())
    for lname, (found, rank, alpha, rslora) in factors.items():
        layer = modules[lname]
        if not isinstance(layer, LoRALayer):
            layer = LoRALayer(layer).train(layer.training)  # an eval model stays in eval mode
            replace_module(model, lname, layer)
        layer.add_adapter(name, rank, alpha, "kernel", dropout, lname, method, rslora)
        with torch.no_grad():
            for factor, param in layer.factors(name).items():
                param.copy_(found[factor])
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
        adapter: A file written by [save_adapter][convlora.save_adapter] (method ``"lora"`` or
            ``"dora"``).
        folder: The PEFT folder to create (it must not exist, or be empty).

    Returns:
        ``folder`` as a ``Path``.
    """
    tensors, meta = read_adapter(adapter)
    specs: dict[str, dict[str, Any]] = meta["layers"]  # peft_contents refuses what PEFT cannot hold
    keys = list(meta.get("bias_keys", []))
    bias = meta.get("bias")
    if bias is None:
        bias = "none" if not keys else "lora_only" if all(
            k.rpartition(".")[0] in specs for k in keys) else "all"
    extra = {peft_bias_key(k, set(specs)): tensors[k] for k in keys}
    factors = {n: {f: tensors[f"{n}.{f}"] for f in ("lora_A", "lora_B", "lora_magnitude")
                   if f"{n}.{f}" in tensors} for n in specs}
    config, out = peft_contents(specs, factors, extra, str(bias), [])
    return write_peft_folder(Path(folder), config, out)


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
        raise config_error(folder / PEFT_CONFIG, "modules_to_save", cfg["modules_to_save"],
                           "cannot go into a convlora adapter file, which holds factors and biases only; use "
                           "load_peft_adapter(model, folder) to copy these modules into a model")
    model = _skeleton(tensors, base, folder)
    load_peft_adapter(model, folder, name=name)
    user = {"converted_from": "peft", "conv_settings": "not recorded: a PEFT folder and a state dict "
            "do not hold stride, padding or dilation; the values recorded are placeholders"}
    return save_adapter(model, out, name=name, bias=cfg["bias"], metadata=user)
