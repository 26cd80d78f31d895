"""Pack what a lent GPU machine needs for the DSCLoRA sweep into one ignored folder (default ``.carry/gpu``).

    python benchmarks/prep_gpu_data.py                 # BSD200 + T91 from ../shared/data/train/sr

The GPU machine has torch and numpy only and no network, so this folder carries:

* ``sr_train/<set>/<name>.u8.xz``: every training image, decoded once here and stored losslessly
  with :func:`examples.span_sr.data.save_packed` (about 30% smaller than the PNGs; no Pillow
  needed to read it). The MATLAB-bicubic LR is made there at first use (numpy, cached).
* ``weights/``: the student base and teacher checkpoints.
* ``pylib/``: pure-Python (or abi3) packages copied from this environment, appended to
  ``PYTHONPATH`` there so that installed versions win: safetensors (adapter files), PyYAML
  (pure-Python path; its C extension is for this Python only), tqdm.

The total must stay under the 64 MiB carry limit; the script prints the size and fails above
``--max-mib``. Pass the folder as the ``carry`` path of the GPU run (see benchmarks/gpu_sweep.sh).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from examples.span_sr.data import image_refs  # noqa: E402
from examples.span_sr.images import load_packed, read_image, save_packed  # noqa: E402

SHARED = REPO.parent / "shared" / "data"


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", nargs="+", default=[str(SHARED / "train/sr/BSD200"), str(SHARED / "train/sr/T91")])
    ap.add_argument("--weights", nargs="+", default=[str(SHARED / "weights/span_tiny_ch26.pth"),
                                                     str(SHARED / "weights/span_ch28.pth")])
    ap.add_argument("--out", default=str(REPO / ".carry/gpu"))
    ap.add_argument("--max-mib", type=float, default=55.0)
    args = ap.parse_args(argv)
    out = Path(args.out)
    t0 = time.time()
    for folder in args.sets:
        dest = out / "sr_train" / Path(folder).name
        dest.mkdir(parents=True, exist_ok=True)
        refs = image_refs([folder])
        for ref in refs:
            target = dest / (Path(ref).stem + ".u8.xz")
            if target.exists():
                continue
            img = read_image(ref)
            save_packed(target, img)
            if not (load_packed(target) == img).all():
                raise RuntimeError(f"packed copy of {ref} does not round-trip")
        print(f"{Path(folder).name}: {len(refs)} images -> {dest} ({_size(dest) / 2**20:.1f} MiB)")
    (out / "weights").mkdir(parents=True, exist_ok=True)
    for w in args.weights:
        shutil.copy2(w, out / "weights" / Path(w).name)
    site = Path(str(__import__("safetensors").__file__)).resolve().parents[1]
    for pkg in ("safetensors", "yaml", "tqdm"):
        dest = out / "pylib" / pkg
        if not dest.exists():
            shutil.copytree(site / pkg, dest, ignore=shutil.ignore_patterns("__pycache__", "*.cpython-*.so"))
    total = _size(out) / 2**20
    print(f"{out}: {total:.1f} MiB in {time.time() - t0:.0f}s")
    if total > args.max_mib:
        print(f"too large for the carry limit (> {args.max_mib} MiB): drop a set or images", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
