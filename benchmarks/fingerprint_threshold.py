"""Not a timing: the smallest base-weight change the adapter fingerprint detects.

An adapter file records the fingerprint and sketch of the base weights it was saved on
(``convlora/fingerprint.py``). This script takes the conv weights of a real network (SPAN ch28,
``../shared/data/weights/span_ch28.pth``; a seeded random stand-in of the same shapes with
``--quick`` or when the file is absent), changes ONE layer's weight by a random direction of
relative size ``eps = |delta| / |W|``, and counts how often ``base_mismatch`` reports the change,
for each precision pair (the dtype the adapter was saved on -> the dtype of the base it is loaded
onto; the changed base is cast to the second dtype). It also reports the ``params`` vs
``params_ema`` pair of ``span_ch28_ema_trainckpt.pth`` that a float32 adapter must tell apart.

    python benchmarks/fingerprint_threshold.py
    python benchmarks/fingerprint_threshold.py --trials 200
    python benchmarks/fingerprint_threshold.py --quick     # smoke run, random weights
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import torch

from convlora.fingerprint import base_mismatch, dtype_name, fingerprint, sketch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "weights"
PAIRS = [("float32", "float32"), ("float32", "bfloat16"), ("float32", "float16"),
         ("bfloat16", "float32"), ("float64", "float64"), ("legacy", "float32")]


def conv_weights(quick: bool) -> tuple[dict[str, torch.Tensor], str]:
    path = SHARED / "span_ch28.pth"
    if not quick and path.is_file():
        sd = torch.load(path, map_location="cpu", weights_only=True)
        sd = sd.get("params_ema", sd.get("params", sd))
        return {k: v.float() for k, v in sd.items() if k.endswith("weight") and v.dim() == 4}, str(path)
    gen = torch.Generator().manual_seed(0)
    shapes = [(28, 3, 3, 3), (28, 28, 3, 3), (28, 28, 3, 3), (48, 28, 3, 3)]
    return {f"conv{i}.weight": torch.randn(s, generator=gen) * 0.05 for i, s in enumerate(shapes)}, "random"


def detection_rate(weights: dict[str, torch.Tensor], saved: str, loaded: str, eps: float,
                   trials: int, gen: torch.Generator) -> float:
    dtype = {"legacy": torch.float32}.get(saved) or getattr(torch, saved)
    ref = {k: v.to(dtype) for k, v in weights.items()}
    fp, sk = fingerprint(ref), sketch(ref)
    recorded = None if saved == "legacy" else {k: dtype_name(dtype) for k in ref}
    names = sorted(ref)
    hits = 0
    for t in range(trials):
        name = names[t % len(names)]
        w = ref[name].double()
        delta = torch.randn(w.shape, generator=gen, dtype=torch.float64)
        changed = dict(ref)
        changed[name] = w + delta * (eps * float(w.norm()) / float(delta.norm()))
        now = {k: v.to(getattr(torch, loaded)) for k, v in changed.items()}
        hits += base_mismatch(now, fp, sk, recorded) is not None
    return hits / trials


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=100, help="random changes per cell")
    parser.add_argument("--quick", action="store_true", help="smoke run: random weights, 4 trials")
    args = parser.parse_args()
    trials = 4 if args.quick else args.trials
    weights, source = conv_weights(args.quick)
    gen = torch.Generator().manual_seed(1)
    print(f"weights: {source} ({len(weights)} conv layers); {trials} random one-layer changes per cell;"
          f" torch {torch.__version__}, {platform.processor() or platform.machine()}")
    eps_grid = [1e-8, 3e-8, 1e-7, 3e-7, 1e-6, 3e-6, 1e-5, 1e-4, 1e-3, 3e-3, 1e-2, 3e-2]
    header = "| relative change eps | " + " | ".join(f"{a} -> {b}" for a, b in PAIRS) + " |"
    print()
    print("Share of changes detected (saved dtype -> loaded dtype; 'legacy' = file without base_dtype)")
    print()
    print(header)
    print("|" + "---|" * (len(PAIRS) + 1))
    for eps in eps_grid:
        cells = [f"{100 * detection_rate(weights, a, b, eps, trials, gen):.0f}%" for a, b in PAIRS]
        print(f"| {eps:.0e} | " + " | ".join(cells) + " |")
    ckpt = SHARED / "span_ch28_ema_trainckpt.pth"
    if ckpt.is_file() and not args.quick:
        sd = torch.load(ckpt, map_location="cpu", weights_only=True)
        keys = [k for k in sd["params"] if k.endswith("weight") and sd["params"][k].dim() == 4]
        ema = {k: sd["params_ema"][k] for k in keys}
        raw = {k: sd["params"][k] for k in keys}
        rel = max(float((raw[k] - ema[k]).norm() / ema[k].norm()) for k in keys)
        print()
        print(f"params vs params_ema of {ckpt.name}: largest per-layer relative change {rel:.1e}")
        print()
        print("| adapter saved on | loaded onto | detected |")
        print("|---|---|---|")
        for saved in ("float32", "legacy"):
            recorded = None if saved == "legacy" else {k: "float32" for k in keys}
            for loaded in ("float32", "bfloat16"):
                onto = {k: v.to(getattr(torch, loaded)) for k, v in raw.items()}
                found = base_mismatch(onto, fingerprint(ema), sketch(ema), recorded) is not None
                print(f"| params_ema ({saved}) | params ({loaded}) | {'yes' if found else 'no'} |")


if __name__ == "__main__":
    main()
