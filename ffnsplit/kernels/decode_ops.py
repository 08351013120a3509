"""The attention-side plumbing of a decode step, a few launches per layer (eval/bench.StaticDecoder).

Hugging Face's Llama layer spends ~7 tiny kernels on an RMSNorm, ~6 on the rotary, two cache
copies, two repeated-cache copies and a masked SDPA: at decode (one token) these launches, not the
weights, set the time of everything but the FFN. Here:

- `add_rms_norm` / `rms_norm`: the residual add and the next RMSNorm in one pass per row, in
  LlamaRMSNorm's order of casts (fp32 statistics, normalized value rounded to the input dtype, then
  times the weight).
- `rope_kv_write`: from the fused q/k/v projection, the rotary on q and k (optionally the per-head
  RMSNorm of Qwen3 first), k and v written into the static cache at `positions`, q returned.
- `greedy_tokens`: argmax over the vocabulary in one launch (a max per chunk of the row, then
  over the chunks by the row's last chunk to finish), writing the next tokens and advancing the
  decode position in place.
- `decode_attention`: grouped-query attention over the static cache without repeating it (each
  program loads a key/value block once for all the query heads of its kv head), split-K
  (flash-decoding) when there are few query rows: programs own fixed key chunks, those past the
  furthest query position (or before its sliding window) do nothing, a second launch combines
  the chunks' partial softmaxes. The grid depends on shapes only, so a CUDA graph replays it at
  any position, and the work scales with the current length, not the cache's.

Every launcher validates its inputs; kernels/reference.py holds a torch twin of each (same
signature). No host syncs, no data-dependent shapes.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ffnsplit.kernels.tiles import (
    INTERPRET,
    pdl_options,
    pdl_trigger,
    pdl_wait,
    sm_count,
    torch_to_triton_ok,
)

MAX_NORM_BLOCK = 16384  # a row up to this size stays in registers; longer rows loop twice
LOG2E = 1.4426950408889634
# key chunks of a split attention call at most (partials: splits x D floats a row); two under the
# interpreter, which runs programs one by one
MAX_SPLITS = 2 if INTERPRET else 128
# Split attention's default chunks: about this many programs an SM (0: as many chunks as
# MAX_SPLITS allows). These programs are latency-bound chains (load, scores, softmax, sum, store);
# H200, session 22, one layer's rope_attention at Llama-3-8B shape after a q/k/v-sized GEMV:
# 4,096 keys in 128 chunks (1,024 programs) 18.2 us, in 32 (256 programs) 12.3; 8,192 keys in
# 128 chunks 21.6 us, in 32 16.5; 640 keys in 20 chunks (one block each) 7.1-7.3, in 10 7.5-7.8
SPLIT_PROGRAMS_PER_SM = int(os.environ.get("FFNSPLIT_ATTENTION_PROGRAMS_PER_SM", "2"))


def _key_chunk(device: torch.device, length: int, block_n: int, batch_heads: int) -> int:
    """Keys a program of a split attention call: whole blocks, about SPLIT_PROGRAMS_PER_SM
    programs an SM over the batch's kv heads (fewer chunks, each walking more blocks, once the
    cache is long), at most MAX_SPLITS chunks."""
    splits = MAX_SPLITS
    if SPLIT_PROGRAMS_PER_SM:
        target = triton.cdiv(SPLIT_PROGRAMS_PER_SM * sm_count(device), max(1, batch_heads))
        splits = max(1, min(splits, target))
    return block_n * triton.cdiv(triton.cdiv(length, block_n), splits)


def _float_ok(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"decode ops take fp16, bf16 or fp32 tensors, not {t.dtype}")
    torch_to_triton_ok(tensors[0])
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"tensors on several devices: {sorted(map(str, devices))}")


# ---------------------------------------------------------------------------------------------
# Residual add + RMSNorm


@triton.jit
def _add_rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, new_res_ptr,
    H, stride_x, stride_r, stride_o, stride_n, eps,
    HAS_RESIDUAL: tl.constexpr, ONE_PASS: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    pdl_trigger(PDL)  # the next kernel (an FFN's) may start loading its weights
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    res_row = res_ptr + row * stride_r
    new_row = new_res_ptr + row * stride_n
    out_row = out_ptr + row * stride_o
    dtype = x_ptr.dtype.element_ty
    if ONE_PASS:
        cols = tl.arange(0, BLOCK)
        mask = cols < H
        # the norm's weights before the wait (no kernel writes them): their load no longer
        # follows the sum of squares' barriers (in a decode step they come from DRAM)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        pdl_wait(PDL)
        h = tl.load(x_row + cols, mask=mask, other=0.0)
        if HAS_RESIDUAL:  # rounded to the activations' dtype, as torch's `residual + x` is
            h = (h.to(tl.float32) + tl.load(res_row + cols, mask=mask, other=0.0)).to(dtype)
            tl.store(new_row + cols, h, mask=mask)
        hf = h.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(hf * hf, axis=0) / H + eps)
        normed = (hf * rstd).to(dtype).to(tl.float32)
        tl.store(out_row + cols, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)
    else:  # pass 1: the new residual and the sum of squares; pass 2 re-reads the residual
        pdl_wait(PDL)
        squares = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, H, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < H
            h = tl.load(x_row + cols, mask=mask, other=0.0)
            if HAS_RESIDUAL:
                h = (h.to(tl.float32) + tl.load(res_row + cols, mask=mask, other=0.0)).to(dtype)
                tl.store(new_row + cols, h, mask=mask)
            hf = h.to(tl.float32)
            squares += hf * hf
        rstd = tl.rsqrt(tl.sum(squares, axis=0) / H + eps)
        src = new_row if HAS_RESIDUAL else x_row
        for start in range(0, H, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < H
            hf = tl.load(src + cols, mask=mask, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            normed = (hf * rstd).to(dtype).to(tl.float32)
            tl.store(out_row + cols, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor, hidden: int) -> torch.Tensor:
    """t [..., H] as [rows, H] with unit stride along H (a view when possible)."""
    rows = t.reshape(-1, hidden)
    return rows if rows.stride(1) == 1 else rows.contiguous()


def _norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    hidden = x.shape[-1]
    if weight.shape != (hidden,):
        raise ValueError(f"norm weight of shape {tuple(weight.shape)} for rows of {hidden}")
    tensors = (x, weight) if residual is None else (x, weight, residual)
    _float_ok(*tensors)
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(
            f"residual {tuple(residual.shape)} {residual.dtype} does not match x "
            f"{tuple(x.shape)} {x.dtype}"
        )
    x2 = _rows(x, hidden)
    res2 = x2 if residual is None else _rows(residual, hidden)
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    new_res = torch.empty_like(x) if residual is not None else None
    out2, new2 = out.view(-1, hidden), (out if new_res is None else new_res).view(-1, hidden)
    block = triton.next_power_of_2(hidden)
    one_pass = block <= MAX_NORM_BLOCK
    block = min(block, MAX_NORM_BLOCK)
    if x2.shape[0]:
        _add_rms_norm_kernel[(x2.shape[0],)](
            x2, res2, weight, out2, new2,
            hidden, x2.stride(0), res2.stride(0), out2.stride(0), new2.stride(0), float(eps),
            HAS_RESIDUAL=residual is not None, ONE_PASS=one_pass, BLOCK=block,
            num_warps=1 if INTERPRET else min(16, max(1, block // 512)), **pdl_options(x.device),
        )  # fmt: skip
    return out, new_res


# ---------------------------------------------------------------------------------------------
# The greedy pick of a decode step


GREEDY_BLOCK = 64 if INTERPRET else 512  # logits a program of the greedy pick


@triton.jit
def _greedy_kernel(
    logits_ptr, vals_ptr, idx_ptr, cnt_ptr, out_ptr, pos_ptr, V, CHUNKS, stride_l, stride_o,
    ADVANCE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_C: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """Programs: (row, chunk of BLOCK logits). Each stores its chunk's maximum and the first
    index holding it; the row's last chunk to arrive (a CTA barrier, then one acq_rel atomic)
    takes the first chunk holding the largest, writes the token, resets the row's counter, and
    (ADVANCE, row 0) adds one to the decode position. NaN counts as +inf."""
    pdl_trigger(PDL)
    pdl_wait(PDL)
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(logits_ptr + row.to(tl.int64) * stride_l + offs, mask=offs < V,
                other=float("-inf")).to(tl.float32)  # fmt: skip
    x = tl.where(x != x, float("inf"), x)
    best = tl.max(x, axis=0)
    first = tl.min(tl.where((x == best) & (offs < V), offs, V), axis=0)
    slot = row * CHUNKS + chunk
    tl.store(vals_ptr + slot, best)
    tl.store(idx_ptr + slot, first)
    tl.debug_barrier()
    ticket = tl.atomic_add(cnt_ptr + row, 1, sem="acq_rel", scope="gpu")
    if ticket == CHUNKS - 1:
        c = tl.arange(0, BLOCK_C)
        c_ok = c < CHUNKS
        vals = tl.load(vals_ptr + row * CHUNKS + c, mask=c_ok, other=float("-inf"),
                       cache_modifier=".cg")  # fmt: skip
        idx = tl.load(idx_ptr + row * CHUNKS + c, mask=c_ok, other=V, cache_modifier=".cg")
        top = tl.max(vals, axis=0)
        token = tl.min(tl.where((vals == top) & c_ok, idx, V), axis=0)
        tl.store(out_ptr + row.to(tl.int64) * stride_o, token.to(tl.int64))
        tl.atomic_xchg(cnt_ptr + row, 0, sem="relaxed", scope="gpu")
        if ADVANCE and row == 0:
            tl.store(pos_ptr, tl.load(pos_ptr) + 1)


def greedy_tokens(
    logits: torch.Tensor, out: torch.Tensor | None = None, position: torch.Tensor | None = None
) -> torch.Tensor:
    """logits [B, V] -> [B, 1] int64: the first index of each row's maximum (torch.argmax's
    answer; NaN counts as +inf), in one launch: a maximum per chunk of the row, then, by the
    row's last chunk to finish, the first chunk holding the largest. `out` [B, 1] int64 (e.g.
    a decoder's next tokens) is written in place and returned; `position` (a one-element
    integer tensor) gets one added by the same launch (a decode step's last two ops)."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, V], got {tuple(logits.shape)}")
    b, v = logits.shape
    _float_ok(logits)
    if out is None:
        out = torch.empty(b, 1, dtype=torch.int64, device=logits.device)
    elif out.shape != (b, 1) or out.dtype != torch.int64 or out.device != logits.device:
        raise ValueError(f"out must be a [{b}, 1] int64 tensor on {logits.device}")
    if position is not None and (
        position.numel() != 1
        or position.dtype not in (torch.int32, torch.int64)
        or position.device != logits.device
    ):
        raise ValueError(f"position must be a one-element integer tensor on {logits.device}")
    if b == 0 or v == 0:
        if v == 0 and b:
            raise ValueError("logits over an empty vocabulary have no maximum")
        if position is not None:
            position.add_(1)
        return out
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    from ffnsplit.kernels.gemv import _zeroed  # the rows' arrival counters

    chunks = triton.cdiv(v, GREEDY_BLOCK)
    vals = torch.empty(b * chunks, dtype=torch.float32, device=logits.device)
    idx = torch.empty(b * chunks, dtype=torch.int32, device=logits.device)
    _greedy_kernel[(b, chunks)](
        logits, vals, idx, _zeroed(logits.device, b, torch.int32), out,
        position if position is not None else out, v, chunks, logits.stride(0), out.stride(0),
        ADVANCE=position is not None, BLOCK=GREEDY_BLOCK,
        BLOCK_C=triton.next_power_of_2(chunks), num_warps=1 if INTERPRET else 4,
        **pdl_options(logits.device),
    )  # fmt: skip
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm of x [..., H]: weight * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(x.dtype)."""
    return _norm(x, None, weight, eps)[0]


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(residual + x), residual + x) in one pass: the sum is rounded to x's dtype first,
    as the model's own `residual + x` is."""
    out, new_residual = _norm(x, residual, weight, eps)
    return out, new_residual


# ---------------------------------------------------------------------------------------------
# Rotary + KV cache write


@triton.jit
def _rotary(x, xp, sign, cos, sin):
    """x * cos + rotate_half(x) * sin of rows x [R, D] (xp: rotate_half's source elements,
    `sign` its signs), each product rounded to x's dtype as the model's torch ops do."""
    first = (x.to(tl.float32) * cos[None, :]).to(x.dtype).to(tl.float32)
    second = (sign[None, :] * xp.to(tl.float32) * sin[None, :]).to(x.dtype).to(tl.float32)
    return (first + second).to(x.dtype)


@triton.jit
def _rope_kv_kernel(
    qkv_ptr, cos_ptr, sin_ptr, pos_ptr, k_ptr, v_ptr, q_ptr, qn_ptr, kn_ptr,
    T, HQ, HKV, D, eps,
    stride_xb, stride_xt, stride_cos, stride_sin,
    stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl,
    stride_qb, stride_qh, stride_qt,
    HAS_QK_NORM: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """One token (program 0) x BLOCK_H of its q | k | v heads (program 1)."""
    pdl_trigger(PDL)
    pdl_wait(PDL)
    token = tl.program_id(0)
    b = token // T
    t = token % T
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    half = D // 2
    partner = tl.where(d < half, d + half, d - half)  # rotate_half's source element
    sign = tl.where(d < half, -1.0, 1.0)
    is_q = heads < HQ
    is_k = (heads >= HQ) & (heads < HQ + HKV)
    is_v = (heads >= HQ + HKV) & (heads < HQ + 2 * HKV)
    d_ok = d < D
    mask = (heads < HQ + 2 * HKV)[:, None] & d_ok[None, :]
    row = qkv_ptr + b.to(tl.int64) * stride_xb + t.to(tl.int64) * stride_xt + heads[:, None] * D
    dtype = qkv_ptr.dtype.element_ty
    x = tl.load(row + d[None, :], mask=mask, other=0.0)
    xp = tl.load(row + partner[None, :], mask=mask, other=0.0)
    if HAS_QK_NORM:  # per-head RMSNorm of q and k, in LlamaRMSNorm's order of casts
        xf = x.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(xf * xf, axis=1) / D + eps)[:, None]
        wq = tl.load(qn_ptr + d, mask=d_ok, other=0.0).to(tl.float32)
        wk = tl.load(kn_ptr + d, mask=d_ok, other=0.0).to(tl.float32)
        wqp = tl.load(qn_ptr + partner, mask=d_ok, other=0.0).to(tl.float32)
        wkp = tl.load(kn_ptr + partner, mask=d_ok, other=0.0).to(tl.float32)
        w = tl.where(is_q[:, None], wq[None, :], wk[None, :])
        wp = tl.where(is_q[:, None], wqp[None, :], wkp[None, :])
        xn = (w * (xf * rstd).to(dtype).to(tl.float32)).to(dtype)
        xpn = (wp * (xp.to(tl.float32) * rstd).to(dtype).to(tl.float32)).to(dtype)
        rotary = (is_q | is_k)[:, None]
        x = tl.where(rotary, xn, x)
        xp = tl.where(rotary, xpn, xp)
    cos = tl.load(cos_ptr + t * stride_cos + d, mask=d_ok, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + t * stride_sin + d, mask=d_ok, other=0.0).to(tl.float32)
    rotated = _rotary(x, xp, sign, cos, sin)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    q_dst = q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + t * stride_qt
    tl.store(q_dst + d[None, :], rotated, mask=mask & is_q[:, None])
    kv_head = tl.where(is_k, heads - HQ, heads - HQ - HKV)[:, None]
    k_dst = k_ptr + b.to(tl.int64) * stride_kb + kv_head * stride_kh + pos * stride_kl
    tl.store(k_dst + d[None, :], rotated.to(k_ptr.dtype.element_ty), mask=mask & is_k[:, None])
    v_dst = v_ptr + b.to(tl.int64) * stride_vb + kv_head * stride_vh + pos * stride_vl
    tl.store(v_dst + d[None, :], x.to(v_ptr.dtype.element_ty), mask=mask & is_v[:, None])


def _check_caches(k_cache: torch.Tensor, v_cache: torch.Tensor, b: int, kv_heads: int,
                  head_dim: int) -> None:  # fmt: skip
    """Both caches [B, kv, L, D] of one length, unit stride along D (the rotary launchers)."""
    cache_shape = (b, kv_heads, k_cache.shape[2], head_dim)
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if tuple(cache.shape) != cache_shape or cache.stride(3) != 1:
            raise ValueError(f"{name} must be [B, kv, L, D] = {cache_shape}, got {cache.shape}")


def rope_kv_write(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    q_heads: int,
    kv_heads: int,
    head_dim: int,
    q_norm: torch.Tensor | None = None,
    k_norm: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Rotary on the q and k heads of qkv [B, T, (q + 2 kv) * D] (cos, sin [T, D] gathered for
    `positions`), rotated k and raw v written into the caches [B, kv, L, D] at `positions` [T] (a
    device tensor), q returned as [B, q, T, D] (a view of a [B, T, q, D] buffer). q_norm / k_norm
    (Qwen3, both or neither): RMSNorm weights [D] applied per head first. One launch."""
    b, t, width = qkv.shape
    heads = q_heads + 2 * kv_heads
    if width != heads * head_dim or head_dim % 2:
        raise ValueError(
            f"qkv of width {width} is not ({q_heads} + 2 x {kv_heads}) heads x {head_dim} "
            "(an even head size)"
        )
    for name, table in (("cos", cos), ("sin", sin)):
        if table.shape != (t, head_dim) or table.stride(1) != 1:
            raise ValueError(f"{name} must be [T={t}, D={head_dim}], got {tuple(table.shape)}")
    if positions.shape != (t,) or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"positions must be an integer tensor [T={t}], got {positions.shape}")
    _check_caches(k_cache, v_cache, b, kv_heads, head_dim)
    norms = [n for n in (q_norm, k_norm) if n is not None]
    if len(norms) == 1 or any(n.shape != (head_dim,) for n in norms):
        raise ValueError(f"q and k norm weights come together, each [D={head_dim}]")
    _float_ok(qkv, cos, sin, k_cache, v_cache, *norms)
    if positions.device != qkv.device:
        raise ValueError("positions must be on the device of qkv")
    if qkv.stride(2) != 1:
        qkv = qkv.contiguous()
    q = torch.empty(b, t, q_heads, head_dim, dtype=qkv.dtype, device=qkv.device).transpose(1, 2)
    block_d = triton.next_power_of_2(head_dim)
    block_h = max(1, min(triton.next_power_of_2(heads), 4096 // block_d))
    if b * t:
        _rope_kv_kernel[(b * t, triton.cdiv(heads, block_h))](
            qkv, cos, sin, positions, k_cache, v_cache, q,
            q_norm if q_norm is not None else qkv, k_norm if k_norm is not None else qkv,
            t, q_heads, kv_heads, head_dim, float(eps),
            qkv.stride(0), qkv.stride(1), cos.stride(0), sin.stride(0),
            *k_cache.stride()[:3], *v_cache.stride()[:3], *q.stride()[:3],
            HAS_QK_NORM=q_norm is not None,
            BLOCK_H=block_h, BLOCK_D=block_d, num_warps=1 if INTERPRET else 4,
            **pdl_options(q.device),
        )  # fmt: skip
    return q


# ---------------------------------------------------------------------------------------------
# Attention over the static cache


@triton.jit
def _attention_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, o_ptr, acc_ptr, m_ptr, l_ptr,
    HKV, GROUPS, T, L, D, CHUNK, SPLITS, qk_scale, window,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl, stride_ob, stride_oh, stride_ot,
    HAS_WINDOW: tl.constexpr, SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """Programs: (batch x kv head, tile of BLOCK_M query rows, key chunk). Row r of a kv head is
    query token r // GROUPS of its query head r % GROUPS, so one key/value block serves them all.
    Scores are in base-2 units (qk_scale includes log2(e))."""
    pdl_trigger(PDL)
    pdl_wait(PDL)
    bh = tl.program_id(0)
    b = (bh // HKV).to(tl.int64)
    kvh = bh % HKV
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(2)
    row_ok = rows < GROUPS * T
    t = rows // GROUPS
    head = kvh * GROUPS + rows % GROUPS
    pos = tl.load(pos_ptr + t, mask=row_ok, other=0).to(tl.int32)
    start = split * CHUNK
    end = tl.minimum(tl.minimum(start + CHUNK, tl.max(tl.where(row_ok, pos, -1), axis=0) + 1), L)
    lo = start
    if HAS_WINDOW:  # blocks before every row's window are skipped (lo stays BLOCK_N-aligned)
        first = tl.min(tl.where(row_ok, pos, L), axis=0) - window + 1
        lo = tl.maximum(start, (tl.maximum(first, 0) // BLOCK_N) * BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    q_rows = q_ptr + b * stride_qb + head[:, None] * stride_qh + t[:, None] * stride_qt
    q = tl.load(q_rows + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_head = k_ptr + b * stride_kb + kvh * stride_kh
    v_head = v_ptr + b * stride_vb + kvh * stride_vh
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - 1.0e30  # finite: fully masked rows stay 0
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for n in range(lo, end, BLOCK_N):
        keys = n + tl.arange(0, BLOCK_N)
        visible = row_ok[:, None] & (keys[None, :] <= pos[:, None]) & (keys[None, :] < end)
        if HAS_WINDOW:
            visible = visible & (keys[None, :] > pos[:, None] - window)
        # only keys some row sees are read: what lies elsewhere in the cache never matters
        key_ok = tl.max(visible.to(tl.int32), axis=0) > 0
        kv_mask = key_ok[:, None] & d_ok[None, :]
        k = tl.load(k_head + keys[:, None] * stride_kl + d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_head + keys[:, None] * stride_vl + d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    if SPLIT:  # partial softmax of this chunk: [B * kv, rows, SPLITS] (+ D for acc)
        if lo < end:
            slot = (bh.to(tl.int64) * GROUPS * T + rows) * SPLITS + split
            tl.store(m_ptr + slot, m_i, mask=row_ok)
            tl.store(l_ptr + slot, l_i, mask=row_ok)
            tl.store(acc_ptr + slot[:, None] * D + d[None, :], acc,
                     mask=row_ok[:, None] & d_ok[None, :])  # fmt: skip
    else:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # (padding rows see nothing)
        o_rows = o_ptr + b * stride_ob + head[:, None] * stride_oh + t[:, None] * stride_ot
        tl.store(o_rows + d[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & d_ok[None, :])  # fmt: skip


@triton.jit
def _combine_kernel(
    acc_ptr, m_ptr, l_ptr, pos_ptr, o_ptr,
    HKV, GROUPS, T, D, CHUNK, SPLITS, window,
    stride_ob, stride_oh, stride_ot,
    HAS_WINDOW: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """One query row: the softmax-weighted sum of the partials of the chunks it sees (exactly
    those the attention kernel wrote for it: others are never read)."""
    pdl_trigger(PDL)
    pdl_wait(PDL)
    pid = tl.program_id(0)
    rows = GROUPS * T
    bh = pid // rows
    row = pid % rows
    t = row // GROUPS
    b = (bh // HKV).to(tl.int64)
    head = (bh % HKV) * GROUPS + row % GROUPS
    pos = tl.load(pos_ptr + t).to(tl.int32)
    hi = tl.minimum(pos // CHUNK + 1, SPLITS)  # chunks holding keys <= pos
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(pos - window + 1, 0) // CHUNK
    base = pid.to(tl.int64) * SPLITS
    splits = tl.arange(0, BLOCK_S)
    m_max = tl.zeros([BLOCK_S], dtype=tl.float32) - 1.0e30
    for s0 in range(lo, hi, BLOCK_S):
        ok = (s0 + splits) < hi
        m_max = tl.maximum(m_max, tl.load(m_ptr + base + s0 + splits, mask=ok, other=-1.0e30))
    m = tl.max(m_max, axis=0)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    total = tl.zeros([BLOCK_S], dtype=tl.float32)
    acc = tl.zeros([BLOCK_S, BLOCK_D], dtype=tl.float32)
    for s0 in range(lo, hi, BLOCK_S):
        ok = (s0 + splits) < hi
        w = tl.exp2(tl.load(m_ptr + base + s0 + splits, mask=ok, other=float("-inf")) - m)
        total += w * tl.load(l_ptr + base + s0 + splits, mask=ok, other=0.0)
        part = tl.load(acc_ptr + (base + s0 + splits)[:, None] * D + d[None, :],
                       mask=ok[:, None] & d_ok[None, :], other=0.0)  # fmt: skip
        acc += w[:, None] * part
    out = tl.sum(acc, axis=0) / tl.sum(total, axis=0)
    o_row = o_ptr + b * stride_ob + head * stride_oh + t * stride_ot
    tl.store(o_row + d, out.to(o_ptr.dtype.element_ty), mask=d_ok)


def _attention_blocks(device: torch.device, rows: int, batch_heads: int) -> tuple[int, int, bool]:
    """(BLOCK_M, BLOCK_N, split): split-K when the query-row tiles alone leave the GPU idle."""
    if INTERPRET:
        return 16, 16, rows <= 16
    block_m = 16 if rows <= 16 else 64
    tiles = batch_heads * triton.cdiv(rows, block_m)
    return block_m, 64, rows <= 16 and tiles < 2 * sm_count(device)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    positions: torch.Tensor,
    scale: float,
    groups: int,
    window: int | None = None,
    chunk: int | None = None,
) -> torch.Tensor:
    """Grouped-query attention of q [B, groups * kv, T, D] over the caches [B, kv, L, D] (never
    repeated): query t sees the keys at cache positions p <= positions[t] (and, with a sliding
    `window`, p > positions[t] - window); fp32 softmax, out [B, q heads, T, D] in q's dtype (a view
    of a [B, T, q, D] buffer, so merging the heads afterwards is free).

    Few query rows (decode): the key range is split into chunks of `chunk` keys (default:
    _key_chunk's), one program each, then combined; chunks past the furthest
    position return at once. Many rows (prefill): one program per tile of rows walks the keys up
    to its last position. `chunk` >= L forces one pass (tests)."""
    b, q_heads, t, dim = q.shape
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"caches must be [B, kv, L, D] alike: {k_cache.shape}, {v_cache.shape}")
    _, kv_heads, length, _ = k_cache.shape
    if (k_cache.shape[0], k_cache.shape[3]) != (b, dim) or q_heads != kv_heads * groups:
        raise ValueError(
            f"q {tuple(q.shape)} does not match caches {tuple(k_cache.shape)} with {groups} "
            "query heads per kv head"
        )
    if positions.shape != (t,) or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"positions must be an integer tensor [T={t}], got {positions.shape}")
    if window is not None and window < 1:
        raise ValueError(f"sliding window {window} must be at least 1")
    _float_ok(q, k_cache, v_cache)
    if len({q.dtype, k_cache.dtype, v_cache.dtype}) > 1 or positions.device != q.device:
        raise ValueError("q and the caches must share a dtype, and positions their device")
    if q.stride(3) != 1 or k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("q and the caches need unit stride along the head dim")
    rows = groups * t
    block_m, block_n, split = _attention_blocks(q.device, rows, b * kv_heads)
    if chunk is None:
        chunk = _key_chunk(q.device, length, block_n, b * kv_heads)
    else:
        split = True
        chunk = block_n * triton.cdiv(chunk, block_n)
    splits = triton.cdiv(length, chunk) if split else 1
    if splits == 1:
        chunk = block_n * triton.cdiv(length, block_n)
    out = torch.empty(b, t, q_heads, dim, dtype=q.dtype, device=q.device).transpose(1, 2)
    if out.numel() == 0:
        return out
    block_d = max(16, triton.next_power_of_2(dim))
    if splits > 1:
        acc = torch.empty(b * kv_heads * rows * splits, dim, dtype=torch.float32, device=q.device)
        m = torch.empty(b * kv_heads * rows * splits, dtype=torch.float32, device=q.device)
        lse = torch.empty_like(m)
    else:
        acc = m = lse = out
    grid = (b * kv_heads, triton.cdiv(rows, block_m), splits)
    _attention_kernel[grid](
        q, k_cache, v_cache, positions, out, acc, m, lse,
        kv_heads, groups, t, length, dim, chunk, splits, float(scale) * LOG2E, window or 0,
        *q.stride()[:3], *k_cache.stride()[:3], *v_cache.stride()[:3], *out.stride()[:3],
        HAS_WINDOW=window is not None, SPLIT=splits > 1,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=1 if INTERPRET else 4,
        **pdl_options(q.device),
    )  # fmt: skip
    if splits > 1:
        _combine_kernel[(b * kv_heads * rows,)](
            acc, m, lse, positions, out,
            kv_heads, groups, t, dim, chunk, splits, window or 0, *out.stride()[:3],
            HAS_WINDOW=window is not None, BLOCK_S=min(16, triton.next_power_of_2(splits)),
            BLOCK_D=block_d, num_warps=1 if INTERPRET else 4, **pdl_options(q.device),
        )  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------
# A decode token's attention: rotary + cache write + split attention in one launch, then combine


@triton.jit
def _rotate(x_ptrs, d, partner, sign, mask, cos, sin):
    """_rotary of the rows at x_ptrs [R, 1] (elements d), loaded here."""
    x = tl.load(x_ptrs + d[None, :], mask=mask, other=0.0)
    xp = tl.load(x_ptrs + partner[None, :], mask=mask, other=0.0)
    return _rotary(x, xp, sign, cos, sin)


@triton.jit
def _softmax_block(q, k, v, key_ok, row_ok, m_i, l_i, acc, qk_scale, is_new, mine, k_new, v_new,
                   DOT_PRECISION: tl.constexpr):  # fmt: skip
    """One block of keys into the running softmax (m_i, l_i, acc) of the rows of q; keys not
    key_ok count for nothing (their rows of k and v must be loaded as 0: a stale cache row may
    hold NaN). The new key (column is_new, when `mine`) is not in k and v (its rows loaded as 0)
    but in k_new / v_new [1, D]: its score and value are added apart, so no select runs over
    the block's elements (session 21: those selects were most of the kernel's instructions)."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if mine:
        s_new = tl.sum(q.to(tl.float32) * k_new.to(tl.float32), axis=1)
        s = tl.where(is_new[None, :], s_new[:, None], s)
    s = tl.where(row_ok[:, None] & key_ok[None, :], s * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    p = p.to(v.dtype)
    acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)
    if mine:
        p_new = tl.sum(tl.where(is_new[None, :], p.to(tl.float32), 0.0), axis=1)
        acc += p_new[:, None] * v_new.to(tl.float32)
    return m_new, l_i, acc


@triton.jit
def _rope_attention_kernel(
    qkv_ptr, cos_ptr, sin_ptr, pos_ptr, k_ptr, v_ptr, o_ptr, acc_ptr, m_ptr, l_ptr, cnt_ptr,
    HQ, HKV, GROUPS, L, D, CHUNK, SPLITS, qk_scale, window,
    stride_xb, stride_cos, stride_sin, stride_kb, stride_kh, stride_kl, stride_vb, stride_vh,
    stride_vl, stride_ob, stride_oh,
    HAS_WINDOW: tl.constexpr, TICKET: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, RB: tl.constexpr,
    S2: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """Programs: (batch x kv head, key chunk) of one decode token at position pos.

    Before the wait for the previous kernel (the q/k/v projection) a program reads what that
    kernel does not write: pos, the cos / sin tables' rows pos, and the first block of its chunk's cached
    keys and values (rows below pos, written by earlier steps; row pos is taken from registers).
    After it: its kv head's GROUPS query heads, rotated; the chunk holding pos also rotates the
    new key and writes it and the new value into the caches. Every chunk stores its partial
    softmax (an empty one past pos or before the window), so the combine needs no position:
    TICKET, the last chunk of a (batch, kv head) to arrive (a CTA barrier, then one acq_rel
    atomic) combines them and resets the counter; else _combine_all_kernel's launch does."""
    pdl_trigger(PDL)
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (bh // HKV).to(tl.int64)
    kvh = bh % HKV
    start = split * CHUNK
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    pos = tl.load(pos_ptr).to(tl.int32)
    cos = tl.load(cos_ptr + pos * stride_cos + d, mask=d_ok, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + pos * stride_sin + d, mask=d_ok, other=0.0).to(tl.float32)
    end = tl.minimum(tl.minimum(start + CHUNK, pos + 1), L)
    first = 0
    if HAS_WINDOW:
        first = pos - window + 1
    k_head = k_ptr + b * stride_kb + kvh * stride_kh
    v_head = v_ptr + b * stride_vb + kvh * stride_vh
    keys0 = start + tl.arange(0, BLOCK_N)
    key_ok = (keys0 < end) & (keys0 >= first)
    old = (key_ok & (keys0 != pos))[:, None] & d_ok[None, :]
    k0 = tl.load(k_head + keys0[:, None] * stride_kl + d[None, :], mask=old, other=0.0)
    v0 = tl.load(v_head + keys0[:, None] * stride_vl + d[None, :], mask=old, other=0.0)
    pdl_wait(PDL)
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < GROUPS
    half = D // 2
    partner = tl.where(d < half, d + half, d - half)
    sign = tl.where(d < half, -1.0, 1.0)
    x_row = qkv_ptr + b * stride_xb
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - 1.0e30
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if start < end:  # chunks past pos or wholly before the window store an empty softmax
        q_rows = x_row + ((kvh * GROUPS + rows) * D)[:, None]
        q = _rotate(q_rows, d, partner, sign, row_ok[:, None] & d_ok[None, :], cos, sin)
        one = tl.arange(0, 1)
        mine = (start <= pos) & (pos < start + CHUNK)
        here = start + one  # [1]: a vector mask (the interpreter takes no scalar in one)
        new_ok = ((here <= pos) & (pos < here + CHUNK))[:, None] & d_ok[None, :]
        k_new = _rotate(x_row + ((HQ + kvh) * D + one)[:, None], d, partner, sign, new_ok, cos,
                        sin)  # fmt: skip
        v_new = tl.load(x_row + ((HQ + HKV + kvh) * D + one)[:, None] + d[None, :], mask=new_ok,
                        other=0.0)  # fmt: skip
        if mine:
            tl.store(k_head + pos.to(tl.int64) * stride_kl + one[:, None] + d[None, :],
                     k_new.to(k_ptr.dtype.element_ty), mask=new_ok)  # fmt: skip
            tl.store(v_head + pos.to(tl.int64) * stride_vl + one[:, None] + d[None, :],
                     v_new.to(v_ptr.dtype.element_ty), mask=new_ok)  # fmt: skip
        new0 = mine & (start + BLOCK_N > pos)  # the new key in the first block
        m_i, l_i, acc = _softmax_block(q, k0, v0, key_ok, row_ok, m_i, l_i, acc, qk_scale,
                                       keys0 == pos, new0, k_new, v_new,
                                       DOT_PRECISION)  # fmt: skip
        # the chunk's other blocks (long caches: chunks of several blocks), from the window's
        lo = tl.maximum(start + BLOCK_N, (tl.maximum(first, 0) // BLOCK_N) * BLOCK_N)
        for n in range(lo, end, BLOCK_N):
            keys = n + tl.arange(0, BLOCK_N)
            key_ok = (keys < end) & (keys >= first)
            kv_mask = (key_ok & (keys != pos))[:, None] & d_ok[None, :]
            k = tl.load(k_head + keys[:, None] * stride_kl + d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_head + keys[:, None] * stride_vl + d[None, :], mask=kv_mask, other=0.0)
            m_i, l_i, acc = _softmax_block(q, k, v, key_ok, row_ok, m_i, l_i, acc, qk_scale,
                                           keys == pos, (n <= pos) & (pos < n + BLOCK_N), k_new,
                                           v_new, DOT_PRECISION)  # fmt: skip
    o_head = o_ptr + b * stride_ob + kvh * GROUPS * stride_oh
    if SPLITS == 1:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(o_head + rows[:, None] * stride_oh + d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])  # fmt: skip
    else:
        slot = (bh.to(tl.int64) * GROUPS + rows) * SPLITS + split
        tl.store(m_ptr + slot, m_i, mask=row_ok)
        tl.store(l_ptr + slot, l_i, mask=row_ok)
        tl.store(acc_ptr + slot[:, None] * D + d[None, :], acc,
                 mask=row_ok[:, None] & d_ok[None, :])  # fmt: skip
        if TICKET:
            tl.debug_barrier()
            ticket = tl.atomic_add(cnt_ptr + bh, 1, sem="acq_rel", scope="gpu")
            if ticket == SPLITS - 1:
                tl.debug_barrier()
                _combine_chunks(acc_ptr, m_ptr, l_ptr, o_head, bh, 0, GROUPS, GROUPS, D, SPLITS,
                                stride_oh, d, d_ok, BLOCK_D, RB, S2)  # fmt: skip
                tl.atomic_xchg(cnt_ptr + bh, 0, sem="relaxed", scope="gpu")


@triton.jit
def _combine_chunks(acc_ptr, m_ptr, l_ptr, o_head, bh, r_lo, r_hi, GROUPS, D, SPLITS, stride_oh,
                    d, d_ok, BLOCK_D: tl.constexpr, RB: tl.constexpr, S2: tl.constexpr):  # fmt: skip
    """The softmax-weighted sum of the SPLITS chunks' partials for query heads r_lo .. r_hi - 1
    of kv head `bh`'s GROUPS: RB rows at a time, S2 chunks a load (one pass, rescaled as the
    maximum grows; .cg loads: the partials come from other SMs)."""
    s2 = tl.arange(0, S2)
    for r0 in range(r_lo, r_hi, RB):
        r = r0 + tl.arange(0, RB)
        r_ok = r < r_hi
        base = (bh.to(tl.int64) * GROUPS + r) * SPLITS
        m_run = tl.zeros([RB], dtype=tl.float32) - 1.0e30
        total = tl.zeros([RB], dtype=tl.float32)
        acc = tl.zeros([RB, BLOCK_D], dtype=tl.float32)
        for s0 in range(0, SPLITS, S2):
            ok = r_ok[:, None] & ((s0 + s2) < SPLITS)[None, :]
            idx = base[:, None] + s0 + s2[None, :]
            m = tl.load(m_ptr + idx, mask=ok, other=-1.0e30, cache_modifier=".cg")
            lse = tl.load(l_ptr + idx, mask=ok, other=0.0, cache_modifier=".cg")
            part = tl.load(acc_ptr + idx[:, :, None] * D + d[None, None, :],
                           mask=ok[:, :, None] & d_ok[None, None, :], other=0.0,
                           cache_modifier=".cg")  # fmt: skip
            m_new = tl.maximum(m_run, tl.max(m, axis=1))
            alpha = tl.exp2(m_run - m_new)
            w = tl.exp2(m - m_new[:, None])
            total = total * alpha + tl.sum(w * lse, axis=1)
            acc = acc * alpha[:, None] + tl.sum(w[:, :, None] * part, axis=1)
            m_run = m_new
        out = acc / tl.where(total > 0, total, 1.0)[:, None]
        tl.store(o_head + r[:, None] * stride_oh + d[None, :],
                 out.to(o_head.dtype.element_ty), mask=r_ok[:, None] & d_ok[None, :])  # fmt: skip


@triton.jit
def _combine_all_kernel(
    acc_ptr, m_ptr, l_ptr, o_ptr, HKV, GROUPS, D, SPLITS, stride_ob, stride_oh,
    BLOCK_D: tl.constexpr, RB: tl.constexpr, S2: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """Programs: (batch x kv head, RB of its query heads): _combine_chunks over every chunk's
    partial (all stored, empty ones included), no position needed."""
    pdl_trigger(PDL)
    pdl_wait(PDL)
    bh = tl.program_id(0)
    r_lo = tl.program_id(1) * RB
    d = tl.arange(0, BLOCK_D)
    o_head = o_ptr + (bh // HKV).to(tl.int64) * stride_ob + (bh % HKV) * GROUPS * stride_oh
    _combine_chunks(acc_ptr, m_ptr, l_ptr, o_head, bh, r_lo, tl.minimum(r_lo + RB, GROUPS),
                    GROUPS, D, SPLITS, stride_oh, d, d < D, BLOCK_D, RB, S2)  # fmt: skip


# FFNSPLIT_DECODE_ATTENTION: how StaticDecoder runs a decode token's attention: "fused"
# (rope_attention, then its combine launch), "ticket" (rope_attention, its last chunk
# combining), "unfused" (rope_kv_write, then decode_attention: three launches)
ROPE_ATTENTION_MODES = ("fused", "ticket", "unfused")
# rope_attention's keys a block and warps a program (benchmarks/bench_attention.py --block-n /
# --warps and oracle_decode.py's attn_n<keys>w<warps> variants sweep them; the interpreter
# takes 16 keys, 1 warp). H200, session 21, Llama-3-8B decode step (640-key cache): 32 keys
# and 4 warps took ~95 us a step less than 64 keys in both models (64 keys: 255 registers
# with spills and 96 KB of shared memory, sm_90), 16 keys and 2 warps within 5-17 us of it.
# Warps: 0 (the default) picks them by the grid (_rope_attention_warps); a number forces it.
ROPE_ATTENTION_BLOCK_N = int(os.environ.get("FFNSPLIT_ROPE_ATTENTION_BLOCK_N", "32"))
ROPE_ATTENTION_WARPS = int(os.environ.get("FFNSPLIT_ROPE_ATTENTION_WARPS", "0"))


def _rope_attention_warps(device: torch.device, programs: int, blocks: int) -> int:
    """4 warps a program when each of at most two programs an SM takes one block of keys, else
    2. H200, session 22, Llama-3-8B decode step, one block a program: a 640-key cache (160
    programs) took 6-10 us a step less with 4 warps; 2,112 and 4,096 keys (528 and 1,024
    programs: past the ~3 programs of 4 warps an SM that 168 registers allow) 83-97 us less with
    2, in both models. Several blocks a program (session 22's chunks): 2 warps 0.8 us a layer
    ahead at 4,096 and 8,192 keys."""
    return 4 if programs <= 2 * sm_count(device) and blocks == 1 else 2


def rope_attention(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    q_heads: int,
    kv_heads: int,
    head_dim: int,
    scale: float,
    window: int | None = None,
    chunk: int | None = None,
    ticket: bool = False,
) -> torch.Tensor:
    """One decode token: rope_kv_write then decode_attention without the q round trip or the
    rotary launch. qkv [B, 1, (q + 2 kv) * D], positions [1], cos / sin the rotary tables [P, D]
    of every position (row positions[0] is read on the device: P is not checked against it, as
    nothing here waits for the device); the new key and value are written into the caches
    [B, kv, L, D] at positions[0]; returns out [B, q heads, 1, D] laid out as
    decode_attention's. No q/k norms (Qwen3 takes the two-launch path). Key
    chunks of `chunk` keys (default: _key_chunk's) are combined by a second
    launch, or with `ticket` by each kv head's last chunk to finish.

    Under PDL the kernel reads positions, cos, sin and its first cache block before it waits for
    the previous kernel: that kernel must not write them (in a decode step the q/k/v projection
    comes just before this one)."""
    b, t, width = qkv.shape
    if t != 1:
        raise ValueError(f"rope_attention takes one decode token, got {t}: use rope_kv_write")
    if width != (q_heads + 2 * kv_heads) * head_dim or head_dim % 2 or q_heads % kv_heads:
        raise ValueError(
            f"qkv of width {width} is not ({q_heads} + 2 x {kv_heads}) heads x {head_dim} "
            "(an even head size, whole groups of query heads)"
        )
    groups = q_heads // kv_heads
    if groups > 16:
        raise ValueError(f"{groups} query heads per kv head: at most 16 (use decode_attention)")
    for name, table in (("cos", cos), ("sin", sin)):
        if table.dim() != 2 or table.shape[1] != head_dim or table.stride(1) != 1:
            raise ValueError(f"{name} must be a table [P, D={head_dim}], got {tuple(table.shape)}")
    if positions.shape != (1,) or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"positions must be an integer tensor [1], got {positions.shape}")
    if window is not None and window < 1:
        raise ValueError(f"sliding window {window} must be at least 1")
    _check_caches(k_cache, v_cache, b, kv_heads, head_dim)
    _float_ok(qkv, cos, sin, k_cache, v_cache)
    if len({qkv.dtype, k_cache.dtype, v_cache.dtype}) > 1 or positions.device != qkv.device:
        raise ValueError("qkv and the caches must share a dtype, and positions their device")
    from ffnsplit.kernels.gemv import _zeroed  # the tickets' counters

    if qkv.stride(2) != 1:
        qkv = qkv.contiguous()
    length = k_cache.shape[2]
    block_n = 16 if INTERPRET else ROPE_ATTENTION_BLOCK_N
    if chunk is None:
        chunk = _key_chunk(qkv.device, length, block_n, b * kv_heads)
    chunk = block_n * triton.cdiv(chunk, block_n)
    splits = triton.cdiv(length, chunk)
    out = torch.empty(b, 1, q_heads, head_dim, dtype=qkv.dtype, device=qkv.device).transpose(1, 2)
    if out.numel() == 0:
        return out
    block_d = max(16, triton.next_power_of_2(head_dim))
    rb = 1 if not ticket else min(triton.next_power_of_2(groups), 4)
    s2 = max(1, min(triton.next_power_of_2(splits), 8192 // (rb * block_d)))
    parts = b * kv_heads * groups * splits
    if splits > 1:
        acc = torch.empty(parts, head_dim, dtype=torch.float32, device=qkv.device)
        m = torch.empty(parts, dtype=torch.float32, device=qkv.device)
        lse = torch.empty_like(m)
        counters = _zeroed(qkv.device, b * kv_heads, torch.int32) if ticket else m
    else:
        acc = m = lse = counters = out
    warps = ROPE_ATTENTION_WARPS or _rope_attention_warps(
        qkv.device, b * kv_heads * splits, chunk // block_n
    )
    warps = 1 if INTERPRET else warps
    _rope_attention_kernel[(b * kv_heads, splits)](
        qkv, cos, sin, positions, k_cache, v_cache, out, acc, m, lse, counters,
        q_heads, kv_heads, groups, length, head_dim, chunk, splits, float(scale) * LOG2E,
        window or 0, qkv.stride(0), cos.stride(0), sin.stride(0), *k_cache.stride()[:3],
        *v_cache.stride()[:3], out.stride(0), out.stride(1),
        HAS_WINDOW=window is not None, TICKET=ticket,
        DOT_PRECISION="ieee" if qkv.dtype == torch.float32 else "tf32",
        BLOCK_M=16, BLOCK_N=block_n, BLOCK_D=block_d, RB=rb, S2=s2,
        num_warps=warps, **pdl_options(qkv.device),
    )  # fmt: skip
    if splits > 1 and not ticket:
        _combine_all_kernel[(b * kv_heads, triton.cdiv(groups, rb))](
            acc, m, lse, out, kv_heads, groups, head_dim, splits, out.stride(0), out.stride(1),
            BLOCK_D=block_d, RB=rb, S2=s2, num_warps=warps, **pdl_options(qkv.device),
        )  # fmt: skip
    return out
