"""Torch reference of every kernel op, same signatures as the Triton launchers.

This is also the CPU execution path (ops.py `backend="torch"`): weights are dequantized once per
call into x's dtype and the products run through torch's own matmul. Nothing is cached between
calls.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ffnsplit.kernels.format import QuantizedWeight, SplitFFNWeights

ACTIVATION_NAMES = ("silu", "gelu", "gelu_tanh", "relu")


def apply_activation(name: str, t: torch.Tensor) -> torch.Tensor:
    """The FFN nonlinearity `name` (silu, gelu (erf), gelu_tanh, relu) applied to `t`."""
    if name == "silu":
        return F.silu(t)
    if name == "gelu":
        return F.gelu(t)
    if name == "gelu_tanh":
        return F.gelu(t, approximate="tanh")
    if name == "relu":
        return F.relu(t)
    raise ValueError(f"unknown activation {name!r}: choose one of {', '.join(ACTIVATION_NAMES)}")


def _dense_weight(
    heavy: torch.Tensor | None, light: QuantizedWeight | None, dim: int, dtype: torch.dtype
) -> torch.Tensor:
    """[heavy | dequantized light] joined along `dim` (0: neurons are rows, 1: columns)."""
    parts = []
    if heavy is not None:
        parts.append(heavy.to(dtype))
    if light is not None:
        parts.append(light.dequantize(dtype))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def split_linear(
    x: torch.Tensor,
    heavy: torch.Tensor | None,
    light: QuantizedWeight | None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x[..., :kh] @ heavy^T + x[..., kh:] @ light.dequantize()^T + bias, in x's dtype."""
    if heavy is None and light is None:
        raise ValueError("split_linear needs a dense or a quantized part")
    weight = _dense_weight(heavy, light, 1, x.dtype)
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))


def quant_matmul(
    x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x [..., K] @ qw.dequantize().T (+ bias) -> [..., N] in x's dtype."""
    return split_linear(x, None, qw, bias)


def split_activations(x: torch.Tensor, w: SplitFFNWeights) -> torch.Tensor:
    """a = act(gate x + gate_bias) * (up x + up_bias) (or act(up x + up_bias)), [..., h + l]."""
    up = F.linear(x, _dense_weight(w.heavy_up, w.light_up, 0, x.dtype), _cast(w.up_bias, x))
    if not w.gated:
        return apply_activation(w.activation, up)
    gate = F.linear(x, _dense_weight(w.heavy_gate, w.light_gate, 0, x.dtype), _cast(w.gate_bias, x))
    return apply_activation(w.activation, gate) * up


def split_ffn(x: torch.Tensor, w: SplitFFNWeights) -> torch.Tensor:
    """The split FFN y = down a + down_bias, a from `split_activations` (x [..., H] -> [..., H])."""
    return split_linear(split_activations(x, w), w.heavy_down, w.light_down, w.down_bias)


def _cast(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    return None if t is None else t.to(like.dtype)


# ---------------------------------------------------------------------------------------------
# Decode plumbing (kernels/decode_ops.py): Hugging Face's order of operations and casts


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm: weight * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(x.dtype)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(residual + x), residual + x): a residual add (in x's dtype) and the next norm."""
    new_residual = residual + x
    return rms_norm(new_residual, weight, eps), new_residual


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[-x2, x1] for x = [x1, x2] split along the last dim (Hugging Face's rotary convention)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


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
    """Rotary on the q and k heads of qkv [B, T, (q + 2 kv) * D] (cos, sin [T, D]), rotated k and
    raw v written into the caches [B, kv, L, D] at `positions` [T]; returns q [B, q, T, D].
    q_norm / k_norm (Qwen3): an RMSNorm weight [D] applied per head before the rotary."""
    b, t, _ = qkv.shape
    heads = qkv.view(b, t, q_heads + 2 * kv_heads, head_dim)
    q, k = heads[:, :, :q_heads], heads[:, :, q_heads : q_heads + kv_heads]
    v = heads[:, :, q_heads + kv_heads :]
    if q_norm is not None:
        q = rms_norm(q, q_norm, eps)
    if k_norm is not None:
        k = rms_norm(k, k_norm, eps)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    k_cache.index_copy_(2, positions, k.to(k_cache.dtype))
    v_cache.index_copy_(2, positions, v.transpose(1, 2).to(v_cache.dtype))
    return q


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
    """Grouped-query attention of q [B, groups * kv, T, D] over the caches [B, kv, L, D]: query t
    sees the keys at cache positions p <= positions[t] (and p > positions[t] - window). fp32
    softmax; out [B, q heads, T, D] in q's dtype. `chunk` (the kernel's split) is ignored."""
    keys = k_cache.float().repeat_interleave(groups, dim=1)
    values = v_cache.float().repeat_interleave(groups, dim=1)
    scores = (q.float() @ keys.transpose(-1, -2)) * scale
    index = torch.arange(k_cache.shape[2], device=q.device)
    visible = index[None, :] <= positions[:, None]
    if window is not None:
        visible &= index[None, :] > positions[:, None] - window
    probs = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)
    return (probs @ values).to(q.dtype)


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
    """One decode token's rope_kv_write then decode_attention (cos / sin: tables [P, D] over
    positions, row positions[0] used; the caches written at positions); `chunk` and `ticket`
    (the kernel's split and combine) are ignored."""
    cos, sin = cos.index_select(0, positions), sin.index_select(0, positions)
    q = rope_kv_write(qkv, cos, sin, positions, k_cache, v_cache, q_heads, kv_heads, head_dim)
    return decode_attention(q, k_cache, v_cache, positions, scale, q_heads // kv_heads, window)
