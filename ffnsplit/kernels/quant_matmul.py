"""Dequantize-in-the-loop GEMM: y = x_heavy @ W_heavy^T + x_light @ dequant(W_light)^T + bias.

One kernel serves `quant_matmul` (no heavy part) and the split FFN's down projection (K is split
into dense heavy columns and packed light columns, both accumulated into one fp32 tile). Decode
(M <= 16) splits K across programs so the weight bytes are streamed exactly once by enough programs
to fill the GPU; the partial sums go to a fp32 workspace and a second tiny kernel adds them in a
fixed order (deterministic, no atomics). Prefill uses large tensor-core tiles, one program per
output tile, with the row tiles of one weight tile launched together so the weight is read from
DRAM about once.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import triton
import triton.language as tl

from ffnsplit.kernels import dequant_gemm, gemv, mma_decode
from ffnsplit.kernels.format import QuantizedWeight
from ffnsplit.kernels.tiles import (
    TileConfig,
    Tuner,
    block_scales,
    dense_block,
    dot_precision,
    fast_unpack,
    light_block,
    light_rows,
    resident_blocks,
    scale_after_ok,
    sm_count,
    tier_configs,
    torch_to_triton_ok,
    uniform_ok,
    use_dequant,
    use_gemv,
    w_as_a_ok,
)

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit(do_not_specialize=["M", "n_split"])
def _split_linear_kernel(
    x_ptr, hw_ptr, p0_ptr, p1_ptr, s_ptr, z_ptr, bias_ptr, out_ptr,
    M, N, KH, KL, stride_xm, stride_hw, stride_om, stride_os, n_split,
    BITS: tl.constexpr, GROUP: tl.constexpr, SYMMETRIC: tl.constexpr,
    SCALE_AFTER: tl.constexpr, HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_KH: tl.constexpr, INTERLEAVE: tl.constexpr,
    FAST4: tl.constexpr, UNIFORM: tl.constexpr, WA: tl.constexpr = False,
):  # fmt: skip
    """One [BLOCK_M, BLOCK_N] output tile over the K-slice of split program_id(2).

    x holds the heavy columns [0, KH) then the light columns [KH, KH + KL). PARTIAL: write the fp32
    partial sum of this split to out[split] instead of the finished (biased, cast) output.
    """
    PACK: tl.constexpr = 32 // (8 if BITS == 8 else (4 if BITS == 4 else 2))
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # each split takes a proportional share of the heavy blocks and of the light blocks
    nb_heavy = tl.cdiv(KH, BLOCK_KH)
    for b in range(pid_s * nb_heavy // n_split, (pid_s + 1) * nb_heavy // n_split):
        acc, _ = dense_block(acc, acc, x_ptr, stride_xm, offs_m, mask_m, hw_ptr, hw_ptr,
                               stride_hw, KH, b * BLOCK_KH, offs_n, mask_n, False, BLOCK_KH,
                               PRECISION)  # fmt: skip
    BLOCK_KL: tl.constexpr = ROWS * PACK
    nb_light = tl.cdiv(KL, BLOCK_KL)
    acc_l = acc  # WA: the light blocks' own [BLOCK_N, BLOCK_M] sums (light_block's W @ x^T)
    if WA:
        acc_l = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    b0 = pid_s * nb_light // n_split
    s_next, z_next = block_scales(s_ptr, z_ptr, N, KL, b0 * BLOCK_KL, offs_n, mask_n, GROUP,
                                  SYMMETRIC, SCALE_AFTER or UNIFORM)  # fmt: skip
    for b in range(b0, (pid_s + 1) * nb_light // n_split):
        s, z = s_next, z_next
        s_next, z_next = block_scales(s_ptr, z_ptr, N, KL, (b + 1) * BLOCK_KL, offs_n, mask_n,
                                      GROUP, SYMMETRIC, SCALE_AFTER or UNIFORM)  # fmt: skip
        acc_l, _ = light_block(acc_l, acc_l, x_ptr + KH, stride_xm, offs_m, mask_m,
                             p0_ptr, p1_ptr, s_ptr, z_ptr, p0_ptr, p1_ptr, s_ptr, z_ptr,
                             s, z, s, z, N, KL, b * BLOCK_KL, offs_n, mask_n, BITS, GROUP,
                             SYMMETRIC, SCALE_AFTER, False, ROWS, INTERLEAVE, FAST4,
                             PRECISION, UNIFORM, WA)  # fmt: skip
    if WA:
        acc += tl.trans(acc_l)
    else:
        acc = acc_l
    out_mask = mask_m[:, None] & mask_n[None, :]
    if PARTIAL:
        out = out_ptr + pid_s * stride_os + offs_m[:, None] * stride_om + offs_n[None, :]
        tl.store(out, acc, mask=out_mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _splitk_reduce_kernel(ws_ptr, bias_ptr, out_ptr, MN, N, SPLIT: tl.constexpr,
                          HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """out = sum over splits (in order) of the fp32 partials + bias, cast to out's dtype."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in tl.static_range(SPLIT):
        acc += tl.load(ws_ptr + s * MN + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def reduce_slices(ws: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> None:
    """out [M, N] (contiguous) = the fp32 partials ws [slices, M, N] summed in slice order + bias."""
    m, n = out.shape
    block = 1024
    _splitk_reduce_kernel[(triton.cdiv(m * n, block),)](
        ws, bias if bias is not None else out, out, m * n, n, SPLIT=ws.shape[0],
        HAS_BIAS=bias is not None, BLOCK=block, num_warps=4,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# configs: one small config under the interpreter, a few per tier on the GPU (first is default)

_T = TileConfig
_CONFIGS = {  # (block_m, block_n, block_kl (light K-block, codes), block_kh (dense K-block))
    "decode": (
        _T(16, 64, 128, 64, num_warps=4, num_stages=4, interleave=False),
        _T(16, 128, 128, 64, num_warps=4, num_stages=3),
        _T(16, 128, 128, 64, num_warps=8, num_stages=3, fast_unpack=False),
        # more K-slices: one full wave of 4 or 5 programs an SM (sm_90, 96 registers: 5 fit);
        # H100, M = 16: 45.2 us (2 an SM) -> 38.6 us (benchmarks/RESULTS.md, session 8)
        _T(16, 64, 128, 64, num_warps=4, num_stages=4, interleave=False, per_sm=5),
        _T(16, 64, 128, 64, num_warps=4, num_stages=4, interleave=False, per_sm=4),
    ),
    # 16 < M <= 64, K-slices in whole waves of what an SM holds (per_sm=0: registers and shared
    # memory of the compiled kernel; sm_90: 64 x 64 4 warps 140 registers and 72 KiB, 3 an SM;
    # 64 x 128 8 warps 131 and 96 KiB, 1). H200, Llama-3-8B down projection at M = 64
    # (benchmarks/sweep_small.py, session 19): 64 x 64 in 6 slices 42.9 us, 64 x 128 in 4 51.3,
    # where the earlier "2 programs an SM" split (9 slices of 64 x 128: 2.2 waves) took 68.9;
    # the W-as-A form (TileConfig.w_as_a) of 64 x 64 in 4 slices (207 registers: 2 an SM) 39.4
    "small": (
        _T(64, 64, 128, 64, num_warps=4, num_stages=3, scale_after=False, interleave=False,
           per_sm=0, w_as_a=True),
        _T(64, 128, 128, 64, num_warps=8, num_stages=3, scale_after=False, interleave=False,
           per_sm=0, w_as_a=True),
        _T(64, 64, 128, 64, num_warps=4, num_stages=3, scale_after=False, interleave=False,
           per_sm=0),
        _T(64, 128, 128, 64, num_warps=8, num_stages=3, scale_after=False, interleave=False,
           per_sm=0),
        _T(64, 128, 128, 64, num_warps=8, num_stages=3, scale_after=False, interleave=False),
        _T(32, 128, 128, 64, num_warps=4, num_stages=4, scale_after=False, interleave=False),
        _T(64, 128, 128, 64, num_warps=8, num_stages=3, scale_after=False),
    ),
    # natural k order, blocks inside a group: fp16/bf16 dequant (uniform_ok). H200, Llama-3-8B
    # down projection at M = 256 (sweep_small.py, session 19): W-as-A 128 x 128 in 2 K-slices
    # 87.0 us against the dequant path's 100.9 (1 slice 153.3, 4 slices 92.2)
    "prefill": (
        _T(128, 128, 128, 64, num_warps=8, num_stages=3, scale_after=False, interleave=False,
           per_sm=0, w_as_a=True),
        _T(128, 128, 128, 64, num_warps=8, num_stages=3, scale_after=False, interleave=False),
        _T(256, 128, 64, 64, num_warps=8, num_stages=3, scale_after=False, interleave=False),
        _T(128, 256, 64, 64, num_warps=8, num_stages=3, scale_after=False, interleave=False),
        # one warpgroup, two programs per SM: one dequantizes while the other's MMAs run
        _T(128, 128, 64, 64, num_warps=4, num_stages=3, scale_after=False, interleave=False),
    ),
}  # fmt: skip
_MAX_SPLIT = 32


def n_splits(cfg: TileConfig, m: int, n: int, kh: int, kl: int, sms: int) -> int:
    """K-splits of the output tiles: with cfg.per_sm, `wave_splits`; without, at least 2
    programs an SM (1 when the tiles already are that many), each keeping 4 K-blocks."""
    tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    blocks = triton.cdiv(kh, cfg.block_kh) + triton.cdiv(kl, cfg.block_kl)
    if cfg.per_sm is not None:
        return wave_splits(cfg, tiles, blocks, sms)
    return max(1, min(triton.cdiv(2 * sms, tiles), blocks // 4, _MAX_SPLIT))


def wave_splits(cfg: TileConfig, tiles: int, blocks: int, sms: int) -> int:
    """As many K-slices of `tiles` output tiles (each of `blocks` K-blocks; a slice keeps at
    least 4) as fill cfg.waves whole waves of cfg.per_sm programs an SM: a last, partial wave of
    these latency-bound programs would cost about as much as a full one."""
    want = cfg.per_sm * sms * cfg.waves // tiles
    return max(1, min(want, blocks // 4, _MAX_SPLIT))


_tuner = Tuner()
_held: dict[tuple, int] = {}  # per_sm=0 configs: programs an SM holds, by config and variant


def _validate(x: torch.Tensor, heavy: torch.Tensor | None, light: QuantizedWeight | None) -> None:
    torch_to_triton_ok(x)
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"activations must be fp16, bf16 or fp32, got {x.dtype}")
    kh = 0 if heavy is None else heavy.shape[1]
    kl = 0 if light is None else light.shape[1]
    if x.shape[-1] != kh + kl:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects {kh + kl}")
    if heavy is not None and (heavy.dtype != x.dtype or heavy.device != x.device):
        raise ValueError(f"dense weight must be {x.dtype} on {x.device}, got {heavy.dtype}")
    if light is not None:
        if light.device != x.device:
            raise ValueError(f"quantized weight is on {light.device}, x on {x.device}")
        if heavy is not None and light.shape[0] != heavy.shape[0]:
            raise ValueError("dense and quantized parts must have the same output features")


def kernel_path(m: int, x: torch.Tensor, light: QuantizedWeight | None, path: str = "auto") -> str:
    """The kernel path M rows like x take with a packed weight like `light` (None: dense only):
    "mma", "gemv", "dequant", or the tl tier ("decode", "small", "prefill"). `split_linear`
    and the split FFN's kernel A dispatch by it."""
    if mma_decode.use(m, path, x, light):
        return "mma"
    if use_gemv(m, path):
        return "gemv"
    if use_dequant(m, path):
        return "dequant"
    return tier_configs(m, path, x.dtype, _CONFIGS)[0]


def split_linear(
    x: torch.Tensor,
    heavy: torch.Tensor | None,
    light: QuantizedWeight | None,
    bias: torch.Tensor | None = None,
    *,
    path: str = "auto",
    prefetch: bool = False,
) -> torch.Tensor:
    """y = x[..., :kh] @ heavy^T + x[..., kh:] @ light.dequantize()^T + bias, in x's dtype.

    `heavy` is a dense [N, kh] weight in x's dtype (or None), `light` a packed [N, kl] weight (or
    None); at least one must be given. `path` forces a tier ("decode", "small", "prefill").
    `prefetch` (the Gluon tier under PDL, mma_decode.split_linear): the dense part's weights are
    asked for in L2 before the wait for the previous kernel; for a call behind latency-bound
    kernels (a decoder's attention), not behind a bandwidth-bound one.
    """
    if heavy is None and light is None:
        raise ValueError("split_linear needs a dense or a quantized part")
    _validate(x, heavy, light)
    n = heavy.shape[0] if heavy is not None else light.shape[0]
    kh = 0 if heavy is None else heavy.shape[1]
    kl = 0 if light is None else light.shape[1]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out.reshape(*lead, n)
    if bias is not None and (bias.shape != (n,) or bias.device != x.device):
        raise ValueError(f"bias must be [{n}] on {x.device}, got {tuple(bias.shape)}")
    chosen = kernel_path(m, x2, light, path)
    if chosen in ("mma", "gemv", "dequant"):
        if chosen == "mma":
            mma_decode.split_linear(x2, heavy, light, bias, out, prefetch=prefetch)
        else:
            module = gemv if chosen == "gemv" else dequant_gemm
            module.split_linear(x2, heavy, light, bias, out)
        return out.reshape(*lead, n)
    heavy_arg = heavy if heavy is not None else x2
    if heavy is not None and heavy.stride(-1) != 1:
        heavy_arg = heavy.contiguous()
    if light is not None:
        bits, group, symmetric = light.bits, light.group_size, light.zeros is None
        p0, p1, scales, zeros = light.kernel_args()
    else:  # never read (no light blocks), but typed like planes and scales
        dummy = torch.zeros(1, dtype=torch.int32, device=x.device)
        bits, group, p0, p1, scales, zeros, symmetric = 4, 32, dummy, dummy, x2, x2, True
    tier, configs = tier_configs(m, path, x.dtype, _CONFIGS)
    sms = sm_count(x.device)

    def run(cfg: TileConfig) -> None:
        const = dict(
            BITS=bits, GROUP=group, SYMMETRIC=symmetric,
            SCALE_AFTER=scale_after_ok(cfg, bits, group, kl), HAS_BIAS=bias is not None,
            PRECISION=dot_precision(x.dtype), BLOCK_M=cfg.block_m,
            BLOCK_N=cfg.block_n, ROWS=light_rows(cfg, bits), BLOCK_KH=cfg.block_kh,
            INTERLEAVE=cfg.interleave,
            FAST4=fast_unpack(cfg, bits, group, kl, x.dtype, x.device),
            UNIFORM=uniform_ok(cfg, bits, group, kl), WA=w_as_a_ok(cfg, bits, group, kl),
        )  # fmt: skip

        def args(ws: torch.Tensor, split: int) -> tuple:
            return (x2, heavy_arg, p0, p1, scales, zeros, bias if bias is not None else out, ws,
                    m, n, kh, kl, x2.stride(0), heavy_arg.stride(0), n, m * n, split)  # fmt: skip

        if cfg.per_sm == 0:  # whole waves of what an SM holds of the (partial-sum) variant
            held = (cfg, tuple(const.items()), x2.dtype, x.device)
            if held not in _held:  # asked once: the decode-sized calls pay a dict lookup
                probe = torch.empty(1, dtype=torch.float32, device=x.device)
                _held[held] = resident_blocks(
                    _split_linear_kernel, args(probe, 2), dict(const, PARTIAL=True),
                    cfg.num_warps, 2, stages=cfg.num_stages, count_shared=True,
                )  # fmt: skip
            cfg = replace(cfg, per_sm=_held[held])
        split = n_splits(cfg, m, n, kh, kl, sms)
        grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n), split)
        ws = out if split == 1 else torch.empty((split, m, n), dtype=torch.float32, device=x.device)
        _split_linear_kernel[grid](
            *args(ws, split), **const, PARTIAL=split > 1, num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )  # fmt: skip
        if split > 1:
            reduce_slices(ws, bias, out)

    key = (tier, triton.next_power_of_2(m), n, kh, kl, bits, group, symmetric, x.dtype, x.device)
    run(_tuner.pick(key, configs, run))
    return out.reshape(*lead, n)


def quant_matmul(
    x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None, *, path: str = "auto"
) -> torch.Tensor:
    """x [..., K] @ qw.dequantize().T (+ bias) -> [..., N] in x's dtype (Triton)."""
    return split_linear(x, None, qw, bias, path=path)
