"""The ``convlora`` command line: inspect, and state-dict-level merge without model code."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

import convlora
from convlora.cli import main
from tests._core_helpers import randomize_adapters


def _setup(tmp_path: Path) -> tuple[nn.Module, nn.Module, Path]:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 12, 3, padding=1))
    model = copy.deepcopy(base)
    convlora.inject(model, rank=2, factorization="loralib", targets="0")
    convlora.inject(model, rank=3, targets="2", adapter_name="default2")
    delete = "default2"
    convlora.delete_adapter(model, delete)
    randomize_adapters(model)
    meta = {"who": "test", "config": {"lr": 0.001, "steps": 5, "data": {"crop": 64}}}
    return base, model, convlora.save_adapter(model, tmp_path / "a.safetensors", metadata=meta)


def test_inspect(tmp_path: Path, capsys) -> None:
    _, _, path = _setup(tmp_path)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "loralib" in out and "8x3x3x3" in out and "bias mode      none" in out
    _, meta = convlora.read_adapter(path)
    assert meta["base_fingerprint"] in out
    lines = out.splitlines()
    start = lines.index("metadata")  # the user metadata as indented JSON, one entry a line
    block = "\n".join(lines[start + 1:lines.index("", start)])
    assert json.loads(block) == meta["user"] and '    "lr": 0.001,' in block


def test_merge_equals_model_level_unload_and_writes_the_suffix_format(tmp_path: Path) -> None:
    base, model, path = _setup(tmp_path)
    save_file(base.state_dict(), str(tmp_path / "base.safetensors"))
    torch.save({"params_ema": base.state_dict()}, tmp_path / "base.pth")
    expected = convlora.unload(copy.deepcopy(model)).state_dict()
    for src in ("base.safetensors", "base.pth"):
        for suffix in (".safetensors", ".pth"):
            out = tmp_path / f"merged_{src}{suffix}"
            assert main(["merge", "--adapter", str(path), "--base", str(tmp_path / src), "--out", str(out)]) == 0
            merged = load_file(str(out)) if suffix == ".safetensors" else torch.load(out, weights_only=True)
            assert set(merged) == set(expected)
            for k in expected:
                assert torch.equal(merged[k], expected[k]), k


def test_merge_refuses_an_unknown_suffix_and_bad_files_in_one_line(tmp_path: Path, capsys) -> None:
    base, _, path = _setup(tmp_path)
    save_file(base.state_dict(), str(tmp_path / "base.safetensors"))
    args = ["merge", "--adapter", str(path), "--base", str(tmp_path / "base.safetensors")]
    assert main([*args, "--out", str(tmp_path / "merged.onnx")]) == 2
    err = capsys.readouterr().err
    assert "unknown state-dict suffix '.onnx'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "merged.onnx").exists()
    (tmp_path / "junk.pth").write_bytes(b"junk")
    for bad in (["--base", str(tmp_path / "junk.pth")], ["--base", str(tmp_path)],
                ["--adapter", str(tmp_path / "base.safetensors")]):
        argv = [*args, "--out", str(tmp_path / "m.pth")]
        flag = argv.index(bad[0])
        argv[flag + 1] = bad[1]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("convlora merge: error: ") and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "m.pth").exists()


def test_merge_refuses_other_base_unless_forced(tmp_path: Path, capsys) -> None:
    base, _, path = _setup(tmp_path)
    other = {k: v + 1 for k, v in base.state_dict().items()}
    save_file(other, str(tmp_path / "other.safetensors"))
    args = ["merge", "--adapter", str(path), "--base", str(tmp_path / "other.safetensors"),
            "--out", str(tmp_path / "o.safetensors")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "trained on other base weights (fingerprint mismatch" in err and "--force" in err
    assert main([*args, "--force"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("convlora merge: warning: ") and "fingerprint mismatch" in err


def test_console_script_runs_as_module(tmp_path: Path) -> None:
    _, _, path = _setup(tmp_path)
    res = subprocess.run([sys.executable, "-m", "convlora.cli", "inspect", str(path)],
                         capture_output=True, text=True, check=False)
    assert res.returncode == 0 and "parameters" in res.stdout
    res = subprocess.run([sys.executable, "-m", "convlora.cli", "inspect", str(tmp_path / "nope")],
                         capture_output=True, text=True, check=False)
    assert res.returncode == 2 and "does not exist" in res.stderr


def test_merge_key_picks_the_checkpoint_entry(tmp_path: Path) -> None:
    base, model, path = _setup(tmp_path)
    other = {k: v + 1 for k, v in base.state_dict().items()}
    torch.save({"params": base.state_dict(), "params_ema": other}, tmp_path / "ckpt.pth")
    expected = convlora.unload(copy.deepcopy(model)).state_dict()
    out = tmp_path / "m.safetensors"
    args = ["merge", "--adapter", str(path), "--base", str(tmp_path / "ckpt.pth"), "--out", str(out)]
    assert main(args) == 2  # params_ema is the default entry, and it is another base
    assert main([*args, "--key", "params"]) == 0
    merged = load_file(str(out))
    assert set(merged) == set(expected) and all(torch.equal(merged[k], expected[k]) for k in expected)
