"""The split FFN at prefill sizes on Hopper (sm_90): kernels A and B as Gluon launches of warpgroup
MMAs (wgmma) over a gated FFN's heavy (fp16/bf16) and light (int4, groups of 64, 128, ...) parts.

Kernel A: a [M, h + l] = act(x G^T + gb) * (x U^T + ub), the heavy neurons first. Kernel B:
y [M, H] = a[:, :h] D_h^T + a[:, h:] D_l^T + db over K-slices (fp32 partials summed in slice
order by a second launch). A program owns 64 neurons or outputs (one warpgroup) and 128 rows;
those are the wgmma's M and N, so the accumulators hold transposed tiles and the weights are the
register A operand:

  * light words (the format's canonical order, no repacking): lane 4 g + t of each warp takes
    word row t of each 32-k block of columns g and g + 8 of its 16 neurons, which is exactly its
    wgmma A fragment once each word is turned into four fp16x2 (bf16x2) registers of (q - z) s
    (inline PTX: lop3 under the exponent of 1024 (128), sub, fma; 15 instructions a word;
    `convert_layout(..., assert_trivial=True)` proves nothing crosses threads). The words,
    scales and zeros of the next RING - 1 steps stream into shared memory by cp.async (nothing
    of them in registers), one CTA barrier a step;
  * heavy rows: 16 bytes a lane and row are their A fragment as loaded, loaded two steps ahead
    in registers;
  * x (kernel A's input, kernel B's `a`): in the k-slot order the fragments imply, one order for
    the light words and one for the heavy rows (`mma_decode.LIGHT_X_PERM` / `DENSE_X_PERM`:
    a permutation inside each 32-k block), read by TMA into a three-stage ring with an mbarrier
    a stage, where it is wgmma's B operand. Kernel A's x is permuted by two copies a call;
    within `split_ffn` kernel A's epilogue writes `a` in kernel B's orders, so B reads it in
    place;
  * a step is two half products (kernel A: up and gate on one x tile; kernel B: two 64-k tiles);
    each half's A operand is built while the other half's wgmma runs (`warpgroup_mma_wait(1)`).

H200, Llama-3-8B FFN (720 heavy + 13,632 int4 g128 neurons; benchmarks/RESULTS.md, session 25).
Kernel A at M = 256 119-124 us against the tl prefill tier's 163-165 and cuBLAS's dense up +
gate 94-96; ncu: the tensor pipe busy 65% of the active cycles (52.6% with the words loaded into
registers two steps ahead, whose loads were the warps' top stall). The whole layer (`ffnsplit
bench`) at M = 256 186.9 us, 0.85x dense fp16 (session start: 246-247, 0.64x); M = 384 285.7
(0.74x; was 355-356), M = 192 213-215 (0.60x; was 244-246), M = 512 361.9 (0.79x; was 406-407).
"auto" takes kernel A for MIN_M <= M <= MAX_M and kernel B for DOWN_MIN_M .. DOWN_MAX_M on
sm_90 (FFNSPLIT_WGMMA=0 / FFNSPLIT_WGMMA_DOWN=0: off). Gluon has no interpreter: these kernels
run on sm_90 GPUs only and are tested there (tests/test_wgmma_prefill.py); a CPU test compiles
both for sm_90 with the installed Triton.
"""

from __future__ import annotations

import os

import torch
import triton

from ffnsplit.kernels import mma_decode as md
from ffnsplit.kernels.format import QuantizedWeight, SplitFFNWeights
from ffnsplit.kernels.tiles import sm_count

gluon, gl = md.gluon, md.gl
_IMPORT_ERROR = md._IMPORT_ERROR
try:  # Hopper's warpgroup MMA, TMA and mbarriers, and the host-side tensor descriptor
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_init,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
except Exception as exc:  # pragma: no cover - depends on the installed Triton
    fence_async_shared = mbarrier = tma = TensorDescriptor = None
    warpgroup_mma = warpgroup_mma_init = warpgroup_mma_wait = None
    _IMPORT_ERROR = _IMPORT_ERROR or f"{type(exc).__name__}: {exc}"

ENABLED = os.environ.get("FFNSPLIT_WGMMA", "1") != "0"
# H200, Llama-3-8B FFN, `ffnsplit bench` (benchmarks/RESULTS.md, session 25), kernel A us with this
# path / without (the tl prefill tier to 319 rows, the dequant path from 320): M = 128 104.6 /
# 82.2 (one 128-row tile: the tl tier's one wave wins), 192 129 / 161, 256 119 / 163, 384 185 /
# 221, 512 241 / 269, 768 382 / 357, 1024 512 / 446: from 129 rows (two row tiles either way)
# to 576 (the crossover interpolates to ~640)
MIN_M = int(os.environ.get("FFNSPLIT_WGMMA_MIN_M", "129"))
MAX_M = int(os.environ.get("FFNSPLIT_WGMMA_MAX_M", "576"))
# kernel B (the down projection) by its own bounds (FFNSPLIT_WGMMA_DOWN=0: off). The same bench,
# the whole layer with kernel A here, kernel B here (reading kernel A's output in place) / by the
# tl prefill tier or the dequant path: M = 192 215.0 / 213.0 us, 256 186.9 / 204.8, 384 285.7 /
# 317.3, 512 385.5 / 361.9 (crossover interpolated ~460)
DOWN_ENABLED = os.environ.get("FFNSPLIT_WGMMA_DOWN", "1") != "0"
DOWN_MIN_M = int(os.environ.get("FFNSPLIT_WGMMA_DOWN_MIN_M", "193"))
DOWN_MAX_M = int(os.environ.get("FFNSPLIT_WGMMA_DOWN_MAX_M", "448"))
BT = 128  # rows of x a program
NUM_WARPS = 4  # one warpgroup: 64 neurons a program
RING = 4  # words-ring stages (3-8 within 2% of each other at M = 256-1024, session 25)


def available(device: torch.device) -> bool:
    """Whether this path can run on `device`: an sm_90 GPU with Gluon's Hopper ops."""
    if warpgroup_mma is None or gluon is None or device.type != "cuda":
        return False
    if md.INTERPRET or torch.version.hip is not None:
        return False
    return torch.cuda.get_device_capability(device) == (9, 0)


def _light_unsupported(q: QuantizedWeight) -> str | None:
    """Why a packed weight's format cannot be read by these kernels, or None."""
    if q.bits != 4 or q.group_size < 64 or q.group_size & (q.group_size - 1):
        return f"{q.bits}-bit weights in groups of {q.group_size} (int4, groups 64, 128, ...)"
    if not (q.planes[0].is_contiguous() and q.scales.is_contiguous()):
        return "non-contiguous packed planes or scales"
    if q.zeros is not None and (not q.zeros.is_contiguous() or q.zeros.dtype != q.scales.dtype):
        return "zeros not contiguous or not in the scales' dtype (one copy stages both)"
    return None


def unsupported(x2: torch.Tensor, w: SplitFFNWeights) -> str | None:
    """Why kernel A of `w` on rows like x2 cannot take this path, or None."""
    if x2.dtype not in (torch.float16, torch.bfloat16):
        return f"activations are {x2.dtype}, not fp16/bf16"
    if not w.gated or not w.n_light:
        return "a gated FFN with light neurons only"
    k = w.hidden_size
    if k % 32 or w.n_light % 16:  # the copies' alignment must be proven: multiples of 16
        return f"hidden size {k} (multiple of 32) or light count {w.n_light} (multiple of 16)"
    reason = _light_unsupported(w.light_up) or _light_unsupported(w.light_gate)
    if reason:
        return reason
    if w.n_heavy:
        hu, hg = w.heavy_up, w.heavy_gate
        if hu.stride(1) != 1 or hu.stride(0) % 8 or hg.stride() != hu.stride():
            return "heavy rows not 16-byte aligned rows of one stride"
    return None


def use(m: int, x2: torch.Tensor, w: SplitFFNWeights) -> bool:
    """Whether "auto" takes this path for kernel A of M rows like x2."""
    return (
        ENABLED
        and MIN_M <= m <= MAX_M
        and available(x2.device)
        and unsupported(x2, w) is None
    )  # fmt: skip


