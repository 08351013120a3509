"""Prototype, measured and not integrated (session 23): a Hopper (sm_90) int4 GEMM for
prefill-size M, wgmma with the dequantized weights as its register A operand, each half product
overlapped with the dequantization of the next. `benchmarks/bench_wgmma.py` checks and times it.

out [M, N] = x [M, K] @ W^T for a light weight (4 bits, groups of 64, 128, ...; fp16 or bf16
activations), or, with DUAL, kernel A's a = act(x @ G^T + gb) * (x @ U^T + ub) for two such weights.

Why it was tried: at M = 256 the tl tiers reach ~369 TFLOP/s where cuBLAS runs the dense layer at
~600; their loop issues ~750 SASS instructions a 128-k block a thread (255 registers with
spills). Here each thread loads exactly the words of its wgmma A fragment (rows g and g + 8 of
its warp's 16 neurons, word row t of each 32-k block: the W-as-A layout of `mma_decode`), turns
each word into four fp16x2 registers of (q - z) s by inline PTX (lop3 with the exponent of 1024,
sub, fma: 15 instructions a word), and x is staged once a step in shared memory in the k-slot
order those fragments imply (`mma_decode.LIGHT_X_PERM`) as wgmma's B operand. Weights are the A
operand (64 neurons a warpgroup, two warpgroups a program), the rows of x its N (16-256), so the
accumulators hold out^T tiles. sm_90 AOT: 252-255 registers, no spills, ~293 SASS instructions a
64-k step (up and gate) a thread.

Pipelining: a step is two half products (DUAL: up and gate on the same x tile; else two
consecutive 64-k tiles on two accumulators). Each half's A operand is built while the other
half's wgmma runs (`warpgroup_mma_wait(1)`), so the tensor cores always have a product queued.
x tiles rotate through three shared buffers (a buffer is written two steps after it was read,
when both warpgroups have waited for that step's products); words and scales come in two
register sets, each reloaded two steps ahead right after its step read it.

Outcome (H200, benchmarks/RESULTS.md session 23): correct on every case (fp16 rel. error
3-6e-4, bf16 2-4e-3; odd M, N, K, groups 64-256, symmetric or not), but slower than the tl tiers:
kernel A's light part at M = 256 188 us (tl kernel A with its heavy rows 164), M = 2048 1,203
(tl / dequant path 788); kernel B's light part at M = 256 137 us in 2 K-slices (tl 87). Timing
experiments (FFNSPLIT_WGMMA_EXPERIMENT, wrong results): without the per-step restaging of x
(store, proxy fence, barrier) kernel A takes 124 us at M = 256 and 871 at 2048, kernel B 69 and
395: the register-staged x costs 25-50%, and even without it the kernel reaches ~410-580
TFLOP/s against cuBLAS's 590-690 on the same FLOPs (M = 256 also loses ~19% to a 1.6-wave grid).
A TMA-fed x (pre-permuted in memory, mbarrier ring, no CTA barrier) would approach the
experiment's numbers: ~15% under the tl tiers at M = 128-512, still ~0.7x dense at M = 256.

Session 24: `x_tma` is that form (one warpgroup a program, x permuted by a torch copy inside the
call, a three-stage TMA ring): at M = 256 kernel A's light part 136.6 us and kernel B's 83.4
(2 slices) against 186.9 / 135.9 staged and the tl tiers' 164.7 / 85.5 with their heavy parts
(H200, benchmarks/RESULTS.md). `x_resident` (the slice's x staged once, for M = 16-64) was
slower: at those sizes the words' bytes in flight, not x, set the pace. `kernel_a` is the whole
kernel A in one launch (heavy fp16/bf16 rows as the A operand as loaded, with x in the dense
rows' order behind a second descriptor): M = 256 150.5 us against the tl tier's 165.8.

Session 25: `kernel_a(num_warps=8)` (two warpgroups sharing each x stage) and 64-row tiles were no
faster; ncu put the warps' top stall on the words' register loads, and with the words, scales
and zeros through a cp.async ring kernel A took M = 256 in 123.6 us. That form, kernel B in it,
and kernel A writing kernel B's x in place are the package's `ffnsplit/kernels/wgmma_prefill.py`
(`kernel_a(ring=...)` runs it; the shared pieces are imported from there).
"""

from __future__ import annotations

import os

import torch
import triton

from ffnsplit.kernels import mma_decode as md
from ffnsplit.kernels import wgmma_prefill as wp
from ffnsplit.kernels.format import QuantizedWeight, SplitFFNWeights

gluon, gl = md.gluon, md.gl
permute_x = wp.permute_x
if gluon is not None and wp.warpgroup_mma is not None:  # the pieces the package kernel shares
    from ffnsplit.kernels.wgmma_prefill import (
        _fragments,
        _heavy_fragments,
        _heavy_offsets,
        _heavy_rows,
        _prep,
    )
# Hopper's warpgroup MMA, TMA and mbarriers: the package module's imports (None where absent)
fence_async_shared, mbarrier, tma = wp.fence_async_shared, wp.mbarrier, wp.tma
warpgroup_mma, warpgroup_mma_init, warpgroup_mma_wait = (
    wp.warpgroup_mma,
    wp.warpgroup_mma_init,
    wp.warpgroup_mma_wait,
)
_IMPORT_ERROR = wp._IMPORT_ERROR

