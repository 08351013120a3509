"""Host (CPU) time per call of the profiler's hook work and of a plain decoder layer (GPU only).

With inputs so small that the GPU work is negligible, the wall time per call is the host time
that launching it costs: if the host time per layer exceeds the device time per layer, profiling
is host-bound and its overhead is the added host time, not the added device time.

    PYTHONPATH=. python3 benchmarks/profile_host.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ffnsplit.kernels.profile_stats import accumulate_stats  # noqa: E402


def per_call_us(fn, calls: int = 300) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> int:
    dev, size = "cuda", 1536
    a = torch.randn(16, size, device=dev, dtype=torch.bfloat16)
    col = torch.rand(size, device=dev)
    sums = [torch.zeros(size, device=dev) for _ in range(3)]
    count = torch.zeros(size, dtype=torch.int64, device=dev)
    print(
        f"accumulate_stats (3 launches): {per_call_us(lambda: accumulate_stats(a, col, 77, *sums, count)):.1f} us"
    )
    cfg = transformers.LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=1,
                                   num_attention_heads=9, num_key_value_heads=3, vocab_size=1000)  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg).to(dev, torch.bfloat16).eval()
    ids = torch.randint(0, 1000, (1, 16), device=dev)
    with torch.no_grad():
        print(
            f"1-layer model forward: {per_call_us(lambda: model(input_ids=ids, use_cache=False)):.1f} us"
        )
    x = torch.randn(16, 16, device=dev)
    print(f"one torch op (add): {per_call_us(lambda: x.add(1)):.1f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
