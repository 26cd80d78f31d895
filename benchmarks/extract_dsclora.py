"""How much of the official DSCLoRA gain does a true rank-2/8 adapter hold?

Extracts ``dsclora_ch26 - span_tiny_ch26`` with :func:`convlora.extract` in the ``"loralib"``
view, with the paper's placement (the 18 block convs, ``conv_2`` and the pixel-shuffle conv
``upsampler.0``) at increasing ranks, merges each adapter into the base and scores it on
Set5/Set14/B100 (Y-PSNR, border 4, SR rounded to uint8, LR made from the modcropped HR with the
MATLAB-exact bicubic: the protocol of ``examples/span_sr/evaluate.py``, whose public functions it
calls). Prints a markdown table and the keys that differ outside the placement, and plots the
singular-value spectra of every adapted layer's ``delta W``.

    python benchmarks/extract_dsclora.py                       # full run (CPU, a few minutes)
    python benchmarks/extract_dsclora.py --sets Set5 --quick   # smoke run: one image, two ranks
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import copy
import math
import time
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

import convlora
from examples.span_sr.arch import load_span
from examples.span_sr.evaluate import sr_pairs
from examples.span_sr.metrics import psnr_y
from examples.span_sr.upscale import upscale_image

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
PLACEMENT = ["block_*", "conv_2", "pixel_shuffle"]
WIDE = ("conv_2", "upsampler.0")
# (label, rank of the block convs, rank of conv_2 / upsampler.0); None = full rank
RANKS: list[tuple[str, int | None, int | None]] = [
    ("2/8 (paper)", 2, 8), ("4/16", 4, 16), ("8/32", 8, 32), ("16/64", 16, 64), ("full", None, None),
    ("2/full", 2, None), ("full/8", None, 8)]
FULL = 10**6  # any rank above a layer's full rank is capped at it


def _score(model: nn.Module, sets: dict[str, list[tuple[np.ndarray, np.ndarray]]],
           ref: dict[str, list[np.ndarray]] | None = None) -> tuple[dict[str, float], int, list[np.ndarray]]:
    """Mean Y-PSNR per set, the number of uint8 SR values that differ from ``ref``'s, the SR images."""
    model = model.eval()
    out, differing, images = {}, 0, []
    with torch.inference_mode():
        for name, pairs in sets.items():
            srs = [upscale_image(model, lr) for _, lr in pairs]
            out[name] = float(np.mean([psnr_y(sr, hr, 4) for sr, (hr, _) in zip(srs, pairs)]))
            if ref is not None:
                differing += sum(int((sr != r).sum()) for sr, r in zip(srs, ref[name]))
            images.append(srs)
    return out, differing, images


def _extract(base: nn.Module, tuned: nn.Module, blocks: int | None, wide: int | None, *,
             everything: bool = False) -> convlora.Extraction:
    if everything:  # every conv (conv_1 and the 1x1 conv_cat too) and the changed biases
        return convlora.extract(base, tuned, factorization="loralib", store_biases=True)
    return convlora.extract(base, tuned, rank=blocks or FULL, rank_pattern=dict.fromkeys(WIDE, wide or FULL),
                            factorization="loralib", targets=PLACEMENT)


