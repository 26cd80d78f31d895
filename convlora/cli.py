"""Command line: ``convlora inspect ADAPTER`` and ``convlora merge --adapter A --base W --out O``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from .adapters import read_adapter
from .errors import ConvLoRAError, FingerprintMismatchError
from .fingerprint import fingerprint, sketch, sketches_match
from .functional import merged_weight

__all__ = ["load_state_dict_file", "main", "merge_state_dict"]

_NESTING = ("params_ema", "params", "state_dict", "model")


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """Read a ``.safetensors`` or ``.pth`` state dict (``weights_only=True``, common nesting unwrapped)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_file(str(path))
    obj = torch.load(path, map_location="cpu", weights_only=True)
    while isinstance(obj, dict) and not any(isinstance(v, Tensor) for v in obj.values()):
        key = next((k for k in _NESTING if k in obj), None)
        if key is None:
            raise ConvLoRAError(f"{path}: no tensors found at the top level or under {_NESTING}.")
        obj = obj[key]
    if not isinstance(obj, dict):
        raise ConvLoRAError(f"{path} does not hold a state dict.")
    return {k: v for k, v in obj.items() if isinstance(v, Tensor)}


def merge_state_dict(base: dict[str, Tensor], adapter_path: str | Path, *,
                     strict: bool = True) -> dict[str, Tensor]:
    """Fold an adapter file into a plain state dict (``<layer>.weight`` keys), without model code.

    The delta is added in float32 and cast back to each weight's dtype, exactly as
    `convlora.merge` does.
    """
    tensors, meta = read_adapter(adapter_path)
    layers = meta["layers"]
    problems = []
    for lname, lm in layers.items():
        w = base.get(f"{lname}.weight")
        if w is None or list(w.shape) != lm["weight_shape"]:
            problems.append(f"{lname}.weight: expected shape {lm['weight_shape']}, "
                            f"found {None if w is None else list(w.shape)}")
    for key in meta["bias_keys"]:
        if key not in base or base[key].shape != tensors[key].shape:
            problems.append(f"{key}: missing or of another shape in the base")
    if problems:
        raise ConvLoRAError(f"{adapter_path} does not fit these weights:\n  " + "\n  ".join(problems))
    bases = {n: base[f"{n}.weight"] for n in layers}
    if fingerprint(bases) != meta["base_fingerprint"] and not sketches_match(sketch(bases), meta["base_sketch"]):
        msg = f"{adapter_path} was trained on other base weights (fingerprint mismatch)"
        if strict:
            raise FingerprintMismatchError(msg + "; use --force to merge anyway.")
        print(f"warning: {msg}", file=sys.stderr)
    out = dict(base)
    for lname, lm in layers.items():
        w = base[f"{lname}.weight"]
        out[f"{lname}.weight"] = merged_weight(w, tensors[f"{lname}.lora_A"],
                                               tensors[f"{lname}.lora_B"], lm["alpha"] / lm["rank"])
    for key in meta["bias_keys"]:
        out[key] = tensors[key].to(base[key].dtype)
    return out


def _inspect(args: argparse.Namespace) -> int:
    tensors, meta = read_adapter(args.adapter)
    n = sum(t.numel() for t in tensors.values())
    print(f"adapter        {args.adapter}")
    print(f"name           {meta['adapter_name']}")
    print(f"format         {meta['format']} v{meta['format_version']} (convlora {meta['convlora_version']})")
    print(f"fingerprint    {meta['base_fingerprint']}")
    print(f"parameters     {n:,} in {len(tensors)} tensors")
    if meta["user"]:
        print(f"metadata       {meta['user']}")
    print()
    rows = [("layer", "type", "weight", "rank", "alpha", "factorization", "params")]
    for lname, lm in meta["layers"].items():
        p = tensors[f"{lname}.lora_A"].numel() + tensors[f"{lname}.lora_B"].numel()
        rows.append((lname, lm["type"], "x".join(map(str, lm["weight_shape"])), str(lm["rank"]),
                     f"{lm['alpha']:g}", lm["factorization"], f"{p:,}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    if meta["bias_keys"]:
        print(f"trainable biases saved: {meta['bias_keys']}")
    return 0


def _merge(args: argparse.Namespace) -> int:
    base = load_state_dict_file(args.base)
    merged = merge_state_dict(base, args.adapter, strict=not args.force)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in merged.items()}, str(out))
    print(f"wrote {out} ({len(merged)} tensors)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``convlora`` command."""
    parser = argparse.ArgumentParser(prog="convlora", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="show an adapter's layers, ranks, metadata and fingerprint")
    p.add_argument("adapter")
    p.set_defaults(func=_inspect)
    p = sub.add_parser("merge", help="merge an adapter into a state-dict file without model code")
    p.add_argument("--adapter", required=True)
    p.add_argument("--base", required=True, help=".safetensors or .pth state dict")
    p.add_argument("--out", required=True, help="output .safetensors")
    p.add_argument("--force", action="store_true", help="merge despite a fingerprint mismatch")
    p.set_defaults(func=_merge)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (ConvLoRAError, FileNotFoundError) as err:
        print(f"convlora {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
