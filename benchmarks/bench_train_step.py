"""Training-step cost: unmerged ConvLoRA vs full fine-tuning vs PEFT's LoRA, on one SR-shaped model.

One step = zero_grad, forward, L1 loss, backward, Adam step. The cases start from copies of the
same model and run interleaved in one process; ratios are per round against full fine-tuning. A
second, identical full fine-tuning case is an A/A control: its ratio is 1 by construction, so its
spread shows the measurement noise.

    python benchmarks/bench_train_step.py                     # 8 convs, 48 ch, batch 16 of 64x64
    python benchmarks/bench_train_step.py --batch 4           # lighter, for a busy machine
    python benchmarks/bench_train_step.py --profile           # + torch.profiler op tables
    python benchmarks/bench_train_step.py --device cuda
    python benchmarks/bench_train_step.py --quick             # smoke run (tiny shapes)

Needs ``peft`` (the ``bench`` extra); without it the PEFT row is left out with a note.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from _timing import (
    Stats,
    add_common_args,
    conv_names,
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


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """One Adam training step over the model's trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = F.l1_loss(model(x), y)
        loss.backward()
        opt.step()

    return step


def build_cases(base: nn.Module, rank: int, x: torch.Tensor, y: torch.Tensor
                ) -> tuple[dict[str, Callable[[], None]], dict[str, int], list[str]]:
    """The step callables, their trainable-parameter counts, and notes."""
    notes: list[str] = []
    models: dict[str, nn.Module] = {"full fine-tuning": copy.deepcopy(base),
                                    "full fine-tuning, 2nd copy (A/A control)": copy.deepcopy(base)}

    ours = copy.deepcopy(base)
    convlora.inject(ours, rank=rank)  # freeze=True: only lora_A / lora_B train
    models["ConvLoRA (unmerged)"] = ours

    try:
        import peft
    except ImportError:
        notes.append("peft is not installed (pip install -e '.[test]'); PEFT row omitted.")
    else:
        config = peft.LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0,
                                 target_modules=conv_names(base))
        models[f"PEFT LoRA {peft.__version__}"] = peft.get_peft_model(copy.deepcopy(base), config)

    steps = {name: make_step(m, x, y) for name, m in models.items()}
    counts = {name: sum(p.numel() for p in m.parameters() if p.requires_grad)
              for name, m in models.items()}
    return steps, counts, notes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(parser, repeats=15, warmup=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=64, help="LR patch side (default: 64)")
    parser.add_argument("--channels", type=int, default=48)
    parser.add_argument("--convs", type=int, default=8)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--profile", action="store_true", help="also print profiler tables")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.size, args.channels, args.repeats, args.warmup = 2, 16, 8, 2, 1
    set_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)

    base = sr_model(args.channels, args.convs).to(device)
    x = torch.rand(args.batch, 3, args.size, args.size, device=device)
    y = torch.rand(args.batch, 3, 2 * args.size, 2 * args.size, device=device)
    load_start = load_note()
    steps, counts, notes = build_cases(base, args.rank, x, y)
    times = time_interleaved(steps, repeats=args.repeats, warmup=args.warmup, device=device)

    ref = "full fine-tuning"
    rows = [[name, f"{counts[name]:,}", fmt_ms(Stats.of(t)), fmt_ratio(ratio_stats(times, name, ref))]
            for name, t in times.items()]
    print(f"## Training step: {args.convs} convs 3x3, {args.channels} ch, batch {args.batch} of "
          f"{args.size}x{args.size} (x2 PixelShuffle tail), rank {args.rank}, Adam\n")
    print(markdown_table(["case", "trainable params", "step ms: median [IQR]",
                          "ratio vs full FT: median [IQR]"], rows))
    print(f"\n{args.repeats} interleaved rounds after {args.warmup} warm-up steps per case; "
          f"{run_facts(device, load_start)}")
    for note in notes:
        print(f"Note: {note}")
    if args.profile:
        for name, step in steps.items():
            print_profile(name, step)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
