"""Triton kernels of the fast SPAN forward: every conv with its epilogue fused, NHWC, padded channels.

One kernel launch per conv of the deploy SPAN, 21 in all, each reading its input once and writing
its output once (the eager forward makes 2 to 5 more element-wise passes per conv):

* ``conv_1``: the input normalisation ``(x - mean) * img_range`` is applied while loading the
  NCHW image (padded taps stay exactly zero, as in the eager forward, where the padding is
  applied *after* the normalisation);
* each SPAB: ``c1`` + bias + SiLU, ``c2`` + bias + SiLU, ``c3`` + bias followed by the block tail
  ``(out3 + x) * (sigmoid(out3) - 0.5)``;
* ``conv_2`` + bias, then, in the same kernel and on the tile still in registers, the 1x1
  ``conv_cat`` over the concatenation ``[feat, conv_2 out, out_b1, out_b6_1]``: four matmuls,
  the concatenated tensor never exists;
* the upsampler's 3x3 conv + bias, stored straight through the pixel shuffle into the NCHW
  output.

Activations are NHWC with the channel dimension zero-padded to a power of two of at least 16
(26 or 28 -> 32), which is what ``tl.dot`` needs. The padded weight rows and columns and the
padded biases are zero, so padded channels are exactly zero after every epilogue (SiLU(0) = 0,
and the tail multiplies by ``sigmoid(0) - 0.5 = 0``): padding changes no output bit of the real
channels' arithmetic except through summation order. Accumulation is float32; activations are
stored in the weights' dtype (float32, float16 or bfloat16); fp32 dots take their
``input_precision`` from ``DOT_PREC``: ``"tf32x3"`` on GPUs with TF32 (tensor cores at about
fp32 accuracy), ``"ieee"`` elsewhere (see [`dot_precision`][examples.span_sr.fast_cuda.dot_precision]).

Launched with 8 warps by [`fast_cuda`][examples.span_sr.fast_cuda], no kernel spills registers
(checked on the sm_80 and sm_90 code compiled ahead of time, which needs no GPU: tests).
The batch and image size (``N``, ``H``, ``W``) are not specialised on, so a new input shape
reuses the compiled kernels (Triton would otherwise compile again for every new combination of
sizes divisible by 16 or equal to 1). The launches and their CUDA graphs are in
[`fast_cuda`][examples.span_sr.fast_cuda].

The kernels run on CUDA and, for the tests, on CPU through Triton's interpreter
(``TRITON_INTERPRET=1`` set before Triton is imported).
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["conv3x3_cat_kernel", "conv_kernel", "conv_shuffle_kernel"]


@triton.jit
def _pixels(N, H, W, BLOCK_M: tl.constexpr):
    """This program's ``BLOCK_M`` flat pixel indices, the pixel count, and each index's
    ``(n, h, w)`` in an ``N x H x W`` grid (the rows every kernel here works on)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    hw = offs_m % (H * W)
    return offs_m, N * H * W, offs_m // (H * W), hw // W, hw % W


