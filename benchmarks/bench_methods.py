"""DoRA, LoHa, LoKr: training step and unmerged inference, convlora vs full fine-tuning vs PEFT.

For each model (the SR-shaped benchmark model of bench_train_step.py / bench_inference.py,
timm ``resnet18`` and, on request, ``resnet50``, the model of bench_merge_switch.py; random
weights) every case starts from a copy of the same model and runs interleaved in one process,
with adapters of rank ``--rank`` on every conv:

* train step (zero_grad, forward, L1 loss, backward, Adam step): full fine-tuning (the
  reference), a second full fine-tuning copy (A/A control: its spread is the noise), convlora's
  LoRA / DoRA / LoHa / LoKr / LoHa in the Tucker form (``loha+tucker``; unmerged) and PEFT's
  LoRA / DoRA / LoHa / LoKr / LoHa with ``use_effective_conv2d``. (Tucker LoKr is left out: at
  rank 4 on 48- or 64-channel convs its ``W2`` is full, where the option changes nothing);
* inference (``torch.inference_mode``, eval mode): the original model (reference), an A/A
  copy, and the same adapted models unmerged.

Ratios are per round against the reference of the same round (median [IQR]). The train table
also gives, per case, the memory one forward keeps for backward (the tensors autograd saves,
parameters not counted: activations, and for a weight-space method the effective weights).

    python benchmarks/bench_methods.py                         # SR 48ch batch 4 of 64x64, resnet18 batch 2 of 128
    python benchmarks/bench_methods.py --models sr resnet18 resnet50   # + resnet50 (the merge benchmark's model)
    python benchmarks/bench_methods.py --models sr --what train
    python benchmarks/bench_methods.py --device cuda
    python benchmarks/bench_methods.py --quick                 # smoke run (tiny shapes)

Needs ``peft`` (the ``test`` extra); without it the PEFT rows are left out with a note.
"""

from __future__ import annotations

import argparse
import copy
import warnings
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
    ratio_stats,
    run_facts,
    set_threads,
    sr_model,
    time_interleaved,
)
from torch import nn

import convlora

METHODS: dict[str, dict[str, object]] = {
    **{m: {"method": m} for m in ("lora", "dora", "loha", "lokr")},
    "loha+tucker": {"method": "loha", "tucker": True},
}
"""The convlora cases: ``{label: inject keywords}``."""


