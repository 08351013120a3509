"""Eager (no CUDA graph of the caller) cost of the split FFN: one FFN call and HF decoding.

`ffnsplit bench` times decode steps replayed from CUDA graphs, which hides the host time of
launching kernels. Users who call the model eagerly (HF `generate`, an eval loop) pay it on
every call. This script measures, on a Llama-3-8B-shaped model with random weights (5% heavy
fp16, int4 g128):
  * one FFN call at M rows (CUDA events around the call, synchronized): dense LlamaMLP, the
    SplitFFN with its per-module CUDA graphs off (every kernel launched from Python) and on;
    plus the host time to enqueue one call (perf_counter over 30 calls, no sync);
  * HF `generate` (greedy, eager, DynamicCache) decode tokens/s: dense, split without and with
    the module graphs (decode rate = (time of N + 1 new tokens - time of 1) / N).

    PYTHONPATH=. python3 benchmarks/bench_eager.py --out $OUT/eager.json [--layers 32]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ffnsplit.eval import bench  # noqa: E402
from ffnsplit.modules import SplitFFN  # noqa: E402
from ffnsplit.plan import parse_light_format  # noqa: E402

DEVICE = torch.device("cuda")


def set_graphs(model: torch.nn.Module, on: bool) -> None:
    for module in model.modules():
        if isinstance(module, SplitFFN):
            module.cuda_graphs = on


def ffn_calls(mlp: torch.nn.Module, ms: list[int], hidden: int, tag: str) -> list[dict]:
    rows = []
    for m in ms:
        x = torch.randn(1, m, hidden, device=DEVICE, dtype=torch.float16)
        with torch.no_grad():
            for _ in range(4):
                mlp(x)
            torch.cuda.synchronize()
            us = statistics.median(bench.elapsed_us(lambda x=x: mlp(x), DEVICE) for _ in range(21))
            n = 30
            begin = time.perf_counter()
            for _ in range(n):
                mlp(x)
            host = (time.perf_counter() - begin) * 1e6 / n
            torch.cuda.synchronize()
        reserved = torch.cuda.memory_reserved(DEVICE) / 2**30
        rows.append(dict(m=m, method=tag, us=us, host_us=host, reserved_gib=reserved))
        print(f"FFN M={m:3d} {tag:12s}: {us:8.1f} us a call, host {host:7.1f} us, "
              f"reserved {reserved:.2f} GiB", flush=True)  # fmt: skip
    return rows


def generate_rate(model: torch.nn.Module, prompt: torch.Tensor, new: int, tag: str) -> dict:
    def run(count: int) -> float:
        torch.cuda.synchronize()
        begin = time.perf_counter()
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=count, min_new_tokens=count, do_sample=False,
                           pad_token_id=0)  # fmt: skip
        torch.cuda.synchronize()
        return time.perf_counter() - begin

    run(new)  # warm-up (compiles, tunes, records graphs)
    one = statistics.median(run(1) for _ in range(3))
    full = statistics.median(run(new + 1) for _ in range(3))
    rate = new / (full - one)
    print(f"generate {tag:12s}: {rate:7.1f} decode tok/s ({(full - one) / new * 1e3:.2f} ms a "
          f"step), prefill + first token {one * 1e3:.1f} ms", flush=True)  # fmt: skip
    return dict(method=tag, decode_tokens_per_s=rate, step_ms=(full - one) / new * 1e3,
                first_token_ms=one * 1e3)  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--ms", default="1,4,16,64,128,256,512")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "eager.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_eager.py needs a CUDA GPU", file=sys.stderr)
        return 2
    ms = [int(v) for v in args.ms.split(",")]
    bench.E2E_SHAPES["llama3-8b"] = dict(bench.E2E_SHAPES["llama3-8b"],
                                         num_hidden_layers=args.layers)  # fmt: skip
    torch.manual_seed(0)
    model = bench.random_llama("llama3-8b", DEVICE, torch.float16, max_positions=1024)
    hidden = model.config.hidden_size
    prompt = bench._prompt(1, args.prompt, model.config.vocab_size, 0, DEVICE)
    rows = ffn_calls(model.model.layers[0].mlp, ms, hidden, "dense")
    gen = [generate_rate(model, prompt, args.new, "dense")]
    light = parse_light_format("int4-g128")
    bench.split_model_(model, bench.random_plan(model, heavy_fraction=0.05, light=light, seed=0))
    for on in (False, True):
        set_graphs(model, on)
        tag = "split+graphs" if on else "split"
        rows += ffn_calls(model.model.layers[0].mlp, ms, hidden, tag)
        gen.append(generate_rate(model, prompt, args.new, tag))
    result = dict(
        device=torch.cuda.get_device_name(DEVICE), torch=torch.__version__,
        triton=__import__("triton").__version__, command=" ".join(sys.argv),
        date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), layers=args.layers,
        prompt=args.prompt, new_tokens=args.new, ffn=rows, generate=gen,
    )  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