# timing experiments only (wrong results): 1 x not restaged and no fence, 2 no fence, 3 neither
# nor the barrier
EXPERIMENT = int(os.environ.get("FFNSPLIT_WGMMA_EXPERIMENT", "0"))


def available(device: torch.device) -> bool:
    """Whether this path can run on `device`: an sm_90 GPU with Gluon's Hopper ops."""
    if warpgroup_mma is None or md.gluon is None or device.type != "cuda":
        return False
    if md.INTERPRET or torch.version.hip is not None:
        return False
    return torch.cuda.get_device_capability(device) == (9, 0)


if gluon is not None and warpgroup_mma is not None:
    _LIGHT_X_PERM = gl.constexpr(md.LIGHT_X_PERM)

    @gluon.jit
    def _x_slots(x):
        """x [BT, 64] (k = 32 b + 8 t + j) in the k-slot order of the fragments."""
        bt: gl.constexpr = x.shape[0]
        t = gl.reshape(x, [bt, 2, 4, 2, 2, 2])  # [m, b, t, j2, j1, j0]
        return gl.reshape(gl.permute(t, _LIGHT_X_PERM.value), [bt, 64])

    @gluon.jit
    def _words(p_ptr, w_off, w_rows, row0, KR, N, n_mask):
        """Words [8, BN] of word rows row0 .. row0 + 7 (rows past KR read as 0)."""
        rows = row0 + w_rows
        return gl.load(p_ptr + w_off + row0 * N, mask=(rows < KR)[:, None] & n_mask[None, :],
                       other=0)  # fmt: skip

    @gluon.jit
    def _scales(s_ptr, z_ptr, k0, N, G, cols, n_mask, SYMMETRIC: gl.constexpr,
                GROUP: gl.constexpr):  # fmt: skip
        """Scale and zero [BN] as stored, of the group holding k0 (0 past the last group; the
        scale again for SYMMETRIC). Loaded a step ahead and used through `_prep` a step later,
        so that no step waits for their latency."""
        g = k0 // GROUP
        mask = n_mask & (g < G)
        s = gl.load(s_ptr + g * N + cols, mask=mask, other=0.0)
        z = s
        if not SYMMETRIC:
            z = gl.load(z_ptr + g * N + cols, mask=mask, other=0.0)
        return s, z

    @gluon.jit
    def _x_tile(x_ptr, x_off, x_rows, k0, K, M):
        """x [BT, 64] at k0 (rows past M, k past K read as 0)."""
        k = k0 + gl.arange(0, 64, layout=gl.SliceLayout(0, x_off.type.layout))
        mask = (x_rows < M)[:, None] & (k < K)[None, :]
        return gl.load(x_ptr + x_off + k0, mask=mask, other=0.0)

    @gluon.jit
    def _stage_x(x_ptr, x_off, x_rows, x_smem, i, K, M, DUAL: gl.constexpr):
        """Step i's x (64 k, or 128 in two tiles) into its shared buffers, in k-slot order."""
        if DUAL:
            x_smem.index((i % 3) * 2).store(_x_slots(_x_tile(x_ptr, x_off, x_rows, i * 64, K, M)))
        else:
            x_smem.index((i % 3) * 2).store(_x_slots(_x_tile(x_ptr, x_off, x_rows, i * 128, K, M)))
            x_smem.index((i % 3) * 2 + 1).store(
                _x_slots(_x_tile(x_ptr, x_off, x_rows, i * 128 + 64, K, M))
            )

    @gluon.jit
    def _load_set(i, p_ptr, s_ptr, z_ptr, q_ptr, t_ptr, u_ptr, w_off, w_rows, w_cols, w_mask, N,
                  KR, G, DUAL: gl.constexpr, SYMMETRIC: gl.constexpr,
                  GROUP: gl.constexpr, HV: gl.constexpr = False, K=0):  # fmt: skip
        """Step i's words and scales of its two half products: (words, scale, zero) twice. HV:
        heavy rows of up (p) and gate (q), no scales (w_rows: their k offsets, w_mask: rows)."""
        if HV:
            h0 = _heavy_rows(p_ptr, w_off, w_rows, i, K, w_mask)
            h1 = _heavy_rows(q_ptr, w_off, w_rows, i, K, w_mask)
            s0 = w_mask
            z0 = w_mask
            s1 = w_mask
            z1 = w_mask
        elif DUAL:
            h0 = _words(p_ptr, w_off, w_rows, i * 8, KR, N, w_mask)
            h1 = _words(q_ptr, w_off, w_rows, i * 8, KR, N, w_mask)
            s0, z0 = _scales(s_ptr, z_ptr, i * 64, N, G, w_cols, w_mask, SYMMETRIC, GROUP)
            s1, z1 = _scales(t_ptr, u_ptr, i * 64, N, G, w_cols, w_mask, SYMMETRIC, GROUP)
        else:
            h0 = _words(p_ptr, w_off, w_rows, i * 16, KR, N, w_mask)
            h1 = _words(p_ptr, w_off, w_rows, i * 16 + 8, KR, N, w_mask)
            s0, z0 = _scales(s_ptr, z_ptr, i * 128, N, G, w_cols, w_mask, SYMMETRIC, GROUP)
            s1, z1 = _scales(s_ptr, z_ptr, i * 128 + 64, N, G, w_cols, w_mask, SYMMETRIC, GROUP)
        return h0, h1, s0, z0, s1, z1

    @gluon.jit
    def _tma_x(x_desc, bars, x_smem, i, lo, last, m0, DUAL: gl.constexpr, BT: gl.constexpr):
        """x_tma: step i's x tiles (pre-permuted in memory) by TMA into ring stage (i - lo) % 3,
        signalled on that stage's mbarrier; nothing past the slice's last step."""
        st = (i - lo) % 3
        bar = bars.index(st)
        go = i <= last
        if DUAL:
            mbarrier.expect(bar, BT * 64 * 2, pred=go)
            tma.async_copy_global_to_shared(x_desc, [m0, i * 64], bar, x_smem.index(st), pred=go)
        else:
            mbarrier.expect(bar, 2 * BT * 64 * 2, pred=go)
            tma.async_copy_global_to_shared(x_desc, [m0, i * 128], bar, x_smem.index(2 * st),
                                            pred=go)  # fmt: skip
            tma.async_copy_global_to_shared(x_desc, [m0, i * 128 + 64], bar,
                                            x_smem.index(2 * st + 1), pred=go)  # fmt: skip

    @gluon.jit
    def _step(i, last, acc0, acc1, a1, h0, h1, s0, z0, s1, z1, x_ptr, x_off, x_rows, x_smem,
              p_ptr, s_ptr, z_ptr, q_ptr, t_ptr, u_ptr, w_off, w_rows, w_cols, w_mask, M, N, K,
              KR, G, DUAL: gl.constexpr, SYMMETRIC: gl.constexpr, GROUP: gl.constexpr,
              DTYPE: gl.constexpr, A3: gl.constexpr, EXP: gl.constexpr, lo=0,
              XS: gl.constexpr = 0, x_desc=0, bars=0, m0=0, BT: gl.constexpr = 0,
              XT: gl.constexpr = False, HV: gl.constexpr = False,
              NW: gl.constexpr = 4):  # fmt: skip
        """Step i: half 0's A operand is built while the previous step's half 1 runs, half 1's
        while half 0 runs; then the register set is reloaded for step i + 2 and step i + 1's x
        goes into the buffers step i - 2 read (both warpgroups waited for step i - 1's half 0,
        and so for everything of step i - 2, before the last barrier). XT: the step waits for its
        TMA stage and, once step i - 1's products are done, refills that stage for step i + 2;
        XS: x is already resident; HV: the A operands are heavy rows as loaded."""
        nxt = gl.minimum(i + 1, last)  # clamped: the last steps load their own data again
        if XT:  # x by TMA: wait for this step's stage
            st = (i - lo) % 3
            mbarrier.wait(bars.index(st), ((i - lo) // 3) & 1)
            if DUAL:
                b_lo = x_smem.index(st).permute((1, 0))
                b_hi = b_lo
            else:
                b_lo = x_smem.index(2 * st).permute((1, 0))
                b_hi = x_smem.index(2 * st + 1).permute((1, 0))
            xa = 0
            xb = 0
        elif XS > 0:  # the slice's x resident in shared memory since the prologue
            if DUAL:
                b_lo = x_smem.index(i - lo).permute((1, 0))
                b_hi = b_lo
            else:
                b_lo = x_smem.index(2 * (i - lo)).permute((1, 0))
                b_hi = x_smem.index(2 * (i - lo) + 1).permute((1, 0))
            xa = 0
            xb = 0
        elif DUAL:
            b_lo = x_smem.index((i % 3) * 2).permute((1, 0))
            b_hi = b_lo
            xa = _x_tile(x_ptr, x_off, x_rows, nxt * 64, K, M)
            xb = xa
        else:
            b_lo = x_smem.index((i % 3) * 2).permute((1, 0))
            b_hi = x_smem.index((i % 3) * 2 + 1).permute((1, 0))
            xa = _x_tile(x_ptr, x_off, x_rows, nxt * 128, K, M)
            xb = _x_tile(x_ptr, x_off, x_rows, nxt * 128 + 64, K, M)
        if HV:
            a0 = _heavy_fragments(h0, A3)
        else:
            ps0, pb0 = _prep(s0, z0, SYMMETRIC, DTYPE)
            ps1, pb1 = _prep(s1, z1, SYMMETRIC, DTYPE)
            a0 = _fragments(h0, ps0, pb0, DTYPE, A3)
        acc0 = warpgroup_mma(a0, b_lo, acc0, is_async=True)
        acc1, a1 = warpgroup_mma_wait(num_outstanding=1, deps=[acc1, a1])
        if XT:  # step i - 1's products are complete: its stage takes step i + 2's x
            if NW > 4:  # two warpgroups read each stage: both must be past their wait
                md._barrier()
            _tma_x(x_desc, bars, x_smem, i + 2, lo, last, m0, DUAL, BT)
        if HV:  # noqa: SIM108 (a compile-time branch)
            a1 = _heavy_fragments(h1, A3)
        else:
            a1 = _fragments(h1, ps1, pb1, DTYPE, A3)
        acc1 = warpgroup_mma(a1, b_hi, acc1, is_async=True)
        h0, h1, s0, z0, s1, z1 = _load_set(
            gl.minimum(i + 2, last), p_ptr, s_ptr, z_ptr, q_ptr, t_ptr, u_ptr, w_off, w_rows,
            w_cols, w_mask, N, KR, G, DUAL, SYMMETRIC, GROUP, HV, K)  # fmt: skip
        acc0, a0 = warpgroup_mma_wait(num_outstanding=1, deps=[acc0, a0])
        if XS == 0 and not XT:
            if EXP != 1 and EXP != 3:  # noqa: SIM102 (compile-time, then run-time)
                if i < last:
                    x_smem.index((nxt % 3) * 2).store(_x_slots(xa))
                    if not DUAL:
                        x_smem.index((nxt % 3) * 2 + 1).store(_x_slots(xb))
            if EXP == 0:
                fence_async_shared()
            if EXP != 3:
                md._barrier()
        return acc0, acc1, a1, h0, h1, s0, z0, s1, z1

    @gluon.jit
    def _w4_gemm_kernel(x_ptr, p_ptr, s_ptr, z_ptr, q_ptr, t_ptr, u_ptr, out_ptr, ub_ptr, gb_ptr,
                        M, N, K, stride_xm, stride_om, out_col,
                        DUAL: gl.constexpr, PARTIAL: gl.constexpr, SYMMETRIC: gl.constexpr,
                        GROUP: gl.constexpr, ACTIVATION: gl.constexpr,
                        HAS_UP_BIAS: gl.constexpr, HAS_GATE_BIAS: gl.constexpr,
                        DTYPE: gl.constexpr, BT: gl.constexpr, V3: gl.constexpr,
                        W_L: gl.constexpr, X_L: gl.constexpr, O_L: gl.constexpr,
                        num_warps: gl.constexpr, EXP: gl.constexpr = 0,
                        XS: gl.constexpr = 0, XT: gl.constexpr = False):  # fmt: skip
        """One [BN = 16 num_warps neurons, BT rows] tile (program ids 0, 1) over K-slice
        program_id(2) of num_programs(2). Weight (p, s, z) [N, K]; DUAL: gate (q, t, u) too,
        out[:, out_col + n] = act(gate + gb) * (up + ub); else out[:, out_col + n] = x W^T, or
        with PARTIAL fp32 partials ws[slice, m, n] at out_ptr (stride_om = N)."""
        _tile(x_ptr, p_ptr, s_ptr, z_ptr, q_ptr, t_ptr, u_ptr, out_ptr, ub_ptr, gb_ptr, M, N, K,
              stride_xm, stride_om, out_col, gl.program_id(0) * 16 * num_warps, 0, DUAL,
              PARTIAL, SYMMETRIC, GROUP, ACTIVATION, HAS_UP_BIAS, HAS_GATE_BIAS, DTYPE, BT, V3,
              W_L, X_L, O_L, num_warps, EXP, XS, XT, False, W_L)  # fmt: skip

    @gluon.jit
    def _w4_up_kernel(xl_ptr, xd_ptr, hu_ptr, hg_ptr, p_ptr, s_ptr, z_ptr, q_ptr, t_ptr, u_ptr,
                      out_ptr, ub_ptr, gb_ptr, M, NH, NL, K, stride_xm, stride_h, stride_om,
                      SYMMETRIC: gl.constexpr, GROUP: gl.constexpr, ACTIVATION: gl.constexpr,
                      HAS_UP_BIAS: gl.constexpr, HAS_GATE_BIAS: gl.constexpr,
                      DTYPE: gl.constexpr, BT: gl.constexpr, V3: gl.constexpr,
                      W_L: gl.constexpr, X_L: gl.constexpr, O_L: gl.constexpr,
                      H_L: gl.constexpr, num_warps: gl.constexpr):  # fmt: skip
        """Kernel A whole, x by TMA: out[:, :NH] from the heavy fp16/bf16 rows (hu, hg [NH, K],
        row stride stride_h; x permuted in the dense rows' order, xd), out[:, NH:] from the light
        int4 words (x in the light order, xl): act(gate + gb) * (up + ub). Heavy tiles are the
        first programs along axis 0; [BN = 16 num_warps neurons, BT rows] a program."""
        BN: gl.constexpr = 16 * num_warps
        heavy_tiles = gl.cdiv(NH, BN)
        pid = gl.program_id(0)
        if pid < heavy_tiles:
            _tile(xd_ptr, hu_ptr, s_ptr, z_ptr, hg_ptr, t_ptr, u_ptr, out_ptr, ub_ptr, gb_ptr, M,
                  NH, K, stride_xm, stride_om, 0, pid * BN, stride_h, True, False, SYMMETRIC,
                  GROUP, ACTIVATION, HAS_UP_BIAS, HAS_GATE_BIAS, DTYPE, BT, V3, W_L, X_L, O_L,
                  num_warps, 0, 0, True, True, H_L)  # fmt: skip
        else:
            _tile(xl_ptr, p_ptr, s_ptr, z_ptr, q_ptr, t_ptr, u_ptr, out_ptr, ub_ptr + NH,
                  gb_ptr + NH, M, NL, K, stride_xm, stride_om, NH, (pid - heavy_tiles) * BN, 0,
                  True, False, SYMMETRIC, GROUP, ACTIVATION, HAS_UP_BIAS, HAS_GATE_BIAS, DTYPE,
                  BT, V3, W_L, X_L, O_L, num_warps, 0, 0, True, False, H_L)  # fmt: skip

    @gluon.jit
    def _tile(x_ptr, p_ptr, s_ptr, z_ptr, q_ptr, t_ptr, u_ptr, out_ptr, ub_ptr, gb_ptr, M, N, K,
              stride_xm, stride_om, out_col, n0, stride_h, DUAL: gl.constexpr,
              PARTIAL: gl.constexpr, SYMMETRIC: gl.constexpr, GROUP: gl.constexpr,
              ACTIVATION: gl.constexpr, HAS_UP_BIAS: gl.constexpr, HAS_GATE_BIAS: gl.constexpr,
              DTYPE: gl.constexpr, BT: gl.constexpr, V3: gl.constexpr, W_L: gl.constexpr,
              X_L: gl.constexpr, O_L: gl.constexpr, num_warps: gl.constexpr,
              EXP: gl.constexpr, XS: gl.constexpr, XT: gl.constexpr, HV: gl.constexpr,
              H_L: gl.constexpr):  # fmt: skip
        """The kernels' tile: columns n0 .. n0 + BN of the weight(s) (HV: heavy rows p / q with
        row stride stride_h and x in the dense rows' order), rows program_id(1) * BT, K-slice
        program_id(2)."""
        BN: gl.constexpr = 16 * num_warps
        A3: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=V3, k_width=2)
        XSL: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16,
                                                 rank=2)  # fmt: skip

        m0 = gl.program_id(1) * BT
        # steps: DUAL 64 k (up and gate), else 128 k (two 64-k halves)
        KS: gl.constexpr = 64 if DUAL else 128
        n_steps = gl.cdiv(K, KS)
        lo = gl.program_id(2) * n_steps // gl.num_programs(2)
        hi = (gl.program_id(2) + 1) * n_steps // gl.num_programs(2)
        last = hi - 1
        KR = K // 8
        G = gl.cdiv(K, GROUP)

        if HV:  # heavy rows [8 (4 b + t), BN, 8 (c)]: k offsets 8 (4 b + t) + c, their rows
            w_rows, w_mask, w_off, w_cols = _heavy_offsets(n0, N, stride_h, BN, H_L)
        else:
            w_rows = gl.arange(0, 8, layout=gl.SliceLayout(1, W_L))
            w_cols = n0 + gl.arange(0, BN, layout=gl.SliceLayout(0, W_L))
            w_mask = w_cols < N
            w_off = w_rows[:, None] * N + w_cols[None, :]
        x_rows = m0 + gl.arange(0, BT, layout=gl.SliceLayout(1, X_L))
        x_off = (
            x_rows[:, None] * stride_xm + gl.arange(0, 64, layout=gl.SliceLayout(0, X_L))[None, :]
        )
        # x in shared memory, three ways: XT, a three-stage ring filled by TMA from x permuted
        # in memory; XS > 0, the whole slice (at most XS steps) staged once (no store, fence or
        # barrier in the loop); else three step buffers restaged through registers each step
        x_desc = 0
        bars = 0
        if XT:  # x (pre-permuted) by TMA into a three-stage ring, one mbarrier a stage
            x_smem = gl.allocate_shared_memory(DTYPE, [3 * (1 if DUAL else 2), BT, 64], XSL)
            bars = gl.allocate_shared_memory(gl.int64, [3, 1], mbarrier.MBarrierLayout())
            for st in gl.static_range(3):
                mbarrier.init(bars.index(st), count=1)
            fence_async_shared()
            x_desc = tma.make_tensor_descriptor(x_ptr, [M, K], [stride_xm, 1], [BT, 64], XSL)
            _tma_x(x_desc, bars, x_smem, lo, lo, last, m0, DUAL, BT)
            _tma_x(x_desc, bars, x_smem, lo + 1, lo, last, m0, DUAL, BT)
        elif XS > 0:
            x_smem = gl.allocate_shared_memory(DTYPE, [XS * (1 if DUAL else 2), BT, 64], XSL)
            for j in range(0, hi - lo):
                if DUAL:
                    x_smem.index(j).store(_x_slots(_x_tile(x_ptr, x_off, x_rows, (lo + j) * 64,
                                                           K, M)))  # fmt: skip
                else:
                    x_smem.index(2 * j).store(_x_slots(_x_tile(x_ptr, x_off, x_rows,
                                                               (lo + j) * 128, K, M)))  # fmt: skip
                    x_smem.index(2 * j + 1).store(_x_slots(_x_tile(
                        x_ptr, x_off, x_rows, (lo + j) * 128 + 64, K, M)))  # fmt: skip
        else:
            x_smem = gl.allocate_shared_memory(DTYPE, [6, BT, 64], XSL)
            _stage_x(x_ptr, x_off, x_rows, x_smem, lo, K, M, DUAL)

        # prologue: step lo's x tiles in shared memory; register set A (words and scales) of
        # step lo, set B of step lo + 1 (each set is reloaded two steps ahead right after its
        # step read it: no register copies wait for loads in flight)
        hA0, hA1, sA0, zA0, sA1, zA1 = _load_set(
            lo, p_ptr, s_ptr, z_ptr, q_ptr, t_ptr, u_ptr, w_off, w_rows, w_cols, w_mask, N, KR,
            G, DUAL, SYMMETRIC, GROUP, HV, K)  # fmt: skip
        hB0, hB1, sB0, zB0, sB1, zB1 = _load_set(
            gl.minimum(lo + 1, last), p_ptr, s_ptr, z_ptr, q_ptr, t_ptr, u_ptr, w_off, w_rows,
            w_cols, w_mask, N, KR, G, DUAL, SYMMETRIC, GROUP, HV, K)  # fmt: skip
        fence_async_shared()
        md._barrier()

        acc0 = gl.zeros([BN, BT], gl.float32, layout=V3)
        acc1 = warpgroup_mma_init(gl.zeros([BN, BT], gl.float32, layout=V3))
        a1 = gl.zeros([BN, 64], DTYPE, layout=A3)
        for i in range(lo, hi - 1, 2):
            acc0, acc1, a1, hA0, hA1, sA0, zA0, sA1, zA1 = _step(
                i, last, acc0, acc1, a1, hA0, hA1, sA0, zA0, sA1, zA1, x_ptr, x_off, x_rows,
                x_smem, p_ptr, s_ptr, z_ptr, q_ptr, t_ptr, u_ptr, w_off, w_rows, w_cols, w_mask,
                M, N, K, KR, G, DUAL, SYMMETRIC, GROUP, DTYPE, A3, EXP, lo, XS, x_desc, bars,
                m0, BT, XT, HV, num_warps)  # fmt: skip
            acc0, acc1, a1, hB0, hB1, sB0, zB0, sB1, zB1 = _step(
                i + 1, last, acc0, acc1, a1, hB0, hB1, sB0, zB0, sB1, zB1, x_ptr, x_off, x_rows,
                x_smem, p_ptr, s_ptr, z_ptr, q_ptr, t_ptr, u_ptr, w_off, w_rows, w_cols, w_mask,
                M, N, K, KR, G, DUAL, SYMMETRIC, GROUP, DTYPE, A3, EXP, lo, XS, x_desc, bars,
                m0, BT, XT, HV, num_warps)  # fmt: skip
        if (hi - lo) % 2 == 1:
            acc0, acc1, a1, hA0, hA1, sA0, zA0, sA1, zA1 = _step(
                last, last, acc0, acc1, a1, hA0, hA1, sA0, zA0, sA1, zA1, x_ptr, x_off, x_rows,
                x_smem, p_ptr, s_ptr, z_ptr, q_ptr, t_ptr, u_ptr, w_off, w_rows, w_cols, w_mask,
                M, N, K, KR, G, DUAL, SYMMETRIC, GROUP, DTYPE, A3, EXP, lo, XS, x_desc, bars,
                m0, BT, XT, HV, num_warps)  # fmt: skip
        acc1, a1 = warpgroup_mma_wait(num_outstanding=0, deps=[acc1, a1])

        # epilogue: [BN, BT] tiles -> out[m, out_col + n], n fastest (coalesced)
        on = n0 + gl.arange(0, BN, layout=gl.SliceLayout(1, O_L))
        om = m0 + gl.arange(0, BT, layout=gl.SliceLayout(0, O_L))
        mask = (on < N)[:, None] & (om < M)[None, :]
        if DUAL:
            up = gl.convert_layout(acc0, O_L)
            gate = gl.convert_layout(acc1, O_L)
            if HAS_UP_BIAS:
                up += gl.load(ub_ptr + on, mask=on < N, other=0.0).to(gl.float32)[:, None]
            if HAS_GATE_BIAS:
                gate += gl.load(gb_ptr + on, mask=on < N, other=0.0).to(gl.float32)[:, None]
            res = md._act(gate, ACTIVATION) * up
        else:
            res = gl.convert_layout(acc0 + acc1, O_L)
        ptrs = out_ptr + om[None, :] * stride_om + (out_col + on)[:, None]
        if PARTIAL:
            gl.store(ptrs + gl.program_id(2) * M * stride_om, res, mask=mask)
        else:
            if not DUAL and HAS_UP_BIAS:
                res += gl.load(ub_ptr + on, mask=on < N, other=0.0).to(gl.float32)[:, None]
            gl.store(ptrs, res.to(out_ptr.dtype.element_ty), mask=mask)


