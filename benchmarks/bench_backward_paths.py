"""One adapted conv's training backward: the activation-space path of convlora.lowrank_conv vs weight space.

For each conv shape (3x3, ``C -> C`` channels, a batch of ``N`` maps of ``H x H``) and each
method (rank ``--rank`` on the conv, random non-zero factors), two copies of the same layer run
interleaved in one process: forward + backward of ``sum(y * probe)`` into the factors and the
input, through the weight-space backward (autograd of ``W'``, what the layer uses below the size
threshold) and through the activation-space one (what it uses above). The ratio is
activation / weight space per round (below 1: the activation-space path is faster), and the
last column says which path the layer's rule
(``convlora.lowrank_conv.activation_backward_pays``) picks for that shape. Rows where the path
never applies are left out: ``3 * rank >= channels``, and DoRA where its output (the ``y - bias``
it would keep) has more entries than the weight. This is the
measurement behind the rule's threshold; the whole-model effect is in bench_methods.py.

    python benchmarks/bench_backward_paths.py
    python benchmarks/bench_backward_paths.py --methods lora dora --repeats 30
    python benchmarks/bench_backward_paths.py --quick    # smoke run (tiny shapes)
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable

import torch
from _timing import (
    add_common_args,
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
import convlora.lowrank_conv as lowrank_conv
from convlora.lokr import kron_split

# (channels, batch, size): the SR model's 48-channel convs at two batch sizes, then resnet-like
# stages (64 ch at 32x32 down to 512 ch at 4x4, batch 2 of a 128x128 image), and two larger batches.
SHAPES = [(48, 4, 64), (48, 16, 64), (64, 2, 32), (128, 2, 16), (256, 2, 8), (512, 2, 4),
          (128, 16, 32), (256, 16, 16)]
QUICK_SHAPES = [(32, 1, 4), (64, 1, 4)]  # with rank 2


def _layer(channels: int, method: str, rank: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1))
    convlora.inject(model, rank=rank, method=method)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in convlora.lora_parameters(model):
            p.add_(0.01 * torch.randn(p.shape, generator=gen))
    return model


def _step(model: nn.Module, x: torch.Tensor, probe: torch.Tensor, threshold: int) -> Callable[[], None]:
    params = list(convlora.lora_parameters(model))

    def step() -> None:
        lowrank_conv.ACTIVATION_BACKWARD_MIN_WEIGHT = threshold  # this case's path (restored at exit)
        for p in params:
            p.grad = None
        x.grad = None
        (model(x) * probe).sum().backward()

    return step


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(parser, repeats=15, warmup=2)
    parser.add_argument("--methods", nargs="+", default=["lora", "dora", "loha", "lokr"],
                        choices=["lora", "dora", "loha", "lokr"])
    parser.add_argument("--rank", type=int, default=4)
    args = parser.parse_args(argv)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    if args.quick:
        args.repeats, args.warmup, args.rank = 2, 1, 2
    set_threads(args.threads)
    device = torch.device(args.device)
    load_start = load_note()
    default = lowrank_conv.ACTIVATION_BACKWARD_MIN_WEIGHT
    rows: list[list[str]] = []
    try:
        for channels, batch, size in shapes:
            x = torch.randn(batch, channels, size, size, device=device, requires_grad=True)
            probe = torch.randn(batch, channels, size, size, device=device)
            for method in args.methods:
                model = _layer(channels, method, args.rank, 0).to(device)
                layer = model[0]
                eff = {"loha": args.rank ** 2,
                       "lokr": channels // kron_split(channels)[0]}.get(method, args.rank)
                weight = tuple(layer.weight.shape)
                kept = batch * channels * size * size if method == "dora" else 0  # DoRA's y - bias
                if 3 * eff >= channels or kept > channels * channels * 9:
                    continue  # the path does not apply at all (3 * rank >= channels, DoRA's memory rule)
                lowrank_conv.ACTIVATION_BACKWARD_MIN_WEIGHT = default  # the layer's own rule
                pays = lowrank_conv.activation_backward_pays(weight, 1, eff, kept)
                picks = "activation" if pays else "weight"
                cases = {"weight space": _step(model, x, probe, 1 << 62),
                         "activation space": _step(copy.deepcopy(model), x, probe, 0)}
                times = time_interleaved(cases, repeats=args.repeats, warmup=args.warmup,
                                         device=x.device)
                rows.append([f"{channels}->{channels} 3x3", f"{batch}x{channels}x{size}x{size}",
                             method, f"{weight[0] * weight[1] * 9:,}",
                             fmt_ratio(ratio_stats(times, "activation space", "weight space")), picks])
    finally:
        lowrank_conv.ACTIVATION_BACKWARD_MIN_WEIGHT = default
    print(f"## One conv's forward + backward, rank {args.rank}: activation-space / weight-space backward\n")
    print(markdown_table(["conv", "input", "method", "weight entries",
                          "activation / weight space: median [IQR]", "the layer picks"], rows))
    print()
    print(f"{args.repeats} interleaved rounds after {args.warmup} warm-up calls per case; "
          f"threshold {default:,} weight entries.")
    print(run_facts(device, load_start))


if __name__ == "__main__":
    main()
