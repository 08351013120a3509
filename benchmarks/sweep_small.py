"""K-split sweep of the tl small tier (16 < M <= 64 rows) at the Llama-3-8B FFN shape (GPU only):
kernel A (split_activations) and kernel B (split_linear) each with one tile config and a forced
number of K-slices, timed from CUDA-graph replays over two weight copies (L2 cannot hold them).
The tier sizes its grids without counting shared memory, so a grid can spill into a partial
second wave; this finds the splits that do not.

    FFNSPLIT_AUTOTUNE=0 PYTHONPATH=. python3 benchmarks/sweep_small.py --m 64 --out $OUT/sweep.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__))))
from bench_decode import graph_time_us, split_weights  # noqa: E402

from ffnsplit.kernels import quant_matmul as qmm  # noqa: E402
from ffnsplit.kernels import split_ffn as sffn  # noqa: E402
from ffnsplit.kernels.tiles import TileConfig  # noqa: E402


def up(bm: int, bn: int, warps: int = 4, stages: int = 3, wa: bool = False, kl: int = 128):
    """A kernel A tile: bm rows of x, bn neurons (heavy tiles too), light K-blocks of kl codes,
    per-element scales (scale_after off), natural k order; wa: the W-as-A form."""
    return TileConfig(bm, bn, kl, 64, num_warps=warps, num_stages=stages, block_nh=bn,
                      scale_after=False, interleave=False, w_as_a=wa)  # fmt: skip


def down(bm: int, bn: int, warps: int = 4, stages: int = 3, wa: bool = False):
    """A kernel B (split_linear) tile, as `up`."""
    return TileConfig(bm, bn, 128, 64, num_warps=warps, num_stages=stages, scale_after=False,
                      interleave=False, w_as_a=wa)  # fmt: skip


UP = {
    "a64x64w4": up(64, 64), "a64x128w8": up(64, 128, warps=8), "a64x32w4": up(64, 32, stages=4),
    "a64x64w4s2": up(64, 64, stages=2), "a64x64w4s4": up(64, 64, stages=4),
    "a64x64w8": up(64, 64, warps=8), "a32x64w4": up(32, 64), "a32x64w4s4": up(32, 64, stages=4),
    "a16x64w4s4": up(16, 64, stages=4), "a64x64w4k64": up(64, 64, stages=4, kl=64),
    "a64x128w4": up(64, 128),
    # the W-as-A form (TileConfig.w_as_a: the dequantized weights as wgmma's register A operand)
    "a16x64wa": up(16, 64, wa=True), "a32x64wa": up(32, 64, wa=True),
    "a64x64wa": up(64, 64, wa=True), "a32x64wa_s4": up(32, 64, stages=4, wa=True),
    "a32x128wa_w8": up(32, 128, warps=8, wa=True), "a64x64wa_s2": up(64, 64, stages=2, wa=True),
    "a64x64wa_s4": up(64, 64, stages=4, wa=True), "a64x128wa_w8": up(64, 128, warps=8, wa=True),
    "a128x128wa_w8": up(128, 128, warps=8, wa=True),
    "a256x128wa_w8": up(256, 128, warps=8, wa=True),  # 240 KiB of shared memory: does not run
    # prepared for M = 256 (not run). sm_90 AOT (Triton 3.6, kernel A): 128 x 128 8 warps 3
    # stages 255 registers + 56 spilled (the measured best), 2 stages the same in 96 KiB;
    # 128 x 64 8 warps 204, no spills, 128 KiB; 256-row and 256-neuron tiles spill thousands
    "a128x64wa_w8": up(128, 64, warps=8, wa=True),
    "a128x128wa_w8_s2": up(128, 128, warps=8, stages=2, wa=True),
}  # fmt: skip
DOWN = {
    "b64x128w8": down(64, 128, warps=8), "b64x64w4": down(64, 64),
    "b32x128w4": down(32, 128, stages=4),
    "b16x64wa": down(16, 64, wa=True), "b32x64wa": down(32, 64, wa=True),
    "b64x64wa": down(64, 64, wa=True), "b64x64wa_s2": down(64, 64, stages=2, wa=True),
    "b64x64wa_s4": down(64, 64, stages=4, wa=True),
    "b64x128wa_w8": down(64, 128, warps=8, wa=True),
    "b128x128wa_w8": down(128, 128, warps=8, wa=True),
    "b256x128wa_w8": down(256, 128, warps=8, wa=True),
    "b128x64wa_w8": down(128, 64, warps=8, wa=True),
    "b128x128wa_w8_s2": down(128, 128, warps=8, stages=2, wa=True),
    "b32x128wa_w8": down(32, 128, warps=8, wa=True),
}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--m", type=int, default=64)
    parser.add_argument("--up-splits", default="1,2,3,4")
    parser.add_argument("--down-splits", default="4,6,8,9,12,16")
    parser.add_argument("--up", default=",".join(UP), help="kernel A configs (names above)")
    parser.add_argument("--down", default=",".join(DOWN), help="kernel B configs")
    parser.add_argument("--out", default="sweep_small.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    copies = [split_weights(4096, 720, 13632, 4, 128) for _ in range(2)]
    x = torch.randn(args.m, 4096, device="cuda", dtype=torch.float16)
    a = sffn.split_activations(x, copies[0], path="small")
    ref_a = a.float()
    ref_b = qmm.split_linear(a, copies[0].heavy_down, copies[0].light_down, None, path="small")
    ref_b = ref_b.float()
    rows = []
    forced = {"split": 1}
    sffn.wave_splits = lambda *_: forced["split"]
    qmm.n_splits = lambda *_: forced["split"]
    for name in filter(None, args.up.split(",")):
        cfg = UP[name]
        sffn._CONFIGS["small"] = (replace(cfg, per_sm=1),)
        for split in map(int, args.up_splits.split(",")):
            forced["split"] = split
            sffn._tuner.__init__()
            got = sffn.split_activations(x, copies[0], path="small").float()
            err = float((got - ref_a).norm() / ref_a.norm())
            us = graph_time_us([
                lambda w=w: sffn.split_activations(x, w, path="small") for w in copies
            ])  # fmt: skip
            rows.append(dict(kernel="A", config=name, split=split, us=round(us, 2),
                             rel_err=err))  # fmt: skip
            print(rows[-1], flush=True)
    for name in filter(None, args.down.split(",")):
        cfg = DOWN[name]
        qmm._CONFIGS["small"] = (cfg,)
        for split in map(int, args.down_splits.split(",")):
            forced["split"] = split
            qmm._tuner.__init__()
            got = qmm.split_linear(a, copies[0].heavy_down, copies[0].light_down, None,
                                   path="small").float()  # fmt: skip
            err = float((got - ref_b).norm() / ref_b.norm())
            us = graph_time_us([
                lambda w=w: qmm.split_linear(a, w.heavy_down, w.light_down, None, path="small")
                for w in copies
            ])  # fmt: skip
            rows.append(dict(kernel="B", config=name, split=split, us=round(us, 2),
                             rel_err=err))  # fmt: skip
            print(rows[-1], flush=True)
    with open(args.out, "w") as f:
        json.dump(dict(m=args.m, card=torch.cuda.get_device_name(), rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
