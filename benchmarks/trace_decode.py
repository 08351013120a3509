"""Where a decode step's time goes: a torch.profiler trace of CUDA-graph replays of the benchmark's
static-cache decoder (eval/bench.StaticDecoder) on a random-weight E2E shape, dense and then with
every FFN split (5% random heavy fp16, int4 g128 RTN, as `ffnsplit bench --e2e-shape` does).

Per model: wall time per step (CUDA events around the replays), the GPU time of every kernel name
per step, and the busy time (union of kernel intervals: overlapping PDL launches counted once), so
wall - busy is the time the GPU ran nothing. GPU machine only:

    PYTHONPATH=. python3 benchmarks/trace_decode.py --shape llama3-8b --out $OUT/trace_decode.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from collections import defaultdict

import torch


def kernel_events(prof) -> list[tuple[str, float, float]]:
    """(name, start us, end us) of every CUDA kernel in the trace, by start."""
    out = []
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.elapsed_us() > 0:
            out.append((e.name, e.time_range.start, e.time_range.end))
    return sorted(out, key=lambda t: t[1])


def busy_us(events: list[tuple[str, float, float]]) -> float:
    """Length of the union of the kernels' intervals."""
    total, end = 0.0, float("-inf")
    for _, s, e in events:
        if s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def short(name: str) -> str:
    return name if len(name) < 60 else name[:57] + "..."


def captured_step(decoder, first: torch.Tensor, position: int, steps: int):
    """(the decode step captured as a CUDA graph and warmed up, the median wall time of a step
    over 5 runs of `steps` replays from `position`, us)."""
    from ffnsplit.kernels.tiles import capture_graph

    decoder.start_decode(first, position)
    graph = capture_graph(decoder.decode_step)
    for _ in range(10):
        graph.replay()
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    walls = []
    for _ in range(5):
        decoder.start_decode(first, position)
        start.record()
        for _ in range(steps):
            graph.replay()
        stop.record()
        stop.synchronize()
        walls.append(start.elapsed_time(stop) * 1e3 / steps)
    return graph, statistics.median(walls)


def decoders(shape: str, prompt_len: int, steps: int):
    """Yield ("dense" | "compressed", StaticDecoder, first token) of one random-weight model of
    E2E shape `shape` after a prefill of `prompt_len` random tokens: dense first, then with
    every FFN split as `ffnsplit bench --e2e-shape` does (5% random heavy fp16, int4 g128 RTN)."""
    from ffnsplit.eval import bench
    from ffnsplit.plan import LightFormat

    device = torch.device("cuda")
    torch.manual_seed(0)
    model = bench.random_llama(shape, device, torch.float16, prompt_len + 2 * steps)
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_len), device=device)
    for label in ("dense", "compressed"):
        if label == "compressed":
            plan = bench.random_plan(
                model, heavy_fraction=0.05, light=LightFormat(kind="quant", bits=4, group_size=128)
            )
            bench.split_model_(model, plan)
        max_len = -(-(prompt_len + 2 * steps + 16) // 64) * 64
        with torch.no_grad():
            decoder = bench.StaticDecoder(model, 1, max_len)
            logits = decoder.forward(prompt, decoder.key_positions[:prompt_len])
        yield label, decoder, logits[:, -1].argmax(dim=-1, keepdim=True)
        del decoder


def trace(decoder, first: torch.Tensor, position: int, steps: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    graph, wall = captured_step(decoder, first, position, steps)
    decoder.start_decode(first, position)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            graph.replay()
        torch.cuda.synchronize()
    events = kernel_events(prof)
    per_name: dict[str, list[float]] = defaultdict(list)
    for name, s, e in events:
        per_name[name].append(e - s)
    span = events[-1][2] - events[0][1] if events else 0.0
    rows = sorted(
        (
            {
                "kernel": name,
                "calls_per_step": len(ts) / steps,
                "us_per_step": sum(ts) / steps,
                "median_us": statistics.median(ts),
            }
            for name, ts in per_name.items()
        ),
        key=lambda r: -r["us_per_step"],
    )
    del graph
    return {
        "wall_us_per_step": wall,
        "traced_span_us_per_step": span / steps,
        "busy_us_per_step": busy_us(events) / steps,
        "kernel_us_per_step": sum(e - s for _, s, e in events) / steps,
        "kernels_per_step": len(events) / steps,
        "kernels": rows,
    }


def step_args(doc: str, out_name: str, extra=None) -> argparse.Namespace:
    """The command line of a decode-step script: --shape, --prompt, --steps, --out (default
    $OUT/`out_name`), and what `extra(parser)` adds; `doc`'s first paragraph is its
    description."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    if extra is not None:
        extra(parser)
    parser.add_argument("--shape", default="llama3-8b")
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), out_name))
    return parser.parse_args()


def main() -> None:
    args = step_args(__doc__, "trace.json")

    result = {"shape": args.shape, "prompt": args.prompt, "steps": args.steps,
              "card": torch.cuda.get_device_name(), "torch": torch.__version__,
              "pdl": os.environ.get("FFNSPLIT_PDL", "1")}  # fmt: skip
    for label, decoder, first in decoders(args.shape, args.prompt, args.steps):
        with torch.no_grad():
            result[label] = trace(decoder, first, args.prompt, args.steps)
        r = result[label]
        print(f"{label}: wall {r['wall_us_per_step']:.1f} us/step, busy {r['busy_us_per_step']:.1f},"
              f" kernels {r['kernel_us_per_step']:.1f} ({r['kernels_per_step']:.0f} launches)")  # fmt: skip
        for row in r["kernels"][:14]:
            print(f"  {row['us_per_step']:8.1f} us  {row['calls_per_step']:5.1f} x "
                  f"{row['median_us']:6.1f}  {short(row['kernel'])}")  # fmt: skip
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
