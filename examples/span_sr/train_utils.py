"""Training plumbing for ``train.py``: device/DDP setup, schedule, optimizer + EMA, gradient sync, progress.

Everything here is generic over the model; ``train.py`` keeps the order of a run (config, setup,
data, models, loop, save) and calls these helpers.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Iterator

import torch
import torch.distributed as dist

from examples.span_sr.config import Config

__all__ = [
    "LossMeter",
    "Progress",
    "allreduce_mean_grads",
    "build_optimizer",
    "first_tensor",
    "lr_factor",
    "setup_device",
    "swapped",
    "sync_flags",
    "to_float",
]


def setup_device(cfg: Config) -> tuple[int, int, torch.device]:
    """``(world size, rank, device)`` from the torchrun environment; joins the process group when ``world > 1``.

    nccl on CUDA, gloo on CPU. On CUDA the device is ``cuda:LOCAL_RANK`` with TF32 and cuDNN autotuning.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    want_cuda = cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())
    if world > 1:
        dist.init_process_group("nccl" if want_cuda else "gloo")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if want_cuda else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # fixed patch size: let cuDNN pick the fastest kernels
    return world, rank, device


def to_float(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (or float) CHW batch -> float32 in [0, 1] on ``device`` (uint8 travels, floats are made there)."""
    x = x.to(device, non_blocking=True)
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


def first_tensor(output: object) -> torch.Tensor:
    """Tap selector: a SPAB returns ``(out, out1)``; distil its main output."""
    return output[0] if isinstance(output, (tuple, list)) else output  # type: ignore[return-value]


def lr_factor(step: int, cfg: Config) -> float:
    """Learning-rate multiplier: linear warm-up, then cosine to ``min_lr``, multistep or constant."""
    t = cfg.train
    if t.warmup and step < t.warmup:
        return (step + 1) / t.warmup
    if t.schedule == "cosine":
        progress = (step - t.warmup) / max(1, t.steps - t.warmup)
        return t.min_lr + (1 - t.min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if t.schedule == "multistep":
        return t.gamma ** sum(step >= m for m in t.milestones)
    if t.schedule == "constant":
        return 1.0
    raise ValueError(f"train.schedule={t.schedule!r}; use 'cosine', 'multistep' or 'constant'.")


def build_optimizer(params: list[torch.nn.Parameter], cfg: Config
                    ) -> tuple[torch.optim.Adam, torch.optim.lr_scheduler.LambdaLR, list[torch.Tensor] | None]:
    """Adam over ``params``, its warm-up + schedule (:func:`lr_factor`) and the EMA copies (None if off)."""
    opt = torch.optim.Adam(params, lr=cfg.train.lr, betas=(cfg.train.betas[0], cfg.train.betas[1]),
                           weight_decay=cfg.train.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    ema = [p.detach().clone() for p in params] if cfg.train.ema else None
    return opt, sched, ema


def allreduce_mean_grads(params: list[torch.nn.Parameter], world: int) -> None:
    """Average gradients over ranks with one flat all-reduce (DDP's semantics, one bucket)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
        offset += g.numel()


def sync_flags(interrupted: object, timeout: object, world: int, device: torch.device) -> tuple[bool, bool]:
    """Or the stop flags over ranks, so every rank stops at the same step."""
    if world == 1:
        return bool(interrupted), bool(timeout)
    flag = torch.tensor([float(bool(interrupted)), float(bool(timeout))], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag[0]), bool(flag[1])


@contextlib.contextmanager
def swapped(params: list[torch.nn.Parameter], ema: list[torch.Tensor] | None) -> Iterator[None]:
    """Temporarily load the EMA weights into ``params`` (no-op without EMA)."""
    if ema is None:
        yield
        return
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        torch._foreach_copy_([p.data for p in params], ema)
    try:
        yield
    finally:
        with torch.no_grad():
            torch._foreach_copy_([p.data for p in params], saved)


class LossMeter:
    """Running sums of ``(loss, rec, out, aff)`` on the device between two log lines (no sync per step)."""

    def __init__(self) -> None:
        self.sums: torch.Tensor | None = None
        self.count, self.t0 = 0, time.time()

    def add(self, loss: torch.Tensor, parts: dict[str, torch.Tensor]) -> None:
        """Add one step's total loss and its ``rec``/``out``/``aff`` parts."""
        values = torch.stack([loss.detach().float()] + [parts[k].detach().float() for k in ("rec", "out", "aff")])
        self.sums, self.count = (values if self.sums is None else self.sums + values), self.count + 1

    def mean(self, world: int) -> list[float]:
        """Mean over the steps since the last reset, and over ranks (the global batch's mean) when ``world > 1``."""
        assert self.sums is not None, "LossMeter.mean() before any add()"  # internal invariant, not user input
        if world > 1:
            dist.all_reduce(self.sums)
            self.sums /= world
        return (self.sums / self.count).tolist()

    def rate(self) -> float:
        """Steps per second since the last reset."""
        return self.count / (time.time() - self.t0)

    def reset(self) -> None:
        """Start a new log interval."""
        self.sums, self.count, self.t0 = None, 0, time.time()


class Progress:
    """tqdm when installed (steps, loss parts, lr, it/s, ETA), else a line per log interval."""

    def __init__(self, start: int, total: int, enabled: bool, bar: bool) -> None:
        self.enabled, self.n, self.total, self.t0, self.start = enabled, start, total, time.time(), start
        self.bar = None
        if enabled and bar:
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self.bar = tqdm(total=total, initial=start, dynamic_ncols=True, smoothing=0.05)

    def update(self, n: int) -> None:
        """Count ``n`` more steps."""
        self.n += n
        if self.bar is not None:
            self.bar.update(n)

    def set_postfix(self, **kw: str) -> None:
        """Show ``kw`` on the bar, or print them with the rate and ETA when there is no bar."""
        if self.bar is not None:
            self.bar.set_postfix(kw, refresh=False)
        elif self.enabled:
            rate = (self.n - self.start) / max(1e-9, time.time() - self.t0)
            eta = (self.total - self.n) / max(rate, 1e-9)
            print(f"step {self.n}/{self.total} " + " ".join(f"{k} {v}" for k, v in kw.items())
                  + f" | {rate:.2f} it/s, ETA {eta:.0f}s", flush=True)

    def close(self) -> None:
        """Close the bar (if any)."""
        if self.bar is not None:
            self.bar.close()
