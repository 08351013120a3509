"""Host (CPU) time of the profiler's work: per hook call, and fixed per run (GPU only).

With inputs so small that the GPU work is negligible, the wall time is the host time that
launching it costs: if the host time per layer exceeds the device time per layer, profiling is
host-bound and its overhead is the added host time, not the added device time. The fixed cost
per run (setup, flushes, the transfer of the results and their arithmetic on the host) is the
wall time of profiling a few tokens through a SmolLM2-135M-shaped model minus that of the plain
forward through its decoder layers.

    PYTHONPATH=. python3 benchmarks/profile_host.py [--baseline DIR] [--phases-tokens 32768]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_profile import SMOLLM2_135M, build_model  # noqa: E402
from ffnsplit.arch import decoder_layers, get_ffn_blocks, model_fingerprint  # noqa: E402
from ffnsplit.kernels.profile_stats import StatsPartials, accumulate_stats  # noqa: E402
from ffnsplit.profile import profile_model, run_calibration, split_batches  # noqa: E402


def per_call_us(fn: Callable[[], object], calls: int = 300) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def median_ms(fn: Callable[[], object], repeats: int = 15) -> float:
    fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", help="a folder holding another copy as ffnsplit_baseline")
    parser.add_argument(
        "--phases-tokens",
        type=int,
        default=0,
        help="also time the host phases of profile calls of this many tokens (batch 16 x 2048): "
        "before the forward starts, and after the device is done",
    )
    parser.add_argument(
        "--cprofile-tokens",
        type=int,
        default=0,
        help="also run cProfile on one profile call of this many tokens (batch 16 x 2048)",
    )
    args = parser.parse_args()
    dev, size = "cuda", 1536
    a = torch.randn(16, size, device=dev, dtype=torch.bfloat16)
    col = torch.rand(size, device=dev)
    sums = [torch.zeros(size, device=dev) for _ in range(3)]
    count = torch.zeros(size, dtype=torch.int64, device=dev)
    partials = StatsPartials(1)
    print(
        f"accumulate_stats (3 launches): {per_call_us(lambda: accumulate_stats(a, col, 77, *sums, count)):.1f} us"
    )
    print(f"StatsPartials.add (2 launches): {per_call_us(lambda: partials.add(a, col, 77)):.1f} us")
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

    model = build_model(SMOLLM2_135M, dev, torch.bfloat16)
    ids = torch.randint(0, 1000, (2, 16))
    fingerprint = {"model_type": "llama"}
    runs = {
        "plain forward (decoder layers), 2 batches": lambda: run_calibration(
            model, split_batches(ids, 1), device=dev
        ),
        "profile, 2 batches": lambda: profile_model(
            model, ids, batch_size=1, device=dev, sequential=False, fingerprint=fingerprint
        ),
    }
    if args.baseline:
        sys.path.insert(0, str(Path(args.baseline).resolve()))
        from ffnsplit_baseline.profile import profile_model as baseline  # noqa: PLC0415

        runs["profile (baseline copy), 2 batches"] = lambda: baseline(
            model, ids, batch_size=1, device=dev, sequential=False, fingerprint=fingerprint
        )
    setup = {
        "get_ffn_blocks": lambda: get_ffn_blocks(model),
        "model_fingerprint (not timed by bench_profile)": lambda: model_fingerprint(model),
        "decoder_layers": lambda: decoder_layers(model),
        "model.to(device) (already there)": lambda: model.to(dev),
        "model.eval()": model.eval,
        "scan of module.training": lambda: any(m.training for m in model.modules()),
    }
    for name, fn in setup.items():
        print(f"30-layer SmolLM2 shape, {name}: {median_ms(fn):.2f} ms")
    times = {name: median_ms(fn) for name, fn in runs.items()}
    plain = times.pop("plain forward (decoder layers), 2 batches")
    print(f"30-layer SmolLM2 shape, 2 x 16 tokens: plain forward {plain:.2f} ms")
    for name, ms in times.items():
        print(f"  {name}: {ms:.2f} ms ({ms - plain:+.2f} ms host time per run and per batch)")
    if args.phases_tokens:
        phases(model, args.phases_tokens, fingerprint)
    if args.cprofile_tokens:
        cprofile(model, args.cprofile_tokens, fingerprint)
    return 0


def phases(model: torch.nn.Module, tokens: int, fingerprint: dict, repeats: int = 11) -> None:
    """Medians over profile calls of `tokens` tokens (batch 16 x 2048) of the host time before
    the forward's first launch (the GPU idle), of the wait for the device in the first
    `_Store.wait` (the forward, statistics, flush and the results' transfer still queued), and
    of the host time after it until the call returns (the GPU idle again); the plain forward
    through the decoder layers for comparison."""
    import ffnsplit.profile as profiler

    ids = torch.randint(0, 1000, (tokens // 2048, 2048))
    marks: dict[str, float] = {}
    run_calibration_, wait_ = profiler.run_calibration, profiler._Store.wait

    def run_marked(*args: object, **kwargs: object) -> None:
        marks.setdefault("forward", time.perf_counter())
        run_calibration_(*args, **kwargs)

    def wait_marked(store: profiler._Store) -> tuple:
        marks.setdefault("wait", time.perf_counter())
        torch.cuda.synchronize()
        marks.setdefault("done", time.perf_counter())
        return wait_(store)

    def plain() -> None:
        run_calibration(model, split_batches(ids, 16), device="cuda")

    times: dict[str, list[float]] = {"before forward": [], "wait": [], "after device": []}
    times |= {"profile call": [], "plain forward": []}
    profiler.run_calibration, profiler._Store.wait = run_marked, wait_marked
    try:
        for round_ in range(repeats + 1):
            torch.cuda.synchronize()
            marks.clear()
            start = time.perf_counter()
            profile_model(model, ids, batch_size=16, device="cuda", fingerprint=fingerprint)
            end = time.perf_counter()
            torch.cuda.synchronize()
            start_plain = time.perf_counter()
            plain()
            torch.cuda.synchronize()
            if round_:  # the first: warm-up
                times["before forward"].append(marks["forward"] - start)
                times["wait"].append(marks["done"] - marks["wait"])
                times["after device"].append(end - marks["done"])
                times["profile call"].append(end - start)
                times["plain forward"].append(time.perf_counter() - start_plain)
    finally:
        profiler.run_calibration, profiler._Store.wait = run_calibration_, wait_
    print(f"profile call of {tokens} tokens, batch 16 x 2048, medians of {repeats}:")
    for name, values in times.items():
        print(f"  {name}: {statistics.median(values) * 1e3:.2f} ms")


def cprofile(model: torch.nn.Module, tokens: int, fingerprint: dict) -> None:
    """Where the host time of one profile call goes (cProfile, after a warm-up call)."""
    import cProfile
    import pstats

    ids = torch.randint(0, 1000, (tokens // 2048, 2048))

    def run() -> None:
        profile_model(model, ids, batch_size=16, device="cuda", fingerprint=fingerprint)
        torch.cuda.synchronize()

    run()
    profiler = cProfile.Profile()
    profiler.enable()
    run()
    profiler.disable()
    stats = pstats.Stats(profiler).sort_stats("cumulative")
    print(f"cProfile of one profile call, {tokens} tokens (cumulative, ffnsplit functions):")
    stats.print_stats(r"ffnsplit/(profile|arch|kernels)", 25)
    print("by own time:")
    stats.sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    raise SystemExit(main())