def down_unsupported(
    a2: torch.Tensor, heavy: torch.Tensor | None, light: QuantizedWeight | None
) -> str | None:
    """Why the down projection a2 [M, kh + kl] -> [M, N] over heavy [N, kh] and light [N, kl]
    cannot take kernel B here, or None."""
    if a2.dtype not in (torch.float16, torch.bfloat16):
        return f"activations are {a2.dtype}, not fp16/bf16"
    if light is None:
        return "light columns only"
    reason = _light_unsupported(light)
    if reason:
        return reason
    n = light.shape[0]
    if n % 16:  # the words' 16-byte and the scales' 4-byte copies need it proven
        return f"{n} outputs (a multiple of 16)"
    if heavy is not None and (heavy.dtype != a2.dtype or heavy.stride(1) != 1
                              or heavy.stride(0) % 8):  # fmt: skip
        return "heavy rows not 16-byte aligned rows in the activations' dtype"
    return None


def use_down(m: int, a2: torch.Tensor, w: SplitFFNWeights) -> bool:
    """Whether "auto" takes this path for the down projection of M rows like a2."""
    return (
        DOWN_ENABLED
        and DOWN_MIN_M <= m <= DOWN_MAX_M
        and available(a2.device)
        and down_unsupported(a2, w.heavy_down if w.n_heavy else None,
                             w.light_down if w.n_light else None) is None
    )  # fmt: skip


def heavy_cols(nh: int) -> int:
    """Columns of the heavy part in kernel B's x: whole 32-k blocks (their permutation's unit)."""
    return triton.cdiv(nh, 32) * 32


