"""Round-to-nearest group quantization: grids, edge cases, option errors, error and size accounting."""

import math

import pytest
import torch

from ffnsplit.compress import (
    bits_per_weight,
    quantization_error,
    quantize_rtn,
    quantized_nbytes,
)
from ffnsplit.errors import NumericalError, OptionError
from ffnsplit.kernels.format import SUPPORTED_BITS


def _grid(qw):
    """Per-element (scale, zero) [N, K] of a quantized weight, in fp32."""
    n, k = qw.shape
    expand = lambda t: t.float().t().repeat_interleave(qw.group_size, dim=1)[:, :k]  # noqa: E731
    zero = torch.full((n, k), 2.0 ** (qw.bits - 1)) if qw.zeros is None else expand(qw.zeros)
    return expand(qw.scales), zero


def test_rtn_matches_textbook_formula_on_fp32_scales() -> None:
    """With fp32 scales nothing is rounded: codes are exactly round(w / scale) + zero."""
    w = torch.randn(8, 64)
    qw = quantize_rtn(w, 4, 32, scale_dtype=torch.float32)
    groups = w.view(8, 2, 32)
    low = groups.amin(-1).clamp(max=0)
    high = groups.amax(-1).clamp(min=0)
    scale = (high - low) / 15
    zero = torch.round(-low / scale).clamp(0, 15)
    codes = (torch.round(groups / scale[..., None]) + zero[..., None]).clamp(0, 15)
    assert torch.equal(qw.scales, scale.t())
    assert torch.equal(qw.zeros, zero.t())
    assert torch.equal(qw.codes(), codes.view(8, 64).to(torch.uint8))


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("symmetric", [False, True])
def test_stored_scales_are_rounded_up_and_used(scale_dtype: torch.dtype, symmetric: bool) -> None:
    """Codes are computed with the stored (low precision) scale, so 8-bit errors stay <= scale/2."""
    w = torch.randn(64, 256) * 0.05
    qw = quantize_rtn(w, 8, 64, symmetric=symmetric, scale_dtype=scale_dtype)
    assert qw.scales.dtype == scale_dtype
    scale, _ = _grid(qw)
    err = (w - qw.dequantize()).abs()
    assert bool((err <= scale / 2 * (1 + 1e-5)).all())
    # Rounded up: never below the exact fp32 scale.
    groups = w.view(64, 4, 64)
    if symmetric:
        exact = groups.abs().amax(-1) / 127
    else:
        exact = (groups.amax(-1).clamp(min=0) - groups.amin(-1).clamp(max=0)) / 255
    assert bool((qw.scales.float().t() >= exact).all())


def test_zero_points_are_integers_in_range() -> None:
    w = torch.randn(16, 128) + 0.3
    for bits in SUPPORTED_BITS:
        zeros = quantize_rtn(w, bits, 32).zeros.float()
        assert torch.equal(zeros, zeros.round())
        assert bool(((zeros >= 0) & (zeros <= 2**bits - 1)).all())


@pytest.mark.parametrize("symmetric", [False, True])
def test_zero_and_constant_groups_are_exact(symmetric: bool) -> None:
    w = torch.zeros(4, 96)
    w[1] = 0.25  # constant positive row
    w[2, 32:64] = -3.0  # one constant negative group, zeros elsewhere
    for bits in SUPPORTED_BITS:
        qw = quantize_rtn(w, bits, 32, symmetric=symmetric)
        deq = qw.dequantize()
        assert bool(torch.isfinite(qw.scales.float()).all())
        assert torch.allclose(deq, w, rtol=1e-3, atol=0), (bits, (deq - w).abs().max())
        assert torch.equal(deq[0], torch.zeros(96))


def test_one_signed_groups_are_representable() -> None:
    """Groups of only positive (or only negative) values keep the <= scale/2 bound."""
    w = torch.rand(32, 128) + 1.0
    w[16:] *= -1
    qw = quantize_rtn(w, 3, 32)
    scale, _ = _grid(qw)
    assert bool(((w - qw.dequantize()).abs() <= scale / 2 * (1 + 1e-5)).all())


def test_partial_last_group_and_per_channel() -> None:
    w = torch.randn(5, 160)
    partial = quantize_rtn(w, 4, 64)
    assert tuple(partial.scales.shape) == (3, 5)
    # The partial group's grid only sees its own 32 columns.
    alone = quantize_rtn(w[:, 128:], 4, 64)
    assert torch.equal(partial.scales[2], alone.scales[0])
    assert torch.equal(partial.codes()[:, 128:], alone.codes())
    per_channel = quantize_rtn(w, 8, 4096, symmetric=True)
    assert tuple(per_channel.scales.shape) == (1, 5)
    expected = (w.abs().amax(1) / 127).to(torch.float16)
    assert bool((per_channel.scales[0] >= expected).all())
    assert bool((per_channel.scales[0].float() <= expected.float() * (1 + 2**-9)).all())


