"""``verify``: one instrumented forward that finds adapters the model's code would bypass.

[`inject`][convlora.inject] sees the module tree, not the code that runs it. A LoRA layer whose
forward is never called, or whose ``weight`` some other code reads directly (as
``nn.MultiheadAttention`` reads ``out_proj.weight``), is ignored by the unmerged forward and gets
no gradient, while [`merge`][convlora.merge] folds its delta in: the merged model then differs.
``verify`` runs one forward on example inputs and raises for every such layer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .errors import MergeStateError, UnsupportedLayerError
from .layer import LoRALayer
from .surgery import lora_layers
from .wrappers import unwrap

__all__ = ["verify"]

# Tensor attributes and methods that read metadata only: reading them is not using the weight.
_METADATA = frozenset({
    "shape", "dtype", "device", "size", "dim", "ndim", "ndimension", "numel", "nelement",
    "stride", "storage_offset", "is_contiguous", "layout", "requires_grad", "is_leaf", "grad_fn",
    "is_cuda", "is_cpu", "is_meta", "is_sparse", "is_quantized", "is_floating_point",
    "is_complex", "element_size", "itemsize", "nbytes", "data_ptr", "get_device", "names",
    "__len__", "untyped_storage", "_is_view", "grad", "_version", "is_inference",
})


def _func_name(func: Callable[..., Any]) -> str:
    name = getattr(func, "__name__", repr(func))
    if name in ("__get__", "__set__"):  # a Tensor property: name it by its descriptor
        name = getattr(getattr(func, "__self__", None), "__name__", name)
    return str(name)


def _tensors(obj: Any) -> Iterator[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


class _Watch(TorchFunctionMode):
    """Records which LoRA layers ran, and who else used their weights."""

    def __init__(self, layers: dict[str, LoRALayer]) -> None:
        super().__init__()
        self.owner = {id(layer.weight): name for name, layer in layers.items()}
        self.inside: list[str] = []
        self.called: set[str] = set()
        self.read: dict[str, str] = {}

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        for t in _tensors((args, kwargs)):
            name = self.owner.get(id(t))
            if name is not None and name not in self.inside and name not in self.read:
                fname = _func_name(func)
                if fname not in _METADATA:
                    self.read[name] = fname
        return func(*args, **kwargs)

    def enter(self, name: str) -> None:
        self.called.add(name)
        self.inside.append(name)

    def leave(self, name: str) -> None:
        if self.inside and self.inside[-1] == name:
            self.inside.pop()


@contextlib.contextmanager
def _hooked(layers: dict[str, LoRALayer], watch: _Watch) -> Iterator[None]:
    handles = []
    try:
        for name, layer in layers.items():
            handles.append(layer.register_forward_pre_hook(lambda m, a, n=name: watch.enter(n)))
            handles.append(layer.register_forward_hook(lambda m, a, o, n=name: watch.leave(n)))
        yield
    finally:
        for h in handles:
            h.remove()


def verify(model: nn.Module, *example_inputs: Any, **example_kwargs: Any) -> None:
    """Run ``model(*example_inputs, **example_kwargs)`` once and check every LoRA layer is used as a layer.

    Raises for every LoRA layer whose forward the model never called, and for every LoRA layer
    whose ``weight`` other code read directly (passed to a torch function outside the layer's
    own forward). For such layers the adapter is ignored by the unmerged forward and gets no
    gradient, but [`merge`][convlora.merge] applies it, so merged and unmerged outputs differ.
    Call it once after [`inject`][convlora.inject] (or [`load_adapter`][convlora.load_adapter])
    with an input that takes the code paths you will use: it checks the paths that this one
    forward takes, in the model's current train/eval mode.

    The forward runs under ``torch.no_grad()``; buffers (e.g. BatchNorm statistics) and the
    random-number state are restored afterwards, so the model is left as it was. While it runs,
    a torch function mode and forward hooks watch the layers; code that changes its path when
    it sees them (PyTorch's transformer inference fast paths) can take another path outside
    ``verify`` -- the known cases are refused by [`inject`][convlora.inject] itself.

    Args:
        model: A model with LoRA layers (a ``torch.compile``/``nn.DataParallel`` wrapper is
            looked through and its inner model run eagerly).
        *example_inputs: Positional inputs of one forward.
        **example_kwargs: Keyword inputs of one forward.

    Raises:
        MergeStateError: the model has no LoRA layers.
        UnsupportedLayerError: naming every layer the forward did not run, or whose weight
            other code read, and what read it.
    """
    inner = unwrap(model)
    layers = lora_layers(inner)
    if not layers:
        raise MergeStateError("verify(): the model has no LoRA layers; call convlora.inject() first.")
    watch = _Watch(layers)
    buffers = [(b, b.detach().clone()) for b in inner.buffers()]
    devices = sorted({t.device.index or 0 for t in inner.parameters() if t.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        try:
            with _hooked(layers, watch), watch:
                inner(*example_inputs, **example_kwargs)
        finally:
            for buf, saved in buffers:
                buf.copy_(saved)
    problems = []
    for name in layers:
        found = [] if name in watch.called else ["its forward was never called"]
        if name in watch.read:
            found.append(f"its weight was read by {watch.read[name]}() outside its forward")
        if found:
            problems.append(f"{name!r}: " + " and ".join(found))
    if problems:
        raise UnsupportedLayerError(
            f"verify(): {len(problems)} LoRA layer(s) are bypassed by the model's code, so the "
            "adapter is ignored unmerged but applied by merge(): " + "; ".join(problems)
            + ". Leave them out of inject(..., exclude=[...]) or call the layer instead of "
            "reading its weight.")
