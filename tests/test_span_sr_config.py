"""Config files and command-line overrides of the DSCLoRA example (examples/span_sr/config.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from examples.span_sr.config import (
    Config,
    apply_overrides,
    dump_yaml,
    load_config,
    parse_args,
    split_options,
)

CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "span_sr" / "configs"


@pytest.mark.parametrize("name", ["demo.yaml", "dsclora_x4.yaml"])
def test_shipped_configs_load(name: str) -> None:
    cfg = load_config(CONFIGS / name)
    assert cfg.data.scale == 4 and cfg.loss.taps[-1] == "conv_2"


def test_dsclora_recipe_defaults() -> None:
    """The recipe the #16 sweep selected: CRAFT as the cached teacher, rank 8, MSE."""
    cfg = load_config(CONFIGS / "dsclora_x4.yaml")
    assert (cfg.model.base, cfg.model.teacher, cfg.model.teacher_ensemble) == ("span_tiny_ch26", "craft_x4", 1)
    assert cfg.teacher_cache.enabled and cfg.loss.w_aff == 0 and cfg.loss.pixel == "mse"
    assert cfg.model.lora == "configs/dsclora_lora_r8.yaml"
    # selection on held-out training images, never on a test set
    assert len(cfg.data.val) == 24 and len(set(cfg.data.val)) == 24
    assert all(Path(v).parent.name in {"BSD200", "T91", "General100_half"} for v in cfg.data.val)
    assert [Path(t).name for t in cfg.data.test] == ["Set5", "Set14", "B100"]


def test_overrides_typed_lists_aliases_and_none() -> None:
    path, resume, over = parse_args(["--config", "c.yaml", "--data.train", "a", "b", "--teacher", "X",
                                     "--train.steps=100", "--train.weight_decay", "-1e-4", "--train.compile",
                                     "--data.test", "none"])
    assert (path, resume) == ("c.yaml", None)
    assert over["train.weight_decay"] == "-1e-4"  # a negative number is a value, not an option
    with pytest.raises(ValueError, match="'train.weight_decay': '-1e-4' is out of range; give a finite number >= 0"):
        load_config(None, over)
    over["train.weight_decay"] = "1e-4"
    cfg = load_config(None, over)
    assert cfg.data.train == ["a", "b"] and cfg.model.teacher == "X"
    assert cfg.train.steps == 100 and cfg.train.weight_decay == 1e-4 and cfg.train.compile is True
    assert cfg.data.test == []
    assert load_config(None, {"data.train": "only"}).data.train == ["only"]


def test_resume_flag() -> None:
    assert parse_args(["--resume", "runs/x", "--steps", "5"]) == (None, "runs/x", {"steps": "5"})


@pytest.mark.parametrize("over, match", [
    ({"train.stepz": "1"}, "unknown option --train.stepz"),
    ({"train.steps": "ten"}, "not a valid int"),
    ({"train.steps": "1.5"}, "not a valid int"),
    ({"train.amp": "maybe"}, "not a valid bool"),
    ({"lr": "1e-3"}, "ambiguous; write one of --demo.lr, --train.lr"),
    ({"train.schedule": "linear"}, "not one of"),
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


def test_dump_round_trips(tmp_path: Path) -> None:
    cfg = load_config(None, {"data.train": ["x y/a:b", "skimage:astronaut"], "model.teacher": "true",
                             "loss.taps": ["block_1"], "train.lr": "3e-5", "out": "runs/a #1"})
    text = dump_yaml(cfg.to_dict())
    assert yaml.safe_load(text) == cfg.to_dict()
    path = tmp_path / "config.yaml"
    path.write_text(text)
    assert load_config(path) == cfg
    assert Config() == load_config(None)


def test_a_bad_override_changes_nothing() -> None:
    cfg = load_config(None)
    with pytest.raises(ValueError, match="not a valid int"):
        apply_overrides(cfg, {"train.lr": "1e-3", "train.steps": "ten"})
    assert cfg == Config()


def test_the_same_dialect_sets_a_dict_config() -> None:
    """examples/restoration keeps its config as nested dicts: values read as YAML scalars, lists stay lists."""
    cfg = {"seed": 0, "tasks": ["noise50"], "train": {"patch": 40, "blur_crop": False},
           "base": {"steps": 300}, "adapter": {"steps": 100, "lr": 0.01, "alpha": None}}
    apply_overrides(cfg, split_options(["--tasks", "deblur_motion", "--train.blur_crop", "--patch=96",
                                        "--adapter.lr", "1e-3", "--adapter.alpha", "2"]))
    assert cfg["tasks"] == ["deblur_motion"] and cfg["train"] == {"patch": 96, "blur_crop": True}
    assert cfg["adapter"] == {"steps": 100, "lr": 1e-3, "alpha": 2}
    with pytest.raises(ValueError, match="ambiguous; write one of --adapter.steps, --base.steps"):
        apply_overrides(cfg, {"steps": "5"})
    with pytest.raises(ValueError, match="unknown option --train.nope"):
        apply_overrides(cfg, {"train.nope": "1"})
    assert cfg["base"]["steps"] == 300


def test_teacher_only_keys_are_off_by_default_and_typed() -> None:
    cfg = load_config(CONFIGS / "dsclora_x4.yaml")
    assert cfg.data.teacher_only == [] and cfg.data.teacher_only_share == 0.0
    cfg = load_config(None, {"data.teacher_only": ["a/jpegs", "b"], "teacher_only_share": "0.25"})
    assert cfg.data.teacher_only == ["a/jpegs", "b"] and cfg.data.teacher_only_share == 0.25
    assert load_config(None, {"data.teacher_only": "none"}).data.teacher_only == []
    for value, match in (("1.5", "out of range; give a finite number >= 0 and <= 1"), ("-0.1", "out of range"),
                         ("half", "not a valid float"), ("nan", "not a finite number")):
        with pytest.raises(ValueError, match=rf"'data.teacher_only_share': .*{match}"):
            load_config(None, {"data.teacher_only_share": value})
