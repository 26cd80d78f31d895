"""Upscale images with a SPAN checkpoint, optionally tiled; export the model to ONNX.

    python examples/span_sr/upscale.py --weights ../shared/data/weights/dsclora_ch26.pth \\
        --input ../shared/data/sr_bench/Set5/LR_bicubic/X4 --output runs/sr_set5
    python examples/span_sr/upscale.py --weights W --input photo.png --output out/ --tile 128 --fast
    python examples/span_sr/upscale.py --weights W --onnx span.onnx   # checked with onnxruntime
    python examples/span_sr/upscale.py --weights W --export-spandrel W_spandrel.safetensors  # chaiNNer/ComfyUI

Tiling: each tile is cut with a margin of the receptive-field radius (21 LR pixels for SPAN) and
only its core is kept, so the tiled result is the untiled one up to float round-off (the CPU
libraries add the sums in another order for another tensor shape): in float32 on CPU the outputs
differ by at most 1e-5, and the uint8 images by at most one level in at most 1 in 10,000 values
(docs/span_sr.md, "What tiling guarantees", derives the radius and the bound). Memory is bounded
by one tile plus the uint8 output. --onnx needs the [onnx] extra.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import argparse
import warnings
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from examples.span_sr.dsclora import deploy, load_deployed
from examples.span_sr.fast import fast_span
from examples.span_sr.images import list_images, read_image, write_image
from examples.span_sr.metrics import to_uint8
from examples.span_sr.outputs import folder_outputs, refuse_inputs, stopped
from examples.span_sr.spandrel_format import SUFFIXES, save_spandrel

__all__ = ["SPAN_RF_RADIUS", "check_onnx", "export_onnx", "main", "tiles", "upscale_image", "upscale_tensor"]

SPAN_RF_RADIUS = 21
"""Receptive-field radius of SPAN in LR pixels: the 3x3 convs on its longest path (docs/span_sr.md)."""


def tiles(h: int, w: int, tile: int, pad: int, same_shape: bool = False
          ) -> Iterator[tuple[slice, slice, slice, slice]]:
    """Yield ``(in_rows, in_cols, core_rows, core_cols)``: the padded input window and the
    core's position *inside* that window, all in LR pixels, covering an ``h x w`` image.

    With ``same_shape``, a window that would be cut short by the image border is shifted inward
    instead, so every window is ``min(tile + 2 * pad, h) x min(tile + 2 * pad, w)`` (one input
    shape: one compile for ``--fast``). Each core still has ``pad`` pixels of context on every
    side or reaches the image border, so the tiling guarantee is unchanged.
    """
    if tile < 1 or pad < 0:
        raise ValueError(f"tile={tile} must be >= 1 and pad={pad} >= 0.")
    for y0 in range(0, h, tile):
        for x0 in range(0, w, tile):
            y1, x1 = min(y0 + tile, h), min(x0 + tile, w)
            if same_shape:
                wh, ww = min(tile + 2 * pad, h), min(tile + 2 * pad, w)
                ya, xa = min(max(y0 - pad, 0), h - wh), min(max(x0 - pad, 0), w - ww)
                yb, xb = ya + wh, xa + ww
            else:
                ya, xa = max(y0 - pad, 0), max(x0 - pad, 0)
                yb, xb = min(y1 + pad, h), min(x1 + pad, w)
            yield (slice(ya, yb), slice(xa, xb),
                   slice(y0 - ya, y1 - ya), slice(x0 - xa, x1 - xa))


def _scale_of(model: nn.Module) -> int:
    scale = getattr(model, "upscale", None)
    if not isinstance(scale, int):
        raise ValueError(f"{type(model).__name__} has no integer `upscale` attribute; tiling needs it.")
    return scale


def _cores(model: nn.Module, x: torch.Tensor, tile: int, pad: int, same_shape: bool = False
           ) -> Iterator[tuple[tuple[slice, slice], torch.Tensor]]:
    """The one tiled forward: ``(output rows and columns, output core)`` of each tile cut with a ``pad`` margin."""
    s = _scale_of(model)
    h, w = x.shape[-2:]
    for rows, cols, core_r, core_c in tiles(h, w, tile, pad, same_shape):
        y = model(x[..., rows, cols])
        y = y[..., core_r.start * s: core_r.stop * s, core_c.start * s: core_c.stop * s]
        r0, c0 = (rows.start + core_r.start) * s, (cols.start + core_c.start) * s
        yield (slice(r0, r0 + y.shape[-2]), slice(c0, c0 + y.shape[-1])), y


@torch.no_grad()
def upscale_tensor(model: nn.Module, x: torch.Tensor, tile: int | None = None,
                   pad: int = SPAN_RF_RADIUS, same_shape: bool = False) -> torch.Tensor:
    """Run ``model`` on a float ``(N, 3, H, W)`` tensor, tile by tile when ``tile`` is set.

    Returns the raw (unclamped) output. ``pad`` must be at least the model's receptive-field
    radius (21 for SPAN) for the result to equal the untiled one. ``same_shape`` cuts every
    tile at one input shape (see [`tiles`][examples.span_sr.upscale.tiles]), for compiled models.
    """
    h, w = x.shape[-2:]
    if tile is None or (h <= tile and w <= tile):
        return model(x)
    s = _scale_of(model)
    out = x.new_empty(*x.shape[:-2], h * s, w * s)
    for (rows, cols), y in _cores(model, x, tile, pad, same_shape):
        out[..., rows, cols] = y
    return out


@torch.no_grad()
def upscale_image(model: nn.Module, img: np.ndarray, tile: int | None = None,
                  pad: int = SPAN_RF_RADIUS, same_shape: bool = False) -> np.ndarray:
    """Upscale a ``uint8`` HxWx3 image; returns ``uint8`` (clamped, rounded).

    The input follows the model's device and dtype (``model.half()`` gives fp16 inference).
    With ``tile``, only one tile's activations and the ``uint8`` output are held in memory;
    ``same_shape`` as in [`upscale_tensor`][examples.span_sr.upscale.upscale_tensor].
    """
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"upscale_image needs a uint8 HxWx3 array, got {getattr(img, 'dtype', img)} "
                         f"{getattr(img, 'shape', '')}; read files with images.read_image.")
    p = next(model.parameters())
    x = torch.tensor(img).permute(2, 0, 1)[None].to(p.device, p.dtype) / 255.0  # copies: PIL arrays are read-only
    h, w = img.shape[:2]
    if tile is None or (h <= tile and w <= tile):
        return to_uint8(model(x))
    s = _scale_of(model)
    out = np.empty((h * s, w * s, 3), np.uint8)
    for (rows, cols), y in _cores(model, x, tile, pad, same_shape):
        out[rows, cols] = to_uint8(y)
    return out


def export_onnx(model: nn.Module, path: str | Path, opset: int = 17) -> Path:
    """Export the merged deploy model to ONNX with dynamic batch, height and width.

    Uses the TorchScript exporter (``dynamo=False``), which needs no ``onnxscript``.
    """
    net = deploy(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = torch.rand(1, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        torch.onnx.export(net, (x,), str(path), dynamo=False, opset_version=opset,
                          input_names=["lr"], output_names=["sr"],
                          dynamic_axes={"lr": {0: "n", 2: "h", 3: "w"}, "sr": {0: "n", 2: "H", 3: "W"}})
    return path


def check_onnx(path: str | Path, model: nn.Module, x: torch.Tensor) -> float:
    """Max absolute difference between onnxruntime (CPU) and PyTorch outputs on ``x``."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"lr": x.float().cpu().numpy()})[0]
    with torch.no_grad():
        ref = deploy(model)(x.float().cpu()).numpy()
    return float(np.abs(got - ref).max())


