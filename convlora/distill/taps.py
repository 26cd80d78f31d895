"""FeatureTaps: record intermediate outputs of named submodules with forward hooks."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import Any, TypeAlias

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = ["FeatureTaps", "Selector"]

Selector: TypeAlias = int | str | Callable[[Any], Tensor]
"""Picks a tensor from a module output: tuple index, dict key, or a callable."""

_GLOB_CHARS = "*?["


def _unwrap(model: nn.Module) -> nn.Module:
    """Resolve names against the wrapped model of DataParallel / DDP wrappers."""
    wrappers = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    return model.module if isinstance(model, wrappers) else model


def _resolve(model: nn.Module, layers: str | Iterable[str] | Mapping[str, str]) -> dict[str, str]:
    """Map tap keys to qualified module names; raise with candidates on a miss."""
    names = [name for name, _ in model.named_modules() if name]
    if isinstance(layers, Mapping):
        wanted: list[tuple[str | None, str]] = [(str(k), v) for k, v in layers.items()]
    elif isinstance(layers, str):
        wanted = [(None, layers)]
    else:
        wanted = [(None, v) for v in layers]
    if not wanted:
        raise ValueError("layers is empty; pass at least one module name or glob pattern.")
    resolved: dict[str, str] = {}
    for key, pattern in wanted:
        if not isinstance(pattern, str):
            raise TypeError(f"layer {pattern!r} is not a string; pass qualified module names "
                            "like 'body.3' or glob patterns like 'body.*.conv'.")
        if pattern in names:
            hits = [pattern]
        elif any(c in pattern for c in _GLOB_CHARS):
            hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        else:
            hits = []
        if not hits:
            close = [n for n in names if pattern.split(".")[-1] in n][:8] or names[:8]
            raise ValueError(
                f"layer {pattern!r} matches no submodule of {type(model).__name__}. "
                f"Some qualified names: {close}. Use names from model.named_modules() "
                "or a glob pattern such as 'body.*'."
            )
        if key is not None:
            if len(hits) > 1:
                raise ValueError(f"tap {key!r}: pattern {pattern!r} matches {len(hits)} modules "
                                 f"({hits[:5]}...); a mapping needs exactly one module per key.")
            resolved[key] = hits[0]
        else:
            for hit in hits:
                resolved[hit] = hit
    return resolved


def _pick(output: Any, selector: Selector | None, key: str) -> Tensor:
    if selector is None or (isinstance(output, Tensor) and not callable(selector)):
        value = output  # an index/key only applies to tuple/dict outputs
    elif callable(selector):
        value = selector(output)
    else:
        try:
            value = output[selector]
        except (IndexError, KeyError, TypeError) as exc:
            raise ValueError(f"tap {key!r}: select={selector!r} cannot index the module output "
                             f"of type {type(output).__name__}: {exc}") from exc
    if not isinstance(value, Tensor):
        raise TypeError(
            f"tap {key!r} recorded a {type(value).__name__}, not a tensor. For modules that "
            "return tuples or dicts pass select=<index>, select=<key> or a callable."
        )
    return value


class FeatureTaps:
    """Record the outputs of submodules by name, e.g. for feature distillation.

    Hooks are registered when the object is created and removed by
    `remove` or when a ``with`` block exits (also on exceptions). Each
    forward of a tapped module overwrites that tap's entry (a module called
    twice keeps its last output). Hooks on LoRA layers made by
    ``convlora.inject`` see the adapted output.

    Example:
        >>> with FeatureTaps(model, {"mid": "body.4"}, detach=True) as taps:
        ...     model(x)
        ...     feats = taps.pop()  # {"mid": tensor}

    Args:
        model: the module to tap; DataParallel / DDP wrappers are looked through.
        layers: a qualified name, a glob pattern (``fnmatch`` on names from
            ``model.named_modules()``, keys are the matched names), a list of
            these, or a mapping ``{key: name}`` that gives each tap your own key.
        select: picks the tensor from tuple/dict outputs: an index, a key, or a
            callable; or a mapping from tap key to one of these. An index or key
            leaves tensor outputs as they are, so one ``select`` can serve taps on
            tuple-returning blocks and plain convs alike.
        detach: store ``output.detach()``; use for a teacher so recorded
            features hold no graph. Student taps should keep ``detach=False``.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: str | Iterable[str] | Mapping[str, str],
        *,
        select: Selector | Mapping[str, Selector] | None = None,
        detach: bool = False,
    ) -> None:
        self._model = _unwrap(model)
        self.names: dict[str, str] = _resolve(self._model, layers)
        if isinstance(select, Mapping):
            unknown = set(select) - set(self.names)
            if unknown:
                raise ValueError(f"select has keys {sorted(unknown)} that are not taps; "
                                 f"tap keys are {list(self.names)}.")
            self._select: dict[str, Selector | None] = {k: select.get(k) for k in self.names}
        else:
            self._select = dict.fromkeys(self.names, select)
        self.detach = detach
        self._features: dict[str, Tensor] = {}
        self._handles: list[RemovableHandle] = []
        self.attach()

    @property
    def attached(self) -> bool:
        """Whether the hooks are currently registered."""
        return bool(self._handles)

    def attach(self) -> FeatureTaps:
        """Register the hooks (done by the constructor; for re-use after `remove`)."""
        if self._handles:
            return self
        modules = dict(self._model.named_modules())
        for key, name in self.names.items():
            handle = modules[name].register_forward_hook(self._hook(key))
            self._handles.append(handle)
        return self

    def _hook(self, key: str) -> Callable[[nn.Module, Any, Any], None]:
        selector = self._select[key]

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            value = _pick(output, selector, key)
            self._features[key] = value.detach() if self.detach else value

        return hook

    def pop(self) -> dict[str, Tensor]:
        """Return the recorded features (in tap order) and forget them."""
        out = {k: self._features[k] for k in self.names if k in self._features}
        self._features.clear()
        return out

    def remove(self) -> None:
        """Remove all hooks and drop recorded features."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._features.clear()

    def __enter__(self) -> FeatureTaps:
        return self.attach()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "attached" if self.attached else "removed"
        return f"FeatureTaps({self.names}, detach={self.detach}, {state})"

