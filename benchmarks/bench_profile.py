"""Profiler throughput against a plain forward pass of the same model on the same card.

Models are built from Llama configs with random weights of real shapes (no downloads):
- SmolLM2-135M shape, on the GPU, normal mode: plain forward with logits, plain forward through
  the decoder layers only (what the profiler runs), and profiling;
- Llama-3-8B shape, kept on the CPU in bf16, sequential mode (one decoder layer on the GPU at a
  time): a plain sequential forward (the fair baseline: same weight transfers) and profiling, with
  the peak GPU memory of each.

    python benchmarks/bench_profile.py                 # on a GPU machine; JSON to $OUT or --out
    python benchmarks/bench_profile.py --smoke         # tiny shapes on the CPU: checks it runs
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ffnsplit.arch import model_fingerprint  # noqa: E402
from ffnsplit.fsutil import atomic_write_text  # noqa: E402
from ffnsplit.profile import profile_model, run_calibration, split_batches  # noqa: E402

SMOLLM2_135M = {
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "max_position_embeddings": 8192,
    "rope_theta": 100000.0,
    "tie_word_embeddings": True,
}
LLAMA3_8B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
}
SMOKE_SMALL = {
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
    "max_position_embeddings": 256,
}
SMOKE_LARGE = {**SMOKE_SMALL, "hidden_size": 128, "intermediate_size": 352, "vocab_size": 1024}

console = Console(width=150)


def build_model(shape: dict, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """A Llama of the given shape with random weights (std 0.02, norms 1), built in `dtype`."""
    config = transformers.LlamaConfig(**shape)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = transformers.LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.to_empty(device=device)
    # Random numbers are drawn on the GPU when there is one (much faster than the CPU for 8B).
    source = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator(device=source).manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.fill_(1.0)
            else:
                values = torch.empty(param.shape, dtype=param.dtype, device=source)
                param.copy_(values.normal_(0.0, 0.02, generator=generator))
    # Non-persistent buffers (rotary inverse frequencies) are garbage after to_empty: rebuild.
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(config).to(device)
    return model.eval()


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median wall seconds of `repeats` calls (CUDA synchronized around each)."""
    return timed_rounds({"run": fn}, repeats)["run"]