def down_splits(m: int, n: int, sms: int, per_sm: int = 2) -> int:
    """K-slices of kernel B: as many as fill one wave of `per_sm` programs an SM (at least one,
    at most 8): a partial last wave of these programs costs about a full one."""
    tiles = triton.cdiv(n, 16 * NUM_WARPS) * triton.cdiv(m, BT)
    return max(1, min(8, per_sm * sms // tiles))


def permute_x(x: torch.Tensor, dense: bool = False) -> torch.Tensor:
    """x [M, K] (K a multiple of 32) with each 32-k block in the light fragments' k-slot order
    (`dense`: the heavy rows' order), contiguous: what the TMA copies read."""
    m, k = x.shape
    perm = md.DENSE_X_PERM if dense else md.LIGHT_X_PERM
    return x.reshape(m, k // 32, 4, 2, 2, 2).permute(*perm).reshape(m, k).contiguous()


def _dequant_asm(magic: str, kind: str) -> str:
    """Inline PTX: one word (given twice: pack=2), a column's scale s and b = -z s (two halves
    each) -> the four A fragment registers of its lane, register j = ((MAGIC + q) - MAGIC) s + b
    for the codes at nibbles (j, j + 4): exact codes, one rounding of q s + b. MAGIC is the
    exponent of 1024 (fp16) or 128 (bf16) that the codes land under."""
    lines = ["{", ".reg .b32 t, u, m;", f"mov.b32 m, {magic};"]
    for j in range(4):
        word = "$4" if j == 0 else "u"
        if j:
            lines.append(f"shr.u32 u, $4, {4 * j};")
        lines += [
            f"lop3.b32 t, {word}, 0x000f000f, {magic}, 0xea;",
            f"sub.{kind} t, t, m;",
            f"fma.rn.{kind} ${j}, t, $6, $7;",
        ]
    return "\n".join([*lines, "}"])


if gluon is not None and warpgroup_mma is not None:
    # TMA global -> shared: async_copy_global_to_shared up to 3.6, async_load later
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    _ASM_DQ_F16 = gl.constexpr(_dequant_asm("0x64006400", "f16x2"))
    # bf16: 128 + q (7 mantissa bits), the same steps (sub.bf16x2: sm_90)
    _ASM_DQ_BF16 = gl.constexpr(_dequant_asm("0x43004300", "bf16x2"))
    # [b, t1, t0, n, i0, i1, i2] -> [n, b, i2, i1, t1, t0, i0]: slot 32 b + 16 i2 + 8 i1 + 2 t + i0
    # holds k = 32 b + 8 t + i1 + 2 i2 + 4 i0 (mma_decode.CODE_PERM_A with the block bit on top)
    _A_PERM = gl.constexpr((3, 0, 6, 5, 1, 2, 4))

    @gluon.jit
    def _fragments(w, s, b, DTYPE: gl.constexpr, A_LAYOUT: gl.constexpr):
        """Words [8 (two 32-k blocks of 4 rows), BN] and per-column s, b [BN] -> the dequantized
        A operand [BN, 64 k-slots] in wgmma's register layout (a trivial conversion)."""
        sb, _ = gl.broadcast(s[None, :], w)
        bb, _ = gl.broadcast(b[None, :], w)
        if gl.float16 == DTYPE:
            p0, p1, p2, p3 = gl.inline_asm_elementwise(
                _ASM_DQ_F16, "=r,=r,=r,=r,r,r,r,r", [gl.join(w, w), gl.join(sb, sb),
                                                     gl.join(bb, bb)],
                dtype=(gl.float16, gl.float16, gl.float16, gl.float16), is_pure=True, pack=2,
            )  # fmt: skip
        else:
            p0, p1, p2, p3 = gl.inline_asm_elementwise(
                _ASM_DQ_BF16, "=r,=r,=r,=r,r,r,r,r", [gl.join(w, w), gl.join(sb, sb),
                                                      gl.join(bb, bb)],
                dtype=(gl.bfloat16, gl.bfloat16, gl.bfloat16, gl.bfloat16), is_pure=True, pack=2,
            )  # fmt: skip
        t = gl.join(gl.join(p0, p1), gl.join(p2, p3))  # [r, n, i0, i1, i2]
        n: gl.constexpr = w.shape[1]
        t = gl.reshape(t, [2, 2, 2, n, 2, 2, 2])  # [b, t1, t0, n, i0, i1, i2]
        t = gl.reshape(gl.permute(t, _A_PERM.value), [n, 64])
        return gl.convert_layout(t, A_LAYOUT, assert_trivial=True)

    @gluon.jit
    def _prep(s, z, SYMMETRIC: gl.constexpr, DTYPE: gl.constexpr):
        """(s, b = -z s) in DTYPE for `_fragments` (z = 8 for SYMMETRIC)."""
        sf = s.to(gl.float32)
        if SYMMETRIC:  # noqa: SIM108 (a compile-time branch)
            b = -8.0 * sf
        else:
            b = -z.to(gl.float32) * sf
        return sf.to(DTYPE), b.to(DTYPE)

    @gluon.jit
    def _heavy_rows(h_ptr, h_off, h_rows, i, K, n_mask):
        """Heavy fp16/bf16 rows of step i (64 k): [8 (32-k block b, lane t: 4 b + t), BN, 8]
        holding k = 64 i + 8 (4 b + t) + c, 16 bytes a lane and row (k past K read as 0)."""
        k = i * 64 + h_rows
        return gl.load(h_ptr + h_off + i * 64, mask=n_mask & (k < K), other=0.0)

    @gluon.jit
    def _heavy_offsets(n0, N, stride_h, BN: gl.constexpr, H_L: gl.constexpr):
        """Heavy rows n0 .. n0 + BN (row stride stride_h) as [8 (4 b + t), BN, 8 (c)] tiles:
        their k offsets 8 (4 b + t) + c, the rows' mask (rows past N), the offsets into the
        weight, and the rows."""
        hr = gl.arange(0, 8, layout=gl.SliceLayout(1, gl.SliceLayout(2, H_L)))
        hn = n0 + gl.arange(0, BN, layout=gl.SliceLayout(0, gl.SliceLayout(2, H_L)))
        hc = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, H_L)))
        w_rows = (hr * 8)[:, None][:, :, None] + hc[None, :][:, None, :]
        n3 = hn[None, :][:, :, None]
        return w_rows, n3 < N, n3 * stride_h + w_rows, hn

    @gluon.jit
    def _heavy_fragments(h, A3: gl.constexpr):
        """Heavy rows [8, BN, 8] -> the A operand [BN, 64 k-slots] as loaded: slot
        32 b + 16 i2 + 8 i1 + 2 t + i0 holds k = 32 b + 8 t + 4 i2 + 2 i1 + i0 (the dense rows'
        order, mma_decode.DENSE_X_PERM: x is permuted the same way), a trivial conversion."""
        bn: gl.constexpr = h.shape[1]
        t = gl.reshape(h, [2, 4, bn, 2, 2, 2])  # [b, t, n, i2, i1, i0]
        t = gl.reshape(gl.permute(t, (2, 0, 3, 4, 1, 5)), [bn, 64])
        return gl.convert_layout(t, A3, assert_trivial=True)

    @gluon.jit
    def _tma_x(x_desc, bars, x_smem, i, last, m0):
        """Step i's x tile [BT, 64] (pre-permuted in memory) by TMA into ring stage i % 3,
        signalled on that stage's mbarrier; nothing past the last step."""
        st = i % 3
        bar = bars.index(st)
        go = i <= last
        mbarrier.expect(bar, x_smem.shape[1] * 64 * 2, pred=go)
        _tma_load(x_desc, [m0, i * 64], bar, x_smem.index(st), pred=go)

    @gluon.jit
    def _x_ring(x_desc, last, m0, DTYPE: gl.constexpr, BT: gl.constexpr):
        """x's three-stage TMA ring, its mbarriers, and the copies of steps 0 and 1."""
        XSL: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16,
                                                 rank=2)  # fmt: skip
        x_smem = gl.allocate_shared_memory(DTYPE, [3, BT, 64], XSL)
        bars = gl.allocate_shared_memory(gl.int64, [3, 1], mbarrier.MBarrierLayout())
        for sb in gl.static_range(3):
            mbarrier.init(bars.index(sb), count=1)
        fence_async_shared()
        _tma_x(x_desc, bars, x_smem, 0, last, m0)
        _tma_x(x_desc, bars, x_smem, 1, last, m0)
        return x_smem, bars

    @gluon.jit
    def _x_operand(x_smem, bars, i):
        """Wait for step i's x stage; the B operand [64 k, BT] (a transposed view)."""
        st = i % 3
        mbarrier.wait(bars.index(st), (i // 3) & 1)
        return x_smem.index(st).permute((1, 0))

    @gluon.jit
    def _ring_issue(wu_smem, wg_smem, s_smem, i, last, st, pu, pg, ps, ru, rg, w_ok, s_ok, sh, N,
                    KR, G, GROUP: gl.constexpr, RS: gl.constexpr):  # fmt: skip
        """Words ring: cp.async of step min(i, last)'s two [8 word rows, BN] word tiles (16 bytes
        a thread: pu, pg point at them in step 0, their rows are ru, rg; RS word rows a step)
        and of its halves' scales and zeros ([4 BN], 4 bytes a thread: ps at group 0, sh the
        k offset of each element's half) into stage st (rows past KR, columns past N and groups
        past G zero-filled): nothing of it passes through registers. Kernel A: up and gate of
        the same 64 k (RS 8); kernel B: k and k + 64 of one weight (RS 16)."""
        j = gl.minimum(i, last)
        md._async_load(wu_smem.index(st), pu + j * RS * N,
                       mask=((j * RS + ru) < KR)[:, None] & w_ok)  # fmt: skip
        md._async_load(wg_smem.index(st), pg + j * RS * N,
                       mask=((j * RS + rg) < KR)[:, None] & w_ok)  # fmt: skip
        g = (j * RS * 8 + sh) // GROUP
        md._async_load(s_smem.index(st), ps + g * N, mask=s_ok & (g < G))

    @gluon.jit
    def _ring_take(wu_smem, wg_smem, s_smem, st, i_next, st_next, last, pu, pg, ps, ru, rg, w_ok,
                   s_ok, sh, N, KR, G, SYMMETRIC: gl.constexpr, GROUP: gl.constexpr,
                   DTYPE: gl.constexpr, BN: gl.constexpr, W_L: gl.constexpr, WR: gl.constexpr,
                   RS: gl.constexpr):  # fmt: skip
        """A step's words and (scale, b) pairs from words-ring stage st: wait for this thread's
        copies of it, one CTA barrier (everyone's copies visible, everyone done reading the
        stage before), refill that earlier stage (st_next) with step i_next, read stage st."""
        SV: gl.constexpr = gl.SliceLayout(0, W_L)
        md.async_copy.wait_group(WR - 2)
        md._barrier()
        _ring_issue(wu_smem, wg_smem, s_smem, i_next, last, st_next, pu, pg, ps, ru, rg, w_ok,
                    s_ok, sh, N, KR, G, GROUP, RS)  # fmt: skip
        md.async_copy.commit_group()
        h0 = wu_smem.index(st).load(W_L)
        h1 = wg_smem.index(st).load(W_L)
        sv = s_smem.index(st)
        ps0, pb0 = _prep(sv.slice(0, BN).load(SV), sv.slice(BN, BN).load(SV), SYMMETRIC, DTYPE)
        ps1, pb1 = _prep(sv.slice(2 * BN, BN).load(SV), sv.slice(3 * BN, BN).load(SV), SYMMETRIC,
                         DTYPE)  # fmt: skip
        return h0, h1, ps0, pb0, ps1, pb1

    @gluon.jit
    def _ring_step(i, last, acc0, acc1, a1, wu_smem, wg_smem, s_smem, x_smem, bars, x_desc, m0,
                   pu, pg, ps, w_rows, w_ok, s_ok, sh, N, KR, G, SYMMETRIC: gl.constexpr,
                   GROUP: gl.constexpr, DTYPE: gl.constexpr, BN: gl.constexpr,
                   A3: gl.constexpr, W_L: gl.constexpr, WR: gl.constexpr):  # fmt: skip
        """Step i of a light tile: wait for this thread's copies of step i, one CTA barrier
        (everyone's copies visible, everyone done reading step i - 1's stage), refill that
        stage with step i + WR - 1, read step i's words and scales from shared memory; then
        up's half product is built and issued while gate's of step i - 1 runs, and the other
        way round."""
        h0, h1, ps0, pb0, ps1, pb1 = _ring_take(
            wu_smem, wg_smem, s_smem, i % WR, i + WR - 1, (i + WR - 1) % WR, last, pu, pg, ps,
            w_rows, w_rows, w_ok, s_ok, sh, N, KR, G, SYMMETRIC, GROUP, DTYPE, BN, W_L, WR,
            8)  # fmt: skip
        b = _x_operand(x_smem, bars, i)
        a0 = _fragments(h0, ps0, pb0, DTYPE, A3)
        acc0 = warpgroup_mma(a0, b, acc0, is_async=True)
        acc1, a1 = warpgroup_mma_wait(num_outstanding=1, deps=[acc1, a1])
        _tma_x(x_desc, bars, x_smem, i + 2, last, m0)  # step i - 1 read that stage: done
        a1 = _fragments(h1, ps1, pb1, DTYPE, A3)
        acc1 = warpgroup_mma(a1, b, acc1, is_async=True)
        acc0, a0 = warpgroup_mma_wait(num_outstanding=1, deps=[acc0, a0])
        return acc0, acc1, a1

    @gluon.jit
    def _up_gate_scales(s_ptr, z_ptr, t_ptr, u_ptr, n0, N, BN: gl.constexpr, S_L: gl.constexpr):
        """Kernel A's scales ring row [4 BN]: pointers to up's scales and zeros (s, z) and
        gate's (t, u) of neurons n0 .. n0 + BN at group 0, their mask (neurons past N), and
        zeros in the row's layout (one group a step: no k offset)."""
        e = gl.arange(0, 4 * BN, layout=S_L)  # up scale, up zero, gate scale, gate zero
        sr = e // BN
        sc = n0 + e % BN
        ps = gl.where(sr == 0, s_ptr + sc, gl.where(sr == 1, z_ptr + sc,
                      gl.where(sr == 2, t_ptr + sc, u_ptr + sc)))  # fmt: skip
        return ps, sc < N, e * 0

    @gluon.jit
    def _light_tile(x_desc, p_ptr, s_ptr, z_ptr, q_ptr, t_ptr, u_ptr, N, K, n0, m0,
                    SYMMETRIC: gl.constexpr, GROUP: gl.constexpr, DTYPE: gl.constexpr,
                    BT: gl.constexpr, V3: gl.constexpr, W_L: gl.constexpr, C_L: gl.constexpr,
                    S_L: gl.constexpr, WR: gl.constexpr, num_warps: gl.constexpr):  # fmt: skip
        """up and gate [BN, BT] of light neurons n0 .. n0 + BN (their words p / q, scales s / t,
        zeros z / u) for rows m0 .. m0 + BT."""
        BN: gl.constexpr = 16 * num_warps
        A3: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=V3, k_width=2)
        # lane 4 g + t reads word rows t, t + 4 of columns g, g + 8: 8-word vectors swizzled by
        # row, so a warp's reads hit distinct banks and the 16-byte copies stay whole
        WS: gl.constexpr = gl.SwizzledSharedLayout(vec=8, per_phase=1, max_phase=4,
                                                   order=[1, 0])  # fmt: skip
        SS: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0])
        last = gl.cdiv(K, 64) - 1
        KR = K // 8
        G = gl.cdiv(K, GROUP)
        wu_smem = gl.allocate_shared_memory(gl.int32, [WR, 8, BN], WS)
        wg_smem = gl.allocate_shared_memory(gl.int32, [WR, 8, BN], WS)
        # scales and zeros as stored (fp16 also under bf16 activations: `_prep` converts them)
        s_smem = gl.allocate_shared_memory(s_ptr.dtype.element_ty, [WR, 4 * BN], SS)
        # the ring's source pointers at step 0 (each step adds its own offset)
        w_rows = gl.arange(0, 8, layout=gl.SliceLayout(1, C_L))
        w_cols = n0 + gl.arange(0, BN, layout=gl.SliceLayout(0, C_L))
        w_off = w_rows[:, None] * N + w_cols[None, :]
        w_ok = (w_cols < N)[None, :]
        pu = p_ptr + w_off
        pg = q_ptr + w_off
        ps, s_ok, sh = _up_gate_scales(s_ptr, z_ptr, t_ptr, u_ptr, n0, N, BN, S_L)
        for j in gl.static_range(WR - 1):
            _ring_issue(wu_smem, wg_smem, s_smem, j, last, j, pu, pg, ps, w_rows, w_rows, w_ok,
                        s_ok, sh, N, KR, G, GROUP, 8)  # fmt: skip
            md.async_copy.commit_group()
        x_smem, bars = _x_ring(x_desc, last, m0, DTYPE, BT)

        acc0 = gl.zeros([BN, BT], gl.float32, layout=V3)
        acc1 = warpgroup_mma_init(gl.zeros([BN, BT], gl.float32, layout=V3))
        a1 = gl.zeros([BN, 64], DTYPE, layout=A3)
        for i in range(0, last, 2):  # two steps an iteration: ptxas keeps the wgmmas async
            acc0, acc1, a1 = _ring_step(i, last, acc0, acc1, a1, wu_smem, wg_smem, s_smem,
                                        x_smem, bars, x_desc, m0, pu, pg, ps, w_rows, w_ok, s_ok,
                                        sh, N, KR, G, SYMMETRIC, GROUP, DTYPE, BN, A3, W_L,
                                        WR)  # fmt: skip
            acc0, acc1, a1 = _ring_step(i + 1, last, acc0, acc1, a1, wu_smem, wg_smem, s_smem,
                                        x_smem, bars, x_desc, m0, pu, pg, ps, w_rows, w_ok, s_ok,
                                        sh, N, KR, G, SYMMETRIC, GROUP, DTYPE, BN, A3, W_L,
                                        WR)  # fmt: skip
        if last % 2 == 0:
            acc0, acc1, a1 = _ring_step(last, last, acc0, acc1, a1, wu_smem, wg_smem, s_smem,
                                        x_smem, bars, x_desc, m0, pu, pg, ps, w_rows, w_ok, s_ok,
                                        sh, N, KR, G, SYMMETRIC, GROUP, DTYPE, BN, A3, W_L,
                                        WR)  # fmt: skip
        acc1, a1 = warpgroup_mma_wait(num_outstanding=0, deps=[acc1, a1])
        md.async_copy.wait_group(0)
        return acc0, acc1

    @gluon.jit
    def _heavy_step(i, last, acc0, acc1, a1, h0, h1, x_smem, bars, x_desc, m0, hu_ptr, hg_ptr,
                    w_off, w_rows, w_mask, K, A3: gl.constexpr):  # fmt: skip
        """Step i of a heavy tile (rows as loaded, two steps ahead in registers)."""
        b = _x_operand(x_smem, bars, i)
        a0 = _heavy_fragments(h0, A3)
        acc0 = warpgroup_mma(a0, b, acc0, is_async=True)
        acc1, a1 = warpgroup_mma_wait(num_outstanding=1, deps=[acc1, a1])
        _tma_x(x_desc, bars, x_smem, i + 2, last, m0)
        a1 = _heavy_fragments(h1, A3)
        acc1 = warpgroup_mma(a1, b, acc1, is_async=True)
        nxt = gl.minimum(i + 2, last)  # clamped: the last steps load their own rows again
        h0 = _heavy_rows(hu_ptr, w_off, w_rows, nxt, K, w_mask)
        h1 = _heavy_rows(hg_ptr, w_off, w_rows, nxt, K, w_mask)
        acc0, a0 = warpgroup_mma_wait(num_outstanding=1, deps=[acc0, a0])
        return acc0, acc1, a1, h0, h1

    @gluon.jit
    def _heavy_tile(x_desc, hu_ptr, hg_ptr, N, K, stride_h, n0, m0, DTYPE: gl.constexpr,
                    BT: gl.constexpr, V3: gl.constexpr, H_L: gl.constexpr,
                    num_warps: gl.constexpr):  # fmt: skip
        """up and gate [BN, BT] of heavy neurons n0 .. n0 + BN (rows of hu, hg with row stride
        stride_h) for rows m0 .. m0 + BT (x in the dense rows' order)."""
        BN: gl.constexpr = 16 * num_warps
        A3: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=V3, k_width=2)
        last = gl.cdiv(K, 64) - 1
        w_rows, w_mask, w_off, _ = _heavy_offsets(n0, N, stride_h, BN, H_L)
        x_smem, bars = _x_ring(x_desc, last, m0, DTYPE, BT)
        hA0 = _heavy_rows(hu_ptr, w_off, w_rows, 0, K, w_mask)
        hA1 = _heavy_rows(hg_ptr, w_off, w_rows, 0, K, w_mask)
        nxt = gl.minimum(1, last)
        hB0 = _heavy_rows(hu_ptr, w_off, w_rows, nxt, K, w_mask)
        hB1 = _heavy_rows(hg_ptr, w_off, w_rows, nxt, K, w_mask)

        acc0 = gl.zeros([BN, BT], gl.float32, layout=V3)
        acc1 = warpgroup_mma_init(gl.zeros([BN, BT], gl.float32, layout=V3))
        a1 = gl.zeros([BN, 64], DTYPE, layout=A3)
        for i in range(0, last, 2):
            acc0, acc1, a1, hA0, hA1 = _heavy_step(i, last, acc0, acc1, a1, hA0, hA1, x_smem,
                                                   bars, x_desc, m0, hu_ptr, hg_ptr, w_off,
                                                   w_rows, w_mask, K, A3)  # fmt: skip
            acc0, acc1, a1, hB0, hB1 = _heavy_step(i + 1, last, acc0, acc1, a1, hB0, hB1, x_smem,
                                                   bars, x_desc, m0, hu_ptr, hg_ptr, w_off,
                                                   w_rows, w_mask, K, A3)  # fmt: skip
        if last % 2 == 0:
            acc0, acc1, a1, hA0, hA1 = _heavy_step(last, last, acc0, acc1, a1, hA0, hA1, x_smem,
                                                   bars, x_desc, m0, hu_ptr, hg_ptr, w_off,
                                                   w_rows, w_mask, K, A3)  # fmt: skip
        acc1, a1 = warpgroup_mma_wait(num_outstanding=0, deps=[acc1, a1])
        return acc0, acc1

    @gluon.jit
    def _store(acc0, acc1, out_ptr, ub_ptr, gb_ptr, n0, m0, N, NS, M, stride_om, out_col,
               ACTIVATION: gl.constexpr, HAS_UP_BIAS: gl.constexpr,
               HAS_GATE_BIAS: gl.constexpr, BN: gl.constexpr, BT: gl.constexpr,
               O_L: gl.constexpr, PERM: gl.constexpr):  # fmt: skip
        """out[m, out_col + c(n)] = act(gate + gb) * (up + ub) of [BN, BT] tiles (N neurons,
        columns up to NS written: the ones past N get act(0) * 0 = 0), n fastest. c(n) = n, or
        with PERM 1 / 2 n's slot in its 32-k block in the light words' / heavy rows' order
        (`permute_x`): kernel B's x, written in place."""
        on = n0 + gl.arange(0, BN, layout=gl.SliceLayout(1, O_L))
        om = m0 + gl.arange(0, BT, layout=gl.SliceLayout(0, O_L))
        up = gl.convert_layout(acc0, O_L)
        gate = gl.convert_layout(acc1, O_L)
        if HAS_UP_BIAS:
            up += gl.load(ub_ptr + on, mask=on < N, other=0.0).to(gl.float32)[:, None]
        if HAS_GATE_BIAS:
            gate += gl.load(gb_ptr + on, mask=on < N, other=0.0).to(gl.float32)[:, None]
        res = md._act(gate, ACTIVATION) * up
        col = on
        if PERM > 0:  # k = 8 t + 4 j2 + 2 j1 + j0 of a 32-k block -> its slot
            r = on % 32
            t = (r >> 3) & 3
            j2 = (r >> 2) & 1
            j1 = (r >> 1) & 1
            j0 = r & 1
            if PERM == 1:  # noqa: SIM108 (compile-time)
                slot = (j1 << 4) | (j0 << 3) | (t << 1) | j2
            else:
                slot = (j2 << 4) | (j1 << 3) | (t << 1) | j0
            col = on - r + slot
        ptrs = out_ptr + om[None, :] * stride_om + (out_col + col)[:, None]
        mask = (on < NS)[:, None] & (om < M)[None, :]
        gl.store(ptrs, res.to(out_ptr.dtype.element_ty), mask=mask)

    @gluon.jit
    def _up_kernel(xl_desc, xd_desc, hu_ptr, hg_ptr, p_ptr, s_ptr, z_ptr, q_ptr, t_ptr, u_ptr,
                   out_ptr, ub_ptr, gb_ptr, M, NH, NL, K, stride_h, stride_om, NHS,
                   SYMMETRIC: gl.constexpr, GROUP: gl.constexpr, ACTIVATION: gl.constexpr,
                   HAS_UP_BIAS: gl.constexpr, HAS_GATE_BIAS: gl.constexpr, DTYPE: gl.constexpr,
                   BT: gl.constexpr, V3: gl.constexpr, W_L: gl.constexpr, O_L: gl.constexpr,
                   H_L: gl.constexpr, C_L: gl.constexpr, S_L: gl.constexpr, WR: gl.constexpr,
                   num_warps: gl.constexpr, PERM: gl.constexpr = False):  # fmt: skip
        """Kernel A: out[:, :NH] from the heavy rows (hu, hg [NH, K], row stride stride_h; x
        in the dense rows' order behind xd_desc), out[:, NH:] from the light words (x in the
        light order behind xl_desc). Heavy tiles are the first programs along axis 0 (they are
        the longest); [BN = 64 neurons, BT rows] a program, rows program_id(1) * BT. PERM: out is
        kernel B's x instead, [:, :NHS] the heavy part in the heavy rows' k order (zeros past NH
        up to NHS, a multiple of 32), [:, NHS:] the light part in the light order."""
        BN: gl.constexpr = 16 * num_warps
        heavy_tiles = gl.cdiv(NH, BN)
        pid = gl.program_id(0)
        m0 = gl.program_id(1) * BT
        if pid < heavy_tiles:
            n0 = pid * BN
            acc0, acc1 = _heavy_tile(xd_desc, hu_ptr, hg_ptr, NH, K, stride_h, n0, m0, DTYPE,
                                     BT, V3, H_L, num_warps)  # fmt: skip
            _store(acc0, acc1, out_ptr, ub_ptr, gb_ptr, n0, m0, NH, NHS, M, stride_om, 0,
                   ACTIVATION, HAS_UP_BIAS, HAS_GATE_BIAS, BN, BT, O_L,
                   2 if PERM else 0)  # fmt: skip
        else:
            n0 = (pid - heavy_tiles) * BN
            acc0, acc1 = _light_tile(xl_desc, p_ptr, s_ptr, z_ptr, q_ptr, t_ptr, u_ptr, NL, K,
                                     n0, m0, SYMMETRIC, GROUP, DTYPE, BT, V3, W_L, C_L, S_L, WR,
                                     num_warps)  # fmt: skip
            _store(acc0, acc1, out_ptr, ub_ptr + NH, gb_ptr + NH, n0, m0, NL, NL, M, stride_om,
                   NHS, ACTIVATION, HAS_UP_BIAS, HAS_GATE_BIAS, BN, BT, O_L,
                   1 if PERM else 0)  # fmt: skip

    # ---- kernel B: the down projection over [heavy | light] K, in K-slices ------------------

    @gluon.jit
    def _x_fetch(xl_desc, xd_desc, bars, x_smem, u, n_tiles, nh2, kh0, kl0, m0):
        """Kernel B: x tile u of the program's range (its first nh2 tiles heavy, read from
        xd_desc at column kh0 + 64 u, the rest light, from xl_desc) into ring stage u % 3."""
        st = u % 3
        bar = bars.index(st)
        go = u < n_tiles
        mbarrier.expect(bar, x_smem.shape[1] * 64 * 2, pred=go)
        _tma_load(xd_desc, [m0, kh0 + u * 64], bar, x_smem.index(st), pred=go & (u < nh2))
        _tma_load(xl_desc, [m0, kl0 + (u - nh2) * 64], bar, x_smem.index(st),
                  pred=go & (u >= nh2))  # fmt: skip

    @gluon.jit
    def _down_heavy_step(t, last, u, acc0, acc1, a1, h0, h1, x_smem, bars, xl_desc, xd_desc,
                         n_tiles, nh2, kh0, kl0, m0, h_ptr, w_off, w_rows, w_mask, K,
                         A3: gl.constexpr):  # fmt: skip
        """Kernel B, heavy pair-step t (k 128 t .. 128 t + 127: tiles u, u + 1); its rows were
        loaded two pair-steps ahead. After each half's wait the stage the other half's product
        read is refilled (3 stages, tiles two ahead)."""
        b = _x_operand(x_smem, bars, u)
        a0 = _heavy_fragments(h0, A3)
        acc0 = warpgroup_mma(a0, b, acc0, is_async=True)
        acc1, a1 = warpgroup_mma_wait(num_outstanding=1, deps=[acc1, a1])
        _x_fetch(xl_desc, xd_desc, bars, x_smem, u + 2, n_tiles, nh2, kh0, kl0, m0)
        b = _x_operand(x_smem, bars, u + 1)
        a1 = _heavy_fragments(h1, A3)
        acc1 = warpgroup_mma(a1, b, acc1, is_async=True)
        nxt = gl.minimum(t + 2, last)  # clamped: the last steps load their own rows again
        h0 = _heavy_rows(h_ptr, w_off, w_rows, 2 * nxt, K, w_mask)
        h1 = _heavy_rows(h_ptr, w_off, w_rows, 2 * nxt + 1, K, w_mask)
        acc0, a0 = warpgroup_mma_wait(num_outstanding=1, deps=[acc0, a0])
        _x_fetch(xl_desc, xd_desc, bars, x_smem, u + 3, n_tiles, nh2, kh0, kl0, m0)
        return acc0, acc1, a1, h0, h1

    @gluon.jit
    def _down_heavy(acc0, acc1, t_lo, t_hi, x_smem, bars, xl_desc, xd_desc, n_tiles, nh2, kh0,
                    kl0, m0, h_ptr, N, K, stride_h, n0, DTYPE: gl.constexpr, V3: gl.constexpr,
                    H_L: gl.constexpr, num_warps: gl.constexpr):  # fmt: skip
        """Kernel B's heavy pair-steps t_lo .. t_hi - 1 (rows of h [N outputs, K heavy],
        row stride stride_h) added to acc0, acc1 (x tiles 0 .. 2 (t_hi - t_lo) - 1)."""
        BN: gl.constexpr = 16 * num_warps
        A3: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=V3, k_width=2)
        w_rows, w_mask, w_off, _ = _heavy_offsets(n0, N, stride_h, BN, H_L)
        last = t_hi - 1
        hA0 = _heavy_rows(h_ptr, w_off, w_rows, 2 * t_lo, K, w_mask)
        hA1 = _heavy_rows(h_ptr, w_off, w_rows, 2 * t_lo + 1, K, w_mask)
        nxt = gl.minimum(t_lo + 1, last)
        hB0 = _heavy_rows(h_ptr, w_off, w_rows, 2 * nxt, K, w_mask)
        hB1 = _heavy_rows(h_ptr, w_off, w_rows, 2 * nxt + 1, K, w_mask)
        acc1 = warpgroup_mma_init(acc1)
        a1 = gl.zeros([BN, 64], DTYPE, layout=A3)
        for t in range(t_lo, last, 2):
            u = 2 * (t - t_lo)
            acc0, acc1, a1, hA0, hA1 = _down_heavy_step(
                t, last, u, acc0, acc1, a1, hA0, hA1, x_smem, bars, xl_desc, xd_desc, n_tiles,
                nh2, kh0, kl0, m0, h_ptr, w_off, w_rows, w_mask, K, A3)  # fmt: skip
            acc0, acc1, a1, hB0, hB1 = _down_heavy_step(
                t + 1, last, u + 2, acc0, acc1, a1, hB0, hB1, x_smem, bars, xl_desc, xd_desc,
                n_tiles, nh2, kh0, kl0, m0, h_ptr, w_off, w_rows, w_mask, K, A3)  # fmt: skip
        if (last - t_lo) % 2 == 0:
            acc0, acc1, a1, hA0, hA1 = _down_heavy_step(
                last, last, 2 * (last - t_lo), acc0, acc1, a1, hA0, hA1, x_smem, bars, xl_desc,
                xd_desc, n_tiles, nh2, kh0, kl0, m0, h_ptr, w_off, w_rows, w_mask, K,
                A3)  # fmt: skip
        acc1, a1 = warpgroup_mma_wait(num_outstanding=0, deps=[acc1, a1])
        return acc0, acc1

    @gluon.jit
    def _down_light_step(t, t_lo, last, u, acc0, acc1, a1, wu_smem, wg_smem, s_smem, x_smem,
                         bars, xl_desc, xd_desc, n_tiles, nh2, kh0, kl0, m0, pu, pg, ps, ru, rg,
                         w_ok, s_ok, sh, N, KR, G, SYMMETRIC: gl.constexpr,
                         GROUP: gl.constexpr, DTYPE: gl.constexpr, BN: gl.constexpr,
                         A3: gl.constexpr, W_L: gl.constexpr, WR: gl.constexpr):  # fmt: skip
        """Kernel B, light pair-step t (word rows 16 t .. 16 t + 15: tiles u, u + 1) from the
        words ring (as kernel A's `_ring_step`)."""
        h0, h1, ps0, pb0, ps1, pb1 = _ring_take(
            wu_smem, wg_smem, s_smem, (t - t_lo) % WR, t + WR - 1, (t - t_lo + WR - 1) % WR, last,
            pu, pg, ps, ru, rg, w_ok, s_ok, sh, N, KR, G, SYMMETRIC, GROUP, DTYPE, BN, W_L, WR,
            16)  # fmt: skip
        b = _x_operand(x_smem, bars, u)
        a0 = _fragments(h0, ps0, pb0, DTYPE, A3)
        acc0 = warpgroup_mma(a0, b, acc0, is_async=True)
        acc1, a1 = warpgroup_mma_wait(num_outstanding=1, deps=[acc1, a1])
        _x_fetch(xl_desc, xd_desc, bars, x_smem, u + 2, n_tiles, nh2, kh0, kl0, m0)
        b = _x_operand(x_smem, bars, u + 1)
        a1 = _fragments(h1, ps1, pb1, DTYPE, A3)
        acc1 = warpgroup_mma(a1, b, acc1, is_async=True)
        acc0, a0 = warpgroup_mma_wait(num_outstanding=1, deps=[acc0, a0])
        _x_fetch(xl_desc, xd_desc, bars, x_smem, u + 3, n_tiles, nh2, kh0, kl0, m0)
        return acc0, acc1, a1

    @gluon.jit
    def _down_light(acc0, acc1, t_lo, t_hi, u0, wu_smem, wg_smem, s_smem, x_smem, bars, xl_desc,
                    xd_desc, n_tiles, nh2, kh0, kl0, m0, p_ptr, s_ptr, z_ptr, N, K, n0,
                    SYMMETRIC: gl.constexpr, GROUP: gl.constexpr, DTYPE: gl.constexpr,
                    V3: gl.constexpr, W_L: gl.constexpr, C_L: gl.constexpr, S_L: gl.constexpr,
                    WR: gl.constexpr, num_warps: gl.constexpr):  # fmt: skip
        """Kernel B's light pair-steps t_lo .. t_hi - 1 (words p [K / 8, N], scales s, zeros z)
        added to acc0 (first 64 k of each) and acc1 (the other 64); x tiles from u0."""
        BN: gl.constexpr = 16 * num_warps
        A3: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=V3, k_width=2)
        last = t_hi - 1
        KR = K // 8
        G = gl.cdiv(K, GROUP)
        ru = gl.arange(0, 8, layout=gl.SliceLayout(1, C_L))
        rg = ru + 8
        w_cols = n0 + gl.arange(0, BN, layout=gl.SliceLayout(0, C_L))
        w_ok = (w_cols < N)[None, :]
        pu = p_ptr + ru[:, None] * N + w_cols[None, :]
        pg = pu + 8 * N
        e = gl.arange(0, 4 * BN, layout=S_L)  # first half's scale, zero, second half's
        sr = e // BN
        sc = n0 + e % BN
        ps = gl.where(sr % 2 == 0, s_ptr + sc, z_ptr + sc)
        sh = (sr // 2) * 64
        s_ok = sc < N
        for j in gl.static_range(WR - 1):
            _ring_issue(wu_smem, wg_smem, s_smem, t_lo + j, last, j, pu, pg, ps, ru, rg, w_ok,
                        s_ok, sh, N, KR, G, GROUP, 16)  # fmt: skip
            md.async_copy.commit_group()
        acc1 = warpgroup_mma_init(acc1)
        a1 = gl.zeros([BN, 64], DTYPE, layout=A3)
        for t in range(t_lo, last, 2):
            u = u0 + 2 * (t - t_lo)
            acc0, acc1, a1 = _down_light_step(
                t, t_lo, last, u, acc0, acc1, a1, wu_smem, wg_smem, s_smem, x_smem, bars,
                xl_desc, xd_desc, n_tiles, nh2, kh0, kl0, m0, pu, pg, ps, ru, rg, w_ok, s_ok, sh,
                N, KR, G, SYMMETRIC, GROUP, DTYPE, BN, A3, W_L, WR)  # fmt: skip
            acc0, acc1, a1 = _down_light_step(
                t + 1, t_lo, last, u + 2, acc0, acc1, a1, wu_smem, wg_smem, s_smem, x_smem, bars,
                xl_desc, xd_desc, n_tiles, nh2, kh0, kl0, m0, pu, pg, ps, ru, rg, w_ok, s_ok, sh,
                N, KR, G, SYMMETRIC, GROUP, DTYPE, BN, A3, W_L, WR)  # fmt: skip
        if (last - t_lo) % 2 == 0:
            acc0, acc1, a1 = _down_light_step(
                last, t_lo, last, u0 + 2 * (last - t_lo), acc0, acc1, a1, wu_smem, wg_smem,
                s_smem, x_smem, bars, xl_desc, xd_desc, n_tiles, nh2, kh0, kl0, m0, pu, pg, ps,
                ru, rg, w_ok, s_ok, sh, N, KR, G, SYMMETRIC, GROUP, DTYPE, BN, A3, W_L,
                WR)  # fmt: skip
        acc1, a1 = warpgroup_mma_wait(num_outstanding=0, deps=[acc1, a1])
        md.async_copy.wait_group(0)
        return acc0, acc1

    @gluon.jit
    def _down_kernel(xl_desc, xd_desc, h_ptr, p_ptr, s_ptr, z_ptr, out_ptr, bias_ptr, M, N, KH,
                     KL, stride_h, stride_om, SYMMETRIC: gl.constexpr, GROUP: gl.constexpr,
                     HAS_BIAS: gl.constexpr, PARTIAL: gl.constexpr, DTYPE: gl.constexpr,
                     BT: gl.constexpr, V3: gl.constexpr, W_L: gl.constexpr, O_L: gl.constexpr,
                     H_L: gl.constexpr, C_L: gl.constexpr, S_L: gl.constexpr, WR: gl.constexpr,
                     num_warps: gl.constexpr):  # fmt: skip
        """Kernel B: out [M, N] = x[:, :KH] h^T + x[:, KH:] W^T (+ bias) for outputs
        program_id(0) * BN .., rows program_id(1) * BT .., over K-slice program_id(2) of
        num_programs(2) (PARTIAL: fp32 partials [slices, M, N] at out_ptr instead). K goes in
        pair-steps of 128 k, heavy ones first; a slice's heavy and light pair-steps share one x
        ring (x in the dense rows' order behind xd_desc, the light order behind xl_desc)."""
        BN: gl.constexpr = 16 * num_warps
        WS: gl.constexpr = gl.SwizzledSharedLayout(vec=8, per_phase=1, max_phase=4,
                                                   order=[1, 0])  # fmt: skip
        SS: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0])
        XSL: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16,
                                                 rank=2)  # fmt: skip
        n0 = gl.program_id(0) * BN
        m0 = gl.program_id(1) * BT
        hs = gl.cdiv(KH, 128)
        steps = hs + gl.cdiv(KL, 128)
        lo = gl.program_id(2) * steps // gl.num_programs(2)
        hi = (gl.program_id(2) + 1) * steps // gl.num_programs(2)
        h_lo = gl.minimum(lo, hs)
        h_hi = gl.minimum(hi, hs)
        l_lo = gl.maximum(lo, hs) - hs
        l_hi = gl.maximum(hi, hs) - hs
        nh2 = 2 * (h_hi - h_lo)
        n_tiles = 2 * (hi - lo)
        kh0 = h_lo * 128
        kl0 = l_lo * 128

        wu_smem = gl.allocate_shared_memory(gl.int32, [WR, 8, BN], WS)
        wg_smem = gl.allocate_shared_memory(gl.int32, [WR, 8, BN], WS)
        s_smem = gl.allocate_shared_memory(s_ptr.dtype.element_ty, [WR, 4 * BN], SS)
        x_smem = gl.allocate_shared_memory(DTYPE, [3, BT, 64], XSL)
        bars = gl.allocate_shared_memory(gl.int64, [3, 1], mbarrier.MBarrierLayout())
        for sb in gl.static_range(3):
            mbarrier.init(bars.index(sb), count=1)
        fence_async_shared()
        _x_fetch(xl_desc, xd_desc, bars, x_smem, 0, n_tiles, nh2, kh0, kl0, m0)
        _x_fetch(xl_desc, xd_desc, bars, x_smem, 1, n_tiles, nh2, kh0, kl0, m0)

        acc0 = gl.zeros([BN, BT], gl.float32, layout=V3)
        acc1 = gl.zeros([BN, BT], gl.float32, layout=V3)
        if h_hi > h_lo:
            acc0, acc1 = _down_heavy(acc0, acc1, h_lo, h_hi, x_smem, bars, xl_desc, xd_desc,
                                     n_tiles, nh2, kh0, kl0, m0, h_ptr, N, KH, stride_h, n0,
                                     DTYPE, V3, H_L, num_warps)  # fmt: skip
        if l_hi > l_lo:
            acc0, acc1 = _down_light(acc0, acc1, l_lo, l_hi, nh2, wu_smem, wg_smem, s_smem,
                                     x_smem, bars, xl_desc, xd_desc, n_tiles, nh2, kh0, kl0, m0,
                                     p_ptr, s_ptr, z_ptr, N, KL, n0, SYMMETRIC, GROUP, DTYPE, V3,
                                     W_L, C_L, S_L, WR, num_warps)  # fmt: skip

        on = n0 + gl.arange(0, BN, layout=gl.SliceLayout(1, O_L))
        om = m0 + gl.arange(0, BT, layout=gl.SliceLayout(0, O_L))
        mask = (on < N)[:, None] & (om < M)[None, :]
        res = gl.convert_layout(acc0 + acc1, O_L)
        ptrs = out_ptr + om[None, :] * stride_om + on[:, None]
        if PARTIAL:
            gl.store(ptrs + gl.program_id(2) * M * stride_om, res, mask=mask)
        else:
            if HAS_BIAS:
                res += gl.load(bias_ptr + on, mask=on < N, other=0.0).to(gl.float32)[:, None]
            gl.store(ptrs, res.to(out_ptr.dtype.element_ty), mask=mask)


