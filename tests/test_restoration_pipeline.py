"""The restoration example end to end at CPU size, on the real ResidualCNN: named adapters are
saved, loaded, switched and merged exactly, and a trained adapter lowers its task's loss."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml

import convlora
from examples.restoration import evaluate, restore, train
from examples.restoration.config import apply_options, load_config
from examples.restoration.data import SAMPLE_TRAIN, PatchSampler, sample_photos
from examples.restoration.degrade import degrade, get_task, seeded_generator
from examples.restoration.kernels import kernel_pool
from examples.restoration.model import build_model, load_model, save_model

MERGE_TOL: dict[str, Any] = {"rtol": 0, "atol": 1e-5}  # merged conv vs weight-space LoRA conv: same weight, other kernels may sum differently
TASKS = ("noise50", "deblur_gauss")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sampler() -> PatchSampler:
    images = list(sample_photos(SAMPLE_TRAIN[:2]).values())
    return PatchSampler(images, 32, torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def pool() -> torch.Tensor:
    return kernel_pool("gaussian", 8, seed=0)


@pytest.fixture(scope="module")
def run(tmp_path_factory, sampler, pool) -> Path:
    """A base trained a few steps on noise25 and two trained adapters saved to files."""
    out = tmp_path_factory.mktemp("restoration_run")
    torch.manual_seed(0)
    model = build_model()
    train.train_steps(model, list(model.parameters()), sampler, get_task("noise25"), None, steps=40,
                      lr=1e-3, batch=4, generator=torch.Generator().manual_seed(1), log_every=0)
    save_model(model, out / "base.safetensors")
    for i, name in enumerate(TASKS):
        convlora.inject(model, convlora.LoRAConfig(rank=1), adapter_name=name)
        params = list(convlora.lora_parameters(model, name))
        train.train_steps(model, params, sampler, get_task(name), pool, steps=5, lr=3e-3, batch=4,
                          generator=torch.Generator().manual_seed(2 + i), log_every=0)
        convlora.save_adapter(model, out / f"{name}.safetensors", name=name)
    return out


def _x() -> torch.Tensor:
    return torch.rand(2, 3, 24, 24, generator=torch.Generator().manual_seed(9))


def _multi(run: Path) -> torch.nn.Module:
    model = load_model(run / "base.safetensors")
    for name in TASKS:
        convlora.load_adapter(model, run / f"{name}.safetensors")
    return model


def test_adapters_are_small_and_non_trivial(run: Path) -> None:
    n_base = sum(p.numel() for p in load_model(run / "base.safetensors").parameters())
    for name in TASKS:
        tensors, meta = convlora.read_adapter(run / f"{name}.safetensors")
        assert meta["adapter_name"] == name
        assert sum(t.numel() for t in tensors.values()) < 0.05 * n_base
        assert all(t.abs().max() > 0 for k, t in tensors.items() if k.endswith("lora_B"))


def test_switching_equals_a_fresh_model_with_only_that_adapter(run: Path) -> None:
    multi, x = _multi(run), _x()
    outs = {}
    for name in reversed(TASKS):  # switch back and forth
        convlora.set_adapter(multi, name)
        fresh = load_model(run / "base.safetensors")
        convlora.load_adapter(fresh, run / f"{name}.safetensors")
        with torch.no_grad():
            outs[name] = multi(x)
            assert torch.equal(outs[name], fresh(x))
    assert not torch.allclose(outs[TASKS[0]], outs[TASKS[1]], atol=1e-4)
    with torch.no_grad(), convlora.disabled(multi):
        assert torch.equal(multi(x), load_model(run / "base.safetensors")(x))


def test_merged_deploy_model_matches_unmerged(run: Path) -> None:
    multi, x = _multi(run), _x()
    base_keys = list(load_model(run / "base.safetensors").state_dict())
    for name in TASKS:
        convlora.set_adapter(multi, name)
        with torch.no_grad():
            ref = multi(x)
            with convlora.merged(multi):
                torch.testing.assert_close(multi(x), ref, **MERGE_TOL)
            deploy = convlora.unload(copy.deepcopy(multi), merge=True)
            assert list(deploy.state_dict()) == base_keys
            assert not any(isinstance(m, convlora.LoRALayer) for m in deploy.modules())
            assert sum(type(m) is torch.nn.Conv2d for m in deploy.modules()) == 10
            torch.testing.assert_close(deploy(x), ref, **MERGE_TOL)
            torch.testing.assert_close(restore.build(run / "base.safetensors", run / f"{name}.safetensors")(x),
                                       ref, **MERGE_TOL)


def test_trained_adapter_lowers_its_task_loss(run: Path, sampler: PatchSampler) -> None:
    model = load_model(run / "base.safetensors")
    task = get_task("noise50")  # the base saw only sigma 25
    held = PatchSampler(sampler.images, 32, torch.Generator().manual_seed(123)).sample(8)
    bad = degrade(held, task, seeded_generator("held-out"))

    def loss() -> float:
        with torch.no_grad():
            return float(F.l1_loss(model(bad), held))

    before = loss()
    convlora.inject(model, convlora.LoRAConfig(rank=1), adapter_name="denoise50")
    losses = train.train_steps(model, list(convlora.lora_parameters(model, "denoise50")), sampler, task, None,
                               steps=60, lr=1e-2, batch=4, generator=torch.Generator().manual_seed(5),
                               log_every=0)
    after = loss()
    assert after < 0.95 * before, (before, after)  # measured: 0.155 -> 0.140
    assert sum(losses[-10:]) < sum(losses[:10])
    with convlora.disabled(model):
        assert loss() == pytest.approx(before, abs=1e-7)  # the base stayed frozen


@pytest.mark.parametrize("model", [None, {"arch": "SmallUNet", "channels": [16, 24, 32]}], ids=["dncnn", "unet"])
def test_scripts_end_to_end(tmp_path: Path, model: dict[str, Any] | None, capsys) -> None:
    cfg = {"out": str(tmp_path / "run"), "data": {"synthetic_kernels": 4},
           "train": {"patch": 32, "batch": 2}, "base": {"steps": 3}, "adapter": {"steps": 3},
           "tasks": list(TASKS), "finetune": {"enabled": True}, "eval": {"crop": 48}}
    if model is not None:
        cfg["model"] = model
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    log = train.main(["--config", str(tmp_path / "tiny.yaml")])
    run = tmp_path / "run"
    assert json.loads((run / "log.json").read_text()) == log
    assert f"next: python examples/restoration/evaluate.py --run {run.resolve()}" in capsys.readouterr().out
    assert all(log["adapters"][t]["fraction_of_base"] < 0.05 for t in TASKS)
    res = evaluate.main(["--run", str(run)])
    for name in TASKS:
        r = res["tasks"][name]
        assert r["switch_max_abs"] == 0.0 and r["merge_max_abs"] < 1e-5
        assert r["finetune"] is not None and len(r["base"]["per_case"]) == (4 if name == "deblur_gauss" else 1)
    table = (run / "results.md").read_text()
    assert table.startswith("| task | test set | input: PSNR (dB) / SSIM |")
    for name in TASKS:  # the exactness checks are in the table too, not only in the JSON
        r = res["tasks"][name]
        assert f"| {r['switch_max_abs']:.1e} / {r['merge_max_abs']:.1e} |" in table
    assert res == evaluate.main(["--run", str(run)])  # fixed seeds: identical numbers
    if model is None:
        inner = evaluate.main(["--run", str(run), "--border", "8"])
        assert inner["border"] == 8 and (run / "results_border8.md").is_file()
        assert json.loads((run / "results.json").read_text()) == res  # the whole-image results stay
        for name in TASKS:  # same cases, fewer pixels: other numbers
            assert inner["tasks"][name]["input"]["per_case"] != res["tasks"][name]["input"]["per_case"]
    img = tmp_path / "in.png"
    from examples.span_sr.images import write_image

    write_image(img, (sample_photos(["chelsea"])["chelsea"][:, :40, :40].permute(1, 2, 0).numpy()))
    written = restore.main(["--weights", str(run / "base.safetensors"), "--adapter",
                            str(run / "adapters" / "noise50.safetensors"), "--simulate", "noise50",
                            "--input", str(img), "--output", str(tmp_path / "out.png")])
    assert [p.name for p in written] == ["out_degraded.png", "out.png"] and all(p.is_file() for p in written)


def test_model_section_is_replaced_whole(tmp_path: Path) -> None:
    """A U-Net config must not inherit the DnCNN's ``depth`` from the defaults."""
    (tmp_path / "u.yaml").write_text(yaml.safe_dump({"model": {"arch": "SmallUNet", "channels": [8, 8, 8]}}))
    cfg = load_config(tmp_path / "u.yaml")
    assert cfg["model"] == {"arch": "SmallUNet", "channels": [8, 8, 8]}
    assert type(build_model(**cfg["model"])).__name__ == "SmallUNet"