def test_low_precision_input_and_device_of_result() -> None:
    w = torch.randn(32, 64, dtype=torch.bfloat16)
    qw = quantize_rtn(w, 4, 32)
    assert qw.device == w.device
    assert quantization_error(w, qw)["relative_error"] < 0.15


@pytest.mark.parametrize(
    ("shape", "bits", "group_size", "kwargs", "error", "message"),
    [
        ((4, 64), 5, 32, {}, OptionError, "unsupported bit width 5"),
        ((4, 64), 1, 32, {}, OptionError, "choose one of 2, 3, 4, 8"),
        ((4, 128), 4, 48, {}, OptionError, "group size 48 is not a multiple of 32"),
        ((4, 128), 4, 0, {}, OptionError, "group size 0"),
        ((4, 100), 4, 32, {}, OptionError, "K=100 is not a multiple of 32"),
        ((4, 64), 4, 32, {"scale_dtype": torch.int8}, OptionError, "unsupported scale dtype"),
    ],
)
def test_bad_options_are_one_line_errors(shape, bits, group_size, kwargs, error, message) -> None:
    with pytest.raises(error, match=message) as info:
        quantize_rtn(torch.randn(*shape), bits, group_size, **kwargs)
    assert "\n" not in str(info.value)


def test_group_size_above_k_is_per_channel_not_an_error() -> None:
    assert quantize_rtn(torch.randn(4, 96), 4, 100).scales.shape == (1, 4)


def test_non_finite_and_non_matrix_weights_are_refused() -> None:
    w = torch.randn(4, 64)
    w[2, 5] = math.nan
    with pytest.raises(NumericalError, match="NaN or Inf"):
        quantize_rtn(w, 4, 32)
    with pytest.raises(OptionError, match="2-D"):
        quantize_rtn(torch.randn(64), 4, 32)
    with pytest.raises(OptionError, match="overflows"):
        quantize_rtn(torch.full((2, 32), 1e9), 8, 32, symmetric=True)


def test_quantization_error_metrics() -> None:
    w = torch.randn(64, 256)
    qw = quantize_rtn(w, 8, 64)
    err = quantization_error(w, qw)
    deq = qw.dequantize()
    rel = float(torch.linalg.norm(w - deq) / torch.linalg.norm(w))
    assert err["relative_error"] == pytest.approx(rel)
    assert err["sqnr_db"] == pytest.approx(-20 * math.log10(rel))
    assert err["max_abs_error"] == pytest.approx(float((w - deq).abs().max()))
    assert err["sqnr_db"] > 40  # int8 g64 on Gaussian weights: about 48 dB
    # A weight exactly on the grid: no error at all.
    exact = quantization_error(deq, qw)
    assert exact["relative_error"] == 0.0 and exact["sqnr_db"] == math.inf


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("group_size", [32, 128, 4096])
@pytest.mark.parametrize("symmetric", [False, True])
def test_nbytes_accounting_matches_the_packed_weight(bits, group_size, symmetric) -> None:
    n, k = 24, 320
    for scale_dtype in (torch.float16, torch.float32):
        qw = quantize_rtn(torch.randn(n, k), bits, group_size, symmetric, scale_dtype)
        assert qw.nbytes() == quantized_nbytes(n, k, bits, group_size, symmetric, scale_dtype)


def test_bits_per_weight_values() -> None:
    assert bits_per_weight(576, 1536, 4, 128) == pytest.approx(4 + 32 / 128)
    assert bits_per_weight(1536, 576, 4, 128) == pytest.approx(4 + 5 * 32 / 576)  # partial group
    assert bits_per_weight(1536, 576, 3, 32, symmetric=True) == pytest.approx(3 + 16 / 32)
    assert bits_per_weight(576, 1536, 8, 1536, scale_dtype=torch.float32) == pytest.approx(
        8 + 64 / 1536
    )
    assert bits_per_weight(64, 64, 2, 64) < bits_per_weight(64, 64, 2, 32)


@pytest.mark.parametrize(
    ("bits", "group", "symmetric"), [(4, 32, False), (3, 64, True), (2, 96, False), (8, 4096, True)]
)
def test_rtn_dequantize_equals_packed_round_trip(bits, group, symmetric) -> None:
    """The unpacked RTN used by error measurements equals quantize_rtn + dequantize exactly,
    partial last group and per-channel groups included."""
    from ffnsplit.compress.quant import rtn_dequantize

    w = torch.randn(37, 160) * torch.rand(37, 1)
    packed = quantize_rtn(w, bits, group, symmetric).dequantize(torch.float32)
    assert torch.equal(rtn_dequantize(w, bits, group, symmetric), packed)