def layouts(bt: int = BT, num_warps: int = NUM_WARPS, ring: int = RING) -> dict:
    """The kernel's layout constexprs for BT rows a program and num_warps warps (BN = 16
    num_warps neurons): V3 (the accumulators, [BN, BT]), W_L (light words [8, BN]: lane 4 g + t
    holds word row t of each 32-k block of columns g and g + 8 of its warp's 16), O_L (the
    epilogue, neurons along the lanes), H_L (heavy rows [8 (4 b + t), BN, 8 (c)]: lane 4 g + t
    holds k = 8 (4 b + t) .. + 7 of rows g and g + 8 of its warp's 16), C_L (the words'
    copies, [8, BN] int32, 16 bytes a thread), S_L (scales and zeros [4 BN], 4 bytes a thread);
    WR words-ring stages."""
    log_w = num_warps.bit_length() - 1
    bn = 16 * num_warps
    return dict(
        V3=gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                     instr_shape=[16, bt, 16]),
        W_L=gl.DistributedLinearLayout(
            reg_bases=[[0, 8], [4, 0]], lane_bases=[[1, 0], [2, 0], [0, 1], [0, 2], [0, 4]],
            warp_bases=[[0, 16 << i] for i in range(log_w)], block_bases=[], shape=[8, bn],
        ),
        O_L=gl.BlockedLayout([4, 1], [32, 1], [1, num_warps], [0, 1]),
        H_L=gl.DistributedLinearLayout(
            reg_bases=[[0, 0, 1], [0, 0, 2], [0, 0, 4], [0, 8, 0], [4, 0, 0]],
            lane_bases=[[1, 0, 0], [2, 0, 0], [0, 1, 0], [0, 2, 0], [0, 4, 0]],
            warp_bases=[[0, 16 << i, 0] for i in range(log_w)], block_bases=[],
            shape=[8, bn, 8],
        ),
        C_L=gl.BlockedLayout([1, 4], [32 * 4 // bn, bn // 4], [num_warps, 1], [1, 0]),
        S_L=gl.BlockedLayout([2], [32], [num_warps], [0]),
        WR=ring,
    )  # fmt: skip


def x_layout():
    """x's shared layout (TMA destination, wgmma B operand): 128-byte swizzle, 16-bit values."""
    return gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)


