"""How PEFT's LoRA maps onto convlora's layers: factor layouts both ways, and PEFT's name matching.

For a conv with ``groups=1``, PEFT's LoRA is convlora's ``"kernel"`` factorisation: ``lora_A`` is
a kernel-sized conv ``(r, in, *k)`` and ``lora_B`` a 1x1 conv ``(out, r, 1...)``; for
``nn.Linear`` the factors are ``(r, in)`` and ``(out, r)``. ``use_rslora`` is convlora's
``rslora=True``: both scale by ``alpha / math.sqrt(r)`` (the same float expression), so
``lora_alpha`` is convlora's alpha both ways. It is one flag for the whole folder: an adapter
mixing rsLoRA and plain layers is refused on export.

PEFT is exact only for zero padding and dilation 1: its ``lora_A`` conv takes the base conv's
kernel size, stride and padding but neither its ``padding_mode`` nor its ``dilation``. Such
layers are refused both ways. For a grouped conv (``groups=g``) PEFT's ``lora_A`` is dense over
all input channels and ``lora_B`` is grouped (``r % g == 0``), which is a side path, not a weight
delta, unless ``lora_A`` is block-diagonal by group. Importing is therefore refused unless it is;
exporting a convlora grouped adapter of rank ``r`` is exact: rank ``r*g``, a block-diagonal
``lora_A`` repeating convlora's ``A`` per group, and convlora's ``B`` as the grouped ``lora_B``
(importing such a file gives back rank ``r`` and the same tensors, bit for bit). With rsLoRA that
rank change needs ``lora_alpha = alpha * sqrt(g)``, the same float scale only when ``g`` is a
power of 4 (``sqrt(g)`` is then a power of two, and ``math.sqrt(r * g) == math.sqrt(r) * sqrt(g)``
exactly); other grouped rsLoRA layers are refused on export. On import a grouped ``use_rslora``
layer whose blocks are equal loads as rsLoRA of rank ``r / g`` for such ``g``, and otherwise as
plain LoRA with ``alpha = lora_alpha * sqrt(r) / g`` (the same scale to float rounding); with
different blocks it keeps PEFT's rank, so it loads as rsLoRA with ``lora_alpha``, exactly. The
``"loralib"`` factorisation has no PEFT layout and is refused on export.

PEFT's DoRA (``use_dora``) is convlora's ``method="dora"`` with the same ``lora_A``/``lora_B`` and
``lora_magnitude_vector`` as ``lora_magnitude`` (``(out,)`` for ``nn.Linear``, ``(1, out, 1...)``
for a conv, one value per output channel). It is exact where PEFT's LoRA is, and PEFT's DoRA
fails outright on a dilated conv (its side path has another output size). On a grouped conv
PEFT's DoRA takes the norm of ``lora_B.view(-1, r) @ lora_A.view(r, -1)`` reshaped to the
weight: with a block-diagonal ``lora_A`` that pairs output channel ``o`` with the block of group
``o % g`` while its forward uses group ``o // (out/g)``, so its norm is ``||W + s * delta||``
only when all blocks are equal (what the export writes) or each group has one output channel
(``out == groups``). Other grouped DoRA imports are refused; PEFT cannot merge grouped convs.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .errors import AdapterMismatchError, UnsupportedLayerError
from .layer import LoRALayer
from .peft_format import PEFT_PREFIX

__all__ = ["PEFT_MAGNITUDE", "export_problem", "from_peft_factors", "from_peft_magnitude", "module_spec",
           "pattern_value", "peft_bias_key", "peft_contents", "peft_problem", "peft_targets"]

_CONV_TYPES = {"Conv1d": 1, "Conv2d": 2, "Conv3d": 3}
PEFT_MAGNITUDE = "lora_magnitude_vector"
"""PEFT's key (``<layer>.lora_magnitude_vector``) for DoRA's magnitude, convlora's ``lora_magnitude``."""
_EXPORTED = ("lora", "dora")


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


def peft_targets(cfg: dict[str, Any], name: str) -> bool:
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


