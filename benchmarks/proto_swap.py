"""Prototype: the int4 light product at M <= 8 on the tensor cores with W as the A operand.

Written in session 12 without device time; first run on an H200 in session 13 (15.5-16.2 us
from M = 1 to 8 against gemv's 14.7 / 26.7 / 47.0, results/proto_swap_h200_s13.json), then
built into the tier as MmaConfig.swap, whose layouts and unpack this script now uses (its own
kernel stays: the light part alone, slices added by torch). The decode tier (ffnsplit/kernels/mma_decode.py) puts x in the m16 rows of m16n8k16 and the
weights in the n8 columns: at M <= 8 it computes 16 rows to use M, and each word feeds two MMAs.
Here D[n, m] (16 x 8) += A[n, k] (16 x 16) B[k, m] (16 x 8): 16 output features a warp tile, up
to 8 tokens in the columns.

  * Lane (g, t) loads word row 4 b + t of columns n0 + g and n0 + g + 8 (the format's order,
    no repacking) and unpacks both with the tier's PTX into p0..p3 = (BIAS + q) pairs
    (k 8t + j, 8t + j + 4). MMA 0 of a 32-k block takes (a0, a1, a2, a3) = (p0(g), p0(g + 8),
    p1(g), p1(g + 8)), MMA 1 p2 and p3: one MMA a word. The k-slot of each half is
    16 i2 + 8 i1 + 2 t + i0 <- k = 8 t + i1 + 2 i2 + 4 i0, the map the tier's CODE_PERM and
    `_slots(x, LIGHT=True)` implement, so x is staged as the tier stages it ([8, 128] a chunk)
    and read as B fragments.
  * Per group (GROUP 128 here: one chunk): blk = A (BIAS + q) x, xs = ones x (one more MMA a
    block, shared by the warp's tiles), acc += s (blk - (z + BIAS) xs).
  * K-slices (grid axis 1) write fp32 partials ws [slice, M, N]; torch adds them here.

sm_90 AOT (Triton 3.6 installed beside Triton 3.9, `PYTHONPATH=<triton 3.6> python
benchmarks/proto_swap.py --aot`): 4 warps x 1 tile 64 registers (8 programs an SM), the loop
198 SASS instructions a chunk for 64 codes a thread (3.1 a code); 4 x 2 tiles 128 registers (4 an
SM), 319 for 128 codes (2.5 a code: 112 unpack, 24 HMMA of which 8 for the sums of x, 16 FFMA,
~32 word addresses, 16 register moves of the double buffer, x staging ~20). For comparison
gemv's kernel B ~3.6 a code (ncu, H200) and the x-as-A tier's kernel B 239 for 64 codes (3.7).
`--check-cpu` checks the k-slot maps in torch; the fragment ownership is asserted by the
compiler (convert_layout(..., assert_trivial=True) compiles). On a GPU (timing against gemv's
kernel B light part on the same weights, and the error against fp64):

    PYTHONPATH=. python3 benchmarks/proto_swap.py --out $OUT/proto_swap.json
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ffnsplit.kernels import mma_decode as md  # noqa: E402

gl = md.gl
gluon = md.gluon

if gluon is not None:
    _CHUNK = gl.constexpr(md.CHUNK)

    @gluon.jit
    def _words_at(ptr, off, mask, N):
        """A chunk's 4 blocks of words: the block pointers are scalars (ptr + 4 N b) and `off`
        the loop-invariant [4, BN] offsets, so each word's address is one IMAD.WIDE."""
        w0 = gl.load(ptr + off, mask=mask, other=0)
        w1 = gl.load(ptr + 4 * N + off, mask=mask, other=0)
        w2 = gl.load(ptr + 8 * N + off, mask=mask, other=0)
        w3 = gl.load(ptr + 12 * N + off, mask=mask, other=0)
        return w0, w1, w2, w3

    @gluon.jit
    def _swap_kernel(x_ptr, p_ptr, s_ptr, z_ptr, ws_ptr, M, N, K, stride_xm, SL,
                     DTYPE: gl.constexpr, BN: gl.constexpr, TAIL: gl.constexpr,
                     W_LAYOUT: gl.constexpr, X_LAYOUT: gl.constexpr,
                     MMA: gl.constexpr):  # fmt: skip
        """ws[split, m, n0 + i] = sum over K-slice `split` of x[m, k] W[n0 + i, k] for int4
        asymmetric groups of 128 (W packed [K / 8, N] int32, scales / zeros [K / 128, N]).
        K a multiple of 128 here (the tier's TAIL handling is left out of the prototype)."""
        A_LAYOUT: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
        B_LAYOUT: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)
        BIAS: gl.constexpr = 1024.0 if gl.float16 == DTYPE else 128.0
        pid = gl.program_id(0)
        split = gl.program_id(1)
        n0 = pid * BN
        chunks = gl.cdiv(K, _CHUNK)
        c_lo = split * chunks // SL
        c_hi = (split + 1) * chunks // SL
        G = gl.cdiv(K, 128)
        wr = gl.arange(0, 4, layout=gl.SliceLayout(1, W_LAYOUT))
        wc = gl.arange(0, BN, layout=gl.SliceLayout(0, W_LAYOUT))
        w_off = wr[:, None] * N + (n0 + wc)[None, :]
        w_mask = ((n0 + wc) < N)[None, :] & (wr < 4)[:, None]
        x_off, x_mask, xk, x_smem = md._x_tiles(stride_xm, M, 8, DTYPE, X_LAYOUT)
        sc = n0 + gl.arange(0, BN, layout=gl.SliceLayout(1, MMA))
        s_mask = sc < N
        ones = gl.full([BN, 32], 1.0, DTYPE, layout=A_LAYOUT)
        zero = gl.zeros([BN, 8], gl.float32, layout=MMA)
        acc = zero
        last = c_hi - 1
        w0, w1, w2, w3 = _words_at(p_ptr + c_lo * 16 * N, w_off, w_mask, N)
        x_next = md._x_chunk(x_ptr, x_off, x_mask, xk, c_lo * _CHUNK, K, TAIL)
        for c in range(c_lo, c_hi):
            c_next = gl.minimum(c + 1, last)
            v0, v1, v2, v3 = _words_at(p_ptr + c_next * 16 * N, w_off, w_mask, N)
            s0, z0, s1, z1 = md._scales(s_ptr, z_ptr, c, N, G, sc, s_mask, False, 128)
            x0, x1, x2, x3 = md._stage(x_smem, c - c_lo, x_next, True, B_LAYOUT, True)
            x_next = md._x_chunk(x_ptr, x_off, x_mask, xk, c_next * _CHUNK, K, TAIL)
            xs = md.mma_v2(ones, x0, zero)
            xs = md.mma_v2(ones, x1, xs)
            xs = md.mma_v2(ones, x2, xs)
            xs = md.mma_v2(ones, x3, xs)
            blk = md.mma_v2(md._codes(w0, DTYPE, A_LAYOUT, True), x0, zero)
            blk = md.mma_v2(md._codes(w1, DTYPE, A_LAYOUT, True), x1, blk)
            blk = md.mma_v2(md._codes(w2, DTYPE, A_LAYOUT, True), x2, blk)
            blk = md.mma_v2(md._codes(w3, DTYPE, A_LAYOUT, True), x3, blk)
            acc += (blk - xs * (z0 + BIAS)[:, None]) * s0[:, None]
            w0, w1, w2, w3 = v0, v1, v2, v3
        om = gl.arange(0, 8, layout=gl.SliceLayout(0, MMA))
        ptrs = ws_ptr + split * M * N + om[None, :] * N + sc[:, None]
        gl.store(ptrs, acc, mask=(om < M)[None, :] & s_mask[:, None])


