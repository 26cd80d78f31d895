"""Find target layers, inject LoRA layers in place, unload them again."""

from __future__ import annotations

import difflib
from fnmatch import fnmatchcase
from typing import Any, TypeVar

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .config import PIXEL_SHUFFLE, LoRAConfig, Target, match_pattern
from .errors import ConvLoRAError, MergeStateError, TargetError, UnsupportedLayerError
from .layer import LoRALayer, unsupported_reason
from .methods import tucker_applies
from .trainable import mark_only_lora_trainable
from .wrappers import refuse_distributed, unwrap

M = TypeVar("M", bound=nn.Module)

__all__ = ["adapt_problems", "find_targets", "inject", "lora_layers", "pixel_shuffle_convs",
           "replace_module", "unload"]

# Parents known to read a child's weight without calling the child: an adapter there would be
# ignored by the unmerged forward (and get no gradient) but applied by merge().
_READ_BY_PARENT: list[tuple[type[nn.Module], tuple[str, ...], str]] = [
    (nn.MultiheadAttention, ("out_proj",),
     "nn.MultiheadAttention passes out_proj.weight to F.multi_head_attention_forward and never "
     "calls out_proj"),
    (nn.TransformerEncoderLayer, ("linear1", "linear2"),
     "nn.TransformerEncoderLayer's inference fast path (eval mode) passes linear1.weight and "
     "linear2.weight to torch._transformer_encoder_layer_fwd without calling the layers"),
]
if hasattr(nn, "LinearCrossEntropyLoss"):  # torch >= 2.14
    _READ_BY_PARENT.append((nn.LinearCrossEntropyLoss, ("linear",),
                            "nn.LinearCrossEntropyLoss passes linear.weight to "
                            "F.linear_cross_entropy and never calls linear"))


def lora_layers(model: nn.Module) -> dict[str, LoRALayer]:
    """All LoRA layers of ``model`` by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALayer)}


def _aliases(model: nn.Module, module: nn.Module) -> list[str]:
    """Every qualified name ``module`` is registered under in ``model`` (shared modules have several)."""
    return [n for n, m in model.named_modules(remove_duplicate=False) if m is module]


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Set the submodule at dotted ``name`` to ``new``, under every name it is registered as.

    A module registered twice (``m.a = m.b = conv``) is one layer: both attributes get ``new``.
    """
    if not name:
        raise ConvLoRAError("cannot replace the root module; wrap the layer in an nn.Sequential.")
    old = model.get_submodule(name)
    for alias in _aliases(model, old) or [name]:
        parent_name, _, child = alias.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)


def _is_conv(m: nn.Module) -> bool:
    return isinstance(m, (nn.modules.conv._ConvNd, LoRALayer)) and (
        not isinstance(m, LoRALayer) or m.ndim > 0)


def _is_candidate(m: nn.Module) -> bool:
    return isinstance(m, (nn.modules.conv._ConvNd, nn.Linear, LoRALayer))


class _Tracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, LoRALayer) or super().is_leaf_module(m, qualname)


def pixel_shuffle_convs(model: nn.Module) -> set[str]:
    """Names of the convs whose output feeds an ``nn.PixelShuffle`` (or ``F.pixel_shuffle``).

    Traces the model with torch.fx; when tracing fails (data-dependent control flow), falls back
    to adjacency inside ``nn.Sequential`` containers.
    """
    modules = dict(model.named_modules())
    found: set[str] = set()
    try:
        graph = _Tracer().trace(model)
    except Exception:  # noqa: BLE001 - any tracing failure means: use the structural fallback
        for name, m in modules.items():
            if isinstance(m, nn.Sequential):
                kids = list(m.named_children())
                for (n1, m1), (_, m2) in zip(kids, kids[1:]):
                    if _is_conv(m1) and isinstance(m2, nn.PixelShuffle):
                        found.add(f"{name}.{n1}" if name else n1)
        return found
    for node in graph.nodes:
        shuffles = (node.op == "call_module" and isinstance(modules.get(str(node.target)), nn.PixelShuffle)
                    ) or (node.op == "call_function" and node.target in (F.pixel_shuffle, torch.pixel_shuffle))
        if not shuffles or not node.args:
            continue
        src = node.args[0]
        if isinstance(src, torch.fx.Node) and src.op == "call_module" and _is_conv(modules[str(src.target)]):
            found.add(str(src.target))
    return found


