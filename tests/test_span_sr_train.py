"""DSCLoRA training loop (examples/span_sr/train.py) on tiny CPU configs.

SPAN width 8 student / width 12 teacher with random weights, 8x8 LR patches cut from real photos
(scikit-image's astronaut and coffee), a handful of steps: exact resume, 2-process gloo DDP equal
to 1 process, NaN stop, signal stop, bad inputs, and the run folder's contents.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import convlora
from examples.span_sr import dsclora, train
from examples.span_sr.arch import SPAN, load_span
from examples.span_sr.checkpoint import load_checkpoint
from examples.span_sr.config import load_config
from tests._span_helpers import tiny_run_inputs

REPO = Path(__file__).resolve().parents[1]
STEPS = 6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Six 72x80 training crops and one validation crop of real photos, random tiny SPANs."""
    crops = [(slice(64 * i, 64 * i + 72), slice(100, 180)) for i in range(6)]
    torch.manual_seed(0)
    base, teacher = SPAN(feature_channels=8), SPAN(feature_channels=12)
    return tiny_run_inputs(tmp_path_factory.mktemp("tiny"), crops, (slice(100, 180), slice(200, 280)), base, teacher)


def _args(tiny: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["--config", str(REPO / "examples/span_sr/configs/demo.yaml"), "--out", str(out),
            "--data.train", str(tiny["train"]), "--data.val", str(tiny["val"]),
            "--data.cache_dir", str(tiny["root"] / "cache"), "--data.patch", "8", "--data.batch", "4",
            "--data.workers", "0", "--base", str(tiny["base"]), "--teacher", str(tiny["teacher"]),
            "--demo.enabled", "false", "--train.steps", str(STEPS), "--train.warmup", "2",
            "--train.lr", "1e-3", "--train.log_every", "1", "--train.val_every", "0",
            "--train.ckpt_every", "0", "--train.progress", "false", "--loss.w_aff", "0.05", "--loss.aff_norm", "false",
            "--train.ema", "0.5", "--train.threads", "1",
            *extra]


def _losses(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return convlora.read_adapter(run / "adapter.safetensors")[0]


@pytest.fixture(scope="module")
def reference(tiny: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted run, shared by the tests below."""
    run = tmp_path_factory.mktemp("ref") / "run"
    assert train.main(_args(tiny, run)) == 0
    return run


def test_run_folder_contents(reference: Path, tiny: dict[str, Path]) -> None:
    names = {p.name for p in reference.iterdir()}
    expected = {"config.yaml", "provenance.json", "metrics.jsonl", "checkpoint.pt", "adapter.safetensors",
                "merged.safetensors", "merged.pth", "results.json", "curves.png", "comparison.png"}
    assert expected <= names
    # merged.pth: plain SPAN with the official keys, equal to base + adapter.
    merged_state = torch.load(reference / "merged.pth", map_location="cpu", weights_only=True)
    base_state = torch.load(tiny["base"], weights_only=True)
    assert set(merged_state) == set(base_state)
    assert any(not torch.equal(merged_state[k], base_state[k]) for k in base_state)
    merged = load_span(reference / "merged.pth")
    adapted = load_span(tiny["base"])
    convlora.load_adapter(adapted, reference / "adapter.safetensors")
    x = torch.rand(1, 3, 12, 10)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), adapted(x), atol=1e-5, rtol=1e-5)
    # the resolved config round-trips, provenance names versions and hashes
    cfg = load_config(reference / "config.yaml")
    assert cfg.train.steps == STEPS and cfg.model.base == str(tiny["base"])
    prov = json.loads((reference / "provenance.json").read_text())
    assert prov["torch"] == torch.__version__ and prov["seed"] == 0
    assert len(prov["weights"]["base"]["sha256"]) == 64 and prov["data"]["train"]["images"] == 6
    results = json.loads((reference / "results.json").read_text())["y_psnr_db"]
    assert set(results["val"]) == {"bicubic", "base", "teacher", "student"}
    assert all(np.isfinite(v) for v in results["val"].values())
    for png in ("curves.png", "comparison.png"):
        assert (reference / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [s for s, _ in _losses(reference)] == list(range(1, STEPS + 1))


def test_resume_is_exact(reference: Path, tiny: dict[str, Path], tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert train.main(_args(tiny, run, "--train.stop_after", "3")) == 0
    assert load_checkpoint(run / "checkpoint.pt")["step"] == 3
    assert not (run / "adapter.safetensors").exists()
    assert train.main(["--resume", str(run)]) == 0
    assert _losses(run) == _losses(reference)
    ref, got = _adapter(reference), _adapter(run)
    assert ref.keys() == got.keys()
    for key in ref:
        assert torch.equal(ref[key], got[key]), key


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _two_ranks(args: list[str]) -> None:
    """Run train.py as two gloo ranks, started as torchrun would start them; each rank must exit 0."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    cmd = [sys.executable, str(REPO / "examples/span_sr/train.py"), *args]
    ranks = [subprocess.Popen(cmd, cwd=REPO, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
             for r in range(2)]
    outputs = []
    for proc in ranks:
        try:
            outputs.append(proc.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            for p in ranks:
                os.killpg(p.pid, signal.SIGKILL)  # leave no orphans
            outputs.append(proc.communicate()[0])
    for rank, (proc, output) in enumerate(zip(ranks, outputs)):
        assert proc.returncode == 0, f"rank {rank} exited with {proc.returncode}:\n{output[-4000:]}"


def test_two_process_ddp_equals_one_process(reference: Path, tiny: dict[str, Path], tmp_path: Path) -> None:
    """Two gloo ranks, started as torchrun would start them; each rank's own exit status must be 0."""
    run = tmp_path / "ddp"
    _two_ranks(_args(tiny, run))
    ref, got = _adapter(reference), _adapter(run)
    # Float tolerance: each rank sums its half batch in another order; Adam divides by sqrt(v), so an
    # element whose gradient is tiny can move by up to ~lr differently. Nearly all elements agree to 1e-6.
    diff = torch.cat([(got[k] - ref[k]).abs().flatten() for k in ref])
    moved = torch.cat([ref[k].abs().flatten() for k in ref])
    assert diff.max() < 2e-4 and (diff > 1e-6).float().mean() < 0.02, (diff.max(), (diff > 1e-6).float().mean())
    assert moved.max() > 1e-3  # the adapters did train
    for (s1, l1), (s2, l2) in zip(_losses(reference), _losses(run), strict=True):
        assert s1 == s2 and abs(l1 - l2) < 1e-5


class _Sabotaged:
    """Wraps the real Distiller: from call ``bad_from`` on, returns a NaN loss or raises a signal."""

    calls = 0
    bad_from = 4
    action = "nan"

    inner: dsclora.Distiller

    def __call__(self, lr: torch.Tensor, hr: torch.Tensor, step: int | None = None):
        type(self).calls += 1
        total, parts, sr = self.inner(lr, hr, step=step)
        if type(self).calls >= self.bad_from:
            if self.action == "nan":
                return total * float("nan"), parts, sr
            if type(self).calls == self.bad_from:
                os.kill(os.getpid(), signal.SIGTERM)
        return total, parts, sr


def _patch_distiller(monkeypatch: pytest.MonkeyPatch, action: str) -> None:
    real = dsclora.Distiller

    class Patched(_Sabotaged):
        def __init__(self, *args: object, **kwargs: object) -> None:
            self.inner = real(*args, **kwargs)
            type(self).calls = 0

    Patched.action = action
    monkeypatch.setattr(dsclora, "Distiller", Patched)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny: dict[str, Path], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    _patch_distiller(monkeypatch, "nan")
    run = tmp_path / "nan"
    assert train.main(_args(tiny, run, "--train.ckpt_every", "2")) == 3
    assert "loss is nan" in capsys.readouterr().out
    state = load_checkpoint(run / "checkpoint.pt")
    assert state["step"] == 2
    assert all(torch.isfinite(t).all() for t in state["params"].values())
    assert not (run / "adapter.safetensors").exists()


def test_sigterm_checkpoints_and_exits(tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _patch_distiller(monkeypatch, "signal")
    run = tmp_path / "sig"
    before = signal.getsignal(signal.SIGTERM)
    assert train.main(_args(tiny, run)) == 128 + signal.SIGTERM
    assert load_checkpoint(run / "checkpoint.pt")["step"] == 4
    assert signal.getsignal(signal.SIGTERM) == before  # handlers restored


def test_bad_inputs_fail_before_training(tiny: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train.main(_args(tiny, tmp_path / "a", "--data.train", str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        train.main(_args(tiny, tmp_path / "b", "--data.train", str(tmp_path / "empty")))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot load teacher weights"):
        train.main(_args(tiny, tmp_path / "c", "--teacher", str(garbage)))
    with pytest.raises(FileNotFoundError, match="not found"):
        train.main(_args(tiny, tmp_path / "d", "--teacher", "no_such_weights"))
    x2 = tmp_path / "x2.pth"
    torch.save(SPAN(feature_channels=8, upscale=2).state_dict(), x2)
    with pytest.raises(ValueError, match="scales differ"):
        train.main(_args(tiny, tmp_path / "e", "--teacher", str(x2)))
    with pytest.raises(ValueError, match="smaller than"):
        train.main(_args(tiny, tmp_path / "f", "--data.patch", "32"))
    with pytest.raises(ValueError, match="no single feature map"):  # the affinity of a self-ensemble
        train.main(_args(tiny, tmp_path / "g", "--model.teacher_ensemble", "8"))
    with pytest.raises(ValueError, match=r"'model.teacher_ensemble': '3' is not one of \[1, 2, 4, 8\]"):
        train.main(_args(tiny, tmp_path / "h", "--model.teacher_ensemble", "3"))
    assert not any((tmp_path / n).exists() for n in "abcdegh")  # no run folder is left behind
    assert not (tmp_path / "f" / "checkpoint.pt").exists()


def test_affinity_normalisation_bounds_the_term_by_w_aff(tiny: dict[str, Path], tmp_path: Path) -> None:
    # Per-tap normalisation: at step 0 the student equals its base, so every tap's ratio to its
    # start value is 1, or below 1 where the 1% floor applies: the term is at most w_aff.
    run = tmp_path / "norm"
    w_aff = 0.01
    assert train.main(_args(tiny, run, "--train.steps", "1", "--loss.aff_norm", "true",
                            "--loss.w_aff", str(w_aff), "--loss.p", "2")) == 0
    first = next(json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line)
    term = first["loss"] - 0.2 * first["rec"] - 0.8 * first["out"]
    assert 0.05 * w_aff < term <= w_aff * (1 + 1e-4)


def test_fresh_run_over_an_earlier_one_starts_a_new_log(reference: Path, tiny: dict[str, Path],
                                                        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert train.main(_args(tiny, run)) == 0
    def steps() -> list[int]:
        return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]

    first = steps()
    capsys.readouterr()
    assert train.main(_args(tiny, run)) == 0
    assert "already holds a run" in capsys.readouterr().out
    assert steps() == first  # the log is replaced, not appended to (no second step-0 record)
    assert _losses(run) == _losses(reference)


def test_missing_inputs_stop_the_script_with_one_line_and_no_run_folder(tiny: dict[str, Path], tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    script = str(REPO / "examples/span_sr/train.py")
    cases = {
        "weights": ["--config", str(REPO / "examples/span_sr/configs/dsclora_x4.yaml"), "--out", str(tmp_path / "w"),
                    "--model.weights_dir", str(tmp_path / "no_weights")],
        "data": [*_args(tiny, tmp_path / "d"), "--data.train", str(tmp_path / "no_data")],
    }
    for name, argv in cases.items():
        proc = subprocess.run([sys.executable, script, *argv], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 2, (name, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("train.py: ") and "docs/data.md" in lines[0], (name, lines)
    assert not (tmp_path / "w").exists() and not (tmp_path / "d").exists()


def test_a_run_folder_of_the_older_layout_is_refused(tiny: dict[str, Path], tmp_path: Path) -> None:
    run = tmp_path / "old"
    run.mkdir()
    (run / "config.yaml").write_text("out: old\nmodel: {lora: dsclora}\n")
    torch.save({"step": 3, "params": {}, "optimizer": {}, "scheduler": {}, "rng": {}, "ema": None,
                "best": {"psnr": 0.0, "step": 0, "params": None}}, run / "checkpoint.pt")
    before = sorted(p.name for p in run.iterdir())
    with pytest.raises(ValueError, match="older layout of examples/span_sr"):
        train.main(["--resume", str(run)])
    assert sorted(p.name for p in run.iterdir()) == before


def test_full_finetune_baseline_trains_every_parameter(tiny: dict[str, Path], tmp_path: Path) -> None:
    run = tmp_path / "full"
    assert train.main(_args(tiny, run, "--model.full_finetune", "true", "--train.steps", "2")) == 0
    assert not (run / "adapter.safetensors").exists()
    merged, base = load_span(run / "merged.pth").state_dict(), load_span(tiny["base"]).state_dict()
    assert merged.keys() == base.keys()
    changed = [k for k in base if not torch.equal(merged[k], base[k])]
    assert "conv_1.eval_conv.weight" in changed and "conv_cat.weight" in changed  # not only the adapted convs


def test_self_ensemble_teacher_trains_from_cached_targets(tiny: dict[str, Path], tmp_path: Path) -> None:
    """x2 self-ensemble of the base as the teacher, through the cache: its targets are E(LR), not base(LR)."""
    run = tmp_path / "ens"
    assert train.main(_args(tiny, run, "--teacher", "base", "--model.teacher_ensemble", "2", "--loss.w_aff", "0",
                            "--teacher_cache.enabled", "true", "--teacher_cache.dtype", "float32",
                            "--train.steps", "2")) == 0
    cached = json.loads((run / "provenance.json").read_text())["teacher_cache"]["lr"]
    assert Path(cached["folder"]).is_dir()
    val = json.loads((run / "results.json").read_text())["y_psnr_db"]["val"]
    assert val["teacher"] != val["base"]  # the ensemble is not the base it averages


def test_validation_images_inside_the_training_folders_are_left_out_of_training(tiny: dict[str, Path],
                                                                                 tmp_path: Path) -> None:
    run = tmp_path / "leak"
    held = sorted(tiny["train"].iterdir())[:2]
    assert train.main(_args(tiny, run, "--data.val", *map(str, held), "--train.steps", "1")) == 0
    prov = json.loads((run / "provenance.json").read_text())
    assert prov["data"]["train"]["images"] == 6 - 2


# ---------------------------------------------------------------- teacher-only inputs (data.teacher_only)


@pytest.fixture(scope="module")
def only(tiny: dict[str, Path]) -> Path:
    """Three 72x80 crops of another photo: the teacher-only folder."""
    from PIL import Image
    from skimage import data as skdata

    folder = tiny["root"] / "only"
    if not folder.is_dir():
        folder.mkdir()
        for i in range(3):
            Image.fromarray(skdata.chelsea()[72 * i:72 * i + 72, 150:230]).save(folder / f"o{i}.png")
    return folder


@pytest.mark.usefixtures("one_thread")
def test_rows_without_an_hr_get_no_hr_term_and_rank_halves_average_to_the_batch() -> None:
    torch.manual_seed(0)
    student, teacher = dsclora.build_student(SPAN(feature_channels=8)), SPAN(feature_channels=12).eval()
    lr, hr, target = torch.rand(4, 3, 8, 8), torch.rand(4, 3, 32, 32), torch.rand(4, 3, 32, 32)
    real = torch.tensor([True, False, True, False])  # one real row in each rank's half
    params = [p for p in student.parameters() if p.requires_grad]

    def run(loss: dsclora.DSCLoRALoss, rows: slice, hr: torch.Tensor, target: torch.Tensor,
            real: torch.Tensor = real) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[torch.Tensor]]:
        total, parts, _ = loss(lr[rows], hr[rows], step=0, target=target[rows], real=real[rows])
        return total.detach(), parts, list(torch.autograd.grad(total, params))

    other_hr = hr.clone()
    other_hr[~real] = torch.rand_like(hr[~real])
    other_target = target.clone()
    other_target[~real] += 0.1
    for cached in (True, False):
        loss = dsclora.make_loss(student, teacher, load_config(None).loss, None, 0.0, cached=cached)
        total, parts, grads = run(loss, slice(None), hr, target)
        with torch.no_grad():
            sr = student(lr)
        assert torch.allclose(parts["rec"], (sr[real] - hr[real]).abs().mean())  # the real rows' mean
        total2, _, grads2 = run(loss, slice(None), other_hr, target)  # another HR on the rows without one
        assert torch.equal(total, total2) and all(torch.equal(a, b) for a, b in zip(grads, grads2))
        if cached:  # another teacher target on those rows changes the loss and its gradient
            total3, _, grads3 = run(loss, slice(None), hr, other_target)
            assert not torch.isclose(total, total3) and not all(torch.allclose(a, b) for a, b in zip(grads, grads3))
        # DDP averages the ranks' gradients: with as many real rows on each rank, that is the batch's gradient
        halves = [run(loss, slice(0, 2), hr, target)[2], run(loss, slice(2, 4), hr, target)[2]]
        for g, a, b in zip(grads, *halves):
            torch.testing.assert_close((a + b) / 2, g, atol=1e-6, rtol=1e-5)
    # the reason train.py refuses uneven counts: real rows 2 + 0 over the ranks average to another gradient
    uneven = torch.tensor([True, True, False, False])
    loss = dsclora.make_loss(student, teacher, load_config(None).loss, None, 0.0, cached=True)
    g = run(loss, slice(None), hr, target, uneven)[2]
    a, b = run(loss, slice(0, 2), hr, target, uneven)[2], run(loss, slice(2, 4), hr, target, uneven)[2]
    assert not all(torch.allclose((x + y) / 2, z, atol=1e-6, rtol=1e-5) for x, y, z in zip(a, b, g))


def _only_args(tiny: dict[str, Path], only: Path, run: Path, cache: Path, *extra: str) -> list[str]:
    return _args(tiny, run, "--data.teacher_only", str(only), "--data.teacher_only_share", "0.5",
                 "--data.val", str(tiny["val"]), str(only / "o0.png"), "--data.cache_dir", str(cache),
                 "--loss.w_aff", "0", "--teacher_cache.enabled", "true", "--teacher_cache.dtype", "float32",
                 "--train.steps", "4", *extra)


def _rows(run: Path) -> list[dict[str, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in ("step", "loss", "rec", "out")} for r in rows if "loss" in r]


def test_teacher_only_images_are_learnt_from_the_teacher_alone(tiny: dict[str, Path], only: Path,
                                                               tmp_path: Path) -> None:
    """Cached teacher: their HR changes nothing, their cached targets change the run; resume is exact."""
    import shutil

    from examples.span_sr.data import ImageSet
    from examples.span_sr.teacher_cache import CacheSpec, TeacherCache

    first = tmp_path / "first"
    assert train.main(_only_args(tiny, only, first, tmp_path / "c1")) == 0
    prov = json.loads((first / "provenance.json").read_text())
    assert prov["data"]["train"]["images"] == 6 and prov["data"]["teacher_only"]["images"] == 2  # o0 validates
    entry = prov["teacher_cache"]["lr"]
    assert entry["entries"] == 6 + 2
    # the cache covers the teacher-only images (their outputs are the only targets those rows have)
    refs = [str(only / "o1.png"), str(only / "o2.png")]
    only_set = ImageSet.load(refs, 4)
    spec = CacheSpec(**json.loads((Path(entry["folder"]) / "spec.json").read_text()))
    cache = TeacherCache(Path(entry["folder"]).parent, spec)
    assert cache.missing([np.asarray(a) for a in only_set.lr]) == []
    # their HR replaced by noise (the decoded-image cache keeps their LR): the same run, to the bit
    shutil.copytree(tmp_path / "c1", tmp_path / "c2", ignore=shutil.ignore_patterns("teacher"))
    fresh = ImageSet.load(refs, 4, cache_dir=tmp_path / "names")
    rng = np.random.default_rng(0)
    for hr_file in (tmp_path / "names").glob("*.hr.npy"):
        shape = np.load(hr_file).shape
        np.save(tmp_path / "c2" / hr_file.name, rng.integers(0, 256, shape, dtype=np.uint8))
    assert not np.array_equal(ImageSet.load(refs, 4, cache_dir=tmp_path / "c2").hr[0], fresh.hr[0])
    noisy = tmp_path / "noisy"
    assert train.main(_only_args(tiny, only, noisy, tmp_path / "c2", "--teacher_cache.dir",
                                 str(Path(entry["folder"]).parent))) == 0
    assert _rows(noisy) == _rows(first)
    assert all(torch.equal(a, b) for a, b in zip(_adapter(noisy).values(), _adapter(first).values()))
    # their teacher targets changed: the first step's HR term is the same, its teacher term is not
    moved = tmp_path / "moved_targets"
    shutil.copytree(cache.root, moved / cache.root.name)
    for a in only_set.lr:
        path = moved / cache.root.name / cache.path(np.asarray(a)).name
        np.save(path, np.load(path) + 0.25)
    changed = tmp_path / "changed"
    assert train.main(_only_args(tiny, only, changed, tmp_path / "c1", "--teacher_cache.dir", str(moved))) == 0
    a, b = _rows(first)[0], _rows(changed)[0]
    assert a["rec"] == b["rec"] and a["out"] != b["out"]
    # interrupted and resumed: the same run
    resumed = tmp_path / "resumed"
    assert train.main(_only_args(tiny, only, resumed, tmp_path / "c1", "--train.stop_after", "2")) == 0
    assert train.main(["--resume", str(resumed)]) == 0
    assert _rows(resumed) == _rows(first)


def test_teacher_only_rows_with_a_live_teacher_train_as_cached(tiny: dict[str, Path], tmp_path: Path) -> None:
    """Whole-image patches, no augmentation, every row teacher-only: the live teacher trains like the cache."""
    from PIL import Image
    from skimage import data as skdata

    whole = tmp_path / "whole"
    whole.mkdir()
    for i in range(3):
        Image.fromarray(skdata.chelsea()[40 * i:40 * i + 32, 100:132]).save(whole / f"w{i}.png")  # LR 8x8
    runs = {}
    for name, cached in (("live", "false"), ("cached", "true")):
        runs[name] = tmp_path / name
        assert train.main(_args(tiny, runs[name], "--data.teacher_only", str(whole), "--data.teacher_only_share",
                                "1.0", "--loss.w_aff", "0", "--teacher_cache.enabled", cached,
                                "--teacher_cache.dtype", "float32", "--data.augment", "false",
                                "--train.steps", "3")) == 0
    live, cached_rows = _rows(runs["live"]), _rows(runs["cached"])
    assert all(r["rec"] == 0 for r in live + cached_rows)  # no row has an HR term
    for ra, rb in zip(live, cached_rows, strict=True):
        assert rb["out"] == pytest.approx(ra["out"], rel=1e-5, abs=1e-7)


def test_teacher_only_and_upcycled_rows_under_two_process_ddp(tiny: dict[str, Path], only: Path,
                                                              tmp_path: Path) -> None:
    """One upcycled and one teacher-only row per batch of 4 (one per rank): 2 gloo ranks equal 1 process."""
    extra = ("--data.teacher_only", str(only), "--data.teacher_only_share", "0.25", "--data.upcycle_share", "0.25",
             "--data.upcycle_side", "32", "--train.steps", "3")
    one = tmp_path / "one"
    assert train.main(_args(tiny, one, *extra)) == 0
    run = tmp_path / "ddp"
    _two_ranks(_args(tiny, run, *extra))
    for r1, r2 in zip(_rows(one), _rows(run), strict=True):
        for k in ("loss", "rec", "out"):
            assert abs(r1[k] - r2[k]) < 1e-5, (r1, r2, k)
    ref, got = _adapter(one), _adapter(run)
    diff = torch.cat([(got[k] - ref[k]).abs().flatten() for k in ref])
    assert diff.max() < 2e-4 and (diff > 1e-6).float().mean() < 0.02


@pytest.mark.parametrize(("extra", "match"), [
    (("--data.teacher_only", "{only}"), "teacher_only_share is 0"),
    (("--data.teacher_only_share", "0.5"), "names no folder"),
    (("--data.teacher_only", "{only}", "--data.teacher_only_share", "0.1"), "is no row"),
    (("--data.teacher_only", "{only}", "--data.teacher_only_share", "1.5"), r"teacher_only_share.*out of range"),
    (("--data.teacher_only", "{only}", "--data.teacher_only_share", "0.5", "--loss.w_out", "0"), "loss.w_out is 0"),
    (("--data.teacher_only", "{only}", "--data.teacher_only_share", "0.75", "--data.upcycle_share", "0.5"),
     "more than the batch"),
    (("--data.teacher_only", "{train}", "--data.teacher_only_share", "0.5"), "also in data.train"),
    (("--data.teacher_only", "{only}/o0.png", "--data.teacher_only_share", "0.5", "--data.val", "{only}/o0.png"),
     "no image besides the validation images"),
    (("--data.teacher_only", "{only}/missing", "--data.teacher_only_share", "0.5"), "does not exist"),
])
def test_bad_teacher_only_settings_are_refused_before_the_run_folder(tiny: dict[str, Path], only: Path,
                                                                     tmp_path: Path, extra: tuple[str, ...],
                                                                     match: str) -> None:
    run = tmp_path / "run"
    filled = [e.format(only=only, train=tiny["train"]) for e in extra]
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        train.main(_args(tiny, run, "--loss.w_aff", "0", *filled))
    assert not run.exists()


def test_rows_without_an_hr_must_split_evenly_over_the_ranks() -> None:
    cfg = load_config(None, {"data.batch": "8", "data.teacher_only": "x", "data.teacher_only_share": "0.125"})
    train.distill_checks(cfg, 1)
    with pytest.raises(ValueError, match=r"0 \+ 1 rows without an HR per batch, not divisible by 2"):
        train.distill_checks(cfg, 2)
    cfg.data.upcycle_share = 0.125  # one upcycled + one teacher-only row: one without an HR per rank
    train.distill_checks(cfg, 2)
