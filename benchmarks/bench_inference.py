"""Inference cost: original model vs merged+unloaded ConvLoRA model vs unmerged ConvLoRA model.

For each model (the SR-shaped benchmark model and timm ``resnet18``, random weights) four copies
run interleaved under ``torch.inference_mode``: the original; an untouched copy of it (A/A
control: shows the noise floor of the ratios); a copy with adapters injected, given non-zero
``B`` (as after training), then ``convlora.unload``-ed (merged: the original layer types); and a
copy that keeps the adapters unmerged. Ratios are per round against the original.

    python benchmarks/bench_inference.py
    python benchmarks/bench_inference.py --models sr        # only the SR-shaped model
    python benchmarks/bench_inference.py --models resnet18 --profile   # + profiler tables
    python benchmarks/bench_inference.py --device cuda
    python benchmarks/bench_inference.py --quick            # smoke run (tiny shapes)
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable

import torch
from _timing import (
    Stats,
    add_common_args,
    fmt_ms,
    fmt_ratio,
    load_note,
    markdown_table,
    print_profile,
    ratio_stats,
    run_facts,
    set_threads,
    sr_model,
    time_interleaved,
)
from torch import nn

import convlora


def perturb_adapters(model: nn.Module, seed: int = 0) -> None:
    """Give every adapter a non-zero ``B`` so the merge actually changes the weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in convlora.lora_parameters(model):
            p.copy_(0.01 * torch.randn(p.shape, generator=g).to(p))


def variants(base: nn.Module, rank: int) -> dict[str, nn.Module]:
    """The original, an untouched copy of it, its merged+unloaded adapted copy and its unmerged
    adapted copy. The untouched copy is an A/A control: its ratio is 1 by construction, so its
    spread shows the measurement noise that the merged+unloaded ratio should be read against."""
    unloaded = copy.deepcopy(base)
    convlora.inject(unloaded, rank=rank)
    perturb_adapters(unloaded)
    unloaded = convlora.unload(unloaded, merge=True)

    unmerged = copy.deepcopy(base)
    convlora.inject(unmerged, rank=rank)
    perturb_adapters(unmerged)
    return {"original": base, "copy of original (A/A control)": copy.deepcopy(base),
            "merged + unloaded": unloaded, "ConvLoRA unmerged": unmerged}


def run_model(label: str, base: nn.Module, x: torch.Tensor, args: argparse.Namespace
              ) -> list[list[str]]:
    """Time the three variants of one model; table rows."""
    models = {k: m.eval() for k, m in variants(base, args.rank).items()}

    def forward(m: nn.Module) -> Callable[[], object]:
        def call() -> object:
            with torch.inference_mode():
                return m(x)
        return call

    cases = {name: forward(m) for name, m in models.items()}
    times = time_interleaved(cases, repeats=args.repeats, warmup=args.warmup, device=x.device)
    if args.profile:
        for name in ("original", "ConvLoRA unmerged"):
            print_profile(f"{label}, {name}", cases[name])
    shape = "x".join(map(str, x.shape))
    return [[label, shape, name, fmt_ms(Stats.of(t)),
             fmt_ratio(ratio_stats(times, name, "original"))] for name, t in times.items()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(parser, repeats=20, warmup=3)
    parser.add_argument("--models", nargs="+", default=["sr", "resnet18"],
                        choices=["sr", "resnet18"])
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--sr-batch", type=int, default=16)
    parser.add_argument("--sr-size", type=int, default=64)
    parser.add_argument("--resnet-batch", type=int, default=4)
    parser.add_argument("--resnet-size", type=int, default=224)
    parser.add_argument("--profile", action="store_true",
                        help="also print torch.profiler tables (original and unmerged)")
    args = parser.parse_args(argv)
    if args.quick:
        args.sr_batch, args.sr_size, args.resnet_batch, args.resnet_size = 1, 16, 1, 32
        args.repeats, args.warmup = 2, 1
    set_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)

    load_start = load_note()
    rows: list[list[str]] = []
    if "sr" in args.models:
        channels = 8 if args.quick else 48
        x = torch.rand(args.sr_batch, 3, args.sr_size, args.sr_size, device=device)
        rows += run_model(f"SR 8x conv3x3 {channels}ch", sr_model(channels).to(device), x, args)
    if "resnet18" in args.models:
        import timm

        net = timm.create_model("resnet18", pretrained=False).to(device)
        x = torch.rand(args.resnet_batch, 3, args.resnet_size, args.resnet_size, device=device)
        rows += run_model("timm resnet18", net, x, args)

    print(f"## Inference (torch.inference_mode), adapters rank {args.rank} on every conv\n")
    print(markdown_table(["model", "input", "variant", "forward ms: median [IQR]",
                          "ratio vs original: median [IQR]"], rows))
    print(f"\n{args.repeats} interleaved rounds after {args.warmup} warm-up calls per case; "
          f"{run_facts(device, load_start)}")


if __name__ == "__main__":
    main()
