"""Spatial-affinity loss: naive N x N matrices (FAKD reference code) vs convlora.distill.

Forward + backward of the loss for a student map (requires grad) against a detached teacher
map, B=16, C in {26, 48}, 64x64 maps (N = 4096). Time: median and [min, max] over interleaved
repeats in this process. Peak memory: measured for real in a fresh subprocess per
configuration -- on CPU the peak RSS (VmHWM, reset through /proc/self/clear_refs right before the
call) minus the RSS before it; on CUDA torch.cuda.max_memory_allocated minus the allocation
before it. Inputs and torch itself are not counted in "extra"; the absolute peak is shown too.

    python benchmarks/bench_affinity.py                       # CPU, 2 threads
    python benchmarks/bench_affinity.py --device cuda --repeats 10
    python benchmarks/bench_affinity.py --batch 4 --repeats 2 # quicker
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from convlora.distill import affinity_loss  # noqa: E402

METHODS = ("naive", "convlora")


def naive_loss(s: torch.Tensor, t: torch.Tensor, p: int) -> torch.Tensor:
    """FAKD reference: normalise positions, full (B, N, N) affinities, mean |A_s - A_t|^p."""

    def aff(f: torch.Tensor) -> torch.Tensor:
        f = f.flatten(2)
        f = f / (f.norm(dim=1, keepdim=True) + 1e-7)
        return torch.bmm(f.transpose(1, 2), f)

    return ((aff(s) - aff(t)).abs() ** p).mean()


def make_inputs(batch: int, channels: int, size: int, device: str):
    gen = torch.Generator().manual_seed(channels)
    s = torch.randn(batch, channels, size, size, generator=gen).relu().to(device)
    t = (s + 0.1 * torch.randn(s.shape, generator=gen).to(device)).detach()
    return s.requires_grad_(True), t


def step(method: str, p: int, s: torch.Tensor, t: torch.Tensor, block: int | None) -> float:
    loss = naive_loss(s, t, p) if method == "naive" else affinity_loss(s, t, p=p, block_size=block)
    loss.backward()
    s.grad = None
    return loss.item()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_memory(args: argparse.Namespace) -> None:
    """Child process: one fwd+bwd, print peak memory as JSON."""
    torch.set_num_threads(args.threads)
    method, p, channels = args.child
    s, t = make_inputs(args.batch, int(channels), args.size, args.device)
    step(method, int(p), s[:1, :, :8, :8], t[:1, :, :8, :8], args.block_size)  # lazy init
    if args.device == "cuda":
        sync(args.device)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step(method, int(p), s, t, args.block_size)
        sync(args.device)
        peak = torch.cuda.max_memory_allocated()
        print(json.dumps({"extra": (peak - before) / 2**20, "peak": peak / 2**20}))
        return
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = rss_kib("VmRSS")
    step(method, int(p), s, t, args.block_size)
    peak = rss_kib("VmHWM")
    print(json.dumps({"extra": (peak - before) / 1024, "peak": peak / 1024}))


def child_memory(args: argparse.Namespace, method: str, p: int, channels: int) -> dict:
    cmd = [sys.executable, __file__, "--child", method, str(p), str(channels),
           "--batch", str(args.batch), "--size", str(args.size), "--device", args.device,
           "--threads", str(args.threads)]
    if args.block_size:
        cmd += ["--block-size", str(args.block_size)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--channels", type=int, nargs="+", default=[26, 48])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--block-size", type=int, default=None)
    ap.add_argument("--child", nargs=3, metavar=("METHOD", "P", "C"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        measure_memory(args)
        return
    torch.set_num_threads(args.threads)
    dev = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {args.threads} threads"
    n = args.size * args.size
    print(f"# B={args.batch}, N={n} ({args.size}x{args.size}), {dev}, torch {torch.__version__}, "
          f"block_size={args.block_size or 'default'}")
    print("| p | C | method | fwd+bwd s, median [min-max] | speed-up | extra peak MiB | "
          "memory ratio | abs. peak MiB | loss |")
    print("|---|---|---|---|---|---|---|---|---|")
    for channels in args.channels:
        s, t = make_inputs(args.batch, channels, args.size, args.device)
        for p in (1, 2):
            times: dict[str, list[float]] = {m: [] for m in METHODS}
            losses: dict[str, float] = {}
            for m in METHODS:  # lazy init on a small input
                step(m, p, s[:1, :, :8, :8], t[:1, :, :8, :8], args.block_size)
            for _ in range(args.repeats):
                for m in METHODS:
                    sync(args.device)
                    start = time.perf_counter()
                    losses[m] = step(m, p, s, t, args.block_size)
                    sync(args.device)
                    times[m].append(time.perf_counter() - start)
            mem = {m: child_memory(args, m, p, channels) for m in METHODS}
            med = {m: statistics.median(times[m]) for m in METHODS}
            for m in METHODS:
                speed = med["naive"] / med[m]
                ratio = mem["naive"]["extra"] / max(mem[m]["extra"], 1e-9)
                print(f"| {p} | {channels} | {m} | {med[m]:.3f} [{min(times[m]):.3f}-"
                      f"{max(times[m]):.3f}] | {speed:.2f}x | {mem[m]['extra']:.0f} | "
                      f"{ratio:.1f}x | {mem[m]['peak']:.0f} | {losses[m]:.6g} |", flush=True)


if __name__ == "__main__":
    main()
