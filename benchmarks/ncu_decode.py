"""Run the split FFN decode path a few times at one M, for `ncu` to profile the last call.

    ncu --launch-skip 8 --launch-count 4 --section SpeedOfLight --section Occupancy \
        --section WarpStateStats --section SchedulerStats --section LaunchStats \
        python3 benchmarks/ncu_decode.py --m 1
(each call is 4 launches: kernel A, its reduction, kernel B, its reduction; 3 calls are run)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_decode import split_weights  # noqa: E402

from ffnsplit.kernels import split_ffn as sffn  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="4096x14336")
    parser.add_argument("--heavy", type=int, default=720)
    parser.add_argument("--m", type=int, default=1)
    parser.add_argument("--path", default="gemv")
    args = parser.parse_args()
    hidden, inter = (int(v) for v in args.shape.lower().split("x"))
    light = -(-(inter - args.heavy) // 32) * 32
    w = split_weights(hidden, args.heavy, light, 4, 128)
    x = torch.randn(args.m, hidden, device="cuda", dtype=torch.float16)
    for _ in range(3):
        sffn.split_ffn(x, w, path=args.path)
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
