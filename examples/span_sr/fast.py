"""The fast SPAN deploy forward behind one call, [`fast_span`][examples.span_sr.fast.fast_span].

    from examples.span_sr.fast import fast_span
    fast = fast_span(load_span("span_tiny_ch26.pth"))   # CPU: torch.compile (inductor)
    sr = fast(lr)                                        # same output as the eager forward

Backends. ``backend="auto"`` picks, on CPU, ``"inductor"`` when a C++ compiler is found, else
``"onnxruntime"`` when it is installed (the ``[onnx]`` extra), else ``"eager"``, printing one
line for each fallback; on CUDA ``"triton"`` (else ``"eager"``, printing one line);
on other devices ``"eager"``. The CPU order was chosen by measurement
(``benchmarks/bench_span_fast.py``, docs/benchmarks.md, "SPAN fast path on CPU"): on the 2-core
CPU with 2 threads, inductor is at least 1.5x faster than both the eager forward and spandrel's
SPAN at LR 128x128 and 256x256, batch 1 and 8, and ONNX Runtime is not at batch 1. Inductor
pays a compile (seconds) per new input shape, ONNX Runtime about a second once; ``upscale.py
--fast`` therefore takes ONNX Runtime for a single image run in one piece.

* ``"onnxruntime"`` (CPU): ONNX Runtime (CPU provider, all graph optimisations) on the model
  exported in memory; batch, height and width are dynamic, so no per-shape cost. The session
  uses ``torch.get_num_threads()`` threads.
* ``"inductor"`` (CPU, the default): ``torch.compile`` with inductor's freezing (weights
  constant-folded and prepacked for oneDNN, the element-wise tails fused into the convs). The
  first input shape compiles with static sizes; a second distinct shape compiles once more with
  dynamic sizes, which serve every later shape. Tiles of one shape (``upscale.py --fast
  --tile``) compile once. When compiling fails it falls back to ONNX Runtime, else the eager
  forward, printing one line.
* ``"triton"`` (CUDA, opt-in: ``"auto"`` stays eager on CUDA until a GPU run has measured this
  path, ``benchmarks/gpu_fast.sh``; the default is only where it is measured to win): the CUDA schedule
  of [`fast_cuda`][examples.span_sr.fast_cuda]: the fused kernels of
  [`fast_kernels`][examples.span_sr.fast_kernels], one launch per conv with its epilogue (bias,
  SiLU, the SPAB gate and residual, the concat feeding ``conv_cat``, the pixel shuffle) fused in,
  NHWC float32 activations with channels padded to a power of two (26 -> 32), tensor-core
  ``tf32x3`` dots, replayed as one CUDA graph per input shape. On CPU it runs only under
  Triton's interpreter (``TRITON_INTERPRET=1``), which the tests use.
* ``"eager"``: the deploy model's own forward (the fallback; no speed-up).

Output bound: for every dtype offered (see ``OFFERED_DTYPES``) the ``uint8`` outputs differ
from the fp32 eager forward by at most one level on every pixel of Set5, Set14 and B100 and the
Y-PSNR by at most 0.01 dB (measured by ``benchmarks/bench_span_fast.py --bound``). The CPU path
offers float32 only. So does the CUDA path (``tf32x3`` dots): within the bound emulated on CPU
(``benchmarks/bench_span_gpu.py --emulate``); ``bench_span_gpu.py --bound`` measures it on a
GPU (still to be run). The output is float32.

``--fast`` and ``--half``: ``--half`` converts the eager model to fp16 (CUDA) and is not within
the bound; ``--fast`` runs the fast path in float32, its only dtype, and refuses ``--half``.
"""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Callable
from typing import Any, Literal, cast

import torch
from torch import nn

from examples.span_sr.arch import SPAN, Conv3XC
from examples.span_sr.fast_cuda import cuda_schedule

__all__ = ["OFFERED_DTYPES", "Backend", "FastSPAN", "check_deploy", "fast_span", "resolve_backend"]

Backend = Literal["auto", "triton", "inductor", "onnxruntime", "eager"]
_BACKENDS = ("auto", "triton", "inductor", "onnxruntime", "eager")

#: Compute dtypes each backend offers: those within the output bound. float16 and bfloat16
#: fail it (``bench_span_fast.py --bound``: fp16 storage in the triton kernels, emulated on CPU,
#: is 5 uint8 levels off somewhere in Set5/Set14/B100; bf16 17 to 37), so only float32 is offered.
OFFERED_DTYPES: dict[str, tuple[torch.dtype, ...]] = {
    "triton": (torch.float32,),
    "inductor": (torch.float32,),
    "onnxruntime": (torch.float32,),
    "eager": (torch.float32,),
}


