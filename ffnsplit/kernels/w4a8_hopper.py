"""Kernel A's light tiles of the W4A8 split FFN on Hopper (sm_90, Gluon): int8 wgmma with the
int4 codes minus their zero as the register A operand. Opt-in (FFNSPLIT_W4A8_WGMMA=1) until it
is measured: written in session 26 without a GPU, compiled for sm_90 (tests/test_w4a8.py), its
GPU tests and timings (benchmarks/bench_w4a8.py, gpu_checks.sh w4a826) are for the next call.

Why: the portable Triton W4A8 kernels (w4a8.py) go through tl.dot, whose layouts put every int8
code through a byte store to shared memory (sm_90 AOT: 136 STS.U8 of 785 instructions a 128-k
step at 64 x 64 tiles). Here, as in wgmma_prefill.py, a program owns 64 neurons (one warpgroup:
wgmma's M) and BT rows (its N), the accumulators hold transposed tiles, and each lane's words are
exactly its A fragment once turned into bytes:

  * int8 wgmma m64nBTk32, A from registers: lane 4 g + t holds bytes k 4t..4t+3 (register a0)
    and 16+4t..16+4t+3 (a2) of row g, a1 / a3 the same for row g + 8. Lane 4 g + t takes word
    row t of each 32-k block of neurons g and g + 8 (the words ring as in wgmma_prefill): its
    even nibbles as bytes (w & 0x0F0F0F0F, codes 0, 2, 4, 6) are a0, the odd ones (w >> 4) a2,
    each byte q - z as an exact int8 by two byte-parallel operations: + (128 - z) per byte (no
    carry) and xor 0x80 per byte. 7 instructions a word (15 for fp16 in wgmma_prefill). The
    conversion to wgmma's operand layout is proven trivial at compile time.
  * so k-slot s of a 32-k block holds k = 8 t + 2 i + p for s = 16 p + 4 t + i: x8 (quantized
    per row by w4a8.quantize_rows) is permuted the same way inside each 32-k block (X8_PERM).
  * a step is 128 k = one group of 128: up's and gate's int32 products of the step land in
    fresh accumulators (use_acc=False) and are folded into fp32 ones by the group scale once
    finished: acc += s * float(tmp), float(tmp) by the bits of 1.5 * 2^23 (FOLD "magic": three
    full-rate instructions; I2F is a quarter-rate conversion). Each wait drains the pipeline:
    reading an accumulator inside a wgmma pipeline stage makes ptxas serialize (C7514). BT = 64
    rows keeps the four [64, 64] accumulators (128 registers) and the fragments in 255.
  * x8 tiles [BT, 128] by TMA into a three-stage ring (128-byte rows, 128-byte swizzle).

sm_90 AOT (Triton 3.6): 255 registers, ~60 bytes of spills, 59 KB shared, 909 SASS instructions
a two-step loop iteration (783 with I2F), 16 IGMMA. Estimate at the Llama-3-8B FFN, M = 256:
issue-bound at ~455 cycles a 128-k step and program, ~47 us for the light tiles (the fp16
wgmma_prefill kernel A: 119-124 us).

Epilogue: a[:, h + n] = act(sx * gate + gb) * (sx * up + ub) for the light neurons (natural
column order) and the row maxima of |a| for kernel B (one int32 atomic max a row and tile), as
w4a8._up_kernel writes them.
"""

from __future__ import annotations

import os

import torch
import triton

from ffnsplit.kernels import mma_decode as md
from ffnsplit.kernels import wgmma_prefill as wp
from ffnsplit.kernels.format import SplitFFNWeights

