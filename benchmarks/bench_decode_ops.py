"""Decode plumbing of one Llama-3-8B layer, torch against the fused kernels (GPU only).

What StaticDecoder runs around the projections and the FFN at one decode step, timed per op as
CUDA-graph replays (bench.time_calls_us): kernels="torch" (the residual add + HF LlamaRMSNorm,
rotary with rotate_half + two index_copy_ cache writes, the cache repeated per query head + SDPA
with a boolean mask) against kernels="triton" (decode_ops.add_rms_norm, rope_kv_write,
decode_attention), at --position in a --max-len cache. Prints a table; --out writes JSON.

    PYTHONPATH=. python3 benchmarks/bench_decode_ops.py --out $OUT/bench_decode_ops.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ffnsplit.eval import bench  # noqa: E402
from ffnsplit.fsutil import atomic_write_text  # noqa: E402
from ffnsplit.kernels import decode_ops, reference  # noqa: E402

HIDDEN, Q_HEADS, KV_HEADS, HEAD_DIM, EPS = 4096, 32, 8, 128, 1e-5


def torch_and_triton(
    args: argparse.Namespace, device: torch.device
) -> dict[str, tuple[Callable, Callable]]:
    """Per op: (the StaticDecoder torch path, the fused kernel), on shared inputs."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    dtype, b, t = torch.float16, args.batch, 1
    x = torch.randn(b, t, HIDDEN, device=device, dtype=dtype)
    residual = torch.randn_like(x)
    norm = LlamaRMSNorm(HIDDEN, EPS).to(device, dtype)
    qkv = torch.randn(b, t, (Q_HEADS + 2 * KV_HEADS) * HEAD_DIM, device=device, dtype=dtype)
    cos = torch.randn(t, HEAD_DIM, device=device, dtype=dtype)
    sin = torch.randn_like(cos)
    positions = torch.full((t,), args.position, device=device)
    cache = (b, KV_HEADS, args.max_len, HEAD_DIM)
    keys = torch.randn(cache, device=device, dtype=dtype)
    values = torch.randn(cache, device=device, dtype=dtype)
    q = torch.randn(b, Q_HEADS, t, HEAD_DIM, device=device, dtype=dtype)
    mask = torch.arange(args.max_len, device=device)[None, :] <= positions[:, None]
    groups, scale = Q_HEADS // KV_HEADS, HEAD_DIM**-0.5

    def torch_norm() -> None:
        norm(residual + x)

    def torch_rope() -> None:
        heads = qkv.view(b, t, -1, HEAD_DIM)
        qk, v = heads[:, :, : Q_HEADS + KV_HEADS], heads[:, :, Q_HEADS + KV_HEADS :]
        qk = qk.transpose(1, 2)
        qk = qk * cos + reference.rotate_half(qk) * sin
        keys.index_copy_(2, positions, qk[:, Q_HEADS:])
        values.index_copy_(2, positions, v.transpose(1, 2))

    def torch_attention() -> None:
        F.scaled_dot_product_attention(
            q, bench._repeat_kv(keys, groups), bench._repeat_kv(values, groups), attn_mask=mask,
            scale=scale,
        )  # fmt: skip

    return {
        "residual add + RMSNorm": (
            torch_norm,
            lambda: decode_ops.add_rms_norm(x, residual, norm.weight, EPS),
        ),
        "rotary + cache write": (
            torch_rope,
            lambda: decode_ops.rope_kv_write(
                qkv, cos, sin, positions, keys, values, Q_HEADS, KV_HEADS, HEAD_DIM
            ),  # fmt: skip
        ),
        "attention": (
            torch_attention,
            lambda: decode_ops.decode_attention(q, keys, values, positions, scale, groups),
        ),
    }


def main() -> int | str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--position", type=int, default=600)
    parser.add_argument("--max-len", type=int, default=8192)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--out", default="", help="JSON file to write")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        return "bench_decode_ops.py needs a CUDA GPU"
    if not 0 <= args.position < args.max_len:
        return f"--position {args.position} must lie in the cache (--max-len {args.max_len})"
    device = torch.device("cuda")
    rows = []
    with torch.no_grad():
        for op, (torch_call, triton_call) in torch_and_triton(args, device).items():
            times = {
                name: bench.time_calls_us([call], device, graph=True, reps=args.reps)
                for name, call in (("torch", torch_call), ("triton", triton_call))
            }
            rows.append({"op": op, **times, "speedup": times["torch"] / times["triton"]})
    print(f"{torch.cuda.get_device_name()}: batch {args.batch}, position {args.position} of "
          f"{args.max_len}, fp16, us per call (CUDA graph)")  # fmt: skip
    for row in rows:
        print(f"  {row['op']:<24} torch {row['torch']:8.1f}  triton {row['triton']:8.1f}  "
              f"x{row['speedup']:.1f}")  # fmt: skip
    if args.out:
        payload = {"environment": bench.environment(device), "settings": vars(args), "rows": rows}
        atomic_write_text(args.out, json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