def _plot(ex: convlora.Extraction, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    cmap = plt.get_cmap("viridis")
    for name, lyr in ex.layers.items():
        s = lyr.singular_values.double()
        wide = name.startswith(WIDE)
        style = {"color": "crimson" if name.startswith("conv_2") else "darkorange", "lw": 1.8} if wide else {
            "color": cmap((int(name[6]) - 1) / 6), "lw": 0.9, "alpha": 0.8}
        idx = np.arange(1, s.numel() + 1)
        ax.semilogy(idx, (s / s[0]).numpy(), label=name.split(".")[0] if wide else None, **style)
        ax2.plot(idx, (torch.cumsum(s**2, 0) / (s**2).sum()).numpy(), **style)
    for a in (ax, ax2):
        for x, lab in ((6, "rank 2 (blocks)"), (24, "rank 8 (conv_2, upsampler)")):
            a.axvline(x, ls="--", color="grey", lw=0.8)
            a.text(x + 0.8, 0.02 if a is ax2 else 2e-4, lab, rotation=90, fontsize=7, color="grey",
                   va="bottom")
        a.set_xlabel("singular value index (loralib view: 78 x 78)")
        a.grid(alpha=0.3)
    ax.axhline(1e-3, color="grey", lw=0.6)
    ax.set_ylim(1e-5, 1.5)
    ax.set_ylabel("sigma_i / sigma_1")
    ax.set_title("spectrum of dW = dsclora_ch26 - span_tiny_ch26")
    ax2.set_ylabel("fraction of ||dW||_F^2 kept")
    ax2.set_title("energy kept vs rank (blocks: colour by block)")
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", type=Path, default=SHARED / "weights")
    ap.add_argument("--bench", type=Path, default=SHARED / "sr_bench")
    ap.add_argument("--sets", nargs="+", default=["Set5", "Set14", "B100"])
    ap.add_argument("--plot", type=Path, default=REPO / "docs" / "img" / "dsclora_delta_spectra.png")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="one image per set, two ranks; measures nothing")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    base = load_span(args.weights / "span_tiny_ch26.pth")
    tuned = load_span(args.weights / "dsclora_ch26.pth")
    sets = {}
    for name in args.sets:
        pairs = [(hr, lr) for _, hr, lr in sr_pairs(args.bench / name / "HR", None, 4)]
        sets[name] = pairs[:1] if args.quick else pairs
    ranks = [RANKS[0], RANKS[4]] if args.quick else RANKS
    t0 = time.time()

    official, _, srs = _score(tuned, sets)
    ref = dict(zip(sets, srs))
    rows = [("base `span_tiny_ch26`", "", "", "", _score(base, sets, ref)[:2]),
            ("official `dsclora_ch26`", "", "", "", (official, 0))]
    full = None
    for label, blocks, wide in ranks:
        ex = _extract(base, tuned, blocks, wide)
        full = ex if blocks is None and wide is None else full
        lay = list(ex.layers.values())
        params = sum(p.numel() for p in convlora.lora_parameters(ex.model))
        rk = f"{lay[0].rank}/{ex.layers['conv_2.eval_conv'].rank}"
        err = f"{np.mean([x.rel_error for x in lay[:18]]):.3f} / {np.mean([x.rel_error for x in lay[18:]]):.3f}"
        rows.append((label, rk, f"{params:,}", err, _score(convlora.unload(copy.deepcopy(ex.model)), sets, ref)[:2]))
    everything = _extract(base, tuned, None, None, everything=True)
    rows.append(("full, every conv + biases", "full", f"{sum(p.numel() for p in convlora.lora_parameters(everything.model)):,}",
                 f"{max(x.rel_error for x in everything.layers.values()):.1e} (max)",
                 _score(convlora.unload(copy.deepcopy(everything.model)), sets, ref)[:2]))

    head = ["adapter (blocks / conv_2, upsampler)", "ranks kept", "params", "mean dW rel. error (blocks / wide)",
            *(f"{s} Y-PSNR" for s in sets), "uint8 SR values != official"]
    print(f"# dsclora_ch26 - span_tiny_ch26, extracted in the 'loralib' view; torch {torch.__version__}, "
          f"{args.threads} thread(s){', QUICK (measures nothing)' if args.quick else ''}")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    start = rows[0][4][0]
    total = sum(hr.size for pairs in sets.values() for hr, _ in pairs)
    for label, rk, params, err, (psnr, differing) in rows:
        cells = [f"{psnr[s]:.4f}" + ("" if label.startswith("base") else f" ({psnr[s] - start[s]:+.4f})")
                 for s in sets]
        print("| " + " | ".join([label, rk, params, err, *cells, f"{differing:,}"]) + " |")
    print(f"\n({sum(len(p) for p in sets.values())} images, {total:,} uint8 SR values; "
          f"{time.time() - t0:.0f} s)")
    if full is not None:
        print("\nfull rank, paper placement: what differs outside it, and the exactness check")
        print("\n".join(line for line in full.summary().splitlines() if "eval_conv  loralib" not in line))
        for name, ex in (("paper placement", full), ("every conv + biases", everything)):
            lr = next(iter(sets.values()))[0][1]  # a real LR image (random noise drives SPAN far out of range)
            probe = torch.tensor(lr).permute(2, 0, 1)[None].float() / 255.0
            with torch.inference_mode():
                y, y_t, y_b = ex.model(probe), tuned(probe), base(probe)
            print(f"{name}, full rank: exact={ex.exact}; on the first LR image ||y - y_tuned|| / ||y_tuned - y_base|| = "
                  f"{float((y - y_t).norm() / (y_t - y_b).norm()):.2e}, max |y - y_tuned| = "
                  f"{float((y - y_t).abs().max()):.2e}")
        spectra = {n: lyr.singular_values for n, lyr in full.layers.items()}
        above = [int((s > 1e-3 * s[0]).sum()) for s in spectra.values()]
        print(f"singular values above 1e-3 of the largest, per layer (of 78): min {min(above)}, "
              f"max {max(above)}: {dict(zip(spectra, above))}")
        print("per layer: loralib rank needed to keep 99% / 99.9% / 99.99% of ||dW||_F^2; the largest drop "
              "sigma_i / sigma_i+1 at a multiple of 3 (a loralib rank) among the first 60 values")
        for n, sv in spectra.items():
            e = torch.cumsum(sv**2, 0) / (sv**2).sum()
            need = [math.ceil((int(torch.searchsorted(e, q)) + 1) / 3) for q in (0.99, 0.999, 0.9999)]
            drops = sv[2:60:3] / sv[3:61:3]
            j = int(torch.argmax(drops))
            print(f"  {n:24s} {need[0]:2d} / {need[1]:2d} / {need[2]:2d}   drop x{float(drops[j]):5.1f} after "
                  f"{3 * (j + 1)} values (rank {j + 1})")
        if not args.quick:
            _plot(full, args.plot)
            print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
