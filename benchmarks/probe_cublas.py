"""Which cuBLAS kernel torch picks for x [M, 4096] @ W[N, 4096]^T, fp16, eager and in a CUDA
graph, at kernel A's dequant-path shapes (N = 2 x 14,352 and neighbours) (GPU only).

    PYTHONPATH=. python3 benchmarks/probe_cublas.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ffnsplit.eval.bench import elapsed_us  # noqa: E402

DEVICE = torch.device("cuda")


def median_us(fn) -> float:
    return sorted(elapsed_us(fn, DEVICE) for _ in range(9))[4]


def main() -> int:
    if not torch.cuda.is_available():
        print("probe_cublas.py needs a CUDA GPU", file=sys.stderr)
        return 2
    for m in (512, 2048):
        for n in (28704, 14352, 28672, 28736):
            x = torch.randn(m, 4096, device=DEVICE, dtype=torch.float16)
            w = torch.randn(n, 4096, device=DEVICE, dtype=torch.float16)

            def gemm(x=x, w=w) -> torch.Tensor:
                return x @ w.T

            for _ in range(3):
                gemm()
            torch.cuda.synchronize()
            eager = median_us(gemm)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                gemm()
                torch.cuda.synchronize()
            kernels = [e.key[:60] for e in prof.key_averages()
                       if any(s in e.key for s in ("gemm", "nvjet", "cutlass"))]  # fmt: skip
            graph = torch.cuda.CUDAGraph()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                gemm()
                with torch.cuda.graph(graph, stream=stream):
                    gemm()
            torch.cuda.synchronize()
            print(f"M={m} N={n}: eager {eager:.1f} us, graph {median_us(graph.replay):.1f} us, "
                  f"{kernels}", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
