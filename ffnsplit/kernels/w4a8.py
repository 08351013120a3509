"""The split FFN with int8 activations for the light part (W4A8): int8 tensor-core products.

At prefill sizes the split FFN does the dense model's FLOPs: the light codes are dequantized to
fp16/bf16 for the MMA, so the int4 weights save bytes but no tensor-core time, and cuBLAS's fp16
GEMM is compute-bound there (H200, Llama-3-8B FFN at 256 rows: the fp16 split layer at 0.85x
dense, benchmarks/RESULTS.md session 25). The tensor cores multiply int8 at twice the fp16 rate,
and a light code minus its zero point, q - z (integer zeros, quant.py), is an exact int8. So
here the light part's activations are quantized per token (row) to int8, and the light products
run as int8 x int8 -> int32, exact within a quantization group; the group's scale multiplies the
block sum in fp32 and the row scale the tile at the end. The heavy part keeps fp16/bf16 x and a:
FFSplit's heavy hitters, the neurons with the largest activations, stay out of the light part's
row scale (benchmarks/study_act_quant.py: SmolLM2-135M, int8 on the light part only +0.11
perplexity on a compressed checkpoint at 24.17; on every neuron +0.27).

  x8, sx = quantize_rows(x)                               x8 = round(x * 127 / absmax)
  kernel A: a[:, :h] = act(x Gh^T + gb) * (x Uh^T + ub)   fp16/bf16 products
            a[:, h:] = the same with sx * sum_g s_g (x8 . (q - z)_g)   int8 products
            and amax[m] = max |a[m, h:]| (one atomic max a tile and row)
  kernel B: y = a[:, :h] Dh^T + sa * sum_g s_g (a8 . (q - z)_g) + db, a8 quantized from a[:, h:]
            as it is loaded (sa = amax / 127): no pass over `a` in between

Weights: the packed format as stored (2 to 4 bits, and symmetric int8; integer zero points, as
quant.py and gptq.py write them: `unsupported` says why not). Portable Triton (int8 `tl.dot`:
mma on sm_80+, wgmma on sm_90), and runs under TRITON_INTERPRET=1; on sm_90
FFNSPLIT_W4A8_WGMMA=1 gives kernel A's light tiles to w4a8_hopper.py's int8 wgmma kernel
instead (not yet measured). Opt-in: it changes the numerics (`reference_split_ffn` is the
definition the kernels are checked against).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ffnsplit.kernels import w4a8_hopper
from ffnsplit.kernels.format import QuantizedWeight, SplitFFNWeights
from ffnsplit.kernels.reference import apply_activation
from ffnsplit.kernels.tiles import (
    INTERPRET,
    block_in_group,
    block_scales,
    dense_block,
    dot_precision,
    load_words,
    store_activations,
    torch_to_triton_ok,
    unpack_codes,
)

QMAX = 127.0


# ---------------------------------------------------------------------------------------------
# torch reference (the definition)


def quantize_rows_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (x8 [M, K] int8, sx [M] fp32) with x ~ x8 * sx: per-row absmax scaling,
    x8 = x * (127 / absmax) rounded to the nearest integer, ties to even (a zero row gives zeros
    and sx = 0)."""
    xf = x.float()
    amax = xf.abs().amax(-1)
    inv = torch.where(amax > 0, QMAX / amax.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
    q = torch.round(xf * inv[:, None]).clamp(-QMAX, QMAX).to(torch.int8)
    return q, amax / QMAX


def _fake(x: torch.Tensor) -> torch.Tensor:
    q, s = quantize_rows_ref(x)
    return q.float() * s[:, None]


def _deq(q: QuantizedWeight | torch.Tensor) -> torch.Tensor:
    """A light weight in fp32: dequantized, or as given (`dequantized` made it already)."""
    return q.float() if isinstance(q, torch.Tensor) else q.dequantize(torch.float32)


def dequantized(w: SplitFFNWeights) -> SplitFFNWeights:
    """`w` with its light weights dequantized to fp32 once (the references accept it: the CPU
    path keeps it instead of dequantizing every call)."""
    from dataclasses import replace

    return replace(w, **{name: _deq(q) for name in ("light_up", "light_gate", "light_down")
                         if (q := getattr(w, name)) is not None})  # fmt: skip


def reference_activations(x: torch.Tensor, w: SplitFFNWeights) -> torch.Tensor:
    """Kernel A's definition: a [M, h + l] in x's dtype (x [M, H]) with the light rows of up
    and gate seeing x quantized per row to int8, the heavy rows x as it is (fp32 products)."""
    xf, xq = x.float(), _fake(x)

    def rows(heavy: torch.Tensor | None, light: QuantizedWeight | None, bias) -> torch.Tensor:
        parts = []
        if heavy is not None:
            parts.append(xf @ heavy.float().t())
        if light is not None:
            parts.append(xq @ _deq(light).t())
        out = torch.cat(parts, dim=-1)
        return out if bias is None else out + bias.float()

    up = rows(w.heavy_up, w.light_up, w.up_bias)
    if w.gated:
        a = apply_activation(w.activation, rows(w.heavy_gate, w.light_gate, w.gate_bias)) * up
    else:
        a = apply_activation(w.activation, up)
    return a.to(x.dtype)


def reference_down(a: torch.Tensor, w: SplitFFNWeights) -> torch.Tensor:
    """Kernel B's definition: y [M, H] in a's dtype = a[:, :h] Dh^T (as it is) + a[:, h:]
    quantized per row to int8 times Dl^T + db (fp32 products)."""
    h = w.n_heavy
    af = a.float()
    y = torch.zeros(a.shape[0], w.hidden_size, dtype=torch.float32, device=a.device)
    if w.heavy_down is not None:
        y += af[:, :h] @ w.heavy_down.float().t()
    if w.light_down is not None:
        y += _fake(af[:, h:]) @ _deq(w.light_down).t()
    if w.down_bias is not None:
        y += w.down_bias.float()
    return y.to(a.dtype)


def reference_split_ffn(x: torch.Tensor, w: SplitFFNWeights) -> torch.Tensor:
    """The W4A8 split FFN (x [..., H] -> [..., H] in x's dtype): `reference_down` of
    `reference_activations` (a rounded to x's dtype in between, as kernel A stores it)."""
    x2 = x.reshape(-1, w.hidden_size)
    return reference_down(reference_activations(x2, w), w).reshape(x.shape)


# ---------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _row_scale(amax):
    """(127 / amax, amax / 127) of per-row absolute maxima (0 and 0 for a zero row)."""
    inv = tl.where(amax > 0, 127.0 / tl.maximum(amax, 1e-30), 0.0)
    return inv, amax * (1.0 / 127.0)


@triton.jit
def _to_int8(v, inv):
    """v * inv rounded to the nearest integer (ties to even) as int8, for fp32 v [BM, BK] and
    per-row inv [BM] with |v * inv| <= 127 (inv from the rows' absolute maxima): adding
    1.5 * 2^23 rounds at a unit in fp32 and leaves the integer in the low bits (no clamp, no
    quarter-rate float-to-int conversion)."""
    r = v * inv[:, None] + 12582912.0
    return (r.to(tl.int32, bitcast=True) - 0x4B400000).to(tl.int8)


@triton.jit
def _quant_rows_kernel(x_ptr, q_ptr, s_ptr, amax_ptr, K, stride_xm, stride_qm,
                       BLOCK_K: tl.constexpr, PERM: tl.constexpr,
                       HAS_AMAX: tl.constexpr):  # fmt: skip
    """One row a program: its absmax (HAS_AMAX: given as fp32 bits), then x8 = round(x * 127 /
    absmax) and sx. PERM: x8's columns in w4a8_hopper's slot order inside each 32-k block
    (k = 8 t + 2 i + p at slot 16 p + 4 t + i)."""
    row = tl.program_id(0)
    k = tl.arange(0, BLOCK_K)
    if HAS_AMAX:
        amax = tl.load(amax_ptr + row + tl.arange(0, 1)).to(tl.float32, bitcast=True)
    else:
        amax = tl.zeros([1], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            v = tl.load(x_ptr + row * stride_xm + k0 + k, mask=k0 + k < K, other=0.0)
            amax = tl.maximum(amax, tl.max(tl.abs(v.to(tl.float32)), 0))
    inv, sx = _row_scale(amax)
    for k0 in range(0, K, BLOCK_K):
        v = tl.load(x_ptr + row * stride_xm + k0 + k, mask=k0 + k < K, other=0.0).to(tl.float32)
        q = _to_int8(v[None, :], inv)
        col = k0 + k
        if PERM:
            r = col % 32
            col = col - r + 16 * (r % 2) + 4 * (r // 8) + (r // 2) % 4
        tl.store(q_ptr + row * stride_qm + col[None, :], q, mask=(k0 + k < K)[None, :])
    tl.store(s_ptr + row + tl.arange(0, 1), sx)


@triton.jit
def _int4_as_int8(w, z, SYMMETRIC: tl.constexpr):
    """int4 words [ROWS, BN] and their zeros z [1, BN] (integers, fp32) -> q - z as int8
    [8 ROWS, BN] in k order, four codes a word operation: the even and the odd nibbles as bytes
    (w & 0x0F0F0F0F), plus 128 - z in every byte (no carry: q + 128 - z <= 143), xor 0x80 per
    byte (= q - z in two's complement), then each byte its own element."""
    if SYMMETRIC:
        zc = tl.full(z.shape, 120 * 0x01010101, tl.int32)
    else:
        zc = (128 - z.to(tl.int32)) * 0x01010101
    flip = -2139062144  # 0x80808080
    lo = ((w & 0x0F0F0F0F) + zc) ^ flip  # bytes i: codes 2 i
    hi = (((w >> 4) & 0x0F0F0F0F) + zc) ^ flip  # codes 2 i + 1
    t = tl.join(lo, hi)  # [R, BN, 2 (p)]
    i = tl.arange(0, 4)
    b = (t[:, :, None, :] >> (8 * i)[None, None, :, None]).to(tl.int8)  # [R, BN, 4 (i), 2 (p)]
    b = tl.permute(b, [0, 2, 3, 1])  # [R, i, p, BN]: k = 8 r + 2 i + p
    return tl.reshape(b, [8 * w.shape[0], w.shape[1]])


@triton.jit
def _int8_block(acc, x8, p0_ptr, p1_ptr, s_ptr, z_ptr, N, K, k0, offs_n, mask_n,
                BITS: tl.constexpr, GROUP: tl.constexpr, SYMMETRIC: tl.constexpr,
                BLOCK_K: tl.constexpr):  # fmt: skip
    """acc [BM, BN] += s * (x8 . (q - z)) for the K-block at k0 (inside one group): the codes
    minus their zero as exact int8, an int32 product, the group scale in fp32."""
    PACK: tl.constexpr = 32 // (8 if BITS == 8 else (4 if BITS == 4 else 2))
    ROWS: tl.constexpr = BLOCK_K // PACK
    w0, w1, _ = load_words(p0_ptr, p1_ptr, N, K, k0, offs_n, mask_n, BITS, ROWS)
    s, z = block_scales(s_ptr, z_ptr, N, K, k0, offs_n, mask_n, GROUP, SYMMETRIC, True)
    if BITS == 4:
        q = _int4_as_int8(w0, z, SYMMETRIC)
    else:
        q = unpack_codes(w0, w1, BITS, False)
        if SYMMETRIC:
            q = q - (1 << (BITS - 1))
        else:
            q = q - z.to(tl.int32)
        q = q.to(tl.int8)
    blk = tl.dot(x8, q, out_dtype=tl.int32)
    # float(blk) by the bits of 1.5 * 2^23 (|blk| <= 128 * 127 * 128 < 2^22 for blocks of up to
    # 128 codes): full-rate integer and float adds instead of a quarter-rate conversion
    f = (blk + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0
    return acc + f * s


@triton.jit
def _up_kernel(x_ptr, x8_ptr, sx_ptr, hu_ptr, hg_ptr, up0_ptr, up1_ptr, us_ptr, uz_ptr, gp0_ptr,
               gp1_ptr, gs_ptr, gz_ptr, ub_ptr, gb_ptr, a_ptr, amax_ptr, M, K, NH, NL, stride_xm,
               stride_hw, stride_am, BITS: tl.constexpr, GROUP: tl.constexpr,
               SYMMETRIC: tl.constexpr, GATED: tl.constexpr, ACTIVATION: tl.constexpr,
               HAS_UP_BIAS: tl.constexpr, HAS_GATE_BIAS: tl.constexpr, PRECISION: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               BLOCK_KH: tl.constexpr):  # fmt: skip
    """Kernel A: a[:, tile] for row tile program_id(0) and heavy or light neuron tile
    program_id(1) (heavy tiles first); light tiles also raise amax[m] (fp32 bits) to the
    largest |a| they stored in row m."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    heavy_tiles = tl.cdiv(NH, BLOCK_N)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if pid_n < heavy_tiles:
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = cols < NH
        for k0 in range(0, K, BLOCK_KH):
            acc_u, acc_g = dense_block(acc_u, acc_g, x_ptr, stride_xm, offs_m, mask_m, hu_ptr,
                                       hg_ptr, stride_hw, K, k0, cols, mask_n, GATED, BLOCK_KH,
                                       PRECISION)  # fmt: skip
        out_cols = cols
    else:
        cols = (pid_n - heavy_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = cols < NL
        kk = tl.arange(0, BLOCK_K)
        for k0 in range(0, K, BLOCK_K):
            x8 = tl.load(x8_ptr + offs_m[:, None] * K + k0 + kk[None, :],
                         mask=mask_m[:, None] & (k0 + kk < K)[None, :], other=0)  # fmt: skip
            acc_u = _int8_block(acc_u, x8, up0_ptr, up1_ptr, us_ptr, uz_ptr, NL, K, k0, cols,
                                mask_n, BITS, GROUP, SYMMETRIC, BLOCK_K)  # fmt: skip
            if GATED:
                acc_g = _int8_block(acc_g, x8, gp0_ptr, gp1_ptr, gs_ptr, gz_ptr, NL, K, k0, cols,
                                    mask_n, BITS, GROUP, SYMMETRIC, BLOCK_K)  # fmt: skip
        sx = tl.load(sx_ptr + offs_m, mask=mask_m, other=0.0)[:, None]
        acc_u = acc_u * sx
        acc_g = acc_g * sx
        out_cols = NH + cols
    out = store_activations(acc_u, acc_g, ub_ptr, gb_ptr, a_ptr, stride_am, offs_m, mask_m,
                            out_cols, mask_n, GATED, ACTIVATION, HAS_UP_BIAS,
                            HAS_GATE_BIAS)  # fmt: skip
    if pid_n >= heavy_tiles:  # the row maxima of what was stored (kernel B's row scales)
        mask = mask_m[:, None] & mask_n[None, :]
        big = tl.max(tl.where(mask, tl.abs(out.to(tl.float32)), 0.0), 1)
        tl.atomic_max(amax_ptr + offs_m, big.to(tl.int32, bitcast=True), mask=mask_m)


@triton.jit
def _down_kernel(a_ptr, amax_ptr, hd_ptr, p0_ptr, p1_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, M, N,
                 KH, KL, stride_am, stride_hd, stride_om, BITS: tl.constexpr,
                 GROUP: tl.constexpr, SYMMETRIC: tl.constexpr, HAS_BIAS: tl.constexpr,
                 PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, BLOCK_KH: tl.constexpr):  # fmt: skip
    """Kernel B: out [M, N] = a[:, :KH] hd^T + sa * sum_g s_g (a8 . (q - z)_g) (+ bias), a8 the
    light columns a[:, KH:] quantized per row as they are loaded (sa = amax / 127)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, KH, BLOCK_KH):
        acc, _ = dense_block(acc, acc, a_ptr, stride_am, offs_m, mask_m, hd_ptr, hd_ptr,
                             stride_hd, KH, k0, offs_n, mask_n, False, BLOCK_KH,
                             PRECISION)  # fmt: skip
    amax = tl.load(amax_ptr + offs_m, mask=mask_m, other=0).to(tl.float32, bitcast=True)
    inv, sa = _row_scale(amax)
    light = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    kk = tl.arange(0, BLOCK_K)
    for k0 in range(0, KL, BLOCK_K):
        v = tl.load(a_ptr + KH + offs_m[:, None] * stride_am + k0 + kk[None, :],
                    mask=mask_m[:, None] & (k0 + kk < KL)[None, :], other=0.0)  # fmt: skip
        a8 = _to_int8(v.to(tl.float32), inv)
        light = _int8_block(light, a8, p0_ptr, p1_ptr, s_ptr, z_ptr, N, KL, k0, offs_n, mask_n,
                            BITS, GROUP, SYMMETRIC, BLOCK_K)  # fmt: skip
    acc += light * sa[:, None]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])  # fmt: skip


# ---------------------------------------------------------------------------------------------
# launchers

# (BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_KH, num_warps, num_stages); the interpreter's is small.
# Not yet timed on a GPU. sm_90 AOT (Triton 3.6, Llama-3-8B FFN): 64 x 64 x 128 fits both
# kernels without spills (A 220 registers, B 221); 64 x 128 spills in kernel A, 128 x 128 more.
CONFIGS = (
    (64, 64, 128, 64, 4, 3),
    (64, 128, 128, 64, 4, 3),
    (128, 64, 128, 64, 4, 3),
    (64, 64, 64, 64, 4, 4),
    (16, 128, 128, 64, 4, 3),
    (16, 64, 128, 64, 4, 4),
)
INTERPRET_CONFIG = (16, 32, 32, 32, 4, 1)


def _block_k(group: int, k: int, block_k: int) -> int:
    """The largest K-block <= block_k (a power of two) inside one group: the format's groups
    are multiples of 32 (or hold a whole row), so 32 always is."""
    while block_k > 32 and not block_in_group(block_k, group, k):
        block_k //= 2
    return block_k


_INTEGER_ZEROS: dict[tuple[int, int, int], bool] = {}


def integer_zeros(zeros: torch.Tensor) -> bool:
    """Whether every zero point is an integer (quant.py's are; the format allows fractions),
    remembered per tensor and version: the check reads the tensor (a sync on a GPU) once."""
    key = (zeros.data_ptr(), zeros._version, zeros.numel())
    if key not in _INTEGER_ZEROS:
        if len(_INTEGER_ZEROS) > 4096:
            _INTEGER_ZEROS.clear()
        _INTEGER_ZEROS[key] = bool(torch.equal(zeros, zeros.round()))
    return _INTEGER_ZEROS[key]


def light_unsupported(q: QuantizedWeight) -> str | None:
    """Why the W4A8 kernels cannot read the packed weight `q`, or None."""
    if q.bits == 8 and not q.symmetric:
        return "asymmetric int8 codes (q - z does not fit an int8)"
    if q.zeros is not None and not integer_zeros(q.zeros):
        return "fractional zero points (q - z is an exact int8 for integer zeros only)"
    return None


def unsupported(x: torch.Tensor, w: SplitFFNWeights) -> str | None:
    """Why the W4A8 kernels cannot run the FFN `w` on x, or None."""
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"activations are {x.dtype}"
    if w.light_up is None or w.light_down is None:
        return "no light part"
    for q in (w.light_up, w.light_gate, w.light_down):
        if q is not None and (reason := light_unsupported(q)):
            return reason
    return None


def quantize_rows(
    x: torch.Tensor, *, perm: bool = False, amax: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton `quantize_rows_ref`: x [M, K] (last dim contiguous) -> (x8 [M, K], sx [M]).
    `perm`: x8's columns in w4a8_hopper's slot order (K a multiple of 32); `amax`: the rows'
    absolute maxima already known (int32 fp32 bits, as kernel A leaves them): one pass."""
    torch_to_triton_ok(x)
    m, k = x.shape
    x8 = torch.empty((m, k), dtype=torch.int8, device=x.device)
    sx = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m:
        block = 32 if INTERPRET else min(triton.next_power_of_2(k), 8192)
        _quant_rows_kernel[(m,)](x, x8, sx, amax if amax is not None else sx, k, x.stride(0),
                                 x8.stride(0), BLOCK_K=block, PERM=perm,
                                 HAS_AMAX=amax is not None,
                                 num_warps=4 if block >= 1024 else 1)  # fmt: skip
    return x8, sx


def _pick(m: int) -> tuple[int, ...]:
    if INTERPRET:
        return INTERPRET_CONFIG
    return CONFIGS[4] if m <= 16 else CONFIGS[0]


def _planes(q: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    p1 = q.planes[1] if len(q.planes) > 1 else q.planes[0]
    return q.planes[0], p1, q.scales, q.zeros if q.zeros is not None else q.scales


def split_activations(
    x2: torch.Tensor, w: SplitFFNWeights, *, config: tuple[int, ...] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel A (after `quantize_rows`) of x2 [M, H] (last dim contiguous): (a [M, h + l] in
    x2's dtype, amax [M] int32: the fp32 bits of each row's largest |a[:, h:]|)."""
    m, k = x2.shape
    nh, nl = w.n_heavy, w.n_light
    bm, bn, bk, bkh, warps, stages = config or _pick(m)
    up, gate = w.light_up, w.light_gate or w.light_up
    hopper = w4a8_hopper.use(x2, w)  # light tiles by int8 wgmma (opt-in, sm_90)
    x8, sx = quantize_rows(x2, perm=hopper)  # its fragments' k order
    a = torch.empty((m, nh + nl), dtype=x2.dtype, device=x2.device)
    amax = torch.zeros((m,), dtype=torch.int32, device=x2.device)
    hu = w.heavy_up if nh else x2
    hg = w.heavy_gate if nh and w.gated else hu
    grid = (triton.cdiv(m, bm), triton.cdiv(nh, bn) + (0 if hopper else triton.cdiv(nl, bn)))
    if grid[1]:  # heavy tiles, and the light ones unless the Hopper kernel takes them
        _up_kernel[grid](
            x2, x8, sx, hu, hg, *_planes(up), *_planes(gate),
            w.up_bias if w.up_bias is not None else a, w.gate_bias if w.gate_bias is not None else a,
            a, amax, m, k, nh, nl, x2.stride(0), hu.stride(0), a.stride(0),
            BITS=up.bits, GROUP=up.group_size, SYMMETRIC=up.symmetric, GATED=w.gated,
            ACTIVATION=w.activation, HAS_UP_BIAS=w.up_bias is not None,
            HAS_GATE_BIAS=w.gate_bias is not None, PRECISION=dot_precision(x2.dtype), BLOCK_M=bm,
            BLOCK_N=bn, BLOCK_K=_block_k(up.group_size, k, bk), BLOCK_KH=bkh, num_warps=warps,
            num_stages=stages,
        )  # fmt: skip
    if hopper:
        w4a8_hopper.light_activations(x8, sx, w, a, amax)
    return a, amax


def down_projection(
    a: torch.Tensor, amax: torch.Tensor, w: SplitFFNWeights, *,
    config: tuple[int, ...] | None = None,
) -> torch.Tensor:  # fmt: skip
    """Kernel B of kernel A's (a, amax): y [M, H] in a's dtype."""
    m = a.shape[0]
    nh, nl = w.n_heavy, w.n_light
    bm, bn, bk, bkh, warps, stages = config or _pick(m)
    down = w.light_down
    out = torch.empty((m, w.hidden_size), dtype=a.dtype, device=a.device)
    if m and w4a8_hopper.use_down(a, w):  # int8 wgmma on sm_90 (opt-in)
        return w4a8_hopper.down_projection(a, amax, w, out)
    hd = w.heavy_down if nh else a
    grid = (triton.cdiv(m, bm), triton.cdiv(w.hidden_size, bn))
    _down_kernel[grid](
        a, amax, hd, *_planes(down), w.down_bias if w.down_bias is not None else out, out, m,
        w.hidden_size, nh, nl, a.stride(0), hd.stride(0), out.stride(0), BITS=down.bits,
        GROUP=down.group_size, SYMMETRIC=down.symmetric, HAS_BIAS=w.down_bias is not None,
        PRECISION=dot_precision(a.dtype), BLOCK_M=bm, BLOCK_N=bn,
        BLOCK_K=_block_k(down.group_size, nl, bk), BLOCK_KH=bkh, num_warps=warps,
        num_stages=stages,
    )  # fmt: skip
    return out


def split_ffn(
    x: torch.Tensor, w: SplitFFNWeights, *, config: tuple[int, ...] | None = None
) -> torch.Tensor:
    """The W4A8 split FFN of x [..., H] (`unsupported` must say None): `quantize_rows`, kernel
    A, kernel B. `config`: (BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_KH, num_warps, num_stages)."""
    torch_to_triton_ok(x)
    x2 = x.reshape(-1, w.hidden_size)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    a, amax = split_activations(x2, w, config=config)
    return down_projection(a, amax, w, config=config).reshape(x.shape)


__all__ = [
    "QMAX",
    "integer_zeros",
    "light_unsupported",
    "dequantized",
    "quantize_rows",
    "quantize_rows_ref",
    "reference_activations",
    "reference_down",
    "reference_split_ffn",
    "split_activations",
    "down_projection",
    "split_ffn",
    "unsupported",
]
