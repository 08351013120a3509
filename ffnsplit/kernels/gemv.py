"""Decode (M <= GEMV_MAX_M rows) split-FFN products on CUDA cores: no tensor cores, no shared memory.

At M = 1 a tensor-core tile pads M to 16 and stages the packed words through shared memory; here
each program owns a block of output columns and a K-slice (split-K) and streams its weights
straight into registers:
  * light (packed) part: a [ROWS, BLOCK_N] tile of int32 words per step, 16-byte loads along N
    (planes are K-major, consecutive columns contiguous); every thread keeps whole columns, so
    the reduction over K never leaves the thread. A code c of b bits is OR-ed into the top of an
    fp32 mantissa: v = 1 + c * 2^-b exactly (shift + lop3, no int-to-float conversion, no
    subtraction), and sum_k x v = sum_k x + 2^-b sum_k x c. A step lies inside one quantization
    group, so per column sum_k w x = s * 2^b * T - s * (2^b + z) * sum_k x with T = sum_k x v.
  * dense (heavy) part: [BLOCK_ND, BLOCK_KD] tiles of rows (K contiguous), reduced along K.
Both parts of one call run in one launch (first programs dense, the rest light) and write fp32
partial sums per K-slice to a workspace; `_gemv_reduce_kernel` adds them in a fixed order
(deterministic, no atomics) and applies bias, activation and gating (kernel A) or bias (kernel B).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ffnsplit.kernels.format import QuantizedWeight, SplitFFNWeights
from ffnsplit.kernels.tiles import INTERPRET, Tuner, activation, load_words, pack_factor, sm_count


@triton.jit
def _code_float(w0, w1, r, j: tl.constexpr, BITS: tl.constexpr):
    """1 + c * 2^-BITS (exact fp32) for code j of every word of w0 (and plane 1 w1 for 3 bits):
    the code is moved to the top of the mantissa of 1.0 by one shift and one and-or."""
    WIDTH: tl.constexpr = 8 if BITS == 8 else (4 if BITS == 4 else 2)
    MASK: tl.constexpr = (1 << BITS) - 1
    TOP: tl.constexpr = 23 - BITS  # the code's lowest bit in the mantissa
    if BITS == 3:  # the 1-bit word of row r holds this row's bit 2 at 16 * (r % 2) + j
        half = ((r % 2) * 16 + j)[:, None]
        f = ((((w0 >> (WIDTH * j)) & 3) | (((w1 >> half) & 1) << 2)) << TOP) | 0x3F800000
    elif WIDTH * j <= TOP:
        f = ((w0 << (TOP - WIDTH * j)) & (MASK << TOP)) | 0x3F800000
    else:
        f = ((w0 >> (WIDTH * j - TOP)) & (MASK << TOP)) | 0x3F800000
    return f.to(tl.float32, bitcast=True)


@triton.jit
def _light_steps(acc0, acc1, x_ptr, stride_xm, offs_m, mask_m, p0_ptr, p1_ptr, s_ptr, z_ptr,
                 q0_ptr, q1_ptr, t_ptr, u_ptr, N, K, b_lo, b_hi, offs_n, mask_n,
                 BITS: tl.constexpr, GROUP: tl.constexpr, SYMMETRIC: tl.constexpr,
                 DUAL: tl.constexpr, ROWS: tl.constexpr):  # fmt: skip
    """acc0 += x @ W0[:, blocks b_lo..b_hi]^T (acc1 with W1 when DUAL); blocks of ROWS words."""
    PACK: tl.constexpr = 32 // (8 if BITS == 8 else (4 if BITS == 4 else 2))
    TWO_B: tl.constexpr = float(1 << BITS)
    r = tl.arange(0, ROWS)
    for b in range(b_lo, b_hi):
        k0 = b * ROWS * PACK
        w0, w1, mask_r = load_words(p0_ptr, p1_ptr, N, K, k0, offs_n, mask_n, BITS, ROWS)
        if DUAL:
            v0, v1, _ = load_words(q0_ptr, q1_ptr, N, K, k0, offs_n, mask_n, BITS, ROWS)
        g_off = (k0 // GROUP) * N + offs_n
        s0 = tl.load(s_ptr + g_off, mask=mask_n, other=0.0).to(tl.float32)
        if DUAL:
            s1 = tl.load(t_ptr + g_off, mask=mask_n, other=0.0).to(tl.float32)
        if SYMMETRIC:
            z0 = tl.full(s0.shape, (1 << (BITS - 1)), tl.float32)
            z1 = z0
        else:
            z0 = tl.load(z_ptr + g_off, mask=mask_n, other=0.0).to(tl.float32)
            if DUAL:
                z1 = tl.load(u_ptr + g_off, mask=mask_n, other=0.0).to(tl.float32)
        # per-row fp32 FMA chains over the codes of each word; rows summed once per step
        t0 = tl.zeros([acc0.shape[0], ROWS, acc0.shape[1]], dtype=tl.float32)
        t1 = tl.zeros([acc1.shape[0], ROWS, acc1.shape[1]], dtype=tl.float32)
        x_mask = mask_m[:, None] & mask_r[None, :]
        for j in tl.static_range(PACK):
            xj = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k0 + r * PACK + j)[None, :],
                         mask=x_mask, other=0.0).to(tl.float32)  # fmt: skip
            x3 = xj[:, :, None]
            t0 += x3 * _code_float(w0, w1, r, j, BITS)[None, :, :]
            if DUAL:
                t1 += x3 * _code_float(v0, v1, r, j, BITS)[None, :, :]
        kk = k0 + tl.arange(0, ROWS * PACK)
        xb = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :],
                     mask=mask_m[:, None] & (kk < K)[None, :], other=0.0)  # fmt: skip
        xs = tl.sum(xb.to(tl.float32), axis=1)[:, None]
        acc0 += (s0 * TWO_B)[None, :] * tl.sum(t0, axis=1) - (s0 * (TWO_B + z0))[None, :] * xs
        if DUAL:
            acc1 += (s1 * TWO_B)[None, :] * tl.sum(t1, axis=1) - (s1 * (TWO_B + z1))[None, :] * xs
    return acc0, acc1


@triton.jit
def _dense_steps(acc0, acc1, x_ptr, stride_xm, offs_m, mask_m, w0_ptr, w1_ptr, stride_w, K,
                 kb_lo, kb_hi, offs_n, mask_n, DUAL: tl.constexpr,
                 BLOCK_KD: tl.constexpr):  # fmt: skip
    """acc0 += x @ W0[:, k-blocks kb_lo..kb_hi]^T (acc1 with W1 when DUAL), W row-major [N, K]."""
    for kb in range(kb_lo, kb_hi):
        offs_k = kb * BLOCK_KD + tl.arange(0, BLOCK_KD)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(tl.float32)  # fmt: skip
        x3 = x[:, None, :]
        w_off = offs_n[:, None] * stride_w + offs_k[None, :]
        w_mask = mask_n[:, None] & mask_k[None, :]
        w = tl.load(w0_ptr + w_off, mask=w_mask, other=0.0).to(tl.float32)
        acc0 += tl.sum(x3 * w[None, :, :], axis=2)
        if DUAL:
            w = tl.load(w1_ptr + w_off, mask=w_mask, other=0.0).to(tl.float32)
            acc1 += tl.sum(x3 * w[None, :, :], axis=2)
    return acc0, acc1


@triton.jit
def _store_partials(ws_ptr, acc0, acc1, slot, M, NOUT, offs_m, mask_m, cols, mask_n,
                    DUAL: tl.constexpr):  # fmt: skip
    """ws[slot, 0 (up) / 1 (gate), m, cols] = acc0 / acc1."""
    DUALS: tl.constexpr = 2 if DUAL else 1
    out = ws_ptr + (slot * DUALS * M + offs_m[:, None]) * NOUT + cols[None, :]
    out_mask = mask_m[:, None] & mask_n[None, :]
    tl.store(out, acc0, mask=out_mask)
    if DUAL:
        tl.store(out + M * NOUT, acc1, mask=out_mask)


@triton.jit
def _dense_program(x_ptr, dw0_ptr, dw1_ptr, ws_ptr, tile, split, M, stride_xm, ND, KD,
                   stride_dw, OD, SD, NOUT, DUAL: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_ND: tl.constexpr, BLOCK_KD: tl.constexpr):  # fmt: skip
    """Dense rows tile*BLOCK_ND.. over K-slice `split` of SD -> ws slot `split`, columns OD.."""
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_n = tile * BLOCK_ND + tl.arange(0, BLOCK_ND)
    mask_n = offs_n < ND
    acc0 = tl.zeros([BLOCK_M, BLOCK_ND], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_M, BLOCK_ND], dtype=tl.float32)
    nb = tl.cdiv(KD, BLOCK_KD)
    acc0, acc1 = _dense_steps(acc0, acc1, x_ptr, stride_xm, offs_m, mask_m, dw0_ptr, dw1_ptr,
                              stride_dw, KD, split * nb // SD, (split + 1) * nb // SD, offs_n,
                              mask_n, DUAL, BLOCK_KD)  # fmt: skip
    _store_partials(ws_ptr, acc0, acc1, split, M, NOUT, offs_m, mask_m, OD + offs_n, mask_n,
                    DUAL)  # fmt: skip


@triton.jit
def _light_program(x_ptr, p0_ptr, p1_ptr, s_ptr, z_ptr, q0_ptr, q1_ptr, t_ptr, u_ptr, ws_ptr,
                   tile, split, M, stride_xm, NL, KL, OL, SL, SLOT_L, NOUT,
                   BITS: tl.constexpr, GROUP: tl.constexpr, SYMMETRIC: tl.constexpr,
                   DUAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   ROWS: tl.constexpr):  # fmt: skip
    """Packed columns tile*BLOCK_N.. over K-slice `split` of SL -> ws slot SLOT_L + split."""
    PACK: tl.constexpr = 32 // (8 if BITS == 8 else (4 if BITS == 4 else 2))
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < NL
    acc0 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    nb = tl.cdiv(KL, ROWS * PACK)
    acc0, acc1 = _light_steps(acc0, acc1, x_ptr, stride_xm, offs_m, mask_m, p0_ptr, p1_ptr, s_ptr,
                              z_ptr, q0_ptr, q1_ptr, t_ptr, u_ptr, NL, KL, split * nb // SL,
                              (split + 1) * nb // SL, offs_n, mask_n, BITS, GROUP, SYMMETRIC,
                              DUAL, ROWS)  # fmt: skip
    _store_partials(ws_ptr, acc0, acc1, SLOT_L + split, M, NOUT, offs_m, mask_m, OL + offs_n,
                    mask_n, DUAL)  # fmt: skip


@triton.jit(do_not_specialize=["M", "SD", "SL"])
def _gemv_kernel(
    x_ptr, dw0_ptr, dw1_ptr, p0_ptr, p1_ptr, s_ptr, z_ptr, q0_ptr, q1_ptr, t_ptr, u_ptr, ws_ptr,
    M, stride_xm, ND, KD, stride_dw, XD, OD, SD, NL, KL, XL, OL, SL, SLOT_L, NOUT,
    BITS: tl.constexpr, GROUP: tl.constexpr, SYMMETRIC: tl.constexpr, DUAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr,
    BLOCK_ND: tl.constexpr, BLOCK_KD: tl.constexpr,
):  # fmt: skip
    """One (column tile, K-slice) program; fp32 partials to ws[slot, dual, m, column].

    Dense programs (the first cdiv(ND, BLOCK_ND) * SD) read rows [ND, KD] against x[:, XD:] and
    write columns OD.. of slots 0..SD; light programs read packed [KL, NL] against x[:, XL:] and
    write columns OL.. of slots SLOT_L + 0..SL.
    """
    pid = tl.program_id(0)
    tiles_d = tl.cdiv(ND, BLOCK_ND)
    if pid < tiles_d * SD:
        _dense_program(x_ptr + XD, dw0_ptr, dw1_ptr, ws_ptr, pid % tiles_d, pid // tiles_d, M,
                       stride_xm, ND, KD, stride_dw, OD, SD, NOUT, DUAL, BLOCK_M, BLOCK_ND,
                       BLOCK_KD)  # fmt: skip
    else:
        pid = pid - tiles_d * SD
        tiles_l = tl.cdiv(NL, BLOCK_N)
        _light_program(x_ptr + XL, p0_ptr, p1_ptr, s_ptr, z_ptr, q0_ptr, q1_ptr, t_ptr, u_ptr,
                       ws_ptr, pid % tiles_l, pid // tiles_l, M, stride_xm, NL, KL, OL, SL,
                       SLOT_L, NOUT, BITS, GROUP, SYMMETRIC, DUAL, BLOCK_M, BLOCK_N,
                       ROWS)  # fmt: skip


@triton.jit(do_not_specialize=["M", "C0", "S0", "S1", "SMAX"])
def _gemv_reduce_kernel(ws_ptr, ub_ptr, gb_ptr, out_ptr, M, NOUT, stride_om, C0, S0, S1, SMAX,
                        DUAL: tl.constexpr, ACT: tl.constexpr, ACTIVATION: tl.constexpr,
                        HAS_UP_BIAS: tl.constexpr, HAS_GATE_BIAS: tl.constexpr,
                        BLOCK: tl.constexpr):  # fmt: skip
    """out[m, c] = finish(sum of slots) with slots 0..S0 for columns c < C0, 0..S1 for the rest.

    finish: + up bias; with DUAL act(gate + gate bias) * up, else act(up) when ACT, else up.
    """
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mn = M * NOUT
    mask = offs < mn
    col = offs % NOUT
    row = offs // NOUT
    n_slots = tl.where(col < C0, S0, S1)
    DUALS: tl.constexpr = 2 if DUAL else 1
    up = tl.zeros([BLOCK], dtype=tl.float32)
    gate = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(0, SMAX):
        m_s = mask & (s < n_slots)
        up += tl.load(ws_ptr + s * DUALS * mn + offs, mask=m_s, other=0.0)
        if DUAL:
            gate += tl.load(ws_ptr + (s * DUALS + 1) * mn + offs, mask=m_s, other=0.0)
    if HAS_UP_BIAS:
        up += tl.load(ub_ptr + col, mask=mask, other=0.0).to(tl.float32)
    if DUAL:
        if HAS_GATE_BIAS:
            gate += tl.load(gb_ptr + col, mask=mask, other=0.0).to(tl.float32)
        up = activation(gate, ACTIVATION) * up
    elif ACT:
        up = activation(up, ACTIVATION)
    tl.store(out_ptr + row * stride_om + col, up.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# launch plumbing


@dataclass(frozen=True)
class GemvConfig:
    """Light tiles [rows words, block_n columns]; dense tiles [block_nd rows, block_kd]; programs
    aimed at `waves` per SM."""

    block_n: int
    rows: int
    block_nd: int
    block_kd: int
    num_warps: int
    waves: int = 4


# block_n = 4 words (16 bytes) per thread x 32 lanes x warps: every thread owns whole columns
_CONFIGS = (
    GemvConfig(512, 8, 16, 256, num_warps=4),
    GemvConfig(256, 8, 8, 256, num_warps=2, waves=8),
    GemvConfig(1024, 4, 16, 256, num_warps=4),
)
_INTERPRET_CONFIG = GemvConfig(32, 4, 8, 32, num_warps=1, waves=1)
_tuner = Tuner()


def _rows(cfg: GemvConfig, m: int, bits: int, group: int, k: int) -> int:
    """Word rows per step: fewer for more rows of x (one fp32 accumulator per row, word and
    column), inside one quantization group, >= 2 (a 3-bit 1-bit plane word covers two rows)."""
    rows, pack = max(2, cfg.rows // triton.next_power_of_2(m)), pack_factor(bits)
    while rows > 2 and group < k and group % (rows * pack):
        rows //= 2
    return rows


def _splits(work: int, tiles: int, blocks: int, per_program: float) -> int:
    """K-slices so that each program streams about `per_program` bytes (at most one per block)."""
    if tiles == 0 or blocks == 0:
        return 0
    return max(1, min(blocks, round(work / tiles / per_program)))


def _light_args(a: QuantizedWeight | None, b: QuantizedWeight | None, x: torch.Tensor) -> list:
    out = []
    for qw in (a, b if b is not None else a):
        if qw is None:
            dummy = torch.zeros(1, dtype=torch.int32, device=x.device)
            out += [dummy, dummy, x, x]
        else:
            p0 = qw.planes[0]
            out += [p0, qw.planes[1] if len(qw.planes) > 1 else p0, qw.scales,
                    qw.scales if qw.zeros is None else qw.zeros]  # fmt: skip
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
    rows = _rows(cfg, m, bits, group, kl)
    pack = pack_factor(bits)
    tiles_d, tiles_l = triton.cdiv(nd, cfg.block_nd), triton.cdiv(nl, cfg.block_n)
    nb_d, nb_l = triton.cdiv(kd, cfg.block_kd), triton.cdiv(kl, rows * pack)
    bytes_d = 2 * nd * kd * x2.element_size()
    bytes_l = 0 if light is None else light[0].nbytes() * (2 if dual else 1)
    per_program = (bytes_d + bytes_l) / (cfg.waves * sm_count(x2.device))
    sd = _splits(bytes_d, tiles_d, nb_d, per_program)
    sl = _splits(bytes_l, tiles_l, nb_l, per_program)
    slot_l = 0 if kernel_a else sd
    slots = max(sd, sl) if kernel_a else sd + sl
    duals = 2 if dual else 1
    ws = torch.empty((slots, duals, m, out_cols), dtype=torch.float32, device=x2.device)
    dw0 = x2 if dense is None else dense[0]
    dw1 = dw0 if dense is None or dense[1] is None else dense[1]
    _gemv_kernel[(tiles_d * sd + tiles_l * sl,)](
        x2, dw0, dw1, *_light_args(*(light or (None, None)), x2), ws,
        m, x2.stride(0), nd, kd, dw0.stride(0) if dense is not None else 0,
        0, 0, sd, nl, kl, 0 if kernel_a else kd, nd if kernel_a else 0, sl, slot_l, out_cols,
        BITS=bits, GROUP=group, SYMMETRIC=symmetric, DUAL=dual,
        BLOCK_M=triton.next_power_of_2(m), BLOCK_N=cfg.block_n, ROWS=rows,
        BLOCK_ND=cfg.block_nd, BLOCK_KD=cfg.block_kd, num_warps=cfg.num_warps, num_stages=1,
    )  # fmt: skip
    block = 1024
    c0, s0, s1 = (nd, sd, sl) if kernel_a else (0, 0, slots)
    _gemv_reduce_kernel[(triton.cdiv(m * out_cols, block),)](
        ws, finish.get("up_bias") if finish.get("up_bias") is not None else out,
        finish.get("gate_bias") if finish.get("gate_bias") is not None else out, out,
        m, out_cols, out.stride(0), c0, s0, s1, max(s0, s1), DUAL=dual, ACT=kernel_a,
        ACTIVATION=finish.get("activation", "relu"), HAS_UP_BIAS=finish.get("up_bias") is not None,
        HAS_GATE_BIAS=finish.get("gate_bias") is not None, BLOCK=block, num_warps=4,
    )  # fmt: skip


def _configs() -> tuple[GemvConfig, ...]:
    return (_INTERPRET_CONFIG,) if INTERPRET else _CONFIGS


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
    dense = None if heavy is None else (heavy.contiguous(), None)
    lw = None if light is None else (light, None)

    def run(cfg: GemvConfig) -> None:
        _launch(x2, dense, lw, out.shape[1], False, {"up_bias": bias}, out, cfg)

    fmt = None if light is None else (light.bits, light.group_size, light.symmetric)
    kh = 0 if heavy is None else heavy.shape[1]
    key = ("B", x2.shape[0], out.shape[1], kh, fmt, x2.dtype, x2.device)
    run(_tuner.pick(key, _configs(), run))
