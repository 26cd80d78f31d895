"""SPAN on a GPU: ``fast_span``'s CUDA schedule against what SPAN users run, NTIRE protocol.

    python benchmarks/bench_span_gpu.py --pack .carry/span_gpu    # here: Set5/Set14/B100 + weights
    python benchmarks/bench_span_gpu.py --data .carry/span_gpu    # on the GPU: timing + limit
    python benchmarks/bench_span_gpu.py --data .carry/span_gpu --bound --no-timing
    python benchmarks/bench_span_gpu.py --quick                   # smoke test (needs CUDA)

Without a CUDA device it prints one line and exits (status 0); ``--pack``, ``--emulate``
(the dot precisions' output bound emulated on CPU: ``tf32x3``, ``bf16x3``, ``tf32``) and
``--resources`` (registers and spills of the kernels compiled for sm_80 / sm_90) run anywhere:

    python benchmarks/bench_span_gpu.py --data .carry/span_gpu --emulate --threads 2
    python benchmarks/bench_span_gpu.py --resources

Timing (one run, every case in the same process, one after the other; CUDA events around
``--inner`` forwards, after ``--warmup`` untimed ones, which include compiling and capturing):

* the NTIRE protocol: batch 1, the mean runtime over LR 339x510, 384x510 and 320x480 (natural
  images: the largest HR image of the data resized to each size);
* throughput on a batch of 16 LR 256x256 tiles (crops of the HR images), for the main cases.

Cases: our eager deploy forward (fp32, torch defaults); the re-fuse-every-forward SPAN (what
spandrel and the official eval code run: ``bench_span_forward.py``'s case); the best torch-only
variant within 0.01 dB on the H100 (fp16 + channels_last + cudnn.benchmark + CUDA graphs);
``fast_span(model)`` (``backend="auto"``: the CUDA schedule of ``examples/span_sr/fast_cuda.py``);
and the schedule's steps one by one (dot precision, graphs, ``block_m``, warps, 16-bit storage) to
show what each buys. Each case's output is compared with fp32 eager (TF32 off) in uint8 levels.

Physical limit: the fused schedule's arithmetic (MACs of the real and of the padded channels)
and its ideal DRAM traffic, computed from the model's shapes (``TritonSPAN.cost``), against
this card's matmul rate and copy bandwidth measured in the same run.

Output bound (``--bound``): for each configuration, the largest uint8 difference from fp32
eager (cuDNN without TF32) over every pixel of Set5, Set14 and B100 and the mean Y-PSNR change
per set; what ``fast_span`` offers must stay within 1 level and 0.01 dB (status 1 otherwise).
The GPU machine needs torch, numpy and triton only: ``--pack`` stores the images (modcropped HR
and MATLAB-bicubic LR), the weights and a copy of safetensors (which convlora imports) in one
folder, carried there as an ignored ``.carry/`` path (see ``benchmarks/gpu_fast.sh``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import lzma
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from _timing import markdown_table  # noqa: E402
from bench_span_forward import make_variant, naive_models  # noqa: E402

from examples.span_sr.arch import SPAN, load_span  # noqa: E402
from examples.span_sr.checkpoint import write_json  # noqa: E402
from examples.span_sr.fast import OFFERED_DTYPES, fast_span  # noqa: E402
from examples.span_sr.fast_cuda import CudaGraphs, TritonSPAN  # noqa: E402
from examples.span_sr.metrics import psnr_y, to_uint8  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
NTIRE_SIZES = ((339, 510), (384, 510), (320, 480))
SETS = ("Set5", "Set14", "B100")
PACK = "bound.npz.xz"
EAGER, REFUSE = "eager fp32 (our deploy forward)", "re-fuse every forward (spandrel / official eval)"
TORCH_BEST = "fp16 + channels_last + cudnn.benchmark + CUDA graphs"
FAST = "fast_span(model) (auto: the CUDA schedule)"
Run = Callable[[torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------- data: pack here, load there
def pack(out: Path, weights: Path) -> None:
    """Write ``out/bound.npz.xz`` (HR, LR of Set5/Set14/B100 and the weights) and ``out/pylib``."""
    from examples.span_sr.degrade import imresize_matlab, modcrop
    from examples.span_sr.images import list_images, read_image

    arrays: dict[str, np.ndarray] = {}
    for s in SETS:
        for f in list_images(SHARED / "sr_bench" / s / "HR"):
            hr = modcrop(read_image(f), 4)
            arrays[f"hr/{s}/{f.stem}"], arrays[f"lr/{s}/{f.stem}"] = hr, imresize_matlab(hr, 0.25)
    for k, v in load_span(weights).state_dict().items():
        arrays[f"w/{k}"] = v.numpy()
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    out.mkdir(parents=True, exist_ok=True)
    (out / PACK).write_bytes(lzma.compress(buf.getvalue(), preset=6))
    site = Path(str(__import__("safetensors").__file__)).resolve().parents[1]
    dest = out / "pylib" / "safetensors"
    if not dest.exists():
        shutil.copytree(site / "safetensors", dest,
                        ignore=shutil.ignore_patterns("__pycache__", "*.cpython-*.so"))
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 2**20
    print(f"wrote {out} ({size:.1f} MiB: {len(arrays)} arrays, pylib/safetensors); carry it as "
          f"{out} (the carry limit is 64 MiB in all)")


def load_pack(folder: Path) -> tuple[SPAN, dict[str, list[tuple[str, np.ndarray, np.ndarray]]]]:
    """The model and ``{set: [(name, hr, lr), ...]}`` from a folder written by ``--pack``."""
    path = folder / PACK
    if not path.is_file():
        raise SystemExit(f"bench_span_gpu.py: {path} is missing; write it here with "
                         f"`python benchmarks/bench_span_gpu.py --pack {folder}` and carry {folder}.")
    with np.load(io.BytesIO(lzma.decompress(path.read_bytes()))) as z:
        arrays = {k: z[k] for k in z.files}
    model = load_span({k[2:]: torch.from_numpy(v) for k, v in arrays.items() if k.startswith("w/")})
    sets: dict[str, list[tuple[str, np.ndarray, np.ndarray]]] = {s: [] for s in SETS}
    for k in sorted(arrays):
        if k.startswith("hr/"):
            _, s, name = k.split("/", 2)
            sets.setdefault(s, []).append((name, arrays[k], arrays[f"lr/{s}/{name}"]))
    return model, {s: v for s, v in sets.items() if v}


def natural_inputs(hrs: list[np.ndarray], device: torch.device) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The NTIRE-size LR inputs (the largest HR image resized) and a batch of 16 256x256 crops."""
    if not hrs:  # no data: smooth noise, image-like statistics
        g = torch.Generator().manual_seed(0)
        hrs = [(F.interpolate(torch.rand(1, 3, 40, 60, generator=g), size=(680, 1020), mode="bicubic")
                .clamp(0, 1)[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)]
    big = max(hrs, key=lambda a: a.size)
    t = torch.from_numpy(big.copy()).permute(2, 0, 1)[None].float() / 255
    sized = {f"{h}x{w}": F.interpolate(t, size=(h, w), mode="bicubic", antialias=True).clamp(0, 1).to(device)
             for h, w in NTIRE_SIZES}
    crops = []
    for img in (hrs * 16)[:16]:
        a = torch.from_numpy(img.copy()).permute(2, 0, 1).float() / 255
        a = F.interpolate(a[None], size=(max(256, a.shape[1]), max(256, a.shape[2])), mode="bilinear")[0]
        y0, x0 = (a.shape[1] - 256) // 2, (a.shape[2] - 256) // 2
        crops.append(a[:, y0: y0 + 256, x0: x0 + 256])
    return sized, torch.stack(crops).to(device)


# ---------------------------------------------------------------- the cases
@contextlib.contextmanager
def tf32_convs(allow: bool) -> Iterator[None]:
    """cuDNN (and matmul) TF32 on or off inside the block."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = allow
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def fused(model: SPAN, dtype: torch.dtype = torch.float32, precision: Any = None, block_m: int = 64,
          graphs: bool = True, num_warps: int = 8) -> Run:
    run = TritonSPAN(model, dtype, block_m, precision, num_warps)
    return CudaGraphs(run) if graphs else run


def timing_cases(model: SPAN, quick: bool) -> dict[str, tuple[Callable[[], Run], bool]]:
    """``{name: (factory, main)}``; ``main`` cases also run the batch-16 throughput."""
    refuse = naive_models(model.feature_channels, model.conv_cat_channels)[
        "naive: re-fuse kernel every forward (official eval)"]
    cases: dict[str, tuple[Callable[[], Run], bool]] = {
        EAGER: (lambda: model, True),
        REFUSE: (lambda: refuse.to(model.mean.device), True),
        f"torch only: {TORCH_BEST}": (lambda: make_variant(model, TORCH_BEST), True),
        FAST: (lambda: fast_span(model), True),
        "fused kernels, fp32 ieee dots, no graphs": (lambda: fused(model, precision="ieee", graphs=False), False),
        "fused kernels, fp32 tf32x3 dots, no graphs": (lambda: fused(model, precision="tf32x3", graphs=False), False),
        "fused kernels, fp32 ieee dots + graphs": (lambda: fused(model, precision="ieee"), False),
        "fused, tf32x3 + graphs, block_m 32": (lambda: fused(model, block_m=32), False),
        "fused, tf32x3 + graphs, block_m 128": (lambda: fused(model, block_m=128), False),
        "fused, tf32x3 + graphs, 4 warps": (lambda: fused(model, num_warps=4), False),
        "fused, bf16x3 dots + graphs (candidate)": (lambda: fused(model, precision="bf16x3"), False),
        "fused, tf32 dots + graphs (not offered)": (lambda: fused(model, precision="tf32"), False),
        "fused, fp16 storage + graphs (not offered)": (lambda: fused(model, torch.float16), True),
        "fused, bf16 storage + graphs (not offered)": (lambda: fused(model, torch.bfloat16), False),
    }
    return dict(list(cases.items())[:5]) if quick else cases


@torch.no_grad()
def time_run(run: Run, x: torch.Tensor, warmup: int, rounds: int, inner: int) -> list[float]:
    """Seconds per forward in each of ``rounds`` rounds of ``inner`` forwards (CUDA events)."""
    for _ in range(warmup):
        run(x)
    torch.cuda.synchronize()
    per = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            run(x)
        end.record()
        end.synchronize()
        per.append(start.elapsed_time(end) / inner / 1e3)
    return per


def levels(out: torch.Tensor, ref: np.ndarray) -> int:
    return int(np.abs(to_uint8(out.float()).astype(np.int16) - ref.astype(np.int16)).max())


# ---------------------------------------------------------------- the physical limit
@torch.no_grad()
def measure_peaks(device: torch.device, quick: bool) -> dict[str, float]:
    """This card's copy bandwidth (B/s) and dense matmul rates (MAC/s), measured now."""
    n_bytes = 2**26 if quick else 2**30
    a = torch.empty(n_bytes // 4, device=device)
    b = torch.empty_like(a)
    copy_s = min(time_run(lambda _: b.copy_(a), a, 2, 5, 5))
    peaks = {"bandwidth": 2 * n_bytes / copy_s}
    n = 2048 if quick else 8192
    for name, dtype, tf32 in (("fp16", torch.float16, False), ("tf32", torch.float32, True),
                              ("fp32", torch.float32, False)):
        m1 = torch.randn(n, n, device=device, dtype=dtype)
        m2 = torch.randn(n, n, device=device, dtype=dtype)
        def matmul(_: torch.Tensor, m1: torch.Tensor = m1, m2: torch.Tensor = m2) -> torch.Tensor:
            return m1 @ m2

        with tf32_convs(tf32):
            s = min(time_run(matmul, m1, 2, 3, 2))
        peaks[name] = n**3 / s
    return peaks


def limit_rows(model: SPAN, peaks: dict[str, float], measured: dict[str, float]) -> list[list[str]]:
    """The fused schedule's arithmetic and traffic at the three NTIRE sizes (means) and the time
    they need at the measured rates, next to the measured time."""
    rows = []
    for label, dtype, prec, rate, case in (
            ("fp32 storage, tf32x3 dots (= 3 TF32 products)", torch.float32, "tf32x3",
             peaks["tf32"] / 3, FAST),
            ("fp32 storage, bf16x3 dots (= 3 bf16 products)", torch.float32, "bf16x3",
             peaks["fp16"] / 3, "fused, bf16x3 dots + graphs (candidate)"),
            ("fp32 storage, ieee dots (FMA)", torch.float32, "ieee", peaks["fp32"],
             "fused kernels, fp32 ieee dots + graphs"),
            ("fp16 storage, fp16 dots (not offered)", torch.float16, None, peaks["fp16"],
             "fused, fp16 storage + graphs (not offered)")):
        run = TritonSPAN(model, dtype, precision=cast(Any, prec))
        costs = [run.cost(1, h, w) for h, w in NTIRE_SIZES]
        macs = np.mean([c.macs for c in costs])
        padded = np.mean([c.padded_macs for c in costs])
        traffic = np.mean([c.bytes for c in costs])
        t_arith, t_mem = padded / rate, traffic / peaks["bandwidth"]
        limit = max(t_arith, t_mem)
        got = measured.get(case)
        rows.append([label, f"{macs / 1e9:.1f} ({padded / 1e9:.1f})", f"{traffic / 1e6:.0f}",
                     f"{t_arith * 1e3:.3f}", f"{t_mem * 1e3:.3f}", f"{limit * 1e3:.3f}",
                     "-" if got is None else f"{got * 1e3:.3f}",
                     "-" if got is None else f"{got / limit:.1f}x"])
    return rows


# ---------------------------------------------------------------- compiled code, no GPU needed
def kernel_resources(model: SPAN, caps: tuple[int, ...] = (80, 90)) -> list[dict[str, Any]]:
    """Registers and local-memory stack per thread of every kernel variant the schedule launches
    (float32, ``tf32x3``, its default ``block_m`` and warps), compiled ahead of time for each
    ``sm_<cap>`` by Triton's CUDA backend and its bundled ptxas, read from the cubin with the
    bundled cuobjdump. Pointers are taken 16-byte aligned, as the JIT sees torch's tensors."""
    import os
    import re
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from examples.span_sr import fast_kernels as fk

    if not hasattr(fk.conv_kernel, "params"):
        raise SystemExit("bench_span_gpu.py --resources: unset TRITON_INTERPRET (the interpreter has no compiled code)")
    launches: list[tuple[Any, tuple, dict]] = []

    class Record:  # stands in for a kernel while TritonSPAN runs: keeps its launches
        def __init__(self, kern: Any) -> None:
            self.kern = kern

        def __getitem__(self, grid: Any) -> Callable[..., None]:
            return lambda *a, **kw: launches.append((self.kern, a, kw))

    kernels = {name: getattr(fk, name) for name in fk.__all__}
    try:
        for name, kern in kernels.items():
            setattr(fk, name, Record(kern))
        TritonSPAN(copy.deepcopy(model).cpu(), precision="tf32x3")(torch.rand(1, 3, 8, 8))
    finally:
        for name, kern in kernels.items():
            setattr(fk, name, kern)
    names_of = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.isfile(tool):
        raise SystemExit(f"bench_span_gpu.py --resources: {tool} is missing (this triton build has no "
                         "bundled CUDA toolchain)")
    seen, rows = set(), []
    for kern, args, kw in launches:
        const = {k: v for k, v in kw.items() if k != "num_warps"}
        key = (kern.fn.__name__, tuple(sorted(const.items())))
        if key in seen:
            continue
        seen.add(key)
        it = iter(args)
        sig: dict[str, str] = {}
        for p in kern.params:
            if p.is_constexpr:
                sig[p.name] = "constexpr"
                continue
            a = next(it)
            sig[p.name] = ("*" + names_of[a.dtype] if isinstance(a, torch.Tensor)
                           else "fp32" if isinstance(a, float) else "i32")
        names = list(sig)
        aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if sig[n].startswith("*")}
        for cap in caps:
            src = ASTSource(fn=kern, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()},
                            attrs=aligned)
            k = triton.compile(src, target=GPUTarget("cuda", cap, 32), options={"num_warps": kw["num_warps"]})
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(k.asm["cubin"])
                f.flush()
                usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                                       text=True, check=True).stdout
            m = re.search(r"REG:(\d+) STACK:(\d+)", usage)
            if m is None:
                raise RuntimeError(f"cuobjdump gave no resource usage for {key[0]}: {usage[-300:]}")
            rows.append({"kernel": key[0], "sm": cap, "regs": int(m.group(1)), "stack": int(m.group(2)),
                         "num_warps": kw["num_warps"], "tensor_cores": "mma" in k.asm["ptx"],
                         "const": {c: v for c, v in const.items() if c in ("MODE", "NORM", "CPI", "CPO", "CPC")}})
    return [{"launches": len(launches)}, *rows]