def pattern_value(patterns: Mapping[str, Any], name: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key``: the first pattern ``p`` with ``re.match(f"(.*\\.)?({p})$")``."""
    for p in patterns:
        if re.match(rf"(.*\.)?({p})$", name):
            return patterns[p]
    return default


# -- layer descriptions ---------------------------------------------------------------------
def module_spec(module: nn.Module) -> dict[str, Any] | None:
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


def peft_problem(spec: Mapping[str, Any]) -> str | None:
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


def _power_of_4_root(g: int) -> int | None:
    """``sqrt(g)`` when ``g`` is a power of 4 (``sqrt(g)`` a power of two), else ``None``."""
    return 1 << ((g.bit_length() - 1) // 2) if g > 0 and g & (g - 1) == 0 and g.bit_length() % 2 else None


def _rslora_grouped_alpha(alpha: float, r: int, g: int) -> float | None:
    """PEFT's ``lora_alpha`` for a grouped rsLoRA layer of rank ``r`` exported at rank ``r*g``: a
    float with the same scale (``x / math.sqrt(r*g) == alpha / math.sqrt(r)``) that gives back
    ``alpha`` on import (``x / sqrt(g) == alpha``), or ``None`` where there is none for sure."""
    root = _power_of_4_root(g)
    if root is None:
        return None
    x = alpha * root
    ok = x / math.sqrt(r * g) == alpha / math.sqrt(r) and x / root == alpha
    return x if ok else None


def _magnitude_shape(spec: Mapping[str, Any]) -> tuple[int, ...]:
    """PEFT's shape of the DoRA magnitude: ``(out,)`` for Linear, ``(1, out, 1...)`` for a conv."""
    shape = spec["weight_shape"]
    return (shape[0],) if spec["type"] == "Linear" else (1, shape[0], *([1] * (len(shape) - 2)))


def _to_peft_factors(spec: Mapping[str, Any], f: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], int, float]:
    """convlora factors of one layer in PEFT's layout: ``({PEFT key suffix: tensor}, r, lora_alpha)``."""
    r, alpha, g = int(spec["rank"]), float(spec["alpha"]), int(spec["groups"])
    a, b = f["lora_A"], f["lora_B"]
    shape = spec["weight_shape"]
    out: dict[str, Tensor] = {}
    if "lora_magnitude" in f:
        out[PEFT_MAGNITUDE] = f["lora_magnitude"].reshape(_magnitude_shape(spec))
    if spec["type"] == "Linear":
        out.update({"lora_A.weight": a, "lora_B.weight": b})
        return out, r, alpha
    cout, cin_g, kernel = shape[0], shape[1], shape[2:]
    a4 = a.reshape(r, cin_g, *kernel)
    out["lora_B.weight"] = b.reshape(cout, r, *([1] * len(kernel)))
    if g == 1:
        out["lora_A.weight"] = a4
        return out, r, alpha
    big = a.new_zeros((r * g, cin_g * g, *kernel))
    for j in range(g):
        big[j * r:(j + 1) * r, j * cin_g:(j + 1) * cin_g] = a4
    out["lora_A.weight"] = big
    if spec.get("rslora", False):
        lora_alpha = _rslora_grouped_alpha(alpha, r, g)
        assert lora_alpha is not None, "export_problem refuses this layer"
        return out, r * g, lora_alpha
    return out, r * g, _times(alpha, g)


