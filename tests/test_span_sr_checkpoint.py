"""Run folders: a fresh run over an earlier one says so; resuming does not."""

from __future__ import annotations

from pathlib import Path

from examples.span_sr.checkpoint import prepare_run_dir


def test_fresh_run_over_an_earlier_one_is_announced(tmp_path: Path) -> None:
    said: list[str] = []
    run = tmp_path / "a" / "run"
    prepare_run_dir(run, None, said.append)
    assert run.is_dir() and said == []  # new folder: nothing to say
    (run / "unrelated.txt").write_text("x")
    prepare_run_dir(run, None, said.append)
    assert said == []  # no run files there
    (run / "adapter.safetensors").write_bytes(b"")
    (run / "checkpoint.pt").write_bytes(b"")
    prepare_run_dir(run, None, said.append)
    assert len(said) == 1 and "checkpoint.pt, adapter.safetensors" in said[0]
    assert "--resume" in said[0] and "--out" in said[0]
    prepare_run_dir(run, str(run), said.append)
    assert len(said) == 1  # resuming continues the run: no warning
    assert (run / "unrelated.txt").read_text() == "x"  # nothing is deleted
