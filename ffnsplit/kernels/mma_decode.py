"""The split FFN's decode tier in Gluon: up to 64 rows (auto 2-32), int4 light weights, sm_80+.

Triton's tl front end lays out an int4 decode GEMM by inference: at M = 16 the unpacked codes
reach the tensor cores through register moves and x is converted to the MMA layout every K-block,
~7 SASS instructions a code (ncu, H100, session 8), so the tl decode tier streams ~1 TB/s where a
plain read of the same bytes streams 2.7 TB/s. Here (Gluon) the layouts are stated, and nothing
moves between threads:

  * MMA k-slots are matched to the words instead of the words to the k-slots: in each block of
    32 k, lane t of a quad loads word row t of its column (k = 8t .. 8t + 7, the format's
    canonical order, no repacking) and one shift + lop3 per pair turns it into its four
    m16n8k16 B fragment registers, pair j = (k 8t + j, 8t + j + 4), each code as BIAS + q
    (fp16 1024 + q, bf16 128 + q: exact, the exponent bias left in). The same k permutation is applied to
    x when it is staged in shared memory (a relabelling of registers before the store), and
    ldmatrix reads the A fragments from there. `convert_layout(..., assert_trivial=True)` makes
    the compiler prove that no code crosses threads.
  * Heavy (fp16/bf16) rows use the permutation in which lane t's 16-byte load of k = 8t .. 8t + 7
    is its four B fragment registers as loaded.
  * Per group: blk = x (BIAS + q) on the tensor cores (fp32), BIAS and the zero point taken
    out together through x's row sums (one more MMA against ones): acc += s (blk - (z + BIAS)
    sum x). Leaving BIAS in saves a sub/fma per register (sm_90 SASS, light loop: kernel A
    387 -> 360 instructions a chunk in fp16, 427 -> 366 in bf16) for ~3e-5 relative error in
    fp16 (fp32 roundings of BIAS sum |x|; tests/test_mma_decode.py). The next chunk's words are loaded before the
    current chunk is multiplied.
  * K is split into slices (grid axis 1) that write fp32 partials, added in slot order
    (deterministic) and finished by the last slice of each tile to arrive (`fused` configs:
    kernel A's biases, activation and gating, kernel B's bias) or by a reduce launch
    (gemv._gemv_reduce_kernel, quant_matmul._splitk_reduce_kernel). Kernel A's heavy and
    light tiles are programs of one launch; kernel B's heavy columns are extra K-slices of the
    same launch, so heavy and light land in one output.
  * Up to SWAP_MAX_M (8) rows the light tiles may take the "W as A" form (MmaConfig.swap): the
    words' codes are the A operand ([16 features, 16 k] a tile, lane g holding columns g and
    g + 8 of its word row, the same k-slots in [n, slot] order), x's rows the n8 columns of the
    B operand, read transposed from the same staged tile: 8 rows cost what 16 do in the x-as-A
    form and the loop issues ~2.4 SASS instructions a code instead of ~3.0 (kernel A, sm_90).
    Dense rows stay x-as-A tiles in both forms. In this form, fp16 codes of odd k stay 4 bits
    up (1024 + 16 q: 4 lop3 and one shift a word instead of 4 and 3) against x staged with its
    odd k divided by 16; one MMA of x against a constant operand gives -1024 sum x' (the
    products' starting value) and sum x (the zero point's term): the light loop a chunk 284 ->
    263 sm_90 instructions in kernel A, 373 -> 362 in kernel B (H200, session 16: the layer
    at M = 1 37.3 -> 36.1-36.6 us; M = 4-8 unchanged).
  * On sm_90+ both kernels are programmatic dependent launches: a program triggers the next
    kernel, loads its first chunk of weights, then waits for the previous kernel before x.

H100, Llama-3-8B FFN shape (benchmarks/RESULTS.md, session 9): the whole FFN 104-109 us on the
tl decode tier -> 56-62 us here for M = 2 .. 16 (59.5 us at M = 16, 2.34x dense fp16). Gluon
has no interpreter: this tier runs on CUDA GPUs only and is tested there
(tests/test_mma_decode.py); everything else keeps the tl tiers.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton

from ffnsplit.kernels import gemv
from ffnsplit.kernels.format import QuantizedWeight, SplitFFNWeights
from ffnsplit.kernels.tiles import INTERPRET, Tuner, pdl_options, ptxas_log, sm_count

try:  # Gluon (Triton >= 3.5); absent or unusable: the tier is off (available() says why)
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2

    _IMPORT_ERROR = None
except Exception as exc:  # pragma: no cover - depends on the installed Triton
    gluon = gl = mma_v2 = async_copy = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

BLOCK_M = 16  # rows of one m16 tile; a program takes 1, 2 or 4 of them (MmaConfig.rows)
MAX_M = 64  # path="mma" takes up to this many rows
CHUNK = 128  # k a loop step: 4 blocks of 32 k (one group of 128, half of 256, two of 64)
# "auto" takes this tier from MIN_M rows to AUTO_MAX_M (H200, session 11, whole FFN: M = 32
# 85.5 us in 2-tile row programs against the tl small tier's 142.6 and dense fp16's 103.5; M = 64
# 145.6 against 144.0: a tie, so the tl tier keeps it). M = 1 since session 14 (H200, W-as-A
# configs, PDL launches, heavy part padded to 8 neurons: the layer 37.6 us against the GEMV
# path's 41.8, the Llama-3-8B decode 1.67x dense against 1.61x; benchmarks/RESULTS.md). Before
# the W-as-A form the GEMV path won at M = 1 (H100, session 9: 49.4 against 54.6 us).
# FFNSPLIT_MMA=0 keeps "auto" on the GEMV path and the tl tiers (comparisons); path="mma"
# forces this tier; FFNSPLIT_MMA_MIN_M=2 gives M = 1 back to the GEMV path.
MIN_M = int(os.environ.get("FFNSPLIT_MMA_MIN_M", "1"))
AUTO_MAX_M = 32
ENABLED = os.environ.get("FFNSPLIT_MMA", "1") != "0"

# The k permutations, as the kernels apply them (reshape, permute, reshape), shared with the CPU
# emulation in tests/test_mma_decode.py:
# codes: [t1, t0, n, i0, i1, i2] (lane t's four registers j = i1 + 2 i2, halves i0) -> [slot, n]
CODE_PERM = (5, 4, 0, 1, 3, 2)
# dense rows: [n, t, i2, i1, i0] (k = 8 t + 4 i2 + 2 i1 + i0) -> [slot, n]
ROW_PERM = (2, 3, 1, 4, 0)
# the W-as-A form (MmaConfig.swap): the same k-slots with n first, [n, slot] (A operand)
CODE_PERM_A = (2, 5, 4, 0, 1, 3)
# x [m, b, t, j2, j1, j0] -> [m, b, slot]: light words' order, dense rows' order
LIGHT_X_PERM = (0, 1, 4, 5, 2, 3)
DENSE_X_PERM = (0, 1, 3, 4, 2, 5)


def available(device: torch.device) -> bool:
    """Whether this tier can run on `device`: Gluon imports, a CUDA GPU of sm_80 or newer, and
    not under Triton's interpreter."""
    if _IMPORT_ERROR is not None or INTERPRET or device.type != "cuda":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _capability(index) >= (8, 0)


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    """The compute capability of CUDA device `index`, asked once: the tier's checks run on every
    call."""
    return torch.cuda.get_device_capability(index)


def light_ok(qw: QuantizedWeight | None, dtype: torch.dtype) -> bool:
    """Whether this tier computes a packed weight's product: int4, groups that are a power of two
    from 64 (a 128-k step holds whole groups or lies inside one), fp16 or bf16 activations
    (scales and zeros of any float dtype: they are applied in fp32)."""
    if dtype not in (torch.float16, torch.bfloat16):
        return False
    if qw is None:
        return True
    g = qw.group_size
    return qw.bits == 4 and g >= 64 and g & (g - 1) == 0


