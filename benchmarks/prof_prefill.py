"""Where an eager 512-token prefill goes: a 4-layer Llama-3-8B-shaped model, dense and with every
FFN split (5% random heavy fp16 = 717 neurons, int4 g128), through `ffnsplit bench`'s
StaticDecoder; prints medians, the torch profiler's top CUDA kernels and one FFN module's eager
time (GPU only). Session 11 found cuBLAS's sm75 fallback with it (benchmarks/RESULTS.md).

    PYTHONPATH=. python3 benchmarks/prof_prefill.py
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ffnsplit.eval import bench  # noqa: E402
from ffnsplit.plan import parse_light_format  # noqa: E402

DEVICE = torch.device("cuda")
PROMPT = 512


def measure(model: torch.nn.Module, prompt: torch.Tensor, tag: str) -> None:
    with torch.no_grad():
        decoder = bench.StaticDecoder(model, 1, 2 * PROMPT, kernels="auto")
        positions = decoder.key_positions[:PROMPT]
        for _ in range(3):
            decoder.forward(prompt, positions)
        torch.cuda.synchronize()
        times = [bench.elapsed_us(lambda: decoder.forward(prompt, positions), DEVICE)
                 for _ in range(7)]  # fmt: skip
        print(
            f"{tag}: prefill of {PROMPT} tokens, 4 layers, median {statistics.median(times):.0f} us"
        )
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            decoder.forward(prompt, positions)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12,
                                        max_name_column_width=60))  # fmt: skip
        x = torch.randn(1, PROMPT, model.config.hidden_size, device=DEVICE, dtype=torch.float16)
        mlp = model.model.layers[0].mlp
        for _ in range(3):
            mlp(x)
        times = [bench.elapsed_us(lambda: mlp(x), DEVICE) for _ in range(9)]
        print(
            f"{tag}: one FFN ({type(mlp).__name__}) eager, median {statistics.median(times):.1f} us"
        )
        # the same call replayed from a CUDA graph: eager minus this is host (launch) overhead
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            mlp(x)
            with torch.cuda.graph(graph, stream=stream):
                mlp(x)
        torch.cuda.current_stream().wait_stream(stream)
        graph.replay()
        times = [bench.elapsed_us(graph.replay, DEVICE) for _ in range(9)]
        with torch.profiler.profile(activities=activities) as prof:
            mlp(x)
            torch.cuda.synchronize()
        events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        print(
            f"{tag}: one FFN from a CUDA graph, median {statistics.median(times):.1f} us; "
            f"{len(events)} GPU kernels/copies an eager call"
        )
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15,
                                        max_name_column_width=60))  # fmt: skip


def main() -> int:
    if not torch.cuda.is_available():
        print("prof_prefill.py needs a CUDA GPU", file=sys.stderr)
        return 2
    bench.E2E_SHAPES["llama3-8b"] = dict(bench.E2E_SHAPES["llama3-8b"], num_hidden_layers=4)
    torch.manual_seed(0)
    model = bench.random_llama("llama3-8b", DEVICE, torch.float16, max_positions=2 * PROMPT)
    prompt = bench._prompt(1, PROMPT, model.config.vocab_size, 0, DEVICE)
    measure(model, prompt, "dense")
    light = parse_light_format("int4-g128")
    bench.split_model_(model, bench.random_plan(model, heavy_fraction=0.05, light=light, seed=0))
    measure(model, prompt, "split")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
