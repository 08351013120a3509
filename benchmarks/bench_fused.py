"""The one-launch split FFN (ffnsplit/kernels/fused_decode.py) against the two-launch decode paths
(GPU).

Llama-3-8B FFN shape (4096 -> 14336, SwiGLU), ceil(5%) = 717 heavy fp16 neurons padded to 720
(format.pad_heavy, as SplitFFN does on a GPU) and 13,632 int4 g128 (asymmetric), fp16: the whole
FFN through "auto" without the fused path (the Gluon tier or GEMV, as before), through the fused
path as tuned, and each fused config alone, for M in {1, 2, 3, 4}; dense fp16 (cuBLAS) for
reference and the byte floor (weight bytes / measured copy bandwidth). CUDA-graph replays over
three weight copies (L2 cannot hold them), medians; every output checked against float64 first.

    PYTHONPATH=. python3 benchmarks/bench_fused.py --out $OUT/bench_fused.json
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

from bench_decode import (  # noqa: E402
    copy_bandwidth,
    dense_swiglu,
    graph_time_us,
    heavy_as,
    rel_err,
    split_weights,
)
from bench_floor import write_result  # noqa: E402

from ffnsplit.kernels import fused_decode, reference  # noqa: E402
from ffnsplit.kernels import split_ffn as sffn  # noqa: E402
from ffnsplit.kernels.format import pad_heavy  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", default="1,2,3,4")
    parser.add_argument("--shape", default="4096x14336")
    parser.add_argument("--heavy", type=int, default=717)
    parser.add_argument("--copies", type=int, default=3)
    parser.add_argument("--extra", default="", help="more configs, ';'-separated FusedConfig(...)")
    parser.add_argument("--no-configs", action="store_true", help="skip each config alone")
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "fused.json"))
    args = parser.parse_args()
    extra = tuple(eval(e.strip(), {"FusedConfig": fused_decode.FusedConfig})  # noqa: S307
                  for e in args.extra.split(";") if e.strip())  # fmt: skip
    fused_decode._CONFIGS = fused_decode._CONFIGS + extra
    hidden, inter = (int(v) for v in args.shape.lower().split("x"))
    light = -(-(inter - args.heavy) // 32) * 32
    bw = copy_bandwidth()
    copies = [pad_heavy(split_weights(hidden, args.heavy, light, 4, 128))
              for _ in range(args.copies)]  # fmt: skip
    w0 = copies[0]
    nbytes = sum(t.numel() * t.element_size() for t in (w0.heavy_up, w0.heavy_gate, w0.heavy_down))
    nbytes += sum(q.nbytes() for q in (w0.light_up, w0.light_gate, w0.light_down))
    dense = [
        (torch.randn(2 * inter, hidden, device="cuda", dtype=torch.float16) / hidden**0.5,
         torch.randn(hidden, inter, device="cuda", dtype=torch.float16) / inter**0.5)
        for _ in range(args.copies)
    ]  # fmt: skip
    w64 = heavy_as(w0, torch.float64)
    floor_us = nbytes / bw * 1e6
    print(f"copy {bw / 1e12:.3f} TB/s, weight bytes {nbytes / 1e6:.2f} MB, floor {floor_us:.2f} us")
    rows = []
    configs = fused_decode._CONFIGS
    for m in (int(v) for v in args.m.split(",")):
        x = torch.randn(m, hidden, device="cuda", dtype=torch.float16)
        ref = reference.split_ffn(x.double(), w64)
        row: dict = {"m": m}
        row["dense_us"] = graph_time_us([lambda d=d, x=x: dense_swiglu(x, d) for d in dense])
        saved = fused_decode.AUTO_MAX_M
        fused_decode.AUTO_MAX_M = 0
        try:
            row["two_launch_err"] = rel_err(sffn.split_ffn(x, w0), ref)
            row["two_launch_path"] = sffn.kernel_path(m, x, w0)
            row["two_launch_us"] = graph_time_us(
                [lambda w=w, x=x: sffn.split_ffn(x, w) for w in copies]
            )
        finally:
            fused_decode.AUTO_MAX_M = saved
        row["fused_err"] = rel_err(sffn.split_ffn(x, w0, path="fused"), ref)
        row["fused_us"] = graph_time_us(
            [lambda w=w, x=x: sffn.split_ffn(x, w, path="fused") for w in copies]
        )
        # where the time goes: the fused launch with the light or the heavy neurons alone
        for part, wp in (("light_only", [replace(w, heavy_up=None, heavy_gate=None,
                                                  heavy_down=None) for w in copies]),
                         ("heavy_only", [replace(w, light_up=None, light_gate=None,
                                                  light_down=None) for w in copies])):  # fmt: skip
            row[f"{part}_us"] = graph_time_us(
                [lambda w=w, x=x: sffn.split_ffn(x, w, path="fused") for w in wp]
            )
        for name in ("two_launch", "fused"):
            row[f"{name}_vs_dense"] = row["dense_us"] / row[f"{name}_us"]
            row[f"{name}_x_floor"] = row[f"{name}_us"] / floor_us
        if not args.no_configs:
            try:
                for i, cfg in enumerate(configs):
                    fused_decode._CONFIGS = (cfg,)
                    if not fused_decode._config_ok(cfg, w0):
                        continue
                    row[f"cfg{i}_err"] = rel_err(sffn.split_ffn(x, w0, path="fused"), ref)
                    row[f"cfg{i}_us"] = graph_time_us(
                        [lambda w=w, x=x: sffn.split_ffn(x, w, path="fused") for w in copies]
                    )
            finally:
                fused_decode._CONFIGS = configs
        rows.append(row)
        print({k: round(v, 6) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    write_result(args.out, torch.device("cuda"), shape=[hidden, inter], heavy=w0.n_heavy,
                 light=light, copy_bandwidth=bw, weight_bytes=nbytes, floor_us=floor_us,
                 configs=[str(c) for c in configs], rows=rows)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
