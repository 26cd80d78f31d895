"""Efficiency report of a SPAN checkpoint: parameters, FLOPs, activations, convs, runtime, memory.

    python examples/span_sr/efficiency.py --weights ../shared/data/weights/dsclora_ch26.pth
    python examples/span_sr/efficiency.py --weights W --device cuda --runtime-data DIV2K_LR/ --json r.json

Conventions (the NTIRE ESR challenge's):

* FLOPs are multiply-accumulates at a ``1x3x256x256`` input, as fvcore counts them (conv
  biases and pointwise ops not counted): ``torch.utils.flop_counter.FlopCounterMode`` total / 2.
* Activations: number of elements of all conv outputs at that input.
* Runtime: batch 1, fp32, averaged over images (``--runtime-data``, else random LR images of
  ``--runtime-size``); on CUDA timed with CUDA events around the forward, after warm-up; on CPU
  with ``time.perf_counter``. ``--variants`` adds fp16 and channels_last runs on CUDA; ``--fast``
  adds the fast path of ``examples/span_sr/fast.py`` (float32).
* Peak memory: ``torch.cuda.max_memory_allocated`` during the forward (CUDA only).

A DSCLoRA student gives identical figures after ``convlora.unload(merge=True)``: merging adds
no parameters, FLOPs or convs.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import argparse
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from examples.span_sr.checkpoint import write_json
from examples.span_sr.dsclora import load_deployed
from examples.span_sr.fast import fast_span
from examples.span_sr.outputs import refuse_inputs, stopped

__all__ = ["complexity", "count_convs", "count_params", "main", "measure_runtime", "runtime_inputs"]


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or not)."""
    return sum(p.numel() for p in model.parameters())


def _convs(model: nn.Module) -> list[nn.Module]:
    import convlora

    return [m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)
            or (isinstance(m, convlora.LoRALayer) and m.ndim > 0)]


def count_convs(model: nn.Module) -> int:
    """Number of convolutions (``nn.Conv*`` modules; a LoRA-wrapped conv counts once)."""
    return len(_convs(model))


@torch.no_grad()
def complexity(model: nn.Module, input_size: tuple[int, int] = (256, 256)) -> dict[str, Any]:
    """Parameters, MACs ("FLOPs"), conv-output activations and conv count at ``1x3xHxW``."""
    p = next(model.parameters())
    x = torch.rand(1, 3, *input_size, device=p.device, dtype=p.dtype)
    activations = 0

    def hook(_m: nn.Module, _i: Any, out: torch.Tensor) -> None:
        nonlocal activations
        activations += out.numel()

    handles = [m.register_forward_hook(hook) for m in _convs(model)]
    try:
        with FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        for h in handles:
            h.remove()
    return {"params": count_params(model), "flops": counter.get_total_flops() // 2,
            "activations": activations, "convs": len(handles), "input": [1, 3, *input_size]}


def runtime_inputs(data: str | Path | None, size: tuple[int, int], count: int) -> list[torch.Tensor]:
    """LR inputs for timing: images of folder ``data`` (all), else ``count`` random ``size`` images."""
    if data is None:
        gen = torch.Generator().manual_seed(0)
        return [torch.rand(1, 3, *size, generator=gen) for _ in range(count)]
    from examples.span_sr.images import list_images, read_image

    files = list_images(data)
    return [torch.tensor(read_image(f)).permute(2, 0, 1)[None].float() / 255 for f in files]


@torch.no_grad()
def measure_runtime(model: nn.Module, inputs: Sequence[torch.Tensor], *, warmup: int = 3,
                    repeats: int = 1, half: bool = False, channels_last: bool = False
                    ) -> dict[str, Any]:
    """Average forward time (ms) over ``inputs`` (each timed ``repeats`` times) and peak memory.

    On CUDA the forward is bracketed by CUDA events (NTIRE protocol); the model is converted
    to fp16 / channels_last on a copy when asked.
    """
    import copy

    p = next(model.parameters())
    cuda = p.device.type == "cuda"
    net = copy.deepcopy(model)
    dtype = torch.float16 if half else p.dtype
    net = net.to(dtype=dtype)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    xs = [x.to(p.device, dtype).contiguous(memory_format=fmt) for x in inputs]
    for i in range(warmup):
        net(xs[i % len(xs)])
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times: list[float] = []
    for x in xs:
        for _ in range(repeats):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                net(x)
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                net(x)
                times.append((time.perf_counter() - t0) * 1e3)
    return {"mean_ms": statistics.fmean(times), "median_ms": statistics.median(times),
            "stdev_ms": statistics.stdev(times) if len(times) > 1 else 0.0, "n": len(times),
            "peak_mem_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
            "dtype": str(dtype).removeprefix("torch."), "channels_last": channels_last}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", required=True)
    ap.add_argument("--lora-adapter", help="convlora adapter to load and merge first")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--runtime-data", help="folder of LR images to time on (e.g. DIV2K valid LR)")
    ap.add_argument("--runtime-size", type=int, nargs=2, default=(256, 256), metavar=("H", "W"))
    ap.add_argument("--runtime-count", type=int, default=3, help="random inputs without --runtime-data")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--no-runtime", action="store_true")
    ap.add_argument("--variants", action="store_true", help="also fp16 and channels_last (CUDA)")
    ap.add_argument("--fast", action="store_true",
                    help="also time the fast path (fast.py; float32), after the eager runs")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        refuse_inputs([args.json] if args.json else [], [args.weights, args.lora_adapter], "--json")
        model = load_deployed(args.weights, args.lora_adapter).to(args.device)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"efficiency.py: {err}") from None
    report: dict[str, Any] = {"weights": args.weights, "device": args.device, **complexity(model)}
    print(f"params      {report['params'] / 1e6:.3f} M ({report['params']:,})")
    print(f"FLOPs       {report['flops'] / 1e9:.2f} G (MACs at 1x3x256x256)")
    print(f"activations {report['activations'] / 1e6:.2f} M")
    print(f"convs       {report['convs']}")
    if not args.no_runtime:
        inputs = runtime_inputs(args.runtime_data, tuple(args.runtime_size), args.runtime_count)
        configs: list[dict[str, bool]] = [{}]
        if args.variants and args.device.startswith("cuda"):
            configs += [{"half": True}, {"channels_last": True}, {"half": True, "channels_last": True}]
        report["runtime"] = []
        for cfg in configs:
            r = measure_runtime(model, inputs, repeats=args.repeats, **cfg)
            report["runtime"].append(r)
            mem = f", peak {r['peak_mem_mb']:.1f} MB" if r["peak_mem_mb"] is not None else ""
            print(f"runtime     {r['mean_ms']:.2f} ms mean ({r['dtype']}, channels_last="
                  f"{r['channels_last']}, n={r['n']}{mem})")
        if args.fast:
            fast = fast_span(model)
            r = {**measure_runtime(fast, inputs, repeats=args.repeats), "fast": fast.backend}
            report["runtime"].append(r)
            print(f"runtime     {r['mean_ms']:.2f} ms mean (--fast: {fast.backend}, {r['dtype']}, "
                  f"n={r['n']}; warm-up calls excluded)")
    if args.json:
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:
        raise SystemExit(stopped("efficiency.py")) from None