def from_peft_factors(lname: str, spec: Mapping[str, Any], a: Tensor, b: Tensor, r: int, lora_alpha: float,
                      rslora: bool, dora: bool = False) -> tuple[Tensor, Tensor, int, float, bool]:
    """PEFT ``(lora_A, lora_B)`` of one layer as convlora ``(A, B, rank, alpha, rslora)``, exactly.

    ``rslora`` (PEFT's ``use_rslora``) stays rsLoRA with ``alpha = lora_alpha`` wherever convlora
    keeps PEFT's rank. A grouped conv with equal ``lora_A`` blocks comes back at rank ``r / g``:
    rsLoRA with ``alpha = lora_alpha / sqrt(g)`` when ``g`` is a power of 4 (the same float
    scale), else plain LoRA with ``alpha = lora_alpha * sqrt(r) / g`` (the same scale to float
    rounding). ``dora``: the folder is PEFT DoRA, whose grouped-conv norm is right only for equal
    ``lora_A`` blocks or one output channel per group (else refused).
    """
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
    if g == 1:
        return a.reshape(r, -1), b.reshape(out, r), r, lora_alpha, rslora
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
        if not rslora:
            return blocks[0], b.reshape(out, rg), rg, lora_alpha / g, False
        root = _power_of_4_root(g)
        if root is not None and lora_alpha / root / math.sqrt(rg) == lora_alpha / math.sqrt(r):
            return blocks[0], b.reshape(out, rg), rg, lora_alpha / root, True
        return blocks[0], b.reshape(out, rg), rg, lora_alpha * math.sqrt(r) / g, False
    if dora and og > 1:
        raise UnsupportedLayerError(
            f"layer {lname!r} is a grouped conv (groups={g}, {og} output channels per group) whose PEFT "
            "DoRA lora_A blocks differ: PEFT's DoRA norm then pairs output channels with the wrong "
            "group's block, so it computes no DoRA of this conv and convlora cannot hold it exactly.")
    big_b = b.new_zeros((out, r))
    for j in range(g):
        big_b[j * og:(j + 1) * og, j * rg:(j + 1) * rg] = b[j * og:(j + 1) * og].reshape(og, rg)
    return torch.cat(blocks), big_b, r, lora_alpha, rslora


def from_peft_magnitude(lname: str, spec: Mapping[str, Any], m: Tensor) -> Tensor:
    """PEFT's ``lora_magnitude_vector`` of one layer as convlora's ``lora_magnitude`` ``(out,)``."""
    want = _magnitude_shape(spec)
    if tuple(m.shape) != want:
        raise AdapterMismatchError(f"{lname}.{PEFT_MAGNITUDE} has shape {tuple(m.shape)}; this layer "
                                   f"(weight {tuple(spec['weight_shape'])}) needs {want}.")
    return m.reshape(-1)


def export_problem(lname: str, spec: Mapping[str, Any]) -> UnsupportedLayerError | None:
    """The error for a layer (``spec``: its description and adapter fields) PEFT cannot hold, or ``None``."""
    if spec["type"] not in ("Linear", *_CONV_TYPES):
        return UnsupportedLayerError(f"layer {lname!r}: PEFT has no LoRA for {spec['type']!r} here.")
    method = spec.get("method", "lora")
    if method not in _EXPORTED:
        return UnsupportedLayerError(
            f"layer {lname!r} uses method {method!r}; the PEFT export writes 'lora' and 'dora' adapters "
            "only (LoraConfig folders, not PEFT's LoHa/LoKr ones). Merge the adapter instead "
            "(convlora.unload or convlora merge).")
    g = int(spec.get("groups", 1))
    if spec.get("rslora", False) and g > 1 and \
            _rslora_grouped_alpha(float(spec["alpha"]), int(spec["rank"]), g) is None:
        return UnsupportedLayerError(
            f"layer {lname!r} is a grouped conv (groups={g}) with rsLoRA: PEFT holds it at rank "
            f"{int(spec['rank']) * g} (rank x groups), where the same scale needs lora_alpha = alpha*sqrt({g}), "
            "which is not the same float scale (exact only for groups a power of 4). Train this layer "
            "without rslora or leave it out, or merge the adapter instead (convlora.unload or convlora merge).")
    if spec["factorization"] != "kernel":
        return UnsupportedLayerError(
            f"layer {lname!r} uses the {spec['factorization']!r} factorization, which PEFT's format cannot "
            "hold: PEFT's conv LoRA is a kernel-sized conv to r channels then a 1x1 conv (convlora's "
            "'kernel' factorization), while loralib's factors are blocks of the reshaped weight. "
            "Train with factorization='kernel' to export, or merge the adapter instead.")
    problem = peft_problem(spec)
    if problem:
        return UnsupportedLayerError(f"layer {lname!r} cannot be exported to PEFT: {problem}.")
    return None


