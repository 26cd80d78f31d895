"""Cost of merge(), unmerge() and set_adapter() on timm resnet50, relative to one forward pass.

Two rank-8 adapters (``default`` and ``b``) sit on every conv of a randomly initialised timm
``resnet50``. Each round times, in this order: one forward pass of the plain (never injected)
resnet50 at batch 1, 224x224 under ``torch.inference_mode`` (the reference); ``merge()``;
``unmerge()``; ``set_adapter('b')``; ``set_adapter('default')``. Ratios are per round.

    python benchmarks/bench_merge_switch.py
    python benchmarks/bench_merge_switch.py --device cuda
    python benchmarks/bench_merge_switch.py --quick          # smoke run (resnet18, 64x64)
"""

from __future__ import annotations

import argparse
import copy

import timm
import torch
from _timing import (
    Stats,
    add_common_args,
    fmt_ms,
    fmt_ratio,
    load_note,
    markdown_table,
    ratio_stats,
    run_facts,
    set_threads,
    time_interleaved,
)
from torch import nn

import convlora


def adapted(base: nn.Module, rank: int) -> nn.Module:
    """A copy of ``base`` with adapters ``default`` and ``b`` (non-zero B) on every conv."""
    model = copy.deepcopy(base)
    convlora.inject(model, rank=rank)
    convlora.inject(model, convlora.LoRAConfig(rank=rank), adapter_name="b")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in convlora.lora_parameters(model):
            p.copy_(0.01 * torch.randn(p.shape, generator=g).to(p))
    convlora.set_adapter(model, "default")
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(parser, repeats=20, warmup=2)
    parser.add_argument("--model", default="resnet50", help="timm model name (default: resnet50)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.size, args.repeats, args.warmup = "resnet18", 64, 2, 1
    set_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)

    load_start = load_note()
    base = timm.create_model(args.model, pretrained=False).to(device).eval()
    model = adapted(base, args.rank)
    n_layers = len(convlora.lora_layers(model))
    x = torch.rand(1, 3, args.size, args.size, device=device)

    def forward() -> None:
        with torch.inference_mode():
            base(x)

    # Order matters (unmerge needs a merged model), so the rounds are not rotated.
    cases = {
        "forward pass (plain model, batch 1)": forward,
        "merge()": lambda: convlora.merge(model),
        "unmerge()": lambda: convlora.unmerge(model),
        "set_adapter('b')": lambda: convlora.set_adapter(model, "b"),
        "set_adapter('default')": lambda: convlora.set_adapter(model, "default"),
    }
    times = time_interleaved(cases, repeats=args.repeats, warmup=args.warmup, device=device,
                             rotate=False)
    ref = next(iter(cases))
    rows = [[name, fmt_ms(Stats.of(t)), fmt_ratio(ratio_stats(times, name, ref), digits=4)]
            for name, t in times.items()]
    print(f"## merge / unmerge / set_adapter: timm {args.model}, {n_layers} conv layers, two "
          f"rank-{args.rank} adapters\n")
    print(markdown_table(["operation", "ms: median [IQR]", "ratio vs one forward: median [IQR]"],
                         rows))
    print(f"\nReference: one forward pass at 1x3x{args.size}x{args.size}. {args.repeats} rounds "
          f"after {args.warmup} warm-up rounds; {run_facts(device, load_start)}")


if __name__ == "__main__":
    main()
