"""Atomic file writes: a temporary file next to the destination, then one rename.

Readers never see a half-written file, and a failed write leaves the destination as it was. The
written file gets mode ``0o666`` filtered by the process umask, exactly as ``open(path, "w")``
would give it (``mkstemp``, and safetensors' own writer, leave ``0o600``).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path

__all__ = ["write_atomically"]


def _create_temp(directory: Path, name: str) -> Path:
    for _ in range(100):
        tmp = directory / f".{name}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"could not create a temporary file next to {directory / name}.")


def write_atomically(path: str | os.PathLike[str], write: Callable[[str], None]) -> Path:
    """Call ``write(tmp)`` on a fresh temporary file beside ``path``, then rename it to ``path``.

    Args:
        path: The destination; missing parent folders are created.
        write: Writes the whole file at the path it is given (e.g. ``safetensors.torch.save_file``).

    Returns:
        ``path`` as a ``Path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temp(path.parent, path.name)
    try:
        mode = tmp.stat().st_mode & 0o777  # 0o666 & ~umask, read without touching the umask
        write(str(tmp))
        os.chmod(tmp, mode)  # writers that replace the file (safetensors) leave 0o600 behind
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
