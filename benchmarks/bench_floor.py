"""What a kernel that only streams the split FFN's weight bytes costs (GPU only).

The issue's byte floor is weight bytes / copy bandwidth measured on 1 GiB. A decode kernel moves
36-107 MB, where launch, ramp-up and tail are a visible share; this script measures a kernel that
does nothing but read those bytes (16-byte loads, a one-wave grid of programs looping over
contiguous chunks, a register double buffer, one word stored per program so the loads stay), alone
and as a chain of two launches (kernel A's then kernel B's bytes, with PDL as the GEMV kernels
use it), under the same CUDA-graph timing as benchmarks/bench_decode.py. The gap between these
times and the GEMV kernels is what the kernels themselves cost beyond moving their bytes.

    PYTHONPATH=. python3 benchmarks/bench_floor.py --out $OUT/floor.json
    PYTHONPATH=. python3 benchmarks/bench_floor.py --strips --out $OUT/strips.json

--strips reads kernel A's light words the way the decode tier's tensor-core kernels do (column
strips of 64-512 words, 16 word rows a step, K-slices) from the [K / 8, N] layout and from a
strip-major copy: whether the access pattern, not the kernels' arithmetic, bounds them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_decode import copy_bandwidth, graph_time_us  # noqa: E402

from ffnsplit.kernels.tiles import pdl_options, pdl_trigger, pdl_wait, sm_count  # noqa: E402


@triton.jit
def _stream_kernel(src_ptr, out_ptr, N, PER, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """Read src[pid * PER : (pid + 1) * PER] (int32) in [BLOCK] steps, one step ahead."""
    pdl_trigger(PDL)
    pid = tl.program_id(0)
    lo = pid * PER
    hi = tl.minimum(lo + PER, N)
    offs = tl.arange(0, BLOCK)
    nxt = tl.load(src_ptr + lo + offs, mask=lo + offs < hi, other=0)
    pdl_wait(PDL)
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(lo, hi, BLOCK):
        cur = nxt
        nxt = tl.load(src_ptr + start + BLOCK + offs, mask=start + BLOCK + offs < hi, other=0)
        acc ^= cur
    tl.store(out_ptr + pid, tl.reduce(acc, 0, _xor))


@triton.jit
def _fused_kernel(a_ptr, b_ptr, out_ptr, cnt_ptr, flag_ptr, NA, NB, PER_A, PER_B, ITEMS_A,
                  ITEMS_B, BLOCK: tl.constexpr, FLAGS: tl.constexpr, PDL: tl.constexpr):  # fmt: skip
    """Both reads in one launch: persistent programs take items by ticket (cnt[0]), A's chunks
    before B's; a B item loads its first block, then waits until every A item is done (cnt[1]),
    or with FLAGS (session 16, a one-launch FFN's per-tile readiness; not yet run on a GPU) only
    for the A items at its own fraction of the bytes (flag[i] set by A item i). The last
    program out (cnt[2]) zeroes the counters and flags for the next launch (graph replays)."""
    pdl_trigger(PDL)
    pdl_wait(PDL)
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    item = tl.atomic_add(cnt_ptr, 1)
    while item < ITEMS_A + ITEMS_B:
        is_b = item >= ITEMS_A
        src = b_ptr if is_b else a_ptr
        n = NB if is_b else NA
        per = PER_B if is_b else PER_A
        lo = (item - ITEMS_A if is_b else item) * per
        hi = tl.minimum(lo + per, n)
        nxt = tl.load(src + lo + offs, mask=lo + offs < hi, other=0)
        if is_b and FLAGS:  # spin until the A items at this item's share are done
            j = item - ITEMS_A
            for i in range(j * ITEMS_A // ITEMS_B, ((j + 1) * ITEMS_A + ITEMS_B - 1) // ITEMS_B):
                while tl.atomic_add(flag_ptr + i, 0, sem="acquire") == 0:
                    pass
        elif is_b:  # spin until all of A is done (acquire: A's results would be visible)
            while tl.atomic_add(cnt_ptr + 1, 0, sem="acquire") < ITEMS_A:
                pass
        for start in range(lo, hi, BLOCK):
            cur = nxt
            nxt = tl.load(src + start + BLOCK + offs, mask=start + BLOCK + offs < hi, other=0)
            acc ^= cur
        if not is_b:
            tl.atomic_add(cnt_ptr + 1, 1, sem="release")
            if FLAGS:
                tl.atomic_xchg(flag_ptr + item, 1, sem="release")
        item = tl.atomic_add(cnt_ptr, 1)
    tl.store(out_ptr + tl.program_id(0), tl.reduce(acc, 0, _xor))
    if tl.atomic_add(cnt_ptr + 2, 1, sem="acq_rel") == tl.num_programs(0) - 1:
        tl.store(cnt_ptr, 0)
        tl.store(cnt_ptr + 1, 0)
        tl.store(cnt_ptr + 2, 0)
        if FLAGS:
            for i in range(0, ITEMS_A, BLOCK):
                tl.store(flag_ptr + i + offs, 0, mask=i + offs < ITEMS_A)


def fused(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, cnt: torch.Tensor, programs: int,
          items_a: int, items_b: int, block: int, warps: int,
          flags: torch.Tensor | None = None) -> None:  # fmt: skip
    """_fused_kernel: A's bytes in items_a chunks, then B's in items_b, `programs` programs; with
    `flags` (zeroed int32, at least items_a) B items wait only for their share of A."""
    per_a = triton.cdiv(triton.cdiv(a.numel(), items_a), block) * block
    per_b = triton.cdiv(triton.cdiv(b.numel(), items_b), block) * block
    launch = pdl_options(a.device)
    pdl = launch.pop("PDL")
    _fused_kernel[(programs,)](
        a, b, out, cnt, flags if flags is not None else cnt, a.numel(), b.numel(), per_a, per_b,
        triton.cdiv(a.numel(), per_a), triton.cdiv(b.numel(), per_b), BLOCK=block,
        FLAGS=flags is not None, PDL=pdl, num_warps=warps, num_stages=1, **launch,
    )  # fmt: skip


@triton.jit
def _xor(a, b):
    return a ^ b


@triton.jit
def _strip_kernel(src_ptr, out_ptr, R, C, ROWS_PER, W: tl.constexpr, ROWS: tl.constexpr,
                  TILED: tl.constexpr):  # fmt: skip
    """Read the column strip program_id(0) (W int32 columns) of an [R, C] matrix over the rows
    of K-slice program_id(1), [ROWS, W] tiles a step as the decode tier's tensor-core kernels
    read their words (Triton pipelines the loads through shared memory with num_stages).
    TILED: the same tiles from a strip-major copy [C / W, R, W] (each strip contiguous)."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    r = tl.arange(0, ROWS)
    c = tl.arange(0, W)
    r0 = pid_s * ROWS_PER
    r1 = tl.minimum(r0 + ROWS_PER, R)
    acc = tl.zeros([ROWS, W], dtype=tl.int32)
    for k in range(r0, r1, ROWS):
        if TILED:
            ptrs = src_ptr + (pid_n * R + k + r[:, None]) * W + c[None, :]
        else:
            ptrs = src_ptr + (k + r[:, None]) * C + pid_n * W + c[None, :]
        acc ^= tl.load(ptrs)
    tl.store(
        out_ptr + pid_n * tl.num_programs(1) + pid_s, tl.reduce(tl.reduce(acc, 1, _xor), 0, _xor)
    )


@triton.jit
def _tma_kernel(desc, out_ptr, R, ROWS_PER, BR: tl.constexpr, BC: tl.constexpr):
    """Read rows program_id(1) * ROWS_PER .. of column block program_id(0) of an [R, C] int32
    matrix in [BR, BC] tiles through a TMA descriptor; Triton pipelines the loop (num_stages)."""
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    r0 = pid_s * ROWS_PER
    r1 = tl.minimum(r0 + ROWS_PER, R)
    acc = tl.zeros([BR, BC], dtype=tl.int32)
    for r in range(r0, r1, BR):
        acc ^= desc.load([r, pid_c * BC])
    tl.store(out_ptr + pid_c * tl.num_programs(1) + pid_s,
             tl.reduce(tl.reduce(acc, 1, _xor), 0, _xor))  # fmt: skip


def tma_rows(out: torch.Tensor, mb: float) -> list[dict]:
    """`mb` MB as [R, 4,096] int32 read through TMA descriptors in [BR, BC] tiles, programs
    one column block by one K-slice each, 2-4 pipeline stages: the deep-ring alternative to the
    register double buffer (bytes in flight without registers)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    dev = out.device
    cols = 4096
    rows_total = int(mb * 1e6) // (4 * cols) // 64 * 64
    srcs = [torch.randint(-(2**31), 2**31 - 1, (rows_total, cols), dtype=torch.int32,
                          device=dev) for _ in range(3)]  # fmt: skip
    real_mb = srcs[0].numel() * 4 / 1e6
    rows = []
    sms = sm_count(dev)
    for br, bc in ((16, 256), (32, 128), (64, 64), (32, 256)):
        for stages in (2, 3, 4, 6):
            if br * bc * 4 * stages > 200 * 1024:
                continue
            for per_sm in (1, 2):
                blocks = cols // bc
                slices = max(1, sms * per_sm // blocks)
                per = triton.cdiv(triton.cdiv(rows_total, slices), br) * br
                descs = [TensorDescriptor.from_tensor(s, [br, bc]) for s in srcs]

                def launch(d, br=br, bc=bc, per=per, stages=stages, blocks=blocks):
                    _tma_kernel[(blocks, triton.cdiv(rows_total, per))](
                        d, out, rows_total, per, BR=br, BC=bc, num_warps=4, num_stages=stages
                    )  # fmt: skip

                try:
                    us = graph_time_us([(lambda d=d: launch(d)) for d in descs])
                except Exception as exc:  # noqa: BLE001 (a probe: report and go on)
                    print(f"tma {br}x{bc} stages {stages}: {type(exc).__name__}: {exc}"[:300])
                    continue
                rows.append(dict(mb=real_mb, br=br, bc=bc, stages=stages, per_sm=per_sm, us=us,
                                 tb_s=real_mb * 1e6 / us * 1e-6))  # fmt: skip
                print(f"tma {real_mb:.1f} MB [{br}, {bc}] stages {stages} {per_sm}/SM: "
                      f"{us:7.2f} us ({real_mb / us:.2f} TB/s)", flush=True)  # fmt: skip
    return rows


def strips(src: torch.Tensor, out: torch.Tensor, width: int, slices: int, tiled: bool,
           stages: int) -> None:  # fmt: skip
    """_strip_kernel over src viewed as [R, C] (R a multiple of 16 * slices)."""
    rows, cols = src.shape
    per = rows // slices
    _strip_kernel[(cols // width, slices)](
        src, out, rows, cols, per, W=width, ROWS=16, TILED=tiled, num_warps=4, num_stages=stages
    )  # fmt: skip


def strip_rows(out: torch.Tensor) -> list[dict]:
    """Kernel A's light words ([1,024, 13,632] int32: up and gate, 55.8 MB) read as the decode
    tier reads them, column strips of 64-512 words, against the same tiles stored strip by strip."""
    dev = out.device
    shape = (1024, 13632 - 13632 % 512)
    srcs = [torch.randint(-(2**31), 2**31 - 1, shape, dtype=torch.int32, device=dev)
            for _ in range(3)]  # fmt: skip
    mb = srcs[0].numel() * 4 / 1e6
    rows = []
    for width in (64, 128, 256, 512):
        for tiled in (False, True):
            for slices in (1, 2, 4):
                for stages in (2, 4):
                    calls = [
                        (lambda s=s, w=width, n=slices, t=tiled, st=stages: strips(s, out, w, n, t, st))
                        for s in srcs
                    ]  # fmt: skip
                    us = graph_time_us(calls)
                    rows.append(dict(mb=mb, width=width, tiled=tiled, slices=slices,
                                     stages=stages, us=us, tb_s=mb * 1e6 / us * 1e-6))  # fmt: skip
                    print(f"strips {mb:.1f} MB width {width:3d} {'tiled  ' if tiled else 'strided'}"
                          f" slices {slices} stages {stages}: {us:7.2f} us ({mb / us:.2f} TB/s)",
                          flush=True)  # fmt: skip
    return rows


def stream(src: torch.Tensor, out: torch.Tensor, programs: int, block: int, warps: int) -> None:
    n = src.numel()
    per = triton.cdiv(triton.cdiv(n, programs), block) * block
    launch = pdl_options(src.device)
    pdl = launch.pop("PDL")
    _stream_kernel[(triton.cdiv(n, per),)](
        src, out, n, per, BLOCK=block, PDL=pdl, num_warps=warps, num_stages=1, **launch
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", default="35.6,71.1,106.7", help="sizes in MB (1e6 bytes)")
    parser.add_argument("--copies", type=int, default=3, help="rotating copies (L2 cannot hold)")
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "floor.json"))
    parser.add_argument("--strips", action="store_true", help="only the column-strip reads")
    parser.add_argument("--tma", action="store_true", help="only the TMA-descriptor reads")
    args = parser.parse_args()
    dev = torch.device("cuda")
    bw = copy_bandwidth()
    sms = sm_count(dev)
    if args.strips:
        out = torch.empty(1 << 16, dtype=torch.int32, device=dev)
        write_result(args.out, dev, copy_bandwidth_tb_s=bw * 1e-12, strips=strip_rows(out))
        return 0
    sizes = [float(v) for v in args.mb.split(",")]
    if args.tma:
        out = torch.empty(1 << 16, dtype=torch.int32, device=dev)
        triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8,
                                                                     device=dev))  # fmt: skip
        rows = [r for mb in sizes for r in tma_rows(out, mb)]
        write_result(args.out, dev, copy_bandwidth_tb_s=bw * 1e-12, tma=rows)
        return 0
    bufs = {
        mb: [torch.randint(-(2**31), 2**31 - 1, (int(mb * 1e6) // 64 * 16,), dtype=torch.int32,
                           device=dev) for _ in range(args.copies)]
        for mb in sizes
    }  # fmt: skip
    out = torch.empty(1 << 16, dtype=torch.int32, device=dev)
    rows = []
    for mb in sizes:
        for per_sm in (4, 8, 16):
            for warps, block in ((4, 512), (4, 1024), (4, 2048), (8, 2048)):
                if per_sm * warps > 64:
                    continue
                calls = [
                    (lambda s=s, p=sms * per_sm, b=block, w=warps: stream(s, out, p, b, w))
                    for s in bufs[mb]
                ]
                us = graph_time_us(calls)
                rows.append(dict(mb=mb, per_sm=per_sm, warps=warps, block=block, us=us,
                                 floor_us=mb * 1e6 / bw * 1e6, tb_s=mb * 1e6 / us * 1e-6))  # fmt: skip
                print(f"{mb:7.1f} MB  {per_sm:2d}/SM  {warps} warps  block {block:5d}: "
                      f"{us:7.2f} us  ({mb / us:.2f} TB/s, {us / rows[-1]['floor_us']:.2f}x floor)")  # fmt: skip
    # the decode layer's shape: A's bytes, then B's, two launches (the second waits for the first)
    best = {mb: min((r for r in rows if r["mb"] == mb), key=lambda r: r["us"]) for mb in sizes}
    chain = []
    if len(sizes) >= 2:
        a, b = sizes[1], sizes[0]
        ra, rb = best[a], best[b]
        calls = [
            (lambda sa=sa, sb=sb: (
                stream(sa, out, sms * ra["per_sm"], ra["block"], ra["warps"]),
                stream(sb, out[4096:], sms * rb["per_sm"], rb["block"], rb["warps"]),
            ))
            for sa, sb in zip(bufs[a], bufs[b], strict=True)
        ]  # fmt: skip
        us = graph_time_us(calls)
        chain.append(dict(mb=[a, b], us=us, floor_us=(a + b) * 1e6 / bw * 1e6))
        print(f"chain {a} MB then {b} MB: {us:.2f} us ({us / chain[-1]['floor_us']:.2f}x floor)")
        # the same bytes in one launch, B's items waiting for all of A's (a fused FFN's bound)
        # and (wait="flags") B's items waiting only for the A items at their share of the bytes
        cnt = torch.zeros(4, dtype=torch.int32, device=dev)
        for per_sm, warps, block in ((8, 4, 1024), (16, 4, 512), (16, 4, 1024), (8, 8, 2048)):
            p = sms * per_sm
            for items, wait in ((1, "all"), (2, "all"), (1, "flags"), (2, "flags")):
                flags = (torch.zeros(p * items, dtype=torch.int32, device=dev)
                         if wait == "flags" else None)  # fmt: skip
                calls = [
                    (lambda sa=sa, sb=sb, p=p, n=p * items, bl=block, w=warps, f=flags: fused(
                        sa, sb, out, cnt, p, n, n, bl, w, f))
                    for sa, sb in zip(bufs[a], bufs[b], strict=True)
                ]  # fmt: skip
                us = graph_time_us(calls)
                chain.append(dict(mb=[a, b], fused=True, wait=wait, per_sm=per_sm, warps=warps,
                                  block=block, items_per_program=items, us=us,
                                  floor_us=(a + b) * 1e6 / bw * 1e6))  # fmt: skip
                print(f"fused ({wait}) {a} + {b} MB {per_sm}/SM {warps} warps block {block} "
                      f"{items} item(s) a program each: {us:.2f} us "
                      f"({us / chain[-1]['floor_us']:.2f}x floor)", flush=True)  # fmt: skip
    write_result(args.out, dev, copy_bandwidth_tb_s=bw * 1e-12, rows=rows, chain=chain)
    return 0


def write_result(out: str, dev: torch.device, **fields) -> None:
    """A benchmark's JSON: date, card, versions and the command line, then `fields`."""
    result = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device=torch.cuda.get_device_name(dev), torch=torch.__version__,
        triton=triton.__version__, python=platform.python_version(), command=" ".join(sys.argv),
        **fields,
    )  # fmt: skip
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    raise SystemExit(main())