@triton.jit
def _conv_tile(x_ptr, w_ptr, mean_ptr, scale, offs_m, n, h, w, H, W, total, c_in,
               sxn, sxh, sxw, sxc,
               KS: tl.constexpr, CPI: tl.constexpr, CPO: tl.constexpr, NORM: tl.constexpr,
               DOT_PREC: tl.constexpr):
    """fp32 ``[BLOCK_M, CPO]`` conv output (no bias) at the pixels ``offs_m``, zero padding.

    The taps are a loop, not unrolled: Triton pipelines its loads through shared memory, and
    the unrolled form needs more than the 255 registers a thread has (at 4 warps it spilled to
    local memory in 4 of the 5 fp32 kernels compiled for sm_80, and in the upsampler for sm_90:
    ``bench_span_gpu.py --resources``).
    """
    ci = tl.arange(0, CPI)
    co = tl.arange(0, CPO)
    c_ok = ci < c_in
    m_ok = offs_m < total
    acc = tl.zeros((offs_m.shape[0], CPO), dtype=tl.float32)
    if NORM:
        mean = tl.load(mean_ptr + ci, mask=c_ok, other=0.0)
    for t in range(KS * KS):
        hh = h + (t // KS - KS // 2)
        ww = w + (t % KS - KS // 2)
        ok = m_ok & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
        msk = ok[:, None] & c_ok[None, :]
        ptrs = x_ptr + n[:, None] * sxn + hh[:, None] * sxh + ww[:, None] * sxw + ci[None, :] * sxc
        a = tl.load(ptrs, mask=msk, other=0.0)
        if NORM:
            a = tl.where(msk, (a.to(tl.float32) - mean[None, :]) * scale, 0.0)
        a = a.to(w_ptr.dtype.element_ty)
        wt = tl.load(w_ptr + t * CPI * CPO + ci[:, None] * CPO + co[None, :])
        acc = tl.dot(a, wt, acc, input_precision=DOT_PREC)
    return acc


@triton.jit(do_not_specialize=["N", "H", "W", "sxn", "sxh", "sxw", "sxc"])
def conv_kernel(x_ptr, w_ptr, b_ptr, res_ptr, y_ptr, mean_ptr, scale, N, H, W, c_in,
                sxn, sxh, sxw, sxc,
                KS: tl.constexpr, CPI: tl.constexpr, CPO: tl.constexpr, MODE: tl.constexpr,
                NORM: tl.constexpr, BLOCK_M: tl.constexpr, DOT_PREC: tl.constexpr):
    """``y = epilogue(conv(x) + b)`` into a padded NHWC ``y`` of ``CPO`` channels.

    ``MODE`` 0: identity; 1: SiLU; 2: the SPAB tail ``(v + res) * (sigmoid(v) - 0.5)`` with
    ``res`` a padded NHWC tensor like ``y``. ``NORM``: the input is the image, read through its
    strides ``sx*`` (any layout) and normalised while loading; otherwise it is a padded NHWC
    activation of ``CPI`` channels and the strides passed are ignored (they follow from ``CPI``,
    which keeps the loads' alignment known to the compiler).
    """
    offs_m, total, n, h, w = _pixels(N, H, W, BLOCK_M)
    if NORM:
        acc = _conv_tile(x_ptr, w_ptr, mean_ptr, scale, offs_m, n, h, w, H, W, total, c_in,
                         sxn, sxh, sxw, sxc, KS, CPI, CPO, True, DOT_PREC)
    else:
        acc = _conv_tile(x_ptr, w_ptr, mean_ptr, scale, offs_m, n, h, w, H, W, total, c_in,
                         H * W * CPI, W * CPI, CPI, 1, KS, CPI, CPO, False, DOT_PREC)
    co = tl.arange(0, CPO)
    acc += tl.load(b_ptr + co)[None, :]
    out_offs = offs_m[:, None] * CPO + co[None, :]
    m_ok = (offs_m < total)[:, None]
    if MODE == 1:
        acc = acc * tl.sigmoid(acc)
    if MODE == 2:
        res = tl.load(res_ptr + out_offs, mask=m_ok, other=0.0).to(tl.float32)
        acc = (acc + res) * (tl.sigmoid(acc) - 0.5)
    tl.store(y_ptr + out_offs, acc.to(y_ptr.dtype.element_ty), mask=m_ok)


@triton.jit(do_not_specialize=["N", "H", "W"])
def conv3x3_cat_kernel(x_ptr, w_ptr, b_ptr, feat_ptr, b1_ptr, b61_ptr, wcat_ptr, bcat_ptr, y_ptr,
                       N, H, W, c_in,
                       CP: tl.constexpr, CPC: tl.constexpr, BLOCK_M: tl.constexpr,
                       DOT_PREC: tl.constexpr):
    """``conv_2`` (3x3 + bias) and then ``conv_cat`` over ``[feat, conv_2 out, b1, b6_1]``.

    ``wcat`` holds four ``[CP, CPC]`` slabs, one per concatenated input, in that order.
    """
    offs_m, total, n, h, w = _pixels(N, H, W, BLOCK_M)
    acc = _conv_tile(x_ptr, w_ptr, b_ptr, 1.0, offs_m, n, h, w, H, W, total, c_in,
                     H * W * CP, W * CP, CP, 1, 3, CP, CP, False, DOT_PREC)
    c = tl.arange(0, CP)
    cc = tl.arange(0, CPC)
    acc += tl.load(b_ptr + c)[None, :]
    dt = wcat_ptr.dtype.element_ty
    m_ok = (offs_m < total)[:, None]
    in_offs = offs_m[:, None] * CP + c[None, :]
    slab = c[:, None] * CPC + cc[None, :]
    out = tl.zeros((BLOCK_M, CPC), dtype=tl.float32)
    out = tl.dot(tl.load(feat_ptr + in_offs, mask=m_ok, other=0.0), tl.load(wcat_ptr + slab), out,
                 input_precision=DOT_PREC)
    out = tl.dot(acc.to(dt), tl.load(wcat_ptr + CP * CPC + slab), out, input_precision=DOT_PREC)
    out = tl.dot(tl.load(b1_ptr + in_offs, mask=m_ok, other=0.0),
                 tl.load(wcat_ptr + 2 * CP * CPC + slab), out, input_precision=DOT_PREC)
    out = tl.dot(tl.load(b61_ptr + in_offs, mask=m_ok, other=0.0),
                 tl.load(wcat_ptr + 3 * CP * CPC + slab), out, input_precision=DOT_PREC)
    out += tl.load(bcat_ptr + cc)[None, :]
    tl.store(y_ptr + offs_m[:, None] * CPC + cc[None, :], out.to(y_ptr.dtype.element_ty), mask=m_ok)


@triton.jit(do_not_specialize=["N", "H", "W"])
def conv_shuffle_kernel(x_ptr, w_ptr, b_ptr, y_ptr, N, H, W, c_in, c_out,
                        CPI: tl.constexpr, CPO: tl.constexpr, S: tl.constexpr,
                        BLOCK_M: tl.constexpr, DOT_PREC: tl.constexpr):
    """The upsampler: 3x3 conv + bias stored through ``PixelShuffle(S)`` into NCHW ``y``.

    Conv output channel ``k = c * S * S + i * S + j`` at LR pixel ``(h, w)`` is output channel
    ``c`` at ``(h * S + i, w * S + j)``; ``y`` has ``c_out`` (image) channels.
    """
    offs_m, total, n, h, w = _pixels(N, H, W, BLOCK_M)
    acc = _conv_tile(x_ptr, w_ptr, b_ptr, 1.0, offs_m, n, h, w, H, W, total, c_in,
                     H * W * CPI, W * CPI, CPI, 1, 3, CPI, CPO, False, DOT_PREC)
    k = tl.arange(0, CPO)
    acc += tl.load(b_ptr + k)[None, :]
    c = k // (S * S)
    i = (k // S) % S
    j = k % S
    rows = h[:, None] * S + i[None, :]
    cols = w[:, None] * S + j[None, :]
    offs = ((n[:, None] * c_out + c[None, :]) * (H * S) + rows) * (W * S) + cols
    ok = (offs_m < total)[:, None] & (k < c_out * S * S)[None, :]
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=ok)