# ---------------------------------------------------------------- the output bound
def gpu_configs(model: SPAN) -> dict[str, tuple[Run, bool]]:
    """``{name: (forward, offered by fast_span)}`` measured by ``--bound`` on CUDA."""
    tf32_eager = copy.deepcopy(model)

    def with_tf32(x: torch.Tensor) -> torch.Tensor:
        with tf32_convs(True):
            return tf32_eager(x)

    return {
        f"{FAST}, float32": (fast_span(model), torch.float32 in OFFERED_DTYPES["triton"]),
        "fused, fp32 ieee dots": (fused(model, precision="ieee", graphs=False), False),
        "fused, bf16x3 dots (candidate)": (fused(model, precision="bf16x3", graphs=False), False),
        "fused, tf32 dots": (fused(model, precision="tf32", graphs=False), False),
        "fused, fp16 storage": (fused(model, torch.float16, graphs=False), False),
        "fused, bf16 storage": (fused(model, torch.bfloat16, graphs=False), False),
        "eager fp32, cuDNN TF32 on (torch's default)": (with_tf32, False),
        f"torch only: {TORCH_BEST}": (make_variant(model, TORCH_BEST), False),
    }


class _SplitConv(torch.nn.Module):
    """A conv computed the way a tensor-core dot of reduced-precision operands computes it:
    operands rounded by ``r``; with ``terms=3`` each split in a high and a low part and the
    three largest products summed (``tf32x3``, ``bf16x3``); fp32 accumulation and bias."""

    def __init__(self, conv: torch.nn.Conv2d, r: Callable[[torch.Tensor], torch.Tensor], terms: int) -> None:
        super().__init__()
        self.conv, self.r, self.terms = conv, r, terms

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        w, b, p, r = self.conv.weight, self.conv.bias, self.conv.padding, self.r
        ah, wh = r(a), r(w)
        out = F.conv2d(ah, wh, b, padding=p)
        if self.terms == 3:
            out = out + F.conv2d(ah, r(w - wh), None, padding=p) + F.conv2d(r(a - ah), wh, None, padding=p)
        return out


