"""Round-to-nearest group quantization into the packed format, plus error and size accounting.

Grid conventions (shared with GPTQ, see `group_grid`):
- asymmetric: the group's range is widened to contain 0 (as in GPTQ's reference quantizer), so the
  zero point `round(-min / scale)` is always an integer in [0, 2^bits - 1] and every value of the
  group is representable. The zero point is stored in `scale_dtype`; it is integer-valued, and
  integers up to 255 are exact in fp16, bf16 and fp32.
- symmetric: scale = absmax / (2^(bits-1) - 1), codes offset by 2^(bits-1).
- scales are rounded *up* to `scale_dtype` and the codes are computed with the stored scale, so
  `QuantizedWeight.dequantize()` reproduces exactly the grid that was optimized and no value of the
  group falls outside it (|w - dequant| <= scale / 2 up to fp32 arithmetic).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ffnsplit.errors import NumericalError, OptionError
from ffnsplit.kernels.format import (
    PACK_ALIGN,
    PLANES,
    SUPPORTED_BITS,
    QuantizedWeight,
    n_groups,
    pack_planes,
)

SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def validate_quant_options(
    k: int, bits: int, group_size: int, scale_dtype: torch.dtype = torch.float16
) -> None:
    """Raise OptionError unless (K, bits, group size, scale dtype) fit the packed format."""
    if bits not in SUPPORTED_BITS:
        raise OptionError(
            f"unsupported bit width {bits}: choose one of {', '.join(map(str, SUPPORTED_BITS))}"
        )
    if k <= 0 or k % PACK_ALIGN:
        raise OptionError(
            f"input dimension K={k} is not a multiple of {PACK_ALIGN}: the packed format needs "
            "it; keep this weight dense or pad it"
        )
    if group_size <= 0 or (group_size < k and group_size % PACK_ALIGN):
        raise OptionError(
            f"group size {group_size} is not a multiple of {PACK_ALIGN}: use 32, 64, 128, ... "
            f"or a size >= K={k} for one group per output channel"
        )
    if scale_dtype not in SCALE_DTYPES:
        raise OptionError(
            f"unsupported scale dtype {scale_dtype}: use torch.float16, torch.bfloat16 or "
            "torch.float32"
        )


def check_finite(t: torch.Tensor, what: str) -> None:
    """Raise NumericalError naming `what` if `t` holds NaN or Inf."""
    if not bool(torch.isfinite(t).all()):
        raise NumericalError(f"NaN or Inf found in {what}: check the model weights and inputs")


def _store_scale(scale: torch.Tensor, scale_dtype: torch.dtype) -> torch.Tensor:
    """`scale` rounded up to the nearest `scale_dtype` value, returned as fp32."""
    stored = scale.to(scale_dtype)
    if scale_dtype != torch.float32:
        below = stored.to(torch.float32) < scale
        stored = torch.where(
            below, torch.nextafter(stored, torch.full_like(stored, math.inf)), stored
        )
    stored = stored.to(torch.float32)
    if not bool(torch.isfinite(stored).all()):
        raise OptionError(
            f"a quantization scale overflows {scale_dtype}: use scale_dtype=torch.float32"
        )
    return stored


def group_grid(
    w: torch.Tensor, bits: int, symmetric: bool, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Grid of each group along the last dim of fp32 `w`: (stored scale, zero point or None)."""
    if symmetric:
        scale = w.abs().amax(dim=-1) / (2 ** (bits - 1) - 1)
        return _store_scale(scale, scale_dtype), None
    qmax = 2**bits - 1
    low = w.amin(dim=-1).clamp(max=0.0)
    high = w.amax(dim=-1).clamp(min=0.0)
    scale = _store_scale((high - low) / qmax, scale_dtype)
    zero = torch.round(-low / torch.where(scale > 0, scale, 1.0)).clamp(0, qmax)
    return scale, zero


def quantize_codes(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int
) -> torch.Tensor:
    """Nearest codes (fp32, integer-valued) of `w` on the grid (scale, zero); broadcasts."""
    offset = zero if zero is not None else 2.0 ** (bits - 1)
    q = torch.round(w / torch.where(scale > 0, scale, 1.0)) + offset
    return q.clamp(0, 2**bits - 1)


