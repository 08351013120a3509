"""Triton building blocks shared by the split-FFN kernels, and their launch plumbing.

A *light* block multiplies activations by a K-slice of a packed weight (format.py). The word tile
[ROWS, BLOCK_N] of a K-block (PACK = 32 // plane width codes per word) is loaded once and expanded
in registers to the codes [ROWS * PACK, BLOCK_N] of one tensor-core product. With INTERLEAVE the
codes are ordered (code j, word row r) instead of by k, and the x tile is permuted to match: the
tensor-core operand layout then repeats each thread's words along j, so no code ever moves between
threads (decode). Codes become floats exactly by the magic-number trick (OR the code into the
mantissa of 1024.0 in fp16, 128.0 in bf16, 2^23 in fp32, subtract), never by a slow int-to-float
conversion; on NVIDIA GPUs int4 pairs are unpacked by a short inline-PTX sequence.

Scales are applied either after the product of a K-block (SCALE_AFTER: the block lies inside one
quantization group, so s * (x.q - z * sum(x)) is exact for any zero point) or per element (blocks
that span several groups, and the prefill tier, where one dequantized tile serves many rows).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

try:  # grid dependency control (programmatic dependent launch), Triton >= 3.3
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - older Triton: PDL stays off (see pdl_ok)
    gdc_launch_dependents = gdc_wait = None

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# FFNSPLIT_AUTOTUNE=0 keeps the first config of each tier (fast GPU test runs, reproducible picks).
AUTOTUNE = os.environ.get("FFNSPLIT_AUTOTUNE", "1") != "0" and not INTERPRET
DECODE_MAX_M = 16  # up to this many rows the weights are streamed once (decode tier)
# up to this many rows "auto" takes the CUDA-core path (gemv.py): on an H200 it beats the
# tensor-core decode tier at M <= 4 and loses from M = 8 (benchmarks/RESULTS.md, version 7).
GEMV_MAX_M = 4
# up to this many rows "auto" takes the tl small tier, then the prefill tier (H200, session 11,
# Llama-3-8B FFN: M = 64 small 147.9 us, prefill 193.0; M = 128 small 262.4, prefill 194.5;
# session 19 with the W-as-A configs: M = 64 small 62.9 + 39.3, M = 128 prefill 82.8 + 48.6)
SMALL_MAX_M = 64
# from this many rows "auto" dequantizes chunks of the light weights and multiplies with cuBLAS
# (dequant_gemm.py) instead of the dequantize-in-the-loop prefill tier. H200, Llama-3-8B FFN,
# kernel A + B (session 19, benchmarks/sweep_mid.py, the prefill tier's W-as-A configs first):
# M = 256 248.7 us against the dequant path's 277.0, M = 384 397.5 against 349.4 (crossover ~300,
# interpolated; session 11's x @ W^T prefill tier had lost from 256). FFNSPLIT_DEQUANT_MIN_M.
DEQUANT_MIN_M = int(os.environ.get("FFNSPLIT_DEQUANT_MIN_M", "320"))
ACTIVATION_NAMES = ("silu", "gelu", "gelu_tanh", "relu")
_WIDTH = {8: 8, 4: 4, 3: 2, 2: 2}  # width of the first (or only) bit plane


def pack_factor(bits: int) -> int:
    """Codes per word of the first plane (the K granularity of a light block row)."""
    return 32 // _WIDTH[bits]


@triton.jit
def codes_to_float(q, OFFSET, out_dtype: tl.constexpr, BITS: tl.constexpr):
    """Exact float value of small non-negative integer codes q (int32) minus OFFSET, in DTYPE."""
    if out_dtype == tl.float16:
        v = (q | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
        return v - (1024.0 + OFFSET)
    elif out_dtype == tl.bfloat16 and BITS < 8:
        v = (q | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)
        return v - (128.0 + OFFSET)
    else:
        v = (q | 0x4B000000).to(tl.float32, bitcast=True)
        return (v - (8388608.0 + OFFSET)).to(out_dtype)


@triton.jit
def load_words(p0_ptr, p1_ptr, N, K, k0, offs_n, mask_n, BITS: tl.constexpr, ROWS: tl.constexpr):
    """Word tiles [ROWS, BLOCK_N] of the K-block at k0 (plane 1 only for 3 bits), and row mask."""
    PACK: tl.constexpr = 32 // (8 if BITS == 8 else (4 if BITS == 4 else 2))
    offs_r = tl.arange(0, ROWS)
    rows = k0 // PACK + offs_r
    mask_r = offs_r < (K - k0) // PACK
    mask = mask_r[:, None] & mask_n[None, :]
    w0 = tl.load(p0_ptr + rows[:, None] * N + offs_n[None, :], mask=mask, other=0)
    if BITS == 3:
        # element k = 16 * row + j of the 2-bit plane sits in word k // 32 of the 1-bit plane
        w1 = tl.load(p1_ptr + (k0 // 32 + offs_r // 2)[:, None] * N + offs_n[None, :], mask=mask,
                     other=0)  # fmt: skip
    else:
        w1 = w0
    return w0, w1, mask_r


@triton.jit
def expand(t, PACK: tl.constexpr, INTERLEAVE: tl.constexpr):
    """Per-word values t [ROWS, BLOCK_N] repeated for each of their PACK codes (tile row order)."""
    if INTERLEAVE:
        t3 = tl.broadcast_to(t[None, :, :], [PACK, t.shape[0], t.shape[1]])
    else:
        t3 = tl.broadcast_to(t[:, None, :], [t.shape[0], PACK, t.shape[1]])
    return tl.reshape(t3, [t.shape[0] * PACK, t.shape[1]])


@triton.jit
def unpack_codes(w0, w1, BITS: tl.constexpr, INTERLEAVE: tl.constexpr):
    """Codes [ROWS * PACK, BLOCK_N] (int32) of word tiles [ROWS, BLOCK_N].

    INTERLEAVE=False: tile row r * PACK + j is element j of word row r (natural k order).
    INTERLEAVE=True: tile row j * ROWS + r is element j of word row r: each thread keeps its words
    and every code it needs in registers (the dot operand layout repeats along j).
    """
    WIDTH: tl.constexpr = 8 if BITS == 8 else (4 if BITS == 4 else 2)
    PACK: tl.constexpr = 32 // WIDTH
    ROWS: tl.constexpr = w0.shape[0]
    j = tl.arange(0, PACK)
    if INTERLEAVE:
        shift = tl.reshape(tl.broadcast_to(j[:, None, None], [PACK, ROWS, 1]), [PACK * ROWS, 1])
    else:
        shift = tl.reshape(tl.broadcast_to(j[None, :, None], [ROWS, PACK, 1]), [ROWS * PACK, 1])
    q = (expand(w0, PACK, INTERLEAVE) >> (shift * WIDTH)) & ((1 << WIDTH) - 1)
    if BITS == 3:
        # the 1-bit word of row r holds this row's codes at bits 16 * (r % 2) + j
        r = tl.arange(0, ROWS)
        half = expand(tl.broadcast_to(((r % 2) * 16)[:, None], [ROWS, 1]), PACK, INTERLEAVE)
        q = q | (((expand(w1, PACK, INTERLEAVE) >> (half + shift)) & 1) << 2)
    return q


def _unpack4_asm(dtype: str, offset: int) -> str:
    """PTX turning two int4 words (rows r, r + 1) into their 8 code pairs, minus `offset`.

    Output i is the packed pair (code i of word r, code i of word r + 1), i.e. one tensor-core B
    fragment register: 1.25 instructions per code (fp16) instead of ~3 for shift/mask/convert.
    """
    lines = ["{", ".reg .b32 lo, hi, t, ce, co, cs;"]
    lines += ["prmt.b32 lo, $8, $9, 0x5410;", "prmt.b32 hi, $8, $9, 0x7632;"]
    if dtype == "fp16":  # 1024 + q from the mantissa; odd nibbles land x16 and are scaled back
        lines += [
            f"mov.b32 ce, 0x{_neg2(1024 + offset, torch.float16):08x};",  # -(1024 + offset)
            f"mov.b32 co, 0x{_neg2(64 + offset, torch.float16):08x};",  # -(64 + offset)
            "mov.b32 cs, 0x2c002c00;",  # 1/16
        ]
        for half, base in (("lo", 0), ("hi", 4)):
            lines += [
                f"lop3.b32 ${base}, {half}, 0x000f000f, 0x64006400, 0xea;",
                f"lop3.b32 ${base + 1}, {half}, 0x00f000f0, 0x64006400, 0xea;",
                f"shr.u32 t, {half}, 8;",
                f"lop3.b32 ${base + 2}, t, 0x000f000f, 0x64006400, 0xea;",
                f"lop3.b32 ${base + 3}, t, 0x00f000f0, 0x64006400, 0xea;",
            ]
        for i in range(8):
            if i % 2 == 0:
                lines.append(f"add.f16x2 ${i}, ${i}, ce;")
            else:
                lines.append(f"fma.rn.f16x2 ${i}, ${i}, cs, co;")
    else:  # bf16: 128 + q, every nibble shifted down first (bf16 has no room for q << 4)
        lines += [
            f"mov.b32 ce, 0x{_neg2(128 + offset, torch.bfloat16):08x};",
            "mov.b32 cs, 0x3f803f80;",
        ]
        for half, base in (("lo", 0), ("hi", 4)):
            lines.append(f"lop3.b32 ${base}, {half}, 0x000f000f, 0x43004300, 0xea;")
            for i in (1, 2, 3):
                lines += [
                    f"shr.u32 t, {half}, {4 * i};",
                    f"lop3.b32 ${base + i}, t, 0x000f000f, 0x43004300, 0xea;",
                ]
        for i in range(8):
            lines.append(f"fma.rn.bf16x2 ${i}, ${i}, cs, ce;")  # x * 1 - (128 + offset)
    return "\n".join(lines + ["}"])


def _neg2(value: int, dtype: torch.dtype) -> int:
    """Bit pattern of the pair (-value, -value) in a 16-bit float dtype."""
    bits = int(torch.tensor(-float(value), dtype=dtype).view(torch.int16).item()) & 0xFFFF
    return bits | (bits << 16)


ASM_F16 = tl.constexpr(_unpack4_asm("fp16", 0))
ASM_F16_SYM = tl.constexpr(_unpack4_asm("fp16", 8))
ASM_BF16 = tl.constexpr(_unpack4_asm("bf16", 0))
ASM_BF16_SYM = tl.constexpr(_unpack4_asm("bf16", 8))


@triton.jit
def _asm8_f16(w, ASM: tl.constexpr):
    return tl.inline_asm_elementwise(
        ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r,r", [w],
        dtype=(tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16,
               tl.float16, tl.float16), is_pure=True, pack=2,
    )  # fmt: skip


@triton.jit
def _asm8_bf16(w, ASM: tl.constexpr):
    return tl.inline_asm_elementwise(
        ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r,r", [w],
        dtype=(tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16,
               tl.bfloat16, tl.bfloat16), is_pure=True, pack=2,
    )  # fmt: skip


@triton.jit
def unpack4_fast(w, SYMMETRIC: tl.constexpr, out_dtype: tl.constexpr,
                 INTERLEAVE: tl.constexpr = True):  # fmt: skip
    """Codes (minus the symmetric offset) of int4 words [ROWS, BLOCK_N] as out_dtype
    [8 * ROWS, BLOCK_N] in the INTERLEAVE order (or the natural k order), by inline PTX (NVIDIA
    only; unpack_codes elsewhere)."""
    if out_dtype == tl.float16:
        if SYMMETRIC:
            c0, c1, c2, c3, c4, c5, c6, c7 = _asm8_f16(w, ASM_F16_SYM)
        else:
            c0, c1, c2, c3, c4, c5, c6, c7 = _asm8_f16(w, ASM_F16)
    else:
        if SYMMETRIC:
            c0, c1, c2, c3, c4, c5, c6, c7 = _asm8_bf16(w, ASM_BF16_SYM)
        else:
            c0, c1, c2, c3, c4, c5, c6, c7 = _asm8_bf16(w, ASM_BF16)
    t = tl.join(
        tl.join(tl.join(c0, c1), tl.join(c2, c3)), tl.join(tl.join(c4, c5), tl.join(c6, c7))
    )
    if INTERLEAVE:
        t = tl.permute(t, [4, 3, 2, 0, 1])  # [8, ROWS, BLOCK_N]: code j of word r at (j, r)
    else:
        t = tl.permute(t, [0, 4, 3, 2, 1])  # [ROWS, 8, BLOCK_N]: code j of word r at (r, j)
    return tl.reshape(t, [8 * w.shape[0], w.shape[1]])


@triton.jit
def uniform_weights(w0, w1, s, z, BITS: tl.constexpr, SYMMETRIC: tl.constexpr,
                    INTERLEAVE: tl.constexpr, FAST4: tl.constexpr,
                    DTYPE: tl.constexpr):  # fmt: skip
    """Dequantized weights [ROWS * PACK, BLOCK_N] in DTYPE of word tiles inside one group, with
    one scale s (and zero z) [1, BLOCK_N] per column: exact codes (FAST4: int4 by inline PTX),
    minus the zero, times the scale."""
    OFFSET: tl.constexpr = (1 << (BITS - 1)) if SYMMETRIC else 0
    if FAST4:
        q = unpack4_fast(w0, SYMMETRIC, DTYPE, INTERLEAVE)
    else:
        q = codes_to_float(unpack_codes(w0, w1, BITS, INTERLEAVE), OFFSET, DTYPE, BITS)
    if SYMMETRIC:
        return q * s.to(DTYPE)
    return (q - z.to(DTYPE)) * s.to(DTYPE)


@triton.jit
def block_scales(s_ptr, z_ptr, N, K, k0, offs_n, mask_n, GROUP: tl.constexpr,
                 SYMMETRIC: tl.constexpr, SCALE_AFTER: tl.constexpr):  # fmt: skip
    """Scale and zero [1, BLOCK_N] (fp32) of the K-block at k0 when it lies in one group (zeros
    past K). Loaded one block ahead by the loops: a plain load per block would put a full memory
    latency on every iteration (these small loads are not in the cp.async pipeline)."""
    if SCALE_AFTER:
        g = k0 // GROUP
        mask = mask_n & ((offs_n * 0 + k0) < K)
        s = tl.load(s_ptr + g * N + offs_n, mask=mask, other=0.0).to(tl.float32)[None, :]
        if SYMMETRIC:
            z = s
        else:
            z = tl.load(z_ptr + g * N + offs_n, mask=mask, other=0.0).to(tl.float32)[None, :]
    else:
        s = tl.zeros([1, offs_n.shape[0]], dtype=tl.float32)
        z = s
    return s, z


@triton.jit
def light_block(acc0, acc1, x_ptr, stride_xm, offs_m, mask_m,
                p0_ptr, p1_ptr, s_ptr, z_ptr, q0_ptr, q1_ptr, t_ptr, u_ptr,
                sa0, za0, sa1, za1, N, K, k0, offs_n, mask_n,
                BITS: tl.constexpr, GROUP: tl.constexpr, SYMMETRIC: tl.constexpr,
                SCALE_AFTER: tl.constexpr, DUAL: tl.constexpr, ROWS: tl.constexpr,
                INTERLEAVE: tl.constexpr, FAST4: tl.constexpr,
                PRECISION: tl.constexpr, UNIFORM: tl.constexpr = False,
                WA: tl.constexpr = False):  # fmt: skip
    """acc0 (+= x @ W0[:, k-block]^T) and, when DUAL, acc1 (+= x @ W1^T) for one K-block.
    WA (UNIFORM blocks only): the accumulators are [BLOCK_N, BLOCK_M] and take W0 @ x^T, the
    dequantized weights as the MMA's A operand (registers on sm_90: no shared-memory copy of
    them), x as B.

    W0 is (p0, p1, s, z), W1 is (q0, q1, t, u): two weights of the same shape and format sharing
    the x tile (up and gate). With INTERLEAVE the x tile is permuted to the codes' row order.
    With SCALE_AFTER the block's scales/zeros come in as sa*/za* (block_scales, prefetched).
    """
    PACK: tl.constexpr = 32 // (8 if BITS == 8 else (4 if BITS == 4 else 2))
    OFFSET: tl.constexpr = (1 << (BITS - 1)) if SYMMETRIC else 0
    BLOCK_K: tl.constexpr = ROWS * PACK
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    k = tl.arange(0, BLOCK_K)
    x = tl.load(x_ptr + k0 + offs_m[:, None] * stride_xm + k[None, :],
                mask=mask_m[:, None] & (k < K - k0)[None, :], other=0.0)  # fmt: skip
    if INTERLEAVE:  # column j * ROWS + r <- k = r * PACK + j
        x = tl.reshape(tl.permute(tl.reshape(x, [x.shape[0], ROWS, PACK]), [0, 2, 1]),
                       [x.shape[0], BLOCK_K])  # fmt: skip
    w0, w1, mask_r = load_words(p0_ptr, p1_ptr, N, K, k0, offs_n, mask_n, BITS, ROWS)
    if DUAL:
        v0, v1, _ = load_words(q0_ptr, q1_ptr, N, K, k0, offs_n, mask_n, BITS, ROWS)
    if SCALE_AFTER:  # the whole block lies in one group: scale (and zero) per output column
        if FAST4:
            q = unpack4_fast(w0, SYMMETRIC, DTYPE)
        else:
            q = codes_to_float(unpack_codes(w0, w1, BITS, INTERLEAVE), OFFSET, DTYPE, BITS)
        blk0 = tl.dot(x, q, input_precision=PRECISION)
        if DUAL:
            if FAST4:
                q = unpack4_fast(v0, SYMMETRIC, DTYPE)
            else:
                q = codes_to_float(unpack_codes(v0, v1, BITS, INTERLEAVE), OFFSET, DTYPE, BITS)
            blk1 = tl.dot(x, q, input_precision=PRECISION)
        if SYMMETRIC:
            acc0 += blk0 * sa0
            if DUAL:
                acc1 += blk1 * sa1
        else:
            # row sums of x, broadcast over the columns, from the tensor cores: exact, and
            # cheaper than a cross-thread reduction (every B fragment is the same constant)
            ones = tl.full([BLOCK_K, acc0.shape[1]], 1.0, DTYPE)
            xsum = tl.dot(x, ones, input_precision=PRECISION)
            acc0 += (blk0 - xsum * za0) * sa0
            if DUAL:
                acc1 += (blk1 - xsum * za1) * sa1
    elif UNIFORM:
        # the block lies in one group, scales applied per element (prefill: one dequantized tile
        # serves many rows) in the activation dtype
        w = uniform_weights(w0, w1, sa0, za0, BITS, SYMMETRIC, INTERLEAVE, FAST4, DTYPE)
        if WA:
            xt = tl.trans(x)
            acc0 = tl.dot(tl.trans(w), xt, acc0, input_precision=PRECISION)
        else:
            acc0 = tl.dot(x, w, acc0, input_precision=PRECISION)
        if DUAL:
            w = uniform_weights(v0, v1, sa1, za1, BITS, SYMMETRIC, INTERLEAVE, FAST4, DTYPE)
            if WA:
                acc1 = tl.dot(tl.trans(w), xt, acc1, input_precision=PRECISION)
            else:
                acc1 = tl.dot(x, w, acc1, input_precision=PRECISION)
    else:
        # groups change along the block (a word never straddles one: GROUP % PACK == 0)
        r = tl.arange(0, ROWS)
        g_off = ((k0 + r * PACK) // GROUP)[:, None] * N + offs_n[None, :]
        g_mask = mask_r[:, None] & mask_n[None, :]
        s0 = expand(tl.load(s_ptr + g_off, mask=g_mask, other=0.0).to(tl.float32), PACK,
                    INTERLEAVE)  # fmt: skip
        if SYMMETRIC:
            z0 = OFFSET
        else:
            z0 = expand(tl.load(z_ptr + g_off, mask=g_mask, other=0.0).to(tl.float32), PACK,
                        INTERLEAVE)  # fmt: skip
        q = codes_to_float(unpack_codes(w0, w1, BITS, INTERLEAVE), 0, tl.float32, BITS)
        acc0 = tl.dot(x, ((q - z0) * s0).to(DTYPE), acc0, input_precision=PRECISION)
        if DUAL:
            s1 = expand(tl.load(t_ptr + g_off, mask=g_mask, other=0.0).to(tl.float32), PACK,
                        INTERLEAVE)  # fmt: skip
            if SYMMETRIC:
                z1 = OFFSET
            else:
                z1 = expand(tl.load(u_ptr + g_off, mask=g_mask, other=0.0).to(tl.float32), PACK,
                            INTERLEAVE)  # fmt: skip
            q = codes_to_float(unpack_codes(v0, v1, BITS, INTERLEAVE), 0, tl.float32, BITS)
            acc1 = tl.dot(x, ((q - z1) * s1).to(DTYPE), acc1, input_precision=PRECISION)
    return acc0, acc1


@triton.jit
def dense_block(
    acc0,
    acc1,
    x_ptr,
    stride_xm,
    offs_m,
    mask_m,
    w0_ptr,
    w1_ptr,
    stride_wn,
    K,
    k0,
    offs_n,
    mask_n,
    DUAL: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """acc0 += x @ W0[:, k-block]^T (and acc1 with W1 when DUAL) for dense [N, K] weights."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    x = tl.load(
        x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
        mask=mask_m[:, None] & mask_k[None, :],
        other=0.0,
    )
    w_off = offs_n[None, :] * stride_wn + offs_k[:, None]
    w_mask = mask_k[:, None] & mask_n[None, :]
    acc0 = tl.dot(
        x, tl.load(w0_ptr + w_off, mask=w_mask, other=0.0), acc0, input_precision=PRECISION
    )
    if DUAL:
        acc1 = tl.dot(
            x, tl.load(w1_ptr + w_off, mask=w_mask, other=0.0), acc1, input_precision=PRECISION
        )
    return acc0, acc1