def _as_list(target: Target | None) -> list[Any]:
    if target is None:
        return []
    if isinstance(target, str) or callable(target):
        return [target]
    return list(target)


def _select(model: nn.Module, target: Target, role: str) -> set[str]:
    """Candidate layer names (every alias of shared modules) selected by targets/exclude."""
    modules = dict(model.named_modules(remove_duplicate=False))
    names = [n for n in modules if n]
    selected: set[str] = set()
    for item in _as_list(target):
        if isinstance(item, str) and item == PIXEL_SHUFFLE:
            hits = pixel_shuffle_convs(model)
            if not hits:
                raise TargetError(f"{role} selector 'pixel_shuffle' found no conv feeding an "
                                  "nn.PixelShuffle in this model.")
        elif isinstance(item, str):
            direct = [n for n in names if match_pattern(item, n)]
            if not direct:
                close = difflib.get_close_matches(item, names, n=5, cutoff=0.4) or names[:5]
                raise TargetError(f"{role} pattern {item!r} matched no module; similar names: "
                                  f"{close}. Patterns are globs on qualified module names.")
            # A pattern naming a conv/linear directly selects it; a container selects its convs.
            hits = {n for n in direct if _is_conv(modules[n])
                    or (_is_candidate(modules[n]) and fnmatchcase(n, item))}
        elif callable(item):
            hits = {n for n in names if _is_candidate(modules[n]) and item(n, modules[n])}
        else:
            raise TargetError(f"{role} entry {item!r} is not a glob pattern, a predicate or "
                              f"{PIXEL_SHUFFLE!r}.")
        selected |= hits
    return selected


def _read_by_parent(model: nn.Module, names: list[str]) -> str | None:
    """Why one of the names is a child whose parent reads its weight without calling it."""
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        for cls, children, why in _READ_BY_PARENT:
            if isinstance(parent, cls) and child in children:
                where = f"its parent {parent_name!r}" if parent_name else "the model itself"
                return f"{why} ({where} is a {type(parent).__name__})"
    return None


_Place = tuple[str, nn.Module, int, int]  # qualified name, owning module, first and end byte


def _extent(t: torch.Tensor) -> tuple[tuple[str, int], int, int] | None:
    """``(storage key, first byte, end byte)`` of the memory ``t`` covers (``None``: no memory)."""
    if t.device.type == "meta" or t.numel() == 0:
        return None
    storage = t.untyped_storage()
    first = int(t.storage_offset()) * t.element_size()
    span = 1 + sum((int(n) - 1) * abs(int(st)) for n, st in zip(t.shape, t.stride()))
    return (str(t.device), storage.data_ptr()), first, first + span * t.element_size()


def _tensor_places(model: nn.Module) -> dict[tuple[str, int], list[_Place]]:
    """Every parameter and buffer of ``model`` (all aliases) grouped by the storage it lives in."""
    places: dict[tuple[str, int], list[_Place]] = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        for tname, t in [*module._parameters.items(), *module._buffers.items()]:
            ext = None if t is None else _extent(t)
            if ext is not None:
                key, lo, hi = ext
                places.setdefault(key, []).append((f"{mname}.{tname}" if mname else tname, module, lo, hi))
    return places


def _shared_weight(name: str, module: nn.Module, places: dict[tuple[str, int], list[_Place]]) -> str | None:
    """Why ``module.weight`` cannot be changed alone: other modules' tensors overlap its memory."""
    w = module.weight
    ext = _extent(w) if isinstance(w, torch.Tensor) else None
    if ext is None:
        return None
    key, lo, hi = ext
    others = sorted({p for p, owner, a, b in places.get(key, []) if owner is not module and a < hi and lo < b})
    if not others:
        return None
    return (f"its weight is shared with {others[:4]} (tied or aliased weights), so merge() would "
            f"change them too. Untie them first (give it its own copy: layer = model.get_submodule("
            f"{name!r}); layer.weight = nn.Parameter(layer.weight.detach().clone()))")


