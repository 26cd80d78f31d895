"""Command line: ``convlora inspect ADAPTER``, ``convlora merge --adapter A --base W --out O``,
``convlora convert --to peft|convlora --adapter IN --out OUT [--base W]`` and
``convlora extract --base B --tuned T --rank 8 --out adapter.safetensors``.

This module only parses arguments and prints; the work is done by [read_adapter][convlora.read_adapter],
[load_state_dict][convlora.load_state_dict], [merge_state_dict][convlora.merge_state_dict],
[save_state_dict][convlora.save_state_dict], for ``convert``
[convlora_to_peft][convlora.peft.convlora_to_peft] / [peft_to_convlora][convlora.peft.peft_to_convlora],
and for ``extract`` [extract_file][convlora.extract_file].
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from .adapter_format import read_adapter
from .errors import ConvLoRAError
from .extraction import extract_file
from .functional import FACTORIZATIONS
from .peft import convlora_to_peft, peft_to_convlora
from .state_dict import load_state_dict, merge_state_dict, save_state_dict

__all__ = ["main"]


def _inspect(args: argparse.Namespace) -> int:
    tensors, meta = read_adapter(args.adapter)
    n = sum(t.numel() for t in tensors.values())
    print(f"adapter        {args.adapter}")
    print(f"name           {meta['adapter_name']}")
    print(f"format         {meta['format']} v{meta['format_version']} (convlora {meta['convlora_version']})")
    print(f"fingerprint    {meta['base_fingerprint']}")
    print(f"parameters     {n:,} in {len(tensors)} tensors")
    print(f"bias mode      {meta['bias'] or 'not recorded (format v1: the biases trainable when saved)'}")
    if meta["user"]:
        print("metadata")
        for line in json.dumps(meta["user"], indent=2, sort_keys=True, default=str).splitlines():
            print(f"  {line}")
    print()
    rows = [("layer", "type", "weight", "method", "rank", "alpha", "factorization", "params")]
    for lname, lm in meta["layers"].items():
        p = sum(t.numel() for k, t in tensors.items() if k.rpartition(".")[0] == lname
                and k.rpartition(".")[2] != "bias")
        rows.append((lname, lm["type"], "x".join(map(str, lm["weight_shape"])),
                     lm["method"] + ("+tucker" if lm["tucker"] else "") + ("+rs" if lm["rslora"] else ""),
                     str(lm["rank"]),
                     f"{lm['alpha']:g}", lm["factorization"], f"{p:,}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    if meta["bias_keys"]:
        print(f"biases saved: {', '.join(meta['bias_keys'])}")
    return 0


def _refuse_inputs(out: str, option: str, **inputs: str | None) -> None:
    """Raise when ``out`` is one of the named inputs: the same path, a link to it or a hard link."""
    dest = Path(out)
    for name, src in inputs.items():
        if src is None:
            continue
        same = dest.resolve() == Path(src).resolve()
        if not same and dest.exists() and Path(src).exists():
            same = os.path.samefile(dest, src)
        if same:
            raise ConvLoRAError(f"{option} {out} is the --{name} input; writing it would destroy that input. "
                                "Choose another output.")


def _merge(args: argparse.Namespace) -> int:
    _refuse_inputs(args.out, "--out", adapter=args.adapter, base=args.base)
    base = load_state_dict(args.base, key=args.key)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merged = merge_state_dict(base, args.adapter, strict=not args.force)
    for w in caught:
        print(f"convlora merge: warning: {w.message}", file=sys.stderr)
    out = save_state_dict(merged, args.out)
    print(f"wrote {out} ({len(merged)} tensors)")
    return 0


def _convert(args: argparse.Namespace) -> int:
    if args.to == "peft":
        _refuse_inputs(args.out, "--out", adapter=args.adapter)
        if args.base is not None or args.key is not None:
            raise ConvLoRAError("--to peft reads everything from the adapter file; drop --base/--key.")
        out = convlora_to_peft(args.adapter, args.out)
    else:
        if args.base is None:
            raise ConvLoRAError("--to convlora needs --base: the base model's state dict (the adapter "
                                "file records a fingerprint of the base weights it fits).")
        _refuse_inputs(args.out, "--out", adapter=args.adapter, base=args.base)
        out = peft_to_convlora(args.adapter, load_state_dict(args.base, key=args.key), args.out,
                               name=args.name)
    print(f"wrote {out}")
    return 0


def _rank_pattern(text: str) -> dict[str, int]:
    """``'conv_2=8,upsampler.0=8'`` -> ``{"conv_2": 8, "upsampler.0": 8}``."""
    out: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        pattern, sep, value = item.rpartition("=")
        if not sep or not pattern or not value.strip().isdigit():
            raise argparse.ArgumentTypeError(f"{item!r} is not PATTERN=RANK (e.g. 'conv_2=8,upsampler.0=8')")
        out[pattern.strip()] = int(value)
    return out


def _patterns(values: list[str] | None) -> list[str] | None:
    """``--targets a,b c`` -> ``["a", "b", "c"]``."""
    if values is None:
        return None
    return [p for v in values for p in (s.strip() for s in v.split(",")) if p]


def _extract(args: argparse.Namespace) -> int:
    pattern: dict[str, int] = {}
    for part in args.rank_pattern or []:
        pattern.update(part)
    ex = extract_file(args.base, args.tuned, args.out, rank=args.rank, energy=args.energy,
                      factorization=args.factorization, targets=_patterns(args.targets),
                      exclude=_patterns(args.exclude), rank_pattern=pattern or None,
                      store_biases=args.store_biases, tol=args.tol, adapter_name=args.name, key=args.key,
                      require_exact=args.require_exact)
    print(ex.summary())
    for line in ex.leftovers()[:20]:
        print(f"  left over: {line}")
    print(f"wrote {args.out} ({len(ex.layers)} layers, bias mode {ex.bias_mode!r})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``convlora`` command; returns the exit status (2 on bad input)."""
    parser = argparse.ArgumentParser(
        prog="convlora", description="Inspect adapter files; merge them into state-dict files; "
        "convert them to and from PEFT folders; extract them from fine-tuned weights.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="show an adapter's layers, ranks, metadata and fingerprint")
    p.add_argument("adapter")
    p.set_defaults(func=_inspect)
    p = sub.add_parser("merge", help="merge an adapter into a state-dict file without model code")
    p.add_argument("--adapter", required=True)
    p.add_argument("--base", required=True,
                   help="state dict: .safetensors, or .pth/.pt/.bin/.ckpt (weights_only)")
    p.add_argument("--key", default=None,
                   help="checkpoint entry holding the weights (default: the first of params_ema, "
                        "params, state_dict, model)")
    p.add_argument("--out", required=True,
                   help="output file; its suffix picks the format: .safetensors or .pth/.pt/.bin")
    p.add_argument("--force", action="store_true", help="merge despite a fingerprint mismatch")
    p.set_defaults(func=_merge)
    p = sub.add_parser("convert", help="convert an adapter to a PEFT folder or a PEFT folder to an "
                       "adapter file (never overwrites its inputs, leaves no partial output)")
    p.add_argument("--to", required=True, choices=("peft", "convlora"))
    p.add_argument("--adapter", required=True,
                   help="the input: a convlora .safetensors file (--to peft) or a PEFT folder")
    p.add_argument("--out", required=True,
                   help="the output: a new (or empty) folder (--to peft) or a .safetensors file")
    p.add_argument("--base", default=None,
                   help="--to convlora only: the base model's state dict (.safetensors, or "
                        ".pth/.pt/.bin/.ckpt read with weights_only)")
    p.add_argument("--key", default=None, help="--to convlora only: checkpoint entry of --base")
    p.add_argument("--name", default="default", help="--to convlora only: adapter name in the file")
    p.set_defaults(func=_convert)
    p = sub.add_parser("extract", help="extract an adapter from a base and a fine-tuned state dict "
                                       "(truncated SVD of the weight difference)")
    p.add_argument("--base", required=True, help="base state dict (.safetensors or .pth/.pt/.bin/.ckpt)")
    p.add_argument("--tuned", required=True, help="fine-tuned state dict of the same architecture")
    p.add_argument("--out", required=True, help="adapter file to write (.safetensors); never an input")
    p.add_argument("--rank", type=int, default=None, help="rank of every adapter (default: full rank)")
    p.add_argument("--energy", type=float, default=None,
                   help="instead, per layer the smallest rank keeping this fraction of ||dW||^2")
    p.add_argument("--rank-pattern", type=_rank_pattern, action="append", metavar="PATTERN=RANK,...",
                   help="per-layer ranks, e.g. 'conv_2=8,upsampler.0=8' (first matching glob wins)")
    p.add_argument("--factorization", choices=FACTORIZATIONS, default="kernel")
    p.add_argument("--targets", nargs="+", default=None,
                   help="glob patterns of layers to adapt (default: every conv weight that differs)")
    p.add_argument("--exclude", nargs="+", default=None, help="glob patterns of layers to leave out")
    p.add_argument("--store-biases", action="store_true", help="carry the changed biases in the adapter")
    p.add_argument("--tol", type=float, default=None,
                   help="relative tolerance of the exactness check (default: 10 eps of the dtype)")
    p.add_argument("--require-exact", action="store_true",
                   help="fail (and write nothing) unless base + adapter reproduces the tuned weights")
    p.add_argument("--name", default="default", help="adapter name stored in the file")
    p.add_argument("--key", default=None, help="checkpoint entry holding the weights, for both files")
    p.set_defaults(func=_extract)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (ConvLoRAError, OSError, ValueError) as err:
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"convlora {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
