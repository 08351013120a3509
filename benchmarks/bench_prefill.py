"""Large-M paths of the split FFN against dense fp16 (GPU only).

For a Llama-3-8B FFN (4096 -> 14336, SwiGLU), 5% heavy fp16 and the rest int4 g128: the whole
split FFN (kernel A + kernel B) through the dequantize-in-the-loop Triton tier (`prefill`, each
row count autotuned among its configs) and through dequantize-a-chunk + cuBLAS (`dequant`), and
the dense fp16 FFN through torch (cuBLAS GEMMs + the activation), for several M. Medians of
triton.testing.do_bench over CUDA-graph replays (the weights of one layer, 107 MB packed / 352 MB dense, exceed the L2).
This picks tiles.DEQUANT_MIN_M, the row count from which `auto` takes the dequant path.

    PYTHONPATH=. python3 benchmarks/bench_prefill.py --out $OUT/bench_prefill.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ffnsplit.eval.bench import _ffn, random_split_weights, shape_split  # noqa: E402
from ffnsplit.kernels import dequant_gemm  # noqa: E402
from ffnsplit.kernels import split_ffn as sffn  # noqa: E402
from ffnsplit.kernels.tiles import capture_graph  # noqa: E402
from ffnsplit.plan import parse_light_format  # noqa: E402


def _graph_us(fn) -> float:
    """Median microseconds of `fn` replayed as a CUDA graph (no host launch time)."""
    graph = capture_graph(fn)
    return triton.testing.do_bench(graph.replay, warmup=25, rep=200, return_mode="median") * 1e3


def _heavy_scratch(on: bool, fn, *args, **kwargs):
    """fn(*args, **kwargs) with dequant_gemm.HEAVY_IN_SCRATCH set to `on` (at capture: the graph
    keeps the kernels it recorded)."""
    saved, dequant_gemm.HEAVY_IN_SCRATCH = dequant_gemm.HEAVY_IN_SCRATCH, on
    try:
        return fn(*args, **kwargs)
    finally:
        dequant_gemm.HEAVY_IN_SCRATCH = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ms", default="64,128,256,512,1024,2048,4096")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--heavy", type=int,
                        help="heavy neurons (default: 5%% rounded to 16, as `ffnsplit bench "
                        "--shape`; `compress` and the e2e model take ceil(5%%), e.g. 717)")  # fmt: skip
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"))
    parser.add_argument("--chunk-mib", type=int, help="dequant_gemm.CHUNK_BYTES in MiB")
    parser.add_argument(
        "--paths",
        default="dense,prefill,dequant",
        help="dense, small, prefill (the tl tiers), dequant, dequant_fold (dequant with "
        "dequant_gemm.HEAVY_IN_SCRATCH), auto (what split_ffn picks)",
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.chunk_mib:
        dequant_gemm.CHUNK_BYTES = args.chunk_mib << 20
    device, dtype = torch.device("cuda"), getattr(torch, args.dtype)
    torch.manual_seed(0)
    heavy, light = shape_split(args.intermediate, 0.05, heavy=args.heavy)
    w = random_split_weights(args.hidden, heavy, light, parse_light_format("int4-g128"), device,
                             dtype=dtype)  # fmt: skip
    dense = [torch.randn(n, k, device=device, dtype=dtype) / k**0.5
             for n, k in ((args.intermediate, args.hidden),) * 2
             + ((args.hidden, args.intermediate),)]  # fmt: skip
    rows = []
    for m in (int(v) for v in args.ms.split(",")):
        x = torch.randn(m, args.hidden, device=device, dtype=dtype)
        row = {"m": m}
        fns = {
            "dense": lambda x=x: _ffn(x, dense[0], dense[1], dense[2], "silu"),
            "small": lambda x=x: sffn.split_ffn(x, w, path="small"),
            "prefill": lambda x=x: sffn.split_ffn(x, w, path="prefill"),
            "auto": lambda x=x: sffn.split_ffn(x, w),
            "dequant": lambda x=x: _heavy_scratch(False, sffn.split_ffn, x, w, path="dequant"),
            "dequant_fold": lambda x=x: _heavy_scratch(True, sffn.split_ffn, x, w, path="dequant"),
        }
        paths = args.paths.split(",")
        for name in paths:
            row[name] = round(_graph_us(fns[name]), 1)
        if "prefill" in paths and "dequant" in paths:
            tiled = sffn.split_ffn(x, w, path="prefill").float()
            diff = (tiled - sffn.split_ffn(x, w, path="dequant").float()).norm()
            row["rel_diff_paths"] = float(diff / tiled.norm())
        if "dequant" in paths and "dequant_fold" in paths:
            plain = fns["dequant"]().float()
            row["rel_diff_fold"] = float(
                (fns["dequant_fold"]().float() - plain).norm() / plain.norm()
            )
        for name in ("small", "prefill", "dequant", "dequant_fold", "auto"):
            if name in paths and "dense" in paths:
                row[f"{name}_vs_dense"] = round(row["dense"] / row[name], 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {
        "command": "python3 " + " ".join(sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "card": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "shape": [args.hidden, args.intermediate, heavy, light],
        "dtype": args.dtype,
        "chunk_bytes": dequant_gemm.CHUNK_BYTES,
        "rows": rows,
    }
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