def _few(names: Sequence[str]) -> str:
    """Up to 5 layer names, with how many more there are."""
    more = f" and {len(names) - 5} more" if len(names) > 5 else ""
    return f"{list(names[:5])}{more}"


def _anchored(name: str) -> str:
    return "^" + re.escape(name)


def peft_contents(specs: Mapping[str, Mapping[str, Any]], factors: Mapping[str, Mapping[str, Tensor]],
                  extra: Mapping[str, Tensor], bias: str,
                  modules_to_save: Sequence[str]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The config and tensors of a PEFT folder (``factors``: per layer its factors by convlora
    name; ``extra`` keys already in PEFT naming)."""
    for lname, spec in specs.items():
        err = export_problem(lname, spec)
        if err:
            raise err
    methods = {str(s.get("method", "lora")) for s in specs.values()}
    if len(methods) > 1:
        dora = sorted(n for n, s in specs.items() if s.get("method", "lora") == "dora")
        raise UnsupportedLayerError(f"the adapter mixes 'lora' and 'dora' layers (DoRA on {dora[:3]}); "
                                    "PEFT's use_dora is one value for all layers.")
    rs = sorted(n for n, s in specs.items() if s.get("rslora", False))
    if rs and len(rs) < len(specs):
        plain = sorted(n for n in specs if n not in rs)
        raise UnsupportedLayerError(
            f"the adapter mixes rsLoRA layers {_few(rs)} and alpha/rank layers {_few(plain)}; PEFT's "
            "use_rslora is one value for the whole folder. Train all layers one way (inject(..., "
            "rslora=...)), or merge the adapter instead (convlora.unload or convlora merge).")
    dropouts = {float(s.get("dropout", 0.0)) for s in specs.values()}
    if len(dropouts) > 1:
        raise UnsupportedLayerError(f"the adapter's layers use several dropouts {sorted(dropouts)}; "
                                    "PEFT's lora_dropout is one value for all layers.")
    tensors: dict[str, Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for lname, spec in specs.items():
        peft_factors, r, alpha = _to_peft_factors(spec, factors[lname])
        for key, t in peft_factors.items():
            tensors[f"{PEFT_PREFIX}{lname}.{key}"] = t.detach().cpu().contiguous()
        ranks[lname], alphas[lname] = r, alpha
    for key, t in extra.items():
        tensors[PEFT_PREFIX + key] = t.detach().cpu().contiguous()
    r0 = min(Counter(ranks.values()).most_common(), key=lambda kv: (-kv[1], kv[0]))[0]
    a0 = min(Counter(alphas.values()).most_common(), key=lambda kv: (-kv[1], kv[0]))[0]
    config: dict[str, Any] = {
        "peft_type": "LORA", "task_type": None, "r": r0, "lora_alpha": a0,
        # A regular expression of the exact names: a list entry would also match longer names
        # ending with it (PEFT matches list entries as name suffixes).
        "target_modules": "(?:" + "|".join(re.escape(n) for n in specs) + ")",
        "rank_pattern": {_anchored(n): r for n, r in ranks.items() if r != r0},
        "alpha_pattern": {_anchored(n): a for n, a in alphas.items() if a != a0},
        "lora_dropout": dropouts.pop(), "bias": bias, "use_rslora": bool(rs), "use_dora": methods == {"dora"},
        "lora_bias": False, "fan_in_fan_out": False, "init_lora_weights": True,
        "modules_to_save": list(modules_to_save) or None, "exclude_modules": None,
        "layers_to_transform": None, "layers_pattern": None, "inference_mode": True,
    }
    return config, tensors


def peft_bias_key(pname: str, lora_names: set[str]) -> str:
    """PEFT's key for the bias ``pname``: under ``base_layer`` when its layer is adapted."""
    owner = pname.rpartition(".")[0]
    return f"{owner}.base_layer.bias" if owner in lora_names else pname