def find_targets(model: nn.Module, targets: Target | None = None,
                 exclude: Target | None = None) -> list[str]:
    """Qualified names of the layers ``targets`` selects minus those ``exclude`` selects.

    ``targets=None`` selects every convolution. A module registered under several names is one
    layer, named by its first name; ``exclude`` naming any of its names leaves it out.
    ``torch.compile`` / ``nn.DataParallel`` wrappers are looked through.

    Raises:
        TargetError: nothing is selected.
        UnsupportedLayerError: a selected layer cannot be adapted exactly: an unsupported type,
            a weight shared with another module or tensor, or a parent known to read the
            layer's weight without calling it (``nn.MultiheadAttention.out_proj``, ...).
    """
    model = unwrap(model)
    all_modules = dict(model.named_modules(remove_duplicate=False))
    if targets is None:
        chosen = {n for n, m in all_modules.items() if n and _is_conv(m)}
    else:
        chosen = _select(model, targets, "targets")
    dropped = {id(all_modules[n]) for n in _select(model, exclude, "exclude")} if exclude is not None else set()
    first = {id(m): n for n, m in model.named_modules()}
    chosen = {first[id(all_modules[n])] for n in chosen if id(all_modules[n]) not in dropped}
    if not chosen:
        convs = [n for n, m in model.named_modules() if n and _is_candidate(m)][:8]
        raise TargetError(f"no target layer matched (targets={targets!r}, exclude={exclude!r}); "
                          f"some conv/linear layers of this model: {convs}.")
    modules = dict(model.named_modules())
    refused = adapt_problems(model, sorted(chosen))
    if refused:
        name, reason = next(iter(refused.items()))
        raise UnsupportedLayerError(f"layer {name!r} cannot take a LoRA adapter: {reason}. "
                                    f"Leave it out with exclude=[{name!r}].")
    return [n for n in modules if n in chosen]


def adapt_problems(model: nn.Module, names: list[str]) -> dict[str, str]:
    """Why each of the named layers cannot take an adapter exactly; only those that cannot.

    The reasons: an unsupported layer type (see [unsupported_reason][convlora.layer.unsupported_reason]),
    a parent known to read the layer's weight without calling it, or a weight whose memory
    another module's parameter or buffer shares (tied or aliased weights). LoRA layers are
    checked only for the last two.
    """
    modules = dict(model.named_modules())
    places = _tensor_places(model)
    every: dict[int, list[str]] = {}
    for n, mod in model.named_modules(remove_duplicate=False):
        every.setdefault(id(mod), []).append(n)
    out: dict[str, str] = {}
    for name in names:
        m = modules[name]
        aliases = every[id(m)]
        reason = None if isinstance(m, LoRALayer) else unsupported_reason(m)
        reason = reason or _read_by_parent(model, aliases) or _shared_weight(name, m, places)
        if reason:
            also = f"(it is also registered as {aliases[1:]}) " if len(aliases) > 1 else ""
            out[name] = also + reason
    return out


