"""What the Gluon tier's split-K tile finish costs (GPU only).

Kernel A's and kernel B's first W-as-A configs (the picks without the tuner, M <= 8) timed as
they run (fused: each tile's last K-slice to arrive fences, takes a ticket, adds the slices'
partials and writes the tile) and as the same config unfused with its reduce launch dropped, so
that only the partials are written (that output is wrong; the time is the loops' own). Kernel A,
kernel B and the two in a row, CUDA-graph medians over two weight copies, the fused rows twice.
Session 17 (H200): the finish cost 1.5-2.0 us of kernel A and 2.4-2.8 us of kernel B at M = 1,
4.1-4.7 us of the layer (benchmarks/RESULTS.md).

    PYTHONPATH=. python3 benchmarks/bench_finish.py --out $OUT/finish.json
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_decode import graph_time_us, split_weights  # noqa: E402
from bench_floor import write_result  # noqa: E402

from ffnsplit.kernels import gemv, mma_decode  # noqa: E402
from ffnsplit.kernels import quant_matmul as qmm  # noqa: E402
from ffnsplit.kernels import split_ffn as sffn  # noqa: E402


class _NoLaunch:
    """Stands in for a reduce kernel: indexing by a grid gives a launch that does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", default="1,4,8", help="rows (the W-as-A form: at most 8)")
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "finish.json"))
    args = parser.parse_args()
    up = mma_decode.UP_SWAP[0]
    down = mma_decode.DOWN_SWAP[0]
    unfused = replace(up, fused=False), replace(down, fused=False)
    copies = [split_weights(4096, 720, 13632, 4, 128) for _ in range(2)]
    reduces = gemv._gemv_reduce_kernel, qmm._splitk_reduce_kernel
    saved = mma_decode.SWAP, mma_decode.UP_SWAP, mma_decode.DOWN_SWAP
    mma_decode.SWAP = "only"
    rows = []
    try:
        for m in (int(v) for v in args.m.split(",")):
            x = torch.randn(m, 4096, device="cuda", dtype=torch.float16)
            a = sffn.split_activations(x, copies[0], path="mma")
            for finish, (cu, cd) in (("fused", (up, down)), ("partials", unfused),
                                     ("fused", (up, down))):  # fmt: skip
                mma_decode.UP_SWAP, mma_decode.DOWN_SWAP = (cu,), (cd,)
                if finish == "partials":
                    gemv._gemv_reduce_kernel = qmm._splitk_reduce_kernel = _NoLaunch()
                try:
                    ta = graph_time_us(
                        [lambda w=w, x=x: sffn.split_activations(x, w, path="mma") for w in copies]
                    )
                    tb = graph_time_us([
                        lambda w=w, a=a: qmm.split_linear(a, w.heavy_down, w.light_down, None,
                                                     path="mma")
                        for w in copies
                    ])  # fmt: skip
                    both = graph_time_us([
                        lambda w=w, x=x, a=a: (sffn.split_activations(x, w, path="mma"),
                                     qmm.split_linear(a, w.heavy_down, w.light_down, None,
                                                      path="mma"))
                        for w in copies
                    ])  # fmt: skip
                finally:
                    gemv._gemv_reduce_kernel, qmm._splitk_reduce_kernel = reduces
                rows.append(dict(m=m, finish=finish, kernel_a_us=ta, kernel_b_us=tb, both_us=both))
                print(f"M = {m:2d} {finish:8s}: A {ta:6.2f}  B {tb:6.2f}  A then B {both:6.2f} us",
                      flush=True)  # fmt: skip
    finally:
        mma_decode.SWAP, mma_decode.UP_SWAP, mma_decode.DOWN_SWAP = saved
    write_result(args.out, torch.device("cuda"), up=str(up), down=str(down), rows=rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