def layouts(bt: int, num_warps: int) -> dict:
    """The kernel's layout constexprs for BT rows a program and num_warps warps (BN = 16
    num_warps neurons): V3 (the accumulators, [BN, BT]), W_L (words [8, BN]: lane 4 g + t holds
    word row t of each 32-k block of columns g and g + 8 of its warp's 16, as mma_decode's W-as-A
    form), X_L (x [BT, 64], 16 bytes a thread), O_L (the epilogue, neurons along the lanes)."""
    log_w = num_warps.bit_length() - 1
    return dict(
        V3=gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                     instr_shape=[16, bt, 16]),
        W_L=gl.DistributedLinearLayout(
            reg_bases=[[0, 8], [4, 0]], lane_bases=[[1, 0], [2, 0], [0, 1], [0, 2], [0, 4]],
            warp_bases=[[0, 16 << i] for i in range(log_w)], block_bases=[],
            shape=[8, 16 * num_warps],
        ),
        X_L=gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0]),
        O_L=gl.BlockedLayout([4, 1], [32, 1], [1, num_warps], [0, 1]),
    )  # fmt: skip


def kernel_a(
    x: torch.Tensor,
    w: SplitFFNWeights,
    a: torch.Tensor,
    bt: int = 128,
    num_warps: int = 4,
    ring: int = 0,
) -> torch.Tensor:
    """The whole kernel A in one launch (`_w4_up_kernel`): a [M, h + l] = act(x G^T + gb) *
    (x U^T + ub) over the heavy fp16/bf16 rows and the light int4 words, x [M, K] contiguous
    rows, both parts by TMA-fed wgmma (x permuted twice by torch inside the call). Gated
    FFNs with both parts, light weights of one format (prototype). `ring` > 0 runs the
    package's form of it instead (ffnsplit/kernels/wgmma_prefill.py: the light words through a
    cp.async ring of that many stages; 128 rows, 4 warps)."""
    if ring:
        if (bt, num_warps) != (wp.BT, wp.NUM_WARPS):
            raise ValueError(f"the words ring takes bt={wp.BT}, num_warps={wp.NUM_WARPS}")
        return wp.split_activations(x, w, a, ring=ring)
    m, k = x.shape
    nh, nl = w.n_heavy, w.n_light
    if not (w.gated and nh and nl) or tma is None:
        raise ValueError("kernel_a takes a gated FFN with heavy and light neurons (Triton 3.6 TMA)")
    xl, xd = permute_x(x), permute_x(x, dense=True)
    triton.set_allocator(_scratch)
    up, gate = w.light_up, w.light_gate
    hu, hg = w.heavy_up.contiguous(), w.heavy_gate.contiguous()
    bn = 16 * num_warps  # one or two warpgroups of 64 neurons sharing each x stage
    grid = (triton.cdiv(nh, bn) + triton.cdiv(nl, bn), triton.cdiv(m, bt))
    _w4_up_kernel[grid](
        xl, xd, hu, hg, up.planes[0], up.scales, up.zeros if up.zeros is not None else up.scales,
        gate.planes[0], gate.scales, gate.zeros if gate.zeros is not None else gate.scales, a,
        w.up_bias if w.up_bias is not None else a, w.gate_bias if w.gate_bias is not None else a,
        m, nh, nl, k, xl.stride(0), hu.stride(0), a.stride(0), SYMMETRIC=up.symmetric,
        GROUP=up.group_size, ACTIVATION=w.activation, HAS_UP_BIAS=w.up_bias is not None,
        HAS_GATE_BIAS=w.gate_bias is not None, DTYPE=_gl_dtype(x.dtype), BT=bt,
        **layouts(bt, num_warps), H_L=heavy_layout(num_warps), num_warps=num_warps,
    )  # fmt: skip
    return a


