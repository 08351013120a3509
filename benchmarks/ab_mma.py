"""The Gluon tier's layer, kernel A and kernel B at M = 1, 4, 8, 16 with the default configs
(no tuner), to compare two versions of the code on one machine (GPU only).

Run it from this tree and from an unpacked copy of the commit compared against (its working
directory is put first on sys.path), alternating: gpu_checks.sh ab17 does new / base / new /
base. Prints one JSON line a run; the output sum checks that both versions compute the same.

    git archive BASE ffnsplit benchmarks/bench_decode.py | tar -x -C out/base
    FFNSPLIT_AUTOTUNE=0 PYTHONPATH=. python3 benchmarks/ab_mma.py new
    (cd out/base && FFNSPLIT_AUTOTUNE=0 PYTHONPATH=. python3 ../../benchmarks/ab_mma.py base)
"""

import json
import os
import sys

import torch

sys.path.insert(0, os.getcwd())  # the version under test: this tree or the base copy
sys.path.insert(1, os.path.join(os.getcwd(), "benchmarks"))
from bench_decode import graph_time_us, split_weights  # noqa: E402

from ffnsplit.kernels import quant_matmul as qmm  # noqa: E402
from ffnsplit.kernels import split_ffn as sffn  # noqa: E402


def main() -> int:
    torch.manual_seed(0)
    copies = [split_weights(4096, 720, 13632, 4, 128) for _ in range(2)]
    res = {}
    for m in (1, 4, 8, 16):
        x = torch.randn(m, 4096, device="cuda", dtype=torch.float16)
        a = sffn.split_activations(x, copies[0], path="mma")
        y = sffn.split_ffn(x, copies[0], path="mma")
        layer = graph_time_us([lambda w=w, x=x: sffn.split_ffn(x, w, path="mma") for w in copies])
        ta = graph_time_us(
            [lambda w=w, x=x: sffn.split_activations(x, w, path="mma") for w in copies]
        )
        tb = graph_time_us([
            lambda w=w, a=a: qmm.split_linear(a, w.heavy_down, w.light_down, None, path="mma")
            for w in copies
        ])  # fmt: skip
        res[m] = dict(layer=round(layer, 2), a=round(ta, 2), b=round(tb, 2),
                      y_sum=float(y.float().abs().sum()))  # fmt: skip
    print(sys.argv[1] if len(sys.argv) > 1 else "run", json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
