"""The whole split FFN in one launch at decode sizes (M <= 4 rows): neuron units, not kernels A+B.

The two-kernel paths (gemv, the Gluon tier) compute every activation in kernel A and then the
down projection in kernel B, which needs all of `a`: the second launch starts only when the first
has finished, and each is a one-wave grid with its own ramp and tail. A single kernel that only
reads the layer's bytes runs at ~0.97x the copy-bandwidth floor; two such kernels back to back
took 1.06-1.23x on an H200 (docs/kernels_notes.md, version 17).

Here the FFN is cut along its neurons instead. A program takes one *unit* of neurons and computes
the FFN restricted to it, which needs nothing from any other program:
  1. up/gate of its neurons over all of K: heavy units read dense rows (gemv's dense program),
     light units read packed columns with gemv's light loop, the K range split among KS lanes of
     threads ([KS, NB] tiles, each lane a run of whole quantization groups) and the lanes summed
     once at the end; bias, activation and gating -> a[:, unit], written to `a`;
  2. the down projection of those neurons, y_u = a[:, unit] @ W_down[:, unit]^T over all H
     outputs (heavy: [BR, NBH] tiles of heavy_down; light: the unit's word rows of light_down,
     gemv's light loop again with a as x), added into one fp32 accumulator [M, H] with atomics;
  3. gemv's arrival ticket: the last program reads the accumulator, adds the down bias, writes y
     in x's dtype and zeroes the accumulator for the next launch.
Units are sized so that heavy and light ones read about the same bytes. The sums follow the
order in which units arrive, so results are not bitwise repeatable from call to call (as gemv's
atomic configs); FFNSPLIT_FUSED=0 turns the path off.

Outcome (H200, Llama-3-8B FFN shape, benchmarks/RESULTS.md session 15): correct, but slower than
the two launches at every M: M = 1 50.8 us against 37.5 (the light units alone 43.3 us), M = 2
61.2 against 38.8, M = 4 111.8 against 39.4 (M = 1 47.6 with x's quads a step ahead). The
light loops run on CUDA cores (~3.4 SASS instructions a code, x per lane: ~19.5 us of issue for
the layer even at 4 a cycle on 132 SMs) and ncu shows them issuing on 42% of cycles, ~3 warps a
scheduler and 35% of the stalls on loads; the Gluon tier's tensor-core loops need fewer
instructions. So "auto" does not take this path unless FFNSPLIT_FUSED_MAX_M says so
(AUTO_MAX_M).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ffnsplit.kernels import gemv
from ffnsplit.kernels.format import SplitFFNWeights
from ffnsplit.kernels.gemv import (
    ONE_BITS,
    STEP,
    STEP_K,
    _arrive,
    _dense_program,
    _finish_chunk,
    _finish_chunk4,
    _finish_rows4,
    _light_step,
    _light_step4,
    _load_step4,
    _nibble_floats,
    _scale_pair,
    _scale_terms,
    _scaled_rows,
    _store_out,
    _word_rows,
    _x_pair,
    _x_quad,
    _zeroed,
)
from ffnsplit.kernels.tiles import INTERPRET, Tuner, pdl_options, pdl_trigger, pdl_wait

ENABLED = os.environ.get("FFNSPLIT_FUSED", "1") != "0"
MAX_M = 4  # rows of x per program (gemv's explicit per-row accumulators)
# "auto" takes this path for M <= AUTO_MAX_M: 0 by default, since on an H200 it is slower than
# the two-launch paths at every M it takes (M = 1: 50.8 us against the Gluon tier's 37.5; its
# CUDA-core loop issues ~3.4 SASS instructions a code, too many for 4.2 TB/s over 132 SMs at the
# occupancy it reaches; benchmarks/RESULTS.md, session 15). FFNSPLIT_FUSED_MAX_M=1 (up to 4)
# opts in (GPUs with less bandwidth an SM: not measured), path="fused" forces it.
AUTO_MAX_M = int(os.environ.get("FFNSPLIT_FUSED_MAX_M", "0"))


@triton.jit
def _zeros8(t):
    """Eight copies of t: the fresh accumulators of one chunk (u/g, lo/hi, four rows)."""
    return t, t, t, t, t, t, t, t


@triton.jit
def _x_quads(x_ptr, stride_xm, M, k0):
    """Row 0's 32 x values of the step at k0 as eight int64 quads (16-bit values; the caller
    checks 8-byte alignment), to be loaded a step ahead of their use."""
    return (_x_quad(x_ptr, stride_xm, 0, M, k0, True), _x_quad(x_ptr, stride_xm, 0, M, k0 + 4, True),
            _x_quad(x_ptr, stride_xm, 0, M, k0 + 8, True),
            _x_quad(x_ptr, stride_xm, 0, M, k0 + 12, True),
            _x_quad(x_ptr, stride_xm, 0, M, k0 + 16, True),
            _x_quad(x_ptr, stride_xm, 0, M, k0 + 20, True),
            _x_quad(x_ptr, stride_xm, 0, M, k0 + 24, True),
            _x_quad(x_ptr, stride_xm, 0, M, k0 + 28, True))  # fmt: skip


@triton.jit
def _word_row0(ul, uh, gl, gh, xe, xo, w, v, qa, qb, x_ptr, ONE, DUAL: tl.constexpr):
    """gemv._word_step4 for one row of x whose two quads (k0.., k0 + 4..) are given."""
    for i in tl.static_range(4):
        if i < 2:
            c = w << (12 - 8 * i)
            d = v << (12 - 8 * i)
            q = qa
        else:
            c = w >> (8 * i - 12)
            d = v >> (8 * i - 12)
            q = qb
        lo, hi = _nibble_floats(c, ONE)
        dlo, dhi = _nibble_floats(d, ONE)
        x_even, x_odd = _x_pair(x_ptr, 0, 0, 1, 0, q, (2 * i) % 4, True)
        ul, uh, gl, gh, xe, xo = _word_rows(ul, uh, gl, gh, xe, xo, lo, hi, dlo, dhi, x_even,
                                            x_odd, DUAL)  # fmt: skip
    return ul, uh, gl, gh, xe, xo


@triton.jit
def _step_row0(ul, uh, gl, gh, xe, xo, w0, w1, w2, w3, v0, v1, v2, v3, q0, q1, q2, q3, q4, q5, q6,
               q7, x_ptr, ONE, DUAL: tl.constexpr):  # fmt: skip
    """gemv._light_step4 for one row of x (BM = 1) with the step's x quads given (_x_quads)."""
    ul, uh, gl, gh, xe, xo = _word_row0(ul, uh, gl, gh, xe, xo, w0, v0, q0, q1, x_ptr, ONE, DUAL)
    ul, uh, gl, gh, xe, xo = _word_row0(ul, uh, gl, gh, xe, xo, w1, v1, q2, q3, x_ptr, ONE, DUAL)
    ul, uh, gl, gh, xe, xo = _word_row0(ul, uh, gl, gh, xe, xo, w2, v2, q4, q5, x_ptr, ONE, DUAL)
    ul, uh, gl, gh, xe, xo = _word_row0(ul, uh, gl, gh, xe, xo, w3, v3, q6, q7, x_ptr, ONE, DUAL)
    return ul, uh, gl, gh, xe, xo


