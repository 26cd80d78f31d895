"""The run folder of a DSCLoRA run: resume state (atomic), provenance, and its checks.

A checkpoint holds only tensors and plain containers (``torch.load(..., weights_only=True)``
reads it): the step, the trainable parameters, the optimizer, scheduler and RNG states, the
state of the EMA model (``torch.optim.swa_utils.AveragedModel``) when EMA is on, and the best
validation adapter. It is written to a temporary file in the run folder and renamed over
``checkpoint.pt``, so an interrupted write never leaves a broken checkpoint. ``layout`` names
the shape of this state; a folder written by an earlier layout of the example is refused with a
one-line message rather than resumed wrongly. The JSON files (``provenance.json``,
``results.json``, and the other tools' and benchmarks' JSON results) are written the same way,
by :func:`write_json`.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import convlora
from examples.span_sr.outputs import follow_umask

__all__ = [
    "LAYOUT",
    "RUN_MARKERS",
    "earlier_run",
    "file_sha256",
    "load_checkpoint",
    "load_trainable_state",
    "provenance",
    "restore_rng",
    "rng_state",
    "save_checkpoint",
    "trainable_state",
    "write_atomically",
    "write_json",
]

LAYOUT = 2
"""Version of the checkpoint's content (1: the layout before the redesign, which had no ``layout`` key)."""

RUN_MARKERS = ("checkpoint.pt", "adapter.safetensors", "metrics.jsonl")
"""Files whose presence means a folder already holds a training run."""


def write_atomically(path: str | Path, write: Callable[[str], object]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it over ``path``.

    The file gets the mode the umask gives a new file (``mkstemp`` alone leaves ``0o600``).
    convlora has a helper like it for its own files, but it is private: the examples use
    convlora's public API only, so every example file goes through this one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        follow_umask(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON (values JSON lacks as their ``str``), atomically.

    The text is made first and written by :func:`write_atomically`: readers see the previous
    file or the new one, and a failed or interrupted write leaves the previous file as it was.
    """
    text = json.dumps(obj, indent=2, default=str) + "\n"
    write_atomically(path, lambda tmp: Path(tmp).write_text(text))


def earlier_run(run: Path) -> list[str]:
    """The :data:`RUN_MARKERS` files already in ``run`` (a fresh run there replaces them)."""
    return [name for name in RUN_MARKERS if (run / name).exists()]


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
    """Atomically ``torch.save`` ``state`` (tensors and plain containers only) with the current :data:`LAYOUT`."""
    write_atomically(path, lambda tmp: torch.save({"layout": LAYOUT, **state}, tmp))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``.

    Raises:
        FileNotFoundError: no checkpoint there (nothing to resume).
        ValueError: the file is not a readable checkpoint, or an earlier layout wrote it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}; --resume needs a run folder with checkpoint.pt.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt files
        raise ValueError(f"cannot read checkpoint {str(path)!r}: {err}") from err
    if not isinstance(state, dict) or state.get("layout") != LAYOUT:
        raise ValueError(f"{path.parent} was made by an older layout of examples/span_sr (checkpoint layout "
                         f"{state.get('layout', 1) if isinstance(state, dict) else '?'}, this code reads {LAYOUT}); "
                         "it cannot be resumed here: start a new run with --out NEW_FOLDER, or resume it at the "
                         "git_commit named in its provenance.json.")
    return state


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
