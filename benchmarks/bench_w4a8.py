"""The W4A8 split FFN (ffnsplit/kernels/w4a8.py) on a GPU: accuracy against its definition and
time against dense fp16 (cuBLAS) and the fp16-activation split FFN, Llama-3-8B FFN shape.

    PYTHONPATH=. python3 benchmarks/bench_w4a8.py --out $OUT/w4a8.json
    PYTHONPATH=. python3 benchmarks/bench_w4a8.py --m 256 --configs all   # every config

Per M: dense (F.linear x3 + SiLU gating), `split_ffn` "auto" (the fp16 path), the W4A8 path with
each config (BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_KH, warps, stages) and its parts (row quantizer,
kernel A, kernel B) for the best. CUDA-graph replays over weight copies L2 cannot hold, median
of 15 replays (bench_decode.graph_time_us).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__))))
from bench_decode import graph_time_us, rel_err, split_weights  # noqa: E402

from ffnsplit.kernels import split_ffn as sffn  # noqa: E402
from ffnsplit.kernels import w4a8, w4a8_hopper  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="4096x14336")
    ap.add_argument("--heavy", type=int, default=720)
    ap.add_argument("--m", default="1,16,64,128,256,512,1024,2048")
    ap.add_argument("--copies", type=int, default=3)
    ap.add_argument("--configs", default="default", help="default (the pick by M) or all")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "w4a8.json"))
    args = ap.parse_args()
    hidden, inter = (int(v) for v in args.shape.lower().split("x"))
    light = -(-(inter - args.heavy) // 32) * 32
    ws = [split_weights(hidden, args.heavy, light, 4, 128) for _ in range(args.copies)]
    dense = [
        [torch.randn(n, k, device="cuda", dtype=torch.float16) / k**0.5
         for n, k in ((inter, hidden), (inter, hidden), (hidden, inter))]
        for _ in range(args.copies)
    ]  # fmt: skip
    rows = []
    for m in (int(v) for v in args.m.split(",")):
        xs = [torch.randn(m, hidden, device="cuda", dtype=torch.float16) for _ in ws]
        ref = w4a8.reference_split_ffn(xs[0], ws[0])
        row: dict = {"m": m}

        def dense_ffn(x, d):
            return F.linear(F.silu(F.linear(x, d[1])) * F.linear(x, d[0]), d[2])

        row["dense_us"] = graph_time_us(
            [lambda x=x, d=d: dense_ffn(x, d) for x, d in zip(xs, dense, strict=True)]
        )
        row["split_fp16_us"] = graph_time_us(
            [lambda x=x, w=w: sffn.split_ffn(x, w) for x, w in zip(xs, ws, strict=True)]
        )
        configs = w4a8.CONFIGS if args.configs == "all" else (w4a8._pick(m),)
        best = None
        for cfg in configs:
            try:
                err = rel_err(w4a8.split_ffn(xs[0], ws[0], config=cfg), ref)
                us = graph_time_us(
                    [
                        lambda x=x, w=w, c=cfg: w4a8.split_ffn(x, w, config=c)
                        for x, w in zip(xs, ws, strict=True)
                    ]
                )
            except Exception as exc:  # a config that does not fit this GPU: say so, go on
                row.setdefault("failed", {})[str(cfg)] = f"{type(exc).__name__}: {exc}"[:200]
                continue
            row.setdefault("configs", {})[str(cfg)] = {"us": us, "rel_err": err}
            if best is None or us < best[1]:
                best = (cfg, us, err)
        if best is not None:
            cfg, us, err = best
            row.update(w4a8_us=us, w4a8_config=list(cfg), w4a8_rel_err=err)
            row["quantize_us"] = graph_time_us([lambda x=x: w4a8.quantize_rows(x) for x in xs])
            acts = [w4a8.split_activations(x, w, config=cfg) for x, w in zip(xs, ws, strict=True)]
            row["kernel_a_us"] = graph_time_us(
                [
                    lambda x=x, w=w, cfg=cfg: w4a8.split_activations(x, w, config=cfg)
                    for x, w in zip(xs, ws, strict=True)
                ]
            )
            row["kernel_b_us"] = graph_time_us(
                [lambda a=a, w=w, cfg=cfg: w4a8.down_projection(a[0], a[1], w, config=cfg)
                 for a, w in zip(acts, ws, strict=True)]
            )  # fmt: skip
            row["vs_dense"] = row["dense_us"] / us
            row["vs_split_fp16"] = row["split_fp16_us"] / us
            if (
                w4a8_hopper.available(xs[0].device)
                and w4a8_hopper.unsupported(xs[0], ws[0]) is None
            ):
                w4a8_hopper.ENABLED = True  # kernel A's light tiles by int8 wgmma (opt-in)
                try:
                    row["hopper_rel_err"] = rel_err(w4a8.split_ffn(xs[0], ws[0], config=cfg), ref)
                    row["hopper_us"] = graph_time_us(
                        [lambda x=x, w=w, cfg=cfg: w4a8.split_ffn(x, w, config=cfg)
                         for x, w in zip(xs, ws, strict=True)])  # fmt: skip
                    row["hopper_kernel_a_us"] = graph_time_us(
                        [lambda x=x, w=w, cfg=cfg: w4a8.split_activations(x, w, config=cfg)
                         for x, w in zip(xs, ws, strict=True)])  # fmt: skip
                    row["hopper_vs_dense"] = row["dense_us"] / row["hopper_us"]
                except Exception as exc:  # report it, keep the rest of the table
                    row["hopper_failed"] = f"{type(exc).__name__}: {exc}"[:300]
                finally:
                    w4a8_hopper.ENABLED = False
        rows.append(row)
        print(json.dumps(row), flush=True)
    meta = dict(
        card=torch.cuda.get_device_name(), torch=torch.__version__,
        triton=__import__("triton").__version__, shape=args.shape, heavy=args.heavy,
        light=light, format="int4 g128 asymmetric (integer zeros)",
    )  # fmt: skip
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
