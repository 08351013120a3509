"""Compile the Gluon decode tier's kernels for sm_90 here (no GPU): registers and loop SASS.

Llama-3-8B FFN shape (kernel A: 720 heavy + 13,632 int4 g128 neurons, K 4096; kernel B: 4096
outputs, 720 heavy + 13,632 light k), one MmaConfig of ffnsplit/kernels/mma_decode.py, fp16 or
bf16, M rows (`mma_decode.aot_compile`); prints what benchmarks/aot_sass.py prints (registers,
spills, SASS by opcode, per loop). Any Triton with Gluon (the device's 3.6 beside the venv's:
PYTHONPATH=<triton 3.6> works):

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

from aot_sass import report  # noqa: E402

from ffnsplit.kernels import mma_decode as md  # noqa: E402
from ffnsplit.kernels.mma_decode import MmaConfig  # noqa: E402,F401 (for --config)
from ffnsplit.kernels.tiles import ptxas_log  # noqa: E402


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
    kernel = md.aot_compile(args.kernel, cfg, args.m, args.dtype, heavy=args.heavy,
                            light=args.light, hidden=args.hidden)  # fmt: skip
    report(f"{args.kernel} {cfg} M={args.m} {args.dtype}", kernel,
           ptxas_log(kernel.asm["ptx"], 90), cfg.num_warps)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
