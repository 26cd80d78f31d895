"""How far tiled upscaling is from untiled, on every Set5 and Set14 LR image (not a timing).

    python benchmarks/tile_agreement.py                       # fp32, one thread, tiles 32 48 56
    python benchmarks/tile_agreement.py --dtype float64
    python benchmarks/tile_agreement.py --threads 2 --no-mkldnn

Prints one row per tile size: the largest float difference, the number of uint8 values that
differ (and by how many levels at most), the worst image's fraction, and how many values lie
within ``255 * max|diff|`` of a rounding boundary (only those can move). The guarantee these
figures back is in docs/span_sr.md ("What tiling guarantees"); the test is
tests/test_span_sr_upscale.py::test_tiling_guarantee_on_set5_and_set14.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from examples.span_sr.arch import load_span  # noqa: E402
from examples.span_sr.images import read_image  # noqa: E402
from examples.span_sr.metrics import to_uint8  # noqa: E402
from examples.span_sr.upscale import upscale_tensor  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--tiles", type=int, nargs="+", default=[32, 48, 56])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--no-mkldnn", action="store_true", help="torch.backends.mkldnn.enabled = False")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.no_mkldnn:
        torch.backends.mkldnn.enabled = False
    data = Path(args.data)
    dtype = getattr(torch, args.dtype)
    model = load_span(data / "weights" / "span_tiny_ch26.pth").to(dtype).eval()
    files = [f for s in ("Set5", "Set14") for f in sorted((data / "sr_bench" / s / "LR_bicubic" / "X4").glob("*.png"))]
    if not files:
        raise SystemExit(f"no LR images under {data}/sr_bench/Set5|Set14/LR_bicubic/X4 (see docs/data.md)")
    stats = {t: {"max": 0.0, "moved": 0, "levels": 0, "worst": (0.0, ""), "near": 0, "values": 0} for t in args.tiles}
    t0 = time.perf_counter()
    with torch.no_grad():
        for f in files:
            lr = read_image(f)
            x = torch.from_numpy(lr.copy()).permute(2, 0, 1)[None].to(dtype) / 255
            full = upscale_tensor(model, x)
            full_u8 = to_uint8(full).astype(np.int16)
            level = (full[0].float().clamp(0, 1) * 255.0).permute(1, 2, 0).double().numpy()
            to_boundary = np.abs(level - np.floor(level) - 0.5)
            for tile in args.tiles:
                tiled = upscale_tensor(model, x, tile=tile)
                diff = (tiled - full).abs().max().item()
                moved = to_uint8(tiled).astype(np.int16) - full_u8
                s = stats[tile]
                n = int(np.count_nonzero(moved))
                s["max"] = max(s["max"], diff)
                s["moved"] += n
                s["levels"] = max(s["levels"], int(np.abs(moved).max()))
                s["values"] += moved.size
                s["near"] += int((to_boundary <= 255 * diff).sum()) if diff > 0 else 0
                if n / moved.size > s["worst"][0]:
                    s["worst"] = (n / moved.size, f.stem)
    print(f"# tile agreement, span_tiny_ch26, {len(files)} Set5+Set14 LR images, {args.dtype}, "
          f"{args.threads} thread(s), mkldnn {'off' if args.no_mkldnn else 'on'}, torch {torch.__version__}, "
          f"{time.perf_counter() - t0:.0f} s")
    print("| tile | max abs diff | uint8 values moved | max levels | worst image (fraction) | near a boundary |")
    print("|---|---|---|---|---|---|")
    for tile, s in stats.items():
        worst = f"{s['worst'][1]} ({s['worst'][0]:.1e})" if s["moved"] else "-"
        print(f"| {tile} | {s['max']:.1e} | {s['moved']} of {s['values']} | {s['levels']} | {worst} | {s['near']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
