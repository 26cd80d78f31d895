"""Shared benchmark helpers: interleaved timing, paired ratios, a markdown table, the run facts, the SR model.

Every benchmark in this folder measures several *cases* (callables) in one process. Timings on a
shared machine drift as other processes come and go, so the cases are interleaved: each round
runs every case once (in a rotated order), and a ratio is computed per round against the
reference case of that same round. We report the median and the interquartile range (IQR) of the
per-round times and of the per-round ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "Stats",
    "add_common_args",
    "conv_names",
    "fmt_ms",
    "fmt_ratio",
    "load_note",
    "markdown_table",
    "print_profile",
    "ratio_stats",
    "run_facts",
    "set_threads",
    "sr_model",
    "time_interleaved",
]


@dataclass(frozen=True)
class Stats:
    """Median and quartiles of a sample."""

    median: float
    q1: float
    q3: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stats:
        """Summarise ``values`` (at least one)."""
        if not values:
            raise ValueError("Stats.of() needs at least one value; got an empty sequence.")
        v = sorted(values)
        if len(v) == 1:
            q1 = q3 = v[0]
        else:
            q1, _, q3 = statistics.quantiles(v, n=4, method="inclusive")
        return cls(statistics.median(v), q1, q3, v[0], v[-1], len(v))


def add_common_args(parser: argparse.ArgumentParser, repeats: int, warmup: int) -> None:
    """Add ``--device``, ``--threads``, ``--repeats``, ``--warmup`` and ``--quick``."""
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads value (default: 1; on a shared, busy machine "
                        "more threads make every small op wait for descheduled OpenMP workers)")
    parser.add_argument("--repeats", type=int, default=repeats,
                        help=f"interleaved rounds (default: {repeats})")
    parser.add_argument("--warmup", type=int, default=warmup,
                        help=f"untimed calls of each case first (default: {warmup})")
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes and 2 rounds: checks the script runs, not a measurement")


def set_threads(n: int) -> None:
    """Pin intra-op threads (and inter-op threads, when still allowed) to ``n``."""
    if n < 1:
        raise ValueError(f"--threads={n} must be >= 1.")
    torch.set_num_threads(n)
    # Raises once parallel work has started; intra-op threads are what matter here.
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(n)


def load_note() -> str:
    """The machine's 1/5/15-minute load averages (other processes compete for the cores)."""
    if not hasattr(os, "getloadavg"):
        return "load average: unavailable on this platform"
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} / {five:.2f} / {fifteen:.2f} (1/5/15 min), {os.cpu_count()} CPUs"


def run_facts(device: torch.device | str, load_start: str) -> str:
    """The last lines of a benchmark's output: device, threads, torch and Python versions, then
    the machine and its load averages at the start (``load_start``, from ``load_note``) and now."""
    return (f"device={device}, threads={torch.get_num_threads()}, torch {torch.__version__}, "
            f"Python {platform.python_version()}.\n"
            f"Machine {platform.machine()}; at start: {load_start}; at end: {load_note()}.")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(cases: Mapping[str, Callable[[], object]], *, repeats: int, warmup: int,
                     device: torch.device | str = "cpu", inner: int = 1,
                     rotate: bool = True) -> dict[str, list[float]]:
    """Time each case ``repeats`` times, interleaved round by round.

    Args:
        cases: Name -> callable; each call is one unit of work.
        repeats: Number of rounds; each round times every case once.
        warmup: Untimed rounds (every case once, in order) before the first timed round.
        device: Synchronised around each timed call when it is a CUDA device.
        inner: Calls per timed sample (the sample is their mean), for very short operations.
        rotate: Rotate the order of the cases from round to round. Pass ``False`` when a case
            depends on the one before it (e.g. ``unmerge`` after ``merge``).

    Returns:
        Name -> list of seconds per call, one entry per round (same order as the rounds).
    """
    if repeats < 1 or inner < 1 or warmup < 0:
        raise ValueError(f"repeats={repeats} and inner={inner} must be >= 1 and warmup={warmup} "
                         ">= 0.")
    device = torch.device(device)
    names = list(cases)
    for _ in range(warmup):
        for name in names:
            cases[name]()
    _sync(device)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        # Rotate the order so no case always runs right after the same neighbour.
        k = r % len(names) if rotate else 0
        order = names[k:] + names[:k]
        for name in order:
            fn = cases[name]
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            _sync(device)
            times[name].append((time.perf_counter() - t0) / inner)
    return times


def ratio_stats(times: dict[str, list[float]], name: str, reference: str) -> Stats:
    """Per-round ratios ``times[name] / times[reference]`` summarised."""
    return Stats.of([a / b for a, b in zip(times[name], times[reference])])


def fmt_ms(s: Stats) -> str:
    """``median [q1, q3]`` in milliseconds."""
    def f(x: float) -> str:
        return f"{x * 1e3:.3g}" if x * 1e3 < 10 else f"{x * 1e3:.1f}"
    return f"{f(s.median)} [{f(s.q1)}, {f(s.q3)}]"


def fmt_ratio(s: Stats, digits: int = 3) -> str:
    """``median [q1, q3]`` of a ratio."""
    def f(x: float) -> str:
        return f"{x:.{digits}f}" if x >= 10 ** -digits else f"{x:.2g}"
    return f"{f(s.median)} [{f(s.q1)}, {f(s.q3)}]"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-markdown table with padded columns (readable in a terminal too)."""
    cols = [list(map(str, c)) for c in zip(header, *rows)]
    widths = [max(len(x) for x in col) for col in cols]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|",
                      *(line(r) for r in rows)])


def print_profile(label: str, fn: Callable[[], object], *, calls: int = 3, rows: int = 15) -> None:
    """Run ``fn`` once, then ``calls`` times under ``torch.profiler``; print the per-op table."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    fn()
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
    print(f"\n### torch.profiler: {label} ({calls} calls, sorted by self CPU time)\n")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def conv_names(model: nn.Module) -> list[str]:
    """Qualified names of the model's Conv2d layers."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


class _SRNet(nn.Module):
    """Plain SR-shaped CNN: head conv, ReLU-separated body convs, conv + PixelShuffle tail."""

    def __init__(self, channels: int, n_convs: int, scale: int) -> None:
        super().__init__()
        if n_convs < 2:
            raise ValueError(f"n_convs={n_convs} must be >= 2 (head and tail).")
        self.head = nn.Conv2d(3, channels, 3, padding=1)
        body: list[nn.Module] = []
        for _ in range(n_convs - 2):
            body += [nn.ReLU(inplace=True), nn.Conv2d(channels, channels, 3, padding=1)]
        self.body = nn.Sequential(*body)
        self.act = nn.ReLU(inplace=True)
        self.tail = nn.Conv2d(channels, 3 * scale * scale, 3, padding=1)
        self.shuffle = nn.PixelShuffle(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shuffle(self.tail(self.act(self.body(self.head(x)))))


def sr_model(channels: int = 48, n_convs: int = 8, scale: int = 2) -> nn.Module:
    """The benchmarks' SR-shaped model: ``n_convs`` 3x3 convs of ``channels`` channels.

    Conv layer names are ``head``, ``body.1``, ``body.3``, ... and ``tail``.
    """
    return _SRNet(channels, n_convs, scale)