def _gl_dtype(dtype: torch.dtype):
    return gl.float16 if dtype == torch.float16 else gl.bfloat16


def split_activations(
    x2: torch.Tensor,
    w: SplitFFNWeights,
    a: torch.Tensor,
    *,
    ring: int = RING,
    for_down: bool = False,
) -> torch.Tensor:
    """Kernel A into a [M, h + l] (x2 [M, H] contiguous rows; `unsupported` must say None;
    `ring`: words-ring stages, at least 2). `for_down`: a [M, heavy_cols(h) + l] is kernel B's
    x as `split_linear(..., permuted=True)` reads it (the heavy part zero-padded to 32-k blocks,
    each part's blocks in its order), written by the epilogue: no permuting copies."""
    m, k = x2.shape
    nh, nl = w.n_heavy, w.n_light
    xl = permute_x(x2)
    xd = permute_x(x2, dense=True) if nh else xl
    xl_desc = TensorDescriptor.from_tensor(xl, [BT, 64], x_layout())
    xd_desc = TensorDescriptor.from_tensor(xd, [BT, 64], x_layout())
    up, gate = w.light_up, w.light_gate
    hu = w.heavy_up if nh else xl
    hg = w.heavy_gate if nh else xl
    bn = 16 * NUM_WARPS
    grid = (triton.cdiv(nh, bn) + triton.cdiv(nl, bn), triton.cdiv(m, BT))
    _up_kernel[grid](
        xl_desc, xd_desc, hu, hg, up.planes[0], up.scales,
        up.zeros if up.zeros is not None else up.scales, gate.planes[0], gate.scales,
        gate.zeros if gate.zeros is not None else gate.scales, a,
        w.up_bias if w.up_bias is not None else a, w.gate_bias if w.gate_bias is not None else a,
        m, nh, nl, k, hu.stride(0), a.stride(0), heavy_cols(nh) if for_down else nh,
        SYMMETRIC=up.symmetric, GROUP=up.group_size, PERM=for_down,
        ACTIVATION=w.activation, HAS_UP_BIAS=w.up_bias is not None,
        HAS_GATE_BIAS=w.gate_bias is not None, DTYPE=_gl_dtype(x2.dtype), BT=BT,
        **layouts(ring=ring), num_warps=NUM_WARPS,
    )  # fmt: skip
    return a


