"""SPAN: Swift Parameter-free Attention Network for efficient super-resolution.

Wan, Yu, Tao, Huang, Wang, Wang, Yu, Xiang, Wang, Ge, "Swift Parameter-free Attention Network
for Efficient Super-Resolution", CVPR Workshops (NTIRE 2024 ESR challenge winner).

Written from the paper's description. Every 3x3 conv exists in two forms:

* ``"train"``: ``Conv3XC``, a 1x1 expand (gain 2) -> 3x3 -> 1x1 reduce branch plus a 1x1 skip;
* ``"deploy"``: the same function fused into one 3x3 conv called ``eval_conv``.

The form is an explicit attribute chosen at construction; ``reparameterize()`` turns a train-form
model into the deploy form exactly (up to fp32 round-off). The forward pass never looks at
``self.training`` and never writes weights, and there is no clamp in it: clamp when writing images.
Deploy-form state-dict keys equal those of the official released checkpoints;
:func:`load_span` builds the right model for any of them (width, ``conv_cat`` width, scale, form)
from the tensor shapes alone (:func:`span_config_from_state_dict`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Literal, cast

import torch
import torch.nn.functional as F
from torch import nn

import convlora
from examples.span_sr.spandrel_format import from_spandrel, fuse_branch, is_spandrel_format

__all__ = ["RGB_MEAN", "SPAB", "SPAN", "Conv3XC", "Form", "load_span", "span_config_from_state_dict"]

Form = Literal["train", "deploy"]
RGB_MEAN = (0.4488, 0.4371, 0.4040)
_FORMS = ("train", "deploy")


def _check_form(form: str) -> None:
    if form not in _FORMS:
        raise ValueError(f"form={form!r} is not a SPAN form; use 'train' or 'deploy'.")


class Conv3XC(nn.Module):
    """A 3x3 conv (stride 1, zero padding 1) in train or deploy form.

    Args:
        c_in: Input channels.
        c_out: Output channels.
        gain: Channel expansion of the train-form branch (2 in SPAN).
        form: ``"train"`` (expand/3x3/reduce branch + 1x1 skip) or ``"deploy"`` (``eval_conv``).
    """

    def __init__(self, c_in: int, c_out: int, gain: int = 2, form: Form = "deploy") -> None:
        super().__init__()
        _check_form(form)
        self.form: Form = form
        self.c_in, self.c_out, self.gain = c_in, c_out, gain
        if form == "train":
            self.sk = nn.Conv2d(c_in, c_out, 1)
            self.conv = nn.Sequential(
                nn.Conv2d(c_in, c_in * gain, 1),
                nn.Conv2d(c_in * gain, c_out * gain, 3),
                nn.Conv2d(c_out * gain, c_out, 1),
            )
        else:
            self.eval_conv = nn.Conv2d(c_in, c_out, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.form == "train":
            return self.conv(F.pad(x, (1, 1, 1, 1))) + self.sk(x)
        return self.eval_conv(x)

    def reparameterize(self) -> None:
        """Switch to the deploy form in place (no-op when already deployed)."""
        if self.form == "deploy":
            return
        weight, bias = fuse_branch(dict(self.named_parameters()))  # float64; copy_ casts it
        ref = self.sk.weight
        self.eval_conv = nn.Conv2d(self.c_in, self.c_out, 3, padding=1).to(ref.device, ref.dtype)
        with torch.no_grad():
            self.eval_conv.weight.copy_(weight)
            cast(torch.Tensor, self.eval_conv.bias).copy_(bias)
        del self.conv, self.sk
        self.form = "deploy"

    def extra_repr(self) -> str:
        return f"{self.c_in}, {self.c_out}, gain={self.gain}, form={self.form!r}"


class SPAB(nn.Module):
    """Swift parameter-free attention block.

    ``out1 = silu(c1(x)); out2 = silu(c2(out1)); out3 = c3(out2)``,
    ``att = sigmoid(out3) - 0.5``, output ``(out3 + x) * att``. The block also returns ``out1``:
    the official code applies SiLU in place, so the tensor it reuses is the *activated* one.
    """

    def __init__(self, channels: int, form: Form = "deploy") -> None:
        super().__init__()
        self.c1_r = Conv3XC(channels, channels, 2, form)
        self.c2_r = Conv3XC(channels, channels, 2, form)
        self.c3_r = Conv3XC(channels, channels, 2, form)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out1 = F.silu(self.c1_r(x))
        out3 = self.c3_r(F.silu(self.c2_r(out1)))
        attention = torch.sigmoid(out3) - 0.5
        return (out3 + x) * attention, out1


class SPAN(nn.Module):
    """SPAN super-resolution network (six SPABs).

    Args:
        num_in_ch: Input image channels.
        num_out_ch: Output image channels.
        feature_channels: Width of the trunk (26 for SPAN-tiny, 28 for SPAN).
        upscale: Upscaling factor.
        conv_cat_channels: Output width of the 1x1 ``conv_cat`` (defaults to
            ``feature_channels``; one released variant uses fewer).
        form: ``"deploy"`` (fused ``eval_conv``, the released checkpoints) or ``"train"``.
        img_range: Input scale after mean subtraction.
        rgb_mean: Mean subtracted from the [0, 1] RGB input.

    Input: RGB in [0, 1], shape ``(N, 3, H, W)``. Output ``(N, 3, H*s, W*s)``, nominally [0, 1].
    """

    mean: torch.Tensor

    def __init__(
        self,
        num_in_ch: int = 3,
        num_out_ch: int = 3,
        feature_channels: int = 48,
        upscale: int = 4,
        conv_cat_channels: int | None = None,
        form: Form = "deploy",
        img_range: float = 255.0,
        rgb_mean: tuple[float, float, float] = RGB_MEAN,
    ) -> None:
        super().__init__()
        _check_form(form)
        cat_ch = feature_channels if conv_cat_channels is None else conv_cat_channels
        self.num_in_ch, self.num_out_ch = num_in_ch, num_out_ch
        self.feature_channels, self.conv_cat_channels = feature_channels, cat_ch
        self.upscale, self.img_range = upscale, img_range
        self.register_buffer("mean", torch.tensor(rgb_mean).view(1, -1, 1, 1), persistent=False)
        self.conv_1 = Conv3XC(num_in_ch, feature_channels, 2, form)
        self.block_1 = SPAB(feature_channels, form)
        self.block_2 = SPAB(feature_channels, form)
        self.block_3 = SPAB(feature_channels, form)
        self.block_4 = SPAB(feature_channels, form)
        self.block_5 = SPAB(feature_channels, form)
        self.block_6 = SPAB(feature_channels, form)
        self.conv_cat = nn.Conv2d(feature_channels * 4, cat_ch, 1)
        self.conv_2 = Conv3XC(feature_channels, feature_channels, 2, form)
        self.upsampler = nn.Sequential(
            nn.Conv2d(cat_ch, num_out_ch * upscale**2, 3, padding=1), nn.PixelShuffle(upscale)
        )

    @property
    def form(self) -> Form:
        """``"train"`` or ``"deploy"``: the form of the model's ``Conv3XC`` layers."""
        return self.conv_1.form

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean.to(x.dtype)) * self.img_range
        feat = self.conv_1(x)
        out_b1, _ = self.block_1(feat)
        out = out_b1
        for block in (self.block_2, self.block_3, self.block_4, self.block_5):
            out, _ = block(out)
        out_b6, out_b6_1 = self.block_6(out)
        out_b6 = self.conv_2(out_b6)
        out = self.conv_cat(torch.cat([feat, out_b6, out_b1, out_b6_1], dim=1))
        return self.upsampler(out)

    def reparameterize(self) -> SPAN:
        """Fuse every train-form ``Conv3XC`` into its deploy ``eval_conv`` in place; returns self."""
        for module in self.modules():
            if isinstance(module, Conv3XC):
                module.reparameterize()
        return self


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


