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
  no_core     q/k/v and o projections kept, rotary + cache write + attention left out (o
              projects q's columns of the q/k/v output)
  no_rope     the rotary + cache write left out (attention reads q's columns as they are)
  no_o        the o projection left out (the attention output goes to the post-attention norm)
  no_qkv      the q/k/v projection left out (rotary reads a fixed buffer)
  no_in_norm  the input add + RMSNorm left out (x = the previous FFN's output)
  chunk128, chunk256, one_pass
              the split attention with 128- or 256-key chunks (fewer programs, fewer partials
              to combine), or one program a kv head (no combine launch)
  no_prefetch, o_prefetch, all_prefetch
              the o projection without or with its weights' L2 requests before the PDL wait
              (mma_decode.DENSE_PREFETCH, off by default), the q/k/v projection with them too
  attn_unfused, attn_fused, attn_ticket
              a decode token's attention in three launches (rotary + cache write, attention,
              combine), in one launch and its combine, in one launch combining by ticket
              (StaticDecoder.attention_mode; the chunk* and no_rope variants take the first)
  attn_n<keys>[w<warps>][p<k>], attn_t<keys>[w<warps>][p<k>]
              the one-launch attention with <keys> keys a block and <warps> warps (without:
              picked by the grid), chunks for about <k> programs an SM (0: at most MAX_SPLITS
              chunks), its combine a launch (n) or by ticket (t):
              decode_ops.ROPE_ATTENTION_BLOCK_N / _WARPS / SPLIT_PROGRAMS_PER_SM

    PYTHONPATH=. python3 benchmarks/oracle_decode.py --out $OUT/oracle.json
"""

from __future__ import annotations

import json
import re
import statistics

import torch

from ffnsplit.eval import bench
from ffnsplit.kernels import mma_decode

VARIANTS = ("full", "own_proj", "torch_proj", "no_post", "no_ffn", "no_attn", "no_core",
            "no_rope", "no_o", "no_qkv", "no_in_norm", "chunk128", "chunk256", "one_pass",
            "no_prefetch", "o_prefetch", "all_prefetch", "attn_unfused", "attn_fused", "attn_ticket")  # fmt: skip
# attn_n16w2: 16 keys a block, 2 warps; attn_n32p0: 32 keys, at most MAX_SPLITS chunks
BLOCKS = re.compile(r"attn_([nt])(\d+)(?:w(\d+))?(?:p(\d+))?$")
PREFETCH = mma_decode.DENSE_PREFETCH  # the default, restored after the variants that change it
CHUNKS = {"chunk128": 128, "chunk256": 256, "one_pass": 1 << 30}
ATTENTION = {"attn_unfused": "unfused", "attn_fused": "fused", "attn_ticket": "ticket"}
UNFUSED = ("no_rope", *CHUNKS, "attn_unfused")  # variants of the three-launch attention
MODE = bench.decoder_attention()  # the decoder's default (FFNSPLIT_DECODE_ATTENTION)


def attention(decoder, attn, x, index, cos, sin, positions, variant: str):
    """StaticDecoder._attention_kernels with `variant`'s part left out."""
    from ffnsplit.kernels import decode_ops

    mma_decode.DENSE_PREFETCH = variant in ("o_prefetch", "all_prefetch") or (
        PREFETCH and variant != "no_prefetch"
    )
    b, t, _ = x.shape
    weight, bias = decoder.qkv[index]
    keys, values = decoder.keys[index], decoder.values[index]
    width = decoder.q_heads * decoder.head_dim
    if variant == "no_qkv":
        if getattr(decoder, "_oracle_qkv", None) is None:
            decoder._oracle_qkv = torch.randn(b, t, weight.shape[0], dtype=x.dtype,
                                              device=x.device) * 0.1  # fmt: skip
        qkv = decoder._oracle_qkv
    else:
        qkv = decoder._project(x, weight, bias, prefetch=variant == "all_prefetch")
    o = attn.o_proj
    if variant == "no_core":
        return decoder._project(qkv[..., :width].contiguous(), o.weight, o.bias, prefetch=True)
    if variant in UNFUSED:  # the three-launch form (forward gathered cos and sin: main)
        if variant == "no_rope":
            q = qkv[..., :width].view(b, t, decoder.q_heads, decoder.head_dim).transpose(1, 2)
        else:
            q = decode_ops.rope_kv_write(
                qkv, cos, sin, positions, keys, values, decoder.q_heads, keys.shape[1],
                decoder.head_dim, **decoder.qk_norms[index],
            )  # fmt: skip
        out = decode_ops.decode_attention(
            q, keys, values, positions, attn.scaling, decoder.groups, decoder.windows[index],
            chunk=CHUNKS.get(variant),
        )  # fmt: skip
    else:
        decoder.attention_mode = ATTENTION.get(variant, MODE)
        block_n, warps = decode_ops.ROPE_ATTENTION_BLOCK_N, decode_ops.ROPE_ATTENTION_WARPS
        per_sm = decode_ops.SPLIT_PROGRAMS_PER_SM
        blocks = BLOCKS.match(variant)
        if blocks:
            decode_ops.ROPE_ATTENTION_BLOCK_N = int(blocks[2])
            decode_ops.ROPE_ATTENTION_WARPS = int(blocks[3]) if blocks[3] else warps
            decode_ops.SPLIT_PROGRAMS_PER_SM = int(blocks[4]) if blocks[4] else per_sm
            decoder.attention_mode = "ticket" if blocks[1] == "t" else "fused"
        out = decoder._attend(attn, qkv, index, cos, sin, positions)
        decoder.attention_mode = MODE
        decode_ops.ROPE_ATTENTION_BLOCK_N, decode_ops.ROPE_ATTENTION_WARPS = block_n, warps
        decode_ops.SPLIT_PROGRAMS_PER_SM = per_sm
    out = out.transpose(1, 2).reshape(b, t, -1)
    return out if variant == "no_o" else decoder._project(out, o.weight, o.bias, prefetch=True)


def hidden(decoder, variant: str):
    """StaticDecoder._hidden_kernels with `variant`'s part left out."""
    from ffnsplit.kernels import decode_ops

    def run(h, cos, sin, positions, last_only):
        residual = None
        for index, layer in enumerate(decoder.layers):
            (in_weight, in_eps), post = decoder.norms[index]
            if residual is None:
                residual, x = h, decode_ops.rms_norm(h, in_weight, in_eps)
            elif variant == "no_in_norm":
                x = h
            else:
                x, residual = decode_ops.add_rms_norm(h, residual, in_weight, in_eps)
            if variant == "no_attn":
                out = x
            else:
                out = attention(decoder, layer.self_attn, x, index, cos, sin, positions, variant)
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

    def extra(parser) -> None:
        parser.add_argument(
            "--variants",
            default=",".join(VARIANTS),
            help="comma-separated, from: " + ", ".join(VARIANTS),
        )
        parser.add_argument("--rounds", type=int, default=1,
                            help="the variants timed in turn this many times (median kept)")  # fmt: skip

    args = step_args(__doc__, "oracle.json", extra)
    variants = args.variants.split(",")
    unknown = sorted(v for v in set(variants) - set(VARIANTS) if not BLOCKS.match(v))
    if unknown:
        raise SystemExit(f"unknown variants {unknown}: choose from {', '.join(VARIANTS)}")

    result = {"shape": args.shape, "prompt": args.prompt, "steps": args.steps,
              "card": torch.cuda.get_device_name(), "torch": torch.__version__,
              "command": "benchmarks/oracle_decode.py"}  # fmt: skip
    for label, decoder, first in decoders(args.shape, args.prompt, args.steps):
        times: dict[str, list[float]] = {v: [] for v in variants}
        default = decoder.own_projections
        for _ in range(args.rounds):
            for variant in variants:
                decoder._hidden_kernels = hidden(decoder, variant)
                own = {"own_proj": True, "torch_proj": False}.get(variant, default)
                decoder.own_projections = own
                fused = decoder.fused_decode
                decoder.fused_decode = fused and variant not in UNFUSED
                with torch.no_grad():
                    graph, wall = captured_step(decoder, first, args.prompt, args.steps)
                del graph
                decoder.fused_decode = fused
                times[variant].append(round(wall, 1))
                print(label, variant, times[variant][-1], "us/step", flush=True)
        mma_decode.DENSE_PREFETCH = PREFETCH
        result[label] = {v: statistics.median(ts) for v, ts in times.items()}
        if args.rounds > 1:
            result[label + "_rounds"] = times
        # the tuner's picks for the dense-only calls (the projections), timed on its first call
        result[label + "_picks"] = [
            {"key": str(key[:5]), "pick": str(cfg),
             "us": {str(c): round(t * 1e3, 2) for c, t in mma_decode._down_tuner.timings.get(key, {}).items()}}
            for key, cfg in mma_decode._down_tuner.cache.items() if key[3] == 0
        ]  # fmt: skip
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
