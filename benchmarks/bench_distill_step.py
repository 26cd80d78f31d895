"""Cost of one DSCLoRA training step, against a naive affinity step and a plain L1 fine-tune.

    python benchmarks/bench_distill_step.py                      # CPU, CI-sized (batch 4, 32x32 LR)
    python benchmarks/bench_distill_step.py --device cuda        # GPU: batch 32, 64x64 LR (the issue's size)

Every variant is a full optimizer step of the span_tiny_ch26 DSCLoRA student (Adam on the
adapters; random SPAN weights of the same widths when ../shared is absent, the cost is the same):

* ``l1``: student forward/backward with L1(SR, HR) only (plain fine-tune, no teacher);
* ``out``: + teacher (span_ch28) forward, 0.2 L1(SR,HR) + 0.8 L1(SR,SR_t) (the shipped recipe);
* ``aff p=2``: + affinity on 7 taps (six SPABs, conv_2) with the Gram identity;
* ``aff p=1``: + exact FAKD affinity (blocked, memory-bounded) on the 7 taps;
* ``naive p=1``: the FAKD reference formula: full B x N x N affinities per tap.

Variants run interleaved for ``--repeats`` rounds; the table gives the median step time, the
spread (min..max), the ratio to ``l1`` at the same batch and it/s. A second table splits the
p=2 and p=1 steps into parts (teacher forward, student forward, losses, backward, optimizer).
The naive baseline may not fit at the full batch on a GPU: ``--naive-batch`` (default 8 on CUDA)
runs it, and an ``l1`` at the same batch for its ratio, at that smaller batch.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import convlora  # noqa: E402
from convlora.distill import Distiller, FeatureTaps  # noqa: E402
from examples.span_sr.arch import SPAN, load_span  # noqa: E402
from examples.span_sr.dsclora import build_student  # noqa: E402

WEIGHTS = REPO.parent / "shared" / "data" / "weights"
TAPS = [f"block_{i}" for i in range(1, 7)] + ["conv_2"]


def _first(o: object) -> torch.Tensor:
    return o[0] if isinstance(o, (tuple, list)) else o  # type: ignore[return-value]


def _models(device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module]:
    if (WEIGHTS / "span_tiny_ch26.pth").is_file():
        base, teacher = load_span(WEIGHTS / "span_tiny_ch26.pth"), load_span(WEIGHTS / "span_ch28.pth")
    else:
        base, teacher = SPAN(feature_channels=26), SPAN(feature_channels=28)
    student = build_student(base)
    convlora.mark_only_lora_trainable(student)
    return student.to(device), teacher.to(device).requires_grad_(False)


def _naive_aff(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """FAKD reference: normalise channels, full (B, N, N) affinities, mean |A_s - A_t|."""
    def aff(f: torch.Tensor) -> torch.Tensor:
        f = F.normalize(f.float().flatten(2), dim=1, eps=1e-8)
        return f.transpose(1, 2) @ f
    return (aff(s) - aff(t)).abs().mean()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(kind: str, student: torch.nn.Module, teacher: torch.nn.Module, batch: int, patch: int,
              device: torch.device, parts: dict[str, float] | None = None) -> Callable[[], None]:
    """One optimizer step of variant ``kind``; with ``parts``, accumulates seconds per part."""
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-5)
    gen = torch.Generator().manual_seed(0)
    lr = torch.rand(batch, 3, patch, patch, generator=gen).to(device)
    hr = torch.rand(batch, 3, 4 * patch, 4 * patch, generator=gen).to(device)
    taps = {t: t for t in TAPS}
    distiller = None
    if kind in ("out", "aff p=2", "aff p=1"):
        distiller = Distiller(student, teacher, taps, w_rec=0.2, w_out=0.8, select=_first,
                              w_aff=0.0 if kind == "out" else 0.05, p=2 if kind == "aff p=2" else 1)
    clock = [time.perf_counter()]

    def mark(name: str) -> None:
        if parts is not None:
            _sync(device)
            now = time.perf_counter()
            parts[name] = parts.get(name, 0.0) + now - clock[0]
            clock[0] = now

    def tapped_forward() -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Teacher (no grad) and student forwards with their tap features, timed separately."""
        with torch.no_grad(), FeatureTaps(teacher, taps, select=_first, detach=True) as tt:
            t_sr = teacher(lr)
            t_feats = tt.pop()
        mark("teacher fwd")
        with FeatureTaps(student, taps, select=_first) as st:
            sr = student(lr)
            s_feats = st.pop()
        mark("student fwd")
        return sr, t_sr, s_feats, t_feats

    def step() -> None:
        clock[0] = time.perf_counter()
        if kind == "l1":
            loss = F.l1_loss(student(lr), hr)
            mark("student fwd + loss")
        elif kind == "naive p=1":
            sr, t_sr, s_feats, t_feats = tapped_forward()
            aff = torch.stack([_naive_aff(s_feats[k], t_feats[k]) for k in taps]).mean()
            loss = 0.2 * F.l1_loss(sr, hr) + 0.8 * F.l1_loss(sr, t_sr) + 0.05 * aff
            mark("losses")
        else:
            assert distiller is not None
            if parts is None:
                loss = distiller(lr, hr)[0]
            else:  # the same computation, split into parts
                sr, t_sr, s_feats, t_feats = tapped_forward()
                aff = distiller._affinity(s_feats, t_feats) if distiller.w_aff else sr.new_zeros(())
                loss = 0.2 * F.l1_loss(sr, hr) + 0.8 * F.l1_loss(sr, t_sr) + distiller.w_aff * aff
                mark("losses")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        mark("backward")
        opt.step()
        mark("optimizer")
        _sync(device)

    return step


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=None, help="default: 4 on CPU, 32 on CUDA")
    ap.add_argument("--patch", type=int, default=None, help="LR side; default 32 on CPU, 64 on CUDA")
    ap.add_argument("--naive-batch", type=int, default=None, help="default: --batch on CPU, 8 on CUDA")
    ap.add_argument("--repeats", type=int, default=None, help="default 5 on CPU, 30 on CUDA")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    batch = args.batch or (32 if cuda else 4)
    patch = args.patch or (64 if cuda else 32)
    naive_batch = args.naive_batch or (8 if cuda else batch)
    repeats = args.repeats or (30 if cuda else 5)
    torch.set_num_threads(args.threads)
    student, teacher = _models(device)
    variants = [("l1", batch), ("out", batch), ("aff p=2", batch), ("aff p=1", batch), ("naive p=1", naive_batch)]
    if naive_batch != batch:
        variants += [("l1", naive_batch), ("aff p=1", naive_batch)]
    steps = {(k, b): make_step(k, student, teacher, b, patch, device) for k, b in variants}
    for fn in steps.values():  # warm-up (allocator, cudnn autotune)
        fn()
        fn()
    times: dict[tuple[str, int], list[float]] = {key: [] for key in steps}
    for _ in range(repeats):
        for key, fn in steps.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    where = f"{torch.cuda.get_device_name(device)}" if cuda else f"CPU, {args.threads} threads"
    print(f"# DSCLoRA step, span_tiny_ch26 student / span_ch28 teacher, LR {patch}x{patch}, {where}, "
          f"torch {torch.__version__}, {repeats} interleaved repeats")
    print("| variant | batch | median ms | min..max ms | x l1 (same batch) | it/s |")
    print("|---|---|---|---|---|---|")
    for (kind, b), ts in times.items():
        med = statistics.median(ts)
        ref = statistics.median(times[("l1", b)])
        print(f"| {kind} | {b} | {med * 1e3:.1f} | {min(ts) * 1e3:.1f}..{max(ts) * 1e3:.1f} | "
              f"{med / ref:.2f} | {1 / med:.1f} |")
    print(f"\n| variant (batch {batch}) | teacher fwd | student fwd | losses | backward | optimizer |")
    print("|---|---|---|---|---|---|")
    for kind in ("out", "aff p=2", "aff p=1"):
        parts: dict[str, float] = {}
        fn = make_step(kind, student, teacher, batch, patch, device, parts)
        fn()
        parts.clear()
        for _ in range(max(3, repeats // 3)):
            fn()
        total = sum(parts.values())
        cells = " | ".join(f"{100 * parts.get(p, 0) / total:.0f}%" for p in
                           ("teacher fwd", "student fwd", "losses", "backward", "optimizer"))
        print(f"| {kind} | {cells} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
