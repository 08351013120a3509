"""What-if timings of the end-to-end decode step (GPU only): how much of a compressed step each
part costs, measured by leaving that part out of the CUDA graph (the outputs are then wrong;
only the timings mean anything). Same model and decoder as `ffnsplit bench --e2e-shape` and
benchmarks/trace_decode.py (random Llama-3-8B-shaped weights, every FFN split 5% fp16 / 95%
int4 g128, the decode_ops kernels).

Variants, each timed as the median over 5 runs of 32 graph replays (one replay = one step):
  full        the step as the bench runs it (the decoder's defaults: on sm_90 the q/k/v and o
              projections through ffnsplit's split_linear, bench.decoder_projections)
  own_proj    the projections through split_linear whatever the default
  torch_proj  the projections through cuBLAS (F.linear) whatever the default
  no_post     without the post-attention add + RMSNorm launch (x = attention output): what
              fusing that norm into kernel A could save at most
  no_ffn      without the FFN (h = x): the rest of the step
  no_attn     without q/k/v, rotary, attention and o (out = x)

    PYTHONPATH=. python3 benchmarks/oracle_decode.py --out $OUT/oracle.json
"""

from __future__ import annotations

import json

import torch

VARIANTS = ("full", "own_proj", "torch_proj", "no_post", "no_ffn", "no_attn")


def hidden(decoder, variant: str):
    """StaticDecoder._hidden_kernels with `variant`'s part left out."""
    from ffnsplit.kernels import decode_ops

    def run(h, cos, sin, positions, last_only):
        residual = None
        for index, layer in enumerate(decoder.layers):
            (in_weight, in_eps), post = decoder.norms[index]
            if residual is None:
                residual, x = h, decode_ops.rms_norm(h, in_weight, in_eps)
            else:
                x, residual = decode_ops.add_rms_norm(h, residual, in_weight, in_eps)
            if variant == "no_attn":
                out = x
            else:
                out = decoder._attention_kernels(layer.self_attn, x, index, cos, sin, positions)
            if variant == "no_post":
                x = out
            else:
                x, residual = decode_ops.add_rms_norm(out, residual, *post)
            h = x if variant == "no_ffn" else layer.mlp(x)
        if last_only:
            h, residual = h[:, -1:], residual[:, -1:]
        return decode_ops.add_rms_norm(h, residual, *decoder.final_norm)[0]

    return run


def main() -> None:
    from trace_decode import captured_step, decoders, step_args

    args = step_args(__doc__, "oracle.json")

    result = {"shape": args.shape, "prompt": args.prompt, "steps": args.steps,
              "card": torch.cuda.get_device_name(), "torch": torch.__version__,
              "command": "benchmarks/oracle_decode.py"}  # fmt: skip
    for label, decoder, first in decoders(args.shape, args.prompt, args.steps):
        rows = {}
        default = decoder.own_projections
        for variant in VARIANTS:
            decoder._hidden_kernels = hidden(decoder, variant)
            own = {"own_proj": True, "torch_proj": False}.get(variant, default)
            decoder.own_projections = own
            with torch.no_grad():
                graph, rows[variant] = captured_step(decoder, first, args.prompt, args.steps)
            del graph
            rows[variant] = round(rows[variant], 1)
            print(label, variant, rows[variant], "us/step", flush=True)
        result[label] = rows
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
