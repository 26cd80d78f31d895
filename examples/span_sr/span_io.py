"""Loading SPAN checkpoints: unwrap nested state dicts, read the architecture from tensor shapes.

Deploy-form state-dict keys of :class:`~examples.span_sr.arch.SPAN` equal those of the official
released checkpoints. :func:`load_span` builds the right model for any of them (width,
``conv_cat`` width, scale, form) from the tensor shapes alone; files are read with
``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from examples.span_sr.arch import SPAN

__all__ = ["load_span", "span_config_from_state_dict"]

_NESTING_KEYS = ("params_ema", "params", "state_dict", "model")


def _unwrap(obj: object, prefer: str) -> dict[str, torch.Tensor]:
    """Return the flat tensor dict inside a checkpoint, following known nesting keys."""
    for _ in range(4):
        if not isinstance(obj, Mapping):
            break
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return {k.removeprefix("module."): v for k, v in obj.items()}
        order = [prefer] + [k for k in _NESTING_KEYS if k != prefer]
        found = next((k for k in order if k in obj), None)
        if found is None:
            break
        obj = obj[found]
    kind = type(obj).__name__ if not isinstance(obj, Mapping) else f"keys {sorted(obj)[:8]}"
    raise ValueError(
        f"checkpoint holds no flat tensor state dict ({kind}); expected a dict of tensors, "
        f"possibly nested under one of {_NESTING_KEYS}."
    )


def span_config_from_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, object]:
    """Read SPAN's constructor arguments from tensor shapes (``feature_channels`` etc.).

    Args:
        state: A flat SPAN state dict, train or deploy form.

    Returns:
        Keyword arguments for :class:`~examples.span_sr.arch.SPAN`.

    Raises:
        ValueError: the keys or shapes are not those of a SPAN (the message names them).
    """
    if "conv_1.eval_conv.weight" in state:
        first, form = state["conv_1.eval_conv.weight"], "deploy"
    elif "conv_1.sk.weight" in state:
        first, form = state["conv_1.sk.weight"], "train"
    else:
        raise ValueError(
            "state dict has neither 'conv_1.eval_conv.weight' nor 'conv_1.sk.weight'; it is not a "
            f"SPAN checkpoint (first keys: {list(state)[:5]})."
        )
    up = state.get("upsampler.0.weight")
    cat = state.get("conv_cat.weight")
    if up is None or cat is None:
        raise ValueError("state dict lacks 'upsampler.0.weight' or 'conv_cat.weight'; not a SPAN.")
    out_ch = 3
    scale = round((up.shape[0] / out_ch) ** 0.5)
    if out_ch * scale**2 != up.shape[0]:
        raise ValueError(f"upsampler.0 has {up.shape[0]} outputs, not 3*scale^2 for any scale.")
    return {
        "num_in_ch": int(first.shape[1]),
        "num_out_ch": out_ch,
        "feature_channels": int(first.shape[0]),
        "upscale": scale,
        "conv_cat_channels": int(cat.shape[0]),
        "form": form,
    }


def load_span(
    src: str | Path | Mapping[str, object], *, prefer: str = "params_ema", strict: bool = True
) -> SPAN:
    """Build a SPAN from a checkpoint path or (possibly nested) state dict and load it.

    Width, ``conv_cat`` width, scale and form are read from the tensor shapes. Nested
    checkpoints (``params_ema``/``params``/``state_dict``) are unwrapped, preferring ``prefer``.
    Files are read with ``torch.load(map_location="cpu", weights_only=True)``.

    Args:
        src: A checkpoint file or an already loaded (possibly nested) state dict.
        prefer: Nesting key tried first when the checkpoint holds several.
        strict: Passed to ``load_state_dict``; with False, missing/extra keys are ignored.

    Returns:
        The SPAN with the weights loaded, in eval mode.

    Raises:
        ValueError: naming missing, unexpected and mis-shaped keys when the weights do not fit.
    """
    from examples.span_sr.arch import SPAN  # not at the top: arch.py re-exports this module

    raw = torch.load(Path(src), map_location="cpu", weights_only=True) if isinstance(src, (str, Path)) else src
    state = _unwrap(raw, prefer)
    model = SPAN(**span_config_from_state_dict(state))  # type: ignore[arg-type]
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if shapes or (strict and (missing or unexpected)):
        raise ValueError(
            f"checkpoint does not fit SPAN{tuple(span_config_from_state_dict(state).values())}: "
            f"missing keys {missing}, unexpected keys {unexpected}, mis-shaped {shapes}. "
            "Check the file is a SPAN checkpoint, or pass strict=False to ignore extra/missing keys."
        )
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=strict)
    return model.eval()
