"""Restore images with the base model, optionally through a task adapter.

    python examples/restoration/restore.py --weights runs/restoration_demo/base.safetensors \\
        --adapter runs/restoration_demo/adapters/noise50.safetensors --input noisy.png --output out.png
    python examples/restoration/restore.py --weights W --adapter A --input in_dir/ --output out_dir/
    # try it on a clean photo: degrade it first (seeded), write both
    python examples/restoration/restore.py --weights W --adapter A --simulate noise50 \\
        --input photo.png --output restored.png
    # non-blind deblurring: a blurred photo and its known kernel (.npy or grayscale image)
    python examples/restoration/restore.py --weights W --adapter A_nonblind --kernel psf.npy \\
        --input blurred.png --output sharp.png

The adapter is merged and unloaded before running (``convlora.unload(model, merge=True)``), so
the network that runs is the plain base architecture at the original cost. Inputs are 8-bit
images; ``--simulate TASK`` first degrades each input as the test sets do (deblurring tasks use a
Gaussian test kernel, see ``kernels.GAUSSIAN_TEST``, or Levin's k1 with ``--levin``) and writes
the degraded image next to the output as ``<name>_degraded.png``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `examples.restoration` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
from torch import nn

import convlora
from examples.restoration.degrade import degrade, get_task, seeded_generator, wiener_deconv
from examples.restoration.kernels import GAUSSIAN_TEST, gaussian_kernel, load_kernel, load_levin
from examples.restoration.model import load_model
from examples.span_sr.images import list_images, read_image, write_image
from examples.span_sr.metrics import to_uint8
from examples.span_sr.outputs import folder_outputs, refuse_inputs, stopped

__all__ = ["build", "main"]


def build(weights: str | Path, adapter: str | Path | None = None) -> nn.Module:
    """The base model with ``adapter`` merged in (the plain base architecture, eval mode)."""
    model = load_model(weights)
    if adapter is not None:
        convlora.load_adapter(model, adapter)
        convlora.unload(model, merge=True)  # in place: back to plain Conv2d layers
    return model.eval()


def main(argv: list[str] | None = None) -> list[Path]:
    """Command-line entry point; returns the written files."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", required=True, help="base.safetensors written by train.py")
    ap.add_argument("--adapter", default=None, help="task adapter (.safetensors); none: base model")
    ap.add_argument("--input", required=True, nargs="+", help="image files or one folder")
    ap.add_argument("--output", required=True, help="output file (one input) or folder")
    ap.add_argument("--simulate", default=None, help="degrade the inputs first with this task")
    ap.add_argument("--levin", default=None, help="levin09_kernels.npz, for --simulate deblur_motion")
    ap.add_argument("--seed", type=int, default=0, help="noise seed for --simulate")
    ap.add_argument("--kernel", default=None,
                    help="non-blind adapters: the blur kernel (.npy or grayscale image) of the inputs; "
                         "they are first deconvolved with it (wiener_deconv), as in training")
    ap.add_argument("--wiener", type=float, default=get_task("deblur_motion_nonblind").wiener,
                    help="regularisation of --kernel's deconvolution (default: the training value)")
    args = ap.parse_args(argv)
    inputs = [Path(p) for p in args.input]
    if len(inputs) == 1 and inputs[0].is_dir():
        inputs = list_images(inputs[0])  # an empty folder is an error
    for path in inputs:
        if not path.is_file():
            raise FileNotFoundError(f"--input {str(path)!r} is not an image file (or one folder of them).")
    out = Path(args.output)
    single = len(inputs) == 1 and out.suffix != ""
    if not single and out.suffix:
        raise ValueError(f"--output {out} looks like a file but there are {len(inputs)} inputs; "
                         "pass a folder.")
    dests = [out] if single else folder_outputs(inputs, out)
    degraded = [d.with_name(f"{d.stem}_degraded.png") for d in dests] if args.simulate else []
    if len({*dests, *degraded}) < len(dests) + len(degraded):
        raise ValueError(f"--output {out}: a restored image and a '_degraded.png' image would share a name; "
                         "rename the inputs ending in _degraded.")
    refuse_inputs([*dests, *degraded], [*inputs, args.weights, args.adapter, args.kernel, args.levin])
    if args.kernel and args.simulate:
        raise SystemExit("--kernel is for real blurred inputs; --simulate blurs (and, for a non-blind "
                         "task, deconvolves) by itself. Pass one of them.")
    psf = load_kernel(args.kernel) if args.kernel else None
    model = build(args.weights, args.adapter)
    written = []
    for path, dest in zip(inputs, dests):
        x = torch.from_numpy(read_image(path).copy()).permute(2, 0, 1).float().div(255.0)
        if args.simulate:
            task = get_task(args.simulate)
            kernel = None
            if task.kind == "blur":
                kernel = load_levin(args.levin)[0] if args.levin else gaussian_kernel(*GAUSSIAN_TEST[1])
            x = degrade(x, task, seeded_generator(args.seed, task.name, path.stem), kernel)
            bad = dest.with_name(f"{dest.stem}_degraded.png")
            write_image(bad, to_uint8(x))
            written.append(bad)
        if psf is not None:
            x = wiener_deconv(x, psf, args.wiener)
        with torch.inference_mode():
            y = model(x[None])[0]
        write_image(dest, to_uint8(y))
        written.append(dest)
        print(f"{path} -> {dest}")
    print(f"wrote {len(written)} image(s)")
    return written


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as err:  # a missing file, an empty folder, an output over an input
        raise SystemExit(f"error: {err}") from None
    except KeyboardInterrupt:
        raise SystemExit(stopped("restore.py")) from None
