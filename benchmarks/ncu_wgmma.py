"""Run proto_wgmma.kernel_a a few times at one M and (num_warps, bt), for `ncu` to profile (the
Llama-3-8B FFN's kernel A: 720 heavy fp16 + 13,632 int4 g128 neurons, K 4096):

    ncu -k regex:_w4_up_kernel --launch-skip 3 --launch-count 1 --section SpeedOfLight \\
        python3 benchmarks/ncu_wgmma.py --m 256 --num-warps 4 --bt 128
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__))))
import proto_wgmma as wg  # noqa: E402
from bench_decode import split_weights  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, default=256)
    parser.add_argument("--num-warps", type=int, default=4)
    parser.add_argument("--bt", type=int, default=128)
    parser.add_argument("--ring", type=int, default=0, help="words-ring stages (0: off)")
    args = parser.parse_args()
    w = split_weights(4096, 720, 13632, 4, 128)
    x = torch.randn(args.m, 4096, device="cuda", dtype=torch.float16)
    a = torch.empty(args.m, 720 + 13632, device="cuda", dtype=torch.float16)
    for _ in range(5):
        wg.kernel_a(x, w, a, bt=args.bt, num_warps=args.num_warps, ring=args.ring)
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
