"""'Merged equals base cost', checked structurally, and smoke runs of the benchmark scripts.

Timings are noisy and belong in ``benchmarks/``; what can be asserted exactly is that a model
which went through inject -> train -> unload is the original architecture: same module types,
same parameter names/shapes/dtypes, same state-dict keys and the same FLOP count (counted with
``torch.utils.flop_counter.FlopCounterMode``), while the unmerged model costs more FLOPs.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import convlora
from benchmarks._timing import sr_model

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"


def _flops(model: nn.Module, x: torch.Tensor) -> tuple[int, dict[str, int]]:
    """Total FLOPs of one forward and the per-module totals."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    per_module = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    return counter.get_total_flops(), per_module


def _train_a_bit(model: nn.Module, x: torch.Tensor, steps: int = 2) -> None:
    opt = torch.optim.Adam(convlora.lora_parameters(model), lr=1e-2)
    target = torch.randn_like(model(x))
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), target).backward()
        opt.step()


def _timm_resnet18() -> nn.Module:
    timm = pytest.importorskip("timm")
    # zero_init_last=False: timm zeroes each block's last BN scale by default, which would cut
    # the gradient to every conv inside the residual branches (their adapters would not train).
    return timm.create_model("resnet18", pretrained=False, zero_init_last=False)


@pytest.mark.parametrize(("build", "shape"), [
    (lambda: sr_model(16, 8), (2, 3, 16, 16)),
    (_timm_resnet18, (1, 3, 32, 32)),
], ids=["sr", "resnet18"])
def test_unloaded_model_has_base_structure_and_flops(build, shape) -> None:
    torch.manual_seed(0)
    original = build().eval()
    x = torch.rand(shape)
    model = copy.deepcopy(original)
    names = convlora.inject(model, rank=4)
    _train_a_bit(model, x)
    model.eval()
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if ".lora_B." in n), \
        "training left every B at zero; the test would not exercise a real merge"
    flops_base, per_module_base = _flops(original, x)
    flops_unmerged, _ = _flops(model, x)
    with torch.no_grad():
        expected = model(x)

    unloaded = convlora.unload(model, merge=True)

    assert [(n, type(m)) for n, m in unloaded.named_modules()] == \
        [(n, type(m)) for n, m in original.named_modules()]
    assert [(n, p.shape, p.dtype) for n, p in unloaded.named_parameters()] == \
        [(n, p.shape, p.dtype) for n, p in original.named_parameters()]
    assert list(unloaded.state_dict()) == list(original.state_dict())
    assert sum(p.numel() for p in unloaded.parameters()) == \
        sum(p.numel() for p in original.parameters())
    flops_unloaded, per_module_unloaded = _flops(unloaded, x)
    assert flops_unloaded == flops_base
    assert per_module_unloaded == per_module_base
    # The counter does see adapters: the unmerged model builds W + BA in every forward.
    assert flops_unmerged > flops_base
    # And the unloaded model is the trained one, not the untouched original.
    changed = [n for n in names
               if not torch.equal(unloaded.get_submodule(n).weight, original.get_submodule(n).weight)]
    assert changed == names
    with torch.no_grad():
        torch.testing.assert_close(unloaded(x), expected, rtol=1e-4, atol=1e-5)


SCRIPTS = {
    "bench_train_step.py": ["A/A control", "ConvLoRA (unmerged)", "ratio vs full FT"],
    "bench_inference.py": ["A/A control", "merged + unloaded", "ConvLoRA unmerged", "timm resnet18"],
    "bench_merge_switch.py": ["merge()", "unmerge()", "set_adapter('b')", "ratio vs one forward"],
    "bench_teacher_cache.py": ["plain L1", "cached teacher", "live teacher", "cache build"],
    "bench_methods.py": ["A/A", "convlora dora", "convlora loha", "convlora lokr", "convlora loha+tucker",
                         "ratio vs full FT",
                         "ratio vs original", "timm resnet18"],
    "bench_mixed_batch.py": ["convlora per_sample", "convlora 4 separate forwards",
                             "ratio vs 4 separate"],
    "bench_backward_paths.py": ["activation / weight space", "lora", "dora", "loha", "lokr",
                                "the layer picks"],
}
if all(importlib.util.find_spec(m) is not None for m in ("spandrel", "onnxruntime")) and \
        (REPO.parent / "shared" / "data" / "sr_bench" / "Set14").is_dir():  # its crops of Set14
    SCRIPTS["bench_span_fast.py"] = ["eager", "fast: inductor (--fast)", "fast: onnxruntime",
                                     "spandrel", "speed-up vs spandrel", "cold", "warm"]
if importlib.util.find_spec("peft") is not None:
    SCRIPTS["bench_train_step.py"].append("PEFT LoRA")
    SCRIPTS["bench_methods.py"].append("PEFT ")
    SCRIPTS["bench_mixed_batch.py"].append("PEFT ")


@pytest.fixture(scope="module")
def quick_runs() -> dict[str, subprocess.CompletedProcess[str]]:
    """Run every benchmark with ``--quick --threads 1``, concurrently (imports dominate)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    procs = {name: subprocess.Popen([sys.executable, str(BENCH / name), "--quick", "--threads", "1"],
                                    cwd=REPO, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
             for name in SCRIPTS}
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return results


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_benchmark_script_runs_quick(quick_runs, script: str) -> None:
    result = quick_runs[script]
    assert result.returncode == 0, f"{script} failed:\n{result.stderr[-3000:]}"
    for text in SCRIPTS[script]:
        assert text in result.stdout, f"{script} output lacks {text!r}:\n{result.stdout}"
    assert "| " in result.stdout and "median" in result.stdout


def test_readme_lists_every_file_of_the_folder() -> None:
    readme = (BENCH / "README.md").read_text()
    files = sorted(p.name for p in BENCH.iterdir() if p.is_file() and p.suffix in (".py", ".sh"))
    missing = [name for name in files if f"| `{name}` |" not in readme]
    assert files and not missing, f"benchmarks/README.md has no table row for {missing}"
