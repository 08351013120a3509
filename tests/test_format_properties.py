"""Property-based tests of the packed format and the quantizers over random shapes, bit widths,
group sizes, grids and weight patterns; plus the invariants of neuron pruning."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from ffnsplit.compress import (
    quantization_error,
    quantize_rtn,
    quantized_nbytes,
    select_pruned,
)
from ffnsplit.compress.prune import prune_order
from ffnsplit.kernels.format import SUPPORTED_BITS, QuantizedWeight, pack_planes, unpack_planes

PROPERTY = settings(max_examples=50, deadline=None)

shapes = st.tuples(st.integers(1, 40), st.integers(1, 8).map(lambda m: 32 * m))
bit_widths = st.sampled_from(SUPPORTED_BITS)
scale_dtypes = st.sampled_from([torch.float16, torch.bfloat16, torch.float32])
patterns = st.sampled_from(["gaussian", "positive", "negative", "constant", "sparse", "outliers"])


def _weight(n: int, k: int, pattern: str, seed: int, log_scale: int) -> torch.Tensor:
    """A weight of a given pattern; log_scale spans tiny to large magnitudes."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    if pattern == "positive":
        w = w.abs() + 0.5
    elif pattern == "negative":
        w = -w.abs() - 0.5
    elif pattern == "constant":
        w = torch.full((n, k), float(w[0, 0]))
    elif pattern == "sparse":
        w = w * (torch.rand(n, k, generator=gen) < 0.1)
    elif pattern == "outliers":
        w[torch.rand(n, k, generator=gen) < 0.02] *= 50
    return w * 10.0**log_scale


def _group_sizes(k: int) -> st.SearchStrategy[int]:
    return st.sampled_from(sorted({32, 64, 96, 128, k, k + 32}))


@PROPERTY
@given(shape=shapes, bits=bit_widths, seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_round_trip_is_exact(shape, bits, seed) -> None:
    n, k = shape
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (n, k), generator=gen, dtype=torch.uint8)
    planes = pack_planes(codes, bits)
    assert all(p.dtype == torch.int32 and p.is_contiguous() for p in planes)
    assert torch.equal(unpack_planes(planes, bits, k), codes)


@PROPERTY
@given(
    shape=shapes,
    bits=bit_widths,
    data=st.data(),
    symmetric=st.booleans(),
    scale_dtype=scale_dtypes,
    pattern=patterns,
    seed=st.integers(0, 2**31 - 1),
    log_scale=st.integers(-4, 2),
)
def test_rtn_codes_in_range_and_error_within_half_a_step(
    shape, bits, data, symmetric, scale_dtype, pattern, seed, log_scale
) -> None:
    """Every value is within scale/2 of its dequantized value: the grids cover their groups
    (zero inside asymmetric ranges, scales rounded up), symmetric or not, nothing is clipped."""
    n, k = shape
    group_size = data.draw(_group_sizes(k), label="group_size")
    w = _weight(n, k, pattern, seed, log_scale)
    qw = quantize_rtn(w, bits, group_size, symmetric, scale_dtype)
    codes = qw.codes()
    assert int(codes.max()) <= 2**bits - 1
    scale = qw.scales.float().t().repeat_interleave(group_size, dim=1)[:, :k]
    err = (w - qw.dequantize()).abs()
    assert bool((err <= scale * (0.5 + 1e-4) + w.abs() * 1e-6).all()), float((err / scale).max())
    if qw.zeros is not None:
        zeros = qw.zeros.float()
        assert torch.equal(zeros, zeros.round())
        assert bool(((zeros >= 0) & (zeros <= 2**bits - 1)).all())


@PROPERTY
@given(
    shape=shapes,
    bits=bit_widths,
    data=st.data(),
    symmetric=st.booleans(),
    scale_dtype=scale_dtypes,
    seed=st.integers(0, 2**31 - 1),
)
def test_quantized_weight_serialization_round_trip_is_bit_exact(
    shape, bits, data, symmetric, scale_dtype, seed
) -> None:
    n, k = shape
    group_size = data.draw(_group_sizes(k), label="group_size")
    w = _weight(n, k, "gaussian", seed, 0)
    qw = quantize_rtn(w, bits, group_size, symmetric, scale_dtype)
    assert qw.nbytes() == quantized_nbytes(n, k, bits, group_size, symmetric, scale_dtype)
    blob = save_safetensors(qw.tensors("mlp.down"), metadata={"k": "v"})
    rebuilt = QuantizedWeight.from_tensors(load_safetensors(blob), "mlp.down", qw.meta())
    assert rebuilt.meta() == qw.meta()
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.planes, qw.planes, strict=True))
    assert torch.equal(rebuilt.scales, qw.scales) and rebuilt.scales.dtype == scale_dtype
    assert (rebuilt.zeros is None) == (qw.zeros is None)
    if qw.zeros is not None:
        assert torch.equal(rebuilt.zeros, qw.zeros)
    assert torch.equal(rebuilt.dequantize(), qw.dequantize())


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [32, 128])
def test_error_shrinks_with_bits(symmetric: bool, group_size: int) -> None:
    """Each extra bit roughly halves the error; int8 is far better than int4."""
    w = torch.randn(256, 1024, generator=torch.Generator().manual_seed(3))
    err = {
        bits: quantization_error(w, quantize_rtn(w, bits, group_size, symmetric))["relative_error"]
        for bits in SUPPORTED_BITS
    }
    assert err[2] > 1.6 * err[3] > 1.6 * 1.6 * err[4], err
    assert err[4] > 10 * err[8], err


@PROPERTY
@given(
    scores=st.lists(
        st.floats(0, 1e6, allow_nan=False, allow_infinity=False), min_size=1, max_size=64
    ),
    data=st.data(),
)
def test_pruning_drops_exactly_the_coldest_prunable_neurons(scores, data) -> None:
    scores = torch.tensor(scores, dtype=torch.float64)
    size = scores.numel()
    exclude = torch.tensor(
        data.draw(st.lists(st.integers(0, size - 1), max_size=size, unique=True)),
        dtype=torch.long,
    )
    prunable = size - exclude.numel()
    n_prune = data.draw(st.integers(0, prunable), label="n_prune")
    order = prune_order(scores, exclude)
    assert order.numel() == prunable and not bool(torch.isin(order, exclude).any())
    assert bool((scores[order][1:] >= scores[order][:-1]).all())
    kept, pruned = select_pruned(scores, n_prune, exclude)
    assert pruned.numel() == n_prune and kept.numel() == size - n_prune
    assert torch.equal(torch.sort(torch.cat([kept, pruned])).values, torch.arange(size))
    assert bool((kept[1:] > kept[:-1]).all()) and bool((pruned[1:] > pruned[:-1]).all())
    assert not bool(torch.isin(pruned, exclude).any())
    kept_prunable = kept[~torch.isin(kept, exclude)]
    if n_prune and kept_prunable.numel():
        assert float(scores[pruned].max()) <= float(scores[kept_prunable].min())
