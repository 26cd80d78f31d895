"""Mixed-adapter batch: one ``per_sample`` forward vs four separate forwards vs PEFT's ``adapter_names=``.

Four rank-8 LoRA adapters (non-zero) sit on every conv of the benchmarks' SR-shaped model
(``_timing.sr_model``: 8 convs, 48 channels). The batch holds ``per`` samples of each adapter
(``4 * per`` samples in all). Cases, timed interleaved under ``torch.inference_mode``:

* ``convlora per_sample``: one forward inside ``convlora.per_sample(model, names)``, each layer
  grouping the batch by adapter;
* ``convlora 4 separate forwards``: ``set_adapter(name)`` and a forward of that adapter's
  samples, four times (the reference of the ratios);
* ``PEFT mixed batch``: PEFT's ``model(x, adapter_names=names)`` on the same model and
  adapters (needs ``peft``; left out with a note otherwise).

The script also checks that the three give the same outputs (printed as the largest difference).

    python benchmarks/bench_mixed_batch.py
    python benchmarks/bench_mixed_batch.py --device cuda
    python benchmarks/bench_mixed_batch.py --quick          # smoke run
"""

from __future__ import annotations

import argparse
import copy
import warnings

import torch
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

import convlora

ADAPTERS = ["a", "b", "c", "d"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(parser, repeats=15, warmup=2)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--size", type=int, default=64, help="input height = width (default 64)")
    parser.add_argument("--per", type=int, default=2, help="samples per adapter (default 2)")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.per, args.repeats, args.warmup = 16, 1, 2, 1
    set_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    load_start = load_note()

    base = sr_model().to(device).eval()
    model = copy.deepcopy(base)
    for name in ADAPTERS:
        convlora.inject(model, args.rank, float(args.rank), adapter_name=name)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in convlora.lora_parameters(model):
            p.copy_(0.05 * torch.randn(p.shape, generator=g).to(p))
    names = [n for n in ADAPTERS for _ in range(args.per)]
    x = torch.rand(len(names), 3, args.size, args.size, device=device)
    groups = {n: torch.tensor([i for i, m in enumerate(names) if m == n], device=device)
              for n in ADAPTERS}

    def mixed() -> torch.Tensor:
        with torch.inference_mode(), convlora.per_sample(model, names):
            return model(x)

    def separate() -> torch.Tensor:
        out = None
        with torch.inference_mode():
            for n, idx in groups.items():
                convlora.set_adapter(model, n)
                y = model(x[idx])
                if out is None:
                    out = y.new_empty((len(names), *y.shape[1:]))
                out[idx] = y
        return out  # type: ignore[return-value]

    cases = {"convlora 4 separate forwards": separate, "convlora per_sample": mixed}
    notes: list[str] = []
    try:
        import peft
    except ImportError:
        notes.append("peft is not installed (pip install -e '.[test]'); the PEFT row is omitted.")
    else:
        cfg = peft.LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=conv_names(base))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = peft.get_peft_model(copy.deepcopy(base), cfg, adapter_name="a")
            for n in ADAPTERS[1:]:
                pm.add_adapter(n, cfg)
        # the same factors as the convlora adapters (PEFT's B @ A * alpha/r, alpha = r)
        layers = convlora.lora_layers(model)
        with torch.no_grad():
            for lname, layer in layers.items():
                mod = pm.base_model.model.get_submodule(lname)
                for n in ADAPTERS:
                    a, b = layer.factors(n)["lora_A"], layer.factors(n)["lora_B"]
                    mod.lora_A[n].weight.copy_(a.reshape(mod.lora_A[n].weight.shape))
                    mod.lora_B[n].weight.copy_(b.reshape(mod.lora_B[n].weight.shape))
        pm.eval()

        def peft_mixed() -> torch.Tensor:
            with torch.inference_mode():
                return pm(x, adapter_names=names)

        cases[f"PEFT {peft.__version__} mixed batch (adapter_names=)"] = peft_mixed

    outs = {k: f() for k, f in cases.items()}
    ref_out = outs["convlora 4 separate forwards"]
    diffs = {k: float((v - ref_out).abs().max()) for k, v in outs.items()}
    times = time_interleaved(cases, repeats=args.repeats, warmup=args.warmup, device=device)
    ref = "convlora 4 separate forwards"
    rows = [[name, fmt_ms(Stats.of(t)), fmt_ratio(ratio_stats(times, name, ref)),
             f"{diffs[name]:.1e}"] for name, t in times.items()]
    print(f"## Mixed-adapter batch: {len(ADAPTERS)} rank-{args.rank} LoRA adapters x {args.per} "
          f"samples, sr_model, {args.size}x{args.size}\n")
    print(markdown_table(["case", "ms: median [IQR]", "ratio vs 4 separate: median [IQR]",
                          "max abs diff vs separate"], rows))
    for note in notes:
        print(f"\n{note}")
    print(f"\n{args.repeats} rounds after {args.warmup} warm-up rounds; {run_facts(device, load_start)}")


if __name__ == "__main__":
    main()