def split_linear(
    a2: torch.Tensor,
    heavy: torch.Tensor | None,
    light: QuantizedWeight,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    *,
    split: int | None = None,
    permuted: bool = False,
) -> torch.Tensor:
    """Kernel B into out [M, N] (contiguous): a2[:, :kh] heavy^T + a2[:, kh:] light^T + bias
    (`down_unsupported` must say None). `split`: K-slices (default `down_splits`), summed in
    slice order by a second launch. `permuted`: a2 is kernel A's `for_down` output instead
    ([M, heavy_cols(kh) + kl], read in place); else each part is permuted by a copy."""
    from ffnsplit.kernels.quant_matmul import reduce_slices

    m = a2.shape[0]
    nh = heavy.shape[1] if heavy is not None else 0
    n, kl = light.shape
    if permuted:  # kernel A's for_down layout, read in place
        xd, xl = a2[:, : heavy_cols(nh)], a2[:, heavy_cols(nh) :]
    else:
        xl = permute_x(a2[:, nh:])
        xd = torch.zeros((m, heavy_cols(nh)), dtype=a2.dtype, device=a2.device)
        xd[:, :nh] = a2[:, :nh]  # zeros up to a whole 32-k block: the heavy rows read 0 past kh
    xd = permute_x(xd, dense=True) if nh and not permuted else (xd if nh else xl)
    xl_desc = TensorDescriptor.from_tensor(xl, [BT, 64], x_layout())
    xd_desc = TensorDescriptor.from_tensor(xd, [BT, 64], x_layout())
    slices = split or down_splits(m, n, sm_count(a2.device))
    target = out
    if slices > 1:
        target = torch.empty((slices, m, n), dtype=torch.float32, device=a2.device)
    grid = (triton.cdiv(n, 16 * NUM_WARPS), triton.cdiv(m, BT), slices)
    _down_kernel[grid](
        xl_desc, xd_desc, heavy if nh else xl, light.planes[0], light.scales,
        light.zeros if light.zeros is not None else light.scales, target,
        bias if bias is not None else out, m, n, nh, kl, heavy.stride(0) if nh else 0,
        n if slices > 1 else out.stride(0), SYMMETRIC=light.symmetric, GROUP=light.group_size,
        HAS_BIAS=bias is not None, PARTIAL=slices > 1, DTYPE=_gl_dtype(a2.dtype), BT=BT,
        **layouts(), num_warps=NUM_WARPS,
    )  # fmt: skip
    if slices > 1:
        reduce_slices(target, bias, out)
    return out


