"""Kernel A (split_activations) and kernel B (split_linear) of the Llama-3-8B FFN at mid-size M
on each tl tier and the dequant path, first config of each (FFNSPLIT_AUTOTUNE=0), from CUDA-graph
replays over two weight copies (GPU only): which path "auto" should take between the decode
tiers and the large-M dequant path.

    FFNSPLIT_AUTOTUNE=0 PYTHONPATH=. python3 benchmarks/sweep_mid.py --m 64,128,256 --out $OUT/mid.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__))))
from bench_decode import graph_time_us, split_weights  # noqa: E402

from ffnsplit.kernels import quant_matmul as qmm  # noqa: E402
from ffnsplit.kernels import split_ffn as sffn  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--m", default="64,128,256")
    parser.add_argument("--paths", default="small,prefill,dequant")
    parser.add_argument("--out", default="sweep_mid.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    copies = [split_weights(4096, 720, 13632, 4, 128) for _ in range(2)]
    rows = []
    for m in map(int, args.m.split(",")):
        x = torch.randn(m, 4096, device="cuda", dtype=torch.float16)
        ref_a = sffn.split_activations(x, copies[0], path="dequant").float()
        a = ref_a.half()
        ref_b = qmm.split_linear(a, copies[0].heavy_down, copies[0].light_down, None,
                                 path="dequant").float()  # fmt: skip
        for path in args.paths.split(","):
            got_a = sffn.split_activations(x, copies[0], path=path).float()
            got_b = qmm.split_linear(a, copies[0].heavy_down, copies[0].light_down, None,
                                     path=path).float()  # fmt: skip
            ta = graph_time_us([
                lambda w=w, p=path, x=x: sffn.split_activations(x, w, path=p) for w in copies
            ])  # fmt: skip
            tb = graph_time_us([
                lambda w=w, p=path, a=a: qmm.split_linear(a, w.heavy_down, w.light_down, None, path=p)
                for w in copies
            ])  # fmt: skip
            rows.append(dict(
                m=m, path=path, a_us=round(ta, 2), b_us=round(tb, 2),
                a_err=float((got_a - ref_a).norm() / ref_a.norm()),
                b_err=float((got_b - ref_b).norm() / ref_b.norm()),
            ))  # fmt: skip
            print(rows[-1], flush=True)
    with open(args.out, "w") as f:
        json.dump(dict(card=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), f,
                  indent=1)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
