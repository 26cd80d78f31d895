"""What a DSCLoRA run saves to resume and to reproduce: checkpoints (atomic), provenance, exports.

Checkpoints hold only tensors and plain containers (``torch.load(..., weights_only=True)``
reads them): the trainable parameters, optimizer and scheduler state, RNG states, the step,
the EMA and the best validation adapter. They are written to a temporary file in the run folder
and renamed over ``checkpoint.pt``, so an interrupted write never leaves a broken checkpoint.
Logs and pictures (``MetricsLog``, ``plot_curves``, ...) are in :mod:`examples.span_sr.run_report`
and re-exported here.
"""

from __future__ import annotations

import copy
import hashlib
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from examples.span_sr.run_report import (
    MetricsLog,
    comparison_strip,
    dump_json,
    plot_curves,
    write_png,
)

__all__ = [
    "MetricsLog",
    "comparison_strip",
    "dump_json",
    "export_merged",
    "file_sha256",
    "load_checkpoint",
    "prepare_run_dir",
    "provenance",
    "restore_rng",
    "rng_state",
    "save_checkpoint",
    "trainable_state",
    "load_trainable_state",
    "plot_curves",
    "write_png",
]


def _atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


RUN_MARKERS = ("checkpoint.pt", "adapter.safetensors", "metrics.jsonl")
"""Files whose presence means a folder already holds a training run."""


def prepare_run_dir(run: Path, resume: object, say: Any = print) -> None:
    """Create the run folder; say so when a fresh run is about to overwrite an earlier one there.

    Args:
        run: The run folder (``--out``).
        resume: Truthy when the run continues the one in ``run`` (nothing is overwritten then).
        say: Where the warning goes (``print`` on rank 0).
    """
    found = [name for name in RUN_MARKERS if (run / name).exists()]
    if found and not resume:
        say(f"note: {run} already holds a run ({', '.join(found)}); this fresh run replaces its files. "
            f"Pass --out NEW_FOLDER to keep it, or --resume {run} to continue it.")
    run.mkdir(parents=True, exist_ok=True)


def rng_state() -> dict[str, Any]:
    """Torch CPU and CUDA generator states (the data pipeline needs none: it is seeded by index)."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached CPU copies of the parameters that require grad, by qualified name."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state`` (from :func:`trainable_state`) into ``model``; the key sets must match."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(state):
        raise ValueError(f"checkpoint parameters do not match the model: missing {sorted(set(params) - set(state))[:5]}, "
                         f"unexpected {sorted(set(state) - set(params))[:5]}; was it written with another LoRA config?")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name])


def save_checkpoint(path: str | Path, **state: Any) -> None:
    """Atomically ``torch.save`` ``state`` (tensors and plain containers only) to ``path``."""
    _atomic_torch_save(state, Path(path))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``.

    Raises:
        FileNotFoundError: no checkpoint there (nothing to resume).
        ValueError: the file is not a readable checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}; --resume needs a run folder with checkpoint.pt.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt files
        raise ValueError(f"cannot read checkpoint {str(path)!r}: {err}") from err


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _list_hash(refs: Iterable[str]) -> str:
    lines = []
    for ref in refs:
        size = os.path.getsize(ref) if os.path.isfile(ref) else 0
        lines.append(f"{Path(ref).name}\t{size}")
    return hashlib.sha256("\n".join(sorted(lines)).encode()).hexdigest()


def provenance(*, seed: int, data: Mapping[str, list[str]], weights: Mapping[str, str],
               extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Versions, git commit, seed, hashes of the data lists (names + sizes) and weight files."""
    import convlora

    repo = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                                timeout=10).stdout.strip() or "unknown"
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "unknown", False
    return {
        "torch": torch.__version__, "convlora": convlora.__version__, "numpy": np.__version__,
        "python": platform.python_version(), "platform": platform.platform(),
        "git_commit": commit, "git_dirty": dirty, "seed": seed, "argv": sys.argv,
        "data": {k: {"images": len(v), "sha256": _list_hash(v)} for k, v in data.items()},
        "weights": {k: {"path": v, "sha256": file_sha256(v)} for k, v in weights.items() if v and os.path.isfile(v)},
        **(dict(extra) if extra else {}),
    }


def export_merged(student: nn.Module, out_dir: Path) -> nn.Module:
    """Merge and unload a copy of ``student``; write ``merged.safetensors`` and ``merged.pth``.

    The result is the plain deploy SPAN with the official key layout (``torch.save`` of a dict of
    plain tensors), loadable by ``evaluate.py``/``upscale.py`` and the official code.
    """
    import convlora

    plain = convlora.unload(copy.deepcopy(student).cpu().float(), merge=True)
    state = {k: v.detach().contiguous().clone() for k, v in plain.state_dict().items()}
    try:
        from safetensors.torch import save_file
    except ImportError:
        print("safetensors is not installed: merged.safetensors skipped (merged.pth written)")
    else:
        save_file(state, str(out_dir / "merged.safetensors"))
    _atomic_torch_save(state, out_dir / "merged.pth")
    return plain