def layouts(num_warps: int, tiles: int) -> tuple:
    """(W_LAYOUT [4, BN], X_LAYOUT [8, 128], MMA): the tier's own W-as-A layouts (`tiles` m16
    tiles a warp, BN = 16 * num_warps * tiles)."""
    words, _, _, x_layout, mma, _ = md.layouts(num_warps, tiles, True)
    return words, x_layout, mma


def swap_linear(x: torch.Tensor, qw, num_warps: int, tiles: int, slices: int) -> torch.Tensor:
    """x [M <= 8, K] @ dequant(qw)^T, fp32 [M, N] (int4 asymmetric, groups of 128)."""
    m, k = x.shape
    n = qw.shape[0]
    if k % md.CHUNK:
        raise ValueError(f"the prototype takes K a multiple of {md.CHUNK}, not {k}")
    bn = 16 * num_warps * tiles
    ws = torch.empty((slices, m, n), dtype=torch.float32, device=x.device)
    words, x_layout, mma = layouts(num_warps, tiles)
    dtype = gl.float16 if x.dtype == torch.float16 else gl.bfloat16
    _swap_kernel[(triton.cdiv(n, bn), slices)](
        x, qw.planes[0], qw.scales, qw.zeros, ws, m, n, k, x.stride(0), slices, DTYPE=dtype,
        BN=bn, TAIL=False, W_LAYOUT=words, X_LAYOUT=x_layout, MMA=mma,
        num_warps=num_warps,
    )  # fmt: skip
    return ws.sum(0)


