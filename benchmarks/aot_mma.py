"""Compile the Gluon decode tier's kernels for sm_90 here (no GPU): registers and loop SASS.

Llama-3-8B FFN shape (kernel A: 720 heavy + 13,632 int4 g128 neurons, K 4096; kernel B: 4096
outputs, 720 heavy + 13,632 light k), one MmaConfig of ffnsplit/kernels/mma_decode.py, fp16 or
bf16, M rows; prints what benchmarks/aot_sass.py prints (registers, spills, SASS by opcode, per
loop). Needs a Triton with Gluon (3.6 beside the venv's: PYTHONPATH=<triton 3.6> works):

    python benchmarks/aot_mma.py --kernel up --config "MmaConfig(4, 1, fused=True, swap=True)"
    python benchmarks/aot_mma.py --kernel down --config "MmaConfig(4, 2, swap=True)" --m 1
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="aot_mma_")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import triton  # noqa: E402
from aot_sass import _ptxas_verbose, report  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from ffnsplit.kernels import mma_decode as md  # noqa: E402
from ffnsplit.kernels.mma_decode import MmaConfig  # noqa: E402,F401 (for --config)


def _source(fn, sig: dict, const: dict, aligned: tuple):
    from triton.experimental.gluon._runtime import GluonASTSource

    names = [p.name for p in fn.params]
    full = {n: sig.get(n, "constexpr") for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    return GluonASTSource(fn, full, const, attrs)


def compile_config(kernel: str, cfg, m: int, dtype: str, heavy: int, light: int, hidden: int):
    """The compiled kernel (Triton's CompiledKernel) of `kernel` ("up" or "down") for `cfg`."""
    gdt = md.gl.float16 if dtype == "fp16" else md.gl.bfloat16
    t = "*" + dtype
    common = dict(GROUP=128, SYMMETRIC=False, DTYPE=gdt, PDL=True)
    if kernel == "up":
        sig = dict(x_ptr=t, hu_ptr=t, hg_ptr=t, up_ptr="*i32", us_ptr=t, uz_ptr=t, gp_ptr="*i32",
                   gs_ptr=t, gz_ptr=t, ws_ptr="*fp32", cnt_ptr="*i32", a_ptr=t, ub_ptr=t,
                   gb_ptr=t, M="i32", K="i32", NH="i32", NL="i32", stride_xm="i32",
                   stride_hw="i32", stride_am="i32")  # fmt: skip
        const = dict(common, **md.up_meta(cfg, m), DUAL=True, FUSED=cfg.fused,
                     ACTIVATION="silu", HAS_UP_BIAS=False, HAS_GATE_BIAS=False,
                     TAIL=hidden % md.CHUNK != 0)  # fmt: skip
        aligned = [n for n in sig if n.endswith("_ptr")] + ["K", "stride_xm", "stride_hw"]
        return _compile(md._up_kernel, sig, const, aligned, cfg.num_warps, cfg.maxnreg)
    sig = dict(xh_ptr=t, xl_ptr=t, hw_ptr=t, p_ptr="*i32", s_ptr=t, z_ptr=t, ws_ptr="*fp32",
               cnt_ptr="*i32", out_ptr=t, b_ptr=t, M="i32", N="i32", KH="i32", KL="i32",
               stride_xm="i32", stride_hw="i32", stride_om="i32", SL="i32")  # fmt: skip
    const = dict(common, **md.down_meta(cfg, m), FUSED=cfg.fused, HAS_BIAS=False,
                 TAIL_L=light % md.CHUNK != 0, TAIL_H=heavy % md.CHUNK != 0)  # fmt: skip
    aligned = [
        "xh_ptr",
        "hw_ptr",
        "p_ptr",
        "s_ptr",
        "z_ptr",
        "ws_ptr",
        "cnt_ptr",
        "out_ptr",
        "b_ptr",
        "N",
        "KH",
        "stride_xm",
        "stride_hw",
        "stride_om",
    ]
    return _compile(md._down_kernel, sig, const, aligned, cfg.num_warps, cfg.maxnreg)


def _compile(fn, sig, const, aligned, warps, maxnreg=None):
    return triton.compile(_source(fn, sig, const, tuple(aligned)),
                          target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": warps, "maxnreg": maxnreg})  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel", choices=("up", "down"), default="down")
    parser.add_argument("--config", default="MmaConfig(4, 2, swap=True)")
    parser.add_argument("--m", type=int, default=1)
    parser.add_argument("--dtype", choices=("fp16", "bf16"), default="fp16")
    parser.add_argument("--heavy", type=int, default=720)
    parser.add_argument("--light", type=int, default=13632)
    parser.add_argument("--hidden", type=int, default=4096)
    args = parser.parse_args()
    if md.gluon is None:
        print(f"Gluon does not import: {md._IMPORT_ERROR}", file=sys.stderr)
        return 2
    cfg = eval(args.config)  # noqa: S307 (a developer's command line)
    kernel = compile_config(args.kernel, cfg, args.m, args.dtype, args.heavy, args.light,
                            args.hidden)  # fmt: skip
    report(f"{args.kernel} {cfg} M={args.m} {args.dtype}", kernel,
           _ptxas_verbose(kernel.asm["ptx"], 90), cfg.num_warps)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