def dequantize_codes(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int
) -> torch.Tensor:
    """Values of codes `q` on the grid (scale, zero), computed as QuantizedWeight.dequantize does."""
    offset = zero if zero is not None else 2.0 ** (bits - 1)
    return (q - offset) * scale


def _rtn(
    W: torch.Tensor, bits: int, group_size: int, symmetric: bool, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """RTN of W [N, K] along K: codes [N, groups, size] (fp32, zero-padded last group), scales
    and zeros [N, groups, 1] (zeros None when symmetric)."""
    if W.dim() != 2:
        raise OptionError(f"expected a 2-D weight [N, K], got shape {tuple(W.shape)}")
    n, k = W.shape
    validate_quant_options(k, bits, group_size, scale_dtype)
    w = W.detach().to(torch.float32)
    check_finite(w, "the weight to quantize")
    size = min(group_size, k)
    groups = n_groups(k, group_size)
    # Zero padding of the last partial group does not change its grid: the grid always holds 0.
    padded = F.pad(w, (0, groups * size - k)).view(n, groups, size)
    scale, zero = group_grid(padded, bits, symmetric, scale_dtype)  # [N, groups]
    scale, zero = scale[..., None], None if zero is None else zero[..., None]
    return quantize_codes(padded, scale, zero, bits), scale, zero


def quantize_rtn(
    W: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool = False,
    scale_dtype: torch.dtype = torch.float16,
) -> QuantizedWeight:
    """Round-to-nearest group quantization of W [N, K] along K (computed in fp32)."""
    q, scale, zero = _rtn(W, bits, group_size, symmetric, scale_dtype)
    n, k = W.shape
    q = q.view(n, -1)[:, :k].to(torch.uint8)
    return QuantizedWeight(
        planes=pack_planes(q, bits),
        scales=scale[..., 0].t().to(scale_dtype).contiguous(),
        zeros=None if zero is None else zero[..., 0].t().to(scale_dtype).contiguous(),
        bits=bits,
        group_size=group_size,
        shape=(n, k),
    )


def rtn_dequantize(
    W: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool = False,
    scale_dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """quantize_rtn(W, ...).dequantize() in fp32, without packing the codes (for error
    measurements that try many formats: packing would dominate their time)."""
    q, scale, zero = _rtn(W, bits, group_size, symmetric, scale_dtype)
    n, k = W.shape
    return dequantize_codes(q, scale, zero, bits).view(n, -1)[:, :k]


def quantization_error(W: torch.Tensor, qw: QuantizedWeight) -> dict[str, float]:
    """Weight error of `qw` against W: relative Frobenius error, SQNR in dB, max abs error."""
    w = W.detach().to(torch.float32)
    diff = w - qw.dequantize(torch.float32).to(w.device)
    signal = float(torch.linalg.norm(w))
    noise = float(torch.linalg.norm(diff))
    return {
        "relative_error": noise / signal if signal > 0 else (0.0 if noise == 0 else math.inf),
        "sqnr_db": 20 * math.log10(signal / noise) if noise > 0 else math.inf,
        "max_abs_error": float(diff.abs().max()) if diff.numel() else 0.0,
    }


def quantized_nbytes(
    n: int,
    k: int,
    bits: int,
    group_size: int,
    symmetric: bool = False,
    scale_dtype: torch.dtype = torch.float16,
) -> int:
    """Bytes of a quantized [N, K] weight: planes + scales (+ zeros); equals QuantizedWeight.nbytes."""
    validate_quant_options(k, bits, group_size, scale_dtype)
    plane_bytes = sum(k * width // 32 * n * 4 for width in PLANES[bits])
    grid_bytes = n_groups(k, group_size) * n * scale_dtype.itemsize
    return plane_bytes + grid_bytes * (1 if symmetric else 2)


def bits_per_weight(
    n: int,
    k: int,
    bits: int,
    group_size: int,
    symmetric: bool = False,
    scale_dtype: torch.dtype = torch.float16,
) -> float:
    """Average stored bits per weight, scales and zero points included."""
    return 8 * quantized_nbytes(n, k, bits, group_size, symmetric, scale_dtype) / (n * k)
