"""docs/quickstart.py (included into docs/quickstart.md) runs and does what its comments say."""

from __future__ import annotations

import re
import runpy

import torch
from conftest import REPO
from safetensors.torch import load_file

from convlora.cli import main


def test_quickstart_script(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    ns = runpy.run_path(str(REPO / "docs" / "quickstart.py"), run_name="__main__")
    printed = capsys.readouterr().out
    out = tmp_path / "runs" / "quickstart"
    assert sorted(p.name for p in out.iterdir()) == ["base.safetensors", "deploy.safetensors",
                                                      "task.safetensors"]
    first, last = (float(v) for v in re.findall(r"L1 ([0-9.]+)", printed))
    assert last < first  # the adapters trained
    base = ns["make_base"]()
    base.load_state_dict(load_file(out / "base.safetensors"))
    with torch.no_grad():
        assert not torch.allclose(base(ns["x"]), ns["y_adapted"])  # and changed the output
    # the page's command-line merge gives the weights the script deployed, bit for bit
    merged_path = out / "merged.safetensors"
    assert main(["merge", "--adapter", str(out / "task.safetensors"), "--base",
                 str(out / "base.safetensors"), "--out", str(merged_path)]) == 0
    merged, deployed = load_file(merged_path), load_file(out / "deploy.safetensors")
    assert merged.keys() == deployed.keys()
    assert all(torch.equal(merged[k], deployed[k]) for k in merged)
