"""Where the example tools write: never over an input, one output per input, files as the umask says.

Every example tool that writes files (``examples/span_sr``: ``upscale.py``, ``evaluate.py``,
``train.py``; ``examples/restoration``: ``train.py``, ``evaluate.py``, ``restore.py``) checks its
outputs here before any work starts:

* :func:`refuse_inputs` - an output that is one of the inputs (same path after resolving links,
  or the same file through a hard link) is an error;
* :func:`folder_outputs` - a folder output gets ``<stem><suffix>`` per input; the output folder
  must not be a folder an input lies in (the results would sit among, and possibly over, the
  inputs), and two inputs with one stem (``a.png`` and ``a.jpg``) are an error naming both:
  nothing is renamed silently;
* :func:`follow_umask` - a file written by a writer that ignores the umask (``tempfile.mkstemp``,
  safetensors' ``save_file``: mode ``0o600``) gets ``0o666`` filtered by the process umask, as
  ``open(path, "w")`` would give it;
* :func:`stopped` - the one line and the exit status (130) of a tool stopped by Ctrl-C.
"""

from __future__ import annotations

import os
import secrets
import stat
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = ["folder_outputs", "follow_umask", "refuse_inputs", "same_file", "stopped"]


def same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Whether ``a`` and ``b`` name one file: equal resolved paths, or one inode (hard links)."""
    pa, pb = Path(a), Path(b)
    if pa.resolve() == pb.resolve():
        return True
    try:
        return pa.exists() and pb.exists() and os.path.samefile(pa, pb)
    except OSError:
        return False


def refuse_inputs(outputs: Iterable[str | os.PathLike[str]], inputs: Iterable[str | os.PathLike[str] | None],
                  option: str = "--output") -> None:
    """Raise when any of ``outputs`` is one of ``inputs`` (``None`` inputs are skipped).

    Raises:
        ValueError: naming the option, the output and the input it would overwrite.
    """
    ins = [Path(p) for p in inputs if p is not None]
    for out in outputs:
        for src in ins:
            if same_file(out, src):
                raise ValueError(f"{option} {str(out)!r} would overwrite the input {str(src)!r}; "
                                 "write the output somewhere else.")


def folder_outputs(files: Sequence[str | os.PathLike[str]], folder: str | os.PathLike[str],
                   suffix: str = ".png", option: str = "--output") -> list[Path]:
    """The output path ``folder/<stem><suffix>`` of each input file, checked.

    Raises:
        ValueError: no inputs; ``folder`` holds one of the inputs (or is one); two inputs share a
            stem (both named); an output would be an input file.
    """
    paths = [Path(f) for f in files]
    if not paths:
        raise ValueError("no input images; give image files or a folder that holds some.")
    out = Path(folder)
    for p in paths:
        if same_file(p.parent, out) or same_file(p, out):
            raise ValueError(f"{option} {str(out)!r} is the folder of the input {str(p)!r}: the results would be "
                             "written among (and over) the inputs; give a new or another folder.")
    seen: dict[str, Path] = {}
    for p in paths:
        name = p.name[:-len(".u8.xz")] if p.name.lower().endswith(".u8.xz") else p.stem
        if name in seen:
            raise ValueError(f"inputs {str(seen[name])!r} and {str(p)!r} would both be written as "
                             f"{name}{suffix}; rename one of them or upscale them separately.")
        seen[name] = p
    dests = [out / f"{name}{suffix}" for name in seen]
    refuse_inputs(dests, paths, option)
    return dests


def follow_umask(path: str | os.PathLike[str]) -> None:
    """Give ``path`` the mode ``0o666 & ~umask`` (what ``open(path, "w")`` gives a new file).

    The mode is read off a probe file created beside ``path`` with ``0o666``, so the umask is never
    changed: setting it to 0 to read it, even briefly, would let a file another thread creates at
    that moment come out world-writable.
    """
    target = Path(path)
    probe = target.with_name(f".{target.name}.umask-{os.getpid()}-{secrets.token_hex(4)}")
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
    finally:
        os.close(fd)
        probe.unlink()
    os.chmod(target, mode)


def stopped(tool: str) -> int:
    """Print the one line of a tool stopped by Ctrl-C and return its exit status, 130."""
    print(f"{tool}: interrupted; the images and weights already written are complete (each is written to a "
          "temporary file, then renamed), the others were not written", file=sys.stderr)
    return 130
