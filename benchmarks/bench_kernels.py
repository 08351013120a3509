"""GPU benchmark of one split FFN layer against dense fp16 (cuBLAS) and torch's int4 path.

Shape defaults to Llama-3-8B's FFN (H=4096, I=14336, SwiGLU): 5% heavy neurons kept fp16 (rounded
to a multiple of 16), the rest int4 with group size 128 (asymmetric), light count padded to a
multiple of 32. For every M it times, as medians of CUDA-graph replays over several weight copies
(so L2 never holds the weights of the next call):
  dense      three fp16 matmuls + SiLU * up through torch (cuBLAS)
  torch_int4 the same with torch.ops.aten._weight_int4pack_mm (bf16, same group size), as gpt-fast
             and torchao use it
  ffnsplit   ffnsplit.kernels.split_ffn (Triton), plus its two halves (up/gate kernel A, down
             kernel B with its split-K reduction)
  reference  the torch reference path (dequantizes per call; timed eagerly, no graph)
and reports microseconds, achieved GB/s of weight bytes and the ratio to the byte floor (weight
bytes / device copy bandwidth measured here). Writes JSON and a markdown section.

Usage: PYTHONPATH=. python3 benchmarks/bench_kernels.py [--shape 4096x14336] [--out DIR]
       [--gemv-max-m M (largest M on the CUDA-core GEMV path)]
       [--append benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from ffnsplit.fsutil import atomic_write_text
from ffnsplit.kernels import gemv, reference, tiles
from ffnsplit.kernels import quant_matmul as qmm
from ffnsplit.kernels import split_ffn as sffn
from ffnsplit.kernels.format import QuantizedWeight, SplitFFNWeights, n_groups, pack_planes

DEVICE = "cuda"


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
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


def split_bytes(w: SplitFFNWeights) -> int:
    heavy = sum(t.numel() * t.element_size() for t in (w.heavy_up, w.heavy_gate, w.heavy_down))
    return heavy + sum(q.nbytes() for q in (w.light_up, w.light_gate, w.light_down))


class Int4Linear:
    """One weight in torch's tinygemm int4 layout: w = (q - 8) * scale + zero per group."""

    def __init__(self, n: int, k: int, group: int) -> None:
        q = torch.randint(0, 16, (n, k), dtype=torch.int32, device=DEVICE)
        self.packed = torch.ops.aten._convert_weight_to_int4pack(
            (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), 8
        )
        scales = (torch.rand(k // group, n, device=DEVICE) + 0.5) * 2e-3
        zeros = (torch.rand(k // group, n, device=DEVICE) - 0.5) * 1e-2
        self.scales_zeros = torch.stack([scales, zeros], dim=-1).bfloat16().contiguous()
        self.group = group
        self.dense = ((q.float() - 8) * scales.T.repeat_interleave(group, 1)).add_(
            zeros.T.repeat_interleave(group, 1)
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm(x, self.packed, self.group, self.scales_zeros)

    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size() + self.scales_zeros.numel() * 2


def graph_time_us(calls: list[Callable[[], object]], repeat: int = 4, reps: int = 15) -> float:
    """Median time of one call, from replays of a CUDA graph that cycles through `calls`."""
    for call in calls:  # compile, tune, allocate outside the capture
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


def eager_time_us(calls: list[Callable[[], object]], reps: int = 5) -> float:
    for call in calls:
        call()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for call in calls:
            call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    return statistics.median(times)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="4096x14336", help="HxI (hidden x intermediate)")
    parser.add_argument("--heavy-fraction", type=float, default=0.05)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--m", default="1,4,16,64,256,2048")
    parser.add_argument(
        "--gemv-max-m", type=int, default=tiles.GEMV_MAX_M,
        help="largest M that takes the CUDA-core GEMV path (threshold experiments)",
    )  # fmt: skip
    parser.add_argument("--copies", type=int, default=3, help="weight copies to rotate through")
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks"))
    parser.add_argument("--append", default="", help="results markdown file to append to")
    parser.add_argument(
        "--ncu", type=int, default=0, help="only launch kernels A and B twice at this M (profiling)"
    )
    args = parser.parse_args()
    tiles.GEMV_MAX_M = args.gemv_max_m
    hidden, inter = (int(v) for v in args.shape.lower().split("x"))
    h = int(round(args.heavy_fraction * inter / 16)) * 16
    light = -(-(inter - h) // 32) * 32
    ms = [int(v) for v in args.m.split(",")]
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    info = {
        "card": props.name,
        "sms": props.multi_processor_count,
        "l2_mb": getattr(props, "L2_cache_size", 0) / 2**20,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "PYTHONPATH=. python3 " + " ".join(sys.argv),
        "shape": [hidden, inter],
        "heavy": h,
        "light": light,
        "bits": args.bits,
        "group": args.group,
        "gemv_max_m": args.gemv_max_m,
    }
    if args.ncu:  # under `ncu`: the default configs, one warm-up and one profiled launch each
        w = split_weights(hidden, h, light, args.bits, args.group)
        x = torch.randn(args.ncu, hidden, device=DEVICE, dtype=torch.float16)
        for _ in range(2):
            a = sffn.split_activations(x, w)
            qmm.split_linear(a, w.heavy_down, w.light_down)
        torch.cuda.synchronize()
        return 0
    bw = copy_bandwidth()
    info["copy_GBps"] = bw / 1e9
    print(f"{props.name}: copy bandwidth {bw / 1e9:.0f} GB/s (read + write)", flush=True)

    dense_w = [
        [torch.randn(r, c, device=DEVICE, dtype=torch.float16) / c**0.5 for r, c in
         ((inter, hidden), (inter, hidden), (hidden, inter))]
        for _ in range(args.copies)
    ]  # fmt: skip
    try:
        int4_w = [
            [
                Int4Linear(r, c, args.group)
                for r, c in ((inter, hidden), (inter, hidden), (hidden, inter))
            ]
            for _ in range(args.copies)
        ]
    except Exception as exc:  # torch's int4 op changes between releases: report, go on
        print(f"torch int4 path unavailable: {type(exc).__name__}: {exc}", flush=True)
        int4_w = []
    split_w = [split_weights(hidden, h, light, args.bits, args.group) for _ in range(args.copies)]
    nbytes = {
        "dense": 3 * hidden * inter * 2,
        "torch_int4": sum(lin.nbytes() for lin in int4_w[0]) if int4_w else 0,
        "ffnsplit": split_bytes(split_w[0]),
    }
    nbytes["reference"] = nbytes["ffnsplit"]
    nbytes["kernel_A"] = nbytes["ffnsplit"] - split_bytes_down(split_w[0])
    nbytes["kernel_B"] = split_bytes_down(split_w[0])
    info["weight_bytes"] = nbytes

    def dense_ffn(x, w):
        up, gate, down = w
        return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)

    def int4_ffn(x, w):
        up, gate, down = w
        return down(F.silu(gate(x)) * up(x))

    checks, rows, tuned = {}, [], {}
    for m in ms:
        x16 = torch.randn(m, hidden, device=DEVICE, dtype=torch.float16)
        xbf = x16.bfloat16()
        methods = {
            "dense": [lambda w=w, x=x16: dense_ffn(x, w) for w in dense_w],
            "ffnsplit": [lambda w=w, x=x16: sffn.split_ffn(x, w) for w in split_w],
        }
        if int4_w:
            methods["torch_int4"] = [lambda w=w, x=xbf: int4_ffn(x, w) for w in int4_w]
        acts = [sffn.split_activations(x16, w) for w in split_w]
        methods["kernel_A"] = [lambda w=w, x=x16: sffn.split_activations(x, w) for w in split_w]
        methods["kernel_B"] = [
            lambda w=w, a=a: qmm.split_linear(a, w.heavy_down, w.light_down)
            for w, a in zip(split_w, acts, strict=True)
        ]
        for name, calls in methods.items():
            try:
                us = graph_time_us(calls)
            except Exception as exc:  # report and go on: one broken path must not hide the rest
                print(f"M={m} {name}: FAILED {type(exc).__name__}: {exc}", flush=True)
                rows.append({"m": m, "method": name, "error": f"{type(exc).__name__}: {exc}"})
                continue
            rows.append(row(m, name, us, nbytes[name], bw))
        if m <= 256:
            us = eager_time_us([lambda w=w, x=x16: reference.split_ffn(x, w) for w in split_w])
            rows.append(row(m, "reference", us, nbytes["reference"], bw))
        if m in (1, 16, 256):
            w = split_w[0]
            ref = reference.split_ffn(x16.float(), as_float(w))
            checks[f"ffnsplit_m{m}"] = rel_err(sffn.split_ffn(x16, w), ref)
            if int4_w:
                lin = int4_w[0][0]
                checks[f"torch_int4_up_m{m}"] = rel_err(lin(xbf), xbf.float() @ lin.dense.T)
        line = [f"{r['method']}={r.get('us', float('nan')):.1f}us" for r in rows if r["m"] == m]
        print(f"M={m}", " ".join(line), flush=True)
    for tuner, name in ((sffn._tuner, "kernel_A"), (qmm._tuner, "kernel_B"), (gemv._tuner, "gemv")):
        for key, timings in tuner.timings.items():
            tuned[f"{name} {key[:2]}"] = {str(cfg): round(t * 1e3, 1) for cfg, t in timings.items()}
    for key, timings in tuned.items():
        print(key, timings, flush=True)
    result = {**info, "checks": checks, "results": rows, "tuning_us": tuned}
    os.makedirs(args.out, exist_ok=True)
    atomic_write_text(os.path.join(args.out, "bench_kernels.json"), json.dumps(result, indent=1))
    md = markdown(result)
    atomic_write_text(os.path.join(args.out, "bench_kernels.md"), md)
    if args.append:
        path = Path(args.append)
        old = path.read_text() if path.exists() else "# Results\n"
        atomic_write_text(args.append, old.rstrip("\n") + "\n\n" + md)
    print(md)
    return 0


def split_bytes_down(w: SplitFFNWeights) -> int:
    return w.heavy_down.numel() * 2 + w.light_down.nbytes()


def as_float(w: SplitFFNWeights) -> SplitFFNWeights:
    f = {n: getattr(w, n).float() for n in ("heavy_up", "heavy_gate", "heavy_down")}
    return SplitFFNWeights(w.activation, w.gated, light_up=w.light_up, light_gate=w.light_gate,
                           light_down=w.light_down, **f)  # fmt: skip


def row(m: int, method: str, us: float, nbytes: int, bw: float) -> dict:
    floor_us = nbytes / bw * 1e6
    return {"m": m, "method": method, "us": us, "GBps": nbytes / us / 1e3, "floor_us": floor_us,
            "x_floor": us / floor_us}  # fmt: skip


def markdown(r: dict) -> str:
    by = {(x["m"], x["method"]): x for x in r["results"] if "us" in x}
    ms = sorted({x["m"] for x in r["results"]})
    hidden, inter = r["shape"]
    lines = [
        f"### Split FFN layer {hidden}x{inter} SwiGLU, {r['heavy']} heavy fp16 + {r['light']} "
        f"light int{r['bits']} g{r['group']} ({r['date']})",
        "",
        f"{r['card']} ({r['sms']} SMs), torch {r['torch']}, triton {r['triton']}, CUDA "
        f"{r['cuda']}; copy bandwidth {r['copy_GBps']:.0f} GB/s (read + write). Command: "
        f"`{r['command']}`. Weight bytes: "
        + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in r["weight_bytes"].items())
        + ". Medians of CUDA-graph replays over rotating weight copies (reference: eager).",
        "",
        "| M | dense fp16 us | torch int4 us | ffnsplit us | reference us | ffnsplit vs dense "
        "| ffnsplit GB/s | ffnsplit x floor | kernel A us (x floor) | kernel B us (x floor) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def us(m, k):
        return f"{by[(m, k)]['us']:.1f}" if (m, k) in by else "-"

    for m in ms:
        f, d = by.get((m, "ffnsplit")), by.get((m, "dense"))
        a, b = by.get((m, "kernel_A")), by.get((m, "kernel_B"))
        lines.append(
            f"| {m} | {us(m, 'dense')} | {us(m, 'torch_int4')} | {us(m, 'ffnsplit')} | "
            f"{us(m, 'reference')} | {d['us'] / f['us']:.2f}x | {f['GBps']:.0f} | "
            f"{f['x_floor']:.2f} | {a['us']:.1f} ({a['x_floor']:.2f}) | "
            f"{b['us']:.1f} ({b['x_floor']:.2f}) |"
            if f and d and a and b
            else f"| {m} | {us(m, 'dense')} | {us(m, 'torch_int4')} | {us(m, 'ffnsplit')} | "
            f"{us(m, 'reference')} | - | - | - | - | - |"
        )
    lines += ["", "Checks (relative error vs fp32 reference): "
              + ", ".join(f"{k} {v:.1e}" for k, v in r["checks"].items()), ""]  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA GPU")
    sys.exit(main())
