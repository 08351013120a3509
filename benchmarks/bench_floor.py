"""What a kernel that only streams the split FFN's weight bytes costs (GPU only).

The issue's byte floor is weight bytes / copy bandwidth measured on 1 GiB. A decode kernel moves
36-107 MB, where launch, ramp-up and tail are a visible share; this script measures a kernel that
does nothing but read those bytes (16-byte loads, a one-wave grid of programs looping over
contiguous chunks, a register double buffer, one word stored per program so the loads stay), alone
and as a chain of two launches (kernel A's then kernel B's bytes, with PDL as the GEMV kernels
use it), under the same CUDA-graph timing as benchmarks/bench_decode.py. The gap between these
times and the GEMV kernels is what the kernels themselves cost beyond moving their bytes.

    PYTHONPATH=. python3 benchmarks/bench_floor.py --out $OUT/floor.json
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
def _xor(a, b):
    return a ^ b


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
    args = parser.parse_args()
    dev = torch.device("cuda")
    bw = copy_bandwidth()
    sms = sm_count(dev)
    sizes = [float(v) for v in args.mb.split(",")]
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
