"""The fused split FFN: two launches (one more for each kernel that splits K and reduces its
partials in a second launch: kernel B on the GEMV path, either kernel in the tensor-core decode
tier when the tuner picks a split config), no dense copy of any weight; opt-in for 1-4 rows, one
launch (fused_decode: units of neurons, each program the whole FFN of its own neurons).

Kernel A computes a = act(gate x + gate_bias) * (up x + up_bias) (or act(up x + up_bias)) for all
neurons in one launch: the first programs take tiles of heavy neurons (dense rows in x's dtype),
the others tiles of light neurons (packed, dequantized in registers); up and gate share the x
loads, and bias, activation and gating run in the epilogue, so `a` [M, h + l] is written once.
Kernel B (quant_matmul.split_linear) is the down projection over K = [heavy | light] columns of
`a`, both parts accumulated into one fp32 tile, then the down bias.

On sm_90 at prefill sizes "auto" takes wgmma_prefill's Gluon kernels instead (kernel A from its
MIN_M to MAX_M rows, kernel B from DOWN_MIN_M to DOWN_MAX_M; with both, kernel A writes `a` in
kernel B's k order and B reads it in place): `kernel_a_path`, `kernel_b_path` and `ffn_path`
name what a call takes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ffnsplit.kernels import dequant_gemm, fused_decode, gemv, mma_decode, wgmma_prefill
from ffnsplit.kernels.format import QuantizedWeight, SplitFFNWeights
from ffnsplit.kernels.quant_matmul import kernel_path as quant_kernel_path
from ffnsplit.kernels.quant_matmul import split_linear, wave_splits
from ffnsplit.kernels.tiles import (
    ACTIVATION_NAMES,
    TileConfig,
    Tuner,
    block_scales,
    dense_block,
    dot_precision,
    fast_unpack,
    light_block,
    light_rows,
    scale_after_ok,
    sm_count,
    store_activations,
    tier_configs,
    torch_to_triton_ok,
    uniform_ok,
    w_as_a_ok,
)


@triton.jit(do_not_specialize=["M", "n_split"])
def _split_up_kernel(
    x_ptr, hu_ptr, hg_ptr, up0_ptr, up1_ptr, us_ptr, uz_ptr, gp0_ptr, gp1_ptr, gs_ptr, gz_ptr,
    ub_ptr, gb_ptr, a_ptr, ws_ptr,
    M, K, NH, NL, stride_xm, stride_hw, stride_am, n_split,
    BITS: tl.constexpr, GROUP: tl.constexpr, SYMMETRIC: tl.constexpr,
    SCALE_AFTER: tl.constexpr, GATED: tl.constexpr, ACTIVATION: tl.constexpr,
    HAS_UP_BIAS: tl.constexpr, HAS_GATE_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_NH: tl.constexpr, BLOCK_NL: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_KH: tl.constexpr, INTERLEAVE: tl.constexpr,
    FAST4: tl.constexpr, UNIFORM: tl.constexpr, PARTIAL: tl.constexpr, WA: tl.constexpr = False,
):  # fmt: skip
    """a[:, tile] for one row tile (program_id 0) and one heavy or light neuron tile (id 1).

    PARTIAL (split-K, n_split > 1): the program takes K-slice program_id(2) of the tile's
    K-blocks and writes its fp32 up and gate sums to ws [n_split, 2, M, NH + NL] instead;
    gemv's reduce kernel adds the slices in order and applies biases, activation and gating.
    """
    PACK: tl.constexpr = 32 // (8 if BITS == 8 else (4 if BITS == 4 else 2))
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    heavy_tiles = tl.cdiv(NH, BLOCK_NH)
    if pid_n < heavy_tiles:
        offs_h = pid_n * BLOCK_NH + tl.arange(0, BLOCK_NH)
        mask_h = offs_h < NH
        acc_hu = tl.zeros([BLOCK_M, BLOCK_NH], dtype=tl.float32)
        acc_hg = tl.zeros([BLOCK_M, BLOCK_NH], dtype=tl.float32)
        nb = tl.cdiv(K, BLOCK_KH)
        for kb in range(pid_s * nb // n_split, (pid_s + 1) * nb // n_split):
            acc_hu, acc_hg = dense_block(acc_hu, acc_hg, x_ptr, stride_xm, offs_m, mask_m, hu_ptr,
                                         hg_ptr, stride_hw, K, kb * BLOCK_KH, offs_h, mask_h,
                                         GATED, BLOCK_KH, PRECISION)  # fmt: skip
        if PARTIAL:
            _store_partial(ws_ptr, acc_hu, acc_hg, pid_s, M, NH + NL, offs_m, mask_m, offs_h,
                           mask_h, GATED)  # fmt: skip
        else:
            store_activations(acc_hu, acc_hg, ub_ptr, gb_ptr, a_ptr, stride_am, offs_m, mask_m,
                              offs_h, mask_h, GATED, ACTIVATION, HAS_UP_BIAS,
                              HAS_GATE_BIAS)  # fmt: skip
    else:
        offs_l = (pid_n - heavy_tiles) * BLOCK_NL + tl.arange(0, BLOCK_NL)
        mask_l = offs_l < NL
        if WA:  # [neurons, rows]: light_block's W @ x^T form
            acc_lu = tl.zeros([BLOCK_NL, BLOCK_M], dtype=tl.float32)
            acc_lg = tl.zeros([BLOCK_NL, BLOCK_M], dtype=tl.float32)
        else:
            acc_lu = tl.zeros([BLOCK_M, BLOCK_NL], dtype=tl.float32)
            acc_lg = tl.zeros([BLOCK_M, BLOCK_NL], dtype=tl.float32)
        PER_BLOCK: tl.constexpr = SCALE_AFTER or UNIFORM  # one scale per column and block
        BLOCK_KL: tl.constexpr = ROWS * PACK
        nb = tl.cdiv(K, BLOCK_KL)
        b0 = pid_s * nb // n_split
        su_next, zu_next = block_scales(us_ptr, uz_ptr, NL, K, b0 * BLOCK_KL, offs_l, mask_l,
                                        GROUP, SYMMETRIC, PER_BLOCK)  # fmt: skip
        sg_next, zg_next = block_scales(gs_ptr, gz_ptr, NL, K, b0 * BLOCK_KL, offs_l, mask_l,
                                        GROUP, SYMMETRIC, PER_BLOCK and GATED)  # fmt: skip
        for b in range(b0, (pid_s + 1) * nb // n_split):
            k0 = b * BLOCK_KL
            su, zu, sg, zg = su_next, zu_next, sg_next, zg_next
            su_next, zu_next = block_scales(us_ptr, uz_ptr, NL, K, k0 + ROWS * PACK, offs_l,
                                            mask_l, GROUP, SYMMETRIC, PER_BLOCK)  # fmt: skip
            sg_next, zg_next = block_scales(gs_ptr, gz_ptr, NL, K, k0 + ROWS * PACK, offs_l,
                                            mask_l, GROUP, SYMMETRIC,
                                            PER_BLOCK and GATED)  # fmt: skip
            acc_lu, acc_lg = light_block(acc_lu, acc_lg, x_ptr, stride_xm, offs_m, mask_m,
                                         up0_ptr, up1_ptr, us_ptr, uz_ptr,
                                         gp0_ptr, gp1_ptr, gs_ptr, gz_ptr, su, zu, sg, zg,
                                         NL, K, k0, offs_l, mask_l, BITS, GROUP, SYMMETRIC,
                                         SCALE_AFTER, GATED, ROWS, INTERLEAVE, FAST4,
                                         PRECISION, UNIFORM, WA)  # fmt: skip
        if WA:
            acc_lu = tl.trans(acc_lu)
            acc_lg = tl.trans(acc_lg)
        if PARTIAL:
            _store_partial(ws_ptr, acc_lu, acc_lg, pid_s, M, NH + NL, offs_m, mask_m,
                           NH + offs_l, mask_l, GATED)  # fmt: skip
        else:
            store_activations(acc_lu, acc_lg, ub_ptr, gb_ptr, a_ptr, stride_am, offs_m, mask_m,
                              NH + offs_l, mask_l, GATED, ACTIVATION, HAS_UP_BIAS,
                              HAS_GATE_BIAS)  # fmt: skip


@triton.jit
def _store_partial(ws_ptr, acc_u, acc_g, split, M, NT, offs_m, mask_m, cols, mask_n,
                   GATED: tl.constexpr):  # fmt: skip
    """fp32 up (and gate) sums of one K-slice into ws [n_split, 2 (1 without GATED), M, NT]: the
    slots of gemv's reduce kernel."""
    DUALS: tl.constexpr = 2 if GATED else 1
    base = ws_ptr + split * DUALS * M * NT + offs_m[:, None] * NT + cols[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    tl.store(base, acc_u, mask=mask)
    if GATED:
        tl.store(base + M * NT, acc_g, mask=mask)


_T = TileConfig
_CONFIGS = {  # (block_m, block_n (light neurons), block_kl, block_kh); block_nh: heavy neurons
    "decode": (
        _T(16, 64, 128, 128, num_warps=4, num_stages=4, block_nh=16, interleave=False),
        _T(16, 64, 128, 128, num_warps=4, num_stages=4, block_nh=16),
        _T(16, 64, 128, 128, num_warps=4, num_stages=4, block_nh=16, fast_unpack=False),
        _T(16, 32, 128, 128, num_warps=2, num_stages=4, block_nh=16, interleave=False),
        _T(16, 32, 128, 128, num_warps=4, num_stages=5, block_nh=16, interleave=False),
        # split-K: 3 K-slices in two waves of 3 programs an SM (168 registers: 3 fit); H100,
        # M = 16: 72.3 -> 67.9 us, the reduce launch included (benchmarks/RESULTS.md, session 8)
        _T(16, 64, 128, 128, num_warps=4, num_stages=3, block_nh=16, interleave=False, per_sm=3,
           waves=2),
    ),
    # H200, Llama-3-8B up + gate at M = 64 (benchmarks/sweep_small.py, session 19): the W-as-A
    # forms 64.1 us (64 x 128, 8 warps) and 71.0 (64 x 64) against the x @ W^T form's 77.5
    "small": (
        _T(64, 128, 128, 64, num_warps=8, num_stages=3, block_nh=128, scale_after=False,
           interleave=False, w_as_a=True),
        _T(64, 64, 128, 64, num_warps=4, num_stages=3, block_nh=64, scale_after=False,
           interleave=False, w_as_a=True),
        _T(64, 64, 128, 64, num_warps=4, num_stages=3, block_nh=64, scale_after=False,
           interleave=False),
        _T(32, 64, 128, 64, num_warps=4, num_stages=4, block_nh=32, scale_after=False,
           interleave=False),
        _T(64, 64, 128, 64, num_warps=4, num_stages=3, block_nh=64, scale_after=False),
    ),
    # natural k order, blocks inside a group: fp16/bf16 dequant (uniform_ok). H200, Llama-3-8B
    # up + gate at M = 256 (sweep_small.py, session 19): the W-as-A 128 x 128 163.4 us against
    # the dequant path's 177.4 (and the 128 x 64 x @ W^T tile's 244.1)
    "prefill": (
        _T(128, 128, 128, 64, num_warps=8, num_stages=3, block_nh=128, scale_after=False,
           interleave=False, w_as_a=True),
        _T(128, 64, 128, 64, num_warps=8, num_stages=3, block_nh=64, scale_after=False,
           interleave=False),
        _T(256, 64, 64, 64, num_warps=8, num_stages=3, block_nh=64, scale_after=False,
           interleave=False),
        _T(128, 128, 64, 64, num_warps=8, num_stages=3, block_nh=128, scale_after=False,
           interleave=False),
        # one warpgroup, two programs per SM: one dequantizes while the other's MMAs run
        _T(128, 64, 64, 64, num_warps=4, num_stages=3, block_nh=64, scale_after=False,
           interleave=False),
    ),
}  # fmt: skip

_tuner = Tuner()


def _same_format(a: QuantizedWeight, b: QuantizedWeight) -> bool:
    return (a.bits, a.group_size, a.shape, a.symmetric) == (b.bits, b.group_size, b.shape,
                                                             b.symmetric)  # fmt: skip


def _validate(x: torch.Tensor, w: SplitFFNWeights) -> None:
    torch_to_triton_ok(x)
    if w.activation not in ACTIVATION_NAMES:
        raise ValueError(f"unknown activation {w.activation!r}: one of {ACTIVATION_NAMES}")
    if w.n_heavy == 0 and w.n_light == 0:
        raise ValueError("a split FFN needs heavy or light neurons")
    hidden = w.hidden_size
    if x.shape[-1] != hidden:
        raise ValueError(f"x has {x.shape[-1]} features, the FFN expects {hidden}")
    for name in ("heavy_up", "heavy_gate", "heavy_down"):
        t = getattr(w, name)
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise ValueError(f"{name} must be {x.dtype} on {x.device}, got {t.dtype} on {t.device}")
    for name, size in (("up_bias", w.n_heavy + w.n_light), ("gate_bias", w.n_heavy + w.n_light),
                       ("down_bias", hidden)):  # fmt: skip
        t = getattr(w, name)
        if t is not None and (tuple(t.shape) != (size,) or t.device != x.device):
            raise ValueError(f"{name} must be [{size}] on {x.device}, got {tuple(t.shape)}")
    if w.gated and (w.n_heavy and w.heavy_gate is None or w.n_light and w.light_gate is None):
        raise ValueError("a gated split FFN needs gate weights for heavy and light neurons")
    if w.n_light:
        if w.light_down is None or w.light_down.shape != (hidden, w.n_light):
            raise ValueError(f"light_down must be [{hidden}, {w.n_light}]")
        if w.gated and not _same_format(w.light_up, w.light_gate):
            raise ValueError("light_up and light_gate must share bits, group size and symmetry")
        if w.light_up.device != x.device:
            raise ValueError(f"light weights are on {w.light_up.device}, x on {x.device}")


def kernel_path(m: int, x: torch.Tensor, w: SplitFFNWeights, path: str = "auto") -> str:
    """The kernel path that `split_activations` (and the down projection) take for M rows like
    x: quant_matmul.kernel_path for the light up weight's format."""
    return quant_kernel_path(m, x, w.light_up if w.n_light else None, path)


def kernel_a_path(m: int, x: torch.Tensor, w: SplitFFNWeights, path: str = "auto") -> str:
    """The path `split_activations` takes for M rows like x: "wgmma" (the Hopper prefill
    kernel, wgmma_prefill.py) where "auto" takes it, else kernel_path's."""
    if path == "auto" and wgmma_prefill.use(m, x, w):
        return "wgmma"
    return kernel_path(m, x, w, path)


def kernel_b_path(m: int, x: torch.Tensor, w: SplitFFNWeights, path: str = "auto") -> str:
    """The path `down_projection` takes for M rows like x (kernel A's output): "wgmma" where
    "auto" takes wgmma_prefill's kernel B, else kernel_path's."""
    if path == "auto" and wgmma_prefill.use_down(m, x, w):
        return "wgmma"
    return kernel_path(m, x, w, path)


def ffn_path(m: int, x: torch.Tensor, w: SplitFFNWeights, path: str = "auto") -> str:
    """The path `split_ffn` takes for M rows like x: "fused" (one launch), else kernel A's and
    kernel B's paths ("wgmma+prefill": kernel A by wgmma_prefill, B by the tl prefill tier),
    one name when they agree."""
    if path == "fused" or path == "auto" and fused_decode.use(m, x, w, path):
        return "fused"
    a, b = kernel_a_path(m, x, w, path), kernel_b_path(m, x, w, path)
    return a if a == b else f"{a}+{b}"


def split_activations(x: torch.Tensor, w: SplitFFNWeights, *, path: str = "auto") -> torch.Tensor:
    """Kernel A: a [..., h + l] = act(gate x + gate_bias) * (up x + up_bias) (or act(up x + b))."""
    _validate(x, w)
    h, n_light, hidden = w.n_heavy, w.n_light, w.hidden_size
    lead = x.shape[:-1]
    x2 = x.reshape(-1, hidden)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if m == 0:
        return torch.empty((*lead, h + n_light), dtype=x.dtype, device=x.device)
    chosen = kernel_path(m, x2, w, path)
    if chosen == "dequant":  # a row stride of 16 bytes: the down projection's cuBLAS operand
        a = dequant_gemm.aligned_empty(m, h + n_light, x2)
    else:
        a = torch.empty((m, h + n_light), dtype=x.dtype, device=x.device)
    if path == "auto" and wgmma_prefill.use(m, x2, w):  # Hopper, prefill sizes
        wgmma_prefill.split_activations(x2, w, a)
        return a.reshape(*lead, h + n_light)
    if chosen in ("mma", "gemv", "dequant"):
        module = {"mma": mma_decode, "gemv": gemv, "dequant": dequant_gemm}[chosen]
        module.split_activations(x2, w, a)
        return a.reshape(*lead, h + n_light)
    hu = w.heavy_up.contiguous() if h else x2
    hg = w.heavy_gate.contiguous() if h and w.gated else hu
    if n_light:
        up, gate = w.light_up, w.light_gate if w.gated else w.light_up
        bits, group, symmetric = up.bits, up.group_size, up.symmetric
        light_args = up.kernel_args() + gate.kernel_args()
    else:  # never read (no light tiles), but typed like planes and scales
        bits, group, symmetric = 4, 32, True
        dummy = torch.zeros(1, dtype=torch.int32, device=x.device)
        light_args = [dummy, dummy, x2, x2] * 2
    tier, configs = tier_configs(m, path, x.dtype, _CONFIGS)

    sms = sm_count(x.device)

    def run(cfg: TileConfig) -> None:
        block_nh = cfg.block_nh or cfg.block_n
        tiles = triton.cdiv(h, block_nh) + triton.cdiv(n_light, cfg.block_n)
        split = 1
        if cfg.per_sm is not None:  # K-slices: whole waves of per_sm programs an SM
            blocks = triton.cdiv(hidden, max(cfg.block_kl, cfg.block_kh))
            split = wave_splits(cfg, triton.cdiv(m, cfg.block_m) * tiles, blocks, sms)
        grid = (triton.cdiv(m, cfg.block_m), tiles, split)
        up_bias = w.up_bias if w.up_bias is not None else a
        gate_bias = w.gate_bias if w.gate_bias is not None else a
        ws = a
        duals = 2 if w.gated else 1
        if split > 1:
            ws = torch.empty((split, duals, m, h + n_light), dtype=torch.float32, device=x.device)
        _split_up_kernel[grid](
            x2, hu, hg, *light_args, up_bias, gate_bias, a, ws,
            m, hidden, h, n_light, x2.stride(0), hu.stride(0), a.stride(0), split,
            BITS=bits, GROUP=group, SYMMETRIC=symmetric,
            SCALE_AFTER=scale_after_ok(cfg, bits, group, hidden), GATED=w.gated,
            ACTIVATION=w.activation, HAS_UP_BIAS=w.up_bias is not None,
            HAS_GATE_BIAS=w.gated and w.gate_bias is not None,
            PRECISION=dot_precision(x.dtype), BLOCK_M=cfg.block_m, BLOCK_NH=block_nh,
            BLOCK_NL=cfg.block_n, ROWS=light_rows(cfg, bits), BLOCK_KH=cfg.block_kh,
            INTERLEAVE=cfg.interleave,
            FAST4=fast_unpack(cfg, bits, group, hidden, x.dtype, x.device),
            UNIFORM=uniform_ok(cfg, bits, group, hidden), PARTIAL=split > 1,
            WA=w_as_a_ok(cfg, bits, group, hidden),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
        if split > 1:  # every column has `split` slots, added in order, then finished
            block = 512
            gemv._gemv_reduce_kernel[(triton.cdiv(m * (h + n_light), block),)](
                ws, up_bias, gate_bias, a, m, h + n_light, a.stride(0), 0, 0, split, split,
                DUAL=w.gated, ACT=True, ACTIVATION=w.activation,
                HAS_UP_BIAS=w.up_bias is not None,
                HAS_GATE_BIAS=w.gated and w.gate_bias is not None, BLOCK=block,
                BLOCK_S=triton.next_power_of_2(split), PDL=False, num_warps=4,
            )  # fmt: skip

    key = (tier, triton.next_power_of_2(m), hidden, h, n_light, bits, group, symmetric, w.gated)
    key += (x.dtype, x.device)
    run(_tuner.pick(key, configs, run))
    return a.reshape(*lead, h + n_light)


def split_ffn(x: torch.Tensor, w: SplitFFNWeights, *, path: str = "auto") -> torch.Tensor:
    """y [..., H] = down(a) + down_bias with a from `split_activations` (Triton), or for 1-4 rows
    the one-launch kernel (fused_decode, "auto" up to its AUTO_MAX_M on a GPU, path="fused")."""
    m = x.numel() // max(x.shape[-1], 1) if x.dim() else 0
    # "auto" asks nothing more while the path is off (AUTO_MAX_M 0): no work on the decode path
    if m and (path == "fused" or path == "auto" and m <= fused_decode.AUTO_MAX_M):
        _validate(x, w)
        x2 = x.reshape(-1, x.shape[-1])
        if fused_decode.use(m, x2, w, path):
            if x2.stride(-1) != 1:
                x2 = x2.contiguous()
            out = torch.empty((m, w.hidden_size), dtype=x.dtype, device=x.device)
            fused_decode.split_ffn(x2, w, out)
            return out.reshape(*x.shape[:-1], w.hidden_size)
    if path == "auto" and m >= wgmma_prefill.MIN_M:  # Hopper, prefill sizes: both kernels
        _validate(x, w)  # before `use` reads the weights' formats
        x2 = x.reshape(-1, w.hidden_size)
        if wgmma_prefill.use(m, x2, w) and wgmma_prefill.use_down(m, x2, w):
            out = wgmma_prefill.split_ffn(x2 if x2.stride(-1) == 1 else x2.contiguous(), w)
            return out.reshape(*x.shape[:-1], w.hidden_size)
    return down_projection(split_activations(x, w, path=path), w, path=path)


def down_projection(a: torch.Tensor, w: SplitFFNWeights, *, path: str = "auto") -> torch.Tensor:
    """Kernel B: y [..., H] = a[..., :h] heavy_down^T + a[..., h:] light_down^T + down_bias, with
    a from `split_activations(..., path=path)` (whose allocation the dequant path relies on)."""
    a2 = a.reshape(-1, a.shape[-1])
    m = a2.shape[0]
    if m and path == "auto" and wgmma_prefill.use_down(m, a2, w):  # Hopper, prefill sizes
        out = torch.empty((m, w.hidden_size), dtype=a.dtype, device=a.device)
        wgmma_prefill.split_linear(a2, w.heavy_down if w.n_heavy else None, w.light_down,
                                   w.down_bias, out)  # fmt: skip
        return out.reshape(*a.shape[:-1], w.hidden_size)
    if m and quant_kernel_path(m, a2, w.light_down if w.n_light else None, path) == "dequant":
        # kernel A took this path too (the choice hangs on M and `path` alone from here on), so
        # a is its aligned_empty: K padded with zero columns
        out = torch.empty((m, w.hidden_size), dtype=a.dtype, device=a.device)
        dequant_gemm.split_linear(a2, w.heavy_down, w.light_down, w.down_bias, out, padded=True)
        return out.reshape(*a.shape[:-1], w.hidden_size)
    return split_linear(a, w.heavy_down, w.light_down, w.down_bias, path=path)