gluon, gl = md.gluon, md.gl
ENABLED = os.environ.get("FFNSPLIT_W4A8_WGMMA", "0") == "1"
BT = 64  # rows of x a program (wgmma N)
BN = 64  # light neurons a program (one warpgroup)
STEP = 128  # k a step: one group of 128
RING = 4  # words-ring stages
# slot s = 16 p + 4 t + i of a 32-k block holds k = 8 t + 2 i + p
X8_PERM = [8 * ((s % 16) // 4) + 2 * (s % 4) + s // 16 for s in range(32)]

if gluon is not None and wp.warpgroup_mma is not None:
    mbarrier, tma = wp.mbarrier, wp.tma
    warpgroup_mma, warpgroup_mma_init, warpgroup_mma_wait = (
        wp.warpgroup_mma, wp.warpgroup_mma_init, wp.warpgroup_mma_wait)  # fmt: skip
    fence_async_shared = wp.fence_async_shared
    _BT, _BN, _STEP = gl.constexpr(BT), gl.constexpr(BN), gl.constexpr(STEP)
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    # 4 copies of (word >> 4 p) and of (128 - z) * 0x01010101 -> 4 bytes q - z (pack=4)
    _ASM_I8 = gl.constexpr(
        "{ .reg .b32 t; and.b32 t, $1, 0x0F0F0F0F; add.u32 t, t, $5; xor.b32 $0, t, 0x80808080; }"
    )
    # [b1, b0, t1, t0, n, p, j1, j2] -> [n, b1, b0, p, t1, t0, j1, j2]:
    # slot 64 b1 + 32 b0 + 16 p + 8 t1 + 4 t0 + 2 j1 + j2
    _A_PERM8 = gl.constexpr((4, 0, 1, 5, 2, 3, 6, 7))

    @gluon.jit
    def _fragments8(w, zc, X_L: gl.constexpr, A8: gl.constexpr):
        """Words [16 (4 b + t), _BN] and per-neuron (128 - z) * 0x01010101 [_BN] -> the int8 A
        operand [_BN, 128 k-slots] (q - z) in wgmma's register layout (a trivial conversion)."""
        zb, _ = gl.broadcast(zc[None, :], w)
        x = gl.convert_layout(gl.join(w, w >> 4), X_L)  # [16, _BN, 2 (p)]: registers n+8, p, b
        z = gl.convert_layout(gl.join(zb, zb), X_L)
        x4 = gl.join(gl.join(x, x), gl.join(x, x))  # [16, _BN, 2, 2 (j1), 2 (j2)]
        z4 = gl.join(gl.join(z, z), gl.join(z, z))
        q = gl.inline_asm_elementwise(_ASM_I8, "=r,r,r,r,r,r,r,r,r", [x4, z4], dtype=gl.int8,
                                      is_pure=True, pack=4)  # fmt: skip
        n: gl.constexpr = w.shape[1]
        q = gl.reshape(q, [2, 2, 2, 2, n, 2, 2, 2])  # [b1, b0, t1, t0, n, p, j1, j2]
        q = gl.reshape(gl.permute(q, _A_PERM8.value), [n, 128])
        return gl.convert_layout(q, A8, assert_trivial=True)

    @gluon.jit
    def _fold(acc, s, tmp, FOLD: gl.constexpr):
        """acc + s * float(tmp) of an int32 group sum (|tmp| <= 128 * 127 * 15 < 2^22): by
        I2F, or (FOLD "magic") by adding the bits of 1.5 * 2^23 and subtracting it in fp32,
        three full-rate instructions (the conversion may be a quarter-rate one)."""
        if FOLD == "magic":
            f = (tmp + 0x4B400000).to(gl.float32, bitcast=True) - 12582912.0
        else:
            f = tmp.to(gl.float32)
        return acc + s[:, None] * f

    @gluon.jit
    def _keep(a):
        """An empty asm reading the int8 fragment a: its registers stay allocated until here
        (Triton 3.6's warpgroup_mma_wait takes no 8-bit dependencies; a fragment reused before
        its wgmma has read it would make ptxas serialize the wgmmas)."""
        gl.inline_asm_elementwise("", "=r,r", [a], dtype=gl.int8, is_pure=False, pack=4)

    @gluon.jit
    def _issue(wa_smem, wb_smem, s_smem, t, last, st, pa, pb, ps, gsub, rows, w_ok, s_ok, N, KR,
               G, RS: gl.constexpr, RB: gl.constexpr):  # fmt: skip
        """Words ring: cp.async of step min(t, last)'s two word tiles [16, _BN] into stage st:
        word rows RS t .. + 15 behind pa and RS t + RB .. + 15 behind pb (kernel A: up's and
        gate's, RS 16, RB 0; kernel B: a pair of groups of one weight, RS 32, RB 16), and the
        step's RS / 16 groups' scales and zeros [4 _BN] (gsub: each element's group in the step;
        rows past KR and groups past G zero-filled)."""
        j = gl.maximum(gl.minimum(t, last), 0)  # an empty K-slice still reads inside the weight
        md._async_load(wa_smem.index(st), pa + j * RS * N,
                       mask=((j * RS + rows) < KR)[:, None] & w_ok)  # fmt: skip
        md._async_load(wb_smem.index(st), pb + j * RS * N,
                       mask=((j * RS + RB + rows) < KR)[:, None] & w_ok)  # fmt: skip
        g = j * (RS // 16) + gsub
        md._async_load(s_smem.index(st), ps + j * (RS // 16) * N, mask=s_ok & (g < G))

    @gluon.jit
    def _x8_fetch(x_desc, bars, x_smem, u, n_tiles, m0, kx0):
        """x8 tile u (k kx0 + 128 u) into the x ring's stage u % 3; none from n_tiles on."""
        st = u % 3
        go = u < n_tiles
        mbarrier.expect(bars.index(st), x_smem.shape[1] * _STEP, pred=go)
        _tma_load(x_desc, [m0, kx0 + u * _STEP], bars.index(st), x_smem.index(st), pred=go)

    @gluon.jit
    def _words_ring(s_ptr, WR: gl.constexpr):
        """The words ring's shared memory: two [WR, 16, _BN] word tiles a stage (8-word vectors
        swizzled by row, as wgmma_prefill's) and a [WR, 4 _BN] row of scales and zeros."""
        WS: gl.constexpr = gl.SwizzledSharedLayout(vec=8, per_phase=1, max_phase=4,
                                                   order=[1, 0])  # fmt: skip
        SS: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0])
        wa_smem = gl.allocate_shared_memory(gl.int32, [WR, 16, _BN], WS)
        wb_smem = gl.allocate_shared_memory(gl.int32, [WR, 16, _BN], WS)
        s_smem = gl.allocate_shared_memory(s_ptr.dtype.element_ty, [WR, 4 * _BN], SS)
        return wa_smem, wb_smem, s_smem

    @gluon.jit
    def _x8_ring(x_desc, n_tiles, m0, kx0):
        """x8's three-stage TMA ring [3, _BT, _STEP] (128-byte swizzle), its mbarriers, and the
        copies of tiles 0 and 1 (none from n_tiles on)."""
        XSL: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=8,
                                                 rank=2)  # fmt: skip
        x_smem = gl.allocate_shared_memory(gl.int8, [3, _BT, _STEP], XSL)
        bars = gl.allocate_shared_memory(gl.int64, [3, 1], mbarrier.MBarrierLayout())
        for sb in gl.static_range(3):
            mbarrier.init(bars.index(sb), count=1)
        fence_async_shared()
        _x8_fetch(x_desc, bars, x_smem, 0, n_tiles, m0, kx0)
        _x8_fetch(x_desc, bars, x_smem, 1, n_tiles, m0, kx0)
        return x_smem, bars

    @gluon.jit
    def _step(i, last, acc_u, acc_g, tmp_g, a_g, sg_prev, wu_smem, wg_smem, s_smem, x_smem, bars,
              x_desc, m0, pu, pg, ps, gsub, rows, w_ok, s_ok, N, KR, G, V3: gl.constexpr,
              W_L: gl.constexpr, X_L: gl.constexpr, A8: gl.constexpr, WR: gl.constexpr,
              FOLD: gl.constexpr, SYMMETRIC: gl.constexpr):  # fmt: skip
        """Step i: up's fragment built while gate's product of step i - 1 runs, which is then
        folded (scale sg_prev); up's issued, gate's fragment built while it runs, up's folded,
        gate's issued (folded by step i + 1 or the epilogue)."""
        SV: gl.constexpr = gl.SliceLayout(0, W_L)
        SA: gl.constexpr = gl.SliceLayout(1, V3)
        st = i % WR
        md.async_copy.wait_group(WR - 2)
        md._barrier()
        _issue(wu_smem, wg_smem, s_smem, i + WR - 1, last, (i + WR - 1) % WR, pu, pg, ps, gsub,
               rows, w_ok, s_ok, N, KR, G, 16, 0)  # fmt: skip
        md.async_copy.commit_group()
        hu = wu_smem.index(st).load(W_L)
        hg = wg_smem.index(st).load(W_L)
        sv = s_smem.index(st)
        su = sv.slice(0, _BN).load(SA).to(gl.float32)
        zu = sv.slice(_BN, _BN).load(SV).to(gl.int32)
        if SYMMETRIC:  # noqa: SIM108 (a compile-time branch)
            zu = zu * 0 + 8
        sg = sv.slice(2 * _BN, _BN).load(SA).to(gl.float32)
        zg = sv.slice(3 * _BN, _BN).load(SV).to(gl.int32)
        if SYMMETRIC:  # noqa: SIM108
            zg = zg * 0 + 8
        mbarrier.wait(bars.index(i % 3), (i // 3) & 1)
        b = x_smem.index(i % 3).permute((1, 0))  # [128 k, _BT]
        a_u = _fragments8(hu, (128 - zu) * 0x01010101, X_L, A8)  # while gate's i - 1 runs
        # every wait drains the pipeline (wait 0): ptxas serializes wgmmas whose accumulators
        # are read between their issue and a wait that ends their pipeline stage (C7514)
        tmp_g = warpgroup_mma_wait(num_outstanding=0, deps=[tmp_g])
        _keep(a_g)
        acc_g = _fold(acc_g, sg_prev, tmp_g, FOLD)
        _x8_fetch(x_desc, bars, x_smem, i + 2, last + 1, m0, 0)  # step i - 1's stage: free
        tmp_u = warpgroup_mma(
            a_u, b, gl.zeros([_BN, _BT], gl.int32, layout=V3), use_acc=False, is_async=True
        )  # (reusing the folded tmp_u here: C7514 again)
        a_g = _fragments8(hg, (128 - zg) * 0x01010101, X_L, A8)  # while up's runs
        tmp_u = warpgroup_mma_wait(num_outstanding=0, deps=[tmp_u])
        _keep(a_u)
        acc_u = _fold(acc_u, su, tmp_u, FOLD)
        tmp_g = warpgroup_mma(a_g, b, gl.zeros([_BN, _BT], gl.int32, layout=V3), use_acc=False,
                              is_async=True)  # fmt: skip
        return acc_u, acc_g, tmp_g, a_g, sg

    @gluon.jit
    def _w4a8_up_kernel(x_desc, sx_ptr, p_ptr, s_ptr, z_ptr, q_ptr, t_ptr, u_ptr, ub_ptr, gb_ptr,
                        a_ptr, amax_ptr, M, NL, K, stride_am, a_col, ACTIVATION: gl.constexpr,
                        HAS_UP_BIAS: gl.constexpr, HAS_GATE_BIAS: gl.constexpr,
                        V3: gl.constexpr, W_L: gl.constexpr, X_L: gl.constexpr,
                        C_L: gl.constexpr, S_L: gl.constexpr, O_L: gl.constexpr,
                        WR: gl.constexpr, FOLD: gl.constexpr = "magic",
                        SYMMETRIC: gl.constexpr = False):  # fmt: skip
        """a[:, a_col + n] for light neurons n0 .. n0 + _BN (program_id 0) and rows m0 .. m0 + _BT
        (program_id 1): words p / q [K / 8, NL], scales s / t and zeros z / u [K / 128, NL]
        (groups of 128, integer zeros), x8 behind x_desc (permuted by X8_PERM), sx [M]."""
        A8: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=V3, k_width=4)
        n0 = gl.program_id(0) * _BN
        m0 = gl.program_id(1) * _BT
        last = gl.cdiv(K, _STEP) - 1
        KR = K // 8
        G = gl.cdiv(K, _STEP)
        wu_smem, wg_smem, s_smem = _words_ring(s_ptr, WR)
        rows = gl.arange(0, 16, layout=gl.SliceLayout(1, C_L))
        cols = n0 + gl.arange(0, _BN, layout=gl.SliceLayout(0, C_L))
        w_off = rows[:, None] * NL + cols[None, :]
        w_ok = (cols < NL)[None, :]
        pu = p_ptr + w_off
        pg = q_ptr + w_off
        ps, s_ok, gsub = wp._up_gate_scales(s_ptr, z_ptr, t_ptr, u_ptr, n0, NL, _BN, S_L)
        for j in gl.static_range(WR - 1):
            _issue(wu_smem, wg_smem, s_smem, j, last, j, pu, pg, ps, gsub, rows, w_ok, s_ok, NL, KR,
                   G, 16, 0)  # fmt: skip
            md.async_copy.commit_group()
        x_smem, bars = _x8_ring(x_desc, last + 1, m0, 0)

        acc_u = gl.zeros([_BN, _BT], gl.float32, layout=V3)
        acc_g = gl.zeros([_BN, _BT], gl.float32, layout=V3)
        tmp_g = warpgroup_mma_init(gl.zeros([_BN, _BT], gl.int32, layout=V3))  # sg = 0: adds 0
        a_g = gl.zeros([_BN, _STEP], gl.int8, layout=A8)
        sg = gl.zeros([_BN], gl.float32, layout=gl.SliceLayout(1, V3))
        for i in range(0, last, 2):  # two steps an iteration: ptxas keeps the wgmmas async
            acc_u, acc_g, tmp_g, a_g, sg = _step(
                i, last, acc_u, acc_g, tmp_g, a_g, sg, wu_smem, wg_smem, s_smem, x_smem, bars,
                x_desc, m0, pu, pg, ps, gsub, rows, w_ok, s_ok, NL, KR, G, V3, W_L, X_L, A8, WR,
                FOLD, SYMMETRIC)  # fmt: skip
            acc_u, acc_g, tmp_g, a_g, sg = _step(
                i + 1, last, acc_u, acc_g, tmp_g, a_g, sg, wu_smem, wg_smem, s_smem, x_smem, bars,
                x_desc, m0, pu, pg, ps, gsub, rows, w_ok, s_ok, NL, KR, G, V3, W_L, X_L, A8, WR,
                FOLD, SYMMETRIC)  # fmt: skip
        if last % 2 == 0:
            acc_u, acc_g, tmp_g, a_g, sg = _step(
                last, last, acc_u, acc_g, tmp_g, a_g, sg, wu_smem, wg_smem, s_smem, x_smem, bars,
                x_desc, m0, pu, pg, ps, gsub, rows, w_ok, s_ok, NL, KR, G, V3, W_L, X_L, A8, WR,
                FOLD, SYMMETRIC)  # fmt: skip
        tmp_g = warpgroup_mma_wait(num_outstanding=0, deps=[tmp_g])
        _keep(a_g)
        acc_g = _fold(acc_g, sg, tmp_g, FOLD)
        md.async_copy.wait_group(0)

        on = n0 + gl.arange(0, _BN, layout=gl.SliceLayout(1, O_L))
        om = m0 + gl.arange(0, _BT, layout=gl.SliceLayout(0, O_L))
        sx = gl.load(sx_ptr + om, mask=om < M, other=0.0)[None, :]
        up = gl.convert_layout(acc_u, O_L) * sx
        gate = gl.convert_layout(acc_g, O_L) * sx
        if HAS_UP_BIAS:
            up += gl.load(ub_ptr + a_col + on, mask=on < NL, other=0.0).to(gl.float32)[:, None]
        if HAS_GATE_BIAS:
            gate += gl.load(gb_ptr + a_col + on, mask=on < NL, other=0.0).to(gl.float32)[:, None]
        res = (md._act(gate, ACTIVATION) * up).to(a_ptr.dtype.element_ty)
        mask = (on < NL)[:, None] & (om < M)[None, :]
        gl.store(a_ptr + om[None, :] * stride_am + (a_col + on)[:, None], res, mask=mask)
        big = gl.max(gl.where(mask, gl.abs(res.to(gl.float32)), 0.0), axis=0)
        gl.atomic_max(amax_ptr + om, big.to(gl.int32, bitcast=True), mask=om < M)

    # ---- kernel B's light columns: y += sa * sum_g s_g (a8 . (q - z)_g) over K-slices ----------

    @gluon.jit
    def _down_step(t, t_lo, last, acc, tmp1, a1, s1_prev, wa_smem, wb_smem, s_smem, x_smem, bars,
                   x_desc, m0, kx0, n_tiles, pa, ps, gsub, rows, w_ok, s_ok, N, KR, G,
                   V3: gl.constexpr, W_L: gl.constexpr, X_L: gl.constexpr, A8: gl.constexpr,
                   WR: gl.constexpr, FOLD: gl.constexpr, SYMMETRIC: gl.constexpr):  # fmt: skip
        """Pair-step t (groups 2 t, 2 t + 1; x tiles u, u + 1): as kernel A's `_step` with the
        two halves on two groups of one weight, both folded into acc."""
        SV: gl.constexpr = gl.SliceLayout(0, W_L)
        SA: gl.constexpr = gl.SliceLayout(1, V3)
        st = (t - t_lo) % WR
        md.async_copy.wait_group(WR - 2)
        md._barrier()
        _issue(wa_smem, wb_smem, s_smem, t + WR - 1, last, (t - t_lo + WR - 1) % WR, pa,
               pa + 16 * N, ps, gsub, rows, w_ok, s_ok, N, KR, G, 32, 16)  # fmt: skip
        md.async_copy.commit_group()
        ha = wa_smem.index(st).load(W_L)
        hb = wb_smem.index(st).load(W_L)
        sv = s_smem.index(st)
        s0 = sv.slice(0, _BN).load(SA).to(gl.float32)
        z0 = sv.slice(_BN, _BN).load(SV).to(gl.int32)
        s1 = sv.slice(2 * _BN, _BN).load(SA).to(gl.float32)
        z1 = sv.slice(3 * _BN, _BN).load(SV).to(gl.int32)
        if SYMMETRIC:  # noqa: SIM108
            z0 = z0 * 0 + 8
            z1 = z1 * 0 + 8
        u = 2 * (t - t_lo)
        mbarrier.wait(bars.index(u % 3), (u // 3) & 1)
        b0 = x_smem.index(u % 3).permute((1, 0))
        a0 = _fragments8(ha, (128 - z0) * 0x01010101, X_L, A8)  # while the last half runs
        tmp1 = warpgroup_mma_wait(num_outstanding=0, deps=[tmp1])
        _keep(a1)
        acc = _fold(acc, s1_prev, tmp1, FOLD)
        _x8_fetch(x_desc, bars, x_smem, u + 2, n_tiles, m0, kx0)  # tile u - 1's stage: free
        tmp0 = warpgroup_mma(a0, b0, gl.zeros([_BN, _BT], gl.int32, layout=V3), use_acc=False,
                             is_async=True)  # fmt: skip
        mbarrier.wait(bars.index((u + 1) % 3), ((u + 1) // 3) & 1)
        b1 = x_smem.index((u + 1) % 3).permute((1, 0))
        a1 = _fragments8(hb, (128 - z1) * 0x01010101, X_L, A8)  # while tmp0's runs
        tmp0 = warpgroup_mma_wait(num_outstanding=0, deps=[tmp0])
        _keep(a0)
        acc = _fold(acc, s0, tmp0, FOLD)
        _x8_fetch(x_desc, bars, x_smem, u + 3, n_tiles, m0, kx0)  # tile u's stage: free
        tmp1 = warpgroup_mma(a1, b1, gl.zeros([_BN, _BT], gl.int32, layout=V3), use_acc=False,
                             is_async=True)  # fmt: skip
        return acc, tmp1, a1, s1

    @gluon.jit
    def _w4a8_down_kernel(x_desc, sa_ptr, p_ptr, s_ptr, z_ptr, out_ptr, M, N, KL,
                          V3: gl.constexpr, W_L: gl.constexpr, X_L: gl.constexpr,
                          C_L: gl.constexpr, S_L: gl.constexpr, O_L: gl.constexpr,
                          WR: gl.constexpr, FOLD: gl.constexpr = "magic",
                          SYMMETRIC: gl.constexpr = False):  # fmt: skip
        """fp32 partials out[slice, m, n] = sa[m] sum_g s[g, n] (a8[m] . (q - z)[n])_g over the
        slice's groups (program_id 2 of num_programs 2, in pairs of groups) for outputs n0 ..
        n0 + _BN (program_id 0) and rows m0 .. m0 + _BT (program_id 1): words p [KL / 8, N],
        scales s and zeros z [KL / 128, N], a8 [M, KL] behind x_desc in the slot order."""
        A8: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=V3, k_width=4)
        n0 = gl.program_id(0) * _BN
        m0 = gl.program_id(1) * _BT
        G = gl.cdiv(KL, _STEP)
        pairs = gl.cdiv(G, 2)
        t_lo = gl.program_id(2) * pairs // gl.num_programs(2)
        t_hi = (gl.program_id(2) + 1) * pairs // gl.num_programs(2)
        last = t_hi - 1
        KR = KL // 8
        n_tiles = 2 * (t_hi - t_lo)
        kx0 = t_lo * 2 * _STEP
        wa_smem, wb_smem, s_smem = _words_ring(s_ptr, WR)
        rows = gl.arange(0, 16, layout=gl.SliceLayout(1, C_L))
        cols = n0 + gl.arange(0, _BN, layout=gl.SliceLayout(0, C_L))
        w_ok = (cols < N)[None, :]
        pa = p_ptr + rows[:, None] * N + cols[None, :]
        e = gl.arange(0, 4 * _BN, layout=S_L)  # group 2 t's scale, zero; group 2 t + 1's
        sr = e // _BN
        sc = n0 + e % _BN
        gsub = sr // 2
        ps = gl.where(sr % 2 == 0, s_ptr + sc, z_ptr + sc) + gsub * N
        s_ok = sc < N
        for j in gl.static_range(WR - 1):
            _issue(wa_smem, wb_smem, s_smem, t_lo + j, last, j, pa, pa + 16 * N, ps, gsub, rows,
                   w_ok, s_ok, N, KR, G, 32, 16)  # fmt: skip
            md.async_copy.commit_group()
        x_smem, bars = _x8_ring(x_desc, n_tiles, m0, kx0)

        acc = gl.zeros([_BN, _BT], gl.float32, layout=V3)
        tmp1 = warpgroup_mma_init(gl.zeros([_BN, _BT], gl.int32, layout=V3))  # s1 = 0: adds 0
        a1 = gl.zeros([_BN, _STEP], gl.int8, layout=A8)
        s1 = gl.zeros([_BN], gl.float32, layout=gl.SliceLayout(1, V3))
        for t in range(t_lo, last, 2):
            acc, tmp1, a1, s1 = _down_step(
                t, t_lo, last, acc, tmp1, a1, s1, wa_smem, wb_smem, s_smem, x_smem, bars, x_desc,
                m0, kx0, n_tiles, pa, ps, gsub, rows, w_ok, s_ok, N, KR, G, V3, W_L, X_L, A8, WR,
                FOLD, SYMMETRIC)  # fmt: skip
            acc, tmp1, a1, s1 = _down_step(
                t + 1, t_lo, last, acc, tmp1, a1, s1, wa_smem, wb_smem, s_smem, x_smem, bars,
                x_desc, m0, kx0, n_tiles, pa, ps, gsub, rows, w_ok, s_ok, N, KR, G, V3, W_L, X_L,
                A8, WR, FOLD, SYMMETRIC)  # fmt: skip
        if (last - t_lo) % 2 == 0:
            acc, tmp1, a1, s1 = _down_step(
                last, t_lo, last, acc, tmp1, a1, s1, wa_smem, wb_smem, s_smem, x_smem, bars,
                x_desc, m0, kx0, n_tiles, pa, ps, gsub, rows, w_ok, s_ok, N, KR, G, V3, W_L, X_L,
                A8, WR, FOLD, SYMMETRIC)  # fmt: skip
        tmp1 = warpgroup_mma_wait(num_outstanding=0, deps=[tmp1])
        _keep(a1)
        acc = _fold(acc, s1, tmp1, FOLD)
        md.async_copy.wait_group(0)

        on = n0 + gl.arange(0, _BN, layout=gl.SliceLayout(1, O_L))
        om = m0 + gl.arange(0, _BT, layout=gl.SliceLayout(0, O_L))
        sa = gl.load(sa_ptr + om, mask=om < M, other=0.0)[None, :]
        res = gl.convert_layout(acc, O_L) * sa
        mask = (on < N)[:, None] & (om < M)[None, :]
        ptrs = out_ptr + gl.program_id(2) * M * N + om[None, :] * N + on[:, None]
        gl.store(ptrs, res, mask=mask)


def layouts(ring: int = RING) -> dict:
    """V3 ([BN, BT] int8 wgmma accumulators), W_L (words [16, BN]: lane 4 g + t holds word row
    t of each 32-k block of neurons g and g + 8), X_L (the fragments' [16, BN, 2 (p)] words:
    registers n + 8, p, block), C_L (the words' copies, 16 bytes a thread), S_L, O_L."""
    return dict(
        V3=gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                     instr_shape=[16, BT, 32]),
        W_L=gl.DistributedLinearLayout(
            reg_bases=[[0, 8], [4, 0], [8, 0]], lane_bases=[[1, 0], [2, 0], [0, 1], [0, 2],
                                                            [0, 4]],
            warp_bases=[[0, 16], [0, 32]], block_bases=[], shape=[16, BN]),
        X_L=gl.DistributedLinearLayout(
            reg_bases=[[0, 8, 0], [0, 0, 1], [4, 0, 0], [8, 0, 0]],
            lane_bases=[[1, 0, 0], [2, 0, 0], [0, 1, 0], [0, 2, 0], [0, 4, 0]],
            warp_bases=[[0, 16, 0], [0, 32, 0]], block_bases=[], shape=[16, BN, 2]),
        C_L=gl.BlockedLayout([1, 4], [2, 16], [4, 1], [1, 0]),
        S_L=gl.BlockedLayout([2], [32], [4], [0]),
        O_L=gl.BlockedLayout([4, 1], [32, 1], [1, 4], [0, 1]),
        WR=ring,
    )  # fmt: skip


def x_layout():
    return gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=8, rank=2)


def available(device: torch.device) -> bool:
    """Whether this kernel can run on `device` (an sm_90 GPU with Gluon's Hopper ops)."""
    return wp.available(device)


def unsupported(x2: torch.Tensor, w: SplitFFNWeights) -> str | None:
    """Why kernel A's light tiles of `w` on rows like x2 cannot take this kernel, or None
    (w4a8.unsupported must say None first)."""
    if x2.dtype not in (torch.float16, torch.bfloat16):
        return f"activations are {x2.dtype}, not fp16/bf16"
    if not w.gated or not w.n_light or w.n_light % 16 or x2.shape[1] % 32:
        return "a gated FFN with light neurons a multiple of 16 and a hidden size of 32s"
    for q in (w.light_up, w.light_gate):
        if q.bits != 4 or q.group_size != STEP:
            return f"{q.bits}-bit weights in groups of {q.group_size} (int4, groups of 128)"
        if not (q.planes[0].is_contiguous() and q.scales.is_contiguous()):
            return "non-contiguous packed planes or scales"
        if q.zeros is not None and (not q.zeros.is_contiguous() or q.zeros.dtype != q.scales.dtype):
            return "zeros not contiguous or not in the scales' dtype"
    if w.light_up.symmetric != w.light_gate.symmetric:
        return "up and gate of different symmetry"
    return None


def use(x2: torch.Tensor, w: SplitFFNWeights) -> bool:
    """Whether w4a8.split_activations takes this kernel for the light tiles (opt-in)."""
    return ENABLED and available(x2.device) and unsupported(x2, w) is None


def permute_x8(x8: torch.Tensor) -> torch.Tensor:
    """x8 [M, K] with each 32-k block in the fragments' slot order (X8_PERM), contiguous."""
    m, k = x8.shape
    perm = torch.tensor(X8_PERM, device=x8.device)
    return x8.view(m, k // 32, 32)[:, :, perm].reshape(m, k).contiguous()


def light_activations(
    x8: torch.Tensor, sx: torch.Tensor, w: SplitFFNWeights, a: torch.Tensor, amax: torch.Tensor,
    *, fold: str = "magic",
) -> None:  # fmt: skip
    """a[:, h:] and amax (raised, not reset) of kernel A's light tiles from x8 [M, K] in the
    fragments' slot order and sx [M] (w4a8.quantize_rows(x, perm=True)), as
    w4a8.split_activations writes them (`use` must hold)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    desc = TensorDescriptor.from_tensor(x8, [BT, STEP], x_layout())
    up, gate = w.light_up, w.light_gate
    m, k = x8.shape
    nl = w.n_light
    grid = (triton.cdiv(nl, BN), triton.cdiv(m, BT))
    _w4a8_up_kernel[grid](
        desc, sx, up.planes[0], up.scales, up.zeros if up.zeros is not None else up.scales,
        gate.planes[0], gate.scales, gate.zeros if gate.zeros is not None else gate.scales,
        w.up_bias if w.up_bias is not None else a, w.gate_bias if w.gate_bias is not None else a,
        a, amax, m, nl, k, a.stride(0), w.n_heavy, ACTIVATION=w.activation,
        HAS_UP_BIAS=w.up_bias is not None, HAS_GATE_BIAS=w.gate_bias is not None,
        **layouts(), FOLD=fold, SYMMETRIC=up.symmetric, num_warps=4,
    )  # fmt: skip


def down_unsupported(a: torch.Tensor, w: SplitFFNWeights) -> str | None:
    """Why kernel B's light columns of `w` on rows like a cannot take this kernel, or None."""
    if a.dtype not in (torch.float16, torch.bfloat16):
        return f"activations are {a.dtype}, not fp16/bf16"
    q = w.light_down
    if q is None or q.bits != 4 or q.group_size != STEP:
        return "int4 light columns in groups of 128"
    if q.shape[0] % 16 or not (q.planes[0].is_contiguous() and q.scales.is_contiguous()):
        return "outputs a multiple of 16, contiguous packed planes and scales"
    if q.zeros is not None and (not q.zeros.is_contiguous() or q.zeros.dtype != q.scales.dtype):
        return "zeros not contiguous or not in the scales' dtype"
    return None


def use_down(a: torch.Tensor, w: SplitFFNWeights) -> bool:
    """Whether w4a8.down_projection takes this kernel for the light columns (opt-in)."""
    return ENABLED and available(a.device) and down_unsupported(a, w) is None


def down_slices(m: int, n: int, groups: int, sms: int, per_sm: int = 2) -> int:
    """K-slices (in pairs of groups) that fill one wave of `per_sm` programs an SM, 1 to 8."""
    tiles = triton.cdiv(n, BN) * triton.cdiv(m, BT)
    return max(1, min(8, per_sm * sms // tiles, triton.cdiv(groups, 2)))


def down_projection(
    a: torch.Tensor, amax: torch.Tensor, w: SplitFFNWeights, out: torch.Tensor, *,
    slices: int | None = None, fold: str = "magic",
) -> torch.Tensor:  # fmt: skip
    """Kernel B into out [M, H] (contiguous): the light columns a[:, h:] quantized per row from
    kernel A's row maxima (one pass, slot order), their int8 products by this kernel into fp32
    K-slice partials, summed in order with the down bias, then the heavy columns by cuBLAS
    added in place (`use_down` must hold)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from ffnsplit.kernels import w4a8
    from ffnsplit.kernels.quant_matmul import reduce_slices
    from ffnsplit.kernels.tiles import sm_count

    m = a.shape[0]
    h = w.n_heavy
    q = w.light_down
    n, kl = q.shape
    a8, sa = w4a8.quantize_rows(a[:, h:], perm=True, amax=amax)
    desc = TensorDescriptor.from_tensor(a8, [BT, STEP], x_layout())
    groups = triton.cdiv(kl, STEP)
    slices = slices or down_slices(m, n, groups, sm_count(a.device))
    partial = torch.empty((slices, m, n), dtype=torch.float32, device=a.device)
    grid = (triton.cdiv(n, BN), triton.cdiv(m, BT), slices)
    _w4a8_down_kernel[grid](
        desc, sa, q.planes[0], q.scales, q.zeros if q.zeros is not None else q.scales, partial,
        m, n, kl, **layouts(), FOLD=fold, SYMMETRIC=q.symmetric, num_warps=4,
    )  # fmt: skip
    reduce_slices(partial, w.down_bias, out)
    if h:
        out.addmm_(a[:, :h], w.heavy_down.t())
    return out


def emulate_fragments(words: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """What `_fragments8` computes, in torch (int64 arithmetic): words [16, BN] (int32, word row
    4 b + t of a 128-k step) and integer zeros [BN] -> the A operand [BN, 128 k-slots] (int8),
    with the kernel's two layout facts spelled out: a join's new dimension is its result's
    fastest register (so the asm's 4 packed elements are (j1, j2) with byte = 2 j1 + j2), and
    the permute / reshape of `_A_PERM8`. tests/test_w4a8.py checks it against the codes."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    zc = ((128 - zeros.to(torch.int64)) * 0x01010101)[None, :, None]
    x = torch.stack([w, w >> 4], dim=-1)  # [16, BN, 2 (p)]
    v = ((x & 0x0F0F0F0F) + zc) ^ 0x80808080  # the asm, per element
    byte = torch.arange(4, device=w.device).view(2, 2)  # [j1, j2] -> byte 2 j1 + j2
    q = (v[..., None, None] >> (8 * byte)) & 0xFF  # [16, BN, p, j1, j2]
    q = torch.where(q >= 128, q - 256, q).to(torch.int8)
    n = w.shape[1]
    q = q.reshape(2, 2, 2, 2, n, 2, 2, 2).permute(4, 0, 1, 5, 2, 3, 6, 7)
    return q.reshape(n, 128)


def aot_compile(arch: int = 90, fold: str = "magic"):
    """The kernel compiled for sm_`arch` without a GPU (Llama-3-8B-like arguments): Triton's
    CompiledKernel (`mma_decode.aot_resources` reads its registers and spills)."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    fn = _w4a8_up_kernel
    desc = f"tensordesc<i8[{BT}, {STEP}],{x_layout()!r}>"
    sig = dict(x_desc=desc, sx_ptr="*fp32", p_ptr="*i32", s_ptr="*fp16", z_ptr="*fp16",
               q_ptr="*i32", t_ptr="*fp16", u_ptr="*fp16", ub_ptr="*fp16", gb_ptr="*fp16",
               a_ptr="*fp16", amax_ptr="*i32", M="i32", NL="i32", K="i32", stride_am="i32",
               a_col="i32")  # fmt: skip
    const = dict(ACTIVATION="silu", HAS_UP_BIAS=False, HAS_GATE_BIAS=False, **layouts(),
                 FOLD=fold, SYMMETRIC=False)  # fmt: skip
    names = [p.name for p in fn.params]
    signature = {nm: sig.get(nm, "constexpr") for nm in names}
    aligned = [nm for nm in sig if nm.endswith("_ptr")] + ["NL", "K", "stride_am"]
    attrs = {(names.index(nm),): [["tt.divisibility", 16]] for nm in aligned}
    return triton.compile(GluonASTSource(fn, signature, const, attrs),
                          target=GPUTarget("cuda", arch, 32), options={"num_warps": 4})  # fmt: skip


def aot_compile_down(arch: int = 90, fold: str = "magic"):
    """`_w4a8_down_kernel` compiled for sm_`arch` without a GPU, as `aot_compile`."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    fn = _w4a8_down_kernel
    desc = f"tensordesc<i8[{BT}, {STEP}],{x_layout()!r}>"
    sig = dict(x_desc=desc, sa_ptr="*fp32", p_ptr="*i32", s_ptr="*fp16", z_ptr="*fp16",
               out_ptr="*fp32", M="i32", N="i32", KL="i32")  # fmt: skip
    const = dict(**layouts(), FOLD=fold, SYMMETRIC=False)
    names = [p.name for p in fn.params]
    signature = {nm: sig.get(nm, "constexpr") for nm in names}
    aligned = [nm for nm in sig if nm.endswith("_ptr")] + ["N", "KL"]
    attrs = {(names.index(nm),): [["tt.divisibility", 16]] for nm in aligned}
    return triton.compile(GluonASTSource(fn, signature, const, attrs),
                          target=GPUTarget("cuda", arch, 32), options={"num_warps": 4})  # fmt: skip
