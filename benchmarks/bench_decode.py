"""Decode-path timings of the split FFN kernels, per launch configuration (GPU only).

For a Llama-3-8B FFN (4096 -> 14336, SwiGLU), 5% heavy fp16 and the rest int4 g128 (asymmetric):
kernel A (up/gate/act) and kernel B (down) of the CUDA-core GEMV path for every GemvConfig, with
the fast int4 unpack on and off, the tensor-core decode tier, and dense fp16 through torch, for
M in {1, 2, 4, 8, 16}. CUDA-graph replays over rotating weight copies (L2 cannot hold them),
medians; the byte floor is weight bytes / measured copy bandwidth. Prints a table and writes JSON.

    PYTHONPATH=. python3 benchmarks/bench_decode.py --out $OUT/bench_decode.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ffnsplit.kernels import gemv, reference  # noqa: E402
from ffnsplit.kernels import quant_matmul as qmm  # noqa: E402
from ffnsplit.kernels import split_ffn as sffn  # noqa: E402
from ffnsplit.kernels.format import QuantizedWeight, SplitFFNWeights, n_groups, pack_planes  # noqa: E402

DEVICE = "cuda"


def copy_bandwidth() -> float:
    """Device copy bandwidth in bytes/s (bytes read + bytes written)."""
    src = torch.empty(1 << 28, dtype=torch.float32, device=DEVICE).uniform_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * src.numel() * 4 / (ms * 1e-3)


def random_qweight(n: int, k: int, bits: int, group: int) -> QuantizedWeight:
    q = torch.randint(0, 2**bits, (n, k), device=DEVICE)
    g = n_groups(k, group)
    scales = ((torch.rand(g, n, device=DEVICE) + 0.5) * 2e-3).half()
    zeros = torch.randint(0, 2**bits, (g, n), device=DEVICE).half()
    return QuantizedWeight(pack_planes(q, bits), scales, zeros, bits, group, (n, k))


def split_weights(hidden: int, h: int, light: int, bits: int, group: int) -> SplitFFNWeights:
    def dense(rows: int, cols: int) -> torch.Tensor:
        return torch.randn(rows, cols, device=DEVICE, dtype=torch.float16) / cols**0.5

    return SplitFFNWeights(
        activation="silu",
        gated=True,
        heavy_up=dense(h, hidden),
        heavy_gate=dense(h, hidden),
        heavy_down=dense(hidden, h),
        light_up=random_qweight(light, hidden, bits, group),
        light_gate=random_qweight(light, hidden, bits, group),
        light_down=random_qweight(hidden, light, bits, group),
    )


def graph_time_us(calls: list[Callable[[], object]], repeat: int = 4, reps: int = 15) -> float:
    """Median time of one call from replays of a CUDA graph cycling through `calls`."""
    for call in calls:
        call()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeat):
            for call in calls:
                call()
    graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / (repeat * len(calls)))
    del graph
    return statistics.median(times)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="4096x14336")
    parser.add_argument("--heavy", type=int, default=720)
    parser.add_argument("--m", default="1,2,4,8,16")
    parser.add_argument("--copies", type=int, default=3)
    parser.add_argument("--fast-only", action="store_true", help="skip the exact int4 unpack")
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "decode.json"))
    args = parser.parse_args()
    hidden, inter = (int(v) for v in args.shape.lower().split("x"))
    light = -(-(inter - args.heavy) // 32) * 32
    bw = copy_bandwidth()
    ws = [split_weights(hidden, args.heavy, light, 4, 128) for _ in range(args.copies)]
    dense = [
        [torch.randn(n, k, device=DEVICE, dtype=torch.float16) / k**0.5 for n, k in
         ((inter, hidden), (inter, hidden), (hidden, inter))]
        for _ in range(args.copies)
    ]  # fmt: skip
    w0 = ws[0]
    bytes_a = 2 * args.heavy * hidden * 2 + w0.light_up.nbytes() + w0.light_gate.nbytes()
    bytes_b = hidden * args.heavy * 2 + w0.light_down.nbytes()
    bytes_dense = 3 * inter * hidden * 2
    rows = []
    configs = list(gemv._CONFIGS)

    def record(m: int, method: str, kernel: str, us: float, nbytes: int, **extra) -> None:
        row = {"m": m, "method": method, "kernel": kernel, "us": round(us, 2),
               "gb_s": round(nbytes / (us * 1e-6) / 1e9, 1),
               "x_floor": round(us / (nbytes / bw * 1e6), 2), **extra}  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)

    for m in (int(v) for v in args.m.split(",")):
        xs = [torch.randn(m, hidden, device=DEVICE, dtype=torch.float16) for _ in ws]
        acts = [torch.randn(m, args.heavy + light, device=DEVICE, dtype=torch.float16) for _ in ws]

        def dense_ffn(x: torch.Tensor, d: list) -> torch.Tensor:
            return (torch.nn.functional.silu(x @ d[1].T) * (x @ d[0].T)) @ d[2].T

        us = graph_time_us(
            [lambda x=x, d=d: dense_ffn(x, d) for x, d in zip(xs, dense, strict=True)]
        )
        record(m, "dense fp16 (torch)", "ffn", us, bytes_dense)
        ref = reference.split_ffn(xs[0].float(), heavy_as(w0, torch.float32))
        for path in ("decode",):
            us = graph_time_us([lambda x=x, w=w, path=path: sffn.split_ffn(x, w, path=path)
                                for x, w in zip(xs, ws, strict=True)])  # fmt: skip
            err = rel_err(sffn.split_ffn(xs[0], w0, path=path), ref)
            record(m, f"tier {path}", "ffn", us, bytes_a + bytes_b, rel_err=err)
        for cfg in configs:
            for fast in (True,) if args.fast_only else (True, False):
                gemv._CONFIGS = (cfg,)
                gemv.FAST_OK = fast
                gemv._tuner.cache.clear()
                tag = {"config": asdict(cfg), "fast": fast}
                try:
                    us_a = graph_time_us([lambda x=x, w=w: sffn.split_activations(x, w, path="gemv")
                                          for x, w in zip(xs, ws, strict=True)])  # fmt: skip
                    us_b = graph_time_us([
                        lambda a=a, w=w: qmm.split_linear(a, w.heavy_down, w.light_down, None,
                                                          path="gemv")
                        for a, w in zip(acts, ws, strict=True)])  # fmt: skip
                    us = graph_time_us([lambda x=x, w=w: sffn.split_ffn(x, w, path="gemv")
                                        for x, w in zip(xs, ws, strict=True)])  # fmt: skip
                    err = rel_err(sffn.split_ffn(xs[0], w0, path="gemv"), ref)
                except Exception as exc:  # a config that does not compile or launch
                    print(f"config {cfg} fast={fast}: {type(exc).__name__}: {exc}", flush=True)
                    continue
                record(m, "gemv", "A", us_a, bytes_a, **tag)
                record(m, "gemv", "B", us_b, bytes_b, **tag)
                record(m, "gemv", "ffn", us, bytes_a + bytes_b, rel_err=err, **tag)
        gemv._CONFIGS = tuple(configs)
        gemv.FAST_OK = True
    props = torch.cuda.get_device_properties(0)
    result = {
        "benchmark": "bench_decode",
        "card": props.name,
        "sms": props.multi_processor_count,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "copy_bandwidth_gb_s": round(bw / 1e9, 1),
        "bytes": {"kernel_A": bytes_a, "kernel_B": bytes_b, "dense": bytes_dense},
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


def heavy_as(w: SplitFFNWeights, dtype: torch.dtype) -> SplitFFNWeights:
    """w with its dense (heavy) weights in `dtype`: the float references' weights."""
    from dataclasses import replace

    return replace(w, heavy_up=w.heavy_up.to(dtype), heavy_gate=w.heavy_gate.to(dtype),
                   heavy_down=w.heavy_down.to(dtype))  # fmt: skip


def dense_swiglu(x: torch.Tensor, wud: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The dense fp16 FFN the decode benchmarks time against: wud = ([gate; up] [2I, H],
    down [H, I]), silu(gate) * up, then down (cuBLAS)."""
    g, u = (x @ wud[0].T).chunk(2, dim=-1)
    return (torch.nn.functional.silu(g) * u) @ wud[1].T


if __name__ == "__main__":
    raise SystemExit(main())
