"""The DSCLoRA student: ConvLoRA adapters on a deploy-form SPAN, from a reusable config.

The placement lives in ``configs/dsclora_lora.yaml`` (fields of :class:`convlora.LoRAConfig`);
:func:`build_dsclora` applies it (or any other config) with :func:`convlora.inject`. After
training, ``convlora.unload(model, merge=True)`` returns a plain SPAN with the original keys,
parameter count and FLOPs.

Note: the released ``dsclora_ch26`` weights are not exactly one such merge on
``span_tiny_ch26``; this config reproduces the authors' *placement*, not their weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import convlora
from convlora import LoRAConfig
from examples.span_sr.arch import SPAN

__all__ = ["DSCLORA_YAML", "build_dsclora", "dsclora_config", "load_lora_config"]

DSCLORA_YAML = Path(__file__).resolve().parent / "configs" / "dsclora_lora.yaml"
_FIELDS = ("rank", "alpha", "targets", "exclude", "rank_pattern", "alpha_pattern",
           "factorization", "factorization_pattern", "dropout", "freeze")


def load_lora_config(src: str | Path | Mapping[str, Any]) -> LoRAConfig:
    """Read a :class:`convlora.LoRAConfig` from a YAML file or a mapping of its fields.

    Raises:
        ValueError: for unknown fields (listing the allowed ones) or a non-mapping file.
    """
    if isinstance(src, Mapping):
        data: Any = dict(src)
    else:
        import yaml

        path = Path(src)
        if not path.is_file():
            raise FileNotFoundError(f"LoRA config {str(path)!r} does not exist.")
        data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"LoRA config {src!r} must be a mapping of LoRAConfig fields, got {type(data).__name__}.")
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise ValueError(f"unknown LoRA config fields {unknown}; allowed: {list(_FIELDS)}.")
    for key in ("targets", "exclude"):
        if isinstance(data.get(key), list):
            data[key] = tuple(data[key])
    return LoRAConfig(**data)


def dsclora_config() -> LoRAConfig:
    """The DSCLoRA placement (``configs/dsclora_lora.yaml``)."""
    return load_lora_config(DSCLORA_YAML)


def build_dsclora(
    base: SPAN,
    config: LoRAConfig | str | Path | Mapping[str, Any] | None = None,
    *,
    adapter_name: str = "default",
) -> SPAN:
    """Turn a deploy-form SPAN into a DSCLoRA student, in place, and return it.

    Args:
        base: A deploy-form :class:`SPAN` (e.g. ``load_span(".../span_tiny_ch26.pth")``).
        config: A :class:`convlora.LoRAConfig`, a YAML path or a mapping; ``None`` is the
            DSCLoRA placement (:func:`dsclora_config`).
        adapter_name: Name of the new adapter.

    Raises:
        ValueError: when ``base`` is not a deploy-form SPAN (adapters go on ``eval_conv``).
    """
    if not isinstance(base, SPAN) or base.form != "deploy":
        form = getattr(base, "form", None)
        raise ValueError(
            f"build_dsclora needs a deploy-form SPAN, got {type(base).__name__} (form={form!r}); "
            "call model.reparameterize() first."
        )
    if config is None:
        config = dsclora_config()
    elif not isinstance(config, LoRAConfig):
        config = load_lora_config(config)
    convlora.inject(base, config, adapter_name=adapter_name)
    return base
