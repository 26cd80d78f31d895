"""Two small residual networks for RGB restoration (denoising and deblurring).

- :class:`ResidualCNN`: DnCNN-style (Zhang et al., "Beyond a Gaussian Denoiser", IEEE TIP 2017),
  ``depth`` 3x3 convs of ``channels`` with ReLU and no batch norm; optional per-layer
  ``dilations`` (as in IRCNN, Zhang et al. CVPR 2017) widen the receptive field at no extra cost.
- :class:`SmallUNet`: two stride-2 conv downsamplings and pixel-shuffle upsamplings with additive
  skips. It sees much further than the DnCNN (kernels of camera shake are up to 27x27 pixels) and,
  since most of its convs run at 1/2 and 1/4 resolution, costs fewer FLOPs per pixel.

Both are plain ``Conv2d`` + ReLU (+ ``PixelShuffle``), so every conv can take an adapter and the
merged deploy model is exactly the original architecture; without batch norm ``train()`` and
``eval()`` are the same function. Both predict the degradation residual: ``y - net(y)``.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from examples.span_sr.checkpoint import write_atomically

__all__ = ["ResidualCNN", "SmallUNet", "build_model", "load_model", "receptive_field", "save_model"]

ARCHS = ("ResidualCNN", "SmallUNet")


def _init(convs: list[nn.Conv2d], tail: nn.Conv2d) -> None:
    for conv in convs:
        nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
    # A small last layer: the untrained network starts close to the identity map.
    nn.init.normal_(tail.weight, std=1e-3)
    for conv in [*convs, tail]:
        if conv.bias is not None:
            nn.init.zeros_(conv.bias)


class ResidualCNN(nn.Module):
    """``depth`` 3x3 convs (``head``, ``body.0 .. body.{depth-3}``, ``tail``) with ReLU between.

    Args:
        channels: Feature channels of the hidden layers.
        depth: Number of conv layers in total (at least 3).
        in_channels: Image channels (3 for RGB).
        dilations: One dilation per conv layer (``depth`` values); ``None``: all 1.
    """

    def __init__(self, channels: int = 32, depth: int = 10, in_channels: int = 3,
                 dilations: Sequence[int] | None = None) -> None:
        super().__init__()
        if depth < 3 or channels < 1 or in_channels < 1:
            raise ValueError(f"ResidualCNN needs depth >= 3 and positive channels; got depth={depth}, "
                             f"channels={channels}, in_channels={in_channels}.")
        dil = [1] * depth if dilations is None else [int(d) for d in dilations]
        if len(dil) != depth or min(dil) < 1:
            raise ValueError(f"dilations={list(dilations or [])} must give one positive dilation per "
                             f"conv layer ({depth} values).")
        self.channels, self.depth, self.in_channels, self.dilations = channels, depth, in_channels, dil

        def conv(cin: int, cout: int, d: int) -> nn.Conv2d:
            return nn.Conv2d(cin, cout, 3, padding=d, dilation=d)

        self.head = conv(in_channels, channels, dil[0])
        self.body = nn.ModuleList(conv(channels, channels, d) for d in dil[1:-1])
        self.tail = conv(channels, in_channels, dil[-1])
        _init([self.head, *self.body], self.tail)

    def forward(self, x: Tensor) -> Tensor:
        """Restore a ``(N, C, H, W)`` batch in [0, 1] scale (the output is not clipped)."""
        h = F.relu(self.head(x))
        for conv in self.body:
            h = F.relu(conv(h))
        return x - self.tail(h)


class SmallUNet(nn.Module):
    """A three-level U-Net: ``channels`` at full, 1/2 and 1/4 resolution.

    Down: ``enc0`` (2 convs) -> stride-2 ``down1`` + ``enc1`` -> stride-2 ``down2`` + ``mid`` (2 convs).
    Up: ``up2`` (conv to 4x channels + PixelShuffle) + skip -> ``dec1`` -> ``up1`` + skip ->
    ``dec0`` -> ``tail``. Inputs whose sides are not multiples of 4 are reflect-padded and cropped.

    Args:
        channels: Feature channels at full, half and quarter resolution.
        in_channels: Image channels (3 for RGB).
    """

    def __init__(self, channels: Sequence[int] = (32, 48, 64), in_channels: int = 3) -> None:
        super().__init__()
        c0, c1, c2 = (int(c) for c in channels)
        if min(c0, c1, c2, in_channels) < 1:
            raise ValueError(f"SmallUNet needs three positive channel counts, got {list(channels)}.")
        self.channels, self.in_channels = [c0, c1, c2], in_channels

        def conv(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
            return nn.Conv2d(cin, cout, 3, stride=stride, padding=1)

        self.enc0 = nn.ModuleList([conv(in_channels, c0), conv(c0, c0)])
        self.down1, self.enc1 = conv(c0, c1, 2), conv(c1, c1)
        self.down2, self.mid = conv(c1, c2, 2), nn.ModuleList([conv(c2, c2), conv(c2, c2)])
        self.up2, self.dec1 = conv(c2, 4 * c1), conv(c1, c1)
        self.up1, self.dec0 = conv(c1, 4 * c0), conv(c0, c0)
        self.tail = conv(c0, in_channels)
        self.shuffle = nn.PixelShuffle(2)
        _init([m for m in self.modules() if isinstance(m, nn.Conv2d) and m is not self.tail], self.tail)

    def forward(self, x: Tensor) -> Tensor:
        """Restore a ``(N, C, H, W)`` batch in [0, 1] scale (the output is not clipped)."""
        h, w = x.shape[-2:]
        ph, pw = -h % 4, -w % 4
        y = F.pad(x, (0, pw, 0, ph), mode="reflect") if ph or pw else x
        s0 = F.relu(self.enc0[1](F.relu(self.enc0[0](y))))
        s1 = F.relu(self.enc1(F.relu(self.down1(s0))))
        z = F.relu(self.down2(s1))
        for conv in self.mid:
            z = F.relu(conv(z))
        z = F.relu(self.dec1(F.relu(self.shuffle(self.up2(z))) + s1))
        z = F.relu(self.dec0(F.relu(self.shuffle(self.up1(z))) + s0))
        return x - self.tail(z)[..., :h, :w]


def receptive_field(model: nn.Module, probe: int = 128) -> int:
    """Side in pixels of the largest square input region one output pixel depends on.

    Measured, not derived: the input gradient of single output pixels at four alignments (the
    U-Net's answer depends on the pixel's position modulo 4) on a fixed random ``probe`` image.
    """
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(1, int(getattr(model, "in_channels", 3)), probe, probe, generator=gen, dtype=torch.float64)
    x.requires_grad_(True)
    net = copy.deepcopy(model).double().eval()
    out, side = net(x), 0
    for off in range(4):
        c = probe // 2 + off
        (grad,) = torch.autograd.grad(out[0, :, c, c].sum(), x, retain_graph=True)
        rows = grad.abs().sum(dim=(0, 1, 3)).nonzero()
        cols = grad.abs().sum(dim=(0, 1, 2)).nonzero()
        side = max(side, int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1))
    return side


def build_model(arch: str = "ResidualCNN", **kwargs) -> nn.Module:
    """The named network (``"ResidualCNN"`` or ``"SmallUNet"``) with its keyword arguments."""
    if arch == "ResidualCNN":
        return ResidualCNN(**kwargs)
    if arch == "SmallUNet":
        return SmallUNet(**kwargs)
    raise ValueError(f"model arch={arch!r} is not one of {list(ARCHS)}.")


def _hyper(model: nn.Module) -> dict[str, object]:
    if isinstance(model, ResidualCNN):
        return {"arch": "ResidualCNN", "channels": model.channels, "depth": model.depth,
                "dilations": model.dilations}
    if isinstance(model, SmallUNet):
        return {"arch": "SmallUNet", "channels": model.channels}
    raise TypeError(f"save_model() writes ResidualCNN or SmallUNet, got {type(model).__name__}.")


def save_model(model: nn.Module, path: str | os.PathLike[str], *, extra: dict | None = None) -> Path:
    """Write the plain model's weights as safetensors, with its hyperparameters in the metadata.

    Raises:
        ValueError: the model still holds LoRA layers (unload or merge them first).
    """
    keys = list(model.state_dict())
    if any(".lora_" in k for k in keys):
        raise ValueError("save_model() got a model with LoRA layers; call convlora.unload(model) "
                         "first (or save the adapter with convlora.save_adapter).")
    hyper = _hyper(model)
    meta = {"arch": str(hyper.pop("arch")), "hyper": json.dumps(hyper), "extra": json.dumps(extra or {})}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=meta))  # mode as the umask says
    return path


def load_model(path: str | os.PathLike[str]) -> nn.Module:
    """Build the network of a file written by :func:`save_model` (CPU, eval mode).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a checkpoint from this example.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist; train one with "
                                "examples/restoration/train.py.")
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open has no iterator
    arch = meta.get("arch")
    if arch not in ARCHS:
        raise ValueError(f"{path} is not a checkpoint of this example (arch={arch!r}, expected one of "
                         f"{list(ARCHS)}); pass the base weights written by examples/restoration/train.py.")
    if "hyper" in meta:
        hyper = json.loads(meta["hyper"])
    else:  # files from before the U-Net was added
        hyper = {"channels": int(meta["channels"]), "depth": int(meta["depth"])}
    model = build_model(arch, **hyper)
    model.load_state_dict(tensors, strict=True)
    return model.eval()