def _tf32(t: torch.Tensor) -> torch.Tensor:
    """Round float32 to TF32 (10 mantissa bits), to nearest."""
    i = t.contiguous().view(torch.int32)
    return ((i + 0x1000) & ~0x1FFF).view(torch.float32)


def _bf16(t: torch.Tensor) -> torch.Tensor:
    return t.bfloat16().float()


def emulated(model: SPAN, r: Callable[[torch.Tensor], torch.Tensor], terms: int) -> Run:
    """``model`` with every conv replaced by a ``_SplitConv``: the dot precisions on CPU."""
    m = copy.deepcopy(model).cpu()
    for name, mod in list(m.named_modules()):
        if isinstance(mod, torch.nn.Conv2d):
            parent, _, child = name.rpartition(".")
            setattr(m.get_submodule(parent) if parent else m, child, _SplitConv(mod, r, terms))
    return m


def emulated_configs(model: SPAN) -> dict[str, tuple[Run, bool]]:
    """The fused schedule's fp32-storage dot precisions emulated on CPU (``--emulate``)."""
    return {"tf32x3 dots (fast_span's default on CUDA), emulated": (emulated(model, _tf32, 3), True),
            "bf16x3 dots, emulated": (emulated(model, _bf16, 3), False),
            "tf32 dots (one product), emulated": (emulated(model, _tf32, 1), False)}


