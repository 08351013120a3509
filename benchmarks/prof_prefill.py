"""Where an eager 512-token prefill goes: a 4-layer Llama-3-8B-shaped model, dense and with every
FFN split (5% random heavy fp16 = 717 neurons, int4 g128), through `ffnsplit bench`'s
StaticDecoder; prints medians, the torch profiler's top CUDA kernels and one FFN module's time
with its kernels launched from Python and replayed from a CUDA graph (GPU only). In the 4-layer
prefill the split FFNs replay their own graphs (ffnsplit/graphs.py), as users' eager calls do. Session 11 found cuBLAS's sm75 fallback with it (benchmarks/RESULTS.md).

    PYTHONPATH=. python3 benchmarks/prof_prefill.py
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ffnsplit.eval import bench  # noqa: E402
from ffnsplit.kernels.tiles import capture_graph  # noqa: E402
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
        if hasattr(mlp, "cuda_graphs"):  # a SplitFFN: time its kernels' launches, not its graphs
            mlp.cuda_graphs = False
        for _ in range(3):
            mlp(x)
        times = [bench.elapsed_us(lambda: mlp(x), DEVICE) for _ in range(9)]
        print(
            f"{tag}: one FFN ({type(mlp).__name__}) eager, median {statistics.median(times):.1f} us"
        )
        # the same call replayed from a CUDA graph: eager minus this is host (launch) overhead
        graph = capture_graph(lambda: mlp(x))
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