def load_span(src: str | Path | Mapping[str, torch.Tensor], *, key: str | None = None, strict: bool = True) -> SPAN:
    """Build a SPAN from a checkpoint file or a flat state dict and load it.

    Width, ``conv_cat`` width, scale and form are read from the tensor shapes. Files
    (``.pth`` or ``.safetensors``) are read by ``convlora.load_state_dict``, which unwraps nested
    training checkpoints (``params_ema`` first, then ``params``, ``state_dict``, ``model``).
    spandrel's layout (train branch *and* ``eval_conv``, as the community's SPAN files and
    ``upscale.py --export-spandrel`` store them) loads as the deploy form: like spandrel, each
    train branch is fused, and a stored ``eval_conv`` that disagrees is refused
    (:func:`examples.span_sr.spandrel_format.from_spandrel`).

    Args:
        src: A checkpoint file or a flat ``{name: tensor}`` state dict.
        key: The entry of a nested checkpoint to read (e.g. ``"params"`` for the raw weights
            next to ``params_ema``).
        strict: Passed to ``load_state_dict``; with False, missing/extra keys are ignored.

    Returns:
        The SPAN with the weights loaded, in eval mode.

    Raises:
        FileNotFoundError: no such file (the message points to docs/data.md).
        ValueError: the file is not readable, the weights do not fit (naming missing,
            unexpected and mis-shaped keys), or a spandrel-layout file is inconsistent.
    """
    if isinstance(src, (str, Path)):
        if not Path(src).is_file():
            raise FileNotFoundError(f"weights file {str(src)!r} does not exist; docs/data.md lists the released "
                                    "checkpoints and where to get them.")
        state = convlora.load_state_dict(src, key=key)  # its errors are ValueErrors naming the file
    else:
        state = dict(src)
        if not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError("load_span takes a flat {name: tensor} state dict; pass a nested training "
                             "checkpoint by its file path (convlora.load_state_dict unwraps it).")
    if is_spandrel_format(state):
        state = from_spandrel(state)
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