def _nonzero(params: list[nn.Parameter], seed: int) -> None:
    """Small random values in every factor (as after some training): no zero shortcut anywhere."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(0.01 * torch.randn(p.shape, generator=g).to(p))


def adapted(base: nn.Module, rank: int) -> tuple[dict[str, nn.Module], list[str]]:
    """convlora and PEFT copies of ``base`` with each method on every conv."""
    models: dict[str, nn.Module] = {}
    notes: list[str] = []
    for label, kwargs in METHODS.items():
        m = copy.deepcopy(base)
        convlora.inject(m, rank=rank, **kwargs)  # type: ignore[arg-type]
        _nonzero(list(convlora.lora_parameters(m)), 1)
        models[f"convlora {label}"] = m
    try:
        import peft
    except ImportError:
        notes.append("peft is not installed (pip install -e '.[test]'); PEFT rows omitted.")
        return models, notes
    targets = conv_names(base)
    configs = {
        "lora": peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=targets),
        "dora": peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, use_dora=True),
        "loha": peft.LoHaConfig(r=rank, alpha=rank, target_modules=targets),
        "lokr": peft.LoKrConfig(r=rank, alpha=rank, target_modules=targets),
        "loha+tucker": peft.LoHaConfig(r=rank, alpha=rank, target_modules=targets,
                                       use_effective_conv2d=True),
    }
    for method, cfg in configs.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = peft.get_peft_model(copy.deepcopy(base), cfg)
        _nonzero([p for p in m.parameters() if p.requires_grad], 1)
        models[f"PEFT {peft.__version__} {method}"] = m
    return models, notes


def saved_for_backward_mb(model: nn.Module, x: torch.Tensor) -> float:
    """MB autograd keeps for backward after one forward of ``model`` (parameters not counted)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(storages.values()) / 1e6


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """One Adam training step over the model's trainable parameters."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.l1_loss(model(x), y).backward()
        opt.step()

    return step


def make_forward(model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    def call() -> object:
        with torch.inference_mode():
            return model(x)
    return call


def run(label: str, base: nn.Module, x: torch.Tensor, target: torch.Tensor,
        args: argparse.Namespace) -> tuple[list[list[str]], list[list[str]], list[str]]:
    models, notes = adapted(base, args.rank)
    train_rows: list[list[str]] = []
    infer_rows: list[list[str]] = []
    shape = "x".join(map(str, x.shape))
    if "train" in args.what:
        cases_m = {"full fine-tuning": copy.deepcopy(base).train(),
                   "full fine-tuning, 2nd copy (A/A)": copy.deepcopy(base).train(),
                   **{k: m.train() for k, m in models.items()}}
        saved = {k: saved_for_backward_mb(m, x) for k, m in cases_m.items()}
        cases = {k: make_step(m, x, target) for k, m in cases_m.items()}
        times = time_interleaved(cases, repeats=args.repeats, warmup=args.warmup, device=x.device)
        for k, t in times.items():
            n = sum(p.numel() for p in cases_m[k].parameters() if p.requires_grad)
            train_rows.append([label, shape, k, f"{n:,}", f"{saved[k]:.1f}", fmt_ms(Stats.of(t)),
                               fmt_ratio(ratio_stats(times, k, "full fine-tuning"))])
    if "inference" in args.what:
        cases_m = {"original": copy.deepcopy(base).eval(),
                   "copy of original (A/A)": copy.deepcopy(base).eval(),
                   **{k: m.eval() for k, m in models.items()}}
        cases = {k: make_forward(m, x) for k, m in cases_m.items()}
        times = time_interleaved(cases, repeats=args.repeats, warmup=args.warmup, device=x.device)
        for k, t in times.items():
            infer_rows.append([label, shape, k, fmt_ms(Stats.of(t)),
                               fmt_ratio(ratio_stats(times, k, "original"))])
    return train_rows, infer_rows, notes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(parser, repeats=10, warmup=2)
    parser.add_argument("--models", nargs="+", default=["sr", "resnet18"],
                        choices=["sr", "resnet18", "resnet50"])
    parser.add_argument("--what", nargs="+", default=["train", "inference"],
                        choices=["train", "inference"])
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--sr-batch", type=int, default=4)
    parser.add_argument("--sr-size", type=int, default=64)
    parser.add_argument("--resnet-batch", type=int, default=2)
    parser.add_argument("--resnet-size", type=int, default=128)
    args = parser.parse_args(argv)
    if args.quick:
        args.sr_batch, args.sr_size, args.resnet_batch, args.resnet_size = 1, 16, 2, 32
        args.repeats, args.warmup = 2, 1
    set_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    load_start = load_note()
    train_rows: list[list[str]] = []
    infer_rows: list[list[str]] = []
    notes: list[str] = []
    if "sr" in args.models:
        channels = 8 if args.quick else 48
        x = torch.rand(args.sr_batch, 3, args.sr_size, args.sr_size, device=device)
        y = torch.rand(args.sr_batch, 3, 2 * args.sr_size, 2 * args.sr_size, device=device)
        t, i, n = run(f"SR 8x conv3x3 {channels}ch", sr_model(channels).to(device), x, y, args)
        train_rows, infer_rows, notes = train_rows + t, infer_rows + i, notes + n
    for name in ("resnet18", "resnet50"):
        if name not in args.models:
            continue
        import timm

        # zero_init_last=False: timm zeroes each block's last BN scale by default, which would
        # cut the gradient to the convs inside the residual branches.
        net = timm.create_model(name, pretrained=False, zero_init_last=False).to(device)
        x = torch.rand(args.resnet_batch, 3, args.resnet_size, args.resnet_size, device=device)
        y = torch.rand(args.resnet_batch, 1000, device=device)
        t, i, n = run(f"timm {name}", net, x, y, args)
        train_rows, infer_rows, notes = train_rows + t, infer_rows + i, notes + n
    if train_rows:
        print(f"## Training step per method, rank {args.rank} on every conv, Adam, L1 loss\n")
        print(markdown_table(["model", "input", "case", "trainable params", "saved for backward MB",
                              "step ms: median [IQR]", "ratio vs full FT: median [IQR]"], train_rows))
        print()
    if infer_rows:
        print(f"## Unmerged inference per method (torch.inference_mode), rank {args.rank} on every conv\n")
        print(markdown_table(["model", "input", "case", "forward ms: median [IQR]",
                              "ratio vs original: median [IQR]"], infer_rows))
        print()
    print(f"{args.repeats} interleaved rounds after {args.warmup} warm-up calls per case; "
          f"{run_facts(device, load_start)}")
    for note in sorted(set(notes)):
        print(f"Note: {note}")


if __name__ == "__main__":
    main()