if gluon is not None:
    # a CTA barrier: gl.thread_barrier up to Triton 3.6, gl.barrier in later releases
    _barrier = getattr(gl, "thread_barrier", None) or gl.barrier
    # cp.async global -> shared: async_copy_global_to_shared up to 3.6, async_load later
    _async_load = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared
    _CHUNK = gl.constexpr(CHUNK)
    _CODE_PERM = gl.constexpr(CODE_PERM)
    _ROW_PERM = gl.constexpr(ROW_PERM)
    _CODE_PERM_A = gl.constexpr(CODE_PERM_A)
    _LIGHT_X_PERM = gl.constexpr(LIGHT_X_PERM)
    _DENSE_X_PERM = gl.constexpr(DENSE_X_PERM)
    # One word (given twice: pack=2) -> the 4 B fragment registers of its lane: register j holds
    # the codes at nibbles (j, j + 4), k = 8t + j and 8t + j + 4 of the word's 32-k block.
    # The codes go to the tensor cores with their exponent bias: (1024 + q) in fp16, (128 + q)
    # in bf16, exact; the products sum to BIAS sum x + sum x q in fp32, and the epilogue takes
    # BIAS out with the zero point (acc += s (blk - (z + BIAS) sum x)), so a word costs 4 lop3
    # and 3 shifts (a sub.f16x2 / fma per register saved). fp16: nibbles (j, j + 4) of the word
    # shifted by 4 j land at bits 0-3 and 16-19 of the register.
    _ASM_F16 = gl.constexpr("\n".join([
        "{", ".reg .b32 t;",
        "lop3.b32 $0, $4, 0x000f000f, 0x64006400, 0xea;",
        "shr.u32 t, $4, 4;",
        "lop3.b32 $1, t, 0x000f000f, 0x64006400, 0xea;",
        "shr.u32 t, $4, 8;",
        "lop3.b32 $2, t, 0x000f000f, 0x64006400, 0xea;",
        "shr.u32 t, $4, 12;",
        "lop3.b32 $3, t, 0x000f000f, 0x64006400, 0xea;",
        "}",
    ]))  # fmt: skip
    # fp16 in the W-as-A form (session 16): registers 1 and 3 keep their nibbles 4 bits up,
    # 1024 + 16 q (fp16 has 10 mantissa bits), so a word costs 4 lop3 and one shift. x is staged
    # with its odd k (those of registers 1 and 3) divided by 16 (exact), so those products are
    # 64 x + x q; the products start from -1024 sum x' (x' as staged) and the epilogue takes
    # z sum x out (_x_sums gives both in one MMA; _sum_weights, _sum_halves). sm_90 SASS of the
    # light loop a chunk: kernel A 284 -> 263 instructions, kernel B 373 -> 362.
    _ASM_F16_X16 = gl.constexpr("\n".join([
        "{", ".reg .b32 t;",
        "lop3.b32 $0, $4, 0x000f000f, 0x64006400, 0xea;",
        "lop3.b32 $1, $4, 0x00f000f0, 0x64006400, 0xea;",
        "shr.u32 t, $4, 8;",
        "lop3.b32 $2, t, 0x000f000f, 0x64006400, 0xea;",
        "lop3.b32 $3, t, 0x00f000f0, 0x64006400, 0xea;",
        "}",
    ]))  # fmt: skip
    # bf16 has 7 mantissa bits: (128 + q) the same way
    _ASM_BF16 = gl.constexpr("\n".join([
        "{", ".reg .b32 t;",
        "lop3.b32 $0, $4, 0x000f000f, 0x43004300, 0xea;",
        "shr.u32 t, $4, 4;",
        "lop3.b32 $1, t, 0x000f000f, 0x43004300, 0xea;",
        "shr.u32 t, $4, 8;",
        "lop3.b32 $2, t, 0x000f000f, 0x43004300, 0xea;",
        "shr.u32 t, $4, 12;",
        "lop3.b32 $3, t, 0x000f000f, 0x43004300, 0xea;",
        "}",
    ]))  # fmt: skip

    @gluon.jit
    def _codes(w, DTYPE: gl.constexpr, LAYOUT: gl.constexpr, SWAP: gl.constexpr):
        """Words [4 (t), BN] of one 32-k block -> codes [32 k-slots, BN] in the MMA B layout
        (SWAP: [BN, 32 k-slots] in the A layout): slot 16 i2 + 8 i1 + 2 t + i0 holds
        k = 8 t + i1 + 2 i2 + 4 i0 of the block."""
        ww = gl.join(w, w)  # [4, BN, 2]: both halves of a register in one thread
        if SWAP and gl.float16 == DTYPE:  # registers 1 and 3 as 1024 + 16 q
            p0, p1, p2, p3 = gl.inline_asm_elementwise(
                _ASM_F16_X16, "=r,=r,=r,=r,r,r", [ww],
                dtype=(gl.float16, gl.float16, gl.float16, gl.float16),
                is_pure=True, pack=2,
            )  # fmt: skip
        elif gl.float16 == DTYPE:
            p0, p1, p2, p3 = gl.inline_asm_elementwise(
                _ASM_F16, "=r,=r,=r,=r,r,r", [ww],
                dtype=(gl.float16, gl.float16, gl.float16, gl.float16),
                is_pure=True, pack=2,
            )  # fmt: skip
        else:
            p0, p1, p2, p3 = gl.inline_asm_elementwise(
                _ASM_BF16, "=r,=r,=r,=r,r,r", [ww],
                dtype=(gl.bfloat16, gl.bfloat16, gl.bfloat16, gl.bfloat16),
                is_pure=True, pack=2,
            )  # fmt: skip
        # p_j[t, n, i0] is nibble j + 4 i0; j = i1 + 2 i2 -> [t, n, i0, i1, i2]
        t = gl.join(gl.join(p0, p1), gl.join(p2, p3))
        n: gl.constexpr = w.shape[1]
        t = gl.reshape(t, [2, 2, n, 2, 2, 2])  # [t1, t0, n, i0, i1, i2]
        if SWAP:
            t = gl.reshape(gl.permute(t, _CODE_PERM_A.value), [n, 32])  # [n, i2, i1, t1, t0, i0]
        else:
            t = gl.reshape(gl.permute(t, _CODE_PERM.value), [32, n])  # [i2, i1, t1, t0, i0, n]
        return gl.convert_layout(t, LAYOUT, assert_trivial=True)

    @gluon.jit
    def _rows(h, B_LAYOUT: gl.constexpr):
        """Dense rows [BN, 4 (t), 8 (j)] of one 32-k block (lane t's 16-byte load: k = 8t + j)
        -> [32 k-slots, BN] in the MMA B layout: slot 16 i2 + 8 i1 + 2 t + i0 holds
        k = 8 t + 4 i2 + 2 i1 + i0, so the load is the fragment."""
        n: gl.constexpr = h.shape[0]
        t = gl.reshape(h, [n, 4, 2, 2, 2])  # [n, t, i2, i1, i0]
        t = gl.permute(t, _ROW_PERM.value)  # [i2, i1, t, i0, n]
        return gl.convert_layout(gl.reshape(t, [32, n]), B_LAYOUT, assert_trivial=True)

    @gluon.jit
    def _slots(x, LIGHT: gl.constexpr):
        """x chunk [16, 128] (k = 32 b + 8 t + j) in the k-slot order of the light words (LIGHT)
        or of dense rows: the same permutation inside every 32-k block."""
        BM: gl.constexpr = x.shape[0]
        t = gl.reshape(x, [BM, 4, 4, 2, 2, 2])  # [m, b, t, j2, j1, j0]
        if LIGHT:  # slot (i2, i1, t, i0) <- j = i1 + 2 i2 + 4 i0
            t = gl.permute(t, _LIGHT_X_PERM.value)
        else:  # slot (i2, i1, t, i0) <- j = i0 + 2 i1 + 4 i2
            t = gl.permute(t, _DENSE_X_PERM.value)
        return gl.reshape(t, [BM, 128])

    @gluon.jit
    def _x_tiles(stride_xm, M, BM: gl.constexpr, DTYPE: gl.constexpr, X_LAYOUT: gl.constexpr):
        """x's chunk offsets, row mask and k index [16, 128] (read coalesced, 16 bytes a thread)
        and its double-buffered shared tile."""
        xm = gl.arange(0, BM, layout=gl.SliceLayout(1, X_LAYOUT))
        xk = gl.arange(0, _CHUNK, layout=gl.SliceLayout(0, X_LAYOUT))
        x_off = xm[:, None] * stride_xm + xk[None, :]
        x_mask = (xm < M)[:, None] & (xk < _CHUNK)[None, :]
        XS: gl.constexpr = gl.SwizzledSharedLayout(vec=8, per_phase=1, max_phase=8, order=[1, 0])
        return x_off, x_mask, xk, gl.allocate_shared_memory(DTYPE, [2, BM, _CHUNK], XS)

    @gluon.jit
    def _x_chunk(x_ptr, x_off, x_mask, xk, k0, K, TAIL: gl.constexpr):
        """x [16, 128] at k0 (rows past M and, with TAIL, k past K read as 0)."""
        mask = x_mask
        if TAIL:
            mask = mask & (k0 + xk < K)[None, :]
        return gl.load(x_ptr + x_off + k0, mask=mask, other=0.0)

    @gluon.jit
    def _stage(x_smem, c, x, LIGHT: gl.constexpr, LAYOUT: gl.constexpr, SWAP: gl.constexpr):
        """Store x (slot order) into buffer c % 2, wait for every thread, read the 4 blocks' A
        fragments [BM, 32] (SWAP: B fragments [32, BM]; ldmatrix). One barrier a chunk: buffer
        c % 2 is written again two chunks on, after every thread passed the next chunk's
        barrier. Light fp16 x in the W-as-A form: odd k divided by 16 (exact), as
        _ASM_F16_X16's codes want."""
        if LIGHT and SWAP and x.dtype == gl.float16:
            k = gl.arange(0, _CHUNK, layout=gl.SliceLayout(0, x.type.layout))
            x = x * gl.where(k % 2 == 1, 0.0625, 1.0).to(gl.float16)[None, :]
        buf = x_smem.index(c % 2)
        buf.store(_slots(x, LIGHT))
        _barrier()
        return _quarters(buf, 32, 1, LAYOUT, SWAP)

    @gluon.jit
    def _quarters(buf, size: gl.constexpr, dim: gl.constexpr, LAYOUT: gl.constexpr,
                  TRANS: gl.constexpr = False):  # fmt: skip
        """The four consecutive `size`-long slices of shared tile `buf` along `dim`, loaded in
        LAYOUT, transposed with TRANS (a chunk's 4 blocks: x's k-slots, or the ring's word
        rows)."""
        q0 = _slice_load(buf, 0, size, dim, LAYOUT, TRANS)
        q1 = _slice_load(buf, size, size, dim, LAYOUT, TRANS)
        q2 = _slice_load(buf, 2 * size, size, dim, LAYOUT, TRANS)
        q3 = _slice_load(buf, 3 * size, size, dim, LAYOUT, TRANS)
        return q0, q1, q2, q3

    @gluon.jit
    def _slice_load(buf, start: gl.constexpr, size: gl.constexpr, dim: gl.constexpr,
                    LAYOUT: gl.constexpr, TRANS: gl.constexpr):  # fmt: skip
        view = buf.slice(start, size, dim=dim)
        if TRANS:
            view = view.permute([1, 0])
        return view.load(LAYOUT)

    @gluon.jit
    def _block_words(ptr, off, mask, row, KR, TAIL: gl.constexpr):
        """One 32-k block of words [4, BN] (word rows row .. row + 3)."""
        if TAIL:
            rows = row + gl.arange(0, 4, layout=gl.SliceLayout(1, mask.type.layout))
            mask = mask & (rows < KR)[:, None]
        return gl.load(ptr + off, mask=mask, other=0)

    @gluon.jit
    def _chunk_words(ptr, off, mask, row, N, KR, TAIL: gl.constexpr):
        """A 128-k chunk's 4 blocks of words (16 word rows from `row`, at `off`)."""
        w0 = _block_words(ptr, off, mask, row, KR, TAIL)
        w1 = _block_words(ptr, off + 4 * N, mask, row + 4, KR, TAIL)
        w2 = _block_words(ptr, off + 8 * N, mask, row + 8, KR, TAIL)
        w3 = _block_words(ptr, off + 12 * N, mask, row + 12, KR, TAIL)
        return w0, w1, w2, w3

    @gluon.jit
    def _scales(s_ptr, z_ptr, c, N, G, sc, s_mask, SYMMETRIC: gl.constexpr,
                GROUP: gl.constexpr):  # fmt: skip
        """fp32 scales and zeros of chunk c: (s, z) of its group (GROUP >= 128), or of its two
        groups (GROUP 64; the second past the last group reads as 0). Symmetric: z unused."""
        if GROUP == 64:
            g0 = 2 * c
            s0 = gl.load(s_ptr + g0 * N + sc, mask=s_mask, other=0.0).to(gl.float32)
            m1 = s_mask & (g0 + 1 < G)
            s1 = gl.load(s_ptr + (g0 + 1) * N + sc, mask=m1, other=0.0).to(gl.float32)
            if SYMMETRIC:
                z0, z1 = s0, s1
            else:
                z0 = gl.load(z_ptr + g0 * N + sc, mask=s_mask, other=0.0).to(gl.float32)
                z1 = gl.load(z_ptr + (g0 + 1) * N + sc, mask=m1, other=0.0).to(gl.float32)
        else:
            g = c * _CHUNK // GROUP
            s0 = gl.load(s_ptr + g * N + sc, mask=s_mask, other=0.0).to(gl.float32)
            z0 = s0
            if not SYMMETRIC:
                z0 = gl.load(z_ptr + g * N + sc, mask=s_mask, other=0.0).to(gl.float32)
            s1, z1 = s0, z0
        return s0, z0, s1, z1

    @gluon.jit
    def _prefetch_block(ptr, row0, rows, stride, col0, cols, n_cols, SEG: gl.constexpr):
        """prefetch.global.L2 of rows row0 .. row0 + rows - 1 of a [*, stride] 16-bit array,
        columns col0 .. col0 + cols - 1 (below n_cols), SEG elements (one 128-byte line) a
        request, one request a thread in turns: nothing waits for the lines."""
        T: gl.constexpr = 32 * gl.num_warps()
        L: gl.constexpr = gl.BlockedLayout([1], [32], [gl.num_warps()], [0])
        segs = gl.cdiv(gl.maximum(cols, 0), SEG)
        total = gl.maximum(rows, 0) * segs
        i = gl.arange(0, T, layout=L)
        for base in range(0, total, T):
            j = base + i
            row = row0 + j // segs
            col = col0 + (j % segs) * SEG
            mask = (j < total) & (col < n_cols)
            gl.inline_asm_elementwise(
                "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.u32 $0, 0; }",
                "=r,l,r", [ptr + row.to(gl.int64) * stride + col, mask.to(gl.int32)],
                dtype=gl.int32, is_pure=False, pack=1,
            )  # fmt: skip

    @gluon.jit
    def _pdl_wait(PDL: gl.constexpr):
        """tiles.pdl_wait in Gluon: wait for the previous kernel on the stream (its writes
        visible); every program of a PDL launch passes here before it reads x or writes."""
        if PDL:
            gl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=gl.int32,
                                      is_pure=False, pack=1)  # fmt: skip

    @gluon.jit
    def _pdl_trigger(PDL: gl.constexpr):
        """tiles.pdl_trigger in Gluon: let the next kernel on the stream launch."""
        if PDL:
            gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [],
                                      dtype=gl.int32, is_pure=False, pack=1)  # fmt: skip

    @gluon.jit
    def _per_n(v, SWAP: gl.constexpr):
        """A per-column vector broadcast along the rows of x: [1, BN] (SWAP: [BN, 1])."""
        if SWAP:
            out = v[:, None]
        else:
            out = v[None, :]
        return out

    @gluon.jit
    def _sum_halves(xs):
        """W-as-A fp16 light x: (-1024 sum x', sum x) in the shape of _x_sums' [BN, BM]
        result, whose rows r % 16 < 8 hold the first and the others the second
        (_sum_weights): a thread holds both of its rows (g, g + 8), so each half is picked from
        its own registers and broadcast back (convert_layout proves it)."""
        bn: gl.constexpr = xs.shape[0]
        bm: gl.constexpr = xs.shape[1]
        t = gl.permute(gl.reshape(xs, [bn // 16, 2, 8, bm]), [0, 2, 3, 1])
        lo, hi = gl.split(t)  # [bn // 16, 8, bm]
        x1 = gl.reshape(gl.permute(gl.join(lo, lo), [0, 3, 1, 2]), [bn, bm])
        x2 = gl.reshape(gl.permute(gl.join(hi, hi), [0, 3, 1, 2]), [bn, bm])
        like: gl.constexpr = xs.type.layout
        return (gl.convert_layout(x1, like, assert_trivial=True),
                gl.convert_layout(x2, like, assert_trivial=True))  # fmt: skip

    @gluon.jit
    def _group_out(acc, blk, xs, s, z, SYMMETRIC: gl.constexpr, DTYPE: gl.constexpr,
                   SWAP: gl.constexpr):  # fmt: skip
        """acc + s (sum x q - z sum x) of one group (symmetric: z = 8). blk = the codes'
        products with their exponent bias BIAS, xs = sum x: blk - (z + BIAS) xs; in the W-as-A
        form in fp16 (_ASM_F16_X16) blk started from -1024 sum x' (_apply): blk - z xs."""
        if SWAP and gl.float16 == DTYPE:
            BIAS: gl.constexpr = 0.0
        elif gl.float16 == DTYPE:
            BIAS: gl.constexpr = 1024.0
        else:
            BIAS: gl.constexpr = 128.0
        if SYMMETRIC:
            return acc + (blk - xs * (8.0 + BIAS)) * _per_n(s, SWAP)
        if BIAS == 0.0:
            return acc + (blk - xs * _per_n(z, SWAP)) * _per_n(s, SWAP)
        return acc + (blk - xs * _per_n(z + BIAS, SWAP)) * _per_n(s, SWAP)

    @gluon.jit
    def _apply(acc, x0, x1, x2, x3, w0, w1, w2, w3, xs0, xs1, s0, z0, s1, z1,
               SYMMETRIC: gl.constexpr, GROUP: gl.constexpr, DTYPE: gl.constexpr,
               CHAINS: gl.constexpr, W_OPERAND: gl.constexpr, MMA: gl.constexpr,
               SWAP: gl.constexpr):  # fmt: skip
        """acc += s (x q - z sum x) for a chunk's groups (GROUP 64: blocks 0-1 and 2-3 apart).
        CHAINS 2: two accumulator chains (blocks 0, 2 and 1, 3), half the dependent MMA latency
        for more registers."""
        z = gl.zeros(acc.shape, gl.float32, layout=MMA)
        seed0 = z
        seed1 = z
        if SWAP and gl.float16 == DTYPE:  # products start from -1024 sum x' (_ASM_F16_X16)
            seed0, xs0 = _sum_halves(xs0)
            seed1, xs1 = _sum_halves(xs1)
        if GROUP == 64:
            blk, odd = _mma_pair(x0, w0, x1, w1, seed0, z, DTYPE, CHAINS, W_OPERAND, SWAP)
            if CHAINS == 2:
                blk += odd
            acc = _group_out(acc, blk, xs0, s0, z0, SYMMETRIC, DTYPE, SWAP)
            blk, odd = _mma_pair(x2, w2, x3, w3, seed1, z, DTYPE, CHAINS, W_OPERAND, SWAP)
        else:  # one group: xs1 (and seed1) cover the chunk's four blocks
            blk, odd = _mma_pair(x0, w0, x1, w1, seed1, z, DTYPE, CHAINS, W_OPERAND, SWAP)
            blk, odd = _mma_pair(x2, w2, x3, w3, blk, odd, DTYPE, CHAINS, W_OPERAND, SWAP)
        if CHAINS == 2:
            blk += odd
        return _group_out(acc, blk, xs1, s1, z1, SYMMETRIC, DTYPE, SWAP)

    @gluon.jit
    def _mma(x, w, acc, SWAP: gl.constexpr):
        """acc + x w (x [BM, 32] A, w [32, BN] B), or with SWAP acc + w x (w [BN, 32] A,
        x [32, BM] B): the weights as the A operand, the rows of x as the n8 columns."""
        if SWAP:
            out = mma_v2(w, x, acc)
        else:
            out = mma_v2(x, w, acc)
        return out

    @gluon.jit
    def _mma_pair(xa, wa, xb, wb, blk, odd, DTYPE: gl.constexpr, CHAINS: gl.constexpr,
                  W_OPERAND: gl.constexpr, SWAP: gl.constexpr):  # fmt: skip
        """Two blocks' products: both into blk, or (CHAINS 2) the second into odd."""
        blk = _mma(xa, _codes(wa, DTYPE, W_OPERAND, SWAP), blk, SWAP)
        if CHAINS == 2:
            odd = _mma(xb, _codes(wb, DTYPE, W_OPERAND, SWAP), odd, SWAP)
        else:
            blk = _mma(xb, _codes(wb, DTYPE, W_OPERAND, SWAP), blk, SWAP)
        return blk, odd

    @gluon.jit
    def _sum_weights(BN: gl.constexpr, W_OPERAND: gl.constexpr):
        """The constant A operand [BN, 32] of W-as-A fp16 x's sums (_x_sums, _sum_halves):
        rows r % 16 < 8 -1024 (their result: -1024 sum x', the codes' exponent bias); the
        others sum x: 16 in the k-slots of odd k (slot bit 3: slot 16 i2 + 8 i1 + 2 t + i0
        holds k = 8 t + i1 + 2 i2 + 4 i0), 1 elsewhere. Every value is exact in fp16."""
        r = gl.arange(0, BN, layout=gl.SliceLayout(1, W_OPERAND))[:, None]
        k = gl.arange(0, 32, layout=gl.SliceLayout(0, W_OPERAND))[None, :]
        w = gl.where((r // 8) % 2 == 1, gl.where((k // 8) % 2 == 1, 16.0, 1.0), -1024.0)
        return w.to(gl.float16)

    @gluon.jit
    def _x_sums(x0, x1, x2, x3, ones, like, GROUP: gl.constexpr, MMA: gl.constexpr,
                SWAP: gl.constexpr):  # fmt: skip
        """x's row sums (the zero points' and BIAS's term) on the tensor cores, in like's shape:
        blocks 0-1 and, with GROUP 64 apart, 2-3 (else all four in the second)."""
        z = gl.zeros(like.shape, gl.float32, layout=MMA)
        xs0 = _mma(x1, ones, _mma(x0, ones, z, SWAP), SWAP)
        if GROUP == 64:
            xs1 = z
        else:
            xs1 = xs0
        return xs0, _mma(x3, ones, _mma(x2, ones, xs1, SWAP), SWAP)

    @gluon.jit
    def _light_step(acc_u, acc_g, u0, u1, u2, u3, g0, g1, g2, g3, c, c_lo, c_next, x_cur, x_ptr,
                    x_off, x_mask, xk, x_smem, ones, us_ptr, uz_ptr, gs_ptr, gz_ptr, N, K, G, sc,
                    s_mask, DUAL: gl.constexpr, SYMMETRIC: gl.constexpr, GROUP: gl.constexpr,
                    TAIL: gl.constexpr, DTYPE: gl.constexpr, CHAINS: gl.constexpr,
                    MMA: gl.constexpr, SWAP: gl.constexpr):  # fmt: skip
        """Chunk c: its scales, x_cur staged (slot order) and read as A fragments (SWAP: B), x
        of chunk c_next loaded, then acc += s (x q - z sum x) for the up (and gate) words.
        Returns the accumulators and the next x."""
        X_OPERAND: gl.constexpr = gl.DotOperandLayout(operand_index=1 if SWAP else 0, parent=MMA,
                                                      k_width=2)  # fmt: skip
        W_OPERAND: gl.constexpr = gl.DotOperandLayout(operand_index=0 if SWAP else 1, parent=MMA,
                                                      k_width=2)  # fmt: skip
        su0, zu0, su1, zu1 = _scales(us_ptr, uz_ptr, c, N, G, sc, s_mask, SYMMETRIC, GROUP)
        if DUAL:
            sg0, zg0, sg1, zg1 = _scales(gs_ptr, gz_ptr, c, N, G, sc, s_mask, SYMMETRIC, GROUP)
        x0, x1, x2, x3 = _stage(x_smem, c - c_lo, x_cur, True, X_OPERAND, SWAP)
        x_next = _x_chunk(x_ptr, x_off, x_mask, xk, c_next * _CHUNK, K, TAIL)
        xs0, xs1 = _x_sums(x0, x1, x2, x3, ones, acc_u, GROUP, MMA, SWAP)
        acc_u = _apply(acc_u, x0, x1, x2, x3, u0, u1, u2, u3, xs0, xs1, su0, zu0, su1, zu1,
                       SYMMETRIC, GROUP, DTYPE, CHAINS, W_OPERAND, MMA, SWAP)  # fmt: skip
        if DUAL:
            acc_g = _apply(acc_g, x0, x1, x2, x3, g0, g1, g2, g3, xs0, xs1, sg0, zg0, sg1, zg1,
                           SYMMETRIC, GROUP, DTYPE, CHAINS, W_OPERAND, MMA, SWAP)  # fmt: skip
        return acc_u, acc_g, x_next

    @gluon.jit
    def _light_words(up_ptr, gp_ptr, w_off, w_mask, c, c_lo, N, KR, DUAL: gl.constexpr,
                     TAIL: gl.constexpr):  # fmt: skip
        """Chunk c's up words and (DUAL) gate words (the up words again without DUAL)."""
        off = w_off + (c - c_lo) * 16 * N
        u0, u1, u2, u3 = _chunk_words(up_ptr, off, w_mask, c * 16, N, KR, TAIL)
        g0, g1, g2, g3 = u0, u1, u2, u3
        if DUAL:
            g0, g1, g2, g3 = _chunk_words(gp_ptr, off, w_mask, c * 16, N, KR, TAIL)
        return u0, u1, u2, u3, g0, g1, g2, g3

    @gluon.jit
    def _slice_start(stride_xm, M, n0, N, BM: gl.constexpr, BN: gl.constexpr,
                     DTYPE: gl.constexpr, X_LAYOUT: gl.constexpr, W_OPERAND: gl.constexpr,
                     MMA: gl.constexpr, SWAP: gl.constexpr):  # fmt: skip
        """What a light slice starts from: x's chunk offsets, mask, k index and shared tile;
        its columns' scale offsets and mask; the ones operand of x's sums; zero accumulators
        ([BM, BN], SWAP: [BN, BM])."""
        x_off, x_mask, xk, x_smem = _x_tiles(stride_xm, M, BM, DTYPE, X_LAYOUT)
        sc = _columns(n0, BN, MMA, SWAP)
        if SWAP:
            ones = gl.full([BN, 32], 1.0, DTYPE, layout=W_OPERAND)
            acc = gl.zeros([BN, BM], gl.float32, layout=MMA)
        else:
            ones = gl.full([32, BN], 1.0, DTYPE, layout=W_OPERAND)
            acc = gl.zeros([BM, BN], gl.float32, layout=MMA)
        if SWAP and gl.float16 == DTYPE:
            ones = _sum_weights(BN, W_OPERAND)
        return x_off, x_mask, xk, x_smem, sc, sc < N, ones, acc, acc

    @gluon.jit
    def _columns(n0, BN: gl.constexpr, MMA: gl.constexpr, SWAP: gl.constexpr):
        """Output columns n0 .. n0 + BN - 1 along the accumulator's column axis (SWAP: rows)."""
        if SWAP:
            cols = n0 + gl.arange(0, BN, layout=gl.SliceLayout(1, MMA))
        else:
            cols = n0 + gl.arange(0, BN, layout=gl.SliceLayout(0, MMA))
        return cols

    @gluon.jit
    def _ring_copy(w_smem, ptr, stage, cc, n0, N, KR, TAIL: gl.constexpr, BN: gl.constexpr,
                   C_LAYOUT: gl.constexpr):  # fmt: skip
        """cp.async of chunk cc's 16 word rows x BN columns into ring stage `stage` (16 bytes a
        thread; rows past K and columns past N zero-filled)."""
        r = gl.arange(0, 16, layout=gl.SliceLayout(1, C_LAYOUT))
        n = gl.arange(0, BN, layout=gl.SliceLayout(0, C_LAYOUT))
        mask = ((n0 + n) < N)[None, :] & (r < 16)[:, None]
        if TAIL:
            mask = mask & ((cc * 16 + r) < KR)[:, None]
        ptrs = ptr + (cc * 16 + r)[:, None] * N + (n0 + n)[None, :]
        _async_load(w_smem.index(stage), ptrs, mask=mask)

    @gluon.jit
    def _ring_words(w_smem, stage, W_LAYOUT: gl.constexpr):
        """Chunk words [4, BN] x 4 blocks from ring stage `stage`."""
        return _quarters(w_smem.index(stage), 4, 0, W_LAYOUT)

    @gluon.jit
    def _ring_slice(x_ptr, stride_xm, M, K, up_ptr, us_ptr, uz_ptr, gp_ptr, gs_ptr, gz_ptr, N, n0,
                    c_lo, c_hi, DUAL: gl.constexpr, SYMMETRIC: gl.constexpr,
                    GROUP: gl.constexpr, TAIL: gl.constexpr, DTYPE: gl.constexpr,
                    BM: gl.constexpr, BN: gl.constexpr, STAGES: gl.constexpr,
                    CHAINS: gl.constexpr,
                    W_LAYOUT: gl.constexpr, X_LAYOUT: gl.constexpr, C_LAYOUT: gl.constexpr,
                    MMA: gl.constexpr, SWAP: gl.constexpr, PDL: gl.constexpr = False):  # fmt: skip
        """_light_slice with the words through a STAGES-deep cp.async ring in shared memory
        (a tuner candidate; it lost to the register path on an H200, session 11): STAGES - 1
        chunks in flight without holding
        them in registers. Step c: wait for chunk c's copies (this thread's), stage x (its
        barrier also publishes every thread's copies of chunk c and ends every thread's reads of
        step c - 1), copy chunk c + STAGES - 1 into the stage step c - 1 read, read chunk c's
        words, multiply."""
        X_OPERAND: gl.constexpr = gl.DotOperandLayout(operand_index=1 if SWAP else 0, parent=MMA,
                                                      k_width=2)  # fmt: skip
        W_OPERAND: gl.constexpr = gl.DotOperandLayout(operand_index=0 if SWAP else 1, parent=MMA,
                                                      k_width=2)  # fmt: skip
        KR = K // 8
        G = gl.cdiv(K, GROUP)
        WS: gl.constexpr = gl.SwizzledSharedLayout(vec=4, per_phase=1, max_phase=4,
                                                   order=[1, 0])  # fmt: skip
        wu_smem = gl.allocate_shared_memory(gl.int32, [STAGES, 16, BN], WS)
        wg_smem = wu_smem
        if DUAL:
            wg_smem = gl.allocate_shared_memory(gl.int32, [STAGES, 16, BN], WS)
        x_off, x_mask, xk, x_smem, sc, s_mask, ones, acc_u, acc_g = _slice_start(
            stride_xm, M, n0, N, BM, BN, DTYPE, X_LAYOUT, W_OPERAND, MMA, SWAP
        )
        last = c_hi - 1
        for i in gl.static_range(STAGES - 1):  # prologue: chunks c_lo .. c_lo + STAGES - 2
            cc = gl.minimum(c_lo + i, last)
            _ring_copy(wu_smem, up_ptr, i, cc, n0, N, KR, TAIL, BN, C_LAYOUT)
            if DUAL:
                _ring_copy(wg_smem, gp_ptr, i, cc, n0, N, KR, TAIL, BN, C_LAYOUT)
            async_copy.commit_group()
        _pdl_wait(PDL)  # the weights above need nothing from the previous kernel; x does
        x_next = _x_chunk(x_ptr, x_off, x_mask, xk, c_lo * _CHUNK, K, TAIL)
        for c in range(c_lo, c_hi):
            j = c - c_lo
            su0, zu0, su1, zu1 = _scales(us_ptr, uz_ptr, c, N, G, sc, s_mask, SYMMETRIC, GROUP)
            if DUAL:
                sg0, zg0, sg1, zg1 = _scales(gs_ptr, gz_ptr, c, N, G, sc, s_mask, SYMMETRIC,
                                             GROUP)  # fmt: skip
            async_copy.wait_group(STAGES - 2)
            x0, x1, x2, x3 = _stage(x_smem, j, x_next, True, X_OPERAND, SWAP)
            x_next = _x_chunk(x_ptr, x_off, x_mask, xk, gl.minimum(c + 1, last) * _CHUNK, K,
                              TAIL)  # fmt: skip
            cc = gl.minimum(c + STAGES - 1, last)
            _ring_copy(wu_smem, up_ptr, (j + STAGES - 1) % STAGES, cc, n0, N, KR, TAIL, BN,
                       C_LAYOUT)  # fmt: skip
            if DUAL:
                _ring_copy(wg_smem, gp_ptr, (j + STAGES - 1) % STAGES, cc, n0, N, KR, TAIL, BN,
                           C_LAYOUT)  # fmt: skip
            async_copy.commit_group()
            u0, u1, u2, u3 = _ring_words(wu_smem, j % STAGES, W_LAYOUT)
            xs0, xs1 = _x_sums(x0, x1, x2, x3, ones, acc_u, GROUP, MMA, SWAP)
            acc_u = _apply(acc_u, x0, x1, x2, x3, u0, u1, u2, u3, xs0, xs1, su0, zu0, su1, zu1,
                           SYMMETRIC, GROUP, DTYPE, CHAINS, W_OPERAND, MMA, SWAP)  # fmt: skip
            if DUAL:
                g0, g1, g2, g3 = _ring_words(wg_smem, j % STAGES, W_LAYOUT)
                acc_g = _apply(acc_g, x0, x1, x2, x3, g0, g1, g2, g3, xs0, xs1, sg0, zg0, sg1,
                               zg1, SYMMETRIC, GROUP, DTYPE, CHAINS, W_OPERAND, MMA,
                               SWAP)  # fmt: skip
        async_copy.wait_group(0)
        return acc_u, acc_g

    @gluon.jit
    def _light_slice(x_ptr, stride_xm, M, K, up_ptr, us_ptr, uz_ptr, gp_ptr, gs_ptr, gz_ptr,
                     N, n0, c_lo, c_hi, DUAL: gl.constexpr, SYMMETRIC: gl.constexpr,
                     GROUP: gl.constexpr, TAIL: gl.constexpr, DTYPE: gl.constexpr,
                     BM: gl.constexpr, BN: gl.constexpr, DEPTH: gl.constexpr,
                     CHAINS: gl.constexpr, W_LAYOUT: gl.constexpr, X_LAYOUT: gl.constexpr,
                     MMA: gl.constexpr, SWAP: gl.constexpr, PDL: gl.constexpr = False):  # fmt: skip
        """fp32 [BM, BN] (SWAP: [BN, BM]) x times columns n0.. of one (DUAL: two) packed int4
        weights [N, K] over chunks c_lo .. c_hi - 1 (c_hi > c_lo). Returns (up, gate) (gate = up
        without DUAL).

        DEPTH 1: the next chunk's words are loaded at the top of each step into new registers
        and moved into the current ones at its end; the moves wait for those loads, so the
        chunk after is requested only once the next one has arrived (sm_90 SASS: one chunk in
        flight). DEPTH 2: two steps a loop iteration on two register sets, each set reloaded
        (chunk c + 2) right after its step: no moves, two chunks in flight."""
        W_OPERAND: gl.constexpr = gl.DotOperandLayout(operand_index=0 if SWAP else 1, parent=MMA,
                                                      k_width=2)  # fmt: skip
        KR = K // 8  # word rows
        G = gl.cdiv(K, GROUP)
        wr = gl.arange(0, 4, layout=gl.SliceLayout(1, W_LAYOUT))
        wc = gl.arange(0, BN, layout=gl.SliceLayout(0, W_LAYOUT))
        w_off = wr[:, None] * N + (n0 + wc)[None, :] + c_lo * 16 * N
        w_mask = ((n0 + wc) < N)[None, :]
        x_off, x_mask, xk, x_smem, sc, s_mask, ones, acc_u, acc_g = _slice_start(
            stride_xm, M, n0, N, BM, BN, DTYPE, X_LAYOUT, W_OPERAND, MMA, SWAP
        )
        last = c_hi - 1
        u0, u1, u2, u3, g0, g1, g2, g3 = _light_words(up_ptr, gp_ptr, w_off, w_mask, c_lo, c_lo,
                                                      N, KR, DUAL, TAIL)  # fmt: skip
        _pdl_wait(PDL)  # the weights above need nothing from the previous kernel; x does
        x_next = _x_chunk(x_ptr, x_off, x_mask, xk, c_lo * _CHUNK, K, TAIL)
        if DEPTH == 2:
            c1 = gl.minimum(c_lo + 1, last)
            v0, v1, v2, v3, h0, h1, h2, h3 = _light_words(up_ptr, gp_ptr, w_off, w_mask, c1, c_lo,
                                                          N, KR, DUAL, TAIL)  # fmt: skip
            for c in range(c_lo, c_hi - 1, 2):  # chunks c and c + 1 (both < c_hi)
                acc_u, acc_g, x_next = _light_step(
                    acc_u, acc_g, u0, u1, u2, u3, g0, g1, g2, g3, c, c_lo, c + 1, x_next, x_ptr,
                    x_off, x_mask, xk, x_smem, ones, us_ptr, uz_ptr, gs_ptr, gz_ptr, N, K, G, sc,
                    s_mask, DUAL, SYMMETRIC, GROUP, TAIL, DTYPE, CHAINS, MMA, SWAP,
                )  # fmt: skip
                u0, u1, u2, u3, g0, g1, g2, g3 = _light_words(
                    up_ptr, gp_ptr, w_off, w_mask, gl.minimum(c + 2, last), c_lo, N, KR, DUAL,
                    TAIL,
                )  # fmt: skip
                acc_u, acc_g, x_next = _light_step(
                    acc_u, acc_g, v0, v1, v2, v3, h0, h1, h2, h3, c + 1, c_lo,
                    gl.minimum(c + 2, last), x_next, x_ptr, x_off, x_mask, xk, x_smem, ones,
                    us_ptr, uz_ptr, gs_ptr, gz_ptr, N, K, G, sc, s_mask, DUAL, SYMMETRIC, GROUP,
                    TAIL, DTYPE, CHAINS, MMA, SWAP,
                )  # fmt: skip
                v0, v1, v2, v3, h0, h1, h2, h3 = _light_words(
                    up_ptr, gp_ptr, w_off, w_mask, gl.minimum(c + 3, last), c_lo, N, KR, DUAL,
                    TAIL,
                )  # fmt: skip
            if (c_hi - c_lo) % 2 == 1:  # an odd count: the last chunk is in u (and g)
                acc_u, acc_g, x_next = _light_step(
                    acc_u, acc_g, u0, u1, u2, u3, g0, g1, g2, g3, last, c_lo, last, x_next,
                    x_ptr, x_off, x_mask, xk, x_smem, ones, us_ptr, uz_ptr, gs_ptr, gz_ptr, N, K,
                    G, sc, s_mask, DUAL, SYMMETRIC, GROUP, TAIL, DTYPE, CHAINS, MMA, SWAP,
                )  # fmt: skip
        else:
            for c in range(c_lo, c_hi):
                # the next chunk's words and x in flight while this one is multiplied (clamped
                # at the last chunk: loaded again, never used)
                c_next = gl.minimum(c + 1, last)
                v0, v1, v2, v3, h0, h1, h2, h3 = _light_words(up_ptr, gp_ptr, w_off, w_mask,
                                                              c_next, c_lo, N, KR, DUAL,
                                                              TAIL)  # fmt: skip
                acc_u, acc_g, x_next = _light_step(
                    acc_u, acc_g, u0, u1, u2, u3, g0, g1, g2, g3, c, c_lo, c_next, x_next, x_ptr,
                    x_off, x_mask, xk, x_smem, ones, us_ptr, uz_ptr, gs_ptr, gz_ptr, N, K, G, sc,
                    s_mask, DUAL, SYMMETRIC, GROUP, TAIL, DTYPE, CHAINS, MMA, SWAP,
                )  # fmt: skip
                u0, u1, u2, u3, g0, g1, g2, g3 = v0, v1, v2, v3, h0, h1, h2, h3
        return acc_u, acc_g

    @gluon.jit
    def _dense_block(ptr, off, mask, koff, k0, K, TAIL: gl.constexpr):
        """Dense rows [BN, 4, 8] of the 32-k block at k0 (k past K read as 0 with TAIL)."""
        if TAIL:
            mask = mask & (k0 + koff < K)
        return gl.load(ptr + off + k0, mask=mask, other=0.0)

    @gluon.jit
    def _dense_chunk(ptr, off, mask, koff, k0, K, TAIL: gl.constexpr):
        h0 = _dense_block(ptr, off, mask, koff, k0, K, TAIL)
        h1 = _dense_block(ptr, off, mask, koff, k0 + 32, K, TAIL)
        h2 = _dense_block(ptr, off, mask, koff, k0 + 64, K, TAIL)
        h3 = _dense_block(ptr, off, mask, koff, k0 + 96, K, TAIL)
        return h0, h1, h2, h3

    @gluon.jit
    def _dense_product(acc, x0, x1, x2, x3, h0, h1, h2, h3, B_LAYOUT: gl.constexpr):
        acc = mma_v2(x0, _rows(h0, B_LAYOUT), acc)
        acc = mma_v2(x1, _rows(h1, B_LAYOUT), acc)
        acc = mma_v2(x2, _rows(h2, B_LAYOUT), acc)
        return mma_v2(x3, _rows(h3, B_LAYOUT), acc)

    @gluon.jit
    def _heavy_slice(x_ptr, stride_xm, M, K, hu_ptr, hg_ptr, stride_hw, N, n0, c_lo, c_hi,
                     DUAL: gl.constexpr, TAIL: gl.constexpr, DTYPE: gl.constexpr,
                     BM: gl.constexpr, BN: gl.constexpr, H_LAYOUT: gl.constexpr,
                     X_LAYOUT: gl.constexpr, MMA: gl.constexpr, PDL: gl.constexpr = False):  # fmt: skip
        """fp32 [BM, BN] x times rows n0.. of one (DUAL: two) dense [N, K] weights over chunks
        c_lo .. c_hi - 1. Returns (up, gate) (gate = up without DUAL)."""
        A_LAYOUT: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
        B_LAYOUT: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)
        hr = gl.arange(0, BN, layout=gl.SliceLayout(1, gl.SliceLayout(2, H_LAYOUT)))
        ht = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(2, H_LAYOUT)))
        hj = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, H_LAYOUT)))
        koff = gl.expand_dims(gl.expand_dims(ht * 8, 0), 2) + gl.expand_dims(
            gl.expand_dims(hj, 0), 1
        )  # [1, 4, 8]
        rows = gl.expand_dims(gl.expand_dims(n0 + hr, 1), 2)  # [BN, 1, 1]
        h_off = rows * stride_hw + koff
        h_mask = rows < N
        x_off, x_mask, xk, x_smem = _x_tiles(stride_xm, M, BM, DTYPE, X_LAYOUT)
        acc_u = gl.zeros([BM, BN], gl.float32, layout=MMA)
        acc_g = acc_u
        u0, u1, u2, u3 = _dense_chunk(hu_ptr, h_off, h_mask, koff, c_lo * _CHUNK, K, TAIL)
        g0, g1, g2, g3 = u0, u1, u2, u3
        if DUAL:
            g0, g1, g2, g3 = _dense_chunk(hg_ptr, h_off, h_mask, koff, c_lo * _CHUNK, K, TAIL)
        _pdl_wait(PDL)  # the weights above need nothing from the previous kernel; x does
        x_next = _x_chunk(x_ptr, x_off, x_mask, xk, c_lo * _CHUNK, K, TAIL)
        for c in range(c_lo, c_hi):
            k_next = gl.minimum(c + 1, c_hi - 1) * _CHUNK
            v0, v1, v2, v3 = _dense_chunk(hu_ptr, h_off, h_mask, koff, k_next, K, TAIL)
            f0, f1, f2, f3 = v0, v1, v2, v3
            if DUAL:
                f0, f1, f2, f3 = _dense_chunk(hg_ptr, h_off, h_mask, koff, k_next, K, TAIL)
            x0, x1, x2, x3 = _stage(x_smem, c - c_lo, x_next, False, A_LAYOUT, False)
            x_next = _x_chunk(x_ptr, x_off, x_mask, xk, k_next, K, TAIL)
            acc_u = _dense_product(acc_u, x0, x1, x2, x3, u0, u1, u2, u3, B_LAYOUT)
            u0, u1, u2, u3 = v0, v1, v2, v3
            if DUAL:
                acc_g = _dense_product(acc_g, x0, x1, x2, x3, g0, g1, g2, g3, B_LAYOUT)
                g0, g1, g2, g3 = f0, f1, f2, f3
        return acc_u, acc_g

    @gluon.jit
    def _tile(M, stride, cols, n_mask, BM: gl.constexpr, MMA: gl.constexpr,
              SWAP: gl.constexpr):  # fmt: skip
        """Offsets m * stride + col and mask of an accumulator tile (rows m < M, columns
        `cols`): [BM, BN], or [BN, BM] with SWAP."""
        if SWAP:
            om = gl.arange(0, BM, layout=gl.SliceLayout(0, MMA))
            off = om[None, :] * stride + cols[:, None]
            mask = (om < M)[None, :] & n_mask[:, None]
        else:
            om = gl.arange(0, BM, layout=gl.SliceLayout(1, MMA))
            off = om[:, None] * stride + cols[None, :]
            mask = (om < M)[:, None] & n_mask[None, :]
        return off, mask

    @gluon.jit
    def _store_partial(ws_ptr, acc, slot, M, NT, cols, n_mask, BM: gl.constexpr,
                       MMA: gl.constexpr, SWAP: gl.constexpr):  # fmt: skip
        """fp32 partial sums (acc [BM, BN], SWAP: [BN, BM]) into slot rows ws[slot, m, cols]
        (ws [.., M, NT])."""
        off, mask = _tile(M, NT, cols, n_mask, BM, MMA, SWAP)
        gl.store(ws_ptr + slot * M * NT + off, acc, mask=mask)

    @gluon.jit
    def _act(g, ACTIVATION: gl.constexpr):
        """tiles.activation in Gluon (fp32)."""
        if ACTIVATION == "silu":
            return g / (1.0 + gl.exp(-g))
        elif ACTIVATION == "gelu":
            return 0.5 * g * (1.0 + gl.erf(g * 0.7071067811865476))
        elif ACTIVATION == "gelu_tanh":
            inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
            return g / (1.0 + gl.exp(-2.0 * inner))  # 0.5 * (1 + tanh(t)) == sigmoid(2t)
        elif ACTIVATION == "identity":  # kernel B's finish: the sum and the bias only
            return g
        else:
            return gl.maximum(g, 0.0)

    @gluon.jit
    def _slot_sum(ptrs, n, stride, mask, MMA: gl.constexpr):
        """The sum of slots 0 .. n - 1 (ptrs + s * stride, fp32) in slot order, four loads in
        flight a step: a loop of one load a slot would wait an L2 round trip for each (kernel B
        finishes ~16 slots). Loads bypass L1 (.cg): other programs wrote them."""
        total = gl.zeros(ptrs.shape, gl.float32, layout=MMA)
        for s in range(0, n, 4):
            v0 = gl.load(ptrs + s * stride, mask=mask, other=0.0, cache_modifier=".cg")
            v1 = gl.load(ptrs + (s + 1) * stride, mask=mask & (s + 1 < n), other=0.0,
                         cache_modifier=".cg")  # fmt: skip
            v2 = gl.load(ptrs + (s + 2) * stride, mask=mask & (s + 2 < n), other=0.0,
                         cache_modifier=".cg")  # fmt: skip
            v3 = gl.load(ptrs + (s + 3) * stride, mask=mask & (s + 3 < n), other=0.0,
                         cache_modifier=".cg")  # fmt: skip
            total += v0
            total += v1
            total += v2
            total += v3
        return total

    @gluon.jit
    def _slot_group(ptr, s0, n, stride, M, NT, c0, c_end, SB: gl.constexpr, W: gl.constexpr,
                    FM: gl.constexpr, L3: gl.constexpr):  # fmt: skip
        """The sum over slots s0 .. s0 + SB - 1 (< n) of ws[slot, m, c0 + j] as [W, FM] (ptr:
        slot 0 of the dual, stride: a slot's words): SB slots loaded at once (one L2 round trip),
        added in a fixed tree."""
        s = s0 + gl.arange(0, SB, layout=gl.SliceLayout(1, gl.SliceLayout(2, L3)))
        j = gl.arange(0, W, layout=gl.SliceLayout(0, gl.SliceLayout(2, L3)))
        r = gl.arange(0, FM, layout=gl.SliceLayout(0, gl.SliceLayout(1, L3)))
        s3 = gl.expand_dims(gl.expand_dims(s, 1), 2)
        j3 = gl.expand_dims(gl.expand_dims(c0 + j, 0), 2)
        r3 = gl.expand_dims(gl.expand_dims(r, 0), 1)
        mask = (s3 < n) & (j3 < c_end) & (r3 < M)
        v = gl.load(ptr + s3 * stride + r3 * NT + j3, mask=mask, other=0.0, cache_modifier=".cg")
        return gl.reduce(v, 0, _add)  # gl.sum is a tl function: unusable with TRITON_INTERPRET

    @gluon.jit
    def _add(a, b):
        return a + b

    @gluon.jit
    def _slots_sum(ptr, n, stride, M, NT, c0, c_end, SB: gl.constexpr, W: gl.constexpr,
                   FM: gl.constexpr, L3: gl.constexpr):  # fmt: skip
        """All n slots of one dual: groups of SB slots (_slot_group) added in order."""
        total = gl.zeros([W, FM], gl.float32, layout=gl.SliceLayout(0, L3))
        for s0 in range(0, n, SB):
            total += _slot_group(ptr, s0, n, stride, M, NT, c0, c_end, SB, W, FM, L3)
        return total

    @gluon.jit
    def _finish_rows(ws_ptr, a_ptr, ub_ptr, gb_ptr, M, NT, stride_am, c0, c_end, n_split,
                     DUAL: gl.constexpr, ACTIVATION: gl.constexpr, HAS_UP_BIAS: gl.constexpr,
                     HAS_GATE_BIAS: gl.constexpr, W: gl.constexpr, FM: gl.constexpr,
                     SB: gl.constexpr):  # fmt: skip
        """_finish for columns c0 .. c0 + W - 1 (< c_end) of at most FM rows in a layout of its
        own: the columns along the threads, FM rows and SB slots in registers. At M = 1 a thread
        holds one word a slot, so kernel B's 16 slots are one load round trip where the MMA
        layout (8 words a thread a slot, 7 of them masked) took four. The slot groups are added
        in order, each in a fixed tree: the same result whichever program arrives last."""
        L3: gl.constexpr = gl.BlockedLayout([1, 1, FM], [1, 32, 1], [1, gl.num_warps(), 1],
                                            [2, 1, 0])  # fmt: skip
        DUALS: gl.constexpr = 2 if DUAL else 1
        stride = DUALS * M * NT
        up = _slots_sum(ws_ptr, n_split, stride, M, NT, c0, c_end, SB, W, FM, L3)
        gate = up
        if DUAL:
            gate = _slots_sum(ws_ptr + M * NT, n_split, stride, M, NT, c0, c_end, SB, W, FM, L3)
        j = c0 + gl.arange(0, W, layout=gl.SliceLayout(1, gl.SliceLayout(0, L3)))
        r = gl.arange(0, FM, layout=gl.SliceLayout(0, gl.SliceLayout(0, L3)))
        jm = j < c_end
        # [W, FM] has the features first, as the W-as-A form's accumulators (SWAP)
        _store_tile(up, gate, ub_ptr, gb_ptr, a_ptr + r[None, :] * stride_am + j[:, None], j, jm,
                    jm[:, None] & (r < M)[None, :], DUAL, ACTIVATION, HAS_UP_BIAS, HAS_GATE_BIAS,
                    True)  # fmt: skip

    @gluon.jit
    def _store_tile(up, gate, ub_ptr, gb_ptr, a_ptrs, cols, n_mask, mask, DUAL: gl.constexpr,
                    ACTIVATION: gl.constexpr, HAS_UP_BIAS: gl.constexpr,
                    HAS_GATE_BIAS: gl.constexpr, SWAP: gl.constexpr):  # fmt: skip
        """A finished tile's sums out: biases of columns `cols`, the activation (and gating),
        stored at a_ptrs where mask."""
        if HAS_UP_BIAS:
            up += _per_n(gl.load(ub_ptr + cols, mask=n_mask, other=0.0).to(gl.float32), SWAP)
        if DUAL:
            if HAS_GATE_BIAS:
                gb = gl.load(gb_ptr + cols, mask=n_mask, other=0.0).to(gl.float32)
                gate += _per_n(gb, SWAP)
            out = _act(gate, ACTIVATION) * up
        else:
            out = _act(up, ACTIVATION)
        gl.store(a_ptrs, out.to(a_ptrs.dtype.element_ty), mask=mask)

    @gluon.jit
    def _finish(ws_ptr, a_ptr, ub_ptr, gb_ptr, M, NT, stride_am, cols, n_mask, n_split,
                DUAL: gl.constexpr, ACTIVATION: gl.constexpr, HAS_UP_BIAS: gl.constexpr,
                HAS_GATE_BIAS: gl.constexpr, BM: gl.constexpr, MMA: gl.constexpr,
                SWAP: gl.constexpr):  # fmt: skip
        """a[:, cols] = finish(sum of the tile's slots 0 .. n_split - 1 in slot order): the same
        result whichever program arrives last."""
        DUALS: gl.constexpr = 2 if DUAL else 1
        off, mask = _tile(M, NT, cols, n_mask, BM, MMA, SWAP)
        up = _slot_sum(ws_ptr + off, n_split, DUALS * M * NT, mask, MMA)
        gate = up
        if DUAL:
            gate = _slot_sum(ws_ptr + M * NT + off, n_split, DUALS * M * NT, mask, MMA)
        a_off, _ = _tile(M, stride_am, cols, n_mask, BM, MMA, SWAP)
        _store_tile(up, gate, ub_ptr, gb_ptr, a_ptr + a_off, cols, n_mask, mask, DUAL,
                    ACTIVATION, HAS_UP_BIAS, HAS_GATE_BIAS, SWAP)  # fmt: skip

    @gluon.jit
    def _arrive(cnt_ptr, tile, n_split, ws_ptr, a_ptr, ub_ptr, gb_ptr, M, NT, stride_am, cols,
                n_mask, DUAL: gl.constexpr, ACTIVATION: gl.constexpr,
                HAS_UP_BIAS: gl.constexpr, HAS_GATE_BIAS: gl.constexpr, BM: gl.constexpr,
                MMA: gl.constexpr, SWAP: gl.constexpr, ROWS: gl.constexpr = False, c0=0,
                c_end=0, W: gl.constexpr = 1, FM: gl.constexpr = 1,
                SB: gl.constexpr = 1):  # fmt: skip
        """Count this program's partials of `tile` in (a CTA barrier, then one acq_rel atomic);
        the program that brings the count to n_split finishes the tile and resets the counter
        for the next launch. No per-thread fence (CUTLASS's semaphore releases the same way):
        in the PTX memory model bar.sync synchronizes the CTA's threads, and causality order is
        transitive, so the ticket's release at GPU scope covers every thread's partials stored
        before the barrier; the finisher's acquire, then its barrier, make them visible to all
        its threads. Session 18, H200: kernel A -0.6 / -3.5 / -3.8 us at M = 1 / 4 / 8 without
        the fence. ROWS: the finish in _finish_rows' layout (`cols` = c0 .. c0 + W - 1 below
        c_end, at most FM rows, SB slots a load)."""
        _barrier()
        ticket = gl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if ticket == n_split - 1:
            _barrier()
            if ROWS:
                _finish_rows(ws_ptr, a_ptr, ub_ptr, gb_ptr, M, NT, stride_am, c0, c_end, n_split,
                             DUAL, ACTIVATION, HAS_UP_BIAS, HAS_GATE_BIAS, W, FM, SB)  # fmt: skip
            else:
                _finish(ws_ptr, a_ptr, ub_ptr, gb_ptr, M, NT, stride_am, cols, n_mask, n_split,
                        DUAL, ACTIVATION, HAS_UP_BIAS, HAS_GATE_BIAS, BM, MMA, SWAP)  # fmt: skip
            gl.atomic_xchg(cnt_ptr + tile, 0, sem="relaxed", scope="gpu")

    @gluon.jit
    def _up_kernel(x_ptr, hu_ptr, hg_ptr, up_ptr, us_ptr, uz_ptr, gp_ptr, gs_ptr, gz_ptr, ws_ptr,
                   cnt_ptr, a_ptr, ub_ptr, gb_ptr, M, K, NH, NL, stride_xm, stride_hw,
                   stride_am, DUAL: gl.constexpr, FUSED: gl.constexpr,
                   ACTIVATION: gl.constexpr, HAS_UP_BIAS: gl.constexpr,
                   HAS_GATE_BIAS: gl.constexpr,
                   SYMMETRIC: gl.constexpr, GROUP: gl.constexpr, TAIL: gl.constexpr,
                   DTYPE: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr,
                   BNH: gl.constexpr, DEPTH: gl.constexpr, CHAINS: gl.constexpr,
                   W_LAYOUT: gl.constexpr, H_LAYOUT: gl.constexpr, X_LAYOUT: gl.constexpr,
                   C_LAYOUT: gl.constexpr, MMA: gl.constexpr, SWAP: gl.constexpr,
                   BMH: gl.constexpr, MMA_H: gl.constexpr, PDL: gl.constexpr):  # fmt: skip
        """Kernel A's up (and gate) sums of K-slice program_id(1) for one tile of heavy rows
        (the first programs along axis 0, BNH neurons) or light columns (BN neurons), as fp32
        partials into ws [slices, 2 (1 without DUAL), M, NH + NL]. FUSED: the last of a tile's
        slices to arrive adds them and writes a [M, NH + NL] (biases, activation, gating);
        otherwise gemv's reduce kernel does, in a second launch. Heavy tiles are always x-as-A
        products (BMH rows, layout MMA_H): in the W-as-A form (SWAP) the light tiles only.
        PDL: a programmatic dependent launch (trigger first; each slice loads its first words,
        then waits for the previous kernel before it reads x)."""
        _pdl_trigger(PDL)
        pid = gl.program_id(0)
        split = gl.program_id(1)
        n_split = gl.num_programs(1)
        chunks = gl.cdiv(K, _CHUNK)
        c_lo = split * chunks // n_split
        c_hi = (split + 1) * chunks // n_split
        heavy_tiles = gl.cdiv(NH, BNH)
        NT = NH + NL
        DUALS: gl.constexpr = 2 if DUAL else 1
        if pid < heavy_tiles:
            # names apart from the light branch's: tiles of other widths
            h_u, h_g = _heavy_slice(x_ptr, stride_xm, M, K, hu_ptr, hg_ptr, stride_hw, NH,
                                    pid * BNH, c_lo, c_hi, DUAL, TAIL, DTYPE, BMH, BNH,
                                    H_LAYOUT, X_LAYOUT, MMA_H, PDL)  # fmt: skip
            h_cols = _columns(pid * BNH, BNH, MMA_H, False)
            _store_partial(ws_ptr, h_u, split * DUALS, M, NT, h_cols, h_cols < NH, BMH, MMA_H,
                           False)  # fmt: skip
            if DUAL:
                _store_partial(ws_ptr, h_g, split * DUALS + 1, M, NT, h_cols, h_cols < NH, BMH,
                               MMA_H, False)  # fmt: skip
            if FUSED:
                _arrive(cnt_ptr, pid, n_split, ws_ptr, a_ptr, ub_ptr, gb_ptr, M, NT, stride_am,
                        h_cols, h_cols < NH, DUAL, ACTIVATION, HAS_UP_BIAS, HAS_GATE_BIAS,
                        BMH, MMA_H, False)  # fmt: skip
        else:
            l0 = (pid - heavy_tiles) * BN
            if DEPTH == 3:
                l_u, l_g = _ring_slice(x_ptr, stride_xm, M, K, up_ptr, us_ptr, uz_ptr, gp_ptr,
                                       gs_ptr, gz_ptr, NL, l0, c_lo, c_hi, DUAL, SYMMETRIC,
                                       GROUP, TAIL, DTYPE, BM, BN, 4, CHAINS, W_LAYOUT,
                                       X_LAYOUT, C_LAYOUT, MMA, SWAP, PDL)  # fmt: skip
            else:
                l_u, l_g = _light_slice(x_ptr, stride_xm, M, K, up_ptr, us_ptr, uz_ptr, gp_ptr,
                                        gs_ptr, gz_ptr, NL, l0, c_lo, c_hi, DUAL, SYMMETRIC,
                                        GROUP, TAIL, DTYPE, BM, BN, DEPTH, CHAINS, W_LAYOUT,
                                        X_LAYOUT, MMA, SWAP, PDL)  # fmt: skip
            l_cols = _columns(l0, BN, MMA, SWAP)
            _store_partial(ws_ptr, l_u, split * DUALS, M, NT, NH + l_cols, l_cols < NL, BM, MMA,
                           SWAP)  # fmt: skip
            if DUAL:
                _store_partial(ws_ptr, l_g, split * DUALS + 1, M, NT, NH + l_cols, l_cols < NL,
                               BM, MMA, SWAP)  # fmt: skip
            if FUSED:
                _arrive(cnt_ptr, pid, n_split, ws_ptr, a_ptr, ub_ptr, gb_ptr, M, NT, stride_am,
                        NH + l_cols, l_cols < NL, DUAL, ACTIVATION, HAS_UP_BIAS, HAS_GATE_BIAS,
                        BM, MMA, SWAP)  # fmt: skip

    @gluon.jit
    def _down_kernel(xh_ptr, xl_ptr, hw_ptr, p_ptr, s_ptr, z_ptr, ws_ptr, cnt_ptr, out_ptr, b_ptr,
                     M, N, KH, KL, stride_xm, stride_hw, stride_om, SL, FUSED: gl.constexpr,
                     HAS_BIAS: gl.constexpr, SYMMETRIC: gl.constexpr, GROUP: gl.constexpr,
                     TAIL_L: gl.constexpr, TAIL_H: gl.constexpr, DTYPE: gl.constexpr,
                     BM: gl.constexpr, BN: gl.constexpr, DEPTH: gl.constexpr,
                     CHAINS: gl.constexpr, W_LAYOUT: gl.constexpr, H_LAYOUT: gl.constexpr,
                     X_LAYOUT: gl.constexpr, C_LAYOUT: gl.constexpr, MMA: gl.constexpr,
                     SWAP: gl.constexpr, BMH: gl.constexpr, BNH: gl.constexpr,
                     MMA_H: gl.constexpr, PDL: gl.constexpr, FM: gl.constexpr,
                     SB: gl.constexpr, TRIGGER: gl.constexpr = True,
                     PREFETCH: gl.constexpr = False):  # fmt: skip
        """Kernel B (or any split linear): fp32 partials ws [slices, M, N] of output columns
        program_id(0) * BN ..; slices 0 .. SL - 1 cover the packed columns (x = xl [M, KL]), the
        others the dense ones (x = xh [M, KH]): both parts end in one reduce, by the last slice
        of the tile to arrive (FUSED: out = sum + bias, no second launch) or by quant_matmul's
        reduce kernel. The dense slices are x-as-A products (BMH rows, layout MMA_H) of BN / BNH
        column tiles in turn. PDL: as in _up_kernel; TRIGGER False: no early trigger (the next
        kernel launches when this one ends), the wait kept. PREFETCH (with PDL): the dense
        slices ask for their whole K-slice in L2 before the wait, while the previous kernels
        (a decoder's attention, latency-bound) leave the memory idle."""
        if TRIGGER:
            _pdl_trigger(PDL)
        pid = gl.program_id(0)
        split = gl.program_id(1)
        n0 = pid * BN
        if split < SL:
            chunks = gl.cdiv(KL, _CHUNK)
            c_lo = split * chunks // SL
            c_hi = (split + 1) * chunks // SL
            if DEPTH == 3:
                acc, _ = _ring_slice(xl_ptr, stride_xm, M, KL, p_ptr, s_ptr, z_ptr, p_ptr, s_ptr,
                                     z_ptr, N, n0, c_lo, c_hi, False, SYMMETRIC, GROUP, TAIL_L,
                                     DTYPE, BM, BN, 4, CHAINS, W_LAYOUT, X_LAYOUT, C_LAYOUT,
                                     MMA, SWAP, PDL)  # fmt: skip
            else:
                acc, _ = _light_slice(xl_ptr, stride_xm, M, KL, p_ptr, s_ptr, z_ptr, p_ptr,
                                      s_ptr, z_ptr, N, n0, c_lo, c_hi, False, SYMMETRIC, GROUP,
                                      TAIL_L, DTYPE, BM, BN, DEPTH, CHAINS, W_LAYOUT, X_LAYOUT,
                                      MMA, SWAP, PDL)  # fmt: skip
            cols = _columns(n0, BN, MMA, SWAP)
            _store_partial(ws_ptr, acc, split, M, N, cols, cols < N, BM, MMA, SWAP)
        else:
            sh = gl.num_programs(1) - SL
            chunks = gl.cdiv(KH, _CHUNK)
            c_lo = (split - SL) * chunks // sh
            c_hi = (split - SL + 1) * chunks // sh
            if PDL and PREFETCH:
                _prefetch_block(hw_ptr, n0, gl.minimum(BN, N - n0), stride_hw, c_lo * _CHUNK,
                                gl.minimum(c_hi * _CHUNK, KH) - c_lo * _CHUNK, KH, 64)  # fmt: skip
            for sub in gl.static_range(BN // BNH):
                h0 = n0 + sub * BNH
                h_acc, h_acc2 = _heavy_slice(xh_ptr, stride_xm, M, KH, hw_ptr, hw_ptr, stride_hw, N,
                                        h0, c_lo, c_hi, False, TAIL_H, DTYPE, BMH, BNH,
                                        H_LAYOUT, X_LAYOUT, MMA_H, PDL)  # fmt: skip
                h_cols = _columns(h0, BNH, MMA_H, False)
                _store_partial(ws_ptr, h_acc, split, M, N, h_cols, h_cols < N, BMH, MMA_H, False)
        if FUSED:
            f_cols = _columns(n0, BN, MMA, SWAP)
            _arrive(cnt_ptr, pid, gl.num_programs(1), ws_ptr, out_ptr, b_ptr, b_ptr, M, N,
                    stride_om, f_cols, f_cols < N, False, "identity", HAS_BIAS, False, BM, MMA,
                    SWAP, FM <= 8, n0, N, BN, FM, SB)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# launch plumbing


@dataclass(frozen=True)
class MmaConfig:
    """num_warps warps side by side along N with `tiles` n8 tiles each (light tiles of
    8 * num_warps * tiles columns; kernel A's heavy tiles one n8 tile a warp); K-slices for
    `waves` whole waves of `resident` programs an SM (what the registers let reside on sm_90);
    words loaded `depth` chunks ahead (3: through a 4-stage cp.async ring)."""

    num_warps: int = 4
    tiles: int = 2
    resident: int = 4
    waves: int = 1
    depth: int = 1
    fused: bool = False  # kernel A: the last slice to arrive finishes its tile (no reduce launch)
    chains: int = 1  # MMA accumulator chains a chunk (2: less dependent latency, more registers)
    rows: int = 1  # m16 row tiles a program (BM = 16 rows each): the weights are read once for M
    # W as the A operand (up to 16 rows): m16 tiles of output features, the rows of x in the n8
    # columns (8 rows, or two n8 tiles for 9-16); `tiles` m16 tiles a warp
    swap: bool = False
    maxnreg: int | None = None  # a register cap for `resident` programs an SM (ptxas may spill)

    @property
    def block_n(self) -> int:
        """Output columns of a light tile."""
        return (16 if self.swap else 8) * self.num_warps * self.tiles

    @property
    def block_nh(self) -> int:
        """Output columns of one of kernel A's heavy tiles: one n8 tile a warp (x as A in both
        forms)."""
        return 8 * self.num_warps

    def block_m(self, m: int) -> int:
        """Rows of x a program takes."""
        if self.swap:
            return 8 if m <= 8 else 16
        return BLOCK_M * self.rows


# H100, Llama-3-8B shape, each config alone (session 9, benchmarks/RESULTS.md), M = 4 / 16:
# kernel A fused 33.9 / 36.0 us, with the reduce launch 34.4 / 36.6; dropped: 8 x 2 (35.4 / 37.4)
# and depth 2 (166 registers, 3 programs an SM: 39.4 / 42.3). Kernel B 24.0 / 24.8 us, depth 2
# 24.1 / 24.8, 4 x 4 depth 2 23.4 / 26.1; dropped: two waves (26.6 / 29.3). The first config of
# each is the default (FFNSPLIT_AUTOTUNE=0). sm_90 registers (fp16): kernel A 128 (4 programs an
# SM; bf16 153: 3), kernel B 4 x 2 125-128 (4), 4 x 4 depth 2 247 (2).
UP_CONFIGS = (
    MmaConfig(4, 2, resident=4, waves=1, fused=True),
    MmaConfig(4, 2, resident=4, waves=1),
    # H200, session 11, M = 1 / 4 / 16: cp.async ring 29.7 / 32.8 / 34.1 us against the first
    # config's 30.5 / 32.6 / 34.1; two chains 37.9 / 40.8 / 42.2 (results/bench_mma_h200_s11_rows)
    MmaConfig(4, 2, resident=4, waves=1, depth=3, fused=True),
    MmaConfig(4, 2, resident=3, waves=1, fused=True, chains=2),
)
DOWN_CONFIGS = (
    # H200, session 13, M = 1 / 4 / 16: 20.6 / 21.9 / 22.9 us against the next one's 22.0 /
    # 22.6 / 23.1 (148 registers without the cap: 3 programs an SM, not the 4 assumed)
    MmaConfig(4, 2, resident=4, fused=True, maxnreg=128),
    MmaConfig(4, 2, resident=4, waves=1),
    MmaConfig(4, 2, resident=4, waves=1, depth=2),
    MmaConfig(4, 4, resident=2, waves=1, depth=2),
    # H200, session 11, M = 1 / 4 / 16: the ring and the chains 22.0-25.1 us against the depth-2
    # 4 x 4 config's 19.8 / 20.6 / 23.6
    MmaConfig(4, 2, resident=4, waves=1, depth=3),
    MmaConfig(4, 2, resident=4, waves=1, chains=2),
    MmaConfig(4, 2, resident=4, waves=1, depth=3, chains=2),
)
# more than 16 rows: 2 or 4 m16 tiles a program, the weights read once for all rows (H200,
# session 11: M = 32 85.5 us for the FFN, M = 64 145.6; benchmarks/RESULTS.md); sm_90 AOT (fp16): kernel A 4 x 2 168 registers at 32 rows
# (3 an SM), 255 at 64 (2), 4 x 1 189 at 64; kernel B 4 x 2 150 at 32, 204 at 64
# Session 13, sm_90 AOT (Triton 3.6, fp16, K tail off): the 2-row configs compile to 202
# (kernel A) and 212 (kernel B) registers, 2 programs an SM where 3 are assumed (1.5 waves); the
# second candidates were a 168-register cap without spills (kernel A) and one wave of 2 (kernel
# B). H200, session 14, each alone at M = 32 (results/bench_mma_h200_s14_16_32.json): kernel A
# 63.2 us, capped 62.5 (kept for the tuner); kernel B 32.7, one wave of 2 40.2 (dropped)
UP_ROWS = {
    2: (
        MmaConfig(4, 2, resident=3, fused=True, rows=2),
        MmaConfig(4, 2, resident=3, fused=True, rows=2, maxnreg=168),
    ),
    4: (MmaConfig(4, 1, resident=2, fused=True, rows=4), MmaConfig(4, 2, resident=2, rows=4)),
}
DOWN_ROWS = {
    2: (MmaConfig(4, 2, resident=3, rows=2),),
    4: (MmaConfig(4, 2, resident=2, rows=4), MmaConfig(4, 1, resident=2, rows=4)),
}


# W as the A operand (MmaConfig.swap), up to SWAP_MAX_M rows. sm_90 AOT (fp16, Llama-3-8B
# shape): kernel A 4 x 1 127 registers (4 programs an SM), light loop 2.4 SASS instructions a
# code (x-as-A 4 x 2: 3.0); 4 x 2 168 (3), 2.1; kernel B 4 x 2 128 (4), 2.9 (x-as-A 4 x 2 148,
# 4.9); 4 x 1 123 (4); 4 x 2 depth 2 168 (3). H200, session 13, each alone, M = 1 / 4 / 16
# (results/bench_mma_h200_s13_swap.json): kernel A 26.9 / 26.9 / 47.6 us (x-as-A best 29.5 /
# 31.4 / 32.8; GEMV at M = 1 27.8); kernel B 19.3 / 19.6 / 27.9, 4 x 1 20.1 / 20.0 / 23.6
# (x-as-A best 21.6 / 20.7 / 22.5; GEMV 17.2). So up to 8 rows only: at 16 the second n8 tile
# doubles the MMAs a word and the x-as-A tiles win.
# Second round (results/bench_mma_h200_s13_swap2.json, M = 1 / 2 / 4 / 8), kernel A: the
# 4 x 1 cp.async ring 25.5 / 26.0 / 26.2 / 26.6 us, 4 x 1 26.9 / 26.7 / 26.9 / 27.5; dropped:
# 4 x 2 (28.0-29.6), 4 x 1 depth 2 (27.0-30.8), two waves (29.0-30.5). Kernel B (fused: the
# last slice adds the tile's partials, no reduce launch; 19.3 -> 17.6 us at M = 1 for 4 x 2):
# 4 x 2 17.8 / 18.5 / 18.7 / 19.9, 4 x 1 depth 2 17.9 / 18.6 / 19.5 / 19.9, 4 x 2 ring
# 18.3-20.5; dropped: 4 x 1 (19.6-20.3), two waves (20.9-24.7).
UP_SWAP = (
    MmaConfig(4, 1, resident=4, fused=True, swap=True, depth=3),
    MmaConfig(4, 1, resident=4, fused=True, swap=True),
)
DOWN_SWAP = (
    MmaConfig(4, 2, resident=4, swap=True, fused=True, maxnreg=128),
    MmaConfig(4, 1, resident=4, swap=True, fused=True, depth=2),
    MmaConfig(4, 2, resident=4, swap=True, fused=True, depth=3, maxnreg=128),
)
# Session 14 at 16 rows with configs whose registers fit what they assume (sm_90 AOT: kernel A's
# ring 127, 4 x 1 148 so resident 3; kernel B 4 x 1 capped at 128 without spills; H200, JSON
# results/bench_mma_h200_s14_swap16.json): kernel A 33.7 / 43.9 us against x-as-A 30.3, kernel B
# 22.7 against 21.9. So still 8 rows.
SWAP_MAX_M = 8
# FFNSPLIT_MMA_SWAP: "1" (default) the W-as-A configs are candidates up to SWAP_MAX_M rows
# (first: the pick without the tuner), "0" they are not, "only" nothing else up to SWAP_MAX_M
# rows (path="mma" forces this tier, so "only" with it forces this form)
SWAP = os.environ.get("FFNSPLIT_MMA_SWAP", "1")


def candidates(table: tuple, by_rows: dict, swapped: tuple, m: int) -> tuple:
    """The candidates for M rows: the W-as-A configs (per FFNSPLIT_MMA_SWAP) and `table` up to
    16 rows, else those of 2 or 4 m16 tiles."""
    rows = triton.next_power_of_2(triton.cdiv(m, BLOCK_M))
    if rows > 1:
        return by_rows[rows]
    if m <= SWAP_MAX_M and SWAP == "only":
        return swapped
    if m <= SWAP_MAX_M and SWAP == "1":
        return swapped + table
    return table


if os.environ.get("FFNSPLIT_MMA_FUSED", "1") == "0":  # comparisons: no fused kernel A
    UP_CONFIGS = tuple(c for c in UP_CONFIGS if not c.fused)
    UP_ROWS = {r: tuple(c for c in t if not c.fused) for r, t in UP_ROWS.items()}


@functools.cache
def layouts(num_warps: int, tiles: int, swap: bool = False) -> tuple:
    """(W_LAYOUT, H_LAYOUT (dense rows of `tiles` n8 tiles a warp), H1_LAYOUT (one n8 tile a
    warp), X_LAYOUT, MMA, C_LAYOUT) for num_warps warps along N; with `swap`, m16 tiles of the
    W-as-A form."""
    if swap:
        return _swap_layouts(num_warps, tiles)
    mma = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, num_warps],
                                    instr_shape=[16, 8])  # fmt: skip
    log_w, log_t = num_warps.bit_length() - 1, tiles.bit_length() - 1
    # words [4 (t), BN]: lane 4 n + t of an n8 tile, the warps' tiles side by side, a warp's
    # further tiles (every 8 * num_warps columns) in registers, as in the MMA layout
    words = gl.DistributedLinearLayout(
        reg_bases=[[0, 8 * num_warps << i] for i in range(log_t)],
        lane_bases=[[1, 0], [2, 0], [0, 1], [0, 2], [0, 4]],
        warp_bases=[[0, 8 << i] for i in range(log_w)],
        block_bases=[], shape=[4, 8 * num_warps * tiles],
    )  # fmt: skip

    def rows(t: int) -> object:  # dense rows [BN, 4 (t), 8 (k)]: 8 consecutive k a lane
        return gl.DistributedLinearLayout(
            reg_bases=[[0, 0, 1], [0, 0, 2], [0, 0, 4]]
            + [[8 * num_warps << i, 0, 0] for i in range(t.bit_length() - 1)],
            lane_bases=[[0, 1, 0], [0, 2, 0], [1, 0, 0], [2, 0, 0], [4, 0, 0]],
            warp_bases=[[8 << i, 0, 0] for i in range(log_w)],
            block_bases=[], shape=[8 * num_warps * t, 4, 8],
        )  # fmt: skip

    # x's [16, 128] chunk read coalesced: 8 values (16 bytes) a thread
    x_layout = gl.BlockedLayout([1, 8], [2, 16], [num_warps, 1], [1, 0])
    copy = _copy_layout(num_warps, 8 * num_warps * tiles)
    return words, rows(tiles), rows(1), x_layout, mma, copy


