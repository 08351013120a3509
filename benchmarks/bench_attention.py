"""A decode token's attention chain alone (GPU only): 32 layers' worth of it in one CUDA graph,
each layer its own Llama-3-8B-shaped cache (8 kv heads of 128, 32 query heads), so the caches
do not sit in L2, the launches chained by PDL as in the decode step. Forms, us a layer:

  fused       decode_ops.rope_attention and its combine launch (the decoder's default), for
              each --block-n, --warps (0: picked by the grid) and --chunks
  ticket      rope_attention combining by its last chunk (one launch), likewise
  unfused     rope_kv_write, decode_attention, its combine (three launches), for each --chunks
  attention   decode_attention (and its combine) alone on a rotated q, for each --chunks
  rope        rope_kv_write alone
  empty       an empty Triton kernel per layer (the launch chain's own cost)

Between layers an optional q/k/v-projection-sized dense GEMV (--with-proj) puts bandwidth-bound
work in the chain, as in the step. Medians of --reps runs of the graph.

    PYTHONPATH=. python3 benchmarks/bench_attention.py --position 600 --out $OUT/attention.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch
import triton
import triton.language as tl

from ffnsplit.kernels import decode_ops
from ffnsplit.kernels import quant_matmul as qmm
from ffnsplit.kernels.tiles import capture_graph, pdl_options, pdl_trigger, pdl_wait

FORMS = ("fused", "ticket", "unfused", "attention", "rope", "empty")


@triton.jit
def _empty_kernel(x_ptr, PDL: tl.constexpr):
    pdl_trigger(PDL)
    pdl_wait(PDL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--position", type=int, default=600)
    parser.add_argument("--length", type=int, default=832, help="cache length (the bench's)")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--forms", default=",".join(FORMS))
    parser.add_argument("--with-proj", action="store_true",
                        help="a 4096 -> 6144 dense projection before each layer's attention")  # fmt: skip
    parser.add_argument("--block-n", default="64",
                        help="rope_attention's keys a block, comma-separated: each is timed")  # fmt: skip
    parser.add_argument("--warps", default="4",
                        help="rope_attention's warps a program, comma-separated: each is timed")  # fmt: skip
    parser.add_argument("--chunks", default="0",
                        help="keys a program (rope_attention's chunk), comma-separated; 0: its "
                        "default (at most MAX_SPLITS chunks)")  # fmt: skip
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "attention.json"))
    args = parser.parse_args()
    device, dtype = torch.device("cuda"), torch.float16
    q_heads, kv_heads, dim = 32, 8, 128
    width = (q_heads + 2 * kv_heads) * dim
    torch.manual_seed(0)
    caches = [
        (torch.randn(1, kv_heads, args.length, dim, device=device, dtype=dtype),
         torch.randn(1, kv_heads, args.length, dim, device=device, dtype=dtype))
        for _ in range(args.layers)
    ]  # fmt: skip
    qkv = torch.randn(1, 1, width, device=device, dtype=dtype)
    cos_table = torch.randn(args.length, dim, device=device, dtype=dtype)
    sin_table = torch.randn(args.length, dim, device=device, dtype=dtype)
    positions = torch.tensor([args.position], device=device)
    cos, sin = (
        cos_table[args.position : args.position + 1],
        sin_table[args.position : args.position + 1],
    )
    q = torch.randn(1, q_heads, 1, dim, device=device, dtype=dtype)
    x = torch.randn(1, 1, 4096, device=device, dtype=dtype)
    w = torch.randn(width, 4096, device=device, dtype=dtype) / 64
    scale = dim**-0.5

    def layer(form: str, k: torch.Tensor, v: torch.Tensor, chunk: int | None = None) -> None:
        nonlocal qkv
        if args.with_proj:
            qkv = qmm.split_linear(x, w, None, None)
        if form in ("fused", "ticket"):
            decode_ops.rope_attention(qkv, cos_table, sin_table, positions, k, v, q_heads,
                                      kv_heads, dim, scale, chunk=chunk,
                                      ticket=form == "ticket")  # fmt: skip
        elif form == "unfused":
            rq = decode_ops.rope_kv_write(qkv, cos, sin, positions, k, v, q_heads, kv_heads, dim)
            decode_ops.decode_attention(rq, k, v, positions, scale, q_heads // kv_heads,
                                        chunk=chunk)  # fmt: skip
        elif form == "attention":
            decode_ops.decode_attention(q, k, v, positions, scale, q_heads // kv_heads,
                                        chunk=chunk)  # fmt: skip
        elif form == "rope":
            decode_ops.rope_kv_write(qkv, cos, sin, positions, k, v, q_heads, kv_heads, dim)
        else:
            _empty_kernel[(1,)](x, **pdl_options(device))

    result = {"card": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": triton.__version__, "position": args.position, "length": args.length,
              "layers": args.layers, "with_proj": args.with_proj, "us_per_layer": {}}  # fmt: skip
    runs = []
    for form in args.forms.split(","):
        if form not in FORMS:
            raise SystemExit(f"unknown form {form!r}: choose from {', '.join(FORMS)}")
        if form in ("fused", "ticket"):  # the one-launch kernel under each block and warp count
            runs += [(form, int(n), int(w), int(c)) for n in args.block_n.split(",")
                     for w in args.warps.split(",") for c in args.chunks.split(",")]  # fmt: skip
        elif form in ("unfused", "attention"):
            runs += [(form, None, None, int(c)) for c in args.chunks.split(",")]
        else:
            runs.append((form, None, None, 0))
    for form, block_n, warps, chunk in runs:
        label = form if block_n is None else f"{form} n{block_n} w{warps}"
        label += f" c{chunk}" if chunk else ""
        if block_n is not None:
            decode_ops.ROPE_ATTENTION_BLOCK_N, decode_ops.ROPE_ATTENTION_WARPS = block_n, warps

        def chain(form: str = form, chunk: int | None = chunk or None) -> None:
            for k, v in caches:
                layer(form, k, v, chunk)

        graph = capture_graph(chain)
        walls = []
        for _ in range(args.reps):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            stop.record()
            stop.synchronize()
            walls.append(start.elapsed_time(stop) * 1e3 / args.layers)
        del graph
        result["us_per_layer"][label] = round(statistics.median(walls), 2)
        print(f"{label:16s} {result['us_per_layer'][label]:7.2f} us a layer", flush=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