@triton.jit
def _lane_sum(t, BM: tl.constexpr, r: tl.constexpr, NB: tl.constexpr):
    """Sum of a [KS, NB] lane tile over its lanes for row r < BM (zeros, never used, past BM)."""
    if r < BM:
        return tl.sum(t, axis=0)
    else:
        return tl.zeros([NB], dtype=tl.float32)


@triton.jit
def _light_up(x_ptr, stride_xm, M, p0_ptr, p1_ptr, s_ptr, z_ptr, q0_ptr, q1_ptr, t_ptr, u_ptr,
              NL, K, c0, ONE, BITS: tl.constexpr, GROUP: tl.constexpr, SYMMETRIC: tl.constexpr,
              DUAL: tl.constexpr, BM: tl.constexpr, KS: tl.constexpr, NB: tl.constexpr,
              FAST: tl.constexpr, XVEC: tl.constexpr, PDL: tl.constexpr,
              STAGES: tl.constexpr, XPRE: tl.constexpr):  # fmt: skip
    """Up (and gate) sums of light columns c0..c0 + NB over all of K, rows 0..BM of x: lane ks of
    the [KS, NB] tiles takes steps ks * SPL .. (ks + 1) * SPL (SPL = K / 32 / KS), which are whole
    groups or lie inside one (the launcher checks), so scales apply once a chunk of CH steps.
    Returns [NB] fp32 sums per row (up u0..u3, gate g0..g3). FAST with STAGES > 1: one loop
    over the lane's steps that Triton's pipeliner feeds (cp.async into shared memory, STAGES - 1
    steps ahead; XPRE, one row with x vector loads: x's quads a step ahead too); else the next
    step's words are loaded into registers before the current step is computed."""
    ks = tl.arange(0, KS)[:, None]
    cols = c0 + tl.arange(0, NB)[None, :]
    mask = cols < NL
    SPL = K // STEP_K // KS
    SPG: tl.constexpr = GROUP // STEP_K
    CH = tl.minimum(SPL, SPG)  # steps a chunk: one group, or the lane's slice inside one
    st0 = ks * SPL
    zero = tl.zeros([KS, NB], dtype=tl.float32)
    zs = tl.zeros([KS, 1], dtype=tl.float32)
    au0, au1, au2, au3, ag0, ag1, ag2, ag3 = _zeros8(zero)
    if FAST and STAGES > 1:
        pdl_wait(PDL)
        ul0, uh0, ul1, uh1, ul2, uh2, ul3, uh3 = _zeros8(zero)
        gl0, gh0, gl1, gh1, gl2, gh2, gl3, gh3 = _zeros8(zero)
        xe0, xo0, xe1, xo1, xe2, xo2, xe3, xo3 = _zeros8(zs)
        if XPRE:
            xq = _x_quads(x_ptr, stride_xm, M, st0 * STEP_K)
        for i in tl.range(0, SPL, num_stages=STAGES):
            w = _load_step4(p0_ptr, q0_ptr, NL, (st0 + i) * STEP_K, cols, mask, DUAL)
            if XPRE:
                cur_x = xq
                xq = _x_quads(x_ptr, stride_xm, M, (st0 + tl.minimum(i + 1, SPL - 1)) * STEP_K)
                ul0, uh0, gl0, gh0, xe0, xo0 = _step_row0(ul0, uh0, gl0, gh0, xe0, xo0, *w,
                                                          *cur_x, x_ptr, ONE, DUAL)  # fmt: skip
            else:
                (ul0, uh0, ul1, uh1, ul2, uh2, ul3, uh3, gl0, gh0, gl1, gh1, gl2, gh2, gl3, gh3,
                 xe0, xo0, xe1, xo1, xe2, xo2, xe3, xo3) = _light_step4(
                    ul0, uh0, ul1, uh1, ul2, uh2, ul3, uh3, gl0, gh0, gl1, gh1, gl2, gh2, gl3,
                    gh3, xe0, xo0, xe1, xo1, xe2, xo2, xe3, xo3, *w, x_ptr, stride_xm, M,
                    (st0 + i) * STEP_K, ONE, DUAL, BM, XVEC)  # fmt: skip
            if (i + 1) % CH == 0:  # a chunk's last step: its scales, then the next chunk
                au0, au1, au2, au3, ag0, ag1, ag2, ag3 = _finish_chunk4(
                    au0, au1, au2, au3, ag0, ag1, ag2, ag3, ul0, uh0, ul1, uh1, ul2, uh2, ul3,
                    uh3, gl0, gh0, gl1, gh1, gl2, gh2, gl3, gh3, xe0, xo0, xe1, xo1, xe2, xo2,
                    xe3, xo3, s_ptr, z_ptr, t_ptr, u_ptr, (st0 + i) // SPG, NL, cols, mask,
                    SYMMETRIC, DUAL, BM)  # fmt: skip
                ul0, uh0, ul1, uh1, ul2, uh2, ul3, uh3 = _zeros8(zero)
                gl0, gh0, gl1, gh1, gl2, gh2, gl3, gh3 = _zeros8(zero)
                xe0, xo0, xe1, xo1, xe2, xo2, xe3, xo3 = _zeros8(zs)
    elif FAST:
        nxt = _load_step4(p0_ptr, q0_ptr, NL, st0 * STEP_K, cols, mask, DUAL)
        pdl_wait(PDL)
        for c in range(0, SPL // CH):
            ul0, uh0, ul1, uh1, ul2, uh2, ul3, uh3 = _zeros8(zero)
            gl0, gh0, gl1, gh1, gl2, gh2, gl3, gh3 = _zeros8(zero)
            xe0, xo0, xe1, xo1, xe2, xo2, xe3, xo3 = _zeros8(zs)
            for j in range(0, CH):
                i = c * CH + j
                cur = nxt
                nxt = _load_step4(p0_ptr, q0_ptr, NL, (st0 + tl.minimum(i + 1, SPL - 1)) * STEP_K,
                                  cols, mask, DUAL)  # fmt: skip
                (ul0, uh0, ul1, uh1, ul2, uh2, ul3, uh3, gl0, gh0, gl1, gh1, gl2, gh2, gl3, gh3,
                 xe0, xo0, xe1, xo1, xe2, xo2, xe3, xo3) = _light_step4(
                    ul0, uh0, ul1, uh1, ul2, uh2, ul3, uh3, gl0, gh0, gl1, gh1, gl2, gh2, gl3,
                    gh3, xe0, xo0, xe1, xo1, xe2, xo2, xe3, xo3, *cur, x_ptr, stride_xm, M,
                    (st0 + i) * STEP_K, ONE, DUAL, BM, XVEC)  # fmt: skip
            au0, au1, au2, au3, ag0, ag1, ag2, ag3 = _finish_chunk4(
                au0, au1, au2, au3, ag0, ag1, ag2, ag3, ul0, uh0, ul1, uh1, ul2, uh2, ul3, uh3,
                gl0, gh0, gl1, gh1, gl2, gh2, gl3, gh3, xe0, xo0, xe1, xo1, xe2, xo2, xe3, xo3,
                s_ptr, z_ptr, t_ptr, u_ptr, (st0 + c * CH) // SPG, NL, cols, mask, SYMMETRIC,
                DUAL, BM)  # fmt: skip
    else:
        pdl_wait(PDL)
        for c in range(0, SPL // CH):
            tu0, tu1, tu2, tu3, tg0, tg1, tg2, tg3 = _zeros8(zero)
            xs0, xs1, xs2, xs3 = zs, zs, zs, zs
            for j in range(0, CH):
                tu0, tu1, tu2, tu3, tg0, tg1, tg2, tg3, xs0, xs1, xs2, xs3 = _light_step(
                    tu0, tu1, tu2, tu3, tg0, tg1, tg2, tg3, xs0, xs1, xs2, xs3, x_ptr, stride_xm,
                    M, p0_ptr, p1_ptr, q0_ptr, q1_ptr, NL, (st0 + c * CH + j) * STEP_K, cols, mask,
                    ONE, BITS, DUAL, BM)  # fmt: skip
            au0, au1, au2, au3, ag0, ag1, ag2, ag3 = _finish_chunk(
                au0, au1, au2, au3, ag0, ag1, ag2, ag3, tu0, tu1, tu2, tu3, tg0, tg1, tg2, tg3,
                xs0, xs1, xs2, xs3, s_ptr, z_ptr, t_ptr, u_ptr, (st0 + c * CH) // SPG, NL, cols,
                mask, BITS, SYMMETRIC, DUAL, BM)  # fmt: skip
    return (_lane_sum(au0, BM, 0, NB), _lane_sum(au1, BM, 1, NB), _lane_sum(au2, BM, 2, NB),
            _lane_sum(au3, BM, 3, NB), _lane_sum(ag0, BM, 0, NB), _lane_sum(ag1, BM, 1, NB),
            _lane_sum(ag2, BM, 2, NB), _lane_sum(ag3, BM, 3, NB))  # fmt: skip


@triton.jit
def _store_a(a_ptr, ub_ptr, gb_ptr, stride_am, M, cols, mask, u0, u1, u2, u3, g0, g1, g2, g3,
             DUAL: tl.constexpr, ACTIVATION: tl.constexpr, HAS_UP_BIAS: tl.constexpr,
             HAS_GATE_BIAS: tl.constexpr, BM: tl.constexpr):  # fmt: skip
    """a[r, cols] = act(gate + gate bias) * (up + up bias) (or act(up + bias)) for rows r < M."""
    row = cols * 0  # the rows as vectors: masks of the stores
    _store_out(a_ptr, ub_ptr, gb_ptr, 0, stride_am, cols, mask, u0, g0, True, DUAL, ACTIVATION,
               HAS_UP_BIAS, HAS_GATE_BIAS)  # fmt: skip
    if BM > 1:
        _store_out(a_ptr, ub_ptr, gb_ptr, 1, stride_am, cols, mask & (row + 1 < M), u1, g1, True,
                   DUAL, ACTIVATION, HAS_UP_BIAS, HAS_GATE_BIAS)  # fmt: skip
    if BM > 2:
        _store_out(a_ptr, ub_ptr, gb_ptr, 2, stride_am, cols, mask & (row + 2 < M), u2, g2, True,
                   DUAL, ACTIVATION, HAS_UP_BIAS, HAS_GATE_BIAS)  # fmt: skip
        _store_out(a_ptr, ub_ptr, gb_ptr, 3, stride_am, cols, mask & (row + 3 < M), u3, g3, True,
                   DUAL, ACTIVATION, HAS_UP_BIAS, HAS_GATE_BIAS)  # fmt: skip


@triton.jit
def _add_rows(acc_ptr, H, cols, mask, M, y0, y1, y2, y3, BM: tl.constexpr):
    """acc[r, cols] += y_r (fp32 atomics, relaxed: _arrive's fence and ticket publish them)."""
    row = cols * 0  # the rows as vectors: masks of the adds
    tl.atomic_add(acc_ptr + cols, y0, mask=mask, sem="relaxed", scope="gpu")
    if BM > 1:
        tl.atomic_add(acc_ptr + H + cols, y1, mask=mask & (row + 1 < M), sem="relaxed", scope="gpu")
    if BM > 2:
        tl.atomic_add(acc_ptr + 2 * H + cols, y2, mask=mask & (row + 2 < M), sem="relaxed",
                      scope="gpu")  # fmt: skip
        tl.atomic_add(acc_ptr + 3 * H + cols, y3, mask=mask & (row + 3 < M), sem="relaxed",
                      scope="gpu")  # fmt: skip


@triton.jit
def _light_down(a_ptr, stride_am, M, d0_ptr, d1_ptr, ds_ptr, dz_ptr, acc_ptr, H, NL, c0, ONE,
                BITS: tl.constexpr, GROUP: tl.constexpr, SYMMETRIC: tl.constexpr,
                BM: tl.constexpr, NB: tl.constexpr, CB: tl.constexpr, FAST: tl.constexpr,
                XVEC: tl.constexpr, STAGES: tl.constexpr, XPRE: tl.constexpr):  # fmt: skip
    """acc[:, :H] += a[:, c0:c0 + NB] @ dequant(light_down[:, c0:c0 + NB])^T, CB output columns
    at a time (a: the light part of the activations, rows stride_am apart; the last unit may
    have fewer than NB neurons). The unit lies in one group of light_down (the launcher
    checks). FAST: one loop over (column chunk, step) whose next words are loaded before the
    current step is computed, also across chunks (STAGES > 1: by Triton's pipeliner). XPRE with
    one step a unit (NB = 32): the unit's a quads are loaded once, before the loop."""
    n_steps = tl.minimum(NB, NL - c0) // STEP_K
    g = c0 // GROUP
    z1 = tl.zeros([CB], dtype=tl.float32)
    zs = tl.zeros([], dtype=tl.float32)
    offs = tl.arange(0, CB)
    if FAST:
        total = tl.cdiv(H, CB) * n_steps
        nxt = _load_step4(d0_ptr, d0_ptr, H, c0, offs, offs < H, False)  # STAGES == 1
        APRE: tl.constexpr = XPRE and NB == STEP_K
        if APRE:
            aq = _x_quads(a_ptr, stride_am, M, c0)
        ul0, uh0, ul1, uh1, ul2, uh2, ul3, uh3 = _zeros8(z1)
        xe0, xo0, xe1, xo1, xe2, xo2, xe3, xo3 = _zeros8(zs)
        for i in tl.range(0, total, num_stages=STAGES):
            c = i // n_steps
            j = i - c * n_steps
            cols = c * CB + offs
            mask = cols < H
            if STAGES > 1:
                cur = _load_step4(d0_ptr, d0_ptr, H, c0 + j * STEP_K, cols, mask, False)
            else:
                cur = nxt
                i1 = tl.minimum(i + 1, total - 1)
                c1 = i1 // n_steps
                cols1 = c1 * CB + offs
                nxt = _load_step4(d0_ptr, d0_ptr, H, c0 + (i1 - c1 * n_steps) * STEP_K, cols1,
                                  cols1 < H, False)  # fmt: skip
            if APRE:
                ul0, uh0, _, _, xe0, xo0 = _step_row0(ul0, uh0, z1, z1, xe0, xo0, *cur, *aq, a_ptr,
                                                      ONE, False)  # fmt: skip
            else:
                (ul0, uh0, ul1, uh1, ul2, uh2, ul3, uh3, _, _, _, _, _, _, _, _,
                 xe0, xo0, xe1, xo1, xe2, xo2, xe3, xo3) = _light_step4(
                    ul0, uh0, ul1, uh1, ul2, uh2, ul3, uh3, z1, z1, z1, z1, z1, z1, z1, z1,
                    xe0, xo0, xe1, xo1, xe2, xo2, xe3, xo3, *cur, a_ptr, stride_am, M,
                    c0 + j * STEP_K, ONE, False, BM, XVEC)  # fmt: skip
            if j == n_steps - 1:  # the chunk's last step: scale, add, start the next chunk
                s, z = _scale_pair(ds_ptr, dz_ptr, g, H, cols, mask, SYMMETRIC)
                y0, y1, y2, y3 = _finish_rows4(z1, z1, z1, z1, ul0, uh0, ul1, uh1, ul2, uh2, ul3,
                                               uh3, s, z, xe0, xo0, xe1, xo1, xe2, xo2, xe3,
                                               xo3, BM)  # fmt: skip
                _add_rows(acc_ptr, H, cols, mask, M, y0, y1, y2, y3, BM)
                ul0, uh0, ul1, uh1, ul2, uh2, ul3, uh3 = _zeros8(z1)
                xe0, xo0, xe1, xo1, xe2, xo2, xe3, xo3 = _zeros8(zs)
    else:
        for c in range(0, tl.cdiv(H, CB)):
            cols = c * CB + offs
            mask = cols < H
            t0, t1, t2, t3 = z1, z1, z1, z1
            xs0, xs1, xs2, xs3 = zs, zs, zs, zs
            for j in range(0, n_steps):
                t0, t1, t2, t3, _, _, _, _, xs0, xs1, xs2, xs3 = _light_step(
                    t0, t1, t2, t3, z1, z1, z1, z1, xs0, xs1, xs2, xs3, a_ptr, stride_am, M,
                    d0_ptr, d1_ptr, d0_ptr, d1_ptr, H, c0 + j * STEP_K, cols, mask, ONE, BITS,
                    False, BM)  # fmt: skip
            a, b = _scale_terms(ds_ptr, dz_ptr, g, H, cols, mask, BITS, SYMMETRIC)
            y0, y1, y2, y3 = _scaled_rows(z1, z1, z1, z1, t0, t1, t2, t3, a, b, xs0, xs1, xs2,
                                          xs3, BM)  # fmt: skip
            _add_rows(acc_ptr, H, cols, mask, M, y0, y1, y2, y3, BM)


@triton.jit
def _heavy_row(hd_ptr, stride_hd, a_ptr, stride_am, r: tl.constexpr, M, rows, mrow, n, mn):
    """sum_n heavy_down[rows, n] a[r, n] for one row r of a ([BR] fp32; zeros for r >= M)."""
    w = tl.load(hd_ptr + rows[:, None] * stride_hd + n[None, :], mask=mrow[:, None] & mn[None, :],
                other=0.0).to(tl.float32)  # fmt: skip
    av = tl.load(a_ptr + tl.minimum(r, M - 1) * stride_am + n, mask=mn, other=0.0)  # r < M: used
    return tl.sum(w * av.to(tl.float32)[None, :], axis=1)


@triton.jit
def _heavy_down(a_ptr, stride_am, M, hd_ptr, stride_hd, acc_ptr, H, n0, NH, BM: tl.constexpr,
                NBH: tl.constexpr, BR: tl.constexpr):  # fmt: skip
    """acc[:, :H] += a[:, n0:n0 + NBH] @ heavy_down[:, n0:n0 + NBH]^T, BR output rows at a time."""
    n = n0 + tl.arange(0, NBH)
    mn = n < NH
    for c in range(0, tl.cdiv(H, BR)):
        rows = c * BR + tl.arange(0, BR)
        mrow = rows < H
        y0 = _heavy_row(hd_ptr, stride_hd, a_ptr, stride_am, 0, M, rows, mrow, n, mn)
        y1, y2, y3 = y0, y0, y0
        if BM > 1:
            y1 = _heavy_row(hd_ptr, stride_hd, a_ptr, stride_am, 1, M, rows, mrow, n, mn)
        if BM > 2:
            y2 = _heavy_row(hd_ptr, stride_hd, a_ptr, stride_am, 2, M, rows, mrow, n, mn)
            y3 = _heavy_row(hd_ptr, stride_hd, a_ptr, stride_am, 3, M, rows, mrow, n, mn)
        _add_rows(acc_ptr, H, rows, mrow, M, y0, y1, y2, y3, BM)


@triton.jit(do_not_specialize=["M", "ONE"])
def _fused_ffn_kernel(
    x_ptr, hu_ptr, hg_ptr, hd_ptr, p0_ptr, p1_ptr, s_ptr, z_ptr, q0_ptr, q1_ptr, t_ptr, u_ptr,
    d0_ptr, d1_ptr, ds_ptr, dz_ptr, ub_ptr, gb_ptr, db_ptr, a_ptr, acc_ptr, cnt_ptr, out_ptr,
    M, H, NH, NL, stride_xm, stride_hw, stride_hd, stride_am, stride_om, ONE,
    BITS: tl.constexpr, GROUP: tl.constexpr, SYMMETRIC: tl.constexpr,
    DBITS: tl.constexpr, DGROUP: tl.constexpr, DSYMMETRIC: tl.constexpr,
    DUAL: tl.constexpr, ACTIVATION: tl.constexpr, HAS_UP_BIAS: tl.constexpr,
    HAS_GATE_BIAS: tl.constexpr, HAS_DOWN_BIAS: tl.constexpr, BM: tl.constexpr,
    KS: tl.constexpr, NB: tl.constexpr, CB: tl.constexpr, NBH: tl.constexpr,
    BLOCK_ND: tl.constexpr, BLOCK_KD: tl.constexpr, BR: tl.constexpr, BLOCK_H: tl.constexpr,
    FAST: tl.constexpr, DFAST: tl.constexpr, XVEC: tl.constexpr, AVEC: tl.constexpr,
    PDL: tl.constexpr, STAGES: tl.constexpr, XPRE: tl.constexpr, APRE: tl.constexpr,
):  # fmt: skip
    """One unit of neurons a program: the first cdiv(NH, NBH) programs take NBH heavy neurons
    each, the others NB light neurons each; then every program counts in at one ticket and the
    last one writes out = acc + down bias (see the module docstring). a [M, NH + NL]: the
    activations (heavy first), written here and read back by the same program."""
    pdl_trigger(PDL)
    pid = tl.program_id(0)
    units_h = tl.cdiv(NH, NBH)
    if pid < units_h:
        n0 = pid * NBH
        for rt in range(0, NBH // BLOCK_ND):  # dense rows BLOCK_ND at a time, finished into a
            _dense_program(x_ptr, hu_ptr, hg_ptr, a_ptr, n0 // BLOCK_ND + rt, 0, M, 0, stride_xm,
                           NH, H, stride_hw, 0, 1, NH + NL, a_ptr, ub_ptr, gb_ptr, stride_am,
                           DUAL, BM, BLOCK_ND, BLOCK_KD, True, ACTIVATION, HAS_UP_BIAS,
                           HAS_GATE_BIAS, PDL, False)  # fmt: skip
        tl.debug_barrier()  # this program's a values are read by all its threads next
        _heavy_down(a_ptr, stride_am, M, hd_ptr, stride_hd, acc_ptr, H, n0, NH, BM, NBH, BR)
    else:
        c0 = (pid - units_h) * NB
        u0, u1, u2, u3, g0, g1, g2, g3 = _light_up(
            x_ptr, stride_xm, M, p0_ptr, p1_ptr, s_ptr, z_ptr, q0_ptr, q1_ptr, t_ptr, u_ptr, NL,
            H, c0, ONE, BITS, GROUP, SYMMETRIC, DUAL, BM, KS, NB, FAST, XVEC, PDL, STAGES,
            XPRE)  # fmt: skip
        cols = c0 + tl.arange(0, NB)
        _store_a(a_ptr + NH, ub_ptr + NH, gb_ptr + NH, stride_am, M, cols, cols < NL, u0, u1, u2,
                 u3, g0, g1, g2, g3, DUAL, ACTIVATION, HAS_UP_BIAS, HAS_GATE_BIAS,
                 BM)  # fmt: skip
        tl.debug_barrier()
        _light_down(a_ptr + NH, stride_am, M, d0_ptr, d1_ptr, ds_ptr, dz_ptr, acc_ptr, H, NL, c0, ONE,
                    DBITS, DGROUP, DSYMMETRIC, BM, NB, CB, DFAST, AVEC, STAGES, APRE)  # fmt: skip
    out_cols = tl.arange(0, BLOCK_H)
    _arrive(cnt_ptr, 0, tl.num_programs(0), acc_ptr, out_ptr, db_ptr, db_ptr, out_cols,
            out_cols < H, M, 0, H, stride_om, 1, False, False, ACTIVATION, HAS_DOWN_BIAS, False,
            BM, 8, True)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# launch plumbing


@dataclass(frozen=True)
class FusedConfig:
    """Light units of `nb` neurons ([ks, nb] lane tiles: ks = 128 * num_warps / nb lanes of 4
    columns a thread), heavy units of `nbh` neurons (dense tiles [block_nd, block_kd]), the down
    projection `cb` light output columns or `br` heavy output rows at a time."""

    nb: int
    nbh: int
    block_nd: int
    block_kd: int
    br: int
    num_warps: int
    maxnreg: int | None = None  # a register cap (more programs an SM; ptxas may spill)
    stages: int = 1  # > 1: the light loops' words through Triton's cp.async pipeline
    xpre: bool = False  # one row (M = 1): x's quads loaded a step ahead, a's once a unit

    def ks(self) -> int:
        return max(1, 128 * self.num_warps // self.nb)

    def cb(self) -> int:
        return 128 * self.num_warps


_CONFIGS = (  # H200, Llama-3-8B FFN shape, each alone (benchmarks/RESULTS.md, session 15)
    # M = 1 50.9 us: the light loops through the pipeliner, 516 units (one wave of 6 an SM)
    FusedConfig(32, 8, 4, 256, 256, num_warps=4, stages=3),
    # the same with x's quads a step ahead (ncu: 35% of the stalls waited on L1TEX, x's loads):
    # M = 1 47.9 against 48.7 us in one call
    FusedConfig(32, 8, 4, 256, 256, num_warps=4, stages=3, xpre=True),
    # M = 2-4: 71.9 us at M = 2, 108.7 us at M = 4
    FusedConfig(64, 16, 4, 256, 256, num_warps=4),
    # 516 units in one wave of 4 programs an SM: M = 1 54.0 us
    FusedConfig(32, 8, 4, 256, 256, num_warps=4, maxnreg=128),
    # M = 2 71.1 us
    FusedConfig(64, 16, 4, 256, 256, num_warps=4, maxnreg=128),
)
_INTERPRET_CONFIG = FusedConfig(32, 8, 4, 32, 32, num_warps=1)
_tuner = Tuner()


def _configs() -> tuple[FusedConfig, ...]:
    return (_INTERPRET_CONFIG,) if INTERPRET else _CONFIGS


def _config_ok(cfg: FusedConfig, w: SplitFFNWeights) -> bool:
    """Whether the kernel's shape rules hold for `cfg`: each lane's run of light up/gate steps is
    whole groups or lies inside one group, and a light unit lies inside one group of
    light_down; heavy units are whole dense row tiles."""
    if w.n_light:
        steps, ks = w.hidden_size // STEP, cfg.ks()
        if steps % ks:
            return False
        spl, spg = steps // ks, w.light_up.group_size // STEP
        if spl % spg and spg % spl:
            return False
        if w.light_down.group_size % cfg.nb or cfg.nb % STEP:
            return False
    return cfg.nbh % cfg.block_nd == 0


def applies(m: int, x: torch.Tensor, w: SplitFFNWeights) -> bool:
    """Whether M rows of x can take this path with w (any config fits)."""
    if not 1 <= m <= MAX_M or (w.n_heavy == 0 and w.n_light == 0):
        return False
    return any(_config_ok(c, w) for c in _configs())


def use(m: int, x: torch.Tensor, w: SplitFFNWeights, path: str) -> bool:
    """Whether `split_ffn` takes this path: path="fused" forces it (or says why it cannot run),
    "auto" takes it for M <= AUTO_MAX_M on a CUDA GPU when the shapes allow."""
    if path == "fused":
        if not applies(m, x, w):
            raise ValueError(
                f"kernel path 'fused' takes 1 to {MAX_M} rows and hidden sizes whose steps of 32 "
                "split into whole quantization groups per lane; use path='auto'"
            )
        return True
    return path == "auto" and ENABLED and m <= AUTO_MAX_M and x.is_cuda and applies(m, x, w)


def split_ffn(x2: torch.Tensor, w: SplitFFNWeights, out: torch.Tensor) -> None:
    """out [M, H] = the split FFN of x2 [M, H] (M <= MAX_M) in one launch."""
    m, hidden = x2.shape
    h, nl = w.n_heavy, w.n_light
    a = torch.empty((m, h + nl), dtype=x2.dtype, device=x2.device)
    hu = w.heavy_up.contiguous() if h else x2
    hg = w.heavy_gate.contiguous() if h and w.gated else hu
    hd = w.heavy_down if h else x2
    if h and hd.stride(-1) != 1:
        hd = hd.contiguous()
    if nl:
        up = w.light_up
        gate = w.light_gate if w.gated else up
        down = w.light_down
        light = up.kernel_args() + gate.kernel_args() + down.kernel_args()
        bits, group, sym = up.bits, up.group_size, up.symmetric
        dbits, dgroup, dsym = down.bits, down.group_size, down.symmetric
    else:  # never read (no light units), but typed like planes and scales
        dummy = torch.zeros(1, dtype=torch.int32, device=x2.device)
        light = [dummy, dummy, x2, x2] * 3
        bits, group, sym, dbits, dgroup, dsym = 4, 32, True, 4, 32, True
    half = x2.dtype != torch.float32
    bm = min(MAX_M, triton.next_power_of_2(m))
    acc = _zeroed(x2.device, bm * hidden, torch.float32)
    cnt = _zeroed(x2.device, 1, torch.int32)
    launch = pdl_options(x2.device)
    pdl = launch.pop("PDL")
    constexprs = dict(
        BITS=bits, GROUP=group, SYMMETRIC=sym, DBITS=dbits, DGROUP=dgroup, DSYMMETRIC=dsym,
        DUAL=w.gated, ACTIVATION=w.activation, HAS_UP_BIAS=w.up_bias is not None,
        HAS_GATE_BIAS=w.gated and w.gate_bias is not None,
        HAS_DOWN_BIAS=w.down_bias is not None, BM=bm,
        BLOCK_H=triton.next_power_of_2(hidden),
        FAST=half and bits == 4 and gemv.FAST_OK, DFAST=half and dbits == 4 and gemv.FAST_OK,
        # four 16-bit values a load: 8-byte aligned rows and light offset
        XVEC=half and gemv.XVEC_OK and x2.data_ptr() % 8 == 0 and x2.stride(0) % 4 == 0,
        AVEC=half and gemv.XVEC_OK and h % 4 == 0 and (h + nl) % 4 == 0, PDL=pdl,
    )  # fmt: skip
    biases = [t if t is not None else a for t in (w.up_bias, w.gate_bias, w.down_bias)]

    def run(cfg: FusedConfig) -> None:
        units = (triton.cdiv(h, cfg.nbh) if h else 0) + (triton.cdiv(nl, cfg.nb) if nl else 0)
        _fused_ffn_kernel[(units,)](
            x2, hu, hg, hd, *light, *biases, a, acc, cnt, out,
            m, hidden, h, nl, x2.stride(0), hu.stride(0), hd.stride(0), a.stride(0),
            out.stride(0), ONE_BITS,
            KS=cfg.ks(), NB=cfg.nb, CB=cfg.cb(), NBH=cfg.nbh, BLOCK_ND=cfg.block_nd,
            BLOCK_KD=cfg.block_kd, BR=cfg.br, STAGES=cfg.stages,
            XPRE=cfg.xpre and cfg.stages > 1 and bm == 1 and constexprs["FAST"]
            and constexprs["XVEC"],
            APRE=cfg.xpre and bm == 1 and constexprs["DFAST"] and constexprs["AVEC"],
            **constexprs,
            num_warps=cfg.num_warps, num_stages=1, maxnreg=cfg.maxnreg, **launch,
        )  # fmt: skip

    configs = tuple(c for c in _configs() if _config_ok(c, w))
    key = ("fused", m, hidden, h, nl, w.gated, x2.dtype, x2.device)
    key += (bits, group, sym, dbits, dgroup, dsym) if nl else ()
    run(_tuner.pick(key, configs, run))