def test_blur_crop_trains_on_the_inside_of_larger_blurred_patches(pool: torch.Tensor) -> None:
    cfg = load_config(None)
    task = get_task("deblur_gauss")
    assert train.blur_margin(cfg, task, pool) == 0  # off by default
    cfg["train"]["blur_crop"] = True
    margin = train.blur_margin(cfg, task, pool)
    assert margin == pool.shape[-1] // 2 and train.blur_margin(cfg, get_task("noise50"), pool) == 0
    images = list(sample_photos(SAMPLE_TRAIN[:1]).values())
    seen: list[tuple[int, ...]] = []
    model = build_model(channels=4, depth=3)
    model.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    sampler = PatchSampler(images, 16 + 2 * margin, torch.Generator().manual_seed(0))
    losses = train.train_steps(model, list(model.parameters()), sampler, task, pool, steps=2, lr=1e-3,
                               batch=2, generator=torch.Generator().manual_seed(0), log_every=0,
                               margin=margin)
    assert seen == [(2, 3, 16, 16)] * 2 and len(losses) == 2


def test_overrides_use_the_span_sr_dialect_and_name_bad_keys() -> None:
    cfg = apply_options(load_config(None), ["--train.blur_crop", "true", "--train.patch", "96", "--tasks", "noise15"])
    assert cfg["train"]["blur_crop"] is True and cfg["train"]["patch"] == 96 and cfg["tasks"] == ["noise15"]
    with pytest.raises(ValueError, match="unknown option --train.pach"):
        apply_options(cfg, ["--train.pach", "96"])
    with pytest.raises(ValueError, match="ambiguous; write one of --adapter.steps, --base.steps"):
        apply_options(cfg, ["--steps", "5"])
    with pytest.raises(ValueError, match=r"--set was replaced.*write --train.blur_crop true --train.patch 96"):
        apply_options(cfg, ["--set", "train.blur_crop=true", "--set=train.patch=96"])
    assert cfg["train"]["patch"] == 96  # a failed call changes nothing
    with pytest.raises(SystemExit, match="--set was replaced"):
        train.main(["--set", "train.patch=96"])