def heavy_layout(num_warps: int):
    """Heavy rows [8 (4 b + t), 16 num_warps, 8 (c)]: lane 4 g + t holds k = 8 (4 b + t) .. + 7
    (16 bytes) of rows g and g + 8 of its warp's 16, both 32-k blocks of a step."""
    log_w = num_warps.bit_length() - 1
    return gl.DistributedLinearLayout(
        reg_bases=[[0, 0, 1], [0, 0, 2], [0, 0, 4], [0, 8, 0], [4, 0, 0]],
        lane_bases=[[1, 0, 0], [2, 0, 0], [0, 1, 0], [0, 2, 0], [0, 4, 0]],
        warp_bases=[[0, 16 << i, 0] for i in range(log_w)], block_bases=[],
        shape=[8, 16 * num_warps, 8],
    )  # fmt: skip


def _scratch(size: int, alignment: int, stream) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _gl_dtype(dtype: torch.dtype):
    return gl.float16 if dtype == torch.float16 else gl.bfloat16


def light_gemm(x: torch.Tensor, w: QuantizedWeight, out: torch.Tensor, *, out_col: int = 0,
               gate: QuantizedWeight | None = None, up_bias: torch.Tensor | None = None,
               gate_bias: torch.Tensor | None = None, activation: str = "silu", bt: int = 128,
               num_warps: int = 8, split: int = 1, reduce: bool = True,
               x_resident: bool = False, x_tma: bool = False) -> torch.Tensor:  # fmt: skip
    """out[:, out_col:out_col + N] = x @ W^T (+ up_bias), or with `gate` kernel A's
    act(x G^T + gate_bias) * (x W^T + up_bias); x [M, K] contiguous rows, out [M, *] rows.
    `split` > 1 (single weight only): fp32 partials summed by torch (prototype); without
    `reduce` the partials [split, M, N] are returned unsummed (timing the kernel alone).
    `x_resident`: the slice's x is staged in shared memory once (decode / mid sizes: no
    restaging, fence or barrier a step; fails when it does not fit: more slices).
    `x_tma` (4 warps: one warpgroup, so a stage is free once its products are waited for): x
    permuted into the fragments' k-slot order (a copy, part of the call), then read by TMA
    into a three-stage ring with an mbarrier a stage; no register staging, fence or barrier."""
    m, k = x.shape
    n = w.shape[0]
    dual = gate is not None
    if x_tma:
        if num_warps not in (4, 8) or tma is None:
            raise ValueError("x_tma takes num_warps 4 or 8 and Triton 3.6's Gluon TMA")
        x = permute_x(x)
        triton.set_allocator(_scratch)  # the in-kernel tensor descriptor's global memory
    ws = None
    if split > 1:
        if dual:
            raise ValueError("split-K takes a single weight")
        ws = torch.empty((split, m, n), dtype=torch.float32, device=x.device)
    zeros = w.zeros if w.zeros is not None else w.scales
    g = gate if dual else w
    gzeros = g.zeros if g.zeros is not None else g.scales
    grid = (triton.cdiv(n, 16 * num_warps), triton.cdiv(m, bt), split)
    target = ws if ws is not None else out
    _w4_gemm_kernel[grid](
        x, w.planes[0], w.scales, zeros, g.planes[0], g.scales, gzeros, target,
        up_bias if up_bias is not None else out, gate_bias if gate_bias is not None else out,
        m, n, k, x.stride(0), n if ws is not None else out.stride(0),
        0 if ws is not None else out_col,
        DUAL=dual, PARTIAL=ws is not None, SYMMETRIC=w.symmetric, GROUP=w.group_size,
        ACTIVATION=activation, HAS_UP_BIAS=up_bias is not None,
        HAS_GATE_BIAS=dual and gate_bias is not None, DTYPE=_gl_dtype(x.dtype), BT=bt,
        **layouts(bt, num_warps), num_warps=num_warps, EXP=EXPERIMENT,
        XS=triton.cdiv(triton.cdiv(k, 64 if dual else 128), split) if x_resident else 0,
        XT=x_tma,
    )  # fmt: skip
    if ws is not None and not reduce:
        return ws
    if ws is not None:
        res = ws.sum(0)
        if up_bias is not None:
            res += up_bias.float()
        out[:, out_col : out_col + n] = res.to(out.dtype)
    return out