def check_cpu() -> None:
    """The prototype's maps in torch: words of one 128-k chunk unpacked the PTX's way, joined
    and permuted as the tier's _codes does with SWAP ([n, slot]), against x permuted as its
    _slots does: the slot-order product must equal x W^T (the A/B fragment ownership itself is
    asserted by the compiler: convert_layout(..., assert_trivial=True))."""
    from ffnsplit.kernels.format import pack_planes

    n, m = 48, 8
    q = torch.randint(0, 16, (n, 128))
    words = pack_planes(q, 4)[0].to(torch.int64) & 0xFFFFFFFF  # [16, n]: 4 blocks of 4 rows
    x = torch.randn(m, 128, dtype=torch.float64)
    xs = x.reshape(m, 4, 4, 2, 2, 2).permute(md.LIGHT_X_PERM).reshape(m, 4, 32)
    total = torch.zeros(n, m, dtype=torch.float64)
    for b in range(4):
        w = words[4 * b : 4 * b + 4]
        regs = [torch.stack([(w >> (4 * j)) & 0xF, (w >> (4 * (j + 4))) & 0xF], -1)
                for j in range(4)]  # fmt: skip
        t = torch.stack([torch.stack(regs[0:2], -1), torch.stack(regs[2:4], -1)], -1)
        codes = t.reshape(2, 2, n, 2, 2, 2).permute(md.CODE_PERM_A).reshape(n, 32)
        total += codes.to(torch.float64) @ xs[:, b].T
    torch.testing.assert_close(total, q.to(torch.float64) @ x.T)
    print("the prototype's k-slot maps agree: codes [n, slot] x [slot, m] = W x^T")


