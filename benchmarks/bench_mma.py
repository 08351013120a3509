"""The Gluon decode tier (ffnsplit/kernels/mma_decode.py) against the other decode paths (GPU).

Llama-3-8B FFN shape (4096 -> 14336, SwiGLU), 720 heavy fp16 neurons and 13,632 int4 g128
(asymmetric), fp16: kernel A (split_activations), kernel B (split_linear over [heavy | light])
and the whole FFN for every path that can run M rows ("gemv" the CUDA-core path, "mma" this
tier, "decode" the tl tensor-core tier), each tuned, and each of this tier's configs alone, for M in
{1, 2, 4, 8, 16}; dense fp16 (cuBLAS) for reference. CUDA-graph replays over two weight copies
(L2 cannot hold them), medians; every output checked against float64 first.

    PYTHONPATH=. python3 benchmarks/bench_mma.py --out $OUT/bench_mma.json
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_decode import (  # noqa: E402
    dense_swiglu,
    graph_time_us,
    heavy_as,
    rel_err,
    split_weights,
)
from bench_floor import write_result  # noqa: E402

from ffnsplit.kernels import mma_decode, reference  # noqa: E402
from ffnsplit.kernels import quant_matmul as qmm  # noqa: E402
from ffnsplit.kernels import split_ffn as sffn  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", default="1,2,4,8,16")
    parser.add_argument("--heavy", type=int, default=720)
    parser.add_argument("--light", type=int, default=13632)
    parser.add_argument("--paths", default="gemv,decode,mma", help="paths timed besides dense")
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "bench_mma.json"))
    parser.add_argument(
        "--swap-max-m",
        type=int,
        default=None,
        help="rows up to which the W-as-A configs are timed (default: the tier's)",
    )
    parser.add_argument(
        "--extra-up",
        default="",
        help="more kernel A configs to time, ';'-separated MmaConfig(...) expressions (W-as-A "
        "ones beside the W-as-A table, others beside the x-as-A table)",
    )
    parser.add_argument("--extra-down", default="", help="the same for kernel B")
    args = parser.parse_args()
    if args.swap_max_m is not None:
        mma_decode.SWAP_MAX_M = args.swap_max_m
    for kernel, extra in (("UP", args.extra_up), ("DOWN", args.extra_down)):
        configs = tuple(eval(e.strip(), {"MmaConfig": mma_decode.MmaConfig})  # noqa: S307
                        for e in extra.split(";")
                        if e.strip())  # fmt: skip
        for name, table in ((f"{kernel}_SWAP", [c for c in configs if c.swap]),
                            (f"{kernel}_CONFIGS", [c for c in configs if not c.swap])):  # fmt: skip
            setattr(mma_decode, name, getattr(mma_decode, name) + tuple(table))
    hidden = 4096
    copies = [split_weights(hidden, args.heavy, args.light, 4, 128) for _ in range(2)]
    dense = [
        (torch.randn(2 * 14336, hidden, device="cuda", dtype=torch.float16) / 64,
         torch.randn(hidden, 14336, device="cuda", dtype=torch.float16) / 120)
        for _ in range(2)
    ]  # fmt: skip
    rows = []
    w0 = copies[0]
    for m in (int(v) for v in args.m.split(",")):
        x = torch.randn(m, hidden, device="cuda", dtype=torch.float16)
        ref_a = reference.split_activations(x.double(), heavy_as(w0, torch.float64))
        row: dict = {"m": m}
        row["dense_us"] = graph_time_us([lambda d=d, x=x: dense_swiglu(x, d) for d in dense])
        for path in args.paths.split(","):
            if path == "gemv" and m > 4 or path == "decode" and m > 16:
                continue
            a = sffn.split_activations(x, w0, path=path)
            row[f"{path}_a_err"] = rel_err(a, ref_a)
            y = qmm.split_linear(a, w0.heavy_down, w0.light_down, None, path=path)
            ref_y = reference.split_linear(a.double(), w0.heavy_down.double(), w0.light_down)
            row[f"{path}_b_err"] = rel_err(y, ref_y)
            row[f"{path}_a_us"] = graph_time_us(
                [lambda w=w, x=x, p=path: sffn.split_activations(x, w, path=p) for w in copies]
            )
            row[f"{path}_b_us"] = graph_time_us(
                [
                    lambda w=w, a=a, p=path: qmm.split_linear(
                        a, w.heavy_down, w.light_down, None, path=p
                    )
                    for w in copies
                ]  # fmt: skip
            )
            row[f"{path}_ffn_us"] = graph_time_us(
                [lambda w=w, x=x, p=path: sffn.split_ffn(x, w, path=p) for w in copies]
            )
        # each config of the tier alone (the tuner's picks above are the fastest of these),
        # the W-as-A configs (cfg names "swap<i>") up to SWAP_MAX_M rows included
        a = sffn.split_activations(x, w0, path="mma")
        saved = {name: getattr(mma_decode, name) for name in _TABLES}
        try:
            mma_decode.SWAP = "1"
            ups = mma_decode.candidates(saved["UP_CONFIGS"], saved["UP_ROWS"], saved["UP_SWAP"], m)
            downs = mma_decode.candidates(saved["DOWN_CONFIGS"], saved["DOWN_ROWS"],
                                          saved["DOWN_SWAP"], m)  # fmt: skip
            mma_decode.SWAP = "0"
            for i, cfg in enumerate(ups):
                _only(cfg, "UP")
                a_cfg = sffn.split_activations(x, w0, path="mma")
                row[f"mma_a_{_name(cfg, i)}_err"] = rel_err(a_cfg, ref_a)
                row[f"mma_a_{_name(cfg, i)}_us"] = graph_time_us(
                    [lambda w=w, x=x: sffn.split_activations(x, w, path="mma") for w in copies]
                )
            for i, cfg in enumerate(downs):
                _only(cfg, "DOWN")
                y = qmm.split_linear(a, w0.heavy_down, w0.light_down, None, path="mma")
                ref_y = reference.split_linear(a.double(), w0.heavy_down.double(), w0.light_down)
                row[f"mma_b_{_name(cfg, i)}_err"] = rel_err(y, ref_y)
                row[f"mma_b_{_name(cfg, i)}_us"] = graph_time_us(
                    [
                        lambda w=w, a=a: qmm.split_linear(
                            a, w.heavy_down, w.light_down, None, path="mma"
                        )
                        for w in copies
                    ]  # fmt: skip
                )
        finally:
            for name, value in saved.items():
                setattr(mma_decode, name, value)
        rows.append(row)
        print({k: round(v, 6) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    write_result(args.out, torch.device("cuda"), heavy=args.heavy, light=args.light, rows=rows,
                 up_configs=[str(c) for c in mma_decode.UP_SWAP + mma_decode.UP_CONFIGS],
                 down_configs=[str(c) for c in mma_decode.DOWN_SWAP + mma_decode.DOWN_CONFIGS])  # fmt: skip
    return 0


_TABLES = ("UP_CONFIGS", "UP_ROWS", "UP_SWAP", "DOWN_CONFIGS", "DOWN_ROWS", "DOWN_SWAP", "SWAP")


def _only(cfg, kernel: str) -> None:
    """Make `cfg` the only candidate of kernel "UP" or "DOWN" for every M."""
    setattr(mma_decode, f"{kernel}_CONFIGS", (cfg,))
    setattr(mma_decode, f"{kernel}_ROWS", {2: (cfg,), 4: (cfg,)})
    setattr(mma_decode, f"{kernel}_SWAP", ())


def _name(cfg, i: int) -> str:
    return f"{'swap' if cfg.swap else 'cfg'}{i}"


if __name__ == "__main__":
    raise SystemExit(main())
