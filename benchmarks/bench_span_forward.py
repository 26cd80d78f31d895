"""SPAN deploy forward: our fused model vs naive implementations; on CUDA, the NTIRE runtime.

    python benchmarks/bench_span_forward.py                       # CPU: ours vs naive (ratios)
    python benchmarks/bench_span_forward.py --pack .carry/gpu/span_bench.npz   # needs Pillow
    python benchmarks/bench_span_forward.py --device cuda --data .carry/gpu/span_bench.npz \\
        --out runs/bench_span_forward.json

Part 1 (any device): the deploy SPAN (one fused 3x3 conv per ``Conv3XC``) against two naive
implementations of the same function: the training form (four convs per ``Conv3XC``) and the
official code's eval path, which re-fuses the four convs into the 3x3 kernel in *every* forward.
Cases run interleaved; the table gives median [IQR] times and per-round ratios to ours.

Part 2 (``--device cuda``): NTIRE-protocol runtime (batch 1, CUDA events around the forward) on a
DIV2K-sized LR input (339x510, a Set14 image resized with MATLAB bicubic), for fp32 eager (the
protocol) and variants: cudnn.benchmark, channels_last, fp16, torch.compile, CUDA graphs. Each
variant's Set14 Y-PSNR change against fp32 eager is measured too; "safe" means within 0.01 dB.
The GPU machine needs only torch and numpy: ``--pack`` (run here) stores the Set14 HR/LR images
and the checkpoint's tensors in one ``.npz`` for it. A variant that fails is reported, not fatal.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from _timing import Stats, fmt_ms, fmt_ratio, markdown_table, ratio_stats, set_threads  # noqa: E402

from examples.span_sr.arch import SPAN, Conv3XC, load_span  # noqa: E402
from examples.span_sr.checkpoint import write_json  # noqa: E402
from examples.span_sr.degrade import imresize_matlab, modcrop  # noqa: E402
from examples.span_sr.metrics import psnr_y, to_uint8  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
SAFE_DB = 0.01


# ---------------------------------------------------------------- data: pack here, load there
def pack(out: Path, weights: Path) -> None:
    """Store Set14 (modcropped HR, MATLAB LR) and the checkpoint's tensors in one npz."""
    from examples.span_sr.images import list_images, read_image

    arrays: dict[str, np.ndarray] = {}
    for f in list_images(SHARED / "sr_bench" / "Set14" / "HR"):
        hr = modcrop(read_image(f), 4)
        arrays[f"hr/{f.stem}"], arrays[f"lr/{f.stem}"] = hr, imresize_matlab(hr, 0.25)
    for k, v in load_span(weights).state_dict().items():
        arrays[f"w/{k}"] = v.numpy()
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)  # type: ignore[arg-type]
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {len(arrays)} arrays)")


