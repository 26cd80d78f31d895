"""The LoRA layer: a conv (or linear) whose weight gets a low-rank, weight-space update.

The layer replaces a base ``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d`` or ``nn.Linear`` in
place. It keeps the base parameters under their original names (``weight``, ``bias``) so
state-dict keys do not move, and adds each adapter's factors beside them as
``<factor>.<adapter>`` (``lora_A.<adapter>`` / ``lora_B.<adapter>`` for LoRA; the other
methods' factor names are listed in [convlora.methods][]).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ._functorch import functorch_transform_active
from .combination import grouped_forward, weighted_weight
from .errors import AdapterMismatchError, MergeStateError, UnsupportedLayerError
from .functional import factorization_problem, max_rank
from .loha import LOHA_KHATRI_RAO_MAX_RANK, loha_khatri_rao
from .lokr import lokr_w2
from .lowrank_conv import (
    activation_backward_conv,
    activation_backward_kron_conv,
    activation_backward_pays,
    conv_output_numel,
    conv_spec,
)
from .methods import effective_weight as _effective_weight
from .methods import factor_shapes, init_factors_, method_delta, method_problem, scale_for

__all__ = ["LoRALayer", "unsupported_reason"]

_CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSED_TYPES: tuple[type[nn.Module], ...] = (nn.ConvTranspose1d, nn.ConvTranspose2d,
                                                  nn.ConvTranspose3d)
_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T_FN = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_NDIM = {"Conv1d": 1, "Conv2d": 2, "Conv3d": 3,
         "ConvTranspose1d": 1, "ConvTranspose2d": 2, "ConvTranspose3d": 3}


def _base_class(module: nn.Module) -> type[nn.Module] | None:
    for cls in (*_CONV_TYPES, *_TRANSPOSED_TYPES, nn.Linear):
        if isinstance(module, cls):
            return cls
    return None


def unsupported_reason(module: nn.Module) -> str | None:
    """Why ``module`` cannot carry an exact weight-space adapter, or ``None`` when it can."""
    name = type(module).__name__
    base = _base_class(module)
    if base is None:
        return f"{name} is not a Conv1d/Conv2d/Conv3d/ConvTranspose1d/2d/3d/Linear layer"
    if isinstance(module, nn.modules.lazy.LazyModuleMixin):
        return f"{name} is a lazy module; run one forward pass to materialise it first"
    if parametrize.is_parametrized(module):
        return f"{name} has a torch.nn.utils.parametrize parametrization (e.g. weight norm)"
    if hasattr(module, "weight_g") or hasattr(module, "weight_v") or module._forward_pre_hooks:
        return f"{name} has forward pre-hooks (e.g. the old weight_norm) that change its weight"
    cls = type(module)
    transposed = base in _TRANSPOSED_TYPES
    for method in ("forward", "_output_padding") if transposed else ("forward", "_conv_forward"):
        if getattr(cls, method, None) is not getattr(base, method, None):
            return (f"{name} overrides {method}() (as timm's Conv2dSame/StdConv2d do); a weight-space"
                    f" update through the plain {base.__name__} function would skip that logic")
    if module._forward_hooks:
        return f"{name} has forward hooks, which would be lost when the layer is replaced"
    return None


class LoRALayer(nn.Module):
    r"""A conv, transposed conv or linear layer with adapters applied in weight space.

    For the active adapter with factors ``A``, ``B``, rank ``r`` and alpha ``a`` (method
    ``"lora"``):

    .. math::
        y = \operatorname{conv}\big(x,\; W + \tfrac{a}{r}\,\operatorname{reshape}(B A),\; b\big)

    computed as *one* convolution through the base layer's own settings (stride, padding
    including ``'same'``/``'valid'``, dilation, groups, padding_mode; for transposed convs also
    output_padding and ``forward(x, output_size=...)``), so the merged layer ``W' = W + \Delta W``
    gives the same output. The other methods (``"dora"``, ``"loha"``, ``"lokr"``, see
    [convlora.methods][]) only change how ``W'`` is built. The effective weight is built exactly
    as `merge` builds it (summed in the weight's precision, at least float32, then cast to the
    weight's dtype). With dropout ``p > 0`` and in training mode, the adapter cannot live in
    weight space; the forward is then
    ``conv(x, W, b) + conv(dropout(x), \Delta W)`` -- two convolutions, equal in expectation
    (methods with an additive delta only: DoRA refuses dropout).

    The new layer takes the train/eval mode of the layer it wraps. Its state dict holds the
    *base* weight under ``weight`` whatever the merge state, so a state dict saved while merged
    loads correctly into an unmerged model and vice versa (a merged layer re-merges after the
    load).

    Args:
        base: The layer to wrap; its ``weight``/``bias`` parameters are reused, not copied.

    Attributes:
        active_adapter: The adapter that the forward and ``merge`` use (``None``: the base layer
            alone). Change it with [`set_adapter`][convlora.set_adapter]. Assigned by hand, it
            runs that adapter alone, at weight 1, unless it is the first name of the mix in
            ``adapter_weights``: the mix applies only while its first name is active (it stays
            stored meanwhile, and applies again when that name is assigned back).
        adapter_weights: The weighted mix ``{name: weight}`` that ``set_adapter`` sets for
            several names (its first key is ``active_adapter``), or ``None``;
            ``composition()`` returns it while it applies.
    """

    base_layer: nn.Module
    unmerged_weight: Tensor | None
    stride: tuple[int, ...]
    padding: str | tuple[int, ...]
    dilation: tuple[int, ...]
    padding_mode: str
    output_padding: tuple[int, ...]
    kernel_size: tuple[int, ...]
    _reversed_padding_repeated_twice: list[int]

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        reason = unsupported_reason(base)
        if reason is not None:
            raise UnsupportedLayerError(f"cannot wrap {type(base).__name__}: {reason}.")
        self.weight: nn.Parameter = base.weight  # type: ignore[assignment]
        self.bias: nn.Parameter | None = base.bias  # type: ignore[assignment]
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.rank: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.factorization: dict[str, str] = {}
        self.dropout: dict[str, float] = {}
        self.method: dict[str, str] = {}
        self.rslora: dict[str, bool] = {}
        self.tucker: dict[str, bool] = {}
        self.active_adapter: str | None = None
        # Several active adapters with weights (first key == active_adapter), set by set_adapter.
        self.adapter_weights: dict[str, float] | None = None
        # One adapter name per sample of the batch, set by convlora.per_sample for its block.
        self.sample_adapters: tuple[str | None, ...] | None = None
        self.merged_adapter: str | None = None
        self.disabled = False
        self.register_buffer("unmerged_weight", None, persistent=False)
        self.base_type = _base_class(base).__name__  # type: ignore[union-attr]
        self.ndim = _NDIM.get(self.base_type, 0)
        self.transposed = self.base_type.startswith("ConvTranspose")
        self.groups = int(getattr(base, "groups", 1))
        if self.ndim:
            conv: Any = base
            self.stride, self.padding = tuple(conv.stride), conv.padding
            self.dilation, self.padding_mode = tuple(conv.dilation), str(conv.padding_mode)
            self._reversed_padding_repeated_twice = list(conv._reversed_padding_repeated_twice)
            self.output_padding = tuple(conv.output_padding)
            self.kernel_size = tuple(conv.kernel_size)
        # The original module, kept outside the module tree (no state-dict keys) for unload().
        self.__dict__["base_layer"] = base
        self._remerge: str | None = None
        self.register_load_state_dict_post_hook(_remerge_after_load)
        self.train(base.training)

    def extra_repr(self) -> str:
        shape = "x".join(str(s) for s in self.weight.shape)
        adapters = ", ".join(f"{n}({self.method[n]}, r={self.rank[n]}, a={self.alpha[n]:g}, "
                             f"{self.factorization[n]}{', rslora' if self.rslora[n] else ''}"
                             f"{', tucker' if self.tucker[n] else ''})"
                             for n in self.rank)
        return (f"{self.base_type} {shape}, adapters=[{adapters}], active={self.active_adapter!r}, "
                f"merged={self.merged_adapter!r}")

    # -- adapters ------------------------------------------------------------------------------
    def check_can_load(self, layer_name: str, name: str) -> None:
        """Raise unless adapter ``name`` can be loaded here: the layer is unmerged and has no
        adapter of that name (the one check behind loading a convlora or a PEFT file)."""
        if self.merged_adapter is not None:
            raise MergeStateError(f"layer {layer_name!r} is merged; unmerge() before loading adapters.")
        if name in self.rank:
            raise AdapterMismatchError(f"layer {layer_name!r} already has an adapter {name!r}; load it "
                                       "under another name= or delete_adapter() first.")

    def add_adapter(self, name: str, rank: int, alpha: float, factorization: str = "kernel",
                    dropout: float = 0.0, layer_name: str = "?", method: str = "lora",
                    rslora: bool = False, tucker: bool = False) -> None:
        """Add a freshly initialised adapter (it starts as the identity: the output does not change).

        ``tucker=True`` builds a LoHa/LoKr adapter in the Tucker form (see [convlora.methods][]);
        it is refused where it does not apply. ([inject][convlora.inject] asks for it only where
        [tucker_applies][convlora.methods.tucker_applies].)
        """
        problem = self.adapter_problem(rank, factorization, method, tucker)
        if problem is None and method == "dora" and dropout > 0:
            problem = ("method 'dora' rescales W + delta and has no additive branch for dropout; "
                       "use dropout=0")
        if problem:
            raise UnsupportedLayerError(f"layer {layer_name!r}: {problem}.")
        if name in self.rank:
            raise MergeStateError(f"layer {layer_name!r} already has an adapter named {name!r}; "
                                  "pick another adapter_name or delete_adapter() it first.")
        shapes = factor_shapes(method, factorization, tuple(self.weight.shape), rank, self.groups,
                               self.transposed, tucker)
        kw: dict[str, Any] = {"device": self.weight.device, "dtype": self.weight.dtype}
        made = {f: nn.Parameter(torch.empty(shape, **kw)) for f, shape in shapes.items()}
        init_factors_(method, made, self.weight, self.groups, self.transposed)
        for f, param in made.items():
            self.factor_store(f)[name] = param
        self.rank[name], self.alpha[name] = int(rank), float(alpha)
        self.factorization[name], self.dropout[name] = factorization, float(dropout)
        self.method[name], self.rslora[name] = method, bool(rslora)
        self.tucker[name] = bool(tucker)

    def factor_store(self, factor: str) -> nn.ParameterDict:
        """The ``ParameterDict`` holding factor ``factor`` of every adapter (made on first use)."""
        if factor not in self._modules:  # in the layer's train/eval mode, as every submodule
            self.add_module(factor, nn.ParameterDict().train(self.training))
        store = self._modules[factor]
        assert isinstance(store, nn.ParameterDict)
        return store

    def factors(self, name: str) -> dict[str, nn.Parameter]:
        """The factors of adapter ``name`` by factor name (e.g. ``{"lora_A": ..., "lora_B": ...}``)."""
        return {f: store[name] for f, store in self._modules.items()
                if isinstance(store, nn.ParameterDict) and name in store}

    def adapter_problem(self, rank: int, factorization: str, method: str = "lora",
                        tucker: bool = False) -> str | None:
        """Why an adapter of this rank/factorisation/method (Tucker form or not) cannot go on this
        layer, or ``None``."""
        shape = tuple(self.weight.shape)
        problem = factorization_problem(factorization, shape, self.groups)
        if problem:
            return f"{problem} (weight {shape}, groups={self.groups})"
        problem = method_problem(method, factorization, shape, self.groups, rank, tucker)
        if problem:
            return f"{problem} (weight {shape}, groups={self.groups})"
        limit = max_rank(factorization, shape, self.groups)
        if method in ("lora", "dora") and rank > limit:
            return (f"rank {rank} is larger than this layer allows ({limit} for the "
                    f"{factorization!r} factorization of weight {shape}, groups={self.groups}); "
                    f"use rank <= {limit}, e.g. with rank_pattern={{<this layer>: {limit}}}")
        return None

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name`` (it must not be merged)."""
        if self.merged_adapter == name or (self.merged_adapter is not None
                                           and name in (self.composition() or {})):
            raise MergeStateError(f"adapter {name!r} is merged; unmerge() before deleting it.")
        for factor in self.factors(name):
            del self.factor_store(factor)[name]
        for meta in (self.rank, self.alpha, self.factorization, self.dropout, self.method,
                     self.rslora, self.tucker):
            meta.pop(name)
        if self.active_adapter == name:
            self.active_adapter = None
        if self.adapter_weights is not None and name in self.adapter_weights:  # drop it from the mix
            rest = {n: w for n, w in self.adapter_weights.items() if n != name}
            self.adapter_weights = rest or None
            if self.active_adapter is None and rest:
                self.active_adapter = next(iter(rest))

    def scale(self, name: str) -> float:
        """``alpha / rank`` of adapter ``name`` (``alpha / sqrt(rank)`` with rsLoRA)."""
        return scale_for(self.alpha[name], self.rank[name], self.rslora[name])

    def delta(self, name: str) -> Tensor:
        """Delta weight ``W' - W`` of adapter ``name`` (in its compute dtype, at least float32)."""
        if self.method[name] == "dora":
            return self.effective_weight(name).to(self.weight.dtype) - self.weight
        return method_delta(self.method[name], self.factors(name), self.weight.shape, self.scale(name))

    def base_weight(self) -> Tensor:
        """The base weight without any adapter (the saved original while merged)."""
        return self.unmerged_weight if self.unmerged_weight is not None else self.weight

    def effective_weight(self, name: str) -> Tensor:
        """``W'`` of adapter ``name``, computed in the compute dtype and cast to the weight's dtype, as merged."""
        return _effective_weight(self.method[name], self.weight, self.factors(name), self.scale(name),
                                 self.groups, self.transposed)

    def composition(self) -> dict[str, float] | None:
        """The active weighted adapters ``{name: weight}``, or ``None`` for one adapter at weight 1."""
        w = self.adapter_weights
        if w is None or self.active_adapter is None or next(iter(w), None) != self.active_adapter:
            return None
        return w

    def composed_weight(self, weights: dict[str, float]) -> Tensor:
        """``W + sum_i w_i * delta_i`` with ``delta_i = W'_i - W`` (see [convlora.composition][])."""
        return weighted_weight(self.weight, [(w, self.delta(n)) for n, w in weights.items()])

    # -- merge ---------------------------------------------------------------------------------
    def merge(self) -> None:
        """Fold the active adapter into ``weight``; keeps the original for exact unmerge."""
        if self.merged_adapter is not None:
            raise MergeStateError(f"adapter {self.merged_adapter!r} is already merged; merging "
                                  "again would add its delta twice. unmerge() first.")
        name = self.active_adapter
        if name is None:
            return
        weights = self.composition()
        with torch.no_grad():
            merged = self.effective_weight(name) if weights is None else self.composed_weight(weights)
            self.unmerged_weight = self.weight.detach().clone()
            self.weight.copy_(merged)
        self.merged_adapter = name

    def unmerge(self) -> None:
        """Restore the exact original weight saved by `merge`."""
        if self.merged_adapter is None:
            return
        with torch.no_grad():
            self.weight.copy_(self.unmerged_weight)  # type: ignore[arg-type]
        self.unmerged_weight = None
        self.merged_adapter = None

    # -- state dict ----------------------------------------------------------------------------
    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.merged_adapter is not None:  # the base weight, whatever the merge state
            base = self.unmerged_weight
            destination[prefix + "weight"] = base if keep_vars else base.detach()  # type: ignore[union-attr]

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # The incoming ``weight`` is a base weight: unmerge first, re-merge once the factors
        # (loaded after this call, in the child ParameterDicts) are in, by _remerge_after_load.
        if self.merged_adapter is not None:
            self._remerge = self.merged_adapter
            self.unmerge()
        super()._load_from_state_dict(state_dict, prefix, *args)

    # -- forward -------------------------------------------------------------------------------
    def _base_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None,
                      output_padding: Any = None) -> Tensor:
        if not self.ndim:
            return F.linear(x, weight, bias)
        if self.transposed:
            return _CONV_T_FN[self.ndim](x, weight, bias, self.stride, self.padding, output_padding,  # type: ignore[arg-type]
                                         self.groups, self.dilation)
        conv = _CONV_FN[self.ndim]
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return conv(x, weight, bias, self.stride, 0, self.dilation, self.groups)
        return conv(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x: Tensor, output_size: list[int] | None = None) -> Tensor:
        op: Any = None
        if self.transposed:  # the output_padding nn.ConvTransposeNd would use for this call
            op = self.base_layer._output_padding(x, output_size, list(self.stride),  # type: ignore[operator]
                                                 list(self.padding), list(self.kernel_size),
                                                 self.ndim, list(self.dilation))
        elif output_size is not None:
            raise TypeError(f"output_size applies to transposed convolutions, not to {self.base_type}.")
        if self.sample_adapters is not None:
            return grouped_forward(x, self.sample_adapters,
                                   lambda xs, name: self._adapter_forward(xs, name, None, op))
        return self._adapter_forward(x, self.active_adapter, self.composition(), op)

    def _adapter_forward(self, x: Tensor, name: str | None, weights: dict[str, float] | None,
                         op: Any) -> Tensor:
        if name not in self.rank or self.disabled or self.merged_adapter is not None:
            return self._base_forward(x, self.weight, self.bias, op)
        assert name is not None
        terms = weights or {name: 1.0}
        if self.training and any(self.dropout[n] > 0.0 for n in terms):  # one branch per adapter
            out = self._base_forward(x, self.weight, self.bias, op)
            for n, w in terms.items():
                delta = (self.delta(n) * w).to(self.weight.dtype)
                out = out + self._base_forward(F.dropout(x, self.dropout[n], True), delta, None, op)
            return out
        if weights is None:
            fast = self._activation_backward_forward(x, name)
            if fast is not None:
                return fast
        weight = self.effective_weight(name) if weights is None else self.composed_weight(weights)
        return self._base_forward(x, weight, self.bias, op)

    def _activation_backward_forward(self, x: Tensor, name: str) -> Tensor | None:
        """The forward of [convlora.lowrank_conv][] where it applies and pays, else ``None``.

        It applies to ``Conv1d/2d/3d`` with ``"kernel"`` factors of LoRA, DoRA, LoHa (rank at
        most 8) or LoKr (``groups=1``) while a gradient is wanted, outside ``torch.func``
        transforms and (for DoRA) outside ``torch.compile``: a batched input, the base
        weight frozen, the input, weight and factors all float32 or all float64, autocast off,
        padding symmetric, and where
        [`activation_backward_pays`][convlora.lowrank_conv.activation_backward_pays] with the
        extra convolutions' channels (``r``; ``r**2`` for LoHa's Khatri-Rao factors; ``b`` of
        ``out = a * b`` for LoKr) and, for DoRA, the output's entries (the ``y - bias`` it keeps).
        """
        method = self.method[name]
        if method == "dora" and torch.compiler.is_compiling():  # its zero-magnitude check is data-dependent
            return None
        if functorch_transform_active():  # torch.func.grad / vmap: plain autograd of W' composes with them
            return None
        if method == "lokr" and self.groups != 1:
            return None
        if (self.transposed or not self.ndim or not torch.is_grad_enabled()
                or self.factorization[name] != "kernel" or self.weight.requires_grad
                or x.dim() != self.ndim + 2 or self.weight.dtype not in (torch.float32, torch.float64)
                or torch.is_autocast_enabled(x.device.type)):
            return None
        factors = self.factors(name)
        tensors = [x, self.weight, *factors.values(), *([] if self.bias is None else [self.bias])]
        if any(t.dtype != self.weight.dtype for t in tensors):
            return None
        if not (x.requires_grad or any(p.requires_grad for p in factors.values())):
            return None
        rank = self.rank[name]  # the channels of the extra convolutions
        if method == "loha":
            if rank > LOHA_KHATRI_RAO_MAX_RANK:
                return None
            rank = rank * rank
        elif method == "lokr":  # W2's b output channels (out = a * b)
            rank = self.weight.shape[0] // factors["lokr_w1"].shape[0]
        spec = conv_spec(self.ndim, self.kernel_size, self.stride, self.padding, self.dilation,
                         self.groups)
        if spec is None:
            return None
        kept = (conv_output_numel(tuple(x.shape), tuple(self.weight.shape), spec)
                if method == "dora" else 0)  # DoRA keeps y - bias for its magnitude's gradient
        if not activation_backward_pays(tuple(self.weight.shape), self.groups, rank, kept):
            return None
        if self.padding_mode != "zeros":  # the same (symmetric) padding, applied to x first
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            spec = (spec[0], spec[1], (0,) * self.ndim, spec[3], spec[4])
        if method == "lokr":
            return activation_backward_kron_conv(x, self.weight, self.bias, factors["lokr_w1"],
                                                 lokr_w2(factors), self.scale(name), spec)
        if method == "loha":
            b, a = loha_khatri_rao(factors)
        else:
            a, b = factors["lora_A"], factors["lora_B"]
        return activation_backward_conv(x, self.weight, self.bias, a, b, self.scale(name), spec,
                                        factors.get("lora_magnitude"))


def _remerge_after_load(layer: nn.Module, incompatible_keys: Any) -> None:
    """Load post-hook of a [`LoRALayer`][convlora.LoRALayer]: merge again if it was merged."""
    assert isinstance(layer, LoRALayer)
    name, layer._remerge = layer._remerge, None
    if name is not None:
        active, layer.active_adapter = layer.active_adapter, name
        try:
            layer.merge()
        finally:
            layer.active_adapter = active
