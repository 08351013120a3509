"""Kernel B's share-out of K-slices between packed and dense columns (GPU only): the layer and
kernel B of an FFN shape (hidden x intermediate, 5% heavy fp16 rounded up to 8 neurons, the
rest int4 g128) with mma_decode.DENSE_SLICE_WEIGHT set to each value given, default configs (no
tuner), graph medians over 2 weight copies, all values timed in turn, twice. Each line also
gives the (packed, dense) slices a tile of the default W-as-A config.

    FFNSPLIT_AUTOTUNE=0 PYTHONPATH=. python3 benchmarks/slices_down.py --weights 1.0,0.75,0.5 \
        --shape 4096x14336

Session 18 (H200) chose 0.75 with it (RESULTS.md).
"""

import argparse
import json
import math
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
    parser.add_argument("--shape", default="4096x14336", help="hidden x intermediate")
    args = parser.parse_args()
    hidden, inter = (int(v) for v in args.shape.lower().split("x"))
    # as `ffnsplit bench` lays a 5% split out on a GPU: ceil(5%) heavy neurons padded to a
    # multiple of 8 (format.pad_heavy), the rest packed in whole 32-k words
    h5 = math.ceil(inter / 20)
    heavy, light = 8 * math.ceil(h5 / 8), 32 * math.ceil((inter - h5) / 32)
    torch.manual_seed(0)
    copies = [split_weights(hidden, heavy, light, 4, 128) for _ in range(2)]
    cfg = mma_decode.DOWN_SWAP[0]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    total = mma_decode._slices(cfg, -(-hidden // cfg.block_n), sms)
    for rnd in range(2):
        for weight in (float(v) for v in args.weights.split(",")):
            mma_decode.DENSE_SLICE_WEIGHT = weight
            res = {}
            for m in (int(v) for v in args.m.split(",")):
                x = torch.randn(m, hidden, device="cuda", dtype=torch.float16)
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
            slices = mma_decode._down_slices(total, heavy, light, 128)
            print(json.dumps({"round": rnd, "shape": args.shape, "dense_slice_weight": weight,
                              "slices": slices, "us": res}), flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