def _copy_layout(num_warps: int, block_n: int) -> object:
    """A chunk's words [16, BN] copied into the ring (DEPTH 3): 4 words (16 bytes) a thread."""
    lanes_n = min(32, block_n // 4)
    return gl.BlockedLayout([1, 4], [32 // lanes_n, lanes_n], [num_warps, 1], [1, 0])


def _swap_layouts(num_warps: int, tiles: int) -> tuple:
    """layouts() of the W-as-A form: warps stacked along the output features (dim 0 of the
    [BN, BM] accumulators), `tiles` m16 tiles a warp in registers. The dense rows of both
    kernels stay x-as-A products, so no dense-row layouts."""
    mma = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[num_warps, 1],
                                    instr_shape=[16, 8])  # fmt: skip
    log_w, log_t = num_warps.bit_length() - 1, tiles.bit_length() - 1
    # words [4 (t), BN]: lane 4 g + t holds word row t of columns g and g + 8 (a register
    # apart) of its warp's m16 tile; the A fragment rows g and g + 8
    words = gl.DistributedLinearLayout(
        reg_bases=[[0, 8]] + [[0, 16 * num_warps << i] for i in range(log_t)],
        lane_bases=[[1, 0], [2, 0], [0, 1], [0, 2], [0, 4]],
        warp_bases=[[0, 16 << i] for i in range(log_w)],
        block_bases=[], shape=[4, 16 * num_warps * tiles],
    )  # fmt: skip
    x_layout = gl.BlockedLayout([1, 8], [2, 16], [num_warps, 1], [1, 0])
    copy = _copy_layout(num_warps, 16 * num_warps * tiles)
    return words, None, None, x_layout, mma, copy  # dense rows: x-as-A tiles (layouts(..))


def _slices(cfg: MmaConfig, tiles: int, sms: int) -> int:
    """K-slices of `tiles` output tiles that fill cfg.waves whole waves: a last, partial wave of
    these latency-bound programs costs about as much as a full one."""
    return max(1, cfg.resident * sms * cfg.waves // tiles)


def _meta(cfg: MmaConfig, m: int, heavy_tiles: int) -> dict:
    """The tile constexprs both kernels take for M rows: light tiles per cfg, dense rows in x-as-A
    tiles of `heavy_tiles` n8 tiles a warp."""
    words, _, _, x_layout, mma, copy = layouts(cfg.num_warps, cfg.tiles, cfg.swap)
    _, rows, _, _, mma_h, _ = layouts(cfg.num_warps, heavy_tiles)
    return dict(BM=cfg.block_m(m), BN=cfg.block_n, DEPTH=cfg.depth, CHAINS=cfg.chains,
                W_LAYOUT=words, H_LAYOUT=rows, X_LAYOUT=x_layout, C_LAYOUT=copy, MMA=mma,
                SWAP=cfg.swap, BMH=BLOCK_M if cfg.swap else cfg.block_m(m),
                MMA_H=mma_h)  # fmt: skip


def up_meta(cfg: MmaConfig, m: int) -> dict:
    """_up_kernel's tile constexprs: heavy tiles of one n8 tile a warp (cfg.block_nh)."""
    return dict(_meta(cfg, m, 1), BNH=cfg.block_nh)


def down_meta(cfg: MmaConfig, m: int) -> dict:
    """_down_kernel's tile constexprs: its dense slices take a light tile's columns in x-as-A
    tiles of at most 2 n8 tiles a warp in the W-as-A form (its m16 tiles hold twice the
    registers), all at once in the x-as-A form."""
    heavy_tiles = min(cfg.block_n // (8 * cfg.num_warps), 2 if cfg.swap else cfg.tiles)
    # FM: the rows of its tile finish (_finish_rows up to 8, the MMA layout's _finish above)
    return dict(_meta(cfg, m, heavy_tiles), BNH=8 * cfg.num_warps * heavy_tiles,
                FM=triton.next_power_of_2(m))  # fmt: skip


_up_tuner = Tuner()
_down_tuner = Tuner()


def _finish_slots(m: int, split: int) -> int:
    """K-slices _finish_rows loads at once for M rows and `split` slices: 16 words a thread at
    one row, 32 at 2-8 rows (what the MMA layout's four slots a load held), no more than
    there are."""
    return min(16, max(4, 32 // triton.next_power_of_2(m)), triton.next_power_of_2(split))


def _gl_dtype(dtype: torch.dtype):
    return gl.float16 if dtype == torch.float16 else gl.bfloat16


def split_activations(x2: torch.Tensor, w: SplitFFNWeights, a: torch.Tensor) -> None:
    """Kernel A into a [M, h + l] (x2 [M <= MAX_M, H] contiguous rows; light weights per
    `light_ok`): fp32 partials of every heavy and light tile, added in slot order with biases,
    activation and gating by the last slice of each tile (fused configs) or by gemv's reduce
    kernel."""
    m, hidden = x2.shape
    h, n_light = w.n_heavy, w.n_light
    nt = h + n_light
    # never read (no light tiles) or never written (counters of unfused configs): a cached
    # int32 buffer, not an allocation (and a fill kernel) per call
    dummy = gemv._zeroed(x2.device, 1, torch.int32)
    hu = w.heavy_up.contiguous() if h else x2
    hg = w.heavy_gate.contiguous() if h and w.gated else hu
    if n_light:
        up, gate = w.light_up, w.light_gate if w.gated else w.light_up
        symmetric, group = up.symmetric, up.group_size
        light = [up.planes[0], up.scales, up.zeros if up.zeros is not None else up.scales,
                 gate.planes[0], gate.scales,
                 gate.zeros if gate.zeros is not None else gate.scales]  # fmt: skip
    else:  # never read: no light tiles
        symmetric, group = True, 128
        light = [dummy, x2, x2] * 2
    chunks = triton.cdiv(hidden, CHUNK)
    sms = sm_count(x2.device)
    duals = 2 if w.gated else 1
    up_bias = w.up_bias if w.up_bias is not None else a
    gate_bias = w.gate_bias if w.gate_bias is not None else a
    pdl = pdl_options(x2.device)  # PDL (constexpr) and launch_pdl

    def run(cfg: MmaConfig) -> None:
        bnh = cfg.block_nh
        tiles = triton.cdiv(h, bnh) + triton.cdiv(n_light, cfg.block_n)
        split = min(_slices(cfg, tiles, sms), chunks)
        ws = torch.empty((split, duals, m, nt), dtype=torch.float32, device=x2.device)
        counters = gemv._zeroed(x2.device, tiles, torch.int32) if cfg.fused else dummy
        _up_kernel[(tiles, split)](
            x2, hu, hg, *light, ws, counters, a, up_bias, gate_bias, m, hidden, h, n_light,
            x2.stride(0), hu.stride(0), a.stride(0), DUAL=w.gated, FUSED=cfg.fused,
            ACTIVATION=w.activation, HAS_UP_BIAS=w.up_bias is not None,
            HAS_GATE_BIAS=w.gated and w.gate_bias is not None, SYMMETRIC=symmetric, GROUP=group,
            TAIL=hidden % CHUNK != 0, DTYPE=_gl_dtype(x2.dtype), **up_meta(cfg, m), **pdl,
            num_warps=cfg.num_warps,
            maxnreg=cfg.maxnreg,
        )  # fmt: skip
        if cfg.fused:
            return
        block = 512
        gemv._gemv_reduce_kernel[(triton.cdiv(m * nt, block),)](
            ws, up_bias, gate_bias, a, m, nt, a.stride(0), 0, 0, split, split, DUAL=w.gated,
            ACT=True, ACTIVATION=w.activation, HAS_UP_BIAS=w.up_bias is not None,
            HAS_GATE_BIAS=w.gated and w.gate_bias is not None, BLOCK=block,
            BLOCK_S=triton.next_power_of_2(split), PDL=False, num_warps=4,
        )  # fmt: skip

    key = (triton.next_power_of_2(m), hidden, h, n_light, group, symmetric, w.gated, x2.dtype,
           x2.device)  # fmt: skip
    run(_up_tuner.pick(key, candidates(UP_CONFIGS, UP_ROWS, UP_SWAP, m), run))


# What a dense byte costs kernel B against a packed one when its K-slices are shared out: a
# packed chunk also unpacks and scales its codes, so its bytes take longer. H200, session 18
# (Llama-3-8B FFN, default W-as-A config, 16 slices a tile: 13 packed + 3 dense at 1.0, 14 + 2 at
# 0.75): kernel B -0.7 to -1.1 us and the layer -0.8 to -1.7 us at M = 1-8, M = 16 and 32
# unchanged (two passes each); 0.5 (15 + 1) was 2 us slower than 1.0.
DENSE_SLICE_WEIGHT = 0.75


def _down_slices(total: int, kh: int, kl: int, group: int) -> tuple[int, int]:
    """(packed, dense) K-slices out of `total`, in proportion to their bytes a column (half a
    byte a code plus a scale and a zero a group, against 2 bytes a dense weight, weighted by
    DENSE_SLICE_WEIGHT), at least one for a part that exists, none longer than a chunk."""
    if not kh:
        return min(total, triton.cdiv(kl, CHUNK)), 0
    if not kl:
        return 0, min(total, triton.cdiv(kh, CHUNK))
    light_bytes, heavy_bytes = kl / 2 + 4 * kl / group, 2 * kh * DENSE_SLICE_WEIGHT
    sh = max(1, round(total * heavy_bytes / (light_bytes + heavy_bytes)))
    sh = min(sh, triton.cdiv(kh, CHUNK))
    return max(1, min(total - sh, triton.cdiv(kl, CHUNK))), sh


# Dense-only split_linear calls (a decoder's projections) keep their PDL wait but let the next
# kernel launch only when they end; FFNSPLIT_DENSE_TRIGGER=1 has them trigger their dependents
# first thing, as the FFN's kernels do. H200, Llama-3-8B decode step with the decoder's
# projections through split_linear (session 19, benchmarks/oracle_decode.py): split step 2,970
# us with the early trigger, 2,586 without (kernel A had launched behind the o projection and
# taken SM slots as its programs left); dense step 4,663 and 4,646.
DENSE_TRIGGER = os.environ.get("FFNSPLIT_DENSE_TRIGGER", "0") == "1"
# FFNSPLIT_DENSE_PREFETCH=1: split_linear(prefetch=True) calls under PDL ask for their dense
# weights in L2 before the wait, for a call that launches while latency-bound kernels still run
# (a decoder's o projection behind its attention: a chain of dependent loads that leaves the
# memory idle). Off by default: H200, session 20, Llama-3-8B decode step, the o projection
# with them: -96 us a split step and -91 a dense one on two cards where the tuner picked the
# 4 x 1 depth-2 config for o (benchmarks/oracle_decode.py), +72 / +61 us with the first config
# (FFNSPLIT_AUTOTUNE=0), and in `ffnsplit bench` on a third card 391.9 -> 384.2 tok/s split and
# 220.0 -> 217.4 dense (benchmarks/results/*_s20_*). The q/k/v projection with them (behind the
# previous FFN's bandwidth-bound kernel B) lost 55-60 us a step everywhere.
DENSE_PREFETCH = os.environ.get("FFNSPLIT_DENSE_PREFETCH", "0") == "1"


def split_linear(x2: torch.Tensor, heavy: torch.Tensor | None, light: QuantizedWeight | None,
                 bias: torch.Tensor | None, out: torch.Tensor, prefetch: bool = False) -> None:  # fmt: skip
    """out [M <= MAX_M, N] = x2[:, :kh] heavy^T + x2[:, kh:] light^T + bias: the light columns'
    K-slices and the heavy columns' K-slices are programs of one launch writing fp32 partials,
    quant_matmul's reduce kernel adds them in order with the bias. `prefetch`: the dense
    slices' weights asked for in L2 before the PDL wait (DENSE_PREFETCH)."""
    from ffnsplit.kernels.quant_matmul import _splitk_reduce_kernel

    m = x2.shape[0]
    n = out.shape[1]
    kh = 0 if heavy is None else heavy.shape[1]
    kl = 0 if light is None else light.shape[1]
    hw = heavy if heavy is not None else x2
    if heavy is not None and heavy.stride(-1) != 1:
        hw = heavy.contiguous()
    if light is not None:
        symmetric, group = light.symmetric, light.group_size
        packed = [light.planes[0], light.scales,
                  light.zeros if light.zeros is not None else light.scales]  # fmt: skip
    else:  # never read: no packed slices (a cached int32 buffer stands in for the words)
        symmetric, group = True, 128
        packed = [gemv._zeroed(x2.device, 1, torch.int32), x2, x2]
    xl = x2[:, kh:] if kl else x2
    sms = sm_count(x2.device)
    pdl = pdl_options(x2.device)

    def run(cfg: MmaConfig) -> None:
        tiles = triton.cdiv(n, cfg.block_n)
        sl, sh = _down_slices(_slices(cfg, tiles, sms), kh, kl, group)
        ws = torch.empty((sl + sh, m, n), dtype=torch.float32, device=x2.device)
        dummy = gemv._zeroed(x2.device, 1, torch.int32)
        counters = gemv._zeroed(x2.device, tiles, torch.int32) if cfg.fused else dummy
        b = bias if bias is not None else out
        _down_kernel[(tiles, sl + sh)](
            x2, xl, hw, *packed, ws, counters, out, b, m, n, kh, kl, x2.stride(0), hw.stride(0),
            out.stride(0), sl, FUSED=cfg.fused, HAS_BIAS=bias is not None, SYMMETRIC=symmetric,
            GROUP=group, TAIL_L=kl % CHUNK != 0, TAIL_H=kh % CHUNK != 0,
            DTYPE=_gl_dtype(x2.dtype), **down_meta(cfg, m), SB=_finish_slots(m, sl + sh), **pdl,
            TRIGGER=light is not None or DENSE_TRIGGER,
            PREFETCH=prefetch and DENSE_PREFETCH,
            num_warps=cfg.num_warps,
            maxnreg=cfg.maxnreg,
        )  # fmt: skip
        if cfg.fused:
            return
        block = 1024
        _splitk_reduce_kernel[(triton.cdiv(m * n, block),)](
            ws, bias if bias is not None else out, out, m * n, n, SPLIT=sl + sh,
            HAS_BIAS=bias is not None, BLOCK=block, num_warps=4,
        )  # fmt: skip

    key = (triton.next_power_of_2(m), n, kh, kl, group, symmetric, x2.dtype, x2.device)
    run(_down_tuner.pick(key, candidates(DOWN_CONFIGS, DOWN_ROWS, DOWN_SWAP, m), run))


def aot_compile(kernel: str, cfg: MmaConfig, m: int = 1, dtype: str = "fp16", *,
                heavy: int = 720, light: int = 13632, hidden: int = 4096, arch: int = 90,
                sms: int = 132, prefetch: bool = False):  # fmt: skip
    """Compile `kernel` ("up": kernel A, "down": kernel B) for one config and M rows ahead of
    time for CUDA sm_`arch`, no GPU needed (Triton's pipeline with its bundled ptxas), at the
    Llama-3-8B FFN shape by default; returns Triton's CompiledKernel (`.asm`: ptx, cubin;
    `aot_resources` reads its registers and spills). benchmarks/aot_mma.py reports it; a CPU test compiles each form with the installed
    Triton, whose Gluon API moves between releases. `prefetch`: kernel B's PREFETCH (the dense
    slices' L2 requests before the wait; light=0 makes it a dense-only split_linear)."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    gdt = gl.float16 if dtype == "fp16" else gl.bfloat16
    t = "*" + dtype
    common = dict(GROUP=128, SYMMETRIC=False, DTYPE=gdt, PDL=True)
    if kernel == "up":
        fn = _up_kernel
        sig = dict(x_ptr=t, hu_ptr=t, hg_ptr=t, up_ptr="*i32", us_ptr=t, uz_ptr=t, gp_ptr="*i32",
                   gs_ptr=t, gz_ptr=t, ws_ptr="*fp32", cnt_ptr="*i32", a_ptr=t, ub_ptr=t,
                   gb_ptr=t, M="i32", K="i32", NH="i32", NL="i32", stride_xm="i32",
                   stride_hw="i32", stride_am="i32")  # fmt: skip
        const = dict(common, **up_meta(cfg, m), DUAL=True, FUSED=cfg.fused, ACTIVATION="silu",
                     HAS_UP_BIAS=False, HAS_GATE_BIAS=False, TAIL=hidden % CHUNK != 0)  # fmt: skip
        aligned = [n for n in sig if n.endswith("_ptr")] + ["K", "stride_xm", "stride_hw"]
        # the runtime specializes an integer divisible by 16 (the Llama-3-8B counts are)
        aligned += [n for n, v in (("NH", heavy), ("NL", light)) if v % 16 == 0]
    else:
        fn = _down_kernel
        sig = dict(xh_ptr=t, xl_ptr=t, hw_ptr=t, p_ptr="*i32", s_ptr=t, z_ptr=t, ws_ptr="*fp32",
                   cnt_ptr="*i32", out_ptr=t, b_ptr=t, M="i32", N="i32", KH="i32", KL="i32",
                   stride_xm="i32", stride_hw="i32", stride_om="i32", SL="i32")  # fmt: skip
        sl, sh = _down_slices(_slices(cfg, triton.cdiv(hidden, cfg.block_n), sms), heavy, light,
                              128)  # fmt: skip
        const = dict(common, **down_meta(cfg, m), SB=_finish_slots(m, sl + sh), FUSED=cfg.fused,
                     HAS_BIAS=False, TRIGGER=True, PREFETCH=prefetch,
                     TAIL_L=light % CHUNK != 0, TAIL_H=heavy % CHUNK != 0)  # fmt: skip
        # x's light part starts at column `heavy`: aligned only if that is a multiple of 8
        aligned = ["xh_ptr", "hw_ptr", "p_ptr", "s_ptr", "z_ptr", "ws_ptr", "cnt_ptr", "out_ptr",
                   "b_ptr", "N", "KH", "stride_xm", "stride_hw", "stride_om"]  # fmt: skip
        if light % 16 == 0:  # the runtime specializes KL too (the Llama-3-8B count is)
            aligned.append("KL")
        if heavy % 8 == 0:
            aligned.append("xl_ptr")
    names = [p.name for p in fn.params]
    signature = {n: sig.get(n, "constexpr") for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    return triton.compile(GluonASTSource(fn, signature, const, attrs),
                          target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": cfg.num_warps, "maxnreg": cfg.maxnreg})  # fmt: skip


def aot_resources(compiled, arch: int = 90) -> tuple[int, int]:
    """(registers a thread, spill-store bytes) of an `aot_compile` result, from `ptxas -v` on
    its PTX (Triton's bundled ptxas; the CompiledKernel reports them only once loaded on a
    GPU)."""
    import re

    log = ptxas_log(compiled.asm["ptx"], arch)
    regs = re.findall(r"Used (\d+) registers", log)
    spills = re.findall(r"(\d+) bytes spill stores", log)
    return int(regs[-1]), int(spills[-1]) if spills else 0


def use(m: int, path: str, x: torch.Tensor, light: QuantizedWeight | None) -> bool:
    """Whether M rows of x take this tier: "auto" for MIN_M <= M <= AUTO_MAX_M when it can run
    them (FFNSPLIT_MMA=0 turns that off); path="mma" forces it for any M <= MAX_M, or says why it
    cannot."""
    if path == "mma":
        if not available(x.device):
            why = _IMPORT_ERROR or "it needs a CUDA GPU of compute capability 8.0 or newer"
            raise ValueError(f"kernel path 'mma' cannot run here: {why}; use path='auto'")
        if m > MAX_M or not light_ok(light, x.dtype):
            raise ValueError(
                "kernel path 'mma' takes at most 64 rows of fp16/bf16 activations and int4 light "
                "weights with groups of 64, 128, 256, ... in the activations' dtype; use "
                "path='auto'"
            )
        return True
    return (
        path == "auto"
        and ENABLED
        and MIN_M <= m <= AUTO_MAX_M
        and available(x.device)
        and light_ok(light, x.dtype)
    )
