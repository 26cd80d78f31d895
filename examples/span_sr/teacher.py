"""A teacher of any architecture: a SPAN file, or any super-resolution checkpoint spandrel loads.

[`load_teacher`][examples.span_sr.teacher.load_teacher] reads the file with
``convlora.load_state_dict`` (``.safetensors`` through safetensors, ``.pth`` with
``torch.load(weights_only=True)``; nested training checkpoints unwrapped). A SPAN state dict, in
our deploy/train layout or spandrel's train+eval layout, becomes our own
[`SPAN`][examples.span_sr.arch.SPAN]. Anything else goes to spandrel's ``ModelLoader``, which
detects the architecture from the state dict (CRAFT, SwinIR, HAT, ...); spandrel is imported
only then, and its absence is one line naming the ``[spandrel]`` extra.

A spandrel model is wrapped in [`SpandrelTeacher`][examples.span_sr.teacher.SpandrelTeacher]: the
network is ``.net`` (so affinity taps given as spandrel module names are looked up under
``net.``, see [`teacher_tap`][examples.span_sr.teacher.teacher_tap]), ``.upscale`` is its scale
(tiling needs it) and ``forward`` pads the input to the architecture's size requirements and
crops the output, like spandrel's own call, but without clamping: a SPAN teacher is not clamped
either, so every teacher gives its raw output as the distillation target.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import convlora
from examples.span_sr.arch import load_span
from examples.span_sr.spandrel_format import from_spandrel, is_spandrel_format

__all__ = ["SPANDREL_EXTRA", "SpandrelTeacher", "is_span_state_dict", "load_teacher", "teacher_scale", "teacher_tap"]

SPANDREL_EXTRA = "pip install -e '.[spandrel]'"
"""How to install spandrel (the ``[spandrel]`` extra of this project)."""


class SpandrelTeacher(nn.Module):
    """A spandrel image model as a plain ``nn.Module``: pads to its size requirements, no clamping.

    Attributes:
        net: The spandrel architecture's module (``descriptor.model``).
        upscale: Its scale.
        architecture: spandrel's architecture id (``"CRAFT"``, ``"SwinIR"``, ...).
    """

    def __init__(self, descriptor: Any) -> None:
        super().__init__()
        self.net: nn.Module = descriptor.model
        self.upscale: int = int(descriptor.scale)
        self.architecture: str = str(descriptor.architecture.id)
        self._size = descriptor.size_requirements
        self._hw: tuple[int, int] = (0, 0)

    def crop(self, feature: torch.Tensor) -> torch.Tensor:
        """A feature map of the last forward, cropped to that input's size.

        Architectures pad their input at the bottom and right (CRAFT to one window beyond a
        multiple of 16, always), so an inner ``(N, C, H', W')`` map is larger than the student's;
        its top-left ``H x W`` corner is the part over the image. Other shapes pass unchanged.
        """
        h, w = self._hw
        if feature.dim() == 4 and feature.shape[-2] >= h and feature.shape[-1] >= w:
            return feature[..., :h, :w]
        return feature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The raw SR of ``x`` (N, C, H, W); padded as spandrel pads (reflect, then replicate) and cropped back."""
        h, w = x.shape[-2:]
        self._hw = (h, w)
        pad_w, pad_h = self._size.get_padding(w, h)
        if pad_w or pad_h:
            rw, rh = min(pad_w, w - 1), min(pad_h, h - 1)
            x = F.pad(x, (0, rw, 0, rh), mode="reflect")
            x = F.pad(x, (0, pad_w - rw, 0, pad_h - rh), mode="replicate")
        y = self.net(x)
        return y[..., : h * self.upscale, : w * self.upscale] if pad_w or pad_h else y


def is_span_state_dict(state: dict[str, torch.Tensor]) -> bool:
    """Whether ``state`` is a SPAN (our deploy or train layout, or spandrel's train+eval layout)."""
    return "conv_1.eval_conv.weight" in state or "conv_1.sk.weight" in state


def _spandrel() -> Any:
    try:
        import spandrel
    except ImportError:
        raise ImportError(f"a non-SPAN teacher is loaded through spandrel, which is not installed; install the "
                          f"[spandrel] extra: {SPANDREL_EXTRA}") from None
    return spandrel


def load_teacher(path: str | Path, scale: int | None = None) -> nn.Module:
    """The teacher in ``path``, in eval mode, with an integer ``upscale`` attribute.

    Args:
        path: A SPAN checkpoint, or any single-image SR checkpoint spandrel recognises.
        scale: When given, the teacher's scale must equal it.

    Raises:
        FileNotFoundError: no such file.
        ImportError: the file is not a SPAN and spandrel is not installed (names the extra).
        ValueError: an unreadable file, an architecture spandrel does not know, a model that is
            not an RGB-in RGB-out image model, or a scale other than ``scale``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"teacher weights {str(path)!r} do not exist; docs/data.md lists the released "
                                "checkpoints and where to get them.")
    try:
        state = convlora.load_state_dict(path)
    except ValueError as err:
        raise ValueError(f"cannot load teacher weights from {str(path)!r}: {err}") from None
    model: nn.Module
    if is_span_state_dict(state):
        model = load_span(from_spandrel(state) if is_spandrel_format(state) else state)
    else:
        spandrel = _spandrel()
        try:
            descriptor = spandrel.ModelLoader().load_from_state_dict(state)
        except spandrel.UnsupportedModelError:
            raise ValueError(f"teacher {str(path)!r} is neither a SPAN nor an architecture spandrel "
                             f"{spandrel.__version__} recognises (first keys: {list(state)[:4]}).") from None
        if not isinstance(descriptor, spandrel.ImageModelDescriptor) or descriptor.input_channels != 3 \
                or descriptor.output_channels != 3:
            raise ValueError(f"teacher {str(path)!r} ({descriptor.architecture.id}) is not an RGB -> RGB image "
                             "model; use a single-image super-resolution checkpoint.")
        model = SpandrelTeacher(descriptor)
    if scale is not None and teacher_scale(model) != scale:
        raise ValueError(f"teacher {str(path)!r} is x{teacher_scale(model)} but the run is x{scale}; use a "
                         f"x{scale} teacher or set --data.scale {teacher_scale(model)} (with a base of that scale).")
    return model.eval().requires_grad_(False)


def teacher_scale(model: nn.Module) -> int:
    """The ``upscale`` of a SPAN or a [`SpandrelTeacher`][examples.span_sr.teacher.SpandrelTeacher]."""
    scale = getattr(model, "upscale", None)
    if not isinstance(scale, int):
        raise ValueError(f"{type(model).__name__} has no integer `upscale` attribute; a teacher needs its scale.")
    return scale


def teacher_tap(model: nn.Module, name: str) -> str:
    """The qualified module name in ``model`` of the tap ``name`` (spandrel's names live under ``net.``)."""
    return f"net.{name}" if isinstance(model, SpandrelTeacher) else name
