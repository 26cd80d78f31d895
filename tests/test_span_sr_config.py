"""Config files and command-line overrides of the DSCLoRA example (examples/span_sr/config.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from examples.span_sr.config import Config, dump_yaml, load_config, parse_args
from examples.span_sr.yaml_io import parse_yaml_subset

CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "span_sr" / "configs"


@pytest.mark.parametrize("name", ["demo.yaml", "dsclora_x4.yaml"])
def test_shipped_configs_load_and_both_readers_agree(name: str) -> None:
    cfg = load_config(CONFIGS / name)
    text = (CONFIGS / name).read_text()
    assert parse_yaml_subset(text, name) == yaml.safe_load(text)
    assert cfg.data.scale == 4 and cfg.loss.taps[-1] == "conv_2"


def test_dsclora_recipe_defaults() -> None:
    cfg = load_config(CONFIGS / "dsclora_x4.yaml")
    assert (cfg.model.base, cfg.model.teacher) == ("span_tiny_ch26", "span_ch28")
    assert cfg.data.val == [] and cfg.data.val_holdout > 0  # selection on held-out training images
    assert [Path(t).name for t in cfg.data.test] == ["Set5", "Set14", "B100"]
    assert (cfg.loss.w_rec, cfg.loss.w_out, cfg.train.lr) == (0.2, 0.8, 5e-5)


def test_overrides_typed_lists_aliases_and_none() -> None:
    path, resume, over = parse_args(["--config", "c.yaml", "--data.train", "a", "b", "--teacher", "X",
                                     "--train.steps=100", "--train.lr", "-1e-4", "--train.compile",
                                     "--data.test", "none"])
    assert (path, resume) == ("c.yaml", None)
    cfg = load_config(None, over)
    assert cfg.data.train == ["a", "b"] and cfg.model.teacher == "X"
    assert cfg.train.steps == 100 and cfg.train.lr == -1e-4 and cfg.train.compile is True
    assert cfg.data.test == []
    assert load_config(None, {"data.train": "only"}).data.train == ["only"]


def test_resume_flag() -> None:
    assert parse_args(["--resume", "runs/x", "--steps", "5"]) == (None, "runs/x", {"steps": "5"})


@pytest.mark.parametrize("over, match", [
    ({"train.stepz": "1"}, "unknown option --train.stepz"),
    ({"train.steps": "ten"}, "not a valid int"),
    ({"train.steps": "1.5"}, "not a valid int"),
    ({"train.amp": "maybe"}, "not a valid bool"),
])
def test_bad_overrides_are_explained(over: dict[str, str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        load_config(None, over)


def test_bad_file_and_arguments(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  nonsense: 3\n")
    with pytest.raises(ValueError, match="unknown config key 'train.nonsense'"):
        load_config(bad)
    bad.write_text("data: 3\n")
    with pytest.raises(ValueError, match="'data' is a section"):
        load_config(bad)
    with pytest.raises(ValueError, match="unexpected argument"):
        parse_args(["positional"])


def test_dump_round_trips_through_both_readers(tmp_path: Path) -> None:
    cfg = load_config(None, {"data.train": ["x y/a:b", "skimage:astronaut"], "model.teacher": "true",
                             "loss.taps": ["block_1"], "train.lr": "3e-5", "out": "runs/a #1"})
    text = dump_yaml(cfg.to_dict())
    assert yaml.safe_load(text) == cfg.to_dict() == parse_yaml_subset(text, "dump")
    path = tmp_path / "config.yaml"
    path.write_text(text)
    assert load_config(path) == cfg
    assert Config() == load_config(None)