def check_deploy(model: nn.Module) -> SPAN:
    """Return ``model`` as a deploy-form SPAN, or raise saying how to make it one.

    Raises:
        TypeError: ``model`` is not a [`SPAN`][examples.span_sr.arch.SPAN].
        ValueError: it still has LoRA layers (merge them) or train-form ``Conv3XC`` layers
            (reparameterize them).
    """
    import convlora

    if not isinstance(model, SPAN):
        raise TypeError(f"fast_span needs a SPAN (examples.span_sr.arch), got {type(model).__name__}; "
                        "load checkpoints with examples.span_sr.arch.load_span.")
    lora = list(convlora.lora_layers(model))
    if lora:
        raise ValueError(f"fast_span needs a merged model, but {len(lora)} LoRA layer(s) remain "
                         f"({lora[0]}, ...); merge them first: model = convlora.unload(model, merge=True).")
    train = [name for name, m in model.named_modules() if isinstance(m, Conv3XC) and m.form != "deploy"]
    if train:
        raise ValueError(f"fast_span needs the deploy form, but {len(train)} Conv3XC layer(s) are in "
                         f"train form ({train[0]}, ...); fuse them first: model.reparameterize().")
    return model


def _has_cxx() -> bool:
    names = [os.environ.get("CXX", ""), "g++", "c++", "clang++"]
    return any(n and shutil.which(n) for n in names)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _has_onnxruntime() -> bool:
    import importlib.util

    return importlib.util.find_spec("onnxruntime") is not None


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend ``"auto"`` stands for on ``device`` (other names pass through).

    On CUDA: ``"eager"`` (one line says why: the CUDA schedule, ``"triton"``, is not yet measured
    on a GPU). On CPU: ``"inductor"`` when a C++ compiler is found, else ``"onnxruntime"`` when it is
    installed, else ``"eager"``; each fallback prints one line saying why.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {_BACKENDS}.")
    if backend != "auto":
        return backend

    if device.type == "cuda":  # the CUDA schedule (backend="triton") is opt-in until a GPU run measures it
        print("fast_span: on CUDA 'auto' is the eager forward until the CUDA schedule is measured on a GPU "
              "(benchmarks/gpu_fast.sh); pass backend='triton' to use it.")
        return "eager"
    if device.type != "cpu":
        return "eager"
    if _has_cxx():
        return "inductor"
    if _has_onnxruntime():
        print("fast_span: no C++ compiler found for torch.compile (set CXX or install g++); "
              "using ONNX Runtime.")
        return "onnxruntime"
    print("fast_span: neither a C++ compiler (for torch.compile) nor onnxruntime is available; "
          "using the eager forward.")
    return "eager"


class FastSPAN(nn.Module):
    """A deploy SPAN's fast forward; made by [`fast_span`][examples.span_sr.fast.fast_span].

    Behaves like the model for the SR scripts: ``upscale`` is the model's, ``parameters()`` are
    the source model's (float32, on its device: inputs follow them), and ``forward`` maps a
    float ``(N, C, H, W)`` image in [0, 1] to the float32 SR output, without gradients.

    Attributes:
        backend: The concrete backend (``"inductor"``, ``"onnxruntime"``, ``"triton"`` or
            ``"eager"``).
        dtype: The compute dtype.
    """

    def __init__(self, model: SPAN, run: Callable[[torch.Tensor], torch.Tensor], backend: str,
                 dtype: torch.dtype, block_m: int = 64) -> None:
        super().__init__()
        self.model = model
        self.upscale: int = model.upscale
        self.backend, self.dtype, self.block_m = backend, dtype, block_m
        self._run = run

    def __deepcopy__(self, memo: dict[int, Any]) -> FastSPAN:
        """A fresh fast path of a copy of the model (compiled code and sessions are not copied)."""
        backend = cast(Backend, self.backend)
        return fast_span(copy.deepcopy(self.model, memo), self.dtype, backend, self.block_m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.model.num_in_ch:
            raise ValueError(f"FastSPAN needs an (N, {self.model.num_in_ch}, H, W) image batch, got shape "
                             f"{tuple(x.shape)}.")
        with torch.no_grad():
            return self._run(x).float()

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}, dtype={str(self.dtype).removeprefix('torch.')}"


