"""GPU benchmark of one split FFN layer (and optionally a whole model): a thin wrapper over
`ffnsplit.eval.bench`, the library behind `ffnsplit bench` (see its docstring for what is timed
and how), for machines without the CLI's dependencies.

Shape defaults to Llama-3-8B's FFN (H=4096, I=14336, SwiGLU): 5% heavy neurons kept fp16 (rounded
to a multiple of 16), the rest int4 with group size 128 (asymmetric), light count padded to a
multiple of 32. Writes DIR/bench_kernels.json and DIR/bench_kernels.md.

Usage: PYTHONPATH=. python3 benchmarks/bench_kernels.py [--shape 4096x14336] [--m 1,4,16]
       [--out DIR] [--append benchmarks/RESULTS.md] [--copies N]
       [--gemv-max-m M (largest M on the CUDA-core GEMV path)]
       [--e2e-shape llama3-8b [--no-layer] [--batch 1] [--prompt-len 512] [--decode-steps 128]]
       [--ncu M (only launch kernels A and B twice at this M, for profiling)]
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

import torch

from ffnsplit.errors import FFNSplitError
from ffnsplit.eval import bench
from ffnsplit.fsutil import atomic_write_text
from ffnsplit.kernels import quant_matmul as qmm
from ffnsplit.kernels import split_ffn as sffn
from ffnsplit.kernels import tiles
from ffnsplit.plan import LightFormat


def main() -> int | str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default=bench.DEFAULT_SHAPE, help="HxI (hidden x intermediate)")
    parser.add_argument("--heavy-fraction", type=float, default=0.05)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--m", default=",".join(map(str, bench.DEFAULT_MS)))
    parser.add_argument(
        "--gemv-max-m", type=int, default=tiles.GEMV_MAX_M,
        help="largest M that takes the CUDA-core GEMV path (threshold experiments; from M = 2 "
        "the Gluon mma tier comes first where it can run: FFNSPLIT_MMA=0 takes it out)",
    )  # fmt: skip
    parser.add_argument("--copies", type=int, default=None, help="weight copies to rotate through")
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks"))
    parser.add_argument("--append", default="", help="results markdown file to append to")
    parser.add_argument("--e2e-shape", default=None, choices=sorted(bench.E2E_SHAPES))
    parser.add_argument("--no-layer", action="store_true", help="only the --e2e-shape run")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--decode-steps", type=int, default=128)
    parser.add_argument(
        "--ncu", type=int, default=0, help="only launch kernels A and B twice at this M (profiling)"
    )
    args = parser.parse_args()
    if args.no_layer and not args.e2e_shape:
        parser.error("--no-layer leaves nothing to run without --e2e-shape")
    if not torch.cuda.is_available():
        return "bench_kernels.py needs a CUDA GPU (`ffnsplit bench --device cpu` for smoke runs)"
    light = LightFormat(bits=args.bits, group_size=args.group)
    if args.ncu:  # under `ncu`: the default configs, one warm-up and one profiled launch each
        tiles.GEMV_MAX_M = args.gemv_max_m
        hidden, inter = bench.parse_shape(args.shape)
        heavy, n_light = bench.shape_split(inter, args.heavy_fraction)
        device = torch.device("cuda")
        w = bench.random_split_weights(hidden, heavy, n_light, light, device)
        x = torch.randn(args.ncu, hidden, device=device, dtype=torch.float16)
        for _ in range(2):
            a = sffn.split_activations(x, w)
            qmm.split_linear(a, w.heavy_down, w.light_down)
        torch.cuda.synchronize()
        return 0
    options = bench.BenchOptions(
        shapes=() if args.no_layer else (args.shape,),
        e2e_shape=args.e2e_shape,
        ms=args.m,
        light=light.label(),
        heavy_fraction=args.heavy_fraction,
        copies=args.copies,
        batch=args.batch,
        prompt_len=args.prompt_len,
        decode_steps=args.decode_steps,
        gemv_max_m=args.gemv_max_m,
        device="cuda",
        command="PYTHONPATH=. python3 " + shlex.join(sys.argv),
    )
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, "bench_kernels.json")
    payload = bench.run_bench(
        options,
        log=lambda message: print(message, flush=True),
        checkpoint=lambda partial: bench.write_outputs(partial, json_path=json_path),
    )
    for key, timings in payload["tuning_us"].items():
        print(key, timings, flush=True)
    bench.write_outputs(payload, json_path=json_path)
    markdown = bench.markdown(payload)
    atomic_write_text(os.path.join(args.out, "bench_kernels.md"), markdown)
    if args.append:
        bench.write_outputs(payload, append=args.append)
    print(markdown)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except FFNSplitError as exc:  # bad options, out of memory: one line
        sys.exit(f"error: {exc}")