@torch.no_grad()
def bound(model: SPAN, sets: dict[str, list[tuple[str, np.ndarray, np.ndarray]]],
          configs: dict[str, tuple[Run, bool]]) -> tuple[list[list[str]], bool]:
    """Rows of the bound table and whether every offered configuration is within it."""
    dev = model.mean.device
    stats: dict[str, dict[str, Any]] = {k: {"max": 0, "off": 0, "dpsnr": {}} for k in configs}
    pix = 0
    for s, items in sets.items():
        for _, hr, lr in items:
            x = torch.from_numpy(lr.copy()).permute(2, 0, 1)[None].float().to(dev) / 255
            with tf32_convs(False):
                ref = to_uint8(model(x))
            pix += ref.size
            p_ref = psnr_y(ref, hr)
            for k, (run, _) in configs.items():
                with tf32_convs(False):
                    out = to_uint8(run(x).float())
                d = np.abs(out.astype(np.int16) - ref.astype(np.int16))
                st = stats[k]
                st["max"] = max(st["max"], int(d.max()))
                st["off"] += int((d > 0).sum())
                st["dpsnr"].setdefault(s, []).append(psnr_y(out, hr) - p_ref)
    rows, all_ok = [], True
    for k, st in stats.items():
        per_set = {s: float(np.mean(v)) for s, v in st["dpsnr"].items()}
        ok = st["max"] <= 1 and all(abs(v) <= 0.01 for v in per_set.values())
        all_ok &= ok or not configs[k][1]
        rows.append([k, str(st["max"]), f"{st['off'] / max(pix, 1):.2e}",
                     ", ".join(f"{s} {v:+.4f}" for s, v in per_set.items()),
                     "yes" if ok else "no", "yes" if configs[k][1] else "no"])
    where = "with cuDNN TF32 off" if dev.type == "cuda" else "on CPU"
    print(f"\n{pix:,} output values compared per row, against fp32 eager {where}")
    return rows, all_ok