def inject(model: nn.Module, rank: int | LoRAConfig = 4, alpha: float | None = None, *,
           targets: Target | None = None, exclude: Target | None = None,
           rank_pattern: dict[str, int] | None = None, alpha_pattern: dict[str, float] | None = None,
           factorization: str = "kernel", factorization_pattern: dict[str, str] | None = None,
           dropout: float = 0.0, freeze: bool = True, adapter_name: str = "default",
           method: str = "lora", method_pattern: dict[str, str] | None = None,
           rslora: bool = False, tucker: bool = False,
           tucker_pattern: dict[str, bool] | None = None) -> list[str]:
    """Replace matching layers of ``model`` in place with LoRA layers.

    Either pass the settings as keywords or a [LoRAConfig][convlora.LoRAConfig] as the second
    argument. Layers that already are LoRA layers get an additional adapter named
    ``adapter_name`` (this is how a model gets several named adapters). The new adapter becomes
    the active one. With ``freeze=True`` (the default) only the new adapter's factors train:
    [mark_only_lora_trainable][convlora.mark_only_lora_trainable] is called with ``bias="none"``;
    call it again with another bias mode to train biases too. New LoRA layers take the
    train/eval mode of the layers they replace. Everything is validated before the model is
    touched: on error the model is unchanged.

    ``method`` chooses how the adapter builds the layer's weight: ``"lora"`` (default),
    ``"dora"``, ``"loha"`` or ``"lokr"`` (see [convlora.methods][]), per layer with
    ``method_pattern``; ``rslora=True`` scales by ``alpha / sqrt(rank)``. Every method runs in
    weight space on every supported layer type (Conv1d/2d/3d, ConvTranspose1d/2d/3d, Linear).
    ``tucker=True`` (per layer ``tucker_pattern``) builds LoHa/LoKr in the Tucker form on the
    convs where it applies and is ignored on the other layers, as PEFT's
    ``use_effective_conv2d``; ``layer.tucker[adapter_name]`` records where it applied.

    ``inject`` sees the module tree, not the code that runs it: code that reads a layer's
    ``weight`` instead of calling the layer would ignore the adapter until it is merged. The
    known cases are refused (see [find_targets][convlora.find_targets]); run
    [verify][convlora.verify] once on an example input to check a model for the others.

    A model wrapped by ``torch.compile`` or ``nn.DataParallel`` is adapted inside the wrapper
    (the names returned are the unwrapped model's). ``DistributedDataParallel``/FSDP are
    refused: inject before wrapping.

    Returns:
        The qualified names of the adapted layers, in module order.
    """
    refuse_distributed(model, "inject")
    model = unwrap(model)
    if isinstance(rank, LoRAConfig):
        config = rank
    else:
        config = LoRAConfig(rank=rank, alpha=alpha, targets=targets, exclude=exclude,
                            rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
                            factorization=factorization, factorization_pattern=factorization_pattern,
                            dropout=dropout, freeze=freeze, method=method,
                            method_pattern=method_pattern, rslora=rslora, tucker=tucker,
                            tucker_pattern=tucker_pattern)
    if not isinstance(adapter_name, str) or not adapter_name.isidentifier():
        raise ConvLoRAError(f"adapter_name={adapter_name!r} must be a Python identifier.")
    names = find_targets(model, config.targets, config.exclude)
    modules = dict(model.named_modules())
    plans: list[tuple[str, LoRALayer, int, float, str, str, bool]] = []
    for name in names:
        existing = modules[name]
        layer = existing if isinstance(existing, LoRALayer) else LoRALayer(existing)
        if layer.merged_adapter is not None:
            raise MergeStateError(f"layer {name!r} is merged; unmerge() before adding adapters.")
        if adapter_name in layer.rank:
            raise MergeStateError(f"layer {name!r} already has an adapter named {adapter_name!r}; "
                                  "pick another adapter_name or delete_adapter() first.")
        r, fac, meth = config.rank_for(name), config.factorization_for(name), config.method_for(name)
        tuck = config.tucker_for(name) and tucker_applies(meth, tuple(layer.weight.shape), r)
        problem = layer.adapter_problem(r, fac, meth, tuck)
        if problem is None and meth == "dora" and config.dropout > 0:
            problem = "method 'dora' has no additive branch for dropout; use dropout=0"
        if problem:
            raise UnsupportedLayerError(f"layer {name!r}: {problem}.")
        plans.append((name, layer, r, config.alpha_for(name), fac, meth, tuck))
    for name, layer, r, a, fac, meth, tuck in plans:
        layer.add_adapter(adapter_name, r, a, fac, config.dropout, name, meth, config.rslora, tuck)
        layer.active_adapter = adapter_name
        if layer is not modules[name]:
            replace_module(model, name, layer)
    if config.freeze:  # only the new adapter trains: base, biases and other adapters stay frozen
        mark_only_lora_trainable(model, "none", adapter_name)
    return names


def unload(model: M, merge: bool = True) -> M:
    """Replace every LoRA layer by its original layer type, merging the active adapter first.

    Args:
        model: A model with LoRA layers (changed in place and returned).
        merge: Fold the active adapter into the weights; ``False`` drops the adapters instead.

    Returns:
        ``model``, now made of the original layer types with the original state-dict keys.
    """
    inner = unwrap(model)
    for name, layer in lora_layers(inner).items():
        if merge and layer.merged_adapter is None:
            layer.merge()
        elif not merge:
            layer.unmerge()
        base = layer.base_layer
        base.weight = layer.weight
        if layer.bias is not None:
            base.bias = layer.bias
        replace_module(inner, name, base)
    return model

