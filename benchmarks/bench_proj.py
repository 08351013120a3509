"""Dense fp16 projections at decode sizes: cuBLAS (torch) against ffnsplit's dense paths (GPU).

The static decoder's attention-side projections and lm_head are dense in both the fp16 model and
its compressed twin (Llama-3-8B: q/k/v 6144 x 4096, o 4096 x 4096, lm_head 128256 x 4096). This
times them at M = 1, 2, 4 through torch (cuBLAS) and through quant_matmul.split_linear with only
a dense part ("gemv" the CUDA-core GEMV, "mma" the Gluon tier), CUDA-graph replays over weight
copies that L2 cannot hold, medians; every output checked against fp32 first.

    PYTHONPATH=. python3 benchmarks/bench_proj.py --out $OUT/proj.json
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_decode import graph_time_us, rel_err  # noqa: E402
from bench_floor import write_result  # noqa: E402

from ffnsplit.kernels import quant_matmul as qmm  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "lm_head": (128256, 4096)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", default="1,2,4")
    parser.add_argument("--paths", default="gemv,mma")
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "proj.json"))
    args = parser.parse_args()
    rows = []
    for name, (n, k) in SHAPES.items():
        copies = max(2, -(-256 * 2**20 // (2 * n * k)))  # > 256 MiB in all: no L2 reuse
        ws = [torch.randn(n, k, device="cuda", dtype=torch.float16) / 64 for _ in range(copies)]
        for m in (int(v) for v in args.m.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            ref = x.float() @ ws[0].float().T
            row = {"shape": name, "n": n, "k": k, "m": m, "mb": 2 * n * k / 1e6}
            row["torch_us"] = graph_time_us([lambda w=w, x=x: x @ w.T for w in ws])
            row["torch_err"] = rel_err(x @ ws[0].T, ref)
            for path in args.paths.split(","):
                try:
                    y = qmm.split_linear(x, ws[0], None, None, path=path)
                except ValueError as exc:  # a path that cannot take this shape
                    row[f"{path}_error"] = str(exc)
                    continue
                row[f"{path}_err"] = rel_err(y, ref)
                row[f"{path}_us"] = graph_time_us(
                    [
                        lambda w=w, x=x, p=path: qmm.split_linear(x, w, None, None, path=p)
                        for w in ws
                    ]  # fmt: skip
                )
            rows.append(row)
            print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()},
                  flush=True)  # fmt: skip
    write_result(args.out, torch.device("cuda"), rows=rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