def aot(num_warps: int, tiles: int, dtype: str) -> None:
    """Compile for sm_90 here (no GPU) and print registers and the loop's SASS counts."""
    import tempfile

    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="aot_swap_")
    from aot_sass import report
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    from ffnsplit.kernels.tiles import ptxas_log

    words, x_layout, mma = layouts(num_warps, tiles)
    fn = _swap_kernel
    t = "*" + dtype
    sig = dict(x_ptr=t, p_ptr="*i32", s_ptr=t, z_ptr=t, ws_ptr="*fp32", M="i32", N="i32",
               K="i32", stride_xm="i32", SL="i32")  # fmt: skip
    const = dict(DTYPE=gl.float16 if dtype == "fp16" else gl.bfloat16,
                 BN=16 * num_warps * tiles, TAIL=False, W_LAYOUT=words, X_LAYOUT=x_layout,
                 MMA=mma)  # fmt: skip
    names = [p.name for p in fn.params]
    full = {n: sig.get(n, "constexpr") for n in names}
    aligned = [n for n in sig if n.endswith("_ptr") or n in ("K", "N", "stride_xm")]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = GluonASTSource(fn, full, const, attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": num_warps})  # fmt: skip
    report(f"swap {num_warps}x{tiles} {dtype}", kernel, ptxas_log(kernel.asm["ptx"], 90),
           num_warps)  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--k", type=int, default=13568)  # 106 chunks: the prototype has no tail
    parser.add_argument("--ms", default="1,4,8")
    parser.add_argument("--copies", type=int, default=3)
    parser.add_argument("--aot", action="store_true", help="compile for sm_90 here, no GPU")
    parser.add_argument("--check-cpu", action="store_true", help="the k-slot maps in torch")
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "swap.json"))
    args = parser.parse_args()
    if args.check_cpu:
        check_cpu()
        return 0
    if gluon is None:
        print(f"Gluon does not import: {md._IMPORT_ERROR}", file=sys.stderr)
        return 2
    if args.aot:
        for warps, tiles in ((4, 1), (4, 2)):
            for dtype in ("fp16", "bf16"):
                aot(warps, tiles, dtype)
        return 0
    from bench_decode import graph_time_us, random_qweight
    from bench_floor import write_result

    from ffnsplit.kernels import gemv
    from ffnsplit.kernels.tiles import sm_count

    dev = torch.device("cuda")
    qws = [random_qweight(args.n, args.k, 4, 128) for _ in range(args.copies)]
    sms = sm_count(dev)
    rows = []
    for m in (int(v) for v in args.ms.split(",")):
        for dtype in (torch.float16, torch.bfloat16):
            x = (torch.randn(m, args.k, device=dev) * 0.5).to(dtype)
            ref = x.double() @ qws[0].dequantize(torch.float64).T
            outs = [torch.empty(m, args.n, device=dev, dtype=dtype) for _ in qws]
            b_us = graph_time_us([(lambda q=q, o=o, x=x: gemv.split_linear(x, None, q, None, o))
                                  for q, o in zip(qws, outs, strict=True)])  # fmt: skip
            gemv.split_linear(x, None, qws[0], None, outs[0])
            b_err = ((outs[0].double() - ref).norm() / ref.norm()).item()
            print(f"M={m} {dtype}: gemv kernel B (light only) {b_us:6.2f} us, err {b_err:.1e}")
            for warps, tiles in ((4, 1), (4, 2)):
                for per_sm in (4, 8):
                    tiles_n = triton.cdiv(args.n, 16 * warps * tiles)
                    slices = max(1, min(args.k // 128, sms * per_sm // tiles_n))
                    try:
                        out = swap_linear(x, qws[0], warps, tiles, slices)
                        err = ((out.double() - ref).norm() / ref.norm()).item()
                        us = graph_time_us([(lambda q=q, w=warps, t=tiles, s=slices, x=x:
                                             swap_linear(x, q, w, t, s)) for q in qws])  # fmt: skip
                    except Exception as exc:  # noqa: BLE001 (a prototype: report, go on)
                        print(f"  swap {warps}x{tiles}: {type(exc).__name__}: {exc}"[:400])
                        continue
                    rows.append(dict(m=m, dtype=str(dtype), warps=warps, tiles=tiles,
                                     slices=slices, us=us, rel_err=err, gemv_b_us=b_us,
                                     gemv_b_rel_err=b_err))  # fmt: skip
                    print(f"  swap {warps}x{tiles} {slices:3d} slices: {us:6.2f} us (with the "
                          f"torch sum of slices), err {err:.1e}", flush=True)  # fmt: skip
    write_result(args.out, dev, rows=rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
