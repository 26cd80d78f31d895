"""The fast SPAN path (``fast_span``, ``--fast``) against what SPAN users run today, on CPU.

    python benchmarks/bench_span_fast.py                   # timing table, 2 threads
    python benchmarks/bench_span_fast.py --bound           # + the output bound on Set5/Set14/B100
    python benchmarks/bench_span_fast.py --e2e             # + upscale.py end to end on one image
    python benchmarks/bench_span_fast.py --quick           # smoke test (tiny, random width-8 model)

Part 1, timing (one run, cases interleaved round by round, ratios per round): LR 128x128 and
256x256, batch 1 and 8, natural-image inputs (crops of Set14/B100 HR images), cases:

* ``eager``: our deploy forward (``SPAN`` with one fused 3x3 ``eval_conv`` per ``Conv3XC``);
* ``fast: inductor``: ``fast_span(model, backend="inductor")`` (torch.compile, inductor with
  freezing); its first call per shape compiles: that time is reported separately, with an empty
  inductor cache (``cold``: the run uses a fresh ``TORCHINDUCTOR_CACHE_DIR``) and again after
  ``torch._dynamo.reset()`` with that cache filled (``warm``, as a second process would meet it);
* ``fast: onnxruntime``: ``fast_span(model, backend="onnxruntime")``, ONNX Runtime (CPU
  provider, all graph optimisations) on the ONNX export (export + session time reported);
* ``spandrel``: spandrel's SPAN loaded from the spandrel-format export
  (``to_spandrel(deploy state dict)``): it re-fuses every ``Conv3XC`` on every eval forward;

The row marked ``(--fast)`` is the backend ``fast_span`` picks on CPU.

Part 2 (``--bound``): for each compute dtype, the largest ``uint8`` difference from the fp32
eager forward over every pixel of Set5, Set14 and B100 (LR made from the modcropped HR with the
MATLAB-exact bicubic) and the Y-PSNR change; a dtype offered by ``fast_span`` must stay within
1 level and 0.01 dB. Rows: the CPU fast path (fp32), bf16 on CPU (eager, a candidate), and the
triton path's fp16 / bf16 storage emulated on CPU (each conv in fp32 on the stored-dtype input
and weights, every stored activation rounded as the kernels store it).

Part 3 (``--e2e``): wall time of whole ``upscale.py`` processes on one Set14 LR image (start,
imports, load, setup, forward, write), rounds interleaved: without ``--fast``, with ``--fast``
(which takes ONNX Runtime for one image in one piece), and with ``--fast`` forced to inductor
(the first inductor round compiles with the run's empty cache, later ones hit it).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from _timing import (  # noqa: E402
    Stats,
    fmt_ms,
    fmt_ratio,
    load_note,
    markdown_table,
    ratio_stats,
    set_threads,
    time_interleaved,
)

from examples.span_sr.arch import SPAN, load_span  # noqa: E402
from examples.span_sr.degrade import imresize_matlab, modcrop  # noqa: E402
from examples.span_sr.fast import fast_span, resolve_backend  # noqa: E402
from examples.span_sr.metrics import psnr_y, to_uint8  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
BENCH = SHARED / "sr_bench"


def hr_images(sets: tuple[str, ...]) -> list[tuple[str, np.ndarray]]:
    from PIL import Image

    def read(f: Path) -> np.ndarray:
        with Image.open(f) as im:
            return np.asarray(im.convert("RGB"))

    return [(f"{s}/{f.stem}", read(f)) for s in sets for f in sorted((BENCH / s / "HR").glob("*.png"))]


def lr_batch(images: list[np.ndarray], n: int, size: int) -> torch.Tensor:
    """``n`` natural-image ``size x size`` inputs: centre crops (tiled when too small) of HR images."""
    out = []
    for img in (images * n)[:n]:
        while min(img.shape[:2]) < size:
            img = np.concatenate([img, img[::-1]], 0) if img.shape[0] < size else img
            img = np.concatenate([img, img[:, ::-1]], 1) if img.shape[1] < size else img
        y0, x0 = (img.shape[0] - size) // 2, (img.shape[1] - size) // 2
        out.append(torch.from_numpy(img[y0: y0 + size, x0: x0 + size].copy()).permute(2, 0, 1))
    return torch.stack(out).float() / 255


def spandrel_model(model: SPAN) -> torch.nn.Module:
    import spandrel

    from examples.span_sr.spandrel_format import to_spandrel

    desc = spandrel.ModelLoader().load_from_state_dict(to_spandrel(model.state_dict()))
    return desc.model.eval()


def timing(model: SPAN, images: list[np.ndarray], configs: list[tuple[int, int]],
           repeats: int, warmup: int) -> list[list[str]]:
    t0 = time.perf_counter()
    spd = spandrel_model(model)
    setup = {"spandrel": time.perf_counter() - t0}
    t0 = time.perf_counter()
    ort_run = fast_span(model, backend="onnxruntime")
    setup["fast: onnxruntime"] = time.perf_counter() - t0
    default = resolve_backend("auto", torch.device("cpu"))
    rows = []
    for batch, size in configs:
        x = lr_batch(images, batch, size)
        first = []
        for _ in ("cold", "warm"):  # the run's fresh inductor cache, then the same cache filled
            torch._dynamo.reset()
            t0 = time.perf_counter()
            ind = fast_span(model, backend="inductor")
            ind(x)  # the first call for a shape compiles
            first.append(time.perf_counter() - t0)
        runs: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
            "eager": model, "fast: inductor": ind, "fast: onnxruntime": ort_run, "spandrel": spd}
        with torch.no_grad():
            ref = model(x)
            diffs = {k: float((f(x) - ref).abs().max()) for k, f in runs.items()}

        def nograd(f: Callable[[torch.Tensor], object], x: torch.Tensor = x) -> Callable[[], object]:
            def run() -> object:
                with torch.no_grad():
                    return f(x)
            return run

        times = time_interleaved({k: nograd(f) for k, f in runs.items()}, repeats=repeats,
                                 warmup=warmup)
        label = f"{batch}x{size}x{size}"
        for name in runs:
            shown = f"{name} (--fast)" if name == f"fast: {default}" else name
            rows.append([label, shown, fmt_ms(Stats.of(times[name])),
                         fmt_ratio(ratio_stats(times, "eager", name), 2),
                         fmt_ratio(ratio_stats(times, "spandrel", name), 2),
                         "" if name == "eager" else f"{diffs[name]:.1e}",
                         f"cold {first[0]:.1f} s, warm {first[1]:.1f} s" if name == "fast: inductor"
                         else f"{setup[name]:.1f} s" if name in setup else ""])
        print(f"  done {label} ({load_note()})", flush=True)
    return rows


# ------------------------------------------------------------------ inductor variants
def padded(model: SPAN) -> SPAN:
    """``model`` with its feature channels zero-padded to a multiple of 16 (26 -> 32; the
    padded channels stay 0, so the output is the same up to float reordering)."""
    c, cat = model.feature_channels, model.conv_cat_channels
    cp = -(-c // 16) * 16
    p = SPAN(num_in_ch=model.num_in_ch, num_out_ch=model.num_out_ch, feature_channels=cp,
             conv_cat_channels=cat, upscale=model.upscale, img_range=model.img_range).eval()
    with torch.no_grad():
        p.mean.copy_(model.mean)
        for (name, dst), (_, src) in zip(p.named_modules(), model.named_modules()):
            if isinstance(dst, torch.nn.Conv2d) and name != "conv_cat":
                o, i = src.weight.shape[:2]
                dst.weight.zero_()
                dst.weight[:o, :i] = src.weight
                bias = cast(torch.Tensor, dst.bias).zero_()
                bias[:o] = src.bias
        p.conv_cat.weight.zero_()
        for k in range(4):
            p.conv_cat.weight[:, k * cp: k * cp + c] = model.conv_cat.weight[:, k * c: (k + 1) * c]
        cast(torch.Tensor, p.conv_cat.bias).copy_(cast(torch.Tensor, model.conv_cat.bias))
    return p


def variant_cases(model: SPAN) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """The torch.compile settings tried against ``fast_span``'s (freezing, static first shape)."""
    def compiled(net: torch.nn.Module, cl: bool = False, **kw: Any) -> Callable[[torch.Tensor], torch.Tensor]:
        net = copy.deepcopy(net).eval().requires_grad_(False)
        if cl:
            net = net.to(memory_format=torch.channels_last)
        f = torch.compile(net, **kw)
        return (lambda x: f(x.contiguous(memory_format=torch.channels_last))) if cl else f
    pad = padded(model)
    chans = f"channels {model.feature_channels} -> {pad.feature_channels}"
    return {
        "inductor freezing (fast_span's)": compiled(model, options={"freezing": True}),
        "+ dynamic=True": compiled(model, dynamic=True, options={"freezing": True}),
        "+ max_autotune": compiled(model, options={"freezing": True, "max_autotune": True}),
        "+ cpp_wrapper": compiled(model, options={"freezing": True, "cpp_wrapper": True}),
        "+ channels_last": compiled(model, cl=True, options={"freezing": True}),
        f"+ {chans}": compiled(pad, options={"freezing": True}),
        f"onnxruntime, {chans}": fast_span(pad, backend="onnxruntime"),
    }


