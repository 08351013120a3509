"""What quantizing the light neurons' activations costs in perplexity (CPU, real models).

The tensor cores run fp8 (e4m3) and int8 products at twice the fp16 rate. At prefill sizes the
split FFN does the dense model's FLOPs (int4 codes are dequantized to fp16 for the MMA), so it
cannot beat cuBLAS's fp16 GEMM there by bytes alone; a W4A8 light part (codes q - z exact in
e4m3 or int8, fp32 accumulation, the group scale applied per group) could. This measures the
accuracy side on a compressed checkpoint before any kernel is written: the FFN's activations are
fake-quantized per token (scale = row absmax / qmax) where a W4A8 kernel would read them, and
the perplexity is compared against the same checkpoint unquantized:

  none     the checkpoint as `ffnsplit eval` runs it;
  light    kernel A's x for the light up / gate rows and kernel B's a for the light down
           columns in the format; the heavy part keeps fp16 x and a (FFSplit's point: the heavy
           hitters' large activations stay out of the light part's scale);
  all      the same quantization for the heavy part too (a plain W4A8 FFN of this checkpoint).

  python benchmarks/study_act_quant.py ffnsplit-demo/compressed --formats e4m3,int8

It patches SplitFFN's CPU forward for the run (single-tier checkpoints, no low-rank part).
"""

from __future__ import annotations

import argparse
import json

import torch

from ffnsplit import api
from ffnsplit.kernels.reference import apply_activation
from ffnsplit.modules import SplitFFN

QMAX = {"e4m3": 448.0, "int8": 127.0}


def fake_quant(t: torch.Tensor, fmt: str) -> torch.Tensor:
    """t quantized per row (last dim) to `fmt` with scale absmax / qmax, then back to t's dtype."""
    tf = t.float()
    scale = tf.abs().amax(-1, keepdim=True).clamp_min(1e-12) / QMAX[fmt]
    if fmt == "e4m3":
        q = (tf / scale).to(torch.float8_e4m3fn).float()
    else:
        q = torch.round(tf / scale).clamp(-127, 127)
    return (q * scale).to(t.dtype)


def _forward(self: SplitFFN, x: torch.Tensor, fmt: str, scope: str) -> torch.Tensor:
    tiers = self._tiers()
    if len(tiers) != 1 or self.lowrank_up is not None:
        raise SystemExit("study_act_quant: single-tier checkpoints without a low-rank part only")
    tier = tiers[0]
    dense = self._dense_weights(x.dtype)
    h = tier.n_heavy
    xq = fake_quant(x, fmt)
    xh = xq if scope == "all" else x

    def rows(w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        out = torch.cat([xh @ w[:h].t(), xq @ w[h:].t()], dim=-1)
        return out if bias is None else out + bias.to(x.dtype)

    up = rows(dense.heavy_up, dense.up_bias)
    a = (apply_activation(self.activation, rows(dense.heavy_gate, dense.gate_bias)) * up
         if self.gated else apply_activation(self.activation, up))  # fmt: skip
    ah = fake_quant(a[..., :h], fmt) if scope == "all" else a[..., :h]
    al = fake_quant(a[..., h:], fmt)
    y = ah @ dense.heavy_down[:, :h].t() + al @ dense.heavy_down[:, h:].t()
    return y if self.down_bias is None else y + self.down_bias.to(x.dtype)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", help="a compressed checkpoint folder (ffnsplit compress)")
    ap.add_argument("--formats", default="e4m3,int8")
    ap.add_argument("--scopes", default="light,all")
    ap.add_argument("--corpus", default="wiki-eval")
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    original = SplitFFN._forward
    rows = []

    def run(fmt: str | None, scope: str) -> None:
        if fmt is not None:
            SplitFFN._forward = lambda self, x: _forward(self, x, fmt, scope)
        try:
            reports = api.evaluate([args.model], corpora=(args.corpus,),
                                   max_tokens=args.max_tokens, device="cpu")  # fmt: skip
        finally:
            SplitFFN._forward = original
        report = next(iter(reports.values()))
        result = report.perplexity[args.corpus]
        rows.append(dict(format=fmt or "none", scope=scope, ppl=result.ppl, nll=result.nll,
                         tokens=result.tokens))  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)

    run(None, "none")
    for fmt in args.formats.split(","):
        for scope in args.scopes.split(","):
            run(fmt, scope)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(model=args.model, corpus=args.corpus, max_tokens=args.max_tokens,
                           rows=rows), f, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
