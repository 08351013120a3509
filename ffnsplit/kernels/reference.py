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
