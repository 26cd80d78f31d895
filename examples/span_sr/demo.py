"""Stand-ins for pretrained weights, so the demo runs with no download.

With ``demo.enabled`` and an empty ``model.base`` or ``model.teacher``, ``train.py`` first trains
a small deploy-form SPAN from scratch with L1 for a few hundred steps (:func:`train_substitute`).
These stand-ins, and the student built on them, score below plain bicubic upscaling: they show
the pipeline, not the method's figures. Pass real weights for real results.
"""

from __future__ import annotations

import math
import time

import torch

from examples.span_sr.arch import SPAN
from examples.span_sr.config import DemoConfig
from examples.span_sr.data import ImageSet, PatchDataset, rank_batches, to_float

__all__ = ["train_substitute"]


def train_substitute(role: str, demo: DemoConfig, images: ImageSet, device: torch.device, seed: int) -> SPAN:
    """Train the stand-in ``role`` (``"base"`` or ``"teacher"``): width and steps from ``demo``, L1, cosine schedule."""
    width, steps = getattr(demo, f"{role}_width"), getattr(demo, f"{role}_steps")
    print(f"DEMO SUBSTITUTE: no pretrained {role} given; training a SPAN width {width} from scratch for {steps} "
          "steps (a tiny stand-in trained for seconds: it, and the student built on it, score below plain "
          "bicubic upscaling; pass real weights for real results)")
    torch.manual_seed(seed)
    model = SPAN(feature_channels=width, upscale=images.scale, form="deploy").to(device)
    opt = torch.optim.Adam(model.parameters(), lr=demo.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    data = PatchDataset(images, demo.patch, seed)
    t0 = time.time()
    for step, idx in enumerate(rank_batches(0, steps, demo.batch)):
        lr, hr = (torch.stack(x) for x in zip(*(data[i] for i in idx)))
        loss = (model(to_float(lr, device)) - to_float(hr, device)).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % max(1, steps // 4) == 0:
            print(f"  [demo substitute {role}] step {step + 1}/{steps} L1 {loss.item():.4f} ({time.time() - t0:.0f}s)")
    return model.eval()
