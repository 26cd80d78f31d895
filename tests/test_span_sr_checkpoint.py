"""The run folder: earlier runs are recognised, checkpoints are atomic and carry their layout."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from examples.span_sr.checkpoint import LAYOUT, earlier_run, load_checkpoint, save_checkpoint


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
