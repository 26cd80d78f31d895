"""The fast SPAN path (examples/span_sr/fast.py): fused Triton kernels, run on CPU through Triton's
interpreter against the eager forward; the CPU backend; refusals of non-deploy models."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

import convlora
from examples.span_sr import fast as fast_mod
from examples.span_sr.arch import SPAN
from examples.span_sr.fast import FastSPAN, fast_span
from tests._span_helpers import small_span

pytestmark = pytest.mark.usefixtures("one_thread")
pytest.importorskip("triton")


# Triton's interpreter must be switched on before triton is first imported (its own library
# functions are decorated at import), and other tests in this process may have imported it: the
# kernels run in one fresh subprocess, on every case below, and each test reads its case.
CASES = {
    "w8_batch2_odd": dict(width=8, cat=None, scale=4, shape=(2, 3, 9, 7)),  # padding 8 -> 16
    "w26_cat20": dict(width=26, cat=20, scale=4, shape=(1, 3, 6, 11)),  # SPAN-tiny width, 26 -> 32
    "w28_x2": dict(width=28, cat=None, scale=2, shape=(1, 3, 5, 5)),  # SPAN width, x2
    "w8_x3_one_row": dict(width=8, cat=None, scale=3, shape=(1, 3, 1, 4)),  # 27 out ch -> 32
    "w8_channels_last": dict(width=8, cat=None, scale=4, shape=(1, 3, 6, 5), channels_last=True),
    "w26_fp16": dict(width=26, cat=None, scale=4, shape=(1, 3, 8, 8), dtype="float16"),
    # the CUDA schedule's float32 settings (the interpreter's dots are numpy float32 matmuls)
    "w26_tf32x3_warps2": dict(width=26, cat=None, scale=4, shape=(1, 3, 7, 9), precision="tf32x3"),
}

WORKER = r"""
import json, os, sys
os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, sys.argv[1])
import torch
from tests._span_helpers import small_span
from tests.test_span_sr_fast import CASES
from examples.span_sr.fast import FastSPAN, fast_span
from examples.span_sr.fast_cuda import TritonSPAN
torch.set_num_threads(1)
out = {}
for name, c in CASES.items():
    m = small_span(c["width"], c["cat"], c["scale"])
    x = torch.rand(*c["shape"], generator=torch.Generator().manual_seed(1))
    if c.get("channels_last"):
        x = x.contiguous(memory_format=torch.channels_last)
    if "dtype" in c:  # fp16 storage: kept in the kernels for the GPU work, not offered (bound)
        fast = FastSPAN(m, TritonSPAN(m, getattr(torch, c["dtype"]), 16), "triton", torch.float16)
    elif "precision" in c:
        run = TritonSPAN(m, torch.float32, 32, precision=c["precision"], num_warps=2)
        fast = FastSPAN(m, run, "triton", torch.float32)
    else:
        fast = fast_span(m, backend="triton", block_m=16)
    with torch.no_grad():
        ref = m(x)
    got = fast(x)
    out[name] = {"shape_ok": got.shape == ref.shape, "dtype": str(got.dtype),
                 "diff": float((got - ref).abs().max()), "scale": float(ref.abs().max())}
