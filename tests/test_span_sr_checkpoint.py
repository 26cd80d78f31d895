"""The run folder: earlier runs are recognised, checkpoints and JSON files are atomic, checkpoints carry their layout."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch

from examples.span_sr.checkpoint import (
    LAYOUT,
    earlier_run,
    load_checkpoint,
    save_checkpoint,
    write_json,
)
from examples.span_sr.report import MetricsLog


def test_earlier_run_names_the_run_files(tmp_path: Path) -> None:
    assert earlier_run(tmp_path / "absent") == []
    (tmp_path / "unrelated.txt").write_text("x")
    assert earlier_run(tmp_path) == []
    (tmp_path / "adapter.safetensors").write_bytes(b"")
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    assert earlier_run(tmp_path) == ["checkpoint.pt", "adapter.safetensors"]


def test_checkpoint_round_trip_and_older_layout_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "run" / "checkpoint.pt"
    save_checkpoint(path, step=3, params={"w": torch.ones(2)})
    state = load_checkpoint(path)
    assert state["layout"] == LAYOUT and state["step"] == 3 and torch.equal(state["params"]["w"], torch.ones(2))
    assert [p.name for p in path.parent.iterdir()] == ["checkpoint.pt"]  # no temporary file left
    torch.save({"step": 3, "params": {}, "ema": None}, path)  # what the layout before the redesign wrote
    with pytest.raises(ValueError, match="older layout of examples/span_sr.*--out NEW_FOLDER"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="--resume needs a run folder"):
        load_checkpoint(tmp_path / "nothing" / "checkpoint.pt")



def _disk_full(monkeypatch: pytest.MonkeyPatch) -> None:
    """From now on every ``Path.write_text`` writes half of its text, then fails as a full disk does."""
    write_text = Path.write_text

    def half_then_fail(self: Path, data: str, *args, **kwargs) -> int:
        write_text(self, data[: len(data) // 2], *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_text", half_then_fail)


def test_write_json_round_trips_and_a_failed_write_keeps_the_previous_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "results.json"
    write_json(path, {"y_psnr_db": {"Set5": 30.5}, "steps": 3, "run": tmp_path})
    before = path.read_bytes()
    assert json.loads(before) == {"y_psnr_db": {"Set5": 30.5}, "steps": 3, "run": str(tmp_path)}
    _disk_full(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        write_json(path, {"y_psnr_db": {"Set5": 31.0, "Set14": 28.0}, "steps": 6})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary file left


def test_metrics_log_resume_keeps_the_whole_log_when_the_rewrite_fails(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    for step in (1, 2, 3):
        log.write({"step": step, "loss": 1.0 / step})
    before = path.read_bytes()
    with monkeypatch.context() as patch:
        _disk_full(patch)
        with pytest.raises(OSError, match="No space left"):
            MetricsLog(path, truncate_after=2)  # a resume from step 2 rewrites the log without step 3
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]
    assert [r["step"] for r in MetricsLog(path, truncate_after=2).read()] == [1, 2]