@triton.jit
def activation(g, ACTIVATION: tl.constexpr):
    """The FFN nonlinearity on fp32 `g` (names as in ACTIVATION_NAMES)."""
    if ACTIVATION == "silu":
        return g * tl.sigmoid(g)
    elif ACTIVATION == "gelu":
        return 0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476))
    elif ACTIVATION == "gelu_tanh":
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        return g * tl.sigmoid(2.0 * inner)  # 0.5 * (1 + tanh(t)) == sigmoid(2t)
    else:
        return tl.maximum(g, 0.0)


@triton.jit
def store_activations(acc_u, acc_g, ub_ptr, gb_ptr, a_ptr, stride_am, offs_m, mask_m, cols,
                       mask_n, GATED: tl.constexpr, ACTIVATION: tl.constexpr,
                       HAS_UP_BIAS: tl.constexpr, HAS_GATE_BIAS: tl.constexpr):  # fmt: skip
    """Epilogue: biases, activation and gating on fp32 tiles, one store of `a` columns `cols`;
    returns what was stored (in a's dtype)."""
    if HAS_UP_BIAS:
        acc_u += tl.load(ub_ptr + cols, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if GATED:
        if HAS_GATE_BIAS:
            acc_g += tl.load(gb_ptr + cols, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        out = activation(acc_g, ACTIVATION) * acc_u
    else:
        out = activation(acc_u, ACTIVATION)
    out = out.to(a_ptr.dtype.element_ty)
    ptrs = a_ptr + offs_m[:, None] * stride_am + cols[None, :]
    tl.store(ptrs, out, mask=mask_m[:, None] & mask_n[None, :])
    return out


# ---------------------------------------------------------------------------------------------
# launch plumbing


@dataclass(frozen=True)
class TileConfig:
    """One launch configuration. A light K-block is `block_kl` codes (its word rows: light_rows)."""

    block_m: int
    block_n: int
    block_kl: int
    block_kh: int  # K-block of the dense (heavy) part
    num_warps: int
    num_stages: int
    scale_after: bool = True  # apply scales per block (when groups allow) instead of per element
    interleave: bool = True  # codes kept in their words' registers, x gathered (decode)
    block_nh: int = 0  # N-block of heavy neurons in the up kernel (0: same as block_n)
    fast_unpack: bool = True  # inline-PTX int4 unpack where it applies (see fast_unpack)
    # split-K: K-slices that fill `waves` whole waves of per_sm programs an SM (the programs an
    # SM holds); None: the kernel's default (down projection: at least 2 programs an SM; up
    # kernel: no split)
    per_sm: int | None = None
    waves: int = 1
    # light blocks as W @ x^T (the dequantized weights as the MMA's A operand) where the block
    # lies in one group (uniform_ok, scale_after off): see light_block's WA
    w_as_a: bool = False


def light_rows(cfg: TileConfig, bits: int) -> int:
    """Word rows of a light K-block of `cfg` for this bit width."""
    return max(2, cfg.block_kl // pack_factor(bits))


def block_in_group(block_k: int, group: int, k: int) -> bool:
    """Whether every K-block of `block_k` codes (of a K-long weight) lies inside one group."""
    return group >= k or group % block_k == 0


def scale_after_ok(cfg: TileConfig, bits: int, group: int, k: int) -> bool:
    """Whether every light K-block of `cfg` lies inside one quantization group."""
    return cfg.scale_after and block_in_group(light_rows(cfg, bits) * pack_factor(bits), group, k)


def w_as_a_ok(cfg: TileConfig, bits: int, group: int, k: int) -> bool:
    """Whether cfg's light blocks run in light_block's WA form (cfg.w_as_a, UNIFORM blocks)."""
    return cfg.w_as_a and uniform_ok(cfg, bits, group, k)


def uniform_ok(cfg: TileConfig, bits: int, group: int, k: int) -> bool:
    """Whether the light K-blocks of `cfg` are dequantized per element with one scale (and zero)
    per column for the whole block: per-element scaling (no scale_after) and every block inside
    one quantization group. Else the scales are loaded per word row."""
    block_k = light_rows(cfg, bits) * pack_factor(bits)
    return not scale_after_ok(cfg, bits, group, k) and block_in_group(block_k, group, k)


def fast4_ok(bits: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the inline-PTX int4 unpack can run: NVIDIA GPU (not the interpreter, not ROCm),
    4 bits, fp16/bf16 activations."""
    return (
        not INTERPRET
        and device.type == "cuda"
        and torch.version.hip is None
        and bits == 4
        and dtype in (torch.float16, torch.bfloat16)
    )


def fast_unpack(
    cfg: TileConfig, bits: int, group: int, k: int, dtype: torch.dtype, device: torch.device
) -> bool:
    """Whether the inline-PTX int4 unpack applies: NVIDIA GPU (not the interpreter, not ROCm),
    fp16/bf16 activations, 4 bits, blocks inside one group (interleaved with per-block scales, or
    uniform). Elsewhere the portable shift/mask path runs."""
    return (
        cfg.fast_unpack
        and fast4_ok(bits, dtype, device)
        and (cfg.interleave and scale_after_ok(cfg, bits, group, k)
             or uniform_ok(cfg, bits, group, k))
    )  # fmt: skip


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs keep full precision (no tf32): they are the accuracy reference of the kernels."""
    return "ieee" if dtype == torch.float32 else "tf32"


def torch_to_triton_ok(x: torch.Tensor) -> None:
    """Reject tensors Triton cannot run here (CPU without the interpreter)."""
    if not x.is_cuda and not INTERPRET:
        raise ValueError(
            "the Triton backend needs CUDA tensors (or TRITON_INTERPRET=1 for CPU); "
            "use backend='torch' on this device"
        )


# Programmatic dependent launch (sm_90+): a kernel launched with it may start while the kernel
# before it on the stream is still running; it issues loads that do not depend on that kernel
# (its weights), then waits (`pdl_wait`) before it reads anything the previous kernel wrote or
# writes anything. Its programs also let the next kernel start early (`pdl_trigger`). Both are
# no-ops without the launch attribute; older GPUs, the interpreter and FFNSPLIT_PDL=0 get plain
# launches (the kernels compile without the instructions).
PDL_ENV = os.environ.get("FFNSPLIT_PDL", "1") != "0"
_pdl: dict[torch.device, bool] = {}


def pdl_ok(device: torch.device) -> bool:
    """Whether launches on `device` use programmatic dependent launch."""
    ok = _pdl.get(device)
    if ok is None:
        ok = _pdl[device] = (
            PDL_ENV and not INTERPRET and device.type == "cuda" and gdc_wait is not None
            and torch.cuda.get_device_capability(device)[0] >= 9
        )  # fmt: skip
    return ok


def pdl_options(device: torch.device) -> dict:
    """The launch keywords for a kernel with a PDL constexpr: {"PDL": bool, "launch_pdl": bool}."""
    ok = pdl_ok(device)
    return {"PDL": True, "launch_pdl": True} if ok else {"PDL": False}


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """Wait until the previous kernel on the stream has finished and its writes are visible (every
    program of a PDL launch must pass here before it reads that kernel's output or writes)."""
    if PDL:
        gdc_wait()


@triton.jit
def pdl_trigger(PDL: tl.constexpr):
    """Let the next kernel on the stream launch (it does once every program of this grid has
    called this or exited, so a grid of several waves triggers when its last wave runs: the next
    kernel's waiting programs only ever take slots this grid no longer needs)."""
    if PDL:
        gdc_launch_dependents()


_COMPILED = tl.constexpr(not INTERPRET)


def ptxas_log(ptx: str, arch: int = 90) -> str:
    """`ptxas -v` on PTX as Triton assembles it (its bundled ptxas, sm_`arch`, line info): the
    registers, spills and stack it reports, without a GPU (ahead-of-time checks and reports)."""
    import subprocess
    import tempfile
    from pathlib import Path

    from triton.backends.nvidia import compiler as nvidia

    try:
        ptxas = nvidia.get_ptxas(arch).path
    except TypeError:  # Triton 3.6: no arch argument
        ptxas = nvidia.get_ptxas().path
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "kernel.ptx"
        source.write_text(ptx)
        command = [ptxas, "-lineinfo", "-v", f"--gpu-name={nvidia.sm_arch_from_capability(arch)}"]
        done = subprocess.run(
            [*command, str(source), "-o", str(source.with_suffix(".cubin"))],
            capture_output=True,
            text=True,
            check=True,
        )
    return done.stderr


@triton.jit
def fence_gpu():
    """Every thread: its earlier global writes and atomics are performed at GPU scope before
    anything after (PTX fence.acq_rel.gpu). Needed before a CTA barrier + one thread's release
    atomic publishes writes of the whole program: that release covers its own thread's writes
    only, and a store or reduction of another warp may still be in flight. The interpreter runs
    programs one after another and needs none."""
    if _COMPILED:
        tl.inline_asm_elementwise(
            "fence.acq_rel.gpu; mov.u32 $0, 0;", "=r", [], dtype=tl.int32, is_pure=False, pack=1
        )


def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


# Programs an SM holds, by the registers and shared memory of each compiled kernel variant
# (Triton's warmup compiles it before the first launch): grids are sized to fill the GPU in whole
# waves.
_resident: dict[tuple, int] = {}


def blocks_per_sm(n_regs: int, warps: int, shared: int = 0, shared_per_sm: int = 0) -> int:
    """Blocks of `warps` warps that fit an sm_80/sm_90 SM by registers (64K), warps (64), blocks
    (32) and, given `shared_per_sm`, shared memory (`shared` bytes a block plus the 1 KiB the
    hardware reserves for each)."""
    per_warp = 32 * ((n_regs + 7) // 8 * 8)
    fit = min(32, 65536 // (per_warp * warps), 64 // warps)
    if shared and shared_per_sm:
        fit = min(fit, shared_per_sm // (shared + 1024))
    return max(1, fit)


@functools.cache
def shared_per_sm(index: int) -> int:
    """Shared memory of one SM of CUDA device `index` in bytes (the properties' field where torch
    has it, else by compute capability: 228 KiB on sm_90, 164 KiB on sm_80, 100 KiB otherwise)."""
    props = torch.cuda.get_device_properties(index)
    known = getattr(props, "shared_memory_per_multiprocessor", 0)
    if known:
        return int(known)
    return {(9, 0): 228, (8, 0): 164}.get((props.major, props.minor), 100) * 1024


def resident_blocks(
    kernel, args: tuple, constexprs: dict, warps: int, guess: int, stages: int | None = None,
    count_shared: bool = False,
) -> int:  # fmt: skip
    """Programs of `kernel` (launched with these arguments) that an SM holds at once, from the
    registers and shared memory of the compiled variant (compiled here by Triton's warmup, as the launch would);
    `guess` where that is not available (the interpreter, a Triton without these internals).
    Shared memory counts with `count_shared` (the tl tiers' pipelined kernels, whose stages can
    hold more than the registers allow for); the callers sized without it keep their grids."""
    if INTERPRET or not args[0].is_cuda:
        return guess
    spec = tuple(
        (t.dtype, t.data_ptr() % 16 == 0) if isinstance(t, torch.Tensor) else (t == 1, t % 16 == 0)
        for t in args
    )
    key = (kernel.fn.__name__, args[0].device.index, spec, tuple(constexprs.items()), warps, stages,
           count_shared)  # fmt: skip
    if key not in _resident:
        options = (
            {"num_warps": warps} if stages is None else {"num_warps": warps, "num_stages": stages}
        )
        try:
            compiled = kernel.warmup(*args, **constexprs, **options, grid=(1,))
            compiled._init_handles()
            shared = int(getattr(compiled.metadata, "shared", 0) or 0) if count_shared else 0
            index = args[0].device.index
            index = torch.cuda.current_device() if index is None else index
            _resident[key] = blocks_per_sm(int(compiled.n_regs), warps, shared,
                                           shared_per_sm(index) if shared else 0)  # fmt: skip
        except Exception:  # noqa: BLE001 - a Triton without these internals: keep the estimate
            _resident[key] = guess
    return _resident[key]


PATHS = ("auto", "gemv", "mma", "decode", "small", "prefill", "dequant", "fused")


def use_gemv(m: int, path: str) -> bool:
    """Whether M rows take the CUDA-core GEMV path ("auto" below GEMV_MAX_M, or forced)."""
    if path not in PATHS:
        raise ValueError(f"unknown kernel path {path!r}: choose one of {', '.join(PATHS)}")
    return path == "gemv" or (path == "auto" and m <= GEMV_MAX_M)


def use_dequant(m: int, path: str) -> bool:
    """Whether M rows take the dequantize-a-chunk + cuBLAS path ("auto" from DEQUANT_MIN_M)."""
    if path not in PATHS:
        raise ValueError(f"unknown kernel path {path!r}: choose one of {', '.join(PATHS)}")
    return path == "dequant" or (path == "auto" and m >= DEQUANT_MIN_M)


# under the interpreter: one tiny config per path (the decode one interleaves and scales per block,
# the others keep the natural k order and dequantize per element)
_INTERPRET = {
    "decode": TileConfig(16, 32, 128, 32, num_warps=1, num_stages=1, block_nh=16),
    "small": TileConfig(32, 32, 128, 32, num_warps=1, num_stages=1, block_nh=32, interleave=False),
    "prefill": TileConfig(
        32, 32, 128, 32, num_warps=1, num_stages=1, scale_after=False, interleave=False, block_nh=16
    ),  # fmt: skip
}


def tier_configs(
    m: int, path: str, dtype: torch.dtype, table: dict[str, tuple[TileConfig, ...]]
) -> tuple[str, tuple[TileConfig, ...]]:
    """The tier for M rows ('auto' picks by M; tests and benchmarks force one) and its configs.

    fp32 activations (the accuracy path) get tiles small enough for fp32 operands.
    """
    if path not in PATHS:
        raise ValueError(f"unknown kernel path {path!r}: choose one of {', '.join(PATHS)}")
    if path == "fused":
        raise ValueError("kernel path 'fused' is the whole split FFN in one launch: only split_ffn "
                         "takes it; use path='auto' for its halves")  # fmt: skip
    if path == "auto":
        path = "decode" if m <= DECODE_MAX_M else ("small" if m <= SMALL_MAX_M else "prefill")
    if INTERPRET:
        return path, (_INTERPRET[path],)
    if dtype == torch.float32:
        return path, tuple(
            replace(c, block_m=min(c.block_m, 64), block_n=min(c.block_n, 64), block_kh=32,
                    block_nh=min(c.block_nh, 64), num_warps=4, num_stages=2)
            for c in table[path][:1]
        )  # fmt: skip
    return path, table[path]


TUNE_ROUNDS = 2
GRAPH_CALLS = 8  # calls per CUDA graph when timing a config


def capture_graph(fn: Callable[[], object]) -> torch.cuda.CUDAGraph:
    """A CUDA graph of `fn`: run once on the current stream (compiles and tunes kernels, which
    must not happen during capture), once on a side stream (as capture requires), then captured."""
    fn()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def _time_ms(fn: Callable[[], object]) -> float:
    """Median milliseconds of one call of `fn` on the GPU, from replays of a CUDA graph holding
    GRAPH_CALLS calls: a Python launch can cost more than a decode kernel runs, and timing
    launches one by one measured the host (tuner picks 30-50% off the best). Without CUDA, plain
    launches after a first call."""
    if not torch.cuda.is_available():
        fn()
        return triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median")

    def calls() -> None:
        for _ in range(GRAPH_CALLS):
            fn()

    graph = capture_graph(calls)
    ms = triton.testing.do_bench(graph.replay, warmup=5, rep=25, return_mode="median")
    return ms / GRAPH_CALLS


class Tuner:
    """Per-shape choice among a few configs, timed once on the first call (no tuning when one).

    The first call per key runs every candidate; later calls (and CUDA-graph captures) only launch.
    """

    def __init__(self) -> None:
        self.cache: dict[tuple, TileConfig] = {}
        self.timings: dict[tuple, dict[TileConfig, float]] = {}  # milliseconds, for benchmarks

    def pick(
        self, key: tuple, configs: Sequence[TileConfig], run: Callable[[TileConfig], object]
    ) -> TileConfig:
        if len(configs) == 1 or not AUTOTUNE:
            return configs[0]
        best = self.cache.get(key)
        if best is None:
            if torch.cuda.is_current_stream_capturing():
                raise RuntimeError(
                    "ffnsplit kernels tune on their first call: run once before capturing a graph"
                )
            # two interleaved rounds, the faster median of each config kept: the first configs
            # timed on an idle GPU run while its clocks ramp up
            timings: dict[TileConfig, float] = {}
            failed = set()
            for _ in range(TUNE_ROUNDS):
                for cfg in configs:
                    if cfg in failed:
                        continue
                    try:
                        t = _time_ms(lambda cfg=cfg: run(cfg))
                    except triton.runtime.errors.OutOfResources:
                        failed.add(cfg)
                        continue
                    timings[cfg] = min(t, timings.get(cfg, t))
            best = min(timings, key=timings.get)
            self.cache[key] = best
            self.timings[key] = timings
        return best
