"""Kernel B's share-out of K-slices between packed and dense columns (GPU only): the layer and
kernel B at the Llama-3-8B FFN shape with mma_decode.DENSE_SLICE_WEIGHT set to each value given,
default configs (no tuner), graph medians over 2 weight copies, all values timed in turn, twice.

    FFNSPLIT_AUTOTUNE=0 PYTHONPATH=. python3 benchmarks/slices_down.py --weights 1.0,0.75,0.5

Session 18 (H200) chose 0.75 with it (RESULTS.md).
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.getcwd())
sys.path.insert(1, os.path.join(os.getcwd(), "benchmarks"))
from bench_decode import graph_time_us, split_weights  # noqa: E402

from ffnsplit.kernels import mma_decode  # noqa: E402
from ffnsplit.kernels import quant_matmul as qmm  # noqa: E402
from ffnsplit.kernels import split_ffn as sffn  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default="1.0,0.75,0.5")
    parser.add_argument("--m", default="1,4,8,16,32")
    args = parser.parse_args()
    torch.manual_seed(0)
    copies = [split_weights(4096, 720, 13632, 4, 128) for _ in range(2)]
    for rnd in range(2):
        for weight in (float(v) for v in args.weights.split(",")):
            mma_decode.DENSE_SLICE_WEIGHT = weight
            res = {}
            for m in (int(v) for v in args.m.split(",")):
                x = torch.randn(m, 4096, device="cuda", dtype=torch.float16)
                a = sffn.split_activations(x, copies[0], path="mma")
                layer = graph_time_us(
                    [lambda w=w, x=x: sffn.split_ffn(x, w, path="mma") for w in copies]
                )
                tb = graph_time_us([
                    lambda w=w, a=a: qmm.split_linear(
                        a, w.heavy_down, w.light_down, None, path="mma"
                    )
                    for w in copies
                ])  # fmt: skip
                res[m] = {"layer": round(layer, 2), "b": round(tb, 2)}
            print(json.dumps({"round": rnd, "dense_slice_weight": weight, "us": res}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
