"""Decode (few rows) split-FFN products on CUDA cores: no tensor cores, no shared memory.

At M = 1 a tensor-core tile pads M to 16 and stages the packed words through shared memory; here
each program owns a block of output columns and a K-slice (split-K) and streams its weights
straight into registers, with every tensor of the inner loop one-dimensional over the program's
columns (one layout: no data ever moves between threads inside the loop):
  * light (packed) part: per 32 k, each word row of the planes (K-major, so consecutive columns
    are contiguous: 16-byte loads, 4 columns per thread) is loaded as a [BLOCK_N] vector and each
    of its codes meets one scalar of x (a broadcast load). A code c of b bits is OR-ed into the
    top of an fp32 mantissa: v = 1 + c * 2^-b exactly (one shift + one and-or, no int-to-float
    conversion, no subtraction), and sum_k x v = sum_k x + 2^-b sum_k x c. A chunk of k lies
    inside one quantization group, so per column sum_k w x = s 2^b T - s (2^b + z) sum_k x with
    T = sum_k x v: one scale and zero per column and chunk. int4 with fp16/bf16 activations
    (FAST, `_light_step4`): one logic op per code instead, the codes of a word shifted to two
    mantissa positions (1 + q 2^-11 and 1 + q 2^-7, accumulated apart); the next step's words
    are loaded before the current step is computed (a register double buffer).
  * dense (heavy) part: [BLOCK_ND, BLOCK_KD] tiles of rows (K contiguous, 16-byte loads), fp32
    products accumulated elementwise and reduced along K once per row tile; a program owns RD
    row tiles so that its bytes match a light program's.
Up to four rows of x per program (explicit per-row accumulators); more rows take more programs.
Both parts of one call run in one launch (first programs dense, the rest light) whose grid is one
full wave (programs an SM holds, from the compiled kernel's registers, times the SMs), and write
fp32 partial sums per K-slice to a workspace. Kernel A reduces them inside the same launch: the
last K-slice program of a column tile (an arrival counter per tile) adds the tile's slots in slot
order and applies bias, activation and gating (`_arrive`); kernel B's partials are added by a
second launch, `_gemv_reduce_kernel`, which also adds the bias (FUSED_MODE). Both orders are fixed:
results are bitwise repeatable. Both kernels also have atomic candidates (GemvConfig.atomic):
every K-slice adds into one fp32 accumulator and the last program of a tile reads the sums,
zeroes them and finishes the tile, no slots and no second launch; the sums then follow the
arrival order (not bitwise repeatable: FFNSPLIT_GEMV_ATOMIC=0 takes them out of the tuners).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from ffnsplit.kernels.format import QuantizedWeight, SplitFFNWeights
from ffnsplit.kernels.tiles import (
    INTERPRET,
    Tuner,
    activation,
    fence_gpu,
    pdl_options,
    pdl_trigger,
    pdl_wait,
    resident_blocks,
    sm_count,
)

STEP = 32  # k per step: one word row of the 1-bit plane, 4 of int4, 8 of int8, 2 of 2-bit
STEP_K = tl.constexpr(STEP)
ONE_BITS = 0x3F800000  # fp32 1.0, passed to the kernel at run time (see _nibble_floats)


@triton.jit
def _code_float(w, wb, ONE, rr: tl.constexpr, j: tl.constexpr, BITS: tl.constexpr):
    """1 + c * 2^-BITS (exact fp32) for code j of the words w of word row rr of a step (wb: the
    step's 1-bit plane words, 3 bits only): the code moves to the top of the mantissa of 1.0."""
    WIDTH: tl.constexpr = 8 if BITS == 8 else (4 if BITS == 4 else 2)
    TOP: tl.constexpr = 23 - BITS  # the code's lowest bit in the mantissa
    LO: tl.constexpr = WIDTH * j
    LOW_MASK: tl.constexpr = ((1 << WIDTH) - 1) << TOP
    if LO <= TOP:
        f = (w << (TOP - LO)) & LOW_MASK
    else:
        f = (w >> (LO - TOP)) & LOW_MASK
    if BITS == 3:  # bit 2 of code k = 16 rr + j sits at bit 16 (rr % 2) + j of the 1-bit word
        HB: tl.constexpr = 16 * (rr % 2) + j
        DST: tl.constexpr = TOP + 2
        if HB <= DST:
            f = f | ((wb << (DST - HB)) & (1 << DST))
        else:
            f = f | ((wb >> (HB - DST)) & (1 << DST))
    return (f | ONE).to(tl.float32, bitcast=True)


@triton.jit
def _x_at(x_ptr, stride_xm, m: tl.constexpr, M, k):
    """x[m, k] as an fp32 scalar; rows past M read row M - 1 (never stored: no mask needed)."""
    return tl.load(x_ptr + tl.minimum(M - 1, m) * stride_xm + k).to(tl.float32)


@triton.jit
def _x_row(x_ptr, stride_xm, m: tl.constexpr, M, w_off0, offs_k, mask2):
    """x[m, offs_k] as fp32, broadcast to the dense tile's shape [BLOCK_ND, BLOCK_KD] by the
    pointers (w_off0: zeros of that shape), so it shares the tile's layout (no conversion);
    rows past M read row M - 1 (never stored)."""
    row = x_ptr + tl.minimum(M - 1, m) * stride_xm
    return tl.load(row + w_off0 + offs_k[None, :], mask=mask2, other=0.0).to(tl.float32)


@triton.jit
def _light_step(tu0, tu1, tu2, tu3, tg0, tg1, tg2, tg3, xs0, xs1, xs2, xs3,
                x_ptr, stride_xm, M, p0_ptr, p1_ptr, q0_ptr, q1_ptr, N, k0, offs_n, mask_n, ONE,
                BITS: tl.constexpr, DUAL: tl.constexpr, BM: tl.constexpr):  # fmt: skip
    """Add the 32 k at k0 of W0 (p planes) to tu*, of W1 (q planes, DUAL) to tg*, and the x
    values to xs* (row m of x -> accumulators *m)."""
    PACK: tl.constexpr = 32 // (8 if BITS == 8 else (4 if BITS == 4 else 2))
    ROWS: tl.constexpr = STEP_K // PACK
    if BITS == 3:
        wb = tl.load(p1_ptr + (k0 // 32) * N + offs_n, mask=mask_n, other=0)
        vb = wb
        if DUAL:
            vb = tl.load(q1_ptr + (k0 // 32) * N + offs_n, mask=mask_n, other=0)
    else:
        wb = 0
        vb = 0
    for rr in tl.static_range(ROWS):
        w = tl.load(p0_ptr + (k0 // PACK + rr) * N + offs_n, mask=mask_n, other=0)
        v = w
        if DUAL:
            v = tl.load(q0_ptr + (k0 // PACK + rr) * N + offs_n, mask=mask_n, other=0)
        for j in tl.static_range(PACK):
            k = k0 + rr * PACK + j
            f = _code_float(w, wb, ONE, rr, j, BITS)
            g = f
            if DUAL:
                g = _code_float(v, vb, ONE, rr, j, BITS)
            x0 = _x_at(x_ptr, stride_xm, 0, M, k)
            tu0 += x0 * f
            tg0 += x0 * g
            xs0 += x0
            if BM > 1:
                x1 = _x_at(x_ptr, stride_xm, 1, M, k)
                tu1 += x1 * f
                tg1 += x1 * g
                xs1 += x1
            if BM > 2:
                x2 = _x_at(x_ptr, stride_xm, 2, M, k)
                x3 = _x_at(x_ptr, stride_xm, 3, M, k)
                tu2 += x2 * f
                tg2 += x2 * g
                xs2 += x2
                tu3 += x3 * f
                tg3 += x3 * g
                xs3 += x3
    return tu0, tu1, tu2, tu3, tg0, tg1, tg2, tg3, xs0, xs1, xs2, xs3


@triton.jit
def _nibble_floats(c, ONE):
    """(1 + q 2^-11, 1 + q 2^-7) for the codes q at bits 12..15 and 16..19 of c, exact fp32.
    ONE (the bits of 1.0) is a kernel argument, not a literal: the compiler then keeps it in the
    constant bank and each mask-and-or is one instruction instead of a constant move plus one."""
    lo = ((c & 0xF000) | ONE).to(tl.float32, bitcast=True)
    hi = ((c & 0xF0000) | ONE).to(tl.float32, bitcast=True)
    return lo, hi


@triton.jit
def _fma_pair(tlo, thi, xe, xo, lo, hi, x_even, x_odd):
    """tlo += x_even lo, thi += x_odd hi; xe, xo: running sums of those x."""
    return tlo + x_even * lo, thi + x_odd * hi, xe + x_even, xo + x_odd


@triton.jit
def _x_quad(x_ptr, stride_xm, m: tl.constexpr, M, k, XVEC: tl.constexpr):
    """XVEC: x[m, k : k + 4] (16-bit) as one int64, one load instead of four (the caller
    guarantees 8-byte alignment); else 0, unused. Rows past M read row M - 1."""
    quad = 0
    if XVEC:
        row = x_ptr + tl.minimum(M - 1, m) * stride_xm + k
        quad = tl.load(row.to(tl.pointer_type(tl.int64)))
    return quad


@triton.jit
def _x_pair(x_ptr, stride_xm, m: tl.constexpr, M, k, quad, j: tl.constexpr, XVEC: tl.constexpr):
    """(x[m, k], x[m, k + 1]) as fp32: halves j, j + 1 of `quad` (XVEC), else two loads."""
    if XVEC:
        DT: tl.constexpr = x_ptr.dtype.element_ty
        x_even = (quad >> (16 * j)).to(tl.int16).to(DT, bitcast=True).to(tl.float32)
        x_odd = (quad >> (16 * j + 16)).to(tl.int16).to(DT, bitcast=True).to(tl.float32)
    else:
        x_even = _x_at(x_ptr, stride_xm, m, M, k)
        x_odd = _x_at(x_ptr, stride_xm, m, M, k + 1)
    return x_even, x_odd


@triton.jit
def _load_step4(p0_ptr, q0_ptr, N, k0, offs_n, mask_n, DUAL: tl.constexpr):
    """The four int4 word rows [BLOCK_N] of the step at k0, of W0 (w*) and W1 (v*, DUAL)."""
    base = (k0 // 8) * N + offs_n
    w0 = tl.load(p0_ptr + base, mask=mask_n, other=0)
    w1 = tl.load(p0_ptr + base + N, mask=mask_n, other=0)
    w2 = tl.load(p0_ptr + base + 2 * N, mask=mask_n, other=0)
    w3 = tl.load(p0_ptr + base + 3 * N, mask=mask_n, other=0)
    v0, v1, v2, v3 = w0, w1, w2, w3
    if DUAL:
        v0 = tl.load(q0_ptr + base, mask=mask_n, other=0)
        v1 = tl.load(q0_ptr + base + N, mask=mask_n, other=0)
        v2 = tl.load(q0_ptr + base + 2 * N, mask=mask_n, other=0)
        v3 = tl.load(q0_ptr + base + 3 * N, mask=mask_n, other=0)
    return w0, w1, w2, w3, v0, v1, v2, v3


@triton.jit
def _word_rows(ul, uh, gl, gh, xe, xo, lo, hi, dlo, dhi, x_even, x_odd, DUAL: tl.constexpr):
    """One row of x: codes 2i (lo) and 2i + 1 (hi) of W0 (u*) and W1 (g*, DUAL)."""
    if DUAL:
        gl, gh, _, _ = _fma_pair(gl, gh, xe, xo, dlo, dhi, x_even, x_odd)
    ul, uh, xe, xo = _fma_pair(ul, uh, xe, xo, lo, hi, x_even, x_odd)
    return ul, uh, gl, gh, xe, xo


@triton.jit
def _word_step4(ul0, uh0, ul1, uh1, ul2, uh2, ul3, uh3, gl0, gh0, gl1, gh1, gl2, gh2, gl3, gh3,
                xe0, xo0, xe1, xo1, xe2, xo2, xe3, xo3, w, v, x_ptr, stride_xm, M, k0, ONE,
                DUAL: tl.constexpr, BM: tl.constexpr, XVEC: tl.constexpr):  # fmt: skip
    """One word row (8 k from k0) of _light_step4; XVEC: x read 4 values a load."""
    a0 = _x_quad(x_ptr, stride_xm, 0, M, k0, XVEC)
    b0 = _x_quad(x_ptr, stride_xm, 0, M, k0 + 4, XVEC)
    a1, b1, a2, b2, a3, b3 = a0, b0, a0, b0, a0, b0
    if BM > 1:
        a1 = _x_quad(x_ptr, stride_xm, 1, M, k0, XVEC)
        b1 = _x_quad(x_ptr, stride_xm, 1, M, k0 + 4, XVEC)
    if BM > 2:
        a2 = _x_quad(x_ptr, stride_xm, 2, M, k0, XVEC)
        b2 = _x_quad(x_ptr, stride_xm, 2, M, k0 + 4, XVEC)
        a3 = _x_quad(x_ptr, stride_xm, 3, M, k0, XVEC)
        b3 = _x_quad(x_ptr, stride_xm, 3, M, k0 + 4, XVEC)
    for i in tl.static_range(4):
        k = k0 + 2 * i
        if i < 2:
            c = w << (12 - 8 * i)
            d = v << (12 - 8 * i)
            q0, q1, q2, q3 = a0, a1, a2, a3
        else:
            c = w >> (8 * i - 12)
            d = v >> (8 * i - 12)
            q0, q1, q2, q3 = b0, b1, b2, b3
        lo, hi = _nibble_floats(c, ONE)
        dlo, dhi = _nibble_floats(d, ONE)
        x_even, x_odd = _x_pair(x_ptr, stride_xm, 0, M, k, q0, (2 * i) % 4, XVEC)
        ul0, uh0, gl0, gh0, xe0, xo0 = _word_rows(ul0, uh0, gl0, gh0, xe0, xo0, lo, hi, dlo, dhi,
                                                  x_even, x_odd, DUAL)  # fmt: skip
        if BM > 1:
            x_even, x_odd = _x_pair(x_ptr, stride_xm, 1, M, k, q1, (2 * i) % 4, XVEC)
            ul1, uh1, gl1, gh1, xe1, xo1 = _word_rows(ul1, uh1, gl1, gh1, xe1, xo1, lo, hi, dlo,
                                                      dhi, x_even, x_odd, DUAL)  # fmt: skip
        if BM > 2:
            x_even, x_odd = _x_pair(x_ptr, stride_xm, 2, M, k, q2, (2 * i) % 4, XVEC)
            ul2, uh2, gl2, gh2, xe2, xo2 = _word_rows(ul2, uh2, gl2, gh2, xe2, xo2, lo, hi, dlo,
                                                      dhi, x_even, x_odd, DUAL)  # fmt: skip
            x_even, x_odd = _x_pair(x_ptr, stride_xm, 3, M, k, q3, (2 * i) % 4, XVEC)
            ul3, uh3, gl3, gh3, xe3, xo3 = _word_rows(ul3, uh3, gl3, gh3, xe3, xo3, lo, hi, dlo,
                                                      dhi, x_even, x_odd, DUAL)  # fmt: skip
    return (ul0, uh0, ul1, uh1, ul2, uh2, ul3, uh3, gl0, gh0, gl1, gh1, gl2, gh2, gl3, gh3,
            xe0, xo0, xe1, xo1, xe2, xo2, xe3, xo3)  # fmt: skip


@triton.jit
def _light_step4(ul0, uh0, ul1, uh1, ul2, uh2, ul3, uh3, gl0, gh0, gl1, gh1, gl2, gh2, gl3, gh3,
                 xe0, xo0, xe1, xo1, xe2, xo2, xe3, xo3, w0, w1, w2, w3, v0, v1, v2, v3,
                 x_ptr, stride_xm, M, k0, ONE, DUAL: tl.constexpr, BM: tl.constexpr,
                 XVEC: tl.constexpr):  # fmt: skip
    """int4, 16-bit activations: the 32 k at k0 (words w*, v* from _load_step4) with one
    mask-and-or per code and one shift per two codes. Each word is shifted so that codes 2i and
    2i + 1 sit at bits 12 and 16, i.e. in the mantissa of 1.0 as 1 + q 2^-11 and 1 + q 2^-7; even
    and odd codes accumulate apart (u/g l* and h*): sum_k x q = 2^11 (Tl - sum x_even) +
    2^7 (Th - sum x_odd). xe*, xo*: sums of x over even and odd k per row."""
    acc = (ul0, uh0, ul1, uh1, ul2, uh2, ul3, uh3, gl0, gh0, gl1, gh1, gl2, gh2, gl3, gh3,
           xe0, xo0, xe1, xo1, xe2, xo2, xe3, xo3)  # fmt: skip
    acc = _word_step4(*acc, w0, v0, x_ptr, stride_xm, M, k0, ONE, DUAL, BM, XVEC)
    acc = _word_step4(*acc, w1, v1, x_ptr, stride_xm, M, k0 + 8, ONE, DUAL, BM, XVEC)
    acc = _word_step4(*acc, w2, v2, x_ptr, stride_xm, M, k0 + 16, ONE, DUAL, BM, XVEC)
    acc = _word_step4(*acc, w3, v3, x_ptr, stride_xm, M, k0 + 24, ONE, DUAL, BM, XVEC)
    return acc


@triton.jit
def _scale_pair(s_ptr, z_ptr, g, N, offs_n, mask_n, SYMMETRIC: tl.constexpr):
    """(s, z) per column of group g as fp32 (z = 8 when symmetric)."""
    s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    if SYMMETRIC:
        z = 8.0
    else:
        z = tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    return s, z


@triton.jit
def _finish4(acc, tlo, thi, s, z, xe, xo):
    """acc + sum_k w x of a chunk: s (2^11 (Tl - x_even) + 2^7 (Th - x_odd) - z sum x)."""
    return acc + s * (2048.0 * (tlo - xe) + 128.0 * (thi - xo) - z * (xe + xo))


@triton.jit
def _finish_rows4(a0, a1, a2, a3, l0, h0, l1, h1, l2, h2, l3, h3, s, z, xe0, xo0, xe1, xo1, xe2,
                  xo2, xe3, xo3, BM: tl.constexpr):  # fmt: skip
    """_finish4 for each of the program's rows of x."""
    a0 = _finish4(a0, l0, h0, s, z, xe0, xo0)
    if BM > 1:
        a1 = _finish4(a1, l1, h1, s, z, xe1, xo1)
    if BM > 2:
        a2 = _finish4(a2, l2, h2, s, z, xe2, xo2)
        a3 = _finish4(a3, l3, h3, s, z, xe3, xo3)
    return a0, a1, a2, a3


@triton.jit
def _scaled_rows(a0, a1, a2, a3, t0, t1, t2, t3, A, B, xs0, xs1, xs2, xs3, BM: tl.constexpr):
    """a_m + A T_m - B sum x_m for each of the program's rows (the exact path's chunk end)."""
    a0 += A * t0 - B * xs0
    if BM > 1:
        a1 += A * t1 - B * xs1
    if BM > 2:
        a2 += A * t2 - B * xs2
        a3 += A * t3 - B * xs3
    return a0, a1, a2, a3


@triton.jit
def _scale_terms(s_ptr, z_ptr, g, N, offs_n, mask_n, BITS: tl.constexpr,
                 SYMMETRIC: tl.constexpr):  # fmt: skip
    """(s 2^b, s (2^b + z)) per column for group g: w x summed = A T - B sum x."""
    TWO_B: tl.constexpr = float(1 << BITS)
    s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    if SYMMETRIC:
        z = TWO_B + (1 << (BITS - 1))
    else:
        z = TWO_B + tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    return s * TWO_B, s * z


@triton.jit
def _finish_chunk4(au0, au1, au2, au3, ag0, ag1, ag2, ag3, ul0, uh0, ul1, uh1, ul2, uh2, ul3, uh3,
                  gl0, gh0, gl1, gh1, gl2, gh2, gl3, gh3, xe0, xo0, xe1, xo1, xe2, xo2, xe3, xo3,
                  s_ptr, z_ptr, t_ptr, u_ptr, g, NL, cols, mask, SYMMETRIC: tl.constexpr,
                  DUAL: tl.constexpr, BM: tl.constexpr):  # fmt: skip
    """The int4 loop's chunk end (_light_step4 sums): W0's (and, DUAL, W1's) sums scaled with
    group g's scales and zeros and added to a* (up) and ag* (gate), each row of x."""
    s, z = _scale_pair(s_ptr, z_ptr, g, NL, cols, mask, SYMMETRIC)
    au0, au1, au2, au3 = _finish_rows4(au0, au1, au2, au3, ul0, uh0, ul1, uh1, ul2, uh2, ul3, uh3,
                                       s, z, xe0, xo0, xe1, xo1, xe2, xo2, xe3, xo3,
                                       BM)  # fmt: skip
    if DUAL:
        s, z = _scale_pair(t_ptr, u_ptr, g, NL, cols, mask, SYMMETRIC)
        ag0, ag1, ag2, ag3 = _finish_rows4(ag0, ag1, ag2, ag3, gl0, gh0, gl1, gh1, gl2, gh2, gl3,
                                           gh3, s, z, xe0, xo0, xe1, xo1, xe2, xo2, xe3, xo3,
                                           BM)  # fmt: skip
    return au0, au1, au2, au3, ag0, ag1, ag2, ag3


@triton.jit
def _finish_chunk(au0, au1, au2, au3, ag0, ag1, ag2, ag3, tu0, tu1, tu2, tu3, tg0, tg1, tg2, tg3,
                  xs0, xs1, xs2, xs3, s_ptr, z_ptr, t_ptr, u_ptr, g, NL, cols, mask,
                  BITS: tl.constexpr, SYMMETRIC: tl.constexpr, DUAL: tl.constexpr,
                  BM: tl.constexpr):  # fmt: skip
    """The exact loop's chunk end (_light_step sums): as _finish_chunk4."""
    a, b = _scale_terms(s_ptr, z_ptr, g, NL, cols, mask, BITS, SYMMETRIC)
    au0, au1, au2, au3 = _scaled_rows(au0, au1, au2, au3, tu0, tu1, tu2, tu3, a, b, xs0, xs1, xs2,
                                      xs3, BM)  # fmt: skip
    if DUAL:
        a, b = _scale_terms(t_ptr, u_ptr, g, NL, cols, mask, BITS, SYMMETRIC)
        ag0, ag1, ag2, ag3 = _scaled_rows(ag0, ag1, ag2, ag3, tg0, tg1, tg2, tg3, a, b, xs0, xs1,
                                          xs2, xs3, BM)  # fmt: skip
    return au0, au1, au2, au3, ag0, ag1, ag2, ag3


@triton.jit
def _put(ptr, value, mask, ATOMIC: tl.constexpr):
    """A store, or (ATOMIC) an fp32 add into the accumulator (relaxed: the fence, barrier and
    arrival ticket of _arrive publish it, as they do the stores)."""
    if ATOMIC:
        tl.atomic_add(ptr, value, mask=mask, sem="relaxed", scope="gpu")
    else:
        tl.store(ptr, value, mask=mask)


@triton.jit
def _store_rows(ws_ptr, a0, a1, a2, a3, slot, dual: tl.constexpr, DUALS: tl.constexpr, M,
                NOUT, m0, cols, mask_n, BM: tl.constexpr, ATOMIC: tl.constexpr):  # fmt: skip
    """ws[slot, dual, m0 + m, cols] = a_m for the program's rows (m < M); ATOMIC: added into
    slot 0 instead (one accumulator for every K-slice)."""
    if ATOMIC:
        slot = 0
    base = ws_ptr + ((slot * DUALS + dual) * M + m0) * NOUT + cols
    row = cols * 0 + m0  # the rows as vectors: masks of the stores
    _put(base, a0, mask_n & (row < M), ATOMIC)
    if BM > 1:
        _put(base + NOUT, a1, mask_n & (row + 1 < M), ATOMIC)
    if BM > 2:
        _put(base + 2 * NOUT, a2, mask_n & (row + 2 < M), ATOMIC)
        _put(base + 3 * NOUT, a3, mask_n & (row + 3 < M), ATOMIC)


@triton.jit
def _light_program(x_ptr, p0_ptr, p1_ptr, s_ptr, z_ptr, q0_ptr, q1_ptr, t_ptr, u_ptr, ws_ptr,
                   tile, split, M, m0, stride_xm, NL, KL, OL, SL, SLOT_L, NOUT, ONE,
                   BITS: tl.constexpr, GROUP: tl.constexpr, SYMMETRIC: tl.constexpr,
                   DUAL: tl.constexpr, BM: tl.constexpr, BLOCK_N: tl.constexpr,
                   FAST: tl.constexpr, PDL: tl.constexpr, ATOMIC: tl.constexpr,
                   XVEC: tl.constexpr):  # fmt: skip
    """Packed columns tile*BLOCK_N.. over K-slice `split` of SL -> ws slot SLOT_L + split.

    The slice is the steps (32 k each) split * steps // SL .. (split + 1) * steps // SL: equal
    counts, whatever the group size. Its chunks are its pieces of each quantization group (the
    scales are applied once a chunk), so a slice of a few steps has one or two chunks, not one
    per step. PDL: the first step's words are loaded before waiting for the previous kernel (x)."""
    DUALS: tl.constexpr = 2 if DUAL else 1
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < NL
    zero = tl.zeros([BLOCK_N], dtype=tl.float32)
    au0, au1, au2, au3, ag0, ag1, ag2, ag3 = zero, zero, zero, zero, zero, zero, zero, zero
    steps = KL // STEP_K
    SPG: tl.constexpr = max(1, GROUP // STEP_K)  # steps per group (K <= GROUP: one group)
    s_lo, s_hi = split * steps // SL, (split + 1) * steps // SL
    if FAST:
        # software pipeline: the next step's words are loaded before this step is computed
        st_last = tl.maximum(s_hi - 1, 0)
        nxt = _load_step4(p0_ptr, q0_ptr, NL, tl.minimum(s_lo, st_last) * STEP_K, offs_n, mask_n,
                          DUAL)  # fmt: skip
        pdl_wait(PDL)
        for g in range(s_lo // SPG, tl.cdiv(s_hi, SPG)):
            ul0, uh0, ul1, uh1, ul2, uh2, ul3, uh3 = zero, zero, zero, zero, zero, zero, zero, zero
            gl0, gh0, gl1, gh1, gl2, gh2, gl3, gh3 = zero, zero, zero, zero, zero, zero, zero, zero
            xe0 = tl.zeros([], dtype=tl.float32)
            xo0, xe1, xo1, xe2, xo2, xe3, xo3 = xe0, xe0, xe0, xe0, xe0, xe0, xe0
            for st in range(tl.maximum(g * SPG, s_lo), tl.minimum(g * SPG + SPG, s_hi)):
                cur = nxt
                nxt = _load_step4(p0_ptr, q0_ptr, NL, tl.minimum(st + 1, st_last) * STEP_K,
                                  offs_n, mask_n, DUAL)  # fmt: skip
                (ul0, uh0, ul1, uh1, ul2, uh2, ul3, uh3, gl0, gh0, gl1, gh1, gl2, gh2, gl3, gh3,
                 xe0, xo0, xe1, xo1, xe2, xo2, xe3, xo3) = _light_step4(
                    ul0, uh0, ul1, uh1, ul2, uh2, ul3, uh3, gl0, gh0, gl1, gh1, gl2, gh2, gl3,
                    gh3, xe0, xo0, xe1, xo1, xe2, xo2, xe3, xo3, *cur, x_ptr, stride_xm, M - m0,
                    st * STEP_K, ONE, DUAL, BM, XVEC)  # fmt: skip
            au0, au1, au2, au3, ag0, ag1, ag2, ag3 = _finish_chunk4(
                au0, au1, au2, au3, ag0, ag1, ag2, ag3, ul0, uh0, ul1, uh1, ul2, uh2, ul3, uh3,
                gl0, gh0, gl1, gh1, gl2, gh2, gl3, gh3, xe0, xo0, xe1, xo1, xe2, xo2, xe3, xo3,
                s_ptr, z_ptr, t_ptr, u_ptr, g, NL, offs_n, mask_n, SYMMETRIC, DUAL,
                BM)  # fmt: skip
    else:
        pdl_wait(PDL)
        for g in range(s_lo // SPG, tl.cdiv(s_hi, SPG)):
            tu0, tu1, tu2, tu3, tg0, tg1, tg2, tg3 = zero, zero, zero, zero, zero, zero, zero, zero
            xs0 = tl.zeros([], dtype=tl.float32)
            xs1, xs2, xs3 = xs0, xs0, xs0
            for st in range(tl.maximum(g * SPG, s_lo), tl.minimum(g * SPG + SPG, s_hi)):
                tu0, tu1, tu2, tu3, tg0, tg1, tg2, tg3, xs0, xs1, xs2, xs3 = _light_step(
                    tu0, tu1, tu2, tu3, tg0, tg1, tg2, tg3, xs0, xs1, xs2, xs3, x_ptr, stride_xm,
                    M - m0, p0_ptr, p1_ptr, q0_ptr, q1_ptr, NL, st * STEP_K, offs_n, mask_n, ONE,
                    BITS, DUAL, BM)  # fmt: skip
            au0, au1, au2, au3, ag0, ag1, ag2, ag3 = _finish_chunk(
                au0, au1, au2, au3, ag0, ag1, ag2, ag3, tu0, tu1, tu2, tu3, tg0, tg1, tg2, tg3,
                xs0, xs1, xs2, xs3, s_ptr, z_ptr, t_ptr, u_ptr, g, NL, offs_n, mask_n, BITS,
                SYMMETRIC, DUAL, BM)  # fmt: skip
    cols = OL + offs_n
    _store_rows(ws_ptr, au0, au1, au2, au3, SLOT_L + split, 0, DUALS, M, NOUT, m0, cols, mask_n,
                BM, ATOMIC)  # fmt: skip
    if DUAL:
        _store_rows(ws_ptr, ag0, ag1, ag2, ag3, SLOT_L + split, 1, DUALS, M, NOUT, m0, cols,
                    mask_n, BM, ATOMIC)  # fmt: skip


@triton.jit
def _dense_tiles(dw0_ptr, dw1_ptr, stride_dw, KD, kb, offs_n, mask_n, DUAL: tl.constexpr,
                 BLOCK_KD: tl.constexpr):  # fmt: skip
    """The [BLOCK_ND, BLOCK_KD] tiles of K-block kb of W0 and (DUAL) W1, zeros past the edges."""
    offs_k = kb * BLOCK_KD + tl.arange(0, BLOCK_KD)
    w_off = offs_n[:, None] * stride_dw + offs_k[None, :]
    w_mask = mask_n[:, None] & (offs_k < KD)[None, :]
    wu = tl.load(dw0_ptr + w_off, mask=w_mask, other=0.0)
    wg = wu
    if DUAL:
        wg = tl.load(dw1_ptr + w_off, mask=w_mask, other=0.0)
    return wu, wg


@triton.jit
def _store_out(out_ptr, ub_ptr, gb_ptr, row, stride_om, cols, mask, up, gate, KA: tl.constexpr,
               DUAL: tl.constexpr, ACTIVATION: tl.constexpr, HAS_UP_BIAS: tl.constexpr,
               HAS_GATE_BIAS: tl.constexpr):  # fmt: skip
    """out[row, cols] = finish(up, gate): + up bias; kernel A: act(gate + gate bias) * up when
    DUAL, else act(up); kernel B: up (+ bias) as is."""
    if HAS_UP_BIAS:
        up += tl.load(ub_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if KA:
        if DUAL:
            if HAS_GATE_BIAS:
                gate += tl.load(gb_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            up = activation(gate, ACTIVATION) * up
        else:
            up = activation(up, ACTIVATION)
    tl.store(out_ptr + row * stride_om + cols, up.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _finish_tile(ws_ptr, out_ptr, ub_ptr, gb_ptr, cols, mask_c, M, m0, NOUT, stride_om, NS,
                 KA: tl.constexpr, DUAL: tl.constexpr, ACTIVATION: tl.constexpr,
                 HAS_UP_BIAS: tl.constexpr, HAS_GATE_BIAS: tl.constexpr, BM: tl.constexpr,
                 BLOCK_S: tl.constexpr, ATOMIC: tl.constexpr):  # fmt: skip
    """out[m0 + m, cols] = finish(sum of ws slots 0..NS in slot order) for the program's rows:
    the fixed order makes the result independent of which program finishes. Loads bypass L1
    (.cg): the partials were written by other programs of this launch. ATOMIC: the sums are
    already in slot 0 (added in arrival order); they are read, then zeroed for the next launch."""
    DUALS: tl.constexpr = 2 if DUAL else 1
    mn = M * NOUT
    for m in tl.static_range(BM):
        row = m0 + m
        if row < M:
            if ATOMIC:
                ptrs = ws_ptr + row * NOUT + cols
                up = tl.load(ptrs, mask=mask_c, other=0.0, cache_modifier=".cg")
                gate = up
                if DUAL:
                    gate = tl.load(ptrs + mn, mask=mask_c, other=0.0, cache_modifier=".cg")
                # Every sum is read before any is zeroed: the compiler may give the loads and
                # the stores different thread mappings (it does where the columns are not
                # 16-aligned), so without this barrier a thread could zero a sum that another
                # thread has not read yet (the wrong kernel-A sums of session 6).
                tl.debug_barrier()
                tl.store(ptrs, tl.zeros_like(up), mask=mask_c, cache_modifier=".cg")
                if DUAL:
                    tl.store(ptrs + mn, tl.zeros_like(gate), mask=mask_c, cache_modifier=".cg")
            else:
                up = tl.zeros([cols.shape[0]], dtype=tl.float32)
                gate = up
                for s0 in range(0, NS, BLOCK_S):
                    slots = s0 + tl.arange(0, BLOCK_S)
                    ptrs = ws_ptr + (slots * DUALS * mn + row * NOUT)[:, None] + cols[None, :]
                    ok = (slots < NS)[:, None] & mask_c[None, :]
                    up += tl.sum(tl.load(ptrs, mask=ok, other=0.0, cache_modifier=".cg"), axis=0)
                    if DUAL:
                        gate += tl.sum(
                            tl.load(ptrs + mn, mask=ok, other=0.0, cache_modifier=".cg"), axis=0
                        )
            _store_out(out_ptr, ub_ptr, gb_ptr, row, stride_om, cols, mask_c, up, gate, KA, DUAL,
                       ACTIVATION, HAS_UP_BIAS, HAS_GATE_BIAS)  # fmt: skip


@triton.jit
def _arrive(cnt_ptr, index, expected, ws_ptr, out_ptr, ub_ptr, gb_ptr, cols, mask_c, M, m0, NOUT,
            stride_om, NS, KA: tl.constexpr, DUAL: tl.constexpr, ACTIVATION: tl.constexpr,
            HAS_UP_BIAS: tl.constexpr, HAS_GATE_BIAS: tl.constexpr, BM: tl.constexpr,
            BLOCK_S: tl.constexpr, ATOMIC: tl.constexpr):  # fmt: skip
    """Count this program's partials of output tile `index` in (after its stores: barrier, then
    one acq_rel atomic); the program that brings the count to `expected` adds every slot of the
    tile (_finish_tile) and resets the counter for the next launch. Every thread fences first:
    the ticket's release covers only the thread that takes it (fence_gpu)."""
    fence_gpu()
    tl.debug_barrier()
    ticket = tl.atomic_add(cnt_ptr + index, 1, sem="acq_rel", scope="gpu")
    if ticket == expected - 1:
        tl.debug_barrier()
        _finish_tile(ws_ptr, out_ptr, ub_ptr, gb_ptr, cols, mask_c, M, m0, NOUT, stride_om, NS,
                     KA, DUAL, ACTIVATION, HAS_UP_BIAS, HAS_GATE_BIAS, BM, BLOCK_S,
                     ATOMIC)  # fmt: skip
        tl.atomic_xchg(cnt_ptr + index, 0, sem="relaxed", scope="gpu")


@triton.jit
def _dense_program(x_ptr, dw0_ptr, dw1_ptr, ws_ptr, tile, split, M, m0, stride_xm, ND, KD,
                   stride_dw, OD, SD, NOUT, out_ptr, ub_ptr, gb_ptr, stride_om,
                   DUAL: tl.constexpr, BM: tl.constexpr, BLOCK_ND: tl.constexpr,
                   BLOCK_KD: tl.constexpr, DIRECT: tl.constexpr, ACTIVATION: tl.constexpr,
                   HAS_UP_BIAS: tl.constexpr, HAS_GATE_BIAS: tl.constexpr,
                   PDL: tl.constexpr, ATOMIC: tl.constexpr):  # fmt: skip
    """Dense rows tile*BLOCK_ND.. over K-slice `split` of SD -> ws slot `split`, columns OD..
    DIRECT (kernel A, unsplit K): the finished activations go straight to out instead."""
    DUALS: tl.constexpr = 2 if DUAL else 1
    offs_n = tile * BLOCK_ND + tl.arange(0, BLOCK_ND)
    mask_n = offs_n < ND
    zero = tl.zeros([BLOCK_ND, BLOCK_KD], dtype=tl.float32)
    au0, au1, au2, au3, ag0, ag1, ag2, ag3 = zero, zero, zero, zero, zero, zero, zero, zero
    nb = tl.cdiv(KD, BLOCK_KD)
    kb_lo, kb_hi = split * nb // SD, (split + 1) * nb // SD
    zeros2 = offs_n[:, None] * 0
    # software pipeline: the next K-block's weights are loaded before this one is used
    nu, ng = _dense_tiles(dw0_ptr, dw1_ptr, stride_dw, KD, kb_lo, offs_n, mask_n, DUAL, BLOCK_KD)
    pdl_wait(PDL)  # the weights above need nothing from the previous kernel; x does
    for kb in range(kb_lo, kb_hi):
        wu, wg = nu, ng
        nu, ng = _dense_tiles(dw0_ptr, dw1_ptr, stride_dw, KD, tl.minimum(kb + 1, kb_hi - 1),
                              offs_n, mask_n, DUAL, BLOCK_KD)  # fmt: skip
        wu = wu.to(tl.float32)
        wg = wg.to(tl.float32)
        offs_k = kb * BLOCK_KD + tl.arange(0, BLOCK_KD)
        w_mask = mask_n[:, None] & (offs_k < KD)[None, :]
        x0 = _x_row(x_ptr, stride_xm, 0, M - m0, zeros2, offs_k, w_mask)
        au0 += wu * x0
        ag0 += wg * x0
        if BM > 1:
            x1 = _x_row(x_ptr, stride_xm, 1, M - m0, zeros2, offs_k, w_mask)
            au1 += wu * x1
            ag1 += wg * x1
        if BM > 2:
            x2 = _x_row(x_ptr, stride_xm, 2, M - m0, zeros2, offs_k, w_mask)
            x3 = _x_row(x_ptr, stride_xm, 3, M - m0, zeros2, offs_k, w_mask)
            au2 += wu * x2
            ag2 += wg * x2
            au3 += wu * x3
            ag3 += wg * x3
    cols = OD + offs_n
    if DIRECT:
        rows = offs_n * 0 + m0  # the rows as vectors: masks of the stores
        _store_out(out_ptr, ub_ptr, gb_ptr, m0, stride_om, cols, mask_n, tl.sum(au0, axis=1),
                   tl.sum(ag0, axis=1), True, DUAL, ACTIVATION, HAS_UP_BIAS,
                   HAS_GATE_BIAS)  # fmt: skip
        if BM > 1:
            _store_out(out_ptr, ub_ptr, gb_ptr, m0 + 1, stride_om, cols, mask_n & (rows + 1 < M),
                       tl.sum(au1, axis=1), tl.sum(ag1, axis=1), True, DUAL, ACTIVATION,
                       HAS_UP_BIAS, HAS_GATE_BIAS)  # fmt: skip
        if BM > 2:
            _store_out(out_ptr, ub_ptr, gb_ptr, m0 + 2, stride_om, cols, mask_n & (rows + 2 < M),
                       tl.sum(au2, axis=1), tl.sum(ag2, axis=1), True, DUAL, ACTIVATION,
                       HAS_UP_BIAS, HAS_GATE_BIAS)  # fmt: skip
            _store_out(out_ptr, ub_ptr, gb_ptr, m0 + 3, stride_om, cols, mask_n & (rows + 3 < M),
                       tl.sum(au3, axis=1), tl.sum(ag3, axis=1), True, DUAL, ACTIVATION,
                       HAS_UP_BIAS, HAS_GATE_BIAS)  # fmt: skip
    else:
        _store_rows(ws_ptr, tl.sum(au0, axis=1), tl.sum(au1, axis=1), tl.sum(au2, axis=1),
                    tl.sum(au3, axis=1), split, 0, DUALS, M, NOUT, m0, cols, mask_n,
                    BM, ATOMIC)  # fmt: skip
        if DUAL:
            _store_rows(ws_ptr, tl.sum(ag0, axis=1), tl.sum(ag1, axis=1), tl.sum(ag2, axis=1),
                        tl.sum(ag3, axis=1), split, 1, DUALS, M, NOUT, m0, cols, mask_n,
                        BM, ATOMIC)  # fmt: skip


@triton.jit(do_not_specialize=["M", "SD", "SL", "ONE", "RD", "NFT"])
def _gemv_kernel(
    x_ptr, dw0_ptr, dw1_ptr, p0_ptr, p1_ptr, s_ptr, z_ptr, q0_ptr, q1_ptr, t_ptr, u_ptr, ws_ptr,
    cnt_ptr, out_ptr, ub_ptr, gb_ptr,
    M, stride_xm, ND, KD, stride_dw, XD, OD, SD, RD, NL, KL, XL, OL, SL, SLOT_L, NOUT, ONE,
    NFT, stride_om,
    BITS: tl.constexpr, GROUP: tl.constexpr, SYMMETRIC: tl.constexpr, DUAL: tl.constexpr,
    BM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_ND: tl.constexpr, BLOCK_KD: tl.constexpr,
    FAST: tl.constexpr, FUSED: tl.constexpr, KA: tl.constexpr, ACTIVATION: tl.constexpr,
    HAS_UP_BIAS: tl.constexpr, HAS_GATE_BIAS: tl.constexpr, BLOCK_S: tl.constexpr,
    PDL: tl.constexpr, ATOMIC: tl.constexpr, XVEC: tl.constexpr,
):  # fmt: skip
    """One (column tile, K-slice) program for rows program_id(1)*BM..; fp32 partials to
    ws[slot, dual, m, column].

    Dense programs (the first cdiv(cdiv(ND, BLOCK_ND), RD) * SD, RD row tiles each) read rows
    [ND, KD] against x[:, XD:] and write columns OD.. of slots 0..SD; light programs read packed
    [KL, NL] against x[:, XL:] and write columns OL.. of slots SLOT_L + 0..SL.

    FUSED: no reduction launch. Kernel A (KA): dense programs (K never split) write their
    finished activations to out; light column tiles count their SL K-slices in at cnt_ptr and the
    last one finishes the tile. Kernel B: output tiles of BLOCK_N columns (NFT per row block)
    count in their SL light slices and the dense programs that cover them (slot 0), and the last
    one adds the slots and the bias.

    PDL (programmatic dependent launch): each program lets the next kernel launch, loads its first
    weights, then waits for the previous kernel (pdl_trigger, pdl_wait).
    """
    pdl_trigger(PDL)
    pid = tl.program_id(0)
    m_blk = tl.program_id(1)
    m0 = m_blk * BM
    x_rows = x_ptr + m0 * stride_xm
    groups_d = tl.cdiv(tl.cdiv(ND, BLOCK_ND), RD)  # dense programs own RD row tiles each
    rows_d = RD * BLOCK_ND  # output columns of kernel B per dense program
    if pid < groups_d * SD:
        for rt in range(0, RD):
            _dense_program(x_rows + XD, dw0_ptr, dw1_ptr, ws_ptr, (pid % groups_d) * RD + rt,
                           pid // groups_d, M, m0, stride_xm, ND, KD, stride_dw, OD, SD, NOUT,
                           out_ptr, ub_ptr, gb_ptr, stride_om, DUAL, BM, BLOCK_ND, BLOCK_KD,
                           FUSED and KA, ACTIVATION, HAS_UP_BIAS, HAS_GATE_BIAS,
                           PDL, ATOMIC)  # fmt: skip
        if FUSED and not KA:  # count in at every output tile this program's rows touch
            r0 = (pid % groups_d) * rows_d
            r1 = tl.minimum(r0 + rows_d, ND)
            for t in range(r0 // BLOCK_N, (r1 - 1) // BLOCK_N + 1):
                cols = t * BLOCK_N + tl.arange(0, BLOCK_N)
                first = t * BLOCK_N // rows_d
                last = tl.minimum((t * BLOCK_N + BLOCK_N - 1) // rows_d, groups_d - 1)
                _arrive(cnt_ptr, m_blk * NFT + t, SL + last - first + 1, ws_ptr, out_ptr,
                        ub_ptr, gb_ptr, cols, cols < NOUT, M, m0, NOUT, stride_om, SLOT_L + SL,
                        KA, DUAL, ACTIVATION, HAS_UP_BIAS, HAS_GATE_BIAS, BM,
                        BLOCK_S, ATOMIC)  # fmt: skip
    else:
        pid = pid - groups_d * SD
        tiles_l = tl.cdiv(NL, BLOCK_N)
        tile = pid % tiles_l
        _light_program(x_rows + XL, p0_ptr, p1_ptr, s_ptr, z_ptr, q0_ptr, q1_ptr, t_ptr, u_ptr,
                       ws_ptr, tile, pid // tiles_l, M, m0, stride_xm, NL, KL, OL, SL,
                       SLOT_L, NOUT, ONE, BITS, GROUP, SYMMETRIC, DUAL, BM, BLOCK_N,
                       FAST, PDL, ATOMIC, XVEC)  # fmt: skip
        if FUSED:
            cols = OL + tile * BLOCK_N + tl.arange(0, BLOCK_N)
            expected = SL
            if not KA and ND > 0:  # kernel B: the dense programs covering this tile too
                first = tile * BLOCK_N // rows_d
                last = tl.minimum((tile * BLOCK_N + BLOCK_N - 1) // rows_d, groups_d - 1)
                expected += last - first + 1
            _arrive(cnt_ptr, m_blk * NFT + tile, expected, ws_ptr, out_ptr, ub_ptr, gb_ptr, cols,
                    cols < OL + NL, M, m0, NOUT, stride_om, SLOT_L + SL, KA, DUAL, ACTIVATION,
                    HAS_UP_BIAS, HAS_GATE_BIAS, BM, BLOCK_S, ATOMIC)  # fmt: skip


@triton.jit(do_not_specialize=["M", "C0", "S0", "S1", "SMAX"])
def _gemv_reduce_kernel(ws_ptr, ub_ptr, gb_ptr, out_ptr, M, NOUT, stride_om, C0, S0, S1, SMAX,
                        DUAL: tl.constexpr, ACT: tl.constexpr, ACTIVATION: tl.constexpr,
                        HAS_UP_BIAS: tl.constexpr, HAS_GATE_BIAS: tl.constexpr,
                        BLOCK: tl.constexpr, BLOCK_S: tl.constexpr, PDL: tl.constexpr):  # fmt: skip
    """out[m, c] = finish(sum of slots) with slots 0..S0 for columns c < C0, 0..S1 for the rest.

    A [BLOCK_S slots, BLOCK outputs] tile per iteration: every slot's load is in flight at once
    (a loop of one load per slot would put a memory latency on each); slots are added in order.
    finish: + up bias; with DUAL act(gate + gate bias) * up, else act(up) when ACT, else up.
    """
    pdl_trigger(PDL)
    pdl_wait(PDL)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mn = M * NOUT
    mask = offs < mn
    col = offs % NOUT
    row = offs // NOUT
    n_slots = tl.where(col < C0, S0, S1)
    DUALS: tl.constexpr = 2 if DUAL else 1
    up = tl.zeros([BLOCK], dtype=tl.float32)
    gate = tl.zeros([BLOCK], dtype=tl.float32)
    for s0 in range(0, SMAX, BLOCK_S):
        slots = s0 + tl.arange(0, BLOCK_S)
        m_s = mask[None, :] & (slots[:, None] < n_slots[None, :])
        ptrs = ws_ptr + (slots * DUALS * mn)[:, None] + offs[None, :]
        up += tl.sum(tl.load(ptrs, mask=m_s, other=0.0), axis=0)
        if DUAL:
            gate += tl.sum(tl.load(ptrs + mn, mask=m_s, other=0.0), axis=0)
    _store_out(out_ptr, ub_ptr, gb_ptr, row, stride_om, col, mask, up, gate, ACT, DUAL, ACTIVATION,
               HAS_UP_BIAS, HAS_GATE_BIAS)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# launch plumbing


@dataclass(frozen=True)
class GemvConfig:
    """Light tiles of block_n columns (4 or 8 words a thread: block_n = 128 or 256 * num_warps on
    a GPU); dense tiles [block_nd rows, block_kd]; grids of `waves` full waves (every SM holding
    as many programs as its registers allow)."""

    block_n: int
    block_nd: int
    block_kd: int
    num_warps: int
    waves: int = 1
    fast: bool = True  # int4 with 16-bit activations: two mantissa positions (_light_step4)
    fused: bool = True  # the split-K reduction inside the kernel (last program of a tile)
    # K-slices added into one fp32 accumulator (atomics, arrival order: not bitwise repeatable)
    # instead of one slot each; always fused (the last program reads the sums and zeroes them)
    atomic: bool = False


_CONFIGS = (  # block_n / (32 * num_warps) columns per thread: 4 (one 16-byte load) or 8 (two)
    GemvConfig(512, 4, 256, num_warps=4),
    GemvConfig(256, 2, 256, num_warps=2),
    GemvConfig(1024, 4, 256, num_warps=4),
    GemvConfig(512, 2, 256, num_warps=2),
    GemvConfig(512, 4, 256, num_warps=4, waves=2),
    GemvConfig(512, 4, 256, num_warps=4, atomic=True),
    GemvConfig(256, 2, 256, num_warps=2, atomic=True),
    GemvConfig(512, 4, 256, num_warps=4, waves=2, atomic=True),
)
_INTERPRET_CONFIG = GemvConfig(32, 4, 32, num_warps=1, waves=1)
FAST_OK = os.environ.get("FFNSPLIT_GEMV_FAST", "1") != "0"  # 0: exact path only (benchmarks)
# Where the split-K partials are reduced inside the kernel (the last program of a tile) instead of
# by a second launch (_gemv_reduce_kernel): "a" kernel A (default), "all" kernels A and B, "0" none
FUSED_MODE = os.environ.get("FFNSPLIT_GEMV_FUSED", "a")
# the atomic-accumulation candidates (GemvConfig.atomic) offered to the tuners; 0: none, so that
# results are bitwise repeatable from call to call
ATOMIC_OK = os.environ.get("FFNSPLIT_GEMV_ATOMIC", "1") != "0"
# int4 path: x read as int64 (four 16-bit values a load) where aligned; 0: one load a value
XVEC_OK = os.environ.get("FFNSPLIT_GEMV_XVEC", "1") != "0"
_FINISH_SLOTS = 8  # slots per load of _finish_tile ([8, BLOCK_N] tiles)
_zeroed_bufs: dict[tuple, torch.Tensor] = {}
_zeroed_kept: list[torch.Tensor] = []


def _zeroed(device: torch.device, size: int, dtype: torch.dtype) -> torch.Tensor:
    """A buffer that is zero between launches: the arrival counters of the fused reduction
    (int32) and the accumulators of atomic configs (fp32); the last program of each tile resets
    its own part. One buffer per device, stream and dtype: launches on one stream run in order,
    so they can share it; two streams must not. A buffer first needed while a CUDA graph is
    captured (a graph's private capture stream) is made, and zeroed, by the graph itself."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream, dtype)
    buf = _zeroed_bufs.get(key)
    if buf is None or buf.numel() < size:
        buf = _zeroed_bufs[key] = torch.zeros(max(size, 4096), dtype=dtype, device=device)
        _zeroed_kept.append(buf)  # a captured graph may still point at a smaller one
    return buf


MAX_ROWS = 4  # rows of x per program (explicit accumulators); more rows: more programs
_tuner = Tuner()
_capacity: dict[tuple, int] = {}  # programs in one full wave, by launch shape (see _launch)


def _light_split(k: int, want: int) -> int:
    """K-slices of the light part for `want` programs a column tile: as many as wanted, at most
    one per step of 32 k (a slice is a run of whole steps; the kernel splits it at group edges)."""
    return max(1, min(want, k // STEP))


def _light_args(a: QuantizedWeight | None, b: QuantizedWeight | None, x: torch.Tensor) -> list:
    out = []
    for qw in (a, b if b is not None else a):
        if qw is None:
            dummy = torch.zeros(1, dtype=torch.int32, device=x.device)
            out += [dummy, dummy, x, x]
        else:
            out += qw.kernel_args()
    return out


def _launch(
    x2: torch.Tensor,
    dense: tuple[torch.Tensor, torch.Tensor] | None,
    light: tuple[QuantizedWeight, QuantizedWeight | None] | None,
    out_cols: int,
    kernel_a: bool,
    finish: dict,
    out: torch.Tensor,
    cfg: GemvConfig,
) -> None:
    """Partials of the dense and light parts, then the reduction into `out`.

    kernel_a: columns are neurons, dense rows first (columns 0..ND) then light columns, both
    against all of x. Otherwise (down projection) both parts produce all columns, the dense part
    from x[:, :KD], the light part from x[:, KD:], and their slots are summed.
    """
    m = x2.shape[0]
    dual = light is not None and light[1] is not None or dense is not None and dense[1] is not None
    nd, kd = (0, 0) if dense is None else dense[0].shape
    nl, kl = (0, 0) if light is None else light[0].shape
    bits = 4 if light is None else light[0].bits
    group = 32 if light is None else light[0].group_size
    symmetric = True if light is None else light[0].symmetric
    tiles_d, tiles_l = triton.cdiv(nd, cfg.block_nd), triton.cdiv(nl, cfg.block_n)
    bytes_d = (2 if dual else 1) * nd * kd * x2.element_size()
    bytes_l = 0 if light is None else light[0].nbytes() * (2 if dual else 1)
    dw0 = x2 if dense is None else dense[0]
    dw1 = dw0 if dense is None or dense[1] is None else dense[1]
    bm = min(MAX_ROWS, triton.next_power_of_2(m))
    fast = cfg.fast and FAST_OK and bits == 4 and x2.dtype != torch.float32
    x_light = 0 if kernel_a else kd  # the light part reads x[:, x_light:]
    constexprs = dict(
        BITS=bits, GROUP=group, SYMMETRIC=symmetric, DUAL=dual, BM=bm, BLOCK_N=cfg.block_n,
        BLOCK_ND=cfg.block_nd, BLOCK_KD=cfg.block_kd, FAST=fast,
        # x four values a load: needs every row's x[:, x_light + 4 j] 8-byte aligned
        XVEC=fast and XVEC_OK and x2.data_ptr() % 8 == 0 and x2.stride(0) % 4 == 0
        and x_light % 4 == 0,
    )  # fmt: skip
    # kernel A by default: kernel B's tiles have ~90 K-slices at M = 1, and one program adding
    # them at the end costs more than the second launch saves (+2.8 vs -1.5 us on an H200)
    fused = cfg.atomic or cfg.fused and (FUSED_MODE == "all" or FUSED_MODE == "a" and kernel_a)
    up_bias, gate_bias = finish.get("up_bias"), finish.get("gate_bias")
    constexprs.update(
        FUSED=fused, KA=kernel_a, ACTIVATION=finish.get("activation", "relu"),
        HAS_UP_BIAS=up_bias is not None, HAS_GATE_BIAS=gate_bias is not None,
        BLOCK_S=_FINISH_SLOTS, ATOMIC=cfg.atomic,
    )  # fmt: skip
    row_blocks = triton.cdiv(m, bm)
    launch = pdl_options(x2.device)  # PDL (a constexpr, also in the occupancy key) + launch_pdl
    pdl = constexprs["PDL"] = launch.pop("PDL")
    light_args = _light_args(*(light or (None, None)), x2)
    n_ft = tiles_l if kernel_a else triton.cdiv(out_cols, cfg.block_n)  # output tiles a row block
    cnt = _zeroed(x2.device, row_blocks * n_ft, torch.int32) if fused else out
    biases = (out if up_bias is None else up_bias, out if gate_bias is None else gate_bias)

    def args(sd: int, rd: int, sl: int, slot_l: int, ws: torch.Tensor) -> tuple:
        return (
            x2, dw0, dw1, *light_args, ws, cnt, out, *biases, m, x2.stride(0), nd, kd,
            dw0.stride(0) if dense is not None else 0, 0, 0, sd, rd, nl, kl,
            x_light, nd if kernel_a else 0, sl, slot_l, out_cols, ONE_BITS,
            n_ft, out.stride(0),
        )  # fmt: skip

    # One wave: as many programs as the SMs hold at once (registers of the compiled variant),
    # each streaming about the same bytes; a partial second wave would run alone at the end.
    # Cached by shape (not pointer alignment): the decode hot path pays a dict lookup only,
    # and the same shape always gets the same split (the same summation order).
    key = (cfg, tuple(constexprs.items()), x2.dtype, x2.device, nd, kd, nl, kl, kernel_a)
    capacity = _capacity.get(key)
    if capacity is None:
        guess = 2 if INTERPRET else 4 * (8 // cfg.num_warps)
        ws0 = torch.empty(1, dtype=torch.float32, device=x2.device)
        capacity = _capacity[key] = cfg.waves * sm_count(x2.device) * resident_blocks(
            _gemv_kernel, args(1, 1, 1, 0, ws0), constexprs, cfg.num_warps, guess, stages=1
        )  # fmt: skip
    per_program = (bytes_d + bytes_l) / capacity
    sd = 1 if tiles_d else 0
    rd = max(1, min(tiles_d, int(per_program // max(bytes_d / max(tiles_d, 1), 1))))
    programs_d = triton.cdiv(tiles_d, rd) if tiles_d else 0
    want_l = max(1, (capacity - programs_d) // max(tiles_l, 1))
    sl = _light_split(kl, want_l) if tiles_l else 0
    slot_l = 0 if kernel_a else sd
    slots = max(sd, sl) if kernel_a else sd + sl
    duals = 2 if dual else 1
    if cfg.atomic:  # one slot, zero before the launch and after it
        ws = _zeroed(x2.device, duals * m * out_cols, torch.float32)
    else:
        ws = torch.empty((slots, duals, m, out_cols), dtype=torch.float32, device=x2.device)
    _gemv_kernel[(programs_d * sd + tiles_l * sl, row_blocks)](
        *args(sd, rd, sl, slot_l, ws),
        **constexprs,
        num_warps=cfg.num_warps,
        num_stages=1,
        **launch,
    )
    if fused:
        return
    # [block_s, block] tiles: all slots of an output loaded at once (up to 128), and at least
    # ~2 programs per SM, so that the reduction costs about one memory latency
    block_s = min(128, triton.next_power_of_2(slots))
    per_sm = max(1, m * out_cols // (2 * sm_count(x2.device)))
    block = max(16, min(4096 // block_s, 1 << (per_sm.bit_length() - 1)))
    c0, s0, s1 = (nd, sd, sl) if kernel_a else (0, 0, slots)
    _gemv_reduce_kernel[(triton.cdiv(m * out_cols, block),)](
        ws, finish.get("up_bias") if finish.get("up_bias") is not None else out,
        finish.get("gate_bias") if finish.get("gate_bias") is not None else out, out,
        m, out_cols, out.stride(0), c0, s0, s1, slots, DUAL=dual, ACT=kernel_a,
        ACTIVATION=finish.get("activation", "relu"), HAS_UP_BIAS=finish.get("up_bias") is not None,
        HAS_GATE_BIAS=finish.get("gate_bias") is not None, BLOCK=block, BLOCK_S=block_s,
        PDL=pdl, num_warps=4, **launch,
    )  # fmt: skip


def _configs() -> tuple[GemvConfig, ...]:
    """The tuner's candidates; with FFNSPLIT_GEMV_ATOMIC=0 none accumulates atomically (an atomic
    config stands for its slot twin there): results bitwise repeatable."""
    configs = (_INTERPRET_CONFIG,) if INTERPRET else _CONFIGS
    if not ATOMIC_OK:
        configs = tuple(dict.fromkeys(replace(c, atomic=False) for c in configs))
    return configs


def split_activations(x2: torch.Tensor, w: SplitFFNWeights, out: torch.Tensor) -> None:
    """Kernel A on CUDA cores: out [M, h + l] = act(gate x + gate_bias) * (up x + up_bias)."""
    dense = (w.heavy_up, w.heavy_gate if w.gated else None) if w.n_heavy else None
    light = (w.light_up, w.light_gate if w.gated else None) if w.n_light else None
    finish = {"activation": w.activation, "up_bias": w.up_bias,
              "gate_bias": w.gate_bias if w.gated else None}  # fmt: skip
    if dense is not None:
        dense = tuple(t if t is None else t.contiguous() for t in dense)

    def run(cfg: GemvConfig) -> None:
        _launch(x2, dense, light, out.shape[1], True, finish, out, cfg)

    fmt = None if light is None else (light[0].bits, light[0].group_size, light[0].symmetric)
    key = ("A", x2.shape[0], x2.shape[1], w.n_heavy, w.n_light, fmt, w.gated, x2.dtype, x2.device)
    run(_tuner.pick(key, _configs(), run))


def split_linear(
    x2: torch.Tensor,
    heavy: torch.Tensor | None,
    light: QuantizedWeight | None,
    bias: torch.Tensor | None,
    out: torch.Tensor,
) -> None:
    """Kernel B on CUDA cores: out = x2[:, :kh] @ heavy^T + x2[:, kh:] @ dequant(light)^T + bias."""
    # rows may be strided (a view of wider rows: not copied)
    dense = (
        None if heavy is None else (heavy if heavy.stride(-1) == 1 else heavy.contiguous(), None)
    )
    lw = None if light is None else (light, None)

    def run(cfg: GemvConfig) -> None:
        _launch(x2, dense, lw, out.shape[1], False, {"up_bias": bias}, out, cfg)

    fmt = None if light is None else (light.bits, light.group_size, light.symmetric)
    kh = 0 if heavy is None else heavy.shape[1]
    key = ("B", x2.shape[0], out.shape[1], kh, fmt, x2.dtype, x2.device)
    run(_tuner.pick(key, _configs(), run))