def print_bound(rows: list[list[str]], where: str) -> None:
    print(f"\noutput bound, {where} (uint8 outputs vs fp32 eager; within: max <= 1 level and every "
          "set's mean Y-PSNR change <= 0.01 dB)")
    print(markdown_table(["configuration", "max |diff| (levels)", "fraction of values off",
                          "mean Y-PSNR change (dB)", "within bound", "offered by fast_span"], rows))


# ---------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", type=Path, default=SHARED / "weights" / "dsclora_ch26.pth")
    ap.add_argument("--data", type=Path, default=None, help="folder written by --pack")
    ap.add_argument("--pack", type=Path, default=None, help="write the folder for a GPU run and exit")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--inner", type=int, default=20)
    ap.add_argument("--bound", action="store_true", help="also the output bound on Set5/Set14/B100")
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--resources", action="store_true",
                    help="CPU: registers and spills of the schedule's kernels compiled for sm_80 / sm_90")
    ap.add_argument("--emulate", action="store_true",
                    help="CPU: the output bound of the dot precisions, emulated (needs --data)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, few rounds: a smoke test")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for --emulate")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    if args.pack:
        pack(args.pack, args.weights)
        return 0
    if args.resources:
        model = load_pack(args.data)[0] if args.data else SPAN(feature_channels=26)
        res = kernel_resources(model.eval())
        print(f"fast_span's CUDA kernels compiled for sm_80 / sm_90 (no GPU used), triton "
              f"{__import__('triton').__version__}, width {model.feature_channels}; "
              f"{res[0]['launches']} launches per forward")
        print(markdown_table(["kernel", "constants", "sm", "warps", "registers", "stack bytes (spills)",
                              "tensor cores"],
                             [[r["kernel"], " ".join(f"{k}={v}" for k, v in r["const"].items()), str(r["sm"]),
                               str(r["num_warps"]), str(r["regs"]), str(r["stack"]), str(r["tensor_cores"])]
                              for r in res[1:]]))
        if args.out:
            write_json(args.out, res)
        return 0
    if args.emulate:
        if args.data is None:
            ap.error("--emulate needs --data (a folder written by --pack)")
        model, sets = load_pack(args.data)
        if args.quick:
            sets = {"Set5": sets["Set5"][:2]}
        torch.set_num_threads(args.threads or torch.get_num_threads())
        rows, ok = bound(model.eval(), sets, emulated_configs(model.eval()))
        print_bound(rows, f"dot precisions emulated on CPU, torch {torch.__version__}")
        return 0 if ok else 1
    if not torch.cuda.is_available():
        print(f"bench_span_gpu.py: no CUDA device (torch {torch.__version__}); nothing to measure.")
        return 0
    import triton

    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    print(f"card: {name} (compute capability {'.'.join(map(str, torch.cuda.get_device_capability(dev)))}), "
          f"torch {torch.__version__}, triton {triton.__version__}")
    if args.data is not None:
        model, sets = load_pack(args.data)
    elif args.quick:
        model, sets = SPAN(feature_channels=26), {}
    else:
        model, sets = load_span(args.weights), {}
    model = model.to(dev).eval()
    report: dict[str, Any] = {"card": name, "torch": torch.__version__, "triton": triton.__version__}
    status = 0
    if not args.no_timing:
        status = timing(model, sets, args, report)
    if args.bound:
        if not sets:
            print("bench_span_gpu.py: --bound needs --data (a folder written by --pack)")
            return 2
        rows, ok = bound(model, sets, gpu_configs(model))
        print_bound(rows, f"on {name}")
        report["bound"] = rows
        if not ok:
            print("OUTPUT BOUND FAILED for an offered configuration")
            status = 1
    if args.out:
        write_json(args.out, report)
        print(f"wrote {args.out}")
    return status


