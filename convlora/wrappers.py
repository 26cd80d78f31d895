"""Model wrappers: ``torch.compile``, ``nn.DataParallel`` and the distributed wrappers.

``torch.compile(model)`` and ``nn.DataParallel(model)`` hold the model itself (as ``_orig_mod`` /
``module``) and run it, so convlora works on the model inside them, and adapter files name the
unwrapped model's layers. ``DistributedDataParallel`` and FSDP register the parameters they
synchronise when they are built: adapters added afterwards would train unsynchronised on each
rank, so convlora refuses them and says to inject before wrapping.
"""

from __future__ import annotations

from torch import nn

from .errors import ConvLoRAError

__all__ = ["WRAPPER_PREFIXES", "refuse_distributed", "unwrap"]

WRAPPER_PREFIXES = ("_orig_mod.", "module.")
"""Name prefixes ``torch.compile`` and ``nn.DataParallel`` add to the wrapped model's names."""

_DISTRIBUTED = ("DistributedDataParallel", "FullyShardedDataParallel", "FSDPModule")


def _inner(module: nn.Module) -> nn.Module | None:
    """The model a ``torch.compile``/``DataParallel`` wrapper holds, else ``None``."""
    if isinstance(module, nn.DataParallel):
        return module.module
    inner = module.__dict__.get("_modules", {}).get("_orig_mod")
    if type(module).__name__ == "OptimizedModule" and isinstance(inner, nn.Module):
        return inner
    return None


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside any ``torch.compile`` / ``nn.DataParallel`` wrappers (``model`` if none)."""
    while (inner := _inner(model)) is not None:
        model = inner
    return model


def refuse_distributed(model: nn.Module, op: str) -> None:
    """Raise when ``model`` is, or contains, a DistributedDataParallel/FSDP wrapper.

    Args:
        model: The model ``op`` is about to change.
        op: The calling function's name, for the message.

    Raises:
        ConvLoRAError: naming the wrapper and the fix (inject or load before wrapping).
    """
    for name, module in model.named_modules():
        kinds = {c.__name__ for c in type(module).__mro__} & set(_DISTRIBUTED)
        if kinds:
            where = f"the model is a {type(module).__name__}" if not name else (
                f"module {name!r} is a {type(module).__name__}")
            raise ConvLoRAError(
                f"{op}(): {where}, which registered the parameters it synchronises when it was "
                "built; adapters added now would train unsynchronised on each rank. Call "
                f"{op}() on the plain model first, then wrap it (e.g. "
                "DistributedDataParallel(model) after convlora.inject(model)).")