def aot_compile_up(dtype: str = "fp16", *, bt: int = 128, arch: int = 90, num_warps: int = 4):
    """`_w4_up_kernel` (the whole kernel A, x by TMA) compiled ahead of time for sm_`arch`."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    fn = _w4_up_kernel
    t = "*" + dtype
    sig = dict(xl_ptr=t, xd_ptr=t, hu_ptr=t, hg_ptr=t, p_ptr="*i32", s_ptr=t, z_ptr=t,
               q_ptr="*i32", t_ptr=t, u_ptr=t, out_ptr=t, ub_ptr=t, gb_ptr=t, M="i32",
               NH="i32", NL="i32", K="i32", stride_xm="i32", stride_h="i32",
               stride_om="i32")  # fmt: skip
    const = dict(SYMMETRIC=False, GROUP=128, ACTIVATION="silu", HAS_UP_BIAS=False,
                 HAS_GATE_BIAS=False, DTYPE=gl.float16 if dtype == "fp16" else gl.bfloat16,
                 BT=bt, **layouts(bt, num_warps), H_L=heavy_layout(num_warps),
                 num_warps=num_warps)  # fmt: skip
    names = [p.name for p in fn.params]
    signature = {nm: sig.get(nm, "constexpr") for nm in names}
    aligned = [nm for nm in sig if nm.endswith("_ptr")] + ["K", "stride_xm", "stride_h",
                                                           "stride_om", "NH", "NL"]  # fmt: skip
    attrs = {(names.index(nm),): [["tt.divisibility", 16]] for nm in aligned}
    return triton.compile(
        GluonASTSource(fn, signature, const, attrs),
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": num_warps},
    )


def aot_compile(dual: bool, m: int = 256, dtype: str = "fp16", *, n: int = 13632, k: int = 4096,
                bt: int = 128, num_warps: int = 8, arch: int = 90, xs: int = 0,
                xt: bool = False):  # fmt: skip
    """Compile the kernel ahead of time for sm_`arch` (no GPU needed); Triton's CompiledKernel."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    fn = _w4_gemm_kernel
    t = "*" + dtype
    sig = dict(x_ptr=t, p_ptr="*i32", s_ptr=t, z_ptr=t, q_ptr="*i32", t_ptr=t, u_ptr=t,
               out_ptr=t, ub_ptr=t, gb_ptr=t, M="i32", N="i32", K="i32", stride_xm="i32",
               stride_om="i32", out_col="i32")  # fmt: skip
    const = dict(DUAL=dual, PARTIAL=False, SYMMETRIC=False, GROUP=128, ACTIVATION="silu",
                 HAS_UP_BIAS=False, HAS_GATE_BIAS=False,
                 DTYPE=gl.float16 if dtype == "fp16" else gl.bfloat16, BT=bt,
                 **layouts(bt, num_warps), num_warps=num_warps, XS=xs, XT=xt)  # fmt: skip
    names = [p.name for p in fn.params]
    signature = {nm: sig.get(nm, "constexpr") for nm in names}
    aligned = [nm for nm in sig if nm.endswith("_ptr")] + ["K", "stride_xm", "stride_om"]
    aligned += ["N"] if n % 16 == 0 else []
    attrs = {(names.index(nm),): [["tt.divisibility", 16]] for nm in aligned}
    return triton.compile(GluonASTSource(fn, signature, const, attrs),
                          target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps})  # fmt: skip
