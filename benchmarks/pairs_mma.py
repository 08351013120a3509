"""The Gluon tier's kernel A and kernel B configs timed as pairs inside the whole FFN (GPU only).

The tuner picks each kernel's config by timing that kernel alone; in `split_ffn` kernel B is a
programmatic dependent launch behind kernel A (its programs load their first words before they
wait), so the pair that is fastest together may not be the pair of the fastest alone. This
times every (kernel A, kernel B) candidate pair of the tier as the layer (CUDA-graph replays over
two weight copies, Llama-3-8B FFN, 720 heavy fp16 + 13,632 int4 g128 neurons), in two rounds
in opposite orders, next to the tuner's own picks. One JSON line an M.

    PYTHONPATH=. python3 benchmarks/pairs_mma.py --m 1,4,16 --out $OUT/pairs.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_decode import graph_time_us, split_weights  # noqa: E402

from ffnsplit.kernels import mma_decode as md  # noqa: E402
from ffnsplit.kernels import split_ffn as sffn  # noqa: E402
from ffnsplit.kernels.tiles import Tuner  # noqa: E402


def layer_us(x: torch.Tensor, copies: list) -> float:
    return graph_time_us([lambda w=w: sffn.split_ffn(x, w, path="mma") for w in copies])


def measure(m: int, copies: list) -> dict:
    x = torch.randn(m, 4096, device="cuda", dtype=torch.float16)
    md._up_tuner, md._down_tuner = Tuner(), Tuner()
    ref = sffn.split_ffn(x, copies[0], path="mma")
    row = dict(m=m, tuned_us=round(layer_us(x, copies), 2),
               tuned_up=str(next(iter(md._up_tuner.cache.values()), None)),
               tuned_down=str(next(iter(md._down_tuner.cache.values()), None)))  # fmt: skip
    original = md.candidates
    ups = original(md.UP_CONFIGS, md.UP_ROWS, md.UP_SWAP, m)
    downs = original(md.DOWN_CONFIGS, md.DOWN_ROWS, md.DOWN_SWAP, m)
    pairs = [(a, b) for a in ups for b in downs]
    times: dict[int, float] = {}
    try:
        for order in (pairs, pairs[::-1]):
            for a, b in order:

                def forced(table, by_rows, swapped, m, a=a, b=b):
                    return (a,) if table is md.UP_CONFIGS else (b,)

                md.candidates = forced
                i = pairs.index((a, b))
                try:
                    y = sffn.split_ffn(x, copies[0], path="mma")
                    err = float((y.float() - ref.float()).norm() / ref.float().norm())
                    t = layer_us(x, copies)
                except Exception as exc:  # a config that does not fit: report, go on
                    row.setdefault("failed", {})[i] = repr(exc)[:160]
                    continue
                assert err < 2e-3, (a, b, err)
                times[i] = min(t, times.get(i, t))
    finally:
        md.candidates = original
    ranked = sorted(times, key=times.get)
    row["pairs"] = [dict(up=str(pairs[i][0]), down=str(pairs[i][1]), us=round(times[i], 2))
                    for i in ranked]  # fmt: skip
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", default="1,4,16")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    copies = [split_weights(4096, 720, 13632, 4, 128) for _ in range(2)]
    rows = []
    for m in (int(v) for v in args.m.split(",")):
        rows.append(measure(m, copies))
        best = rows[-1]["pairs"][:3]
        print(json.dumps(dict(m=m, tuned_us=rows[-1]["tuned_us"], best=best)), flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                           rows=rows), fh, indent=1)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
