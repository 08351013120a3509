"""A/B of two versions of ffnsplit/graphs.py on one machine: HF generate and one FFN call.

Session 12 compared the exact-shape decode graphs of commit 968a514 with the power-of-two
buckets that replaced them (benchmarks/RESULTS.md). An 8-layer Llama-3-8B-shaped model (random
weights, 5% heavy fp16 + int4 g128); each version's GraphedCalls is installed on every SplitFFN,
in the order eager, new, old, new, old, and timed as benchmarks/bench_eager.py times them:
greedy HF `generate` decode tok/s, and one FFN call at M = 1 (GPU and host time).

    git show 968a514:ffnsplit/graphs.py > out/graphs_old.py
    PYTHONPATH=. python3 benchmarks/ab_graphs.py out/graphs_old.py
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_eager import ffn_calls, generate_rate  # noqa: E402

from ffnsplit import graphs as new  # noqa: E402
from ffnsplit.eval import bench  # noqa: E402
from ffnsplit.modules import SplitFFN  # noqa: E402
from ffnsplit.plan import parse_light_format  # noqa: E402

DEVICE = torch.device("cuda")


def main() -> int:
    if not torch.cuda.is_available() or len(sys.argv) != 2:
        print("usage (CUDA GPU): ab_graphs.py OLD_GRAPHS_PY", file=sys.stderr)
        return 2
    spec = importlib.util.spec_from_file_location("graphs_old", sys.argv[1])
    old = importlib.util.module_from_spec(spec)
    sys.modules["graphs_old"] = old
    spec.loader.exec_module(old)
    bench.E2E_SHAPES["llama3-8b"] = dict(bench.E2E_SHAPES["llama3-8b"], num_hidden_layers=8)
    torch.manual_seed(0)
    model = bench.random_llama("llama3-8b", DEVICE, torch.float16, max_positions=1024)
    light = parse_light_format("int4-g128")
    bench.split_model_(model, bench.random_plan(model, heavy_fraction=0.05, light=light, seed=0))
    mods = [m for m in model.modules() if isinstance(m, SplitFFN)]
    prompt = bench._prompt(1, 128, model.config.vocab_size, 0, DEVICE)

    def use(lib, on: bool) -> None:
        for m in mods:
            m.cuda_graphs = on
            m.__dict__["_graphs"] = lib.GraphedCalls(m._forward, m._graph_tensors) if on else None

    for tag, lib, on in (("eager", new, False), ("new", new, True), ("old", old, True),
                         ("new", new, True), ("old", old, True)):  # fmt: skip
        use(lib, on)
        generate_rate(model, prompt, 32, tag)
        ffn_calls(mods[0], [1], model.config.hidden_size, tag)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
