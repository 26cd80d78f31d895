"""The CUDA schedule of the fast SPAN forward: fused Triton launches, replayed as CUDA graphs.

[`fast_span`][examples.span_sr.fast.fast_span] with ``backend="triton"`` (opt-in: ``"auto"`` stays
eager on CUDA until a GPU run has measured this schedule) runs [`cuda_schedule`][examples.span_sr.fast_cuda.cuda_schedule], which stacks:

1. **Fused kernels** ([`fast_kernels`][examples.span_sr.fast_kernels]): one launch per conv, 21
   in all, each conv's epilogue in the same launch (bias, SiLU, the SPAB gate
   ``(out3 + x) * (sigmoid(out3) - 0.5)``, the concatenation feeding ``conv_cat``, the pixel
   shuffle). The eager forward makes about 60 launches (21 convs plus their element-wise
   passes), each reading and writing a whole activation.
2. **NHWC, channels padded** to a power of two of at least 16
   ([`pad_channels`][examples.span_sr.fast_cuda.pad_channels]: 26 or 28 -> 32, the
   upsampler's 48 -> 64): the shape ``tl.dot`` and the tensor cores take. Padded weights and
   biases are zero, so padded channels stay exactly zero (SiLU(0) = 0, the gate multiplies by
   ``sigmoid(0) - 0.5 = 0``); it costs (32/26)^2 = 1.5x the arithmetic, which is not the bound.
3. **Tensor cores at float32 accuracy**: activations are stored in float32 and the dots run
   as ``tf32x3`` (each operand split into a TF32 high and low part, three TF32 products, fp32
   accumulation: about 2^-21 relative error instead of TF32's 2^-11), on GPUs with TF32
   (compute capability 8.0 and up; ``"ieee"`` FMA dots below, and in Triton's interpreter).
   Emulated on CPU over every pixel of Set5, Set14 and B100 (``bench_span_gpu.py --emulate``),
   ``tf32x3`` stays within 1 uint8 level of fp32 eager (2.5e-5 of the values off) and so does
   ``bf16x3`` (three bf16 products, 4.1e-4 off; a candidate), while one TF32 product is 5 levels
   off somewhere, as fp16 storage is (``bench_span_fast.py --bound``): neither is offered. The
   kernels still take fp16 / bf16 storage and TF32 / ``bf16x3`` dots, which the GPU benchmark
   measures as candidates.
4. **CUDA graphs**: the 21 launches (and the output allocation) of one input shape are
   captured once and replayed ([`CudaGraphs`][examples.span_sr.fast_cuda.CudaGraphs]); a new
   shape (batch, size, dtype or memory layout) is captured on first use, up to ``max_graphs``
   shapes (the least recently used is dropped beyond that, saying so once). When capturing
   fails, the schedule says so in one line and runs the launches directly from then on.

What each step buys on a GPU is measured by ``benchmarks/bench_span_gpu.py`` (docs/span_sr.md);
on an H200 it is still to be measured.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol, cast

import torch
from torch import nn

from examples.span_sr.arch import SPAN

__all__ = ["CapturedGraph", "CudaGraphs", "DotPrecision", "ScheduleCost", "TritonSPAN",
           "cuda_schedule", "dot_precision", "pad_channels"]

DotPrecision = Literal["ieee", "tf32x3", "bf16x3", "tf32"]
_PRECISIONS = ("ieee", "tf32x3", "bf16x3", "tf32")


def pad_channels(c: int) -> int:
    """The padded width of a ``c``-channel activation: the next power of two, at least 16.

    ``tl.dot`` needs power-of-two tiles of at least 16 (Triton's block shapes), which also fit
    the tensor cores' K multiples of 8 (TF32) or 16 (fp16 / bf16).

    Raises:
        ValueError: ``c`` is not a positive channel count.
    """
    if c < 1:
        raise ValueError(f"channel count {c} must be >= 1.")
    p = 16
    while p < c:
        p *= 2
    return p


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def dot_precision(dtype: torch.dtype, device: torch.device) -> DotPrecision:
    """The ``tl.dot`` input precision of the schedule for storage ``dtype`` on ``device``.

    float32: ``"tf32x3"`` on CUDA GPUs with TF32 (compute capability >= 8.0), else ``"ieee"``
    (older GPUs, and Triton's interpreter on CPU). float16 / bfloat16 storage: ``"tf32"`` (the
    value is ignored for 16-bit operands, which always use their own tensor-core path).
    """
    if dtype != torch.float32:
        return "tf32"
    if device.type == "cuda" and not _interpreting() and torch.cuda.get_device_capability(device) >= (8, 0):
        return "tf32x3"
    return "ieee"


@dataclass(frozen=True)
class ScheduleCost:
    """Arithmetic and ideal memory traffic of one forward of the fused schedule.

    Attributes:
        macs: Multiply-accumulates of the real (unpadded) channels.
        padded_macs: Multiply-accumulates the kernels issue (padded channels).
        bytes: DRAM bytes if every launch reads each input tensor and its weights once and
            writes its output once (halo re-reads hit the cache).
        launches: Kernel launches.
    """

    macs: int
    padded_macs: int
    bytes: int
    launches: int


_Packed = tuple[torch.Tensor, torch.Tensor]


class TritonSPAN:
    """Packed, padded weights of a deploy SPAN and the 21 fused launches of its forward.

    Args:
        model: A deploy-form SPAN (checked by the caller), on the device to run on.
        dtype: Storage dtype of activations and weights (accumulation is always float32).
        block_m: Pixels per program (a power of two >= 16).
        precision: ``tl.dot`` input precision; default
            [`dot_precision`][examples.span_sr.fast_cuda.dot_precision].
        num_warps: Warps per program (Triton's launch option). With 8 (and ``block_m`` 32 to
            128) no kernel spills registers on sm_80 or sm_90; with 4 the fp32 ones come close.
    """

    def __init__(self, model: SPAN, dtype: torch.dtype = torch.float32, block_m: int = 64,
                 precision: DotPrecision | None = None, num_warps: int = 8) -> None:
        dev = model.mean.device
        self.prec: DotPrecision = precision or dot_precision(dtype, dev)
        if self.prec not in _PRECISIONS:
            raise ValueError(f"precision={self.prec!r} is not one of {_PRECISIONS}.")
        self.dtype, self.block_m, self.num_warps = dtype, block_m, num_warps
        self.c, self.cat = model.feature_channels, model.conv_cat_channels
        self.cp, self.cpc, self.cpi = (pad_channels(self.c), pad_channels(self.cat),
                                       pad_channels(model.num_in_ch))
        self.c_in, self.c_out, self.s = model.num_in_ch, model.num_out_ch, model.upscale
        self.cpo = pad_channels(self.c_out * self.s**2)
        self.scale = float(model.img_range)
        self.mean = torch.zeros(self.cpi, device=dev)
        self.mean[: self.c_in] = model.mean.detach().float().flatten()
        self.conv_1 = self._conv(model.conv_1.eval_conv, self.cpi, self.cp)
        self.blocks = [tuple(self._conv(getattr(b, f"c{i}_r").eval_conv, self.cp, self.cp) for i in (1, 2, 3))
                       for b in (model.block_1, model.block_2, model.block_3, model.block_4,
                                 model.block_5, model.block_6)]
        self.conv_2 = self._conv(model.conv_2.eval_conv, self.cp, self.cp)
        wc = model.conv_cat.weight.detach().float()[:, :, 0, 0].t()  # (4C, cat)
        self.wcat = torch.zeros(4, self.cp, self.cpc, device=dev)
        for i in range(4):
            self.wcat[i, : self.c, : self.cat] = wc[i * self.c: (i + 1) * self.c]
        self.wcat = self.wcat.to(dtype).contiguous()
        self.bcat = self._bias(model.conv_cat, self.cpc)
        self.up = self._conv(cast(nn.Conv2d, model.upsampler[0]), self.cpc, self.cpo)

    def _bias(self, conv: nn.Conv2d, cpo: int) -> torch.Tensor:
        b = torch.zeros(cpo, device=conv.weight.device)
        if conv.bias is not None:
            b[: conv.out_channels] = conv.bias.detach().float()
        return b

    def _conv(self, conv: nn.Conv2d, cpi: int, cpo: int) -> _Packed:
        w = conv.weight.detach().float()
        k = w.shape[-1]
        taps = w.permute(2, 3, 1, 0).reshape(k * k, w.shape[1], w.shape[0])
        packed = torch.zeros(k * k, cpi, cpo, device=w.device)
        packed[:, : w.shape[1], : w.shape[0]] = taps
        return packed.to(self.dtype).contiguous(), self._bias(conv, cpo)

    def cost(self, n: int, h: int, w: int) -> ScheduleCost:
        """Arithmetic and ideal DRAM traffic of one ``n x h x w`` (LR) forward, from the shapes."""
        px = n * h * w
        e = torch.empty((), dtype=self.dtype).element_size()
        real = padded = traffic = 0

        def conv(taps: int, ci: int, co: int, cpi: int, cpo: int, reads: int, out_bytes: int) -> None:
            nonlocal real, padded, traffic
            real += px * taps * ci * co
            padded += px * taps * cpi * cpo
            traffic += reads + taps * cpi * cpo * e + cpo * 4 + out_bytes

        act = px * self.cp * e  # one padded NHWC trunk activation
        conv(9, self.c_in, self.c, self.cpi, self.cp, px * self.c_in * 4, act)
        for _ in self.blocks:
            conv(9, self.c, self.c, self.cp, self.cp, act, act)  # c1 + SiLU
            conv(9, self.c, self.c, self.cp, self.cp, act, act)  # c2 + SiLU
            conv(9, self.c, self.c, self.cp, self.cp, 2 * act, act)  # c3 + gate (reads the residual)
        conv(9, self.c, self.c, self.cp, self.cp, act, 0)  # conv_2: its output stays in registers
        conv(4, self.c, self.cat, self.cp, self.cpc, 3 * act, px * self.cpc * e)  # conv_cat
        conv(9, self.cat, self.c_out * self.s**2, self.cpc, self.cpo, px * self.cpc * e,
             px * self.c_out * self.s**2 * 4)
        return ScheduleCost(macs=real, padded_macs=padded, bytes=traffic, launches=1 + 3 * len(self.blocks) + 2)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.device != self.mean.device:
            raise ValueError(f"the input is on {x.device} but the fast path's model is on "
                             f"{self.mean.device}; move the input there: x.to('{self.mean.device}').")
        from examples.span_sr import fast_kernels as fk  # needs triton: imported only here

        n, _, h, w = x.shape
        bm, cp, dt, nw = self.block_m, self.cp, self.dtype, self.num_warps
        grid = ((n * h * w + bm - 1) // bm,)

        def act(c: int) -> torch.Tensor:
            return torch.empty(n, h, w, c, device=x.device, dtype=dt)

        def conv(src: torch.Tensor, wb: _Packed, mode: int, res: torch.Tensor | None = None) -> torch.Tensor:
            out = act(cp)
            fk.conv_kernel[grid](src, wb[0], wb[1], out if res is None else res, out, self.mean, 1.0,
                                 n, h, w, self.c, h * w * cp, w * cp, cp, 1, KS=3, CPI=cp, CPO=cp,
                                 MODE=mode, NORM=False, BLOCK_M=bm, DOT_PREC=self.prec, num_warps=nw)
            return out

        feat = act(cp)
        fk.conv_kernel[grid](x, self.conv_1[0], self.conv_1[1], feat, feat, self.mean, self.scale,
                             n, h, w, self.c_in, x.stride(0), x.stride(2), x.stride(3), x.stride(1),
                             KS=3, CPI=self.cpi, CPO=cp, MODE=0, NORM=True, BLOCK_M=bm,
                             DOT_PREC=self.prec, num_warps=nw)
        cur, b1, b61 = feat, feat, feat
        for i, (w1, w2, w3) in enumerate(self.blocks):
            t1 = conv(cur, w1, 1)
            cur = conv(conv(t1, w2, 1), w3, 2, res=cur)
            b1 = cur if i == 0 else b1
            b61 = t1
        cat = act(self.cpc)
        fk.conv3x3_cat_kernel[grid](cur, self.conv_2[0], self.conv_2[1], feat, b1, b61, self.wcat,
                                    self.bcat, cat, n, h, w, self.c, CP=cp, CPC=self.cpc,
                                    BLOCK_M=bm, DOT_PREC=self.prec, num_warps=nw)
        y = torch.empty(n, self.c_out, h * self.s, w * self.s, device=x.device, dtype=torch.float32)
        fk.conv_shuffle_kernel[grid](cat, self.up[0], self.up[1], y, n, h, w, self.cat, self.c_out,
                                     CPI=self.cpc, CPO=self.cpo, S=self.s, BLOCK_M=bm,
                                     DOT_PREC=self.prec, num_warps=nw)
        return y


class CapturedGraph(Protocol):
    """One captured forward: ``replay()`` recomputes ``static_out`` from ``static_in``."""

    static_in: torch.Tensor
    static_out: torch.Tensor

    def replay(self) -> None:
        """Run the captured work again on the current contents of ``static_in``."""


class _TorchGraph:
    """``torch.cuda.CUDAGraph`` of ``fn`` on a static copy of ``example`` (warmed up first)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], example: torch.Tensor) -> None:
        self.static_in = example.clone()  # same strides for a dense input
        stream = torch.cuda.Stream(example.device)
        stream.wait_stream(torch.cuda.current_stream(example.device))
        with torch.cuda.stream(stream):
            fn(self.static_in)  # compiles the kernels (not allowed during capture)
        torch.cuda.current_stream(example.device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_out = fn(self.static_in)

    def replay(self) -> None:
        self.graph.replay()


def _graph_key(x: torch.Tensor) -> tuple[object, ...]:
    return (tuple(x.shape), x.stride(), x.dtype, x.device)


class CudaGraphs:
    """Replays ``fn`` as one CUDA graph per input shape (batch, size, dtype, strides).

    A new shape runs ``fn`` directly once (its errors propagate) and is then captured; beyond
    ``max_graphs`` shapes the least recently used graph is dropped (its memory freed) and
    re-captured when it comes back, which is said once.
    When a capture fails, one line says so and ``fn`` runs directly from then on. Each call
    returns a fresh tensor (the graph's static output is copied), so outputs of earlier calls
    stay valid.

    Args:
        fn: The forward to capture; it must allocate its output and only launch GPU work.
        max_graphs: Most graphs kept (each holds its activations' memory).
        capture: Makes a [`CapturedGraph`][examples.span_sr.fast_cuda.CapturedGraph] of
            ``fn`` on an example input (default: ``torch.cuda.CUDAGraph``; tests inject one).
        log: Where the one-line notices go.
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], max_graphs: int = 8,
                 capture: Callable[[Callable[[torch.Tensor], torch.Tensor], torch.Tensor], CapturedGraph] | None = None,
                 log: Callable[[str], None] = print) -> None:
        if max_graphs < 1:
            raise ValueError(f"max_graphs={max_graphs} must be >= 1.")
        self.fn, self.max_graphs, self.log = fn, max_graphs, log
        self.capture = capture or _TorchGraph
        self.graphs: OrderedDict[tuple[object, ...], CapturedGraph] = OrderedDict()
        self.captures = 0
        self.enabled = True
        self._evicted = False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self.fn(x)
        if not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous()  # a graph replays fixed strides: keep them to two layouts
        key = _graph_key(x)
        graph = self.graphs.get(key)
        if graph is None:
            y = self.fn(x)  # the eager launches first: their errors are errors, not a fallback
            if len(self.graphs) >= self.max_graphs:
                self.graphs.popitem(last=False)
                if not self._evicted:
                    self._evicted = True
                    self.log(f"fast_span: more than {self.max_graphs} input shapes; CUDA graphs of the "
                             "least recently used shapes are dropped and re-captured when they return.")
            try:
                with torch.inference_mode(False), torch.no_grad():  # normal tensors: any later mode may copy in
                    self.graphs[key] = self.capture(self.fn, x)
            except Exception as err:  # noqa: BLE001 - a failed capture falls back, saying so
                self.enabled = False
                self.graphs.clear()
                self.log(f"fast_span: CUDA graph capture failed ({type(err).__name__}: {str(err)[:120]}); "
                         "running the fused kernels without graphs.")
            else:
                self.captures += 1
            return y
        self.graphs.move_to_end(key)
        graph.static_in.copy_(x)
        graph.replay()
        return graph.static_out.clone()


def cuda_schedule(model: SPAN, dtype: torch.dtype = torch.float32, block_m: int = 64,
                  graphs: bool = True, max_graphs: int = 8) -> Callable[[torch.Tensor], torch.Tensor]:
    """The fast forward of a deploy SPAN on its CUDA device (or in Triton's interpreter).

    Args:
        model: A deploy-form SPAN (checked by the caller) on a CUDA device; on CPU only under
            ``TRITON_INTERPRET=1``, and then without graphs.
        dtype: Storage dtype (float32 is the one within the output bound).
        block_m: Pixels per program.
        graphs: Replay CUDA graphs (per input shape) instead of launching the kernels each call.
        max_graphs: Most shapes kept captured at once.

    Returns:
        A callable mapping an ``(N, C, H, W)`` image batch to the float32 SR output.
    """
    run = TritonSPAN(model, dtype, block_m)
    if graphs and model.mean.device.type == "cuda":
        return CudaGraphs(run, max_graphs)
    return run