def split_ffn(x2: torch.Tensor, w: SplitFFNWeights) -> torch.Tensor:
    """The whole FFN by kernels A and B here (`use` and `use_down` must hold): kernel A writes
    kernel B's x in its k orders, kernel B reads it in place. [M, H] in x2's dtype."""
    m = x2.shape[0]
    nh, nl = w.n_heavy, w.n_light
    a = torch.empty((m, heavy_cols(nh) + nl), dtype=x2.dtype, device=x2.device)
    split_activations(x2, w, a, for_down=True)
    out = torch.empty((m, w.hidden_size), dtype=x2.dtype, device=x2.device)
    return split_linear(a, w.heavy_down if nh else None, w.light_down, w.down_bias, out,
                        permuted=True)  # fmt: skip


def aot_compile_down(dtype: str = "fp16", *, arch: int = 90, ring: int = RING):
    """`_down_kernel` compiled ahead of time for sm_`arch`, as `aot_compile`."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    fn = _down_kernel
    t = "*" + dtype
    desc = f"tensordesc<{dtype}[{BT}, 64],{x_layout()!r}>"
    sig = dict(xl_desc=desc, xd_desc=desc, h_ptr=t, p_ptr="*i32", s_ptr="*fp16", z_ptr="*fp16",
               out_ptr="*fp32", bias_ptr=t, M="i32", N="i32", KH="i32", KL="i32",
               stride_h="i32", stride_om="i32")  # fmt: skip
    const = dict(SYMMETRIC=False, GROUP=128, HAS_BIAS=False, PARTIAL=True,
                 DTYPE=gl.float16 if dtype == "fp16" else gl.bfloat16, BT=BT,
                 **layouts(ring=ring), num_warps=NUM_WARPS)  # fmt: skip
    names = [p.name for p in fn.params]
    signature = {nm: sig.get(nm, "constexpr") for nm in names}
    aligned = [nm for nm in sig if nm.endswith("_ptr")] + ["N", "KH", "KL", "stride_h",
                                                           "stride_om"]  # fmt: skip
    attrs = {(names.index(nm),): [["tt.divisibility", 16]] for nm in aligned}
    return triton.compile(
        GluonASTSource(fn, signature, const, attrs),
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": NUM_WARPS},
    )


def aot_compile(dtype: str = "fp16", *, arch: int = 90, ring: int = RING, perm: bool = False):
    """`_up_kernel` compiled ahead of time for sm_`arch` (no GPU needed; Llama-3-8B-like
    arguments, 16-byte aligned): Triton's CompiledKernel (`mma_decode.aot_resources` reads its
    registers and spills)."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    fn = _up_kernel
    t = "*" + dtype
    desc = f"tensordesc<{dtype}[{BT}, 64],{x_layout()!r}>"
    sig = dict(xl_desc=desc, xd_desc=desc, hu_ptr=t, hg_ptr=t, p_ptr="*i32", s_ptr="*fp16",
               z_ptr="*fp16", q_ptr="*i32", t_ptr="*fp16", u_ptr="*fp16", out_ptr=t, ub_ptr=t,
               gb_ptr=t, M="i32", NH="i32", NL="i32", K="i32", stride_h="i32",
               stride_om="i32", NHS="i32")  # fmt: skip
    const = dict(SYMMETRIC=False, GROUP=128, ACTIVATION="silu", HAS_UP_BIAS=False,
                 HAS_GATE_BIAS=False, DTYPE=gl.float16 if dtype == "fp16" else gl.bfloat16,
                 BT=BT, **layouts(ring=ring), num_warps=NUM_WARPS, PERM=perm)  # fmt: skip
    names = [p.name for p in fn.params]
    signature = {nm: sig.get(nm, "constexpr") for nm in names}
    aligned = [nm for nm in sig if nm.endswith("_ptr")] + ["K", "stride_h", "stride_om", "NH",
                                                           "NL"]  # fmt: skip
    attrs = {(names.index(nm),): [["tt.divisibility", 16]] for nm in aligned}
    return triton.compile(
        GluonASTSource(fn, signature, const, attrs),
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": NUM_WARPS},
    )