def load_data(path: Path | None, weights: Path) -> tuple[SPAN, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Model and Set14 ``{name: (hr, lr)}`` from a packed npz, else from ../shared/data."""
    if path is not None:
        with np.load(path) as z:
            state = {k[2:]: torch.from_numpy(z[k]) for k in z.files if k.startswith("w/")}
            names = sorted(k[3:] for k in z.files if k.startswith("hr/"))
            pairs = {n: (z[f"hr/{n}"], z[f"lr/{n}"]) for n in names}
        return load_span(state), pairs
    from examples.span_sr.images import list_images, read_image

    pairs = {}
    for f in list_images(SHARED / "sr_bench" / "Set14" / "HR"):
        hr = modcrop(read_image(f), 4)
        pairs[f.stem] = (hr, imresize_matlab(hr, 0.25))
    return load_span(weights), pairs


# ---------------------------------------------------------------- naive implementations
class RefuseEveryCall(torch.nn.Module):
    """Official eval behaviour: rebuild the fused kernel from the four convs on each call."""

    def __init__(self, conv: Conv3XC) -> None:
        super().__init__()
        self.inner = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e, k, r = (cast(torch.nn.Conv2d, m) for m in cast(torch.nn.Sequential, self.inner.conv))
        s = cast(torch.nn.Conv2d, self.inner.sk)
        eb, kb, rb, sb = (cast(torch.Tensor, m.bias) for m in (e, k, r, s))
        w = torch.einsum("on,nmhw,mi->oihw", r.weight[:, :, 0, 0], k.weight, e.weight[:, :, 0, 0])
        w = w + F.pad(s.weight, (1, 1, 1, 1))
        b = r.weight[:, :, 0, 0] @ (torch.einsum("nmhw,m->n", k.weight, eb) + kb)
        return F.conv2d(x, w, b + rb + sb, padding=1)


def naive_models(width: int, cat: int) -> dict[str, torch.nn.Module]:
    train = SPAN(feature_channels=width, conv_cat_channels=cat, form="train").eval()
    refuse = SPAN(feature_channels=width, conv_cat_channels=cat, form="train").eval()
    for name, m in list(refuse.named_modules()):
        if isinstance(m, Conv3XC):
            parent, _, child = name.rpartition(".")
            setattr(refuse.get_submodule(parent) if parent else refuse, child, RefuseEveryCall(m))
    return {"naive: train form (4 convs per Conv3XC)": train,
            "naive: re-fuse kernel every forward (official eval)": refuse}


def compare_naive(model: SPAN, x: torch.Tensor, repeats: int, warmup: int) -> list[dict]:
    from _timing import time_interleaved

    dev = x.device
    cases_m = {"ours: deploy (fused eval_conv)": model,
               **naive_models(model.feature_channels, model.conv_cat_channels)}
    cases_m = {k: m.to(dev) for k, m in cases_m.items()}

    def runner(m: torch.nn.Module) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad():
                return m(x)
        return run

    times = time_interleaved({k: runner(m) for k, m in cases_m.items()}, repeats=repeats,
                             warmup=warmup, device=dev)
    ref = next(iter(cases_m))
    return [{"case": k, "time": Stats.of(v), "ratio": ratio_stats(times, k, ref)}
            for k, v in times.items()]


# ---------------------------------------------------------------- CUDA variants
def _graphed(model: torch.nn.Module, dtype: torch.dtype, fmt: torch.memory_format
             ) -> Callable[[torch.Tensor], torch.Tensor]:
    graphs: dict[tuple, tuple] = {}

    def run(x: torch.Tensor) -> torch.Tensor:
        key = tuple(x.shape)
        if key not in graphs:
            static_x = x.to(dtype).contiguous(memory_format=fmt).clone()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):
                    model(static_x)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_y = model(static_x)
            graphs[key] = (graph, static_x, static_y)
        graph, static_x, static_y = graphs[key]
        static_x.copy_(x)
        graph.replay()
        return static_y
    return run


def make_variant(base: SPAN, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    import copy

    half = "fp16" in name
    cl = "channels_last" in name
    dtype = torch.float16 if half else torch.float32
    fmt = torch.channels_last if cl else torch.contiguous_format
    torch.backends.cudnn.benchmark = "cudnn.benchmark" in name
    m: Any = copy.deepcopy(base).to(dtype=dtype).to(memory_format=fmt).eval()
    if "compile" in name:
        m = torch.compile(m, dynamic=True)
    if "CUDA graphs" in name:
        return _graphed(m, dtype, fmt)
    return lambda x: m(x.to(dtype).contiguous(memory_format=fmt))


VARIANTS = ["fp32 eager (NTIRE protocol)", "fp32 + cudnn.benchmark", "fp32 + channels_last",
            "fp16", "fp16 + channels_last", "fp16 + channels_last + cudnn.benchmark",
            "fp32 + torch.compile", "fp16 + channels_last + torch.compile",
            "fp16 + channels_last + cudnn.benchmark + CUDA graphs"]


@torch.no_grad()
def run_variant(base: SPAN, name: str, x: torch.Tensor, pairs: dict, rounds: int, inner: int
                ) -> dict:
    """Time one variant (CUDA events on CUDA, perf_counter on CPU) and score it on Set14."""
    import time

    cuda = x.device.type == "cuda"
    run = make_variant(base, name)
    for _ in range(5):
        run(x)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    per_round = []
    for _ in range(rounds):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                run(x)
            end.record()
            torch.cuda.synchronize()
            per_round.append(start.elapsed_time(end) / inner / 1e3)
        else:
            t0 = time.perf_counter()
            for _ in range(inner):
                run(x)
            per_round.append((time.perf_counter() - t0) / inner)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else float("nan")
    psnrs = []
    for hr, lr in pairs.values():
        t = torch.from_numpy(lr.copy()).permute(2, 0, 1)[None].float().to(x.device) / 255
        psnrs.append(psnr_y(to_uint8(run(t).float()), hr))
    torch.backends.cudnn.benchmark = False
    return {"variant": name, "time": Stats.of(per_round), "peak_mem_mb": peak,
            "set14_psnr_y": float(np.mean(psnrs))}


def div2k_sized_input(pairs: dict) -> torch.Tensor:
    """A 339x510 LR image (DIV2K valid LR size): the largest Set14 HR, antialiased-bicubic
    resized, so the timed input has natural-image content."""
    hr = max((p[0] for p in pairs.values()), key=lambda a: a.size)
    x = torch.from_numpy(hr.copy()).permute(2, 0, 1)[None].float() / 255
    return F.interpolate(x, size=(339, 510), mode="bicubic", antialias=True).clamp(0, 1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--weights", type=Path, default=SHARED / "weights" / "dsclora_ch26.pth")
    ap.add_argument("--data", type=Path, default=None, help="npz written by --pack")
    ap.add_argument("--pack", type=Path, default=None, help="write the npz for a GPU run and exit")
    ap.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"),
                    help="LR size for part 1 (default 128x128 on CPU, 339x510 on CUDA)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15, help="CUDA: timed rounds per variant")
    ap.add_argument("--inner", type=int, default=10, help="CUDA: forwards per timed round")
    ap.add_argument("--variants", nargs="*", default=None, help=f"subset of {VARIANTS}")
    ap.add_argument("--quick", action="store_true", help="tiny input, 2 rounds: a smoke test")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    if args.pack:
        pack(args.pack, args.weights)
        return 0
    set_threads(args.threads)
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    size = args.size or ((16, 16) if args.quick else (339, 510) if cuda else (128, 128))
    repeats = args.repeats or (2 if args.quick else 30 if cuda else 10)
    model, pairs = (SPAN(feature_channels=8), {}) if args.quick and not (cuda or args.variants) \
        else load_data(args.data, args.weights)
    model = model.to(dev).eval()
    x = torch.rand(1, 3, *size, device=dev)
    report: dict = {"device": torch.cuda.get_device_name(dev) if cuda else platform.processor() or "cpu",
                    "torch": torch.__version__, "threads": args.threads, "input": [1, 3, *size]}
    def save() -> None:  # after every stage, so a crash or timeout keeps what was measured
        if args.out:
            write_json(args.out, report)  # atomic: a timeout mid-write keeps the previous stage's file

    rows = compare_naive(model, x, repeats, args.warmup)
    print(f"\nSPAN forward, batch 1, LR {size[0]}x{size[1]}, {report['device']}, torch {torch.__version__}")
    print(markdown_table(["case", "time ms, median [IQR]", "ratio to ours"],
                         [[r["case"], fmt_ms(r["time"]), fmt_ratio(r["ratio"], 2)] for r in rows]))
    report["naive"] = [{"case": r["case"], "median_ms": r["time"].median * 1e3,
                        "ratio": r["ratio"].median} for r in rows]
    save()
    if cuda or args.variants:  # on CPU only the variants asked for (pipeline check)
        x = div2k_sized_input(pairs).to(dev)
        if args.quick:
            x = x[..., :32, :32]
            pairs = dict(list(pairs.items())[:2])
        results = []
        for name in args.variants or VARIANTS:
            try:
                results.append(run_variant(model, name, x, pairs, args.rounds, args.inner))
            except Exception as err:  # noqa: BLE001 - report and go on
                traceback.print_exc()
                results.append({"variant": name, "error": f"{type(err).__name__}: {err}"[:300]})
            with contextlib.suppress(Exception):
                torch._dynamo.reset()
            report["variants"] = results
            save()
        ok = [r for r in results if "error" not in r]
        base = ok[0]["set14_psnr_y"] if ok else float("nan")
        table = []
        for r in results:
            if "error" in r:
                table.append([r["variant"], "failed", "", "", r["error"][:60]])
                continue
            r["delta_db"] = r["set14_psnr_y"] - base
            r["safe"] = abs(r["delta_db"]) <= SAFE_DB
            r["ratio_to_fp32"] = r["time"].median / ok[0]["time"].median
            table.append([r["variant"], fmt_ms(r["time"]), f"{r['ratio_to_fp32']:.2f}",
                          f"{r['peak_mem_mb']:.0f}", f"{r['set14_psnr_y']:.4f} ({r['delta_db']:+.4f})"])
        clock = "CUDA events" if cuda else "perf_counter (CPU: pipeline check, not NTIRE)"
        print(f"\nNTIRE-protocol runtime, LR {tuple(x.shape[-2:])}, batch 1, {clock}")
        print(markdown_table(["variant", "ms, median [IQR]", "x first row", "peak MB",
                              "Set14 Y-PSNR (delta dB)"], table))
        safe = [r for r in ok if r["safe"]]
        if safe:
            best = min(safe, key=lambda r: r["time"].median)
            report["fastest_safe"] = best["variant"]
            print(f"\nfastest safe (|delta PSNR| <= {SAFE_DB} dB): {best['variant']}")
        for r in ok:
            t = r.pop("time")
            r.update(median_ms=t.median * 1e3, q1_ms=t.q1 * 1e3, q3_ms=t.q3 * 1e3)
        report["variants"] = results
    save()
    if args.out:
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