def timing(model: SPAN, sets: dict, args: argparse.Namespace, report: dict[str, Any]) -> int:
    dev = model.mean.device
    hrs = [hr for items in sets.values() for _, hr, _ in items]
    sized, batch = natural_inputs(hrs, dev)
    if args.quick:
        sized = {k: v[..., :48, :64] for k, v in sized.items()}
        batch = batch[:2, :, :32, :32]
    warmup, rounds, inner = (2, 2, 2) if args.quick else (args.warmup, args.rounds, args.inner)
    with tf32_convs(False), torch.no_grad():
        refs = {k: to_uint8(model(x)) for k, x in sized.items()}
    rows: list[list[str]] = []
    results: dict[str, Any] = {}
    ntire: dict[str, float] = {}
    t_start = time.perf_counter()
    for case, (make, main_case) in timing_cases(model, args.quick).items():
        t0 = time.perf_counter()
        try:
            run = make()
            per_size = {k: float(np.mean(time_run(run, x, warmup, rounds, inner))) for k, x in sized.items()}
            with torch.no_grad():
                diff = "n/a (random weights)" if case == REFUSE else \
                    str(max(levels(run(x), refs[k]) for k, x in sized.items()))
            thr = ""
            if main_case:
                per_batch = float(np.mean(time_run(run, batch, max(2, warmup // 4), max(2, rounds // 2),
                                                   max(2, inner // 4))))
                thr = f"{batch.shape[0] / per_batch:.0f} ({per_batch * 1e3:.2f} ms)"
        except Exception as err:  # noqa: BLE001 - report and go on
            msg = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
            rows.append([case, "failed", "", "", "", "", msg[:80], ""])
            results[case] = {"error": msg[:300]}
            print(f"  {case}: failed ({msg[:200]})", flush=True)
            continue
        finally:
            torch.backends.cudnn.benchmark = False
            with contextlib.suppress(Exception):
                torch._dynamo.reset()
        mean = float(np.mean(list(per_size.values())))
        ntire[case] = mean
        results[case] = {"per_size_ms": {k: v * 1e3 for k, v in per_size.items()}, "ntire_ms": mean * 1e3,
                         "batch16_imgs_per_s": thr, "max_levels": diff}
        rows.append([case, *(f"{v * 1e3:.3f}" for v in per_size.values()), f"{mean * 1e3:.3f}",
                     "", diff, thr])
        print(f"  {case}: {mean * 1e3:.3f} ms ({time.perf_counter() - t0:.0f}s incl. setup)", flush=True)
        del run
        torch.cuda.empty_cache()
    base = ntire.get(EAGER)
    for r in rows:
        if r[0] in ntire and base:
            r[5] = f"{base / ntire[r[0]]:.2f}x"
    card = report["card"]
    print(f"\nSPAN ({model.feature_channels} ch) on {card}: NTIRE protocol, batch 1, CUDA events, "
          f"{warmup} warm-up forwards excluded, mean of {rounds}x{inner} forwards per size "
          f"(timing took {time.perf_counter() - t_start:.0f}s)")
    print(markdown_table(["case", *(f"{k} ms" for k in sized), "NTIRE mean ms", "speed-up vs eager",
                          "max |diff| vs fp32 (levels)", f"batch {batch.shape[0]} x {batch.shape[-2]}x"
                          f"{batch.shape[-1]}: img/s (ms)"], rows))
    peaks = measure_peaks(dev, args.quick)
    print(f"\nphysical limit of the fused schedule on {card} (means over the NTIRE sizes); rates "
          f"measured now: copy {peaks['bandwidth'] / 1e12:.2f} TB/s, matmul fp16 "
          f"{peaks['fp16'] / 1e12:.0f}, tf32 {peaks['tf32'] / 1e12:.0f}, fp32 {peaks['fp32'] / 1e12:.0f} TMAC/s")
    lrows = limit_rows(model, peaks, ntire)
    print(markdown_table(["schedule", "GMAC real (padded)", "DRAM MB (ideal)", "arithmetic ms",
                          "memory ms", "limit ms", "measured ms", "measured / limit"], lrows))
    report.update(timing=results, peaks=peaks, limit=lrows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