class _Inductor:
    """torch.compile (inductor, freezing) of a copy of the model.

    Shapes: the first input shape compiles with static sizes; a second distinct shape compiles
    once more with dynamic sizes (torch's automatic dynamic shapes), which then serves every
    later shape, so a run meets at most a few compiles (one per changed dimension). When
    compiling fails, it falls back to ONNX Runtime, else to the eager forward, printing one line.
    """

    def __init__(self, model: SPAN) -> None:
        self.model = model
        self.net = copy.deepcopy(model).eval().requires_grad_(False)
        self.run: Any = torch.compile(self.net, options={"freezing": True})
        self.compiled = True
        self.first = True

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.first:
            self.first = False
            print("fast_span: compiling (torch.compile, inductor): the first call takes seconds, and "
                  "so does the first call at a second input shape; later calls are fast.")
        try:
            return cast(torch.Tensor, self.run(x.float()))
        except Exception as err:  # noqa: BLE001 - a broken toolchain falls back, saying so
            if not self.compiled:
                raise
            self.compiled = False
            self.run = _OnnxRuntime(self.model) if _has_onnxruntime() else self.net
            name = "ONNX Runtime" if _has_onnxruntime() else "the eager forward"
            print(f"fast_span: torch.compile failed ({type(err).__name__}: {str(err)[:120]}); "
                  f"using {name}.")
            return cast(torch.Tensor, self.run(x.float()))


class _OnnxRuntime:
    """ONNX Runtime (CPU provider, all graph optimisations) on the model exported in memory."""

    def __init__(self, model: SPAN) -> None:
        import io
        import warnings

        import onnxruntime as ort

        net = copy.deepcopy(model).float().cpu().eval()
        buf = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
            torch.onnx.export(net, (torch.rand(1, net.num_in_ch, 32, 32),), buf,  # type: ignore[arg-type]
                              dynamo=False, opset_version=17, input_names=["lr"], output_names=["sr"],
                              dynamic_axes={"lr": {0: "n", 2: "h", 3: "w"}, "sr": {0: "n", 2: "H", 3: "W"}})
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = torch.get_num_threads(), 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(buf.getvalue(), options, providers=["CPUExecutionProvider"])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        arr = x.detach().float().cpu().contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {"lr": arr})[0]).to(x.device)


def fast_span(model: nn.Module, dtype: torch.dtype = torch.float32, backend: Backend = "auto",
              block_m: int = 64) -> FastSPAN:
    """The fast forward of a deploy-form SPAN: same output, less time.

    Args:
        model: A deploy-form [`SPAN`][examples.span_sr.arch.SPAN] of any width, on the device
            to run on; LoRA adapters merged (``convlora.unload(model, merge=True)``) and
            train-form convs fused (``model.reparameterize()``). It is not modified.
        dtype: Compute dtype; one of ``OFFERED_DTYPES[backend]`` (float32 only: float16 and
            bfloat16 exceed the output bound).
        backend: ``"auto"`` (on CPU inductor, else onnxruntime, else eager; eager on CUDA
            until the triton schedule is measured there, and elsewhere), or one by name.
        block_m: Pixels per program of the triton kernels.

    Returns:
        A [`FastSPAN`][examples.span_sr.fast.FastSPAN] (an ``nn.Module``).

    Raises:
        TypeError, ValueError: a model that is not a deploy SPAN (the message says how to make
            it one), an unknown backend, a dtype the backend does not offer, or the triton
            backend on CPU without ``TRITON_INTERPRET=1``.
    """
    spanm = check_deploy(model)
    device = spanm.mean.device
    name = resolve_backend(backend, device)
    if dtype not in OFFERED_DTYPES[name]:
        offered = ", ".join(str(d).removeprefix("torch.") for d in OFFERED_DTYPES[name])
        raise ValueError(f"dtype={dtype} is not offered by the {name} backend (offered: {offered}): "
                         "other dtypes exceed the output bound of 1 uint8 level / 0.01 dB.")
    if block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"block_m={block_m} must be a power of two >= 16.")
    if name == "triton":
        if device.type != "cuda" and not _interpreting():
            raise ValueError(f"the triton backend needs a CUDA model (got {device}); on CPU use "
                             "backend='inductor', or set TRITON_INTERPRET=1 before importing triton (tests).")
        return FastSPAN(spanm, cuda_schedule(spanm, dtype, block_m), name, dtype, block_m)
    if name == "inductor" and not _has_cxx():
        raise ValueError("backend='inductor' needs a C++ compiler (set CXX or install g++); use "
                         "backend='auto' or 'onnxruntime'.")
    if name == "inductor":
        return FastSPAN(spanm, _Inductor(spanm), name, dtype)
    if name == "onnxruntime":
        return FastSPAN(spanm, _OnnxRuntime(spanm), name, dtype)
    eager = copy.deepcopy(spanm).eval()
    return FastSPAN(spanm, lambda x: eager(x.float()), "eager", dtype)