def test_restore_with_a_known_kernel_deconvolves_first(tmp_path: Path, run: Path) -> None:
    import numpy as np

    from examples.restoration.degrade import circular_blur, wiener_deconv
    from examples.restoration.kernels import gaussian_kernel
    from examples.span_sr.images import read_image, write_image

    k = gaussian_kernel(1.5, 1.5, size=9)
    np.save(tmp_path / "psf.npy", (3 * k).numpy())  # not normalised: the loader normalises
    clean = sample_photos(["chelsea"])["chelsea"][:, :32, :40].float() / 255
    write_image(tmp_path / "blurred.png", (circular_blur(clean, k).clamp(0, 1) * 255).round().byte()
                .permute(1, 2, 0).numpy())
    out = restore.main(["--weights", str(run / "base.safetensors"), "--kernel", str(tmp_path / "psf.npy"),
                        "--input", str(tmp_path / "blurred.png"), "--output", str(tmp_path / "o.png")])
    x = torch.from_numpy(read_image(tmp_path / "blurred.png").copy()).permute(2, 0, 1).float() / 255
    with torch.no_grad():
        want = load_model(run / "base.safetensors")(wiener_deconv(x, k, 0.01)[None])[0]
    got = torch.from_numpy(read_image(out[0]).copy()).permute(2, 0, 1).float()
    assert (got - (want.clamp(0, 1) * 255).round()).abs().max() <= 1  # 8-bit rounding
    with pytest.raises(SystemExit, match="--kernel is for real blurred inputs"):
        restore.main(["--weights", str(run / "base.safetensors"), "--kernel", str(tmp_path / "psf.npy"),
                      "--simulate", "noise50", "--input", str(tmp_path / "blurred.png"),
                      "--output", str(tmp_path / "p.png")])


def test_missing_data_is_one_line_and_leaves_no_run_folder(tmp_path: Path) -> None:
    """A config whose data folders are absent stops before the run folder is made, naming the
    missing paths and docs/data.md; evaluate.py does the same for its test set."""
    cfg = {"out": str(tmp_path / "run"), "data": {"source": "folders", "folders": [str(tmp_path / "nope")],
                                                   "kernels12": str(tmp_path / "k12.mat")}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit, match=r"missing data: data\.folders=.*nope, data\.kernels12=.*docs/data\.md"):
        train.main(["--config", str(tmp_path / "c.yaml")])
    assert not (tmp_path / "run").exists()
    run = tmp_path / "evalrun"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"eval": {"source": "folder", "folder": str(tmp_path / "none")}}))
    with pytest.raises(SystemExit, match=r"missing data: eval\.folder=.*none.*docs/data\.md"):
        evaluate.main(["--run", str(run)])