def variants(model: SPAN, images: list[np.ndarray], configs: list[tuple[int, int]],
             repeats: int) -> list[list[str]]:
    rows = []
    for batch, size in configs:
        x = lr_batch(images, batch, size)
        torch._dynamo.reset()
        runs: dict[str, Callable[[torch.Tensor], Any]] = {"eager": model, **variant_cases(model)}
        first = {}
        with torch.no_grad():
            ref = model(x)
            diffs = {}
            for name, f in runs.items():
                t0 = time.perf_counter()
                diffs[name] = float((f(x) - ref).abs().max())
                first[name] = time.perf_counter() - t0

            def call(f: Callable[[torch.Tensor], Any], x: torch.Tensor = x) -> Callable[[], Any]:
                return lambda: f(x)
            times = time_interleaved({k: call(f) for k, f in runs.items()}, repeats=repeats, warmup=1)
        label = f"{batch}x{size}x{size}"
        for name in runs:
            rows.append([label, name, fmt_ms(Stats.of(times[name])),
                         fmt_ratio(ratio_stats(times, "eager", name), 2),
                         "" if name == "eager" else f"{diffs[name]:.1e}", f"{first[name]:.1f} s"])
        print(f"  done variants {label} ({load_note()})", flush=True)
    return rows


# ------------------------------------------------------------------ output bound
def emulate_storage(model: SPAN, dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    """The triton path's numerics on CPU: fp32 convs of ``dtype``-rounded inputs and weights,
    fp32 bias and epilogues, every stored activation rounded to ``dtype``, fp32 output."""
    def q(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype).float()

    def conv(c: Any, a: torch.Tensor) -> torch.Tensor:
        w, b = c.weight, c.bias
        return F.conv2d(a, q(w), b, padding=w.shape[-1] // 2)

    def run(x: torch.Tensor) -> torch.Tensor:
        feat = q(conv(model.conv_1.eval_conv, q((x - model.mean) * model.img_range)))
        cur, b1, b61 = feat, feat, feat
        for i, blk in enumerate([model.block_1, model.block_2, model.block_3, model.block_4,
                                 model.block_5, model.block_6]):
            t1 = q(F.silu(conv(blk.c1_r.eval_conv, cur)))
            v = conv(blk.c3_r.eval_conv, q(F.silu(conv(blk.c2_r.eval_conv, t1))))
            cur = q((v + cur) * (torch.sigmoid(v) - 0.5))
            b1, b61 = (cur if i == 0 else b1), t1
        o2 = q(conv(model.conv_2.eval_conv, cur))
        cat = q(conv(model.conv_cat, torch.cat([feat, o2, b1, b61], 1)))
        return F.pixel_shuffle(conv(model.upsampler[0], cat), model.upscale)
    return run


@torch.no_grad()
def bound(model: SPAN, sets: tuple[str, ...]) -> list[list[str]]:
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    variants: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "fast: inductor, float32": fast_span(model, backend="inductor"),
        "fast: onnxruntime, float32": fast_span(model, backend="onnxruntime"),
        "eager bfloat16 (CPU; candidate)": lambda x: bf16(x.bfloat16()).float(),
        "triton float16 (storage emulated on CPU)": emulate_storage(model, torch.float16),
        "triton bfloat16 (storage emulated on CPU)": emulate_storage(model, torch.bfloat16),
    }
    stats: dict[str, dict[str, Any]] = {k: {"max": 0, "n_off": 0, "dpsnr": {}} for k in variants}
    ref_psnr: dict[str, list[float]] = {}
    pix = 0
    for name, img in hr_images(sets):
        hr = modcrop(img, 4)
        lr = imresize_matlab(hr, 0.25)
        x = torch.from_numpy(lr.copy()).permute(2, 0, 1)[None].float() / 255
        ref = to_uint8(model(x))
        pix += ref.size
        p_ref = psnr_y(ref, hr)
        ref_psnr.setdefault(name.split("/")[0], []).append(p_ref)
        for k, f in variants.items():
            out = to_uint8(f(x))
            d = np.abs(out.astype(np.int16) - ref.astype(np.int16))
            s = stats[k]
            s["max"] = max(s["max"], int(d.max()))
            s["n_off"] += int((d > 0).sum())
            s["dpsnr"].setdefault(name.split("/")[0], []).append(psnr_y(out, hr) - p_ref)
    rows = []
    for k, s in stats.items():
        per_set = {ds: float(np.mean(v)) for ds, v in s["dpsnr"].items()}
        worst_img = max(abs(v) for vs in s["dpsnr"].values() for v in vs)
        ok = s["max"] <= 1 and all(abs(v) <= 0.01 for v in per_set.values())
        rows.append([k, str(s["max"]), f"{s['n_off'] / pix:.2e}",
                     ", ".join(f"{ds} {v:+.4f}" for ds, v in per_set.items()), f"{worst_img:.4f}",
                     "yes" if ok else "no"])
    means = ", ".join(f"{ds} {np.mean(v):.3f}" for ds, v in ref_psnr.items())
    print(f"\nfp32 eager Y-PSNR: {means}; {pix:,} output values compared per row")
    return rows


# ------------------------------------------------------------------ end to end
E2E_DRIVER = r"""
import sys
sys.path.insert(0, sys.argv[1])
from examples.span_sr import fast, upscale
upscale._fast_model = lambda model, files, tile: fast.fast_span(model, backend="inductor")
raise SystemExit(upscale.main(sys.argv[2:]))
"""


def end_to_end(weights: Path, image: Path, rounds: int, threads: int) -> list[list[str]]:
    """Wall time of whole ``upscale.py`` processes on ``image``, the cases interleaved."""
    script = str(REPO / "examples" / "span_sr" / "upscale.py")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    cases = {"eager (no --fast)": [sys.executable, script],
             "--fast (one image: onnxruntime)": [sys.executable, script, "--fast"],
             "--fast forced to inductor": [sys.executable, "-c", E2E_DRIVER, str(REPO), "--fast"]}
    times: dict[str, list[float]] = {k: [] for k in cases}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for name, cmd in cases.items():
                out = Path(tmp) / f"{len(times[name])}_{abs(hash(name))}"
                t0 = time.perf_counter()
                subprocess.run([*cmd, "--weights", str(weights), "--input", str(image),
                                "--output", str(out)], check=True, env=env, capture_output=True)
                times[name].append(time.perf_counter() - t0)
            print(f"  e2e round {r + 1} ({load_note()})", flush=True)
    ref = times["eager (no --fast)"]
    return [[name, f"{Stats.of(t).median:.2f}", ", ".join(f"{v:.2f}" for v in t),
             f"{Stats.of([a / b for a, b in zip(ref, t)]).median:.2f}"] for name, t in times.items()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", type=Path, default=SHARED / "weights" / "dsclora_ch26.pth")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--bound", action="store_true", help="also the output bound on Set5/Set14/B100")
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--variants", action="store_true",
                    help="also torch.compile settings (dynamic, max_autotune, cpp_wrapper, "
                    "channels_last, channels padded 26 -> 32) at batch 1")
    ap.add_argument("--e2e", action="store_true", help="also upscale.py end to end on one Set14 image")
    ap.add_argument("--e2e-image", type=Path,
                    default=BENCH / "Set14" / "LR_bicubic" / "X4" / "baboonx4.png")
    ap.add_argument("--e2e-rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="tiny inputs, 2 rounds: a smoke test")
    args = ap.parse_args(argv)
    set_threads(args.threads)
    # a fresh inductor cache, so the first compile of each shape is a cold one (reported)
    cache = tempfile.TemporaryDirectory(prefix="bench_span_fast_inductor_")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache.name
    quick = args.quick
    model = (SPAN(feature_channels=8) if quick else load_span(args.weights)).eval()
    images = [img for _, img in hr_images(("Set14",) if quick else ("Set14", "B100"))]
    print(f"SPAN fast path, CPU {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{args.threads} thread(s), {load_note()}")
    if not args.no_timing:
        configs = [(1, 16), (2, 16)] if quick else [(1, 128), (8, 128), (1, 256), (8, 256)]
        rows = timing(model, images, configs, 2 if quick else args.repeats,
                      0 if quick else args.warmup)
        print(f"\nforward time (median [IQR] of {2 if quick else args.repeats} interleaved rounds); "
              "speed-up = that case's time / this case's time, per round")
        print(markdown_table(["N x LR", "case", "ms", "speed-up vs eager", "speed-up vs spandrel",
                              "max |diff| vs eager", "setup + first call"], rows))
    if args.variants:
        configs = [(1, 16)] if quick else [(1, 128), (1, 256)]
        rows = variants(model, images, configs, 2 if quick else args.repeats)
        print(f"\ntorch.compile settings, batch 1 (median [IQR] of {2 if quick else args.repeats} "
              "interleaved rounds; first call = compile, with this run's cache)")
        print(markdown_table(["N x LR", "case", "ms", "speed-up vs eager", "max |diff| vs eager",
                              "first call"], rows))
    if args.bound:
        rows = bound(model, ("Set5",) if quick else ("Set5", "Set14", "B100"))
        print("\noutput bound vs fp32 eager (uint8 outputs; offered when max <= 1 level and every "
              "set's mean Y-PSNR change <= 0.01 dB)")
        print(markdown_table(["path, dtype", "max |diff| (levels)", "fraction of values off",
                              "mean Y-PSNR change (dB)", "worst image |change| (dB)", "within bound"],
                             rows))
    if args.e2e:
        rows = end_to_end(args.weights, args.e2e_image, args.e2e_rounds, args.threads)
        print(f"\nupscale.py end to end on {args.e2e_image.name}, {args.threads} thread(s), wall "
              f"seconds of {args.e2e_rounds} interleaved rounds (speed-up = eager / this, per round)")
        print(markdown_table(["upscale.py", "median s", "rounds (s)", "speed-up vs eager"], rows))
    print(f"\n{load_note()}")
    cache.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
