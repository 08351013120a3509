"""Each FFN of a real compressed SmolLM2-135M on the GPU, per kernel path, against the fp32 torch
reference on the CPU, fed the layer's own inputs from real text (GPU only).

The whole-model test (tests/test_modules.py, FFNSPLIT_SMOLLM2_DIR) compares logits; this says
which layer and which path an error comes from. Inputs: the hidden states entering each FFN
while the fp16 (or bf16) model reads the test's prose; rows: the first token alone (M = 1),
token 100 alone, 16 tokens, 80 tokens. Paths: "auto" (the tuner's picks: the Gluon tier's W-as-A
form at M <= 8), "x-as-A" (the Gluon tier without the W-as-A form), "gemv" (the CUDA-core path)
and "tl" (the Triton tl decode tier). Prints one line a layer and path with the relative error
and max |x|; writes JSON. ("gemv" is the CUDA-core path up to 4 rows only; above, the Gluon
tier's x-as-A form.)

    FFNSPLIT_SMOLLM2_DIR=<folder> PYTHONPATH=. python3 benchmarks/smollm2_ffn_error.py --out e.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ffnsplit.io import load_compressed  # noqa: E402
from ffnsplit.kernels import gemv, tiles  # noqa: E402
from ffnsplit.kernels import mma_decode as md  # noqa: E402
from ffnsplit.kernels import quant_matmul as qmm  # noqa: E402
from ffnsplit.kernels import split_ffn as sffn  # noqa: E402
from ffnsplit.modules import SplitFFN  # noqa: E402
from tests.test_modules import _PROSE  # noqa: E402

PATHS = ("auto", "x-as-A", "gemv", "tl")


def set_path(name: str) -> None:
    """Module switches for one path, with fresh tuners (their keys do not name the path)."""
    md.SWAP = "0" if name == "x-as-A" else "1"
    md.MIN_M = 2 if name in ("gemv", "tl") else 1
    md.ENABLED = name != "tl"
    tiles.GEMV_MAX_M = 4 if name == "gemv" else 0
    md._up_tuner, md._down_tuner = tiles.Tuner(), tiles.Tuner()
    for mod in (sffn, gemv, qmm):
        mod._tuner = tiles.Tuner()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=os.environ.get("FFNSPLIT_SMOLLM2_DIR"))
    parser.add_argument("--out", default=None)
    parser.add_argument("--device", default="cuda", help="cpu: a smoke run of the plumbing only")
    args = parser.parse_args()
    # each path's first config, untimed: the paths are compared, not their configs (with the
    # tuner every call re-tunes after set_path: the H200 run of session 24 got through the fp16
    # half of 30 layers in 400 s)
    tiles.AUTOTUNE = False
    model, tokenizer = load_compressed(args.dir)
    ids = tokenizer(_PROSE, return_tensors="pt").input_ids[:, :128]
    results = []
    for dtype in (torch.float16, torch.bfloat16):
        gpu = copy.deepcopy(model).to(args.device, dtype)
        ffns = [(name, m) for name, m in gpu.named_modules() if isinstance(m, SplitFFN)]
        inputs: dict[str, torch.Tensor] = {}
        hooks = [m.register_forward_pre_hook(
            lambda mod, a, name=name, inputs=inputs: inputs.__setitem__(name, a[0].detach().clone()))
            for name, m in ffns]  # fmt: skip
        with torch.no_grad():
            gpu(input_ids=ids.to(args.device), use_cache=False)
        for h in hooks:
            h.remove()
        originals = dict(model.named_modules())
        for name, m in ffns:
            m.cuda_graphs = False
            # the same weights cast through dtype as the GPU copy's, in fp32 on the CPU
            ref_mod = copy.deepcopy(originals[name]).to(dtype).to("cpu", torch.float32)
            x_all = inputs[name][0]  # [128, H]
            rows = {"pos0": x_all[:1], "pos100": x_all[100:101], "m16": x_all[:16],
                    "m80": x_all[:80]}  # fmt: skip
            for rname, x in rows.items():
                with torch.no_grad():
                    ref = ref_mod(x.float().cpu()).double()
                row = dict(dtype=str(dtype), layer=name, rows=rname, m=x.shape[0],
                           max_abs_x=round(float(x.abs().max()), 2))  # fmt: skip
                for path in PATHS:
                    set_path(path)
                    with torch.no_grad():
                        y = m._forward(x).double().cpu()
                    row[path] = float((y - ref).norm() / ref.norm())
                results.append(row)
                print(json.dumps(row), flush=True)
        set_path("auto")
    worst = {}
    for r in results:
        for path in PATHS:
            key = (r["dtype"], r["rows"], path)
            worst[key] = max(worst.get(key, 0.0), r[path])
    for key, v in sorted(worst.items()):
        print("worst", *key, f"{v:.2e}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(dict(device=torch.cuda.get_device_name() if args.device != "cpu" else "cpu",
                           rows=results), fh, indent=1)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