def timed_rounds(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall seconds of each run over `repeats` rounds, each round calling every run once
    in turn (CUDA synchronized around each call): a drift of the machine's speed over the
    measurement hits all runs alike."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            synchronize()
            start = time.perf_counter()
            fn()
            synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def peak_memory(fn: Callable[[], object]) -> int | None:
    """Peak GPU bytes allocated while `fn` runs (None without CUDA)."""
    if not torch.cuda.is_available():
        fn()
        return None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fn()
    synchronize()
    return torch.cuda.max_memory_allocated()


def forward_with_logits(model: torch.nn.Module, batches: list, device: str) -> None:
    with torch.no_grad():
        for ids in batches:
            model(input_ids=ids.to(device), use_cache=False)


def bench_normal(name: str, shape: dict, args: argparse.Namespace) -> list[dict]:
    """Model on the device: plain forward (logits / layers only) vs profiling."""
    model = build_model(shape, args.device, torch.bfloat16)
    ids = torch.randint(0, shape["vocab_size"], (args.tokens // args.seq_len, args.seq_len))
    batches = split_batches(ids, args.batch_size)
    fingerprint = model_fingerprint(model)

    def profile(profiler: Callable[..., object] = profile_model) -> None:
        profiler(
            model,
            ids,
            batch_size=args.batch_size,
            device=args.device,
            sequential=False,
            fingerprint=fingerprint,
        )

    runs = {
        "plain forward (with logits)": lambda: forward_with_logits(model, batches, args.device),
        "plain forward (decoder layers)": lambda: run_calibration(
            model, batches, device=args.device
        ),
        "profile": profile,
    }
    for label, baseline in baseline_profilers(args).items():
        runs[f"profile ({label})"] = lambda baseline=baseline: profile(baseline)
    for run in runs.values():  # warm-up: kernels, cuBLAS handles, allocator
        run()
    rows = []
    for run_name, seconds in timed_rounds(runs, args.repeats).items():
        rows.append(
            {
                "model": name,
                "mode": "normal",
                "run": run_name,
                "tokens": ids.numel(),
                "seq_len": args.seq_len,
                "batch_size": args.batch_size,
                "seconds": seconds,
                "tokens_per_s": ids.numel() / seconds,
                "peak_gpu_bytes": None,
            }
        )
    if args.trace:
        plain_trace = trace_ops(runs["plain forward (decoder layers)"])
        profile_trace = trace_ops(profile)
        row = next(row for row in rows if row["run"] == "profile")
        row["top_ops"] = top_ops(profile_trace["ops"])
        row["added_ops"] = added_ops(plain_trace["ops"], profile_trace["ops"])
        row["trace_totals"] = {
            "plain_device_ms": plain_trace["device_ms"],
            "profile_device_ms": profile_trace["device_ms"],
            "plain_wall_s": plain_trace["wall_s"],
            "profile_wall_s": profile_trace["wall_s"],
        }
    return rows


def baseline_profilers(args: argparse.Namespace) -> dict[str, Callable[..., object]]:
    """profile_model of each copy of the package given by --baseline, by label: "baseline copy"
    for a package `ffnsplit_baseline`, "copy NAME" for `ffnsplit_NAME`."""
    profilers = {}
    for folder in args.baseline or []:
        root = Path(folder).resolve()
        packages = sorted(p.name for p in root.glob("ffnsplit_*") if (p / "profile.py").is_file())
        if len(packages) != 1:
            raise SystemExit(f"--baseline {folder}: want one package ffnsplit_*, found {packages}")
        sys.path.insert(0, str(root))
        module = importlib.import_module(f"{packages[0]}.profile")
        suffix = packages[0].removeprefix("ffnsplit_")
        label = "baseline copy" if suffix == "baseline" else f"copy {suffix}"
        profilers[label] = module.profile_model
    return profilers


def bench_sequential(name: str, shape: dict, args: argparse.Namespace) -> list[dict]:
    """Model kept on the CPU, one decoder layer at a time on the device: plain vs profiling."""
    start = time.perf_counter()
    model = build_model(shape, "cpu", torch.bfloat16)
    console.print(f"built {name} on the CPU in {time.perf_counter() - start:.1f}s")
    ids = torch.randint(0, shape["vocab_size"], (args.tokens_large // args.seq_len, args.seq_len))
    batches = split_batches(ids, args.batch_size)
    # Hashing 8B parameters is setup, not profiling: the file's fingerprint is not needed here.
    fingerprint = {"model_type": "llama", "benchmark": "random weights, not fingerprinted"}

    def plain() -> None:
        run_calibration(model, batches, device=args.device, sequential=True)

    def profile(profiler: Callable[..., object] = profile_model) -> None:
        profiler(
            model,
            ids,
            batch_size=args.batch_size,
            device=args.device,
            sequential=True,
            fingerprint=fingerprint,
        )

    runs = [("plain sequential forward", plain), ("profile (sequential)", profile)]
    profilers = [profile_model]
    for label, baseline in baseline_profilers(args).items():
        runs.append((f"profile (sequential, {label})", lambda baseline=baseline: profile(baseline)))
        profilers.append(baseline)
    warm = ids[:2, : min(128, args.seq_len)]
    run_calibration(model, split_batches(warm, 2), device=args.device, sequential=True)
    for profiler in profilers:
        profiler(model, warm, device=args.device, sequential=True, fingerprint=fingerprint)
    rows = []
    for run_name, run in runs:
        peaks: list[int | None] = []

        def measured(run: Callable[[], None] = run, peaks: list = peaks) -> None:
            peaks.append(peak_memory(run))

        seconds = timed(measured, args.repeats_large)
        rows.append(
            {
                "model": name,
                "mode": "sequential",
                "run": run_name,
                "tokens": ids.numel(),
                "seq_len": args.seq_len,
                "batch_size": args.batch_size,
                "seconds": seconds,
                "tokens_per_s": ids.numel() / seconds,
                "peak_gpu_bytes": max((p for p in peaks if p is not None), default=None),
            }
        )
    layer = model.model.layers[0]
    layer_bytes = sum(p.numel() * p.element_size() for p in layer.parameters())
    for row in rows:
        row["layer_bytes"] = layer_bytes
    return rows


def trace_ops(fn: Callable[[], object]) -> dict:
    """One traced call of `fn`: {"ops": op name -> {"self_ms", "calls"} (self device time on CUDA,
    else CPU time), "device_ms": the summed time of the device events (kernels, copies; None
    without CUDA), "wall_s": the call's wall time under the profiler}."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        wall = time.perf_counter() - start
    events = prof.key_averages()
    device_time = "self_device_time_total"
    if not torch.cuda.is_available() or not events or not hasattr(events[0], device_time):
        device_time = "self_cpu_time_total"
    device_ms = None
    if device_time == "self_device_time_total":
        device_ms = (
            sum(getattr(e, device_time) for e in events if e.device_type != DeviceType.CPU) / 1000
        )
    ops = {e.key: {"self_ms": getattr(e, device_time) / 1000, "calls": e.count} for e in events}
    return {"ops": ops, "device_ms": device_ms, "wall_s": wall}


def top_ops(ops: dict[str, dict], top: int = 15) -> list[dict]:
    """The `top` ops taking the most self time."""
    ranked = sorted(ops.items(), key=lambda item: item[1]["self_ms"], reverse=True)[:top]
    return [{"op": name, **value} for name, value in ranked]


def added_ops(plain: dict[str, dict], profiled: dict[str, dict], top: int = 20) -> list[dict]:
    """The ops whose self time grows most from the plain forward to profiling (by op name):
    where the overhead goes. `added_ms` = profiling minus plain; `calls` are profiling's."""
    rows = []
    for name in profiled.keys() | plain.keys():
        mine = profiled.get(name, {"self_ms": 0.0, "calls": 0})
        base = plain.get(name, {"self_ms": 0.0, "calls": 0})
        rows.append(
            {
                "op": name,
                "added_ms": mine["self_ms"] - base["self_ms"],
                "profile_ms": mine["self_ms"],
                "plain_ms": base["self_ms"],
                "calls": mine["calls"],
                "plain_calls": base["calls"],
            }
        )
    rows.sort(key=lambda row: row["added_ms"], reverse=True)
    return rows[:top]


def print_results(rows: list[dict]) -> None:
    table = Table(title="Profiler throughput")
    for column in ("model", "mode", "run", "tokens", "tok/s", "vs plain", "peak GPU"):
        table.add_column(column, justify="left" if column in ("model", "run") else "right")
    baseline: dict[tuple, float] = {}
    for row in rows:
        key = (row["model"], row["mode"])
        if row["run"].startswith("profile"):
            base = baseline.get(key)
            row["overhead_vs_plain"] = None if base is None else base / row["tokens_per_s"] - 1
        elif "logits" not in row["run"]:
            baseline[key] = row["tokens_per_s"]
        overhead = row.get("overhead_vs_plain")
        peak = row["peak_gpu_bytes"]
        table.add_row(
            row["model"],
            row["mode"],
            row["run"],
            f"{row['tokens']:,}",
            f"{row['tokens_per_s']:,.0f}",
            "" if overhead is None else f"{100 * overhead:+.1f}%",
            "" if peak is None else f"{peak / 2**30:.2f} GiB",
        )
    console.print(table)
    for row in rows:
        if row.get("top_ops"):
            console.print(f"top ops of {row['run']} ({row['model']}), self time:")
        for op in row.get("top_ops", []):
            console.print(f"  {op['self_ms']:9.2f} ms  {op['calls']:6d}x  {op['op']}")
        if row.get("added_ops"):
            console.print(
                "ops that profiling adds (self time, profile - plain forward; calls in profile):"
            )
            total = sum(op["added_ms"] for op in row["added_ops"] if op["added_ms"] > 0)
        for op in row.get("added_ops", []):
            per_call = 1000 * op["profile_ms"] / op["calls"] if op["calls"] else 0.0
            console.print(
                f"  {op['added_ms']:+9.2f} ms  {op['calls']:6d}x ({per_call:8.1f} us each, "
                f"plain {op['plain_calls']}x)  {op['op']}"
            )
        if row.get("added_ops"):
            console.print(f"  {total:9.2f} ms added by the ops above")
        totals = row.get("trace_totals")
        if totals and totals["plain_device_ms"] is not None:
            plain_ms, profile_ms = totals["plain_device_ms"], totals["profile_device_ms"]
            console.print(
                f"  traced once each: device time (kernels, copies) plain {plain_ms:.2f} ms, "
                f"profile {profile_ms:.2f} ms ({profile_ms - plain_ms:+.2f} ms); wall plain "
                f"{1000 * totals['plain_wall_s']:.2f} ms, profile "
                f"{1000 * totals['profile_wall_s']:.2f} ms: the wall time added beyond the "
                "device time is host-side (launches, syncs, setup) or idle device"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    parser.add_argument("--out", help="JSON path (default $OUT/bench_profile.json)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tokens", type=int, default=131072, help="SmolLM2-shape tokens")
    parser.add_argument("--tokens-large", type=int, default=32768, help="8B-shape tokens")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--repeats-large", type=int, default=1)
    parser.add_argument("--skip-large", action="store_true", help="no 8B-shape sequential run")
    parser.add_argument(
        "--baseline",
        action="append",
        help="also time the profiler of another copy of the package: a folder holding it as "
        "`ffnsplit_baseline` or `ffnsplit_NAME` (its imports renamed), e.g. the previous "
        "commit's; may be given several times",
    )
    parser.add_argument(
        "--trace",
        action="store_true",
        help="trace the plain forward and profiling once each: top ops, and the ops profiling adds",
    )
    args = parser.parse_args()
    small, large = SMOLLM2_135M, LLAMA3_8B
    if args.smoke:
        small, large = SMOKE_SMALL, SMOKE_LARGE
        args.device, args.tokens, args.tokens_large, args.seq_len = "cpu", 1024, 512, 64
        args.batch_size, args.repeats = 4, 1
    elif not torch.cuda.is_available():
        parser.error("no CUDA GPU: run with --smoke on a CPU")

    rows = bench_normal("SmolLM2-135M shape", small, args)
    if not args.skip_large:
        rows += bench_sequential("Llama-3-8B shape", large, args)
    print_results(rows)

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    report = {
        "benchmark": "bench_profile",
        "card": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "device": args.device,
        "torch": torch.__version__,
        "triton": triton_version,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([sys.executable, *sys.argv]),
        "smoke": args.smoke,
        "results": rows,
    }
    out = Path(args.out or Path(os.environ.get("OUT", ".")) / "bench_profile.json")
    atomic_write_text(out, json.dumps(report, indent=2) + "\n")
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
