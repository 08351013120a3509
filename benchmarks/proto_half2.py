"""Prototype: kernel B's int4 GEMV loop at M = 1 with packed half2 arithmetic.

Measured (H100, session 8, benchmarks/RESULTS.md): 15.4 us for the light part without the x
preparation against 15.8 us for gemv's kernel B on the same weights, relative error 5.9e-4 vs
2.1e-4; not integrated (the GEMV loop at M = 1 is not bound by its instruction count).

The GEMV path (ffnsplit/kernels/gemv.py) turns each int4 code into an exact fp32 and issues about
3.5 SASS instructions a code in kernel B (28 a word of 8 codes); a bytes-only read of the same
35.6 MB takes 13.1 us on an H100 against kernel B's 19.1 us (benchmarks/RESULTS.md, session 7).
This kernel does the light part of the down projection with two codes an instruction:

  * a word's 8 codes become four half2 pairs (1024 + q) or (1024 + 16 q) by one lop3 each
    ((w & mask) | 0x6400_6400, codes j and j + 4 in the two halves; the word shifted by 8 once for
    codes 2, 3, 6, 7), then one sub.f16x2 of (1024, 1024) gives q or 16 q exactly;
  * x is prepared once per call (here by torch; in the real kernel A's epilogue would write it):
    for each word row the pairs (x_j, x_j+4) / 16 for j = 0, 2 and / 256 for j = 1, 3 (so every
    product is x q / 16: fp16 accumulation overflows only for |x| > ~8,000 with a flush every two
    words), plus the sum of x over each 32-k step in fp32 for the zero point;
  * fma.rn.f16x2 accumulates x q / 16 over two words, then the half2 accumulator is added into
    fp32; at the end of each piece of a group: out += s (16 T - z sum x), z and s per column.

About 13 instructions a word for unpack and products plus the flush and one uniform x load a word
row per thread: ~2 a code. Error: the fp16 accumulation rounds at 2^-12 of each two-word partial
(~5e-4 relative expected, against ~2e-4 for the fp32 path).

Run on a GPU (timings and the error against an fp64 reference, and kernel B of gemv.py on the
same weights for comparison):
    PYTHONPATH=. python3 benchmarks/proto_half2.py --out $OUT/proto_half2.json
Without a GPU, `benchmarks/aot_sass.py benchmarks.proto_half2:_half2_kernel ...` compiles it.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

MAGIC = 0x64006400  # the half2 (1024, 1024)

# acc (half2) += sum over the word's 4 pairs of x pair * code pair; $1 word, $2..$5 x pairs
# (codes 0/4, 1/5, 2/6, 3/7), $6 the incoming accumulator, $7 MAGIC
_WORD_ASM = tl.constexpr("""{
.reg .b32 t0, t1, t2, t3, ws;
lop3.b32 t0, $1, 0x000F000F, $7, 0xEA;
lop3.b32 t1, $1, 0x00F000F0, $7, 0xEA;
shr.u32 ws, $1, 8;
lop3.b32 t2, ws, 0x000F000F, $7, 0xEA;
lop3.b32 t3, ws, 0x00F000F0, $7, 0xEA;
sub.f16x2 t0, t0, $7;
sub.f16x2 t1, t1, $7;
sub.f16x2 t2, t2, $7;
sub.f16x2 t3, t3, $7;
fma.rn.f16x2 $0, t0, $2, $6;
fma.rn.f16x2 $0, t1, $3, $0;
fma.rn.f16x2 $0, t2, $4, $0;
fma.rn.f16x2 $0, t3, $5, $0;
}""")

# the two halves of a half2 accumulator as fp32
_FLUSH_ASM = tl.constexpr("""{
.reg .b16 lo, hi;
mov.b32 {lo, hi}, $2;
cvt.f32.f16 $0, lo;
cvt.f32.f16 $1, hi;
}""")


@triton.jit
def _word(w, xp_ptr, row, acc, MAGIC_BITS):
    """acc (half2 bits, [BLOCK_N] int32) += the products of word row `row` (words w)."""
    base = (xp_ptr + row * 4).to(tl.pointer_type(tl.int64))  # two pairs a load
    ab = tl.load(base)
    cd = tl.load(base + 1)
    xa = ab.to(tl.int32) + tl.zeros_like(w)
    xb = (ab >> 32).to(tl.int32) + tl.zeros_like(w)
    xc = cd.to(tl.int32) + tl.zeros_like(w)
    xd = (cd >> 32).to(tl.int32) + tl.zeros_like(w)
    return tl.inline_asm_elementwise(
        _WORD_ASM, "=&r,r,r,r,r,r,r,r", [w, xa, xb, xc, xd, acc, MAGIC_BITS + tl.zeros_like(w)],
        dtype=tl.int32, is_pure=True, pack=1,
    )  # fmt: skip


@triton.jit
def _flush(acc, lo, hi):
    a, b = tl.inline_asm_elementwise(
        _FLUSH_ASM, "=r,=r,r", [acc], dtype=(tl.float32, tl.float32), is_pure=True, pack=1
    )
    return lo + a, hi + b


@triton.jit
def _half2_kernel(p_ptr, s_ptr, z_ptr, xp_ptr, xs_ptr, out_ptr, N, K, SL, MAGIC_BITS,
                  GROUP: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """out[n] += sum over K-slice program_id(1) of x W^T for columns tile program_id(0)."""
    tile = tl.program_id(0)
    split = tl.program_id(1)
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    steps = K // 32
    SPG: tl.constexpr = GROUP // 32
    s_lo, s_hi = split * steps // SL, (split + 1) * steps // SL
    total = tl.zeros([BLOCK_N], dtype=tl.float32)
    for g in range(s_lo // SPG, tl.cdiv(s_hi, SPG)):
        lo = tl.zeros([BLOCK_N], dtype=tl.float32)
        hi = tl.zeros([BLOCK_N], dtype=tl.float32)
        xsum = tl.zeros([], dtype=tl.float32)
        for st in range(tl.maximum(g * SPG, s_lo), tl.minimum(g * SPG + SPG, s_hi)):
            rows = p_ptr + (st * 4) * N + offs_n
            w0 = tl.load(rows, mask=mask_n, other=0)
            w1 = tl.load(rows + N, mask=mask_n, other=0)
            w2 = tl.load(rows + 2 * N, mask=mask_n, other=0)
            w3 = tl.load(rows + 3 * N, mask=mask_n, other=0)
            acc = tl.zeros([BLOCK_N], dtype=tl.int32)
            acc = _word(w0, xp_ptr, st * 4, acc, MAGIC_BITS)
            acc = _word(w1, xp_ptr, st * 4 + 1, acc, MAGIC_BITS)
            lo, hi = _flush(acc, lo, hi)
            acc = tl.zeros([BLOCK_N], dtype=tl.int32)
            acc = _word(w2, xp_ptr, st * 4 + 2, acc, MAGIC_BITS)
            acc = _word(w3, xp_ptr, st * 4 + 3, acc, MAGIC_BITS)
            lo, hi = _flush(acc, lo, hi)
            xsum += tl.load(xs_ptr + st)
        s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        total += s * (16.0 * (lo + hi) - z * xsum)
    tl.atomic_add(out_ptr + offs_n, total, mask=mask_n, sem="relaxed")


_SCALES: dict[torch.device, torch.Tensor] = {}


def prepare_x(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [K] (16-bit) -> (pairs [K / 8, 4] int32: (x_j, x_j+4) / 16 for j = 0, 2 and / 256 for
    j = 1, 3, as fp16 bits; sums of x over each 32-k step [K / 32], fp32)."""
    xw = x.float().view(-1, 8)
    scale = _SCALES.get(x.device)
    if scale is None:  # made once, outside any CUDA-graph capture (a host copy cannot be captured)
        scale = _SCALES[x.device] = torch.tensor(
            [1 / 16, 1 / 256, 1 / 16, 1 / 256], device=x.device
        )
    lo = (xw[:, :4] * scale).half().view(torch.int16).int() & 0xFFFF
    hi = (xw[:, 4:] * scale).half().view(torch.int16).int() & 0xFFFF
    pairs = (lo | (hi << 16)).contiguous()
    return pairs, x.float().view(-1, 32).sum(1).contiguous()