from examples.span_sr.upscale import SPAN_RF_RADIUS, upscale_tensor
m = small_span(8)
x = torch.rand(1, 3, 56, 4, generator=torch.Generator().manual_seed(2))  # taller than tile + 2 pads
fast = fast_span(m, backend="triton")
full = fast(x)
tiled = upscale_tensor(fast, x, tile=8, pad=SPAN_RF_RADIUS)
out["tiled"] = {"diff": float((tiled - full).abs().max()), "scale": float(full.abs().max())}
print("RESULT" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def interpreted() -> dict[str, dict]:
    """Every case of ``CASES`` run through the Triton interpreter (one subprocess)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = str(Path(__file__).resolve().parents[1])
    proc = subprocess.run([sys.executable, "-c", WORKER, repo], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": repo})
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT")), None)
    assert line is not None, proc.stderr[-3000:]
    return json.loads(line[len("RESULT"):])


@pytest.mark.parametrize("case", [k for k, c in CASES.items() if "dtype" not in c])
def test_triton_fp32_matches_eager(interpreted: dict[str, dict], case: str) -> None:
    r = interpreted[case]
    assert r["shape_ok"] and r["dtype"] == "torch.float32"
    assert r["diff"] <= 1e-5 * max(1.0, r["scale"])


def test_triton_fp16_storage_kernels_run(interpreted: dict[str, dict]) -> None:
    """The kernels also store fp16 (fp32 accumulation, float32 output): kept for the GPU work,
    though ``fast_span`` does not offer it (5 uint8 levels off on real images, emulated)."""
    r = interpreted["w26_fp16"]
    assert r["shape_ok"] and r["dtype"] == "torch.float32"
    assert r["diff"] < 1 / 255


def test_triton_tiles_agree_with_the_whole_image(interpreted: dict[str, dict]) -> None:
    """``--fast --tile``: tiles with a margin of the receptive-field radius give the untiled
    output up to float32 reordering (the tiling guarantee of upscale.py)."""
    r = interpreted["tiled"]
    assert r["diff"] <= 1e-5 * max(1.0, r["scale"])


def test_triton_on_cpu_needs_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="needs a CUDA model"):
        fast_span(small_span(8), backend="triton")


def test_refuses_unmerged_lora() -> None:
    m = small_span(8)
    convlora.inject(m, 2)
    with pytest.raises(ValueError, match=r"convlora.unload\(model, merge=True\)"):
        fast_span(m)
    merged = convlora.unload(m, merge=True)
    assert isinstance(fast_span(merged, backend="eager"), FastSPAN)


def test_refuses_train_form() -> None:
    m = SPAN(feature_channels=8, form="train").eval()
    with pytest.raises(ValueError, match=r"model.reparameterize\(\)"):
        fast_span(m)
    assert fast_span(m.reparameterize(), backend="eager").backend == "eager"


def test_refuses_other_models_and_options() -> None:
    with pytest.raises(TypeError, match="needs a SPAN"):
        fast_span(torch.nn.Conv2d(3, 3, 3))
    for backend in ("inductor", "triton", "onnxruntime", "eager"):
        with pytest.raises(ValueError, match=f"not offered by the {backend} backend"):
            fast_span(small_span(8), dtype=torch.float16, backend=backend)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="backend='onnx' is not one of"):
        fast_span(small_span(8), backend="onnx")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="block_m=24"):
        fast_span(small_span(8), backend="triton", block_m=24)


def test_forward_rejects_a_bad_shape() -> None:
    fast = fast_span(small_span(8), backend="eager")
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        fast(torch.rand(3, 8, 8))


def test_auto_on_cpu_is_inductor_else_onnxruntime(monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """The CPU default (by measurement, docs/benchmarks.md): inductor with a C++ compiler,
    else ONNX Runtime, saying so in one line; ONNX Runtime takes any batch and size."""
    pytest.importorskip("onnxruntime")
    cpu = torch.device("cpu")
    monkeypatch.setattr(fast_mod, "_has_cxx", lambda: True)
    assert fast_mod.resolve_backend("auto", cpu) == "inductor" and capsys.readouterr().out == ""
    monkeypatch.setattr(fast_mod, "_has_cxx", lambda: False)
    m = small_span(8)
    fast = fast_span(m)
    out = capsys.readouterr().out
    assert fast.backend == "onnxruntime" and out.count("\n") == 1 and "C++ compiler" in out
    for shape in [(1, 3, 12, 10), (2, 3, 7, 9)]:  # dynamic axes: any batch and size
        x = torch.rand(*shape)
        with torch.no_grad():
            ref = m(x)
        assert float((fast(x) - ref).abs().max()) <= 1e-5 * max(1.0, float(ref.abs().max()))


def test_failed_compile_falls_back_to_onnxruntime(monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("onnxruntime")

    def broken(x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("no working compiler")

    monkeypatch.setattr(torch, "compile", lambda *a, **k: broken)
    m = small_span(8)
    fast = fast_span(m, backend="inductor")
    x = torch.rand(1, 3, 9, 8)
    got = fast(x)
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and "compiling" in out[0] and "using ONNX Runtime" in out[1]
    assert "no working compiler" in out[1]
    with torch.no_grad():
        ref = m(x)
    assert float((got - ref).abs().max()) <= 1e-5 * max(1.0, float(ref.abs().max()))
    assert torch.equal(fast(x), got) and capsys.readouterr().out == ""  # no second attempt, no line


def test_without_onnxruntime_or_cxx_falls_back_with_one_line(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxruntime" else find_spec(name, *a))
    monkeypatch.setattr(fast_mod, "_has_cxx", lambda: False)
    m = small_span(8)
    fast = fast_span(m)
    out = capsys.readouterr().out
    assert fast.backend == "eager" and out.count("\n") == 1 and "C++ compiler" in out
    x = torch.rand(1, 3, 5, 6)
    with torch.no_grad():
        assert torch.equal(fast(x), m(x))
    with pytest.raises(ValueError, match="needs a C\\+\\+ compiler"):
        fast_span(m, backend="inductor")


def test_the_model_is_not_modified() -> None:
    m = small_span(8)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    fast_span(m, backend="eager")
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


@pytest.mark.slow
def test_inductor_matches_eager_for_new_shapes() -> None:
    m = small_span(8)
    fast = fast_span(m, backend="inductor")
    assert fast.backend == "inductor"
    for shape in [(1, 3, 12, 10), (2, 3, 7, 9)]:  # a second shape recompiles (dynamic)
        x = torch.rand(*shape)
        with torch.no_grad():
            ref = m(x)
        assert float((fast(x) - ref).abs().max()) <= 1e-4 * max(1.0, float(ref.abs().max()))


@pytest.mark.slow
def test_inductor_tiles_agree_with_the_whole_image_and_compile_once() -> None:
    """``--fast --tile``: windows of one shape (``same_shape``, as upscale.py cuts them for
    ``--fast``) give the untiled output within the tiling guarantee, and compile once."""
    from torch._dynamo.utils import counters

    from examples.span_sr.upscale import SPAN_RF_RADIUS, upscale_tensor

    m = small_span(8)
    x = torch.rand(1, 3, 70, 12)  # 70 = 16 + 16 + 16 + 16 + 6: a short last tile
    fast = fast_span(m, backend="inductor")
    torch._dynamo.reset()
    counters.clear()
    tiled = upscale_tensor(fast, x, tile=16, pad=SPAN_RF_RADIUS, same_shape=True)
    assert counters["stats"]["unique_graphs"] == 1
    with torch.no_grad():
        full = m(x)
    assert float((tiled - full).abs().max()) <= 1e-4 * max(1.0, float(full.abs().max()))


# ------------------------------------------------------------------ the --fast flag of the CLIs
def _lr_crop(shared_data, tmp_path):
    from examples.span_sr.images import read_image, write_image

    img = read_image(shared_data / "sr_bench" / "Set5" / "LR_bicubic" / "X4" / "butterflyx4.png")
    src = tmp_path / "in" / "crop.png"
    write_image(src, img[:40, :36].copy())
    return src


def test_upscale_fast_and_tile_keep_the_output(shared_data, tmp_path, capsys) -> None:
    """``--fast`` (also with ``--tile``) writes the eager output to within one level, on a
    released checkpoint and a real image; one image in one piece gets ONNX Runtime and a line
    saying why; tiles get the default backend; ``--fast --half`` is refused."""
    import numpy as np

    from examples.span_sr.images import read_image
    from examples.span_sr.upscale import main

    weights = str(shared_data / "weights" / "dsclora_ch26.pth")
    src = _lr_crop(shared_data, tmp_path)
    outs, said = {}, {}
    for name, extra in {"eager": [], "fast": ["--fast"], "fast_tiled": ["--fast", "--tile", "16"]}.items():
        capsys.readouterr()
        assert main(["--weights", weights, "--input", str(src), "--output", str(tmp_path / name),
                     *extra]) == 0
        said[name] = capsys.readouterr().out
        outs[name] = read_image(tmp_path / name / "crop.png").astype(np.int16)
    if importlib.util.find_spec("onnxruntime") is not None:
        assert "--fast on one image: ONNX Runtime" in said["fast"]
    backend = fast_mod.resolve_backend("auto", torch.device("cpu"))
    assert f"--fast ({backend}) pays a one-off setup" in said["fast_tiled"]
    for name in ("fast", "fast_tiled"):
        diff = np.abs(outs[name] - outs["eager"])
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
    with pytest.raises(SystemExit):
        main(["--weights", weights, "--input", str(src), "--output", str(tmp_path / "h"),
              "--fast", "--half"])


def test_evaluate_and_efficiency_fast(shared_data, tmp_path, capsys) -> None:
    import json

    from examples.span_sr.efficiency import main as efficiency
    from examples.span_sr.evaluate import main as evaluate

    weights = str(shared_data / "weights" / "dsclora_ch26.pth")
    data = shared_data / "sr_bench" / "Set5"
    psnr = {}
    for name, extra in {"eager": [], "fast": ["--fast"]}.items():
        out = tmp_path / f"{name}.json"
        assert evaluate(["--weights", weights, "--data", str(data), "--json", str(out), *extra]) == 0
        psnr[name] = json.loads(out.read_text())["sets"]["Set5"]["mean"]["psnr_y"]
    assert abs(psnr["fast"] - psnr["eager"]) <= 0.01
    assert efficiency(["--weights", weights, "--runtime-size", "16", "16", "--runtime-count", "1",
                       "--fast"]) == 0
    assert "--fast: inductor" in capsys.readouterr().out
