"""Large-M path: dequantize a chunk of the packed weight, then a cuBLAS GEMM on it.

At prefill sizes a GEMM is bound by tensor-core throughput, and a dequantize-in-the-loop Triton
GEMM spends part of it on unpacking (measured on an H100: ~0.6x dense at M = 2048, RESULTS.md).
Here a Triton kernel writes one chunk of output features of the light weight as a dense
[chunk, K] tile in the activation dtype (the layout of an nn.Linear weight, 16-byte stores; at
most CHUNK_BYTES), and torch.mm (cuBLAS) multiplies. One scratch buffer, reused chunk after
chunk and freed after the call: the packed weights stay the only stored copy (the approach of
ExLlama's "reconstruct" path and vLLM's AWQ path for large batches). Dequantizing the next chunk
on a side stream while the current one is multiplied was measured: no overlap (the kernels'
summed time equalled the wall time; the GEMM holds every SM), so it was dropped for half the
scratch memory.

- split_activations: per chunk of light neurons, up and gate dequantized by one launch into one
  [2 * chunk, K] scratch, one GEMM for both, then one kernel for biases, activation and gating
  that writes the chunk's columns of `a`; heavy neurons: two GEMMs on the dense rows.
- split_linear: out = bias + x_heavy @ W_heavy^T (one addmm), then per chunk of output features
  out[:, chunk] += x_light @ dequant(W_light[chunk])^T (addmm into the column slice, no copy).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ffnsplit.kernels.format import QuantizedWeight, SplitFFNWeights
from ffnsplit.kernels.tiles import (
    INTERPRET,
    Tuner,
    block_in_group,
    block_scales,
    codes_to_float,
    expand,
    fast4_ok,
    load_words,
    pack_factor,
    store_activations,
    uniform_weights,
    unpack_codes,
)

# dequantized scratch per chunk, at most (H100 at M = 2048: 32 MiB 0.83x dense, 64 MiB 0.87x,
# 128 MiB 0.90x; H200, session 11, heavy rows in the scratch: 128 MiB 0.934x, 256 MiB 0.962x,
# at M = 4096 0.961x and 0.980x: fewer, larger GEMMs; benchmarks/RESULTS.md)
CHUNK_BYTES = 256 << 20
# Heavy rows copied into the scratch beside the dequantized light rows, so one GEMM covers both
# (kernel A: the heavy neurons share the first chunk's up/gate GEMM and gating launch instead of
# two small-N GEMMs, a concatenation and their own gating; kernel B: the heavy columns lengthen
# each chunk's K instead of a short-K GEMM whose output the light chunks then read back). It
# costs a copy of the heavy weights a call. Measured on an H200 (session 11, Llama-3-8B FFN,
# 256 MiB chunks): M = 2048 1,196.9 us against 1,295.1 without, M = 4096 2,402.3 against
# 2,380.0, M = 1024 666.7 against 668.7 (`benchmarks/bench_prefill.py --paths
# dequant,dequant_fold`).
HEAVY_IN_SCRATCH = True
ALIGN = 8  # elements (16 bytes of fp16/bf16): leading dimensions of every cuBLAS operand


@dataclass(frozen=True)
class DequantConfig:
    """A dequant program's tile: `rows` word rows (rows * 32 / bits codes of k) of `block_n`
    output features; the tuner picks per weight shape and format."""

    rows: int
    block_n: int
    num_warps: int


_CONFIGS = (  # the first: session 4's fixed tile (8 word rows = 64 codes of int4, 128 features)
    DequantConfig(8, 128, 4),
    DequantConfig(16, 128, 4),
    DequantConfig(16, 128, 8),
    DequantConfig(8, 256, 8),
    DequantConfig(16, 64, 4),
)
_tuner = Tuner()


@triton.jit
def _dequant_tile(p0_ptr, p1_ptr, s_ptr, z_ptr, out_ptr, N, K, n0, n_cols, stride_on, pid_k,
                  pid_n, BITS: tl.constexpr, GROUP: tl.constexpr, SYMMETRIC: tl.constexpr,
                  ROWS: tl.constexpr, BLOCK_N: tl.constexpr, UNIFORM: tl.constexpr,
                  FAST4: tl.constexpr):  # fmt: skip
    """out[j, k] = W[n0 + j, k] for the [BLOCK_N, ROWS * PACK] tile (pid_n, pid_k); exact codes.

    UNIFORM (the K-block lies in one group): one scale/zero per column, (q - z) * s in out's dtype
    (FAST4: int4 unpacked by inline PTX); else fp32 math with scales per word row.
    """
    PACK: tl.constexpr = 32 // (8 if BITS == 8 else (4 if BITS == 4 else 2))
    OFFSET: tl.constexpr = (1 << (BITS - 1)) if SYMMETRIC else 0
    DTYPE: tl.constexpr = out_ptr.dtype.element_ty
    k0 = pid_k * (ROWS * PACK)
    offs_j = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_j = offs_j < n_cols
    offs_n = n0 + offs_j
    w0, w1, mask_r = load_words(p0_ptr, p1_ptr, N, K, k0, offs_n, mask_j, BITS, ROWS)
    if UNIFORM:
        s, z = block_scales(s_ptr, z_ptr, N, K, k0, offs_n, mask_j, GROUP, SYMMETRIC, True)
        w = uniform_weights(w0, w1, s, z, BITS, SYMMETRIC, False, FAST4, DTYPE)
    else:
        q = codes_to_float(unpack_codes(w0, w1, BITS, False), 0, tl.float32, BITS)
        r = tl.arange(0, ROWS)
        g_off = ((k0 + r * PACK) // GROUP)[:, None] * N + offs_n[None, :]
        g_mask = mask_r[:, None] & mask_j[None, :]
        s = expand(tl.load(s_ptr + g_off, mask=g_mask, other=0.0).to(tl.float32), PACK, False)
        if SYMMETRIC:
            w = (q - OFFSET) * s
        else:
            z = expand(tl.load(z_ptr + g_off, mask=g_mask, other=0.0).to(tl.float32), PACK, False)
            w = (q - z) * s
    k = k0 + tl.arange(0, ROWS * PACK)
    ptrs = out_ptr + offs_j[None, :] * stride_on + k[:, None]
    tl.store(ptrs, w.to(DTYPE), mask=(k < K)[:, None] & mask_j[None, :])


@triton.jit
def _dequant_kernel(p0_ptr, p1_ptr, s_ptr, z_ptr, q0_ptr, q1_ptr, t_ptr, u_ptr, out_ptr, N, K,
                    n0, n_cols, stride_on, second_row, BITS: tl.constexpr, GROUP: tl.constexpr,
                    SYMMETRIC: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
                    UNIFORM: tl.constexpr, FAST4: tl.constexpr, DUAL: tl.constexpr):  # fmt: skip
    """Rows [0, n_cols) of out = W0[n0 : n0 + n_cols, :] dequantized, and with DUAL rows
    [second_row, second_row + n_cols) = W1[n0 : n0 + n_cols, :] (program_id(1) past the first
    weight's tiles)."""
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    tiles = tl.cdiv(n_cols, BLOCK_N)
    if DUAL and pid_n >= tiles:
        _dequant_tile(q0_ptr, q1_ptr, t_ptr, u_ptr, out_ptr + second_row * stride_on, N, K, n0,
                      n_cols, stride_on, pid_k, pid_n - tiles, BITS, GROUP, SYMMETRIC, ROWS,
                      BLOCK_N, UNIFORM, FAST4)  # fmt: skip
    else:
        _dequant_tile(p0_ptr, p1_ptr, s_ptr, z_ptr, out_ptr, N, K, n0, n_cols, stride_on, pid_k,
                      pid_n, BITS, GROUP, SYMMETRIC, ROWS, BLOCK_N, UNIFORM,
                      FAST4)  # fmt: skip


@triton.jit
def _gate_kernel(ug_ptr, ub_ptr, gb_ptr, a_ptr, M, C, G, c0, stride_ug, stride_am,
                 GATED: tl.constexpr, ACTIVATION: tl.constexpr, HAS_UP_BIAS: tl.constexpr,
                 HAS_GATE_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_C: tl.constexpr):  # fmt: skip
    """a[:, c0 + j] = act(g + gate_bias) * (u + up_bias) (or act(u + up_bias)), u = ug[:, j],
    g = ug[:, G + j]; bias index c0 + j."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (offs_m < M)[:, None] & (offs_c < C)[None, :]
    base = ug_ptr + offs_m[:, None] * stride_ug + offs_c[None, :]
    u = tl.load(base, mask=mask, other=0.0).to(tl.float32)
    g = u  # not read unless GATED
    if GATED:
        g = tl.load(base + G, mask=mask, other=0.0).to(tl.float32)
    store_activations(u, g, ub_ptr, gb_ptr, a_ptr, stride_am, offs_m, offs_m < M, c0 + offs_c,
                      offs_c < C, GATED, ACTIVATION, HAS_UP_BIAS, HAS_GATE_BIAS)  # fmt: skip


def dequantize_chunk(
    qw: QuantizedWeight,
    n0: int,
    n1: int,
    out: torch.Tensor,
    second: QuantizedWeight | None = None,
    second_row: int | None = None,
) -> torch.Tensor:
    """Write W[n0:n1, :] (dequantized, [n1 - n0, K]) into out's first rows, and with `second`
    (same format) second[n0:n1, :] into rows second_row .. second_row + n1 - n0 (by default the
    next n1 - n0 rows); one launch, unit column stride."""
    n, k = qw.shape
    cols = n1 - n0
    if second_row is None:
        second_row = cols
    elif second is None or second_row < cols:
        raise ValueError("second_row needs `second` and must be at least n1 - n0")
    rows = second_row + cols if second is not None else cols
    if out.shape != (rows, k) or out.stride(1) != 1:
        raise ValueError(f"out must be [{rows}, {k}] with unit column stride")
    bits = qw.bits

    def run(cfg: DequantConfig) -> None:
        block_k = cfg.rows * pack_factor(bits)
        uniform = block_in_group(block_k, qw.group_size, k)
        fast4 = uniform and fast4_ok(bits, out.dtype, out.device)
        tiles = triton.cdiv(cols, cfg.block_n)
        grid = (triton.cdiv(k, block_k), tiles * (2 if second is not None else 1))
        _dequant_kernel[grid](
            *qw.kernel_args(), *(second if second is not None else qw).kernel_args(), out, n, k,
            n0, cols, out.stride(0), second_row, BITS=bits, GROUP=qw.group_size,
            SYMMETRIC=qw.zeros is None, ROWS=cfg.rows, BLOCK_N=cfg.block_n, UNIFORM=uniform, FAST4=fast4,
            DUAL=second is not None, num_warps=cfg.num_warps,
        )  # fmt: skip

    # tiles whose K-block would span groups take the slower per-word-row scale path: left out
    configs = [c for c in _configs() if block_in_group(c.rows * pack_factor(bits), qw.group_size,
                                                       k)] or [_CONFIGS[0]]  # fmt: skip
    key = (bits, qw.group_size, qw.zeros is None, k, cols, second is not None, out.dtype,
           out.device)  # fmt: skip
    run(_tuner.pick(key, configs, run))
    return out


def _configs() -> tuple[DequantConfig, ...]:
    return _CONFIGS[:1] if INTERPRET else _CONFIGS


def _chunk(k: int, weights: int, dtype: torch.dtype) -> int:
    """Output features per chunk: `weights` dequantized [chunk, K] tiles within CHUNK_BYTES."""
    per_feature = k * weights * torch.finfo(dtype).bits // 8
    return max(128, CHUNK_BYTES // per_feature // 128 * 128)


def _aligned(n: int) -> int:
    """n rounded up to ALIGN elements: cuBLAS takes its fast (sm80+/sm90) kernels only when every
    leading dimension is a multiple of 16 bytes; an odd heavy count (ceil(5% * I), e.g. 717 of
    14,336) made it fall back to sm75 kernels at ~half the speed (H200, session 11)."""
    return -(-n // ALIGN) * ALIGN


def aligned_empty(m: int, n: int, like: torch.Tensor) -> torch.Tensor:
    """An [m, n] tensor in like's dtype and device whose row stride is _aligned(n) and whose
    columns n .. _aligned(n) (in the storage, past the view) are zeros: `split_linear(...,
    padded=True)` multiplies over them."""
    full = torch.empty((m, _aligned(n)), dtype=like.dtype, device=like.device)
    if full.shape[1] > n:
        full[:, n:].zero_()
    return full[:, :n]


def _gate(
    ug: torch.Tensor,
    w: SplitFFNWeights,
    a: torch.Tensor,
    c0: int,
    cols: int,
    gate_col: int | None = None,
) -> None:
    """a[:, c0 + j] from ug's up column j and gate column gate_col + j (default cols + j)."""
    m = ug.shape[0]
    block_m, block_c = 32, 128
    grid = (triton.cdiv(m, block_m), triton.cdiv(cols, block_c))
    _gate_kernel[grid](
        ug, w.up_bias if w.up_bias is not None else a, w.gate_bias if w.gate_bias is not None else a,
        a, m, cols, cols if gate_col is None else gate_col, c0, ug.stride(0), a.stride(0),
        GATED=w.gated, ACTIVATION=w.activation,
        HAS_UP_BIAS=w.up_bias is not None, HAS_GATE_BIAS=w.gated and w.gate_bias is not None,
        BLOCK_M=block_m, BLOCK_C=block_c, num_warps=4,
    )  # fmt: skip


def split_activations(x: torch.Tensor, w: SplitFFNWeights, a: torch.Tensor) -> torch.Tensor:
    """Kernel A's result a [M, h + l] for 2-D x (validated by the caller), written into `a`."""
    h, n_light = w.n_heavy, w.n_light
    k = x.shape[1]
    lead = h if HEAVY_IN_SCRATCH and n_light else 0  # heavy rows that ride in the first chunk
    if h and not lead:  # up (and gate) GEMMs straight into the halves of one aligned buffer
        half = _aligned(h)
        ug = torch.empty((x.shape[0], 2 * half if w.gated else half), dtype=x.dtype,
                         device=x.device)  # fmt: skip
        torch.mm(x, w.heavy_up.T, out=ug[:, :h])
        if w.gated:
            torch.mm(x, w.heavy_gate.T, out=ug[:, half : half + h])
        _gate(ug, w, a, 0, h, half)
    if n_light:
        weights = 2 if w.gated else 1
        chunk = min(_chunk(k, weights, x.dtype), n_light)
        buffer = torch.empty((weights * _aligned(lead + chunk), k), dtype=x.dtype, device=x.device)
        for n0 in range(0, n_light, chunk):
            cols = min(chunk, n_light - n0)
            head = lead if n0 == 0 else 0
            rows = head + cols  # [heavy up, light up chunk, pad, heavy gate, light gate, pad]
            half = _aligned(rows)  # the GEMM's output row stride stays a multiple of 16 bytes
            tile = buffer[: weights * half]
            if head:
                tile[:head].copy_(w.heavy_up)
                if w.gated:
                    tile[half : half + head].copy_(w.heavy_gate)
            if w.gated:
                dequantize_chunk(w.light_up, n0, n0 + cols, tile[head : head + half + cols],
                                 w.light_gate, half)  # fmt: skip
            else:
                dequantize_chunk(w.light_up, n0, n0 + cols, tile[head:rows])
            # pad rows hold stale scratch: their output columns are never read
            _gate(torch.mm(x, tile.T), w, a, h + n0 - head, rows, half)
    return a


def split_linear(
    x: torch.Tensor,
    heavy: torch.Tensor | None,
    light: QuantizedWeight | None,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    *,
    padded: bool = False,
) -> torch.Tensor:
    """out [M, N] = x[:, :kh] @ heavy^T + x[:, kh:] @ dequant(light)^T + bias (2-D x, validated
    by the caller). `padded`: x comes from `aligned_empty` (its row stride is _aligned(K) and the
    storage past each row's K columns holds zeros), so the GEMM runs over the aligned K."""
    kh = 0 if heavy is None else heavy.shape[1]
    fold = HEAVY_IN_SCRATCH and heavy is not None and light is not None
    if heavy is not None and not fold:
        if bias is not None:
            torch.addmm(bias.to(x.dtype), x[:, :kh], heavy.T, out=out)
        else:
            torch.mm(x[:, :kh], heavy.T, out=out)
    elif bias is not None and not fold:
        out.copy_(bias.expand_as(out))
    if light is None:
        return out
    n, kl = light.shape
    lead = kh if fold else 0  # heavy columns in front of each chunk's dequantized light columns
    # cuBLAS takes its fast kernels only when K, every row stride and every base address are
    # multiples of 16 bytes: K is padded with zero columns of x and of the scratch
    x_chunk = x if fold else x[:, kh:]
    m, k = x_chunk.shape
    k_pad = _aligned(k)
    aligned = x_chunk.stride(0) % ALIGN == 0 and x_chunk.data_ptr() % 16 == 0
    if padded and aligned and x_chunk.stride(0) >= k_pad:
        x_chunk = x_chunk.as_strided((m, k_pad), (x_chunk.stride(0), 1))
    elif k_pad != k or not aligned:
        x_chunk = aligned_empty(m, k, x_chunk).copy_(x_chunk).as_strided((m, k_pad), (k_pad, 1))
    chunk = min(_chunk(k_pad, 1, x.dtype), n)
    buffer = torch.empty((chunk, k_pad), dtype=x.dtype, device=x.device)
    if k_pad != k:
        buffer[:, k:].zero_()
    for n0 in range(0, n, chunk):
        cols = min(chunk, n - n0)
        tile = buffer[:cols]
        if fold:
            tile[:, :lead].copy_(heavy[n0 : n0 + cols])
        dequantize_chunk(light, n0, n0 + cols, tile[:, lead : lead + kl])
        target = out[:, n0 : n0 + cols]  # each chunk's columns are written once
        if fold and bias is not None:
            torch.addmm(bias[n0 : n0 + cols].to(x.dtype), x_chunk, tile.T, out=target)
        elif fold or (heavy is None and bias is None):
            torch.mm(x_chunk, tile.T, out=target)
        else:
            target.addmm_(x_chunk, tile.T)
    return out