def half2_linear(x: torch.Tensor, qw, block_n: int, warps: int, slices: int) -> torch.Tensor:
    """x [K] @ dequant(qw)^T for an int4 asymmetric QuantizedWeight (fp32 [N])."""
    return half2_prepared(*prepare_x(x), qw, block_n, warps, slices)


def half2_prepared(pairs, sums, qw, block_n: int, warps: int, slices: int) -> torch.Tensor:
    """half2_linear from prepare_x's output: one memset and the kernel."""
    n, k = qw.shape
    out = torch.zeros(n, dtype=torch.float32, device=pairs.device)
    grid = (triton.cdiv(n, block_n), slices)
    _half2_kernel[grid](
        qw.planes[0], qw.scales, qw.zeros, pairs, sums, out, n, k, slices, MAGIC,
        GROUP=qw.group_size, BLOCK_N=block_n, num_warps=warps, num_stages=1,
    )  # fmt: skip
    return out


def main() -> int:
    from bench_decode import graph_time_us, random_qweight
    from bench_floor import write_result

    from ffnsplit.kernels import gemv
    from ffnsplit.kernels.tiles import sm_count

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--k", type=int, default=13632)
    parser.add_argument("--copies", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "half2.json"))
    args = parser.parse_args()
    dev = torch.device("cuda")
    qws = [random_qweight(args.n, args.k, 4, 128) for _ in range(args.copies)]
    x = (torch.randn(args.k, device=dev) * 0.5).half()
    ref = x.double() @ qws[0].dequantize(torch.float64).T
    rows = []
    sms = sm_count(dev)
    for block_n, warps in ((512, 4), (256, 2), (1024, 8)):
        for per_sm in (4, 8, 12):
            slices = max(1, min(args.k // 32, sms * per_sm // triton.cdiv(args.n, block_n)))
            out = half2_linear(x, qws[0], block_n, warps, slices)
            err = ((out.double() - ref).norm() / ref.norm()).item()
            cfg = (block_n, warps, slices)
            us = graph_time_us([(lambda q=q, c=cfg: half2_linear(x, q, *c)) for q in qws])
            pairs, sums = prepare_x(x)
            us_kernel = graph_time_us(
                [(lambda q=q, c=cfg, p=pairs, s=sums: half2_prepared(p, s, q, *c)) for q in qws]
            )
            rows.append(dict(block_n=block_n, warps=warps, slices=slices, us=us,
                             us_without_prep=us_kernel, rel_err=err))  # fmt: skip
            print(f"half2 {block_n}/{warps}w {slices:3d} slices: {us:6.2f} us "
                  f"({us_kernel:6.2f} without the x preparation), rel err {err:.2e}")  # fmt: skip
    outs = [torch.empty(1, args.n, device=dev, dtype=torch.float16) for _ in qws]
    x2 = x[None]
    b_us = graph_time_us(
        [
            (lambda q=q, o=o: gemv.split_linear(x2, None, q, None, o))
            for q, o in zip(qws, outs, strict=True)
        ]
    )
    b_err = ((outs[0][0].double() - ref).norm() / ref.norm()).item()
    print(f"gemv kernel B (light only): {b_us:6.2f} us, rel err {b_err:.2e}")
    write_result(args.out, dev, rows=rows, gemv_b_us=b_us, gemv_b_rel_err=b_err)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
