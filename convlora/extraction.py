"""Extract a ConvLoRA adapter from a fine-tuned network: truncated SVD of ``W_tuned - W_base``.

For every adapted layer the weight difference is viewed as the matrix the factorisation
multiplies out (the row-major ``(B.rows, A.cols)`` view of [`delta_weight`][convlora.functional.delta_weight]):

* ``"kernel"``: ``(out, in/groups * prod(kernel))``; a rank-``r`` adapter keeps ``r`` singular
  values. Grouped and depthwise convolutions are handled as they are by the layer: one SVD of
  that whole matrix (the kernel adapter is not per group).
* ``"loralib"``: ``(out * k, in * k)`` for a square ``k x k`` kernel with ``groups == 1``; a
  rank-``r`` adapter keeps ``r * k`` singular values. Other layers are refused with the reason.

The factors are split evenly, ``B = U sqrt(S)`` and ``A = sqrt(S) V^T``, with ``alpha = rank``
(scale 1), so the library's own ``delta_weight(A, B, shape, alpha / rank)`` is the truncated
``delta W``. At full rank, base plus adapter reproduces the tuned weights to float tolerance;
everything else that differs (biases, norms, untargeted layers, buffers) is reported per key,
and changed biases can be carried as the adapter's bias entries.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from .adapters import save_adapter
from .config import PIXEL_SHUFFLE, Target, match_pattern, pattern_lookup
from .errors import ConvLoRAError, TargetError, UnsupportedLayerError
from .functional import (
    FACTORIZATIONS,
    delta_weight,
    factorization_problem,
    lora_shapes,
    max_rank,
    merged_weight,
)
from .layer import LoRALayer
from .state_dict import load_state_dict
from .surgery import find_targets, lora_layers, replace_module
from .trainable import BiasMode

__all__ = ["Extraction", "KeyDifference", "LayerExtraction", "extract", "extract_file"]

_CONV_BY_NDIM: dict[int, type[nn.Module]] = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}


@dataclass(frozen=True)
class LayerExtraction:
    """What the extraction kept for one adapted layer.

    Attributes:
        name: Qualified layer name.
        factorization: ``"kernel"`` or ``"loralib"``.
        rank: Rank of the adapter (``alpha`` is the same number: scale 1).
        max_rank: The layer's full rank for this factorisation.
        requested: The rank asked for (``None``: chosen by ``energy`` or full rank); a request
            above ``max_rank`` is capped, which keeps everything.
        kept: Singular values kept in the factorisation's view (``rank``, or ``rank * k`` for
            ``"loralib"``).
        singular_values: The whole spectrum of ``delta W`` in that view (float64, CPU).
        energy: Fraction of ``||delta W||_F^2`` kept.
        rel_error: ``||delta_adapter - delta W||_F / ||delta W||_F``, measured on the adapter's
            float32 delta.
        weight_error: ``||merged - W_tuned||_F / ||W_tuned||_F`` after merging in the weight's
            dtype, as [`merge`][convlora.merge] does.
        tolerance: The ``weight_error`` the exactness check allows.
    """

    name: str
    factorization: str
    rank: int
    max_rank: int
    requested: int | None
    kept: int
    singular_values: Tensor
    energy: float
    rel_error: float
    weight_error: float
    tolerance: float


@dataclass(frozen=True)
class KeyDifference:
    """A state-dict entry outside the adapted weights where base and tuned differ.

    Attributes:
        key: State-dict key.
        kind: What it is, e.g. ``"bias of an adapted layer"``, ``"BatchNorm2d running_mean"``,
            ``"weight of an untargeted layer"``, ``"only in tuned"``.
        rel_diff: ``||tuned - base||_F / ||tuned||_F`` (``inf`` for missing or mis-shaped keys).
        stored: True when the adapter carries the tuned value (a bias entry).
        tolerance: The ``rel_diff`` the exactness check allows when it is not stored.
    """

    key: str
    kind: str
    rel_diff: float
    tolerance: float
    stored: bool = False


@dataclass
class Extraction:
    """Result of [`extract`][convlora.extract]: the model with the adapter, and the report.

    Attributes:
        model: A copy of the base module with the adapter injected and active (the base factors
            frozen, the adapter's trainable). For state-dict inputs it is a stand-in holding only
            the state dict's layers (its conv settings, which the adapter file records, are
            PyTorch's defaults; they are not used when loading or merging); save it with
            [`save_adapter`][convlora.save_adapter]``(model, path, bias=bias_mode)``.
        adapter_name: The adapter's name on ``model``.
        layers: Per adapted layer, what was kept.
        differences: Every other differing key.
        unchanged: Targeted layers whose weight did not change (no adapter).
        bias_mode: ``"none"``, ``"lora_only"`` or ``"all"``: which biases the adapter carries
            (``store_biases=True`` picks the narrowest mode that holds every changed bias).
        output_error: With a probe: ``{"rel_to_tuned": ||y - y_t|| / ||y_t||,
            "rel_to_change": ||y - y_t|| / ||y_t - y_b||}`` (``y`` from ``model``).
    """

    model: nn.Module
    adapter_name: str
    layers: dict[str, LayerExtraction]
    differences: list[KeyDifference]
    unchanged: list[str]
    bias_mode: BiasMode
    output_error: dict[str, float] | None = field(default=None)

    def leftovers(self) -> list[str]:
        """Why base + adapter does not reproduce the tuned model (empty when it does)."""
        out = []
        for lyr in self.layers.values():
            if lyr.weight_error > lyr.tolerance:
                out.append(f"{lyr.name}.weight: rank {lyr.rank} of {lyr.max_rank} leaves a relative "
                           f"error of {lyr.weight_error:.3g} (delta W error {lyr.rel_error:.3g})")
        for d in self.differences:
            if not d.stored and d.rel_diff > d.tolerance:
                hint = " (pass store_biases=True to carry it)" if "bias" in d.kind else ""
                out.append(f"{d.key}: {d.kind} differs by {d.rel_diff:.3g} relative, not in the "
                           f"adapter{hint}")
        return out

    @property
    def exact(self) -> bool:
        """True when base + adapter reproduces every tuned tensor within its tolerance."""
        return not self.leftovers()

    def check_exact(self) -> None:
        """Raise [`ConvLoRAError`][convlora.ConvLoRAError] listing everything left over."""
        left = self.leftovers()
        if left:
            raise ConvLoRAError(f"base + extracted adapter does not reproduce the tuned model "
                                f"({len(left)} tensors off): " + "; ".join(left[:12])
                                + ("; ..." if len(left) > 12 else ""))

    def summary(self) -> str:
        """A text table of the adapted layers, the other differences and the exactness verdict."""
        rows = [("layer", "factorization", "rank", "kept/total", "energy", "dW rel err", "W rel err")]
        for lyr in self.layers.values():
            capped = "*" if lyr.requested is not None and lyr.requested > lyr.max_rank else ""
            rows.append((lyr.name, lyr.factorization, f"{lyr.rank}/{lyr.max_rank}{capped}",
                         f"{lyr.kept}/{lyr.singular_values.numel()}", f"{lyr.energy:.6f}",
                         f"{lyr.rel_error:.3e}", f"{lyr.weight_error:.3e}"))
        lines = _table(rows)
        if any(r[2].endswith("*") for r in rows[1:]):
            lines.append("* requested rank above the layer's full rank, capped")
        if self.differences:
            lines += ["", "other differences (key, what, relative difference, in the adapter):"]
            lines += _table([(d.key, d.kind, f"{d.rel_diff:.3e}", "yes" if d.stored else "no")
                             for d in self.differences])
        if self.unchanged:
            lines.append(f"targeted but unchanged (no adapter): {self.unchanged}")
        if self.output_error:
            lines.append("probe output error: " + ", ".join(f"{k} {v:.3e}" for k, v in self.output_error.items()))
        left = self.leftovers()
        lines.append("exact: yes" if not left else f"exact: no ({len(left)} tensors off)")
        return "\n".join(lines)


def _table(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def _tol(tol: float | None, value: Tensor) -> float:
    """The check's tolerance for a tensor: ``tol``, or 10 epsilons of its dtype (0 for integers)."""
    if tol is not None:
        return float(tol)
    return 10 * torch.finfo(value.dtype).eps if value.is_floating_point() else 0.0


def _rel(a: Tensor, b: Tensor) -> float:
    """``||a - b|| / ||b||`` in float64 (``inf`` when b is zero and a is not)."""
    a64, b64 = a.detach().double(), b.detach().double()
    num, den = float((a64 - b64).norm()), float(b64.norm())
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


def _check_int(value: object, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConvLoRAError(f"{where}={value!r} is invalid: a rank must be an integer >= 1.")


def _validate(rank: int | None, energy: float | None, factorization: str,
              rank_pattern: Mapping[str, int] | None, tol: float | None, adapter_name: str) -> None:
    if rank is not None:
        _check_int(rank, "rank")
    for pattern, r in (rank_pattern or {}).items():
        _check_int(r, f"rank_pattern[{pattern!r}]")
    if energy is not None and (isinstance(energy, bool) or not isinstance(energy, (int, float))
                               or not 0.0 < energy <= 1.0):
        raise ConvLoRAError(f"energy={energy!r} is invalid: give the fraction of ||delta W||^2 to "
                            "keep, a number in (0, 1].")
    if factorization not in FACTORIZATIONS:
        raise ConvLoRAError(f"factorization={factorization!r} is not one of {FACTORIZATIONS}.")
    if tol is not None and (isinstance(tol, bool) or not isinstance(tol, (int, float)) or tol <= 0):
        raise ConvLoRAError(f"tol={tol!r} is invalid: a positive relative tolerance, e.g. 1e-6.")
    if not isinstance(adapter_name, str) or not adapter_name.isidentifier():
        raise ConvLoRAError(f"adapter_name={adapter_name!r} must be a Python identifier.")


def _state(src: nn.Module | Mapping[str, Tensor], role: str) -> dict[str, Tensor]:
    if isinstance(src, nn.Module):
        if lora_layers(src):
            raise ConvLoRAError(f"the {role} model has LoRA layers; call convlora.unload(model, "
                                "merge=True) first so its weights are plain weights.")
        return {k: v.detach() for k, v in src.state_dict().items()}
    if isinstance(src, Mapping):
        bad = [k for k, v in src.items() if not isinstance(v, Tensor)]
        if bad:
            raise ConvLoRAError(f"the {role} state dict has non-tensor entries {bad[:5]}; pass a "
                                "flat {key: tensor} mapping (convlora's state-dict reader unwraps nesting).")
        return {str(k): v.detach() for k, v in src.items()}
    raise ConvLoRAError(f"{role} must be an nn.Module or a state dict, got {type(src).__name__}.")


def _differs(a: Tensor, b: Tensor) -> bool:
    return a.shape != b.shape or not torch.equal(a, b.to(a.dtype))


def _select_layers(base: nn.Module | None, sd_b: dict[str, Tensor], sd_t: dict[str, Tensor],
                   targets: Target | None, exclude: Target | None) -> tuple[list[str], list[str]]:
    """(changed targeted layers, unchanged targeted layers), in module / key order."""
    def changed(name: str) -> bool:
        k = f"{name}.weight"
        return k in sd_b and k in sd_t and _differs(sd_b[k], sd_t[k])

    if base is not None:
        if targets is None:
            convs = [n for n, m in base.named_modules() if n and isinstance(m, nn.modules.conv._ConvNd)]
            if not any(changed(n) for n in convs):
                return [], []
            try:  # find_targets checks each selected layer and names the ones it cannot adapt
                names = find_targets(base, lambda n, m: isinstance(m, nn.modules.conv._ConvNd) and changed(n),
                                     exclude)
            except TargetError:
                raise TargetError(f"exclude={exclude!r} leaves out every convolution whose weight "
                                  "differs; nothing to extract.") from None
            return names, []
        names = find_targets(base, targets, exclude)
    else:
        layers = [k[: -len(".weight")] for k, v in sd_b.items() if k.endswith(".weight")]
        if targets is None:
            names = [n for n in layers if sd_b[f"{n}.weight"].ndim in _CONV_BY_NDIM]
        else:
            names = [n for n in layers if sd_b[f"{n}.weight"].ndim in (2, *_CONV_BY_NDIM)
                     and any(match_pattern(p, n) for p in _patterns(targets, "targets"))]
            if not names:
                raise TargetError(f"targets={targets!r} matched no '<layer>.weight' of 2 to 5 "
                                  f"dimensions; some layers: {layers[:8]}.")
        if exclude is not None:
            names = [n for n in names if not any(match_pattern(p, n) for p in _patterns(exclude, "exclude"))]
    keep = [n for n in names if changed(n)]
    return keep, [n for n in names if n not in keep]


def _patterns(target: Target, role: str) -> list[str]:
    items = [target] if isinstance(target, str) or callable(target) else list(target)
    for item in items:
        if not isinstance(item, str) or item == PIXEL_SHUFFLE:
            raise TargetError(f"{role} entry {item!r} needs the model; with state dicts give glob "
                              "patterns on layer names (e.g. 'block_*'), or pass nn.Modules.")
    return [str(i) for i in items]


def _factor(dw: Tensor, factorization: str, shape: tuple[int, ...], groups: int, requested: int | None,
            energy: float | None, name: str) -> tuple[Tensor, Tensor, int, int, Tensor, float]:
    """(A, B, rank, kept, spectrum, energy kept) of the truncated SVD in the factorisation's view."""
    full = max_rank(factorization, shape, groups)
    (a_rows, a_cols), (b_rows, _) = lora_shapes(factorization, shape, full, groups)
    per_rank = a_rows // full  # singular values per unit of rank: 1, or k for "loralib"
    if not torch.isfinite(dw).all():
        raise ConvLoRAError(f"layer {name!r}: the base or tuned weight has NaN or Inf values.")
    u, s, vh = torch.linalg.svd(dw.reshape(b_rows, a_cols), full_matrices=False)
    total = float((s * s).sum())
    rank = full if requested is None else min(requested, full)
    if energy is not None:
        cum = torch.cumsum(s * s, 0) / total
        needed = int(torch.searchsorted(cum, torch.tensor(energy * (1 - 1e-12), dtype=cum.dtype))) + 1
        rank = min(rank, max(1, math.ceil(min(needed, s.numel()) / per_rank)))
    kept = min(rank * per_rank, s.numel())
    root = s[:kept].sqrt()
    a = torch.zeros(rank * per_rank, a_cols, dtype=dw.dtype, device=dw.device)
    b = torch.zeros(b_rows, rank * per_rank, dtype=dw.dtype, device=dw.device)
    a[:kept] = root[:, None] * vh[:kept]
    b[:, :kept] = u[:, :kept] * root[None, :]
    return a, b, rank, kept, s.cpu(), float((s[:kept] ** 2).sum()) / total


@contextmanager
def _eval_mode(*models: nn.Module) -> Iterator[None]:
    flags = [(m, m.training) for model in models for m in model.modules()]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for m, was in flags:
            m.training = was


def _stand_in(sd: dict[str, Tensor], layers: Sequence[str]) -> nn.Module:
    """A module tree holding the state dict's float ``weight``/``bias`` entries as parameters,
    with real conv/linear layers at ``layers`` so that they can take adapters."""
    root = nn.Module()
    for name in layers:
        if any(k.startswith(f"{name}.") and "." in k[len(name) + 1:] for k in sd):
            raise ConvLoRAError(f"state-dict layer {name!r} also has sub-layers; pass nn.Modules instead.")

    def node(path: str) -> nn.Module:
        mod = root
        for part in [p for p in path.split(".") if p]:
            if part not in mod._modules:
                mod.add_module(part, nn.Module())
            mod = mod._modules[part]  # type: ignore[assignment]
        return mod

    for name in layers:
        w = sd[f"{name}.weight"]
        has_bias = f"{name}.bias" in sd
        layer: nn.Module = (nn.Linear(w.shape[1], w.shape[0], bias=has_bias, device="meta") if w.ndim == 2
                            else _CONV_BY_NDIM[w.ndim](w.shape[1], w.shape[0], tuple(w.shape[2:]),
                                                       bias=has_bias, device="meta"))
        parent, _, child = name.rpartition(".")
        node(parent).add_module(child, layer)
    for key, value in sd.items():
        owner, _, leaf = key.rpartition(".")
        if leaf in ("weight", "bias") and value.is_floating_point():
            setattr(node(owner), leaf, nn.Parameter(value.clone(), requires_grad=False))
    return root


def extract(
    base: nn.Module | Mapping[str, Tensor],
    tuned: nn.Module | Mapping[str, Tensor],
    *,
    rank: int | None = None,
    energy: float | None = None,
    factorization: str = "kernel",
    targets: Target | None = None,
    exclude: Target | None = None,
    rank_pattern: Mapping[str, int] | None = None,
    store_biases: bool = False,
    probe: Tensor | None = None,
    tol: float | None = None,
    adapter_name: str = "default",
) -> Extraction:
    """Extract an adapter that turns ``base`` into (approximately) ``tuned``.

    Per adapted layer, ``delta W = W_tuned - W_base`` (float64) is factorised by a truncated SVD
    in the factorisation's own matrix view; the adapter gets ``alpha = rank``. Neither input is
    changed; on error nothing is returned and nothing changes.

    Args:
        base: The base network, as a module or a state dict.
        tuned: The fine-tuned network (same architecture), as a module or a state dict.
        rank: Rank of every adapter; ``None`` (with ``energy=None``) keeps the full rank, which
            reproduces the tuned weights. A rank above a layer's full rank is capped.
        energy: Instead, per layer the smallest rank keeping this fraction of
            ``||delta W||_F^2`` (capped at ``rank`` when both are given).
        factorization: ``"kernel"`` or ``"loralib"`` (see [convlora.functional][]).
        targets: Layers to adapt: glob patterns on qualified names (with modules also predicates
            and ``"pixel_shuffle"``). Default: every convolution whose weight differs. Targeted
            layers whose weight did not change get no adapter (listed in ``unchanged``).
        exclude: Layers to leave out, same forms.
        rank_pattern: ``{pattern: rank}`` per-layer ranks (first matching glob wins); these
            override ``rank`` and ``energy``.
        store_biases: Carry every changed bias as the adapter's bias entries (bias mode
            ``"lora_only"`` when all of them belong to adapted layers, else ``"all"``).
        probe: An input batch; the tuned and the extracted model are run on it (eval mode) and
            the output error is reported. Needs ``base`` as a module.
        tol: Relative Frobenius tolerance per tensor of the exactness check (default 10
            epsilons of the tensor's dtype: about 1.2e-6 in float32).
        adapter_name: Name of the adapter on the returned model.

    Returns:
        The [`Extraction`][convlora.Extraction]: ``model`` with the adapter, per-layer report,
        other differences, and [`check_exact`][convlora.Extraction.check_exact].

    Raises:
        ConvLoRAError: bad arguments, mismatched inputs, or a layer the factorisation cannot
            take (the message names the layer and why).
    """
    _validate(rank, energy, factorization, rank_pattern, tol, adapter_name)
    sd_b, sd_t = _state(base, "base"), _state(tuned, "tuned")
    base_mod = base if isinstance(base, nn.Module) else None
    if probe is not None and base_mod is None:
        raise ConvLoRAError("probe= needs base as an nn.Module (to run the extracted model).")
    names, unchanged = _select_layers(base_mod, sd_b, sd_t, targets, exclude)
    modules = dict(base_mod.named_modules()) if base_mod is not None else {}
    plans: list[tuple[str, Tensor, Tensor, LayerExtraction]] = []
    for name in names:
        key = f"{name}.weight"
        w_b, w_t = sd_b[key], sd_t[key]
        if w_b.shape != w_t.shape:
            raise ConvLoRAError(f"layer {name!r}: base weight {tuple(w_b.shape)} and tuned weight "
                                f"{tuple(w_t.shape)} differ in shape; are these the same architecture?")
        shape = tuple(w_b.shape)
        groups = int(getattr(modules.get(name), "groups", 1))
        problem = factorization_problem(factorization, shape, groups)
        if problem:
            raise UnsupportedLayerError(f"layer {name!r}: {problem} (weight {shape}, groups={groups}); "
                                        "use factorization='kernel' or exclude this layer.")
        by_pattern = any(match_pattern(p, name) for p in (rank_pattern or {}))
        requested = pattern_lookup(rank_pattern, name, rank)
        layer_energy = None if by_pattern else energy
        dw = w_t.double() - w_b.double()
        a64, b64, r, kept, spectrum, kept_energy = _factor(dw, factorization, shape, groups, requested,
                                                           layer_energy, name)
        a, b = a64.to(w_b.dtype), b64.to(w_b.dtype)
        got = delta_weight(a, b, shape, 1.0)
        report = LayerExtraction(
            name=name, factorization=factorization, rank=r, max_rank=max_rank(factorization, shape, groups),
            requested=requested, kept=kept, singular_values=spectrum, energy=kept_energy,
            rel_error=_rel(got, dw), weight_error=_rel(merged_weight(w_b, a, b, 1.0), w_t),
            tolerance=_tol(tol, w_t))
        plans.append((name, a, b, report))
    if not plans:
        raise TargetError(f"no targeted layer's weight differs between base and tuned (targets="
                          f"{targets!r}, unchanged targeted layers: {unchanged[:8]}); nothing to extract.")
    adapted = {p[0] for p in plans}
    differences = _differences(base_mod, sd_b, sd_t, adapted, tol)
    params = dict(base_mod.named_parameters()) if base_mod is not None else sd_b
    changed_biases = {d.key for d in differences if d.key.endswith(".bias") and d.key in params
                      and math.isfinite(d.rel_diff)}
    bias_mode: BiasMode = "none"
    if store_biases and changed_biases:
        owners = {k.rpartition(".")[0] for k in changed_biases}
        bias_mode = "lora_only" if owners <= adapted else "all"
        differences = [dataclasses.replace(d, stored=d.key in changed_biases) for d in differences]

    model = copy.deepcopy(base_mod) if base_mod is not None else _stand_in(sd_b, names)
    model.requires_grad_(False)
    with torch.no_grad():
        for d in differences:
            if d.stored:
                bias = model.get_parameter(d.key)
                bias.copy_(sd_t[d.key])
                bias.requires_grad_(True)
        for name, a, b, rep in plans:
            layer = LoRALayer(model.get_submodule(name))
            layer.add_adapter(adapter_name, rep.rank, float(rep.rank), factorization, 0.0, name)
            layer.lora_A[adapter_name].copy_(a)
            layer.lora_B[adapter_name].copy_(b)
            layer.lora_A[adapter_name].requires_grad_(True)
            layer.lora_B[adapter_name].requires_grad_(True)
            layer.active_adapter = adapter_name
            replace_module(model, name, layer)
    result = Extraction(model=model, adapter_name=adapter_name, layers={p[0]: p[3] for p in plans},
                        differences=differences, unchanged=unchanged, bias_mode=bias_mode)
    if probe is not None and base_mod is not None:
        result.output_error = _output_error(base_mod, tuned, sd_t, model, probe)
    return result


def _kind(key: str, modules: dict[str, nn.Module], adapted: set[str], sd: dict[str, Tensor]) -> str:
    owner, _, leaf = key.rpartition(".")
    if owner in adapted and leaf == "bias":
        return "bias of an adapted layer"
    mod = modules.get(owner)
    if mod is not None:
        untargeted = leaf == "weight" and isinstance(mod, (nn.modules.conv._ConvNd, nn.Linear))
        return f"{type(mod).__name__} {leaf}" + (" (layer not targeted)" if untargeted else "")
    if leaf == "bias":
        return "bias"
    if leaf == "weight" and sd[key].ndim >= 2:
        return "weight of an untargeted layer"
    return "tensor"


def _differences(base: nn.Module | None, sd_b: dict[str, Tensor], sd_t: dict[str, Tensor],
                 adapted: set[str], tol: float | None) -> list[KeyDifference]:
    modules = dict(base.named_modules()) if base is not None else {}
    out = []
    for key in [*sd_b, *(k for k in sd_t if k not in sd_b)]:
        if key.endswith(".weight") and key[: -len(".weight")] in adapted:
            continue
        if key not in sd_t or key not in sd_b:
            out.append(KeyDifference(key, "only in base" if key in sd_b else "only in tuned", math.inf, 0.0))
        elif sd_b[key].shape != sd_t[key].shape:
            out.append(KeyDifference(key, f"shape {tuple(sd_b[key].shape)} in base, "
                                          f"{tuple(sd_t[key].shape)} in tuned", math.inf, 0.0))
        elif _differs(sd_b[key], sd_t[key]):
            out.append(KeyDifference(key, _kind(key, modules, adapted, sd_b), _rel(sd_b[key], sd_t[key]),
                                     _tol(tol, sd_t[key])))
    return out


def _output_error(base: nn.Module, tuned: nn.Module | Mapping[str, Tensor], sd_t: dict[str, Tensor],
                  model: nn.Module, probe: Tensor) -> dict[str, float]:
    if isinstance(tuned, nn.Module):
        tuned_mod = tuned
    else:
        tuned_mod = copy.deepcopy(base)
        tuned_mod.load_state_dict(sd_t)
    with torch.no_grad(), _eval_mode(base, tuned_mod, model):
        y_b, y_t, y = base(probe), tuned_mod(probe), model(probe)
    change = float((y_t.double() - y_b.double()).norm())
    err = float((y.double() - y_t.double()).norm())
    return {"rel_to_tuned": err / max(float(y_t.double().norm()), 1e-300),
            "rel_to_change": err / change if change > 0 else (0.0 if err == 0 else math.inf)}


def _same_file(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def extract_file(
    base: str | os.PathLike[str],
    tuned: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    rank: int | None = None,
    energy: float | None = None,
    factorization: str = "kernel",
    targets: Target | None = None,
    exclude: Target | None = None,
    rank_pattern: Mapping[str, int] | None = None,
    store_biases: bool = False,
    tol: float | None = None,
    adapter_name: str = "default",
    key: str | None = None,
    require_exact: bool = False,
) -> Extraction:
    """[`extract`][convlora.extract] between two state-dict files and write the adapter file.

    The files are read with [`load_state_dict`][convlora.load_state_dict] (``.safetensors``
    through safetensors, torch checkpoints with ``weights_only=True``); the adapter is written
    atomically with [`save_adapter`][convlora.save_adapter] in the bias mode the extraction
    chose. ``out`` may not be one of the inputs; nothing is written when an error is raised.

    Args:
        base: The base weights file.
        tuned: The fine-tuned weights file.
        out: The adapter file to write (``.safetensors``).
        rank: See [`extract`][convlora.extract], as are the other extraction arguments.
        energy: Fraction of ``||delta W||_F^2`` to keep per layer.
        factorization: ``"kernel"`` or ``"loralib"``.
        targets: Glob patterns on layer names (default: every conv weight that differs).
        exclude: Glob patterns of layers to leave out.
        rank_pattern: ``{pattern: rank}`` per-layer ranks.
        store_biases: Carry the changed biases in the file.
        tol: Tolerance of the exactness check.
        adapter_name: The adapter's name in the file.
        key: Checkpoint entry holding the weights, for both files (default: unwrapped as
            [`load_state_dict`][convlora.load_state_dict] does).
        require_exact: Raise (and write nothing) unless base + adapter reproduces the tuned file.

    Returns:
        The [`Extraction`][convlora.Extraction] (its ``model`` is a stand-in; see there).
    """
    out_path = Path(out)
    if out_path.suffix.lower() != ".safetensors":
        raise ConvLoRAError(f"{out_path}: an adapter file is written as safetensors; give the output a "
                            ".safetensors suffix.")
    for role, src in (("base", base), ("tuned", tuned)):
        if _same_file(out_path, Path(src)):
            raise ConvLoRAError(f"the output {str(out_path)!r} is the {role} input; choose another --out "
                                "(extraction never overwrites an input).")
    ex = extract(load_state_dict(base, key=key), load_state_dict(tuned, key=key), rank=rank, energy=energy,
                 factorization=factorization, targets=targets, exclude=exclude, rank_pattern=rank_pattern,
                 store_biases=store_biases, tol=tol, adapter_name=adapter_name)
    if require_exact:
        ex.check_exact()
    info = {"base": Path(base).name, "tuned": Path(tuned).name, "exact": ex.exact,
            "ranks": {n: lyr.rank for n, lyr in ex.layers.items()}}
    save_adapter(ex.model, out_path, name=adapter_name, bias=ex.bias_mode,
                 metadata={"extracted_from": info})
    return ex
