"""span_sr train.py (issue 14, section 2): the NaN stop names a checkpoint that exists, Ctrl-C
stops cleanly during the final export and evaluation, a ``rank_pattern`` key that matches no
layer is an error before the run folder exists. Reuses the tiny runs of test_span_sr_train."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest
import yaml
from test_span_sr_train import _args, _patch_distiller, tiny  # noqa: F401  (tiny is a fixture)

from examples.span_sr import dsclora, report, train
from examples.span_sr.arch import SPAN

REPO = Path(__file__).resolve().parents[1]


def test_nan_stop_without_a_checkpoint_says_so(tiny: dict[str, Path], tmp_path: Path,  # noqa: F811
                                               monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    _patch_distiller(monkeypatch, "nan")
    run = tmp_path / "nan"
    assert train.main(_args(tiny, run)) == 3  # ckpt_every 0: nothing was checkpointed before the NaN
    out = capsys.readouterr().out
    assert "no checkpoint was written yet" in out and not (run / "checkpoint.pt").exists()
    _patch_distiller(monkeypatch, "nan")
    run = tmp_path / "nan2"
    assert train.main(_args(tiny, run, "--train.ckpt_every", "2")) == 3
    out = capsys.readouterr().out
    assert f"checkpoint (step 2) is kept in {run / 'checkpoint.pt'}" in out and (run / "checkpoint.pt").is_file()


def test_ctrl_c_during_the_final_evaluation_stops_the_run(tiny: dict[str, Path], tmp_path: Path,  # noqa: F811
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    calls = []

    def interrupted_table(*args: object, **kwargs: object) -> str:
        calls.append(1)
        os.kill(os.getpid(), signal.SIGINT)  # the user presses Ctrl-C while the results are computed
        return "table"

    monkeypatch.setattr(report, "results_table", interrupted_table)
    before = signal.getsignal(signal.SIGINT)
    argv = _args(tiny, tmp_path / "run")
    monkeypatch.setattr("sys.argv", ["train.py", *argv])
    assert train.main() == 130  # the command line's path: a message and status 130, no traceback
    assert calls == [1]
    assert "interrupted" in capsys.readouterr().err
    assert not (tmp_path / "run" / "curves.png").exists()  # it stopped there, not at the end
    assert signal.getsignal(signal.SIGINT) == before


def test_rank_pattern_typo_is_an_error_before_the_run_folder(tiny: dict[str, Path], tmp_path: Path) -> None:  # noqa: F811
    lora = yaml.safe_load((REPO / "examples/span_sr/configs/dsclora_lora.yaml").read_text())
    base = SPAN(feature_channels=8).eval()
    good = dict(lora, rank_pattern={"conv_2*": 4})
    assert dsclora.build_student(base, good) is not None
    for key in ("rank_pattern", "alpha_pattern"):
        bad = dict(lora, **{key: {"conv_22": 4}})
        with pytest.raises(ValueError, match=f"{key} key 'conv_22' matches no adapted layer"):
            dsclora.build_student(base, bad)
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(dict(lora, rank_pattern={"blok_1*": 4})))
    with pytest.raises(ValueError, match="'blok_1\\*' matches no adapted layer"):
        train.main(_args(tiny, tmp_path / "run", "--model.lora", str(path)))
    assert not (tmp_path / "run").exists()


def test_a_fresh_run_never_overwrites_the_weights_it_reads(tiny: dict[str, Path], tmp_path: Path) -> None:  # noqa: F811
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(tiny["base"], run / "merged.pth")  # an earlier run's export, now the base of a new run there
    with pytest.raises(ValueError, match="would overwrite the input"):
        train.main(_args(tiny, run, "--base", str(run / "merged.pth")))
    assert (run / "merged.pth").read_bytes() == tiny["base"].read_bytes()
    assert sorted(p.name for p in run.iterdir()) == ["merged.pth"]
