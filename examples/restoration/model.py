"""A small DnCNN-style residual network for RGB restoration (denoising and deblurring).

Zhang, Zuo, Chen, Meng, Zhang, "Beyond a Gaussian Denoiser: Residual Learning of Deep CNN for
Image Denoising", IEEE TIP 2017.

Differences from the paper's DnCNN (17 layers, 64 channels, batch norm): 10 conv layers of 32
channels and no batch norm. Why this network: it is the standard baseline for both denoising and
(non-blind and blind) deblurring, it is plain ``Conv2d`` + ReLU so every layer can take an
adapter, and at 75.7k parameters it trains in minutes on a 2-core CPU. Without batch norm the
network is the same function in ``train()`` and ``eval()`` and the merged deploy model is exactly
the original architecture. The cost is a 21x21 receptive field, smaller than the largest
Levin kernel (27x27); a small U-Net would see further but is several times slower here.

The network predicts the degradation residual: ``restore(y) = y - net(y)``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

__all__ = ["ResidualCNN", "build_model", "load_model", "save_model"]

ARCH = "ResidualCNN"


class ResidualCNN(nn.Module):
    """``depth`` 3x3 convs (``head``, ``body.0 .. body.{depth-3}``, ``tail``) with ReLU between.

    Args:
        channels: Feature channels of the hidden layers.
        depth: Number of conv layers in total (at least 3).
        in_channels: Image channels (3 for RGB).
    """

    def __init__(self, channels: int = 32, depth: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if depth < 3 or channels < 1 or in_channels < 1:
            raise ValueError(f"ResidualCNN needs depth >= 3 and positive channels; got depth={depth}, "
                             f"channels={channels}, in_channels={in_channels}.")
        self.channels, self.depth, self.in_channels = channels, depth, in_channels
        self.head = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.body = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in range(depth - 2))
        self.tail = nn.Conv2d(channels, in_channels, 3, padding=1)
        for conv in [self.head, *self.body]:
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
        # A small last layer: the untrained network starts close to the identity map.
        nn.init.normal_(self.tail.weight, std=1e-3)
        for p in self.parameters():
            if p.dim() == 1:  # biases
                nn.init.zeros_(p)

    def forward(self, x: Tensor) -> Tensor:
        """Restore a ``(N, C, H, W)`` batch in [0, 1] scale (the output is not clipped)."""
        h = F.relu(self.head(x))
        for conv in self.body:
            h = F.relu(conv(h))
        return x - self.tail(h)


def build_model(channels: int = 32, depth: int = 10) -> ResidualCNN:
    """The network with the example's default size (10 layers, 32 channels, RGB)."""
    return ResidualCNN(channels=channels, depth=depth)


def save_model(model: ResidualCNN, path: str | os.PathLike[str], *, extra: dict | None = None) -> Path:
    """Write the plain model's weights as safetensors, with its size in the metadata.

    Raises:
        ValueError: the model still holds LoRA layers (unload or merge them first).
    """
    keys = list(model.state_dict())
    if any(".lora_" in k for k in keys):
        raise ValueError("save_model() got a model with LoRA layers; call convlora.unload(model) "
                         "first (or save the adapter with convlora.save_adapter).")
    meta = {"arch": ARCH, "channels": str(model.channels), "depth": str(model.depth),
            "extra": json.dumps(extra or {})}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata=meta)
    return path


def load_model(path: str | os.PathLike[str]) -> ResidualCNN:
    """Build a :class:`ResidualCNN` from a file written by :func:`save_model` (CPU, eval mode).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a ResidualCNN checkpoint from this example.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist; train one with "
                                "examples/restoration/train.py.")
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open has no iterator
    if meta.get("arch") != ARCH:
        raise ValueError(f"{path} is not a {ARCH} checkpoint (arch={meta.get('arch')!r}); pass the "
                         "base weights written by examples/restoration/train.py.")
    model = ResidualCNN(channels=int(meta["channels"]), depth=int(meta["depth"]))
    model.load_state_dict(tensors, strict=True)
    return model.eval()