def _fast_model(model: nn.Module, files: list[Path], tile: int | None) -> nn.Module:
    """``--fast``: the fast path, with ONNX Runtime for one image that is run in one piece.

    ``fast_span``'s CPU default compiles (seconds) for each new input shape; one image in one
    piece meets one shape and never wins that back, so it gets ONNX Runtime's smaller setup.
    Either setup costs more than one small image's forward saves, which the line printed says.
    """
    import importlib.util

    one_piece = len(files) == 1 and (tile is None or max(read_image(files[0]).shape[:2]) <= tile)
    cpu = next(model.parameters()).device.type == "cpu"
    if one_piece and cpu and importlib.util.find_spec("onnxruntime") is not None:
        print("upscale.py: --fast on one image: ONNX Runtime (about 1 s of export and setup, not a "
              "compile); on a small image that setup costs more than the faster forward saves, "
              "so --fast pays off from a few images or tiles on (docs/span_sr.md).")
        return fast_span(model, backend="onnxruntime")
    fast = fast_span(model)
    if len(files) == 1 and fast.backend != "eager":
        print(f"upscale.py: --fast ({fast.backend}) pays a one-off setup that one small image does "
              "not win back; it pays off over a folder or many tiles (docs/span_sr.md).")
    return fast


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", required=True, help="SPAN checkpoint (.pth or .safetensors)")
    ap.add_argument("--lora-adapter", metavar="FILE", help="convlora adapter (.safetensors) to apply and merge")
    ap.add_argument("--input", help="image file or folder of images")
    ap.add_argument("--output", help="a new output folder (same names, PNG)")
    ap.add_argument("--tile", type=int, default=None, help="LR tile size; bounds memory. Same result as untiled up to float "
                    "round-off: at most one uint8 level, in at most 1 in 10,000 values")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--half", action="store_true", help="fp16 inference (CUDA)")
    ap.add_argument("--fast", action="store_true", help="fast path (fast.py; float32, <= 1 level)")
    ap.add_argument("--onnx", help="export the merged deploy model to this .onnx file")
    ap.add_argument("--export-spandrel", metavar="OUT", help="write the merged deploy model for spandrel "
                    "(chaiNNer, ComfyUI) to OUT: .safetensors, or .pth by suffix (docs/chainner_comfyui.md)")
    args = ap.parse_args(argv)
    src = Path(args.input) if args.input is not None else None
    if src is None and not args.onnx and not args.export_spandrel:
        ap.error("give --input/--output, --onnx or --export-spandrel")
    if args.export_spandrel:
        inputs = [Path(p) for p in (args.weights, args.lora_adapter) if p is not None]
        out = Path(args.export_spandrel)
        if any(out.resolve() == p.resolve() or (out.exists() and p.exists() and out.samefile(p)) for p in inputs):
            ap.error(f"--export-spandrel {out} is an input file; give another name")
        if out.suffix.lower() not in SUFFIXES:
            ap.error(f"--export-spandrel {out}: the file must end in .safetensors or .pth")
    if src is not None and args.output is None:
        ap.error("--output is required with --input")
    if args.onnx:
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
        except ImportError as err:
            raise SystemExit(f"upscale.py --onnx needs onnx and onnxruntime ({err.name} is missing): "
                             'pip install -e ".[onnx]"') from None
    try:
        files = (list_images(src) if src.is_dir() else [src]) if src is not None else []
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"input image {str(f)!r} does not exist.")
        dests = folder_outputs(files, args.output) if files else []  # never over an input, one per stem
        refuse_inputs(dests, [args.weights, args.lora_adapter])
        refuse_inputs([args.onnx] if args.onnx else [], [args.weights, args.lora_adapter, *files], "--onnx")
        model: nn.Module = load_deployed(args.weights, args.lora_adapter)  # the fast wrapper replaces it below
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"upscale.py: {err}") from None
    if args.export_spandrel:
        try:
            path = save_spandrel(model.state_dict(), args.export_spandrel)
        except ValueError as err:
            raise SystemExit(f"upscale.py --export-spandrel: {err}") from None
        print(f"wrote {path}: spandrel loads it as SPAN (chaiNNer, ComfyUI)")
    if args.onnx:
        path = export_onnx(model, args.onnx)
        # smooth, image-like input: white noise drives SPAN far outside its training range
        # (outputs ~50), where fp32 round-off alone reaches 1e-3
        x = torch.nn.functional.interpolate(torch.rand(1, 3, 7, 6), size=(48, 40), mode="bilinear")
        diff = check_onnx(path, model, x)
        print(f"wrote {path}; onnxruntime vs PyTorch max |diff| = {diff:.2e} on a smooth 48x40 input")
    if not files:
        return 0
    if args.fast and args.half:
        ap.error("--fast runs float32 only (fp16 exceeds its output bound); drop --half")
    model = model.to(args.device)
    if args.half:
        model = model.half()
    if args.fast:
        model = _fast_model(model, files, args.tile)
    from tqdm import tqdm

    written = 0
    for f, dest in tqdm(list(zip(files, dests)), disable=len(files) == 1, unit="img"):
        sr = upscale_image(model, read_image(f), tile=args.tile, same_shape=args.fast)
        write_image(dest, sr)
        written += 1
    print(f"wrote {written} image(s) to {args.output}")
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:
        raise SystemExit(stopped("upscale.py")) from None
