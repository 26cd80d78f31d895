"""The example tools and the ``convlora`` subcommands never lose data (issue 14, section 1):
no output over an input, no two inputs onto one output name, the count printed is what was
written, a missing LR image is an error unless asked for, an empty input is an error, and files
follow the umask."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

import convlora
from convlora.cli import main as cli_main
from examples.restoration import restore
from examples.restoration.model import build_model, save_model
from examples.span_sr import efficiency, evaluate, upscale
from examples.span_sr.arch import SPAN
from examples.span_sr.checkpoint import save_checkpoint, write_atomically
from examples.span_sr.images import save_packed, write_image
from examples.span_sr.outputs import folder_outputs, follow_umask, stopped

pytestmark = pytest.mark.usefixtures("one_thread")


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _images(folder: Path, names: list[str], size: int = 12, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for name in names:
        write_image(folder / name, rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


@pytest.fixture
def span_weights(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "w.pth"
    torch.save(SPAN(feature_channels=8).state_dict(), path)
    return path


@pytest.fixture
def restoration_weights(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    return save_model(build_model(channels=4, depth=3), tmp_path / "base.safetensors")


def test_upscale_refuses_the_input_folder_as_output(tmp_path: Path, span_weights: Path) -> None:
    src = tmp_path / "lr"
    _images(src, ["a.png", "b.png"])
    before = _snapshot(src)
    for output in (src, tmp_path / "link"):
        if output.name == "link":
            output.symlink_to(src, target_is_directory=True)
        with pytest.raises(SystemExit, match="is the folder of the input"):
            upscale.main(["--weights", str(span_weights), "--input", str(src), "--output", str(output)])
    with pytest.raises(SystemExit, match="is the folder of the input"):  # one file, its own folder
        upscale.main(["--weights", str(span_weights), "--input", str(src / "a.png"), "--output", str(src)])
    assert _snapshot(src) == before


def test_upscale_refuses_two_inputs_with_one_name_and_counts_what_it_wrote(tmp_path: Path, span_weights: Path,
                                                                          capsys) -> None:
    src = tmp_path / "lr"
    _images(src, ["a.png", "a.jpg", "b.png"])
    with pytest.raises(SystemExit, match=r"a\.jpg.*a\.png.*both be written as a\.png"):
        upscale.main(["--weights", str(span_weights), "--input", str(src), "--output", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()  # refused before anything was written
    (src / "a.jpg").unlink()
    assert upscale.main(["--weights", str(span_weights), "--input", str(src), "--output", str(tmp_path / "out")]) == 0
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["a.png", "b.png"]
    assert f"wrote {len(written)} image(s)" in capsys.readouterr().out


def test_restore_refuses_its_input_as_output_and_an_empty_folder(tmp_path: Path, restoration_weights: Path) -> None:
    src = tmp_path / "in"
    _images(src, ["a.png", "b.png"], size=16)
    before = _snapshot(src)
    w = str(restoration_weights)
    with pytest.raises(ValueError, match="is the folder of the input"):
        restore.main(["--weights", w, "--input", str(src), "--output", str(src)])
    with pytest.raises(ValueError, match="would overwrite the input"):
        restore.main(["--weights", w, "--input", str(src / "a.png"), "--output", str(src / "a.png")])
    os.link(src / "a.png", tmp_path / "hard.png")  # a hard link is the same file
    with pytest.raises(ValueError, match="would overwrite the input"):
        restore.main(["--weights", w, "--input", str(src / "a.png"), "--output", str(tmp_path / "hard.png")])
    _images(tmp_path, ["x_degraded.png"], size=16)
    with pytest.raises(ValueError, match="would overwrite the input"):  # --simulate's degraded copy too
        restore.main(["--weights", w, "--simulate", "noise50", "--input", str(tmp_path / "x_degraded.png"),
                      "--output", str(tmp_path / "x.png")])
    assert _snapshot(src) == before
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        restore.main(["--weights", w, "--input", str(tmp_path / "empty"), "--output", str(tmp_path / "out")])
    _images(tmp_path / "two", ["x.png", "x.bmp"], size=16)
    with pytest.raises(ValueError, match="both be written as x.png"):
        restore.main(["--weights", w, "--input", str(tmp_path / "two"), "--output", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
    written = restore.main(["--weights", w, "--input", str(src), "--output", str(tmp_path / "out")])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in written) == ["a.png", "b.png"]


def _adapter_pair(tmp_path: Path) -> tuple[Path, Path]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 3, 3))
    base = convlora.save_state_dict(model.state_dict(), tmp_path / "base.safetensors")
    convlora.inject(model, convlora.LoRAConfig(rank=2))
    adapter = tmp_path / "adapter.safetensors"
    convlora.save_adapter(model, adapter)
    return base, adapter


def test_convlora_subcommands_refuse_an_input_as_output(tmp_path: Path, capsys) -> None:
    base, adapter = _adapter_pair(tmp_path)
    os.link(adapter, tmp_path / "hard.safetensors")
    files = {p: p.read_bytes() for p in (base, adapter)}
    for out in (adapter, base, tmp_path / "hard.safetensors"):
        rc = cli_main(["merge", "--adapter", str(adapter), "--base", str(base), "--out", str(out)])
        assert rc == 2
        assert "input" in capsys.readouterr().err
    assert cli_main(["convert", "--to", "peft", "--adapter", str(adapter), "--out", str(adapter)]) == 2
    assert {p: p.read_bytes() for p in (base, adapter)} == files
    assert cli_main(["merge", "--adapter", str(adapter), "--base", str(base), "--out", str(tmp_path / "m.pth")]) == 0


def test_evaluate_refuses_a_missing_lr_image_unless_asked(tmp_path: Path, span_weights: Path) -> None:
    data = tmp_path / "Set"
    _images(data / "HR", ["a.png", "b.png"], size=48)
    _images(data / "LR_bicubic" / "X4", ["ax4.png"], size=12, seed=1)
    args = ["--weights", str(span_weights), "--data", str(data), "--json", str(tmp_path / "r.json")]
    with pytest.raises(SystemExit, match=r"have no LR image.*b\.png.*--bicubic-fallback"):
        evaluate.main(args)
    assert not (tmp_path / "r.json").exists()
    assert evaluate.main([*args, "--bicubic-fallback"]) == 0
    result = json.loads((tmp_path / "r.json").read_text())["sets"]["Set"]
    assert result["bicubic_lr"] == ["b"] and "1 of 2 made with matlab_bicubic(HR)" in result["lr_source"]
    with pytest.raises(SystemExit, match="would overwrite the input"):
        evaluate.main(["--weights", str(span_weights), "--data", str(data), "--json", str(span_weights)])


def test_folder_outputs_rules(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no input images"):
        folder_outputs([], tmp_path)
    (tmp_path / "in").mkdir()
    save_packed(tmp_path / "in" / "p.u8.xz", np.zeros((4, 4, 3), np.uint8))
    _images(tmp_path / "in", ["p.png", "q.png"], size=4)
    with pytest.raises(ValueError, match=r"p\.u8\.xz.*both be written as p\.png|p\.png.*both be written as p\.png"):
        folder_outputs(sorted((tmp_path / "in").iterdir()), tmp_path / "out")
    assert folder_outputs([tmp_path / "in" / "q.png"], tmp_path / "out") == [tmp_path / "out" / "q.png"]


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield 0o640
    os.umask(old)


def test_example_writes_follow_the_umask(tmp_path: Path, umask_027: int) -> None:
    save_checkpoint(tmp_path / "checkpoint.pt", step=1)
    write_atomically(tmp_path / "x.bin", lambda tmp: Path(tmp).write_bytes(b"x"))
    save_model(build_model(channels=4, depth=3), tmp_path / "base.safetensors")
    model = build_model(channels=4, depth=3)
    convlora.inject(model, convlora.LoRAConfig(rank=1))
    convlora.save_adapter(model, tmp_path / "adapter.safetensors")
    for name in ("checkpoint.pt", "x.bin", "base.safetensors", "adapter.safetensors"):
        assert (tmp_path / name).stat().st_mode & 0o777 == umask_027, name


def test_efficiency_json_never_overwrites_the_weights(span_weights: Path) -> None:
    before = span_weights.read_bytes()
    with pytest.raises(SystemExit, match="would overwrite the input"):
        efficiency.main(["--weights", str(span_weights), "--json", str(span_weights), "--no-runtime"])
    assert span_weights.read_bytes() == before


def test_an_interrupted_image_write_leaves_no_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys) -> None:
    from PIL import Image

    def partial(self: Image.Image, fp: str, *args: object, **kwargs: object) -> None:
        Path(fp).write_bytes(b"\x89PNG half an image")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", partial)
    with pytest.raises(KeyboardInterrupt):
        write_image(tmp_path / "a.png", np.zeros((4, 4, 3), np.uint8))
    assert list(tmp_path.iterdir()) == []  # no half-written a.png, no temporary file
    assert stopped("upscale.py") == 130
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_follow_umask_gives_the_umask_mode_without_touching_the_umask(tmp_path, monkeypatch):
    f = tmp_path / "out.safetensors"
    f.write_bytes(b"x")
    os.chmod(f, 0o600)
    old = os.umask(0o027)
    try:
        def no_umask(_mask: int) -> int:
            raise AssertionError("follow_umask must not change the process umask")
        monkeypatch.setattr(os, "umask", no_umask)
        follow_umask(f)
    finally:
        monkeypatch.undo()
        os.umask(old)
    assert stat.S_IMODE(f.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"], "the probe file is left behind"
