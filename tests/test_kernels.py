"""Triton kernels against a float64 reference: quant_matmul and the split FFN.

On CPU these run under TRITON_INTERPRET=1 (set by conftest), one small config per path; on a GPU
the same tests run compiled (fp16 and fp32, plus the bf16 / large-shape / CUDA-graph tests marked
`gpu`). Inputs are fresh random draws; outputs are poisoned with NaN so an unwritten element fails.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from ffnsplit.kernels import dequant_gemm, ops, reference, tiles
from ffnsplit.kernels import gemv as gemv_module
from ffnsplit.kernels import quant_matmul as qmm
from ffnsplit.kernels import split_ffn as sffn
from ffnsplit.kernels.format import QuantizedWeight, SplitFFNWeights, n_groups, pack_planes
from ffnsplit.kernels.tiles import ACTIVATION_NAMES

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.2e-2}
PER_CHANNEL = 1 << 20  # a group size >= K: one group per output channel
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")


def random_qweight(
    n: int, k: int, bits: int, group: int, symmetric: bool, device: str = DEVICE
) -> QuantizedWeight:
    """A packed weight from random codes, scales in [0.5, 1.5] * 1e-2 and fractional zeros."""
    q = torch.randint(0, 2**bits, (n, k))
    groups = n_groups(k, group)
    scales = ((torch.rand(groups, n) + 0.5) * 1e-2).half()
    zeros = None
    if not symmetric:  # fractional zero points are valid in the format: the kernels must not care
        zeros = (torch.rand(groups, n) * (2**bits - 1)).half()
    qw = QuantizedWeight(pack_planes(q, bits), scales, zeros, bits, group, (n, k))
    return qw.to(device)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not out.isnan().any(), "unwritten (NaN-poisoned) or non-finite output"
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def ref_linear(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    y = x.double() @ qw.dequantize(torch.float64).T
    return y if bias is None else y + bias.double()


# bits x group x symmetry x dtype x path; shapes rotate through odd sizes so each case differs
QMM_CASES = list(
    itertools.product(
        (8, 4, 3, 2), (32, 64, 128, PER_CHANNEL), (False, True), (torch.float16, torch.float32)
    )
)
M_SIZES, N_SIZES, K_SIZES = (1, 3, 17, 33), (40, 104), (64, 96, 160)


@pytest.mark.parametrize("path", ["gemv", "decode", "prefill", "dequant"])
@pytest.mark.parametrize(("bits", "group", "symmetric", "dtype"), QMM_CASES)
def test_quant_matmul(poison, bits, group, symmetric, dtype, path) -> None:
    i = QMM_CASES.index((bits, group, symmetric, dtype))
    m, n, k = M_SIZES[i % 4], N_SIZES[(i // 4) % 2], K_SIZES[i % 3]
    qw = random_qweight(n, k, bits, group, symmetric)
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    bias = torch.randn(n, device=DEVICE) if i % 2 else None
    out = qmm.quant_matmul(x, qw, bias, path=path)
    assert out.shape == (m, n) and out.dtype == dtype
    assert rel_err(out, ref_linear(x, qw, bias)) < TOL[dtype]


def test_quant_matmul_leading_dims_and_noncontiguous(poison) -> None:
    qw = random_qweight(48, 128, 4, 64, False)
    x = torch.randn(2, 3, 256, device=DEVICE)[..., ::2]  # strided last dim
    out = ops.quant_matmul(x, qw, backend="triton")
    assert out.shape == (2, 3, 48)
    assert rel_err(out, ref_linear(x.reshape(-1, 128), qw, None).reshape(2, 3, 48)) < 1e-5


@pytest.mark.parametrize("path", ["gemv", "decode", "small"])
def test_split_linear_heavy_and_light(poison, path) -> None:
    """The down-projection form: dense columns then packed columns, one output, one bias."""
    n, kh, kl, m = 72, 40, 96, 5
    heavy = torch.randn(n, kh, device=DEVICE)
    light = random_qweight(n, kl, 4, 32, False)
    bias = torch.randn(n, device=DEVICE)
    x = torch.randn(m, kh + kl, device=DEVICE)
    out = qmm.split_linear(x, heavy, light, bias, path=path)
    ref = x[:, :kh].double() @ heavy.double().T + ref_linear(x[:, kh:], light, bias)
    assert rel_err(out, ref) < 1e-5


def test_split_linear_waves_of_resident_programs(poison, monkeypatch) -> None:
    """A small-tier config with per_sm=0 sizes its K-slices by what an SM holds of the compiled
    kernel (registers and shared memory; the interpreter's guess here: 2) and still computes the
    product; blocks_per_sm counts shared memory when given it."""
    assert tiles.blocks_per_sm(140, 4, 73728, 228 * 1024) == 3  # sm_90: by shared memory
    assert tiles.blocks_per_sm(131, 8, 98304, 228 * 1024) == 1  # by registers
    assert tiles.blocks_per_sm(128, 4) == 4 and tiles.blocks_per_sm(128, 4, 200_000, 0) == 4
    base = tiles.tier_configs(5, "small", torch.float32, qmm._CONFIGS)[1][0]
    if not tiles.INTERPRET:
        monkeypatch.setitem(qmm._CONFIGS, "small", (dataclasses.replace(base, per_sm=0),))
    else:
        monkeypatch.setitem(tiles._INTERPRET, "small", dataclasses.replace(base, per_sm=0))
    seen = []
    real = qmm.n_splits

    def spy(cfg, *args):
        seen.append((cfg.per_sm, real(cfg, *args)))
        return seen[-1][1]

    monkeypatch.setattr(qmm, "n_splits", spy)
    n, kh, kl, m = 72, 40, 992, 5
    heavy = torch.randn(n, kh, device=DEVICE)
    light = random_qweight(n, kl, 4, 32, False)
    bias = torch.randn(n, device=DEVICE)
    x = torch.randn(m, kh + kl, device=DEVICE)
    out = qmm.split_linear(x, heavy, light, bias, path="small")
    ref = x[:, :kh].double() @ heavy.double().T + ref_linear(x[:, kh:], light, bias)
    assert rel_err(out, ref) < 1e-5
    assert seen and seen[0][0] >= 1  # resolved before the split was taken
    if tiles.INTERPRET:
        assert seen[0] == (2, 2)  # 2 an SM x 4 "SMs" over 3 tiles: 2 K-slices


def test_shared_per_sm(monkeypatch) -> None:
    """An SM's shared memory: the device properties' field where torch has it, else by compute
    capability (sm_90 228 KiB, sm_80 164 KiB, others 100 KiB)."""
    from types import SimpleNamespace

    cases = [(SimpleNamespace(shared_memory_per_multiprocessor=233472, major=9, minor=0), 233472),
             (SimpleNamespace(major=9, minor=0), 228 * 1024),
             (SimpleNamespace(major=8, minor=0), 164 * 1024),
             (SimpleNamespace(major=8, minor=9), 100 * 1024)]  # fmt: skip
    for props, want in cases:
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index, p=props: p)
        tiles.shared_per_sm.cache_clear()
        assert tiles.shared_per_sm(0) == want
    tiles.shared_per_sm.cache_clear()


def random_split_weights(
    hidden: int,
    h: int,
    light: int,
    activation: str,
    gated: bool,
    biases: bool,
    dtype: torch.dtype,
    bits: int = 4,
    group: int = 32,
    symmetric: bool = False,
    device: str = DEVICE,
) -> SplitFFNWeights:
    def dense(rows: int, cols: int) -> torch.Tensor:
        return (torch.randn(rows, cols) / cols**0.5).to(device=device, dtype=dtype)

    def vec(size: int) -> torch.Tensor | None:
        return torch.randn(size, device=device) * 0.1 if biases else None

    def packed(n: int, k: int) -> QuantizedWeight:
        return random_qweight(n, k, bits, group, symmetric, device)

    return SplitFFNWeights(
        activation=activation,
        gated=gated,
        heavy_up=dense(h, hidden) if h else None,
        heavy_gate=dense(h, hidden) if h and gated else None,
        heavy_down=dense(hidden, h) if h else None,
        light_up=packed(light, hidden) if light else None,
        light_gate=packed(light, hidden) if light and gated else None,
        light_down=packed(hidden, light) if light else None,
        up_bias=vec(h + light),
        gate_bias=vec(h + light) if gated else None,
        down_bias=vec(hidden),
    )


def ref_split_ffn(x: torch.Tensor, w: SplitFFNWeights) -> torch.Tensor:
    """The split FFN in float64 through the torch reference."""
    as64 = {
        name: (None if t is None else t.to(torch.float64))
        for name in ("heavy_up", "heavy_gate", "heavy_down", "up_bias", "gate_bias", "down_bias")
        for t in [getattr(w, name)]
    }
    w64 = SplitFFNWeights(
        w.activation, w.gated, light_up=w.light_up, light_gate=w.light_gate,
        light_down=w.light_down, **as64,
    )  # fmt: skip
    return reference.split_ffn(x.to(torch.float64), w64)


# (heavy, light) neuron counts: both, all light, all heavy (odd h, light a multiple of 32)
SPLITS = ((20, 64), (0, 96), (37, 0))
FFN_CASES = list(itertools.product(ACTIVATION_NAMES, (True, False), (torch.float16, torch.float32)))


@pytest.mark.parametrize("path", ["gemv", "decode", "prefill", "dequant"])
@pytest.mark.parametrize(("activation", "gated", "dtype"), FFN_CASES)
def test_split_ffn(poison, activation, gated, dtype, path) -> None:
    i = FFN_CASES.index((activation, gated, dtype))
    h, light = SPLITS[i % 3]
    hidden, m = (64, 96)[i % 2], (1, 3, 17, 33)[i % 4]
    w = random_split_weights(hidden, h, light, activation, gated, biases=i % 2 == 0, dtype=dtype)
    x = torch.randn(m, hidden, device=DEVICE).to(dtype)
    out = sffn.split_ffn(x, w, path=path)
    assert out.shape == (m, hidden) and out.dtype == dtype
    assert rel_err(out, ref_split_ffn(x, w)) < TOL[dtype]


@pytest.mark.parametrize(
    ("activation", "gated", "biases", "m"),
    [("silu", True, True, 3), ("gelu", False, True, 17), ("relu", True, False, 1)],
)
def test_split_ffn_k_slices(poison, monkeypatch, activation, gated, biases, m) -> None:
    """Kernel A's split-K (TileConfig.per_sm): K-slices of heavy and light tiles as fp32 partials,
    then the reduce launch with biases, activation and gating; it agrees with the unsplit kernel."""
    # K 1,056: 9 light K-blocks of 128 codes, so 2 slices (each keeps >= 4 blocks)
    w = random_split_weights(1056, 20, 64, activation, gated, biases=biases, dtype=torch.float32)
    x = torch.randn(m, 1056, device=DEVICE)
    whole = sffn.split_activations(x, w, path="decode")
    cfg = sffn._CONFIGS["decode"][0] if ON_GPU else tiles._INTERPRET["decode"]
    split_cfg = dataclasses.replace(cfg, per_sm=64)
    monkeypatch.setitem(sffn._CONFIGS, "decode", (split_cfg,))
    monkeypatch.setitem(tiles._INTERPRET, "decode", split_cfg)
    launches = []
    real = sffn.gemv._gemv_reduce_kernel
    monkeypatch.setattr(sffn.gemv, "_gemv_reduce_kernel", _Recorder(real, launches))
    parts = sffn.split_activations(x, w, path="decode")
    assert launches and launches[0]["args"][9:11] == (2, 2), "the config did not split K in two"
    assert rel_err(parts, whole) < 1e-5
    out = sffn.split_ffn(x, w, path="decode")
    assert rel_err(out, ref_split_ffn(x, w)) < TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize(("group", "m"), [(128, 5), (128, 33), (32, 17)])
def test_weights_as_the_a_operand(poison, monkeypatch, dtype, group, m) -> None:
    """TileConfig.w_as_a: the small tier's light blocks as W @ x^T (kernel A and the down
    projection) agree with the reference and with the x @ W^T form; blocks spanning groups
    (group 32) keep the x @ W^T form."""
    w = random_split_weights(1056, 20, 96, "silu", True, biases=True, dtype=dtype, group=group)
    x = torch.randn(m, 1056, device=DEVICE).to(dtype)
    plain = sffn.split_ffn(x, w, path="small")
    for table in (sffn._CONFIGS, qmm._CONFIGS):
        cfg = table["small"][0] if ON_GPU else tiles._INTERPRET["small"]
        monkeypatch.setitem(
            table, "small", (dataclasses.replace(cfg, w_as_a=True, scale_after=False),)
        )
    monkeypatch.setitem(tiles._INTERPRET, "small",
                        dataclasses.replace(tiles._INTERPRET["small"], w_as_a=True, scale_after=False))  # fmt: skip
    cfg = tiles.tier_configs(m, "small", dtype, sffn._CONFIGS)[1][0]
    assert tiles.w_as_a_ok(cfg, 4, group, 1056) == (group == 128)
    out = sffn.split_ffn(x, w, path="small")
    assert rel_err(out, ref_split_ffn(x, w)) < TOL[dtype]
    assert rel_err(out, plain) < TOL[dtype]


class _Recorder:
    """A jitted kernel whose launches record their arguments (keywords, and `args`)."""

    def __init__(self, kernel, calls: list) -> None:
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append(dict(kwargs, args=args))
            return self.kernel[grid](*args, **kwargs)

        return launch


@pytest.mark.parametrize(
    ("bits", "group", "symmetric"), [(8, 64, True), (3, 32, False), (2, 128, True)]
)
def test_split_ffn_other_formats(poison, bits, group, symmetric) -> None:
    w = random_split_weights(
        128, 16, 64, "silu", True, True, torch.float32, bits=bits, group=group, symmetric=symmetric
    )
    x = torch.randn(2, 5, 128, device=DEVICE)
    out = ops.split_ffn(x, w, backend="triton")
    assert out.shape == (2, 5, 128)
    assert rel_err(out, ref_split_ffn(x, w)) < TOL[torch.float32]


def test_torch_backend_matches_float64() -> None:
    w = random_split_weights(64, 8, 32, "gelu_tanh", True, True, torch.float32)
    x = torch.randn(4, 64, device=DEVICE)
    assert rel_err(ops.split_ffn(x, w, backend="torch"), ref_split_ffn(x, w)) < 1e-5
    qw = w.light_up
    assert rel_err(ops.quant_matmul(x, qw, backend="torch"), ref_linear(x, qw, None)) < 1e-5


def test_auto_backend_uses_reference_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    w = random_split_weights(32, 0, 32, "relu", False, False, torch.float32, device="cpu")
    x = torch.randn(2, 32)

    def forbidden(*args, **kwargs):
        raise AssertionError("Triton launched for a CPU tensor with backend='auto'")

    monkeypatch.setattr(sffn, "split_ffn", forbidden)
    monkeypatch.setattr(qmm, "quant_matmul", forbidden)
    assert rel_err(ops.split_ffn(x, w), ref_split_ffn(x, w)) < 1e-5
    assert rel_err(ops.quant_matmul(x, w.light_up), ref_linear(x, w.light_up, None)) < 1e-5


def test_heavy_weights_cast_to_activation_dtype(poison) -> None:
    w = random_split_weights(64, 24, 32, "silu", True, False, torch.float32)
    x = torch.randn(3, 64, device=DEVICE).half()
    out = ops.split_ffn(x, w, backend="triton")  # fp32 heavy weights, fp16 activations
    assert out.dtype == torch.float16
    assert rel_err(out, ref_split_ffn(x, w)) < TOL[torch.float16]


def test_invalid_inputs_raise() -> None:
    qw = random_qweight(16, 64, 4, 32, True)
    with pytest.raises(ValueError, match="features"):
        qmm.quant_matmul(torch.randn(2, 32, device=DEVICE), qw)
    with pytest.raises(ValueError, match="bias"):
        qmm.quant_matmul(torch.randn(2, 64, device=DEVICE), qw, torch.randn(3, device=DEVICE))
    with pytest.raises(ValueError, match="backend"):
        ops.quant_matmul(torch.randn(2, 64, device=DEVICE), qw, backend="cuda")
    with pytest.raises(ValueError, match="path"):
        qmm.quant_matmul(torch.randn(2, 64, device=DEVICE), qw, path="fast")
    with pytest.raises(TypeError, match="fp16"):
        qmm.quant_matmul(torch.randn(2, 64, device=DEVICE).double(), qw)
    w = random_split_weights(64, 8, 32, "swish", True, False, torch.float32)
    with pytest.raises(ValueError, match="activation"):
        sffn.split_ffn(torch.randn(2, 64, device=DEVICE), w)


def test_gemv_deterministic_and_split_k(poison, monkeypatch) -> None:
    """Many K-slices (split-K partials, fixed-order reduction): bitwise repeatable results
    without the atomic candidates (FFNSPLIT_GEMV_ATOMIC=0; by default the tuners may pick them)."""
    monkeypatch.setattr(gemv_module, "ATOMIC_OK", False)
    w = random_split_weights(256, 8, 64, "silu", True, True, torch.float32, bits=4, group=64)
    x = torch.randn(2, 256, device=DEVICE)
    first = sffn.split_ffn(x, w, path="gemv")
    assert rel_err(first, ref_split_ffn(x, w)) < TOL[torch.float32]
    assert torch.equal(first, sffn.split_ffn(x, w, path="gemv"))


@pytest.mark.parametrize(("heavy", "m", "xvec"), [(20, 1, True), (22, 1, True), (20, 3, False)])
def test_gemv_x_vector_loads(poison, monkeypatch, heavy, m, xvec) -> None:
    """The int4 path reading x four 16-bit values a load (XVEC) where every row's light part of x
    is 8-byte aligned (kernel B: heavy count a multiple of 4, here 20), one load a value where
    it is not (22) or when switched off; odd K-slices (K = 352: 11 steps) and several rows."""
    monkeypatch.setattr(gemv_module, "XVEC_OK", xvec)
    w = random_split_weights(160, heavy, 352, "silu", True, True, torch.float16, bits=4, group=64)
    x = torch.randn(m, 160, device=DEVICE).half()
    assert rel_err(sffn.split_ffn(x, w, path="gemv"), ref_split_ffn(x, w)) < TOL[torch.float16]


@pytest.mark.parametrize("path", ["gemv", "decode"])
def test_strided_heavy_down_and_padded_heavy_part(poison, path) -> None:
    """22 heavy neurons: heavy_down [H, 22] as a view of [H, 24] rows is read through its row
    stride (no dense copy), and format.pad_heavy's 24 (two zero neurons, biases included), what
    SplitFFN hands its kernels on a GPU, gives the unpadded FFN's output."""
    from dataclasses import replace

    from ffnsplit.kernels.format import pad_heavy

    w = random_split_weights(160, 22, 352, "silu", True, True, torch.float16, bits=4, group=64)
    wide = torch.randn(160, 24, device=DEVICE).half()
    wide[:, :22] = w.heavy_down
    strided = replace(w, heavy_down=wide[:, :22])
    padded = pad_heavy(w)
    assert strided.heavy_down.stride() == (24, 1) and padded.n_heavy == 24
    x = torch.randn(2, 160, device=DEVICE).half()
    ref = ref_split_ffn(x, w)
    for weights in (strided, padded):
        assert rel_err(sffn.split_ffn(x, weights, path=path), ref) < TOL[torch.float16]


@pytest.mark.parametrize(("heavy", "mode"), [(0, "a"), (9, "a"), (0, "all"), (9, "all")])
def test_gemv_fused_reduction_matches_separate_launch(poison, monkeypatch, heavy, mode) -> None:
    """The in-kernel split-K reduction (last program of a tile adds the slots) against the
    separate reduction launch: same sums (different association only), bias and activation
    included, and counters left at zero for the next launch (a second call agrees bitwise)."""
    from ffnsplit.kernels import gemv

    w = random_split_weights(192, heavy, 96, "gelu", True, True, torch.float32, bits=4, group=32)
    x = torch.randn(3, 192, device=DEVICE)
    monkeypatch.setattr(gemv, "FUSED_MODE", mode)
    fused = sffn.split_ffn(x, w, path="gemv")
    monkeypatch.setattr(gemv, "FUSED_MODE", "0")
    separate = sffn.split_ffn(x, w, path="gemv")
    torch.testing.assert_close(fused, separate, rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(gemv, "FUSED_MODE", mode)
    assert torch.equal(fused, sffn.split_ffn(x, w, path="gemv"))
    assert rel_err(fused, ref_split_ffn(x, w)) < TOL[torch.float32]


# two sums of the same terms in different orders (atomic configs): ||a - b|| / ||b|| bounds (an
# elementwise bound fails where an output cancels: a one-ulp change of the 16-bit intermediate
# activations moves it by far more than its own ulp)
REPEAT_TOL = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.mark.parametrize(
    ("heavy", "m", "dtype"), [(0, 1, torch.float32), (9, 3, torch.float32), (9, 5, torch.float16)]
)
def test_gemv_atomic_accumulation(poison, monkeypatch, heavy, m, dtype) -> None:
    """The atomic configs (every K-slice added into one fp32 accumulator, the last program
    of a tile finishes it) against the reference, and against the slot configs up to
    association; the accumulators and counters are left at zero (a second call gives the same
    result). Both kernels run it."""
    w = random_split_weights(192, heavy, 96, "gelu", True, True, dtype, bits=4, group=32)
    x = torch.randn(m, 192, device=DEVICE).to(dtype)
    slots = sffn.split_ffn(x, w, path="gemv")
    atomic = dataclasses.replace(gemv_module._INTERPRET_CONFIG, atomic=True)
    monkeypatch.setattr(gemv_module, "ATOMIC_OK", True)
    monkeypatch.setattr(gemv_module, "_INTERPRET_CONFIG", atomic)
    monkeypatch.setattr(gemv_module, "_CONFIGS", (atomic,))
    assert all(c.atomic for c in gemv_module._configs())
    out = sffn.split_ffn(x, w, path="gemv")
    assert rel_err(out, ref_split_ffn(x, w)) < TOL[dtype]
    assert rel_err(out, slots) < REPEAT_TOL[dtype]
    for buf in gemv_module._zeroed_bufs.values():
        assert not buf.any()
    assert rel_err(sffn.split_ffn(x, w, path="gemv"), out) < REPEAT_TOL[dtype]


# (activation, gated, biases, dtype, m, heavy, light, bits, group, symmetric): odd heavy counts,
# partial light units, every row count of the path, the exact (fp32, 3/8-bit) and the
# two-mantissa (int4 16-bit) loops
FUSED_CASES = [
    ("silu", True, True, torch.float16, 1, 20, 96, 4, 128, False),
    ("gelu", False, False, torch.float32, 3, 0, 192, 4, 64, True),
    ("relu", True, True, torch.float32, 2, 37, 0, 4, 128, False),
    ("gelu_tanh", True, True, torch.float32, 4, 9, 64, 3, 64, False),
    ("silu", True, False, torch.float16, 4, 13, 160, 4, 64, False),
    ("gelu", True, True, torch.float16, 2, 24, 128, 8, 128, True),
]


@pytest.mark.parametrize(
    ("activation", "gated", "biases", "dtype", "m", "heavy", "light", "bits", "group", "symmetric"),
    FUSED_CASES,
)
def test_fused_split_ffn(poison, activation, gated, biases, dtype, m, heavy, light, bits, group,
                         symmetric) -> None:  # fmt: skip
    """The one-launch split FFN (units of neurons, down partials added atomically, the last
    program finishes) against float64; its accumulator and counter are left at zero, so a second
    call agrees up to the order of the additions."""
    from ffnsplit.kernels import fused_decode

    w = random_split_weights(256, heavy, light, activation, gated, biases, dtype, bits=bits,
                             group=group, symmetric=symmetric)  # fmt: skip
    x = torch.randn(m, 256, device=DEVICE).to(dtype)
    assert fused_decode.applies(m, x, w)
    out = sffn.split_ffn(x, w, path="fused")
    assert out.shape == (m, 256) and out.dtype == dtype
    assert rel_err(out, ref_split_ffn(x, w)) < TOL[dtype]
    for buf in gemv_module._zeroed_bufs.values():
        assert not buf.any()
    assert rel_err(sffn.split_ffn(x, w, path="fused"), out) < REPEAT_TOL[dtype]


@pytest.mark.parametrize(("stages", "xpre"), [(1, False), (3, False), (3, True)])
def test_fused_partial_light_unit(poison, monkeypatch, stages, xpre) -> None:
    """Light units of 64 neurons over 96 light neurons: the last unit has 32, and its down
    projection reads only its own word rows of light_down (and of a); both loop forms (words
    prefetched into registers, or one flat loop for Triton's pipeliner)."""
    from ffnsplit.kernels import fused_decode

    cfg = dataclasses.replace(fused_decode._INTERPRET_CONFIG, nb=64, stages=stages, xpre=xpre)
    monkeypatch.setattr(fused_decode, "_INTERPRET_CONFIG", cfg)
    monkeypatch.setattr(fused_decode, "_CONFIGS", (dataclasses.replace(cfg, num_warps=4),))
    w = random_split_weights(512, 12, 96, "silu", True, True, torch.float16, group=64)
    for m in (1, 2):  # xpre: x's quads a step ahead at one row
        x = torch.randn(m, 512, device=DEVICE).half()
        out = sffn.split_ffn(x, w, path="fused")
        assert rel_err(out, ref_split_ffn(x, w)) < TOL[torch.float16]
    # one step a unit (32 neurons): with xpre, a's quads are loaded once a unit
    monkeypatch.setattr(fused_decode, "_INTERPRET_CONFIG", dataclasses.replace(cfg, nb=32))
    out = sffn.split_ffn(x[:1], w, path="fused")
    assert rel_err(out, ref_split_ffn(x[:1], w)) < TOL[torch.float16]


def test_fused_path_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    """path="fused" takes 1-4 rows and K that splits into whole groups per lane, and says so
    otherwise; its halves are not separate paths; "auto" takes it on a GPU only, up to
    AUTO_MAX_M rows."""
    from ffnsplit.kernels import fused_decode

    w = random_split_weights(512, 8, 64, "silu", True, False, torch.float16, group=128)
    x = torch.randn(5, 512, device=DEVICE).half()
    with pytest.raises(ValueError, match="kernel path 'fused' takes 1 to 4 rows"):
        sffn.split_ffn(x, w, path="fused")
    odd = random_split_weights(96, 8, 64, "silu", True, False, torch.float16, group=32)
    with pytest.raises(ValueError, match="whole quantization groups"):
        sffn.split_ffn(torch.randn(1, 96, device=DEVICE).half(), odd, path="fused")
    with pytest.raises(ValueError, match="only split_ffn"):
        sffn.split_activations(x[:1], w, path="fused")
    monkeypatch.setattr(fused_decode, "AUTO_MAX_M", 2)
    assert fused_decode.use(2, x[:2], w, "auto") == ON_GPU
    assert not fused_decode.use(3, x[:3], w, "auto")
    assert sffn.ffn_path(2, x[:2], w) == ("fused" if ON_GPU else sffn.kernel_path(2, x[:2], w))
    monkeypatch.setattr(fused_decode, "ENABLED", False)
    assert not fused_decode.use(1, x[:1], w, "auto")


def test_auto_path_picks_gemv_for_few_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    from ffnsplit.kernels import fused_decode

    w = random_split_weights(64, 8, 32, "relu", False, False, torch.float32)
    monkeypatch.setattr(tiles, "GEMV_MAX_M", 2)
    monkeypatch.setattr(fused_decode, "AUTO_MAX_M", 0)
    calls = []
    monkeypatch.setattr(sffn.gemv, "split_activations", lambda *a: calls.append("A"))
    monkeypatch.setattr(qmm.gemv, "split_linear", lambda *a: calls.append("B"))
    sffn.split_ffn(torch.randn(1, 64, device=DEVICE), w)
    assert calls == ["A", "B"]
    x = torch.randn(3, 64, device=DEVICE)  # 3 rows > 2: the tensor-core tier runs
    assert rel_err(sffn.split_ffn(x, w), ref_split_ffn(x, w)) < TOL[torch.float32]
    assert calls == ["A", "B"]


def test_empty_batch() -> None:
    w = random_split_weights(32, 4, 32, "silu", True, True, torch.float32)
    assert sffn.split_ffn(torch.randn(0, 32, device=DEVICE), w).shape == (0, 32)
    x = torch.randn(0, 256, device=DEVICE)
    w = random_split_weights(256, 4, 32, "silu", True, True, torch.float32, group=64)
    assert sffn.split_ffn(x, w, path="fused").shape == (0, 256)


# ---------------------------------------------------------------------------------------------
# GPU only: bf16, realistic shapes, CUDA graphs


@gpu
@needs_cuda
@pytest.mark.parametrize("path", ["gemv", "decode", "small", "prefill", "dequant"])
@pytest.mark.parametrize(
    ("bits", "group", "symmetric"),
    [(4, 128, False), (4, 64, True), (8, 128, False), (3, 64, True), (2, 32, False)],
)
def test_bf16(poison, bits, group, symmetric, path) -> None:
    qw = random_qweight(200, 512, bits, group, symmetric)
    x = torch.randn(37, 512, device=DEVICE, dtype=torch.bfloat16)
    out = qmm.quant_matmul(x, qw, path=path)
    assert rel_err(out, ref_linear(x, qw, None)) < TOL[torch.bfloat16]
    w = random_split_weights(
        256, 24, 96, "gelu", True, True, torch.bfloat16, bits=bits, group=group, symmetric=symmetric
    )
    xs = torch.randn(5, 256, device=DEVICE, dtype=torch.bfloat16)
    assert rel_err(sffn.split_ffn(xs, w, path=path), ref_split_ffn(xs, w)) < TOL[torch.bfloat16]


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 16, 64, 300])
def test_large_split_ffn(poison, dtype, m) -> None:
    """A 1024 -> 4096 SwiGLU with 5% heavy neurons and int4 g128 light ones, every tier."""
    w = random_split_weights(1024, 200, 3904, "silu", True, False, dtype, bits=4, group=128)
    x = torch.randn(m, 1024, device=DEVICE, dtype=dtype)
    assert rel_err(sffn.split_ffn(x, w), ref_split_ffn(x, w)) < TOL[dtype]


@pytest.mark.parametrize("heavy_scratch", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_dequant_path_chunks(poison, monkeypatch, dtype, heavy_scratch) -> None:
    """The dequantize + GEMM path over several chunks (the last one partial), with biases; heavy
    neurons through their own GEMMs or riding in the scratch (HEAVY_IN_SCRATCH), an odd heavy
    count (unaligned light columns) too."""
    monkeypatch.setattr(dequant_gemm, "CHUNK_BYTES", 1)  # the smallest chunk: 128 features
    monkeypatch.setattr(dequant_gemm, "HEAVY_IN_SCRATCH", heavy_scratch)
    for h, activation, gated, biases in ((24, "gelu", True, True), (37, "silu", False, False)):
        w = random_split_weights(160, h, 288, activation, gated, biases, dtype, bits=4, group=64)
        x = torch.randn(9, 160, device=DEVICE).to(dtype)
        assert rel_err(sffn.split_ffn(x, w, path="dequant"), ref_split_ffn(x, w)) < TOL[dtype]
    for bits, group, symmetric in ((3, 32, False), (4, 64, True), (4, PER_CHANNEL, False)):
        qw = random_qweight(300, 96, bits, group, symmetric)
        qw2 = random_qweight(300, 96, bits, group, symmetric)
        out = torch.full((200, 96), float("nan"), device=DEVICE)
        dequant_gemm.dequantize_chunk(qw, 150, 250, out, second=qw2)
        ref = torch.cat((qw.dequantize()[150:250], qw2.dequantize()[150:250]))
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=0)


def test_dequantize_chunk_second_row(poison) -> None:
    """The second weight at a given row (a gap of other rows between the two is left alone); a
    gap without a second weight, or one shorter than the chunk, is refused."""
    qw, qw2 = (random_qweight(300, 96, 4, 32, False) for _ in range(2))
    out = torch.full((230, 96), float("nan"), device=DEVICE)
    dequant_gemm.dequantize_chunk(qw, 150, 250, out, second=qw2, second_row=130)
    torch.testing.assert_close(out[:100], qw.dequantize()[150:250], rtol=1e-6, atol=0)
    assert out[100:130].isnan().all()
    torch.testing.assert_close(out[130:], qw2.dequantize()[150:250], rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="second_row"):
        dequant_gemm.dequantize_chunk(qw, 150, 250, out[:100], second_row=100)
    with pytest.raises(ValueError, match="second_row"):
        dequant_gemm.dequantize_chunk(qw, 150, 250, out[:190], second=qw2, second_row=90)


@pytest.mark.parametrize("heavy_scratch", [False, True])
def test_dequant_split_linear(poison, monkeypatch, heavy_scratch) -> None:
    """The down-projection form on the dequant path over chunks: dense columns (an odd count) and
    packed columns into one output, with and without a bias, heavy columns folded into each
    chunk's scratch or through their own GEMM."""
    monkeypatch.setattr(dequant_gemm, "CHUNK_BYTES", 1)
    monkeypatch.setattr(dequant_gemm, "HEAVY_IN_SCRATCH", heavy_scratch)
    n, kh, kl, m = 300, 37, 96, 7
    heavy = torch.randn(n, kh, device=DEVICE)
    light = random_qweight(n, kl, 4, 32, False)
    x = torch.randn(m, kh + kl, device=DEVICE)
    for bias in (torch.randn(n, device=DEVICE), None):
        out = qmm.split_linear(x, heavy, light, bias, path="dequant")
        ref = x[:, :kh].double() @ heavy.double().T + ref_linear(x[:, kh:], light, bias)
        assert rel_err(out, ref) < 1e-5


def test_dequant_gemm_operands_aligned(poison, monkeypatch) -> None:
    """On the dequant path (heavy rows in the scratch; without, kernel A's heavy GEMMs) every
    cuBLAS operand and output has K, row strides and base addresses in multiples of 16 bytes,
    also for heavy and light counts that are not: cuBLAS
    falls back to ~2x slower sm75 kernels otherwise (H200, 717 heavy neurons, session 11). The
    zero padding that makes K aligned leaves the result exact (poison: unzeroed pad is NaN)."""
    monkeypatch.setattr(dequant_gemm, "CHUNK_BYTES", 1)
    seen = []

    def record(name, fn):
        def wrapped(*args, **kwargs):
            result = fn(*args, **kwargs)  # the output too: a fresh one has the row stride N
            mats = [t for t in (*args, result) if torch.is_tensor(t) and t.dim() == 2]
            seen.append((name, [(t.shape, t.stride(), t.data_ptr() % 16) for t in mats]))
            return result

        return wrapped

    monkeypatch.setattr(torch, "mm", record("mm", torch.mm))
    monkeypatch.setattr(torch, "addmm", record("addmm", torch.addmm))
    monkeypatch.setattr(torch.Tensor, "__matmul__", record("matmul", torch.Tensor.__matmul__))
    cases = [(37, 288, True, True), (21, 96, False, True), (37, 288, True, False)]
    for h, n_light, biases, fold in cases:  # h + l = 325, 117; fold: heavy rows in the scratch
        monkeypatch.setattr(dequant_gemm, "HEAVY_IN_SCRATCH", fold)
        w = random_split_weights(160, h, n_light, "silu", True, biases, torch.float32, bits=4,
                                 group=32)  # fmt: skip
        x = torch.randn(11, 160, device=DEVICE)
        seen.clear()
        if not fold:  # kernel B's heavy GEMM reads the stored [H, h] weight: kernel A only
            assert rel_err(sffn.split_activations(x, w, path="dequant"),
                           reference.split_activations(x, w)) < 1e-5  # fmt: skip
        else:
            assert rel_err(sffn.split_ffn(x, w, path="dequant"), ref_split_ffn(x, w)) < 1e-5
        assert {name for name, _ in seen} >= {"mm"} and len(seen) >= 3
        for name, mats in seen:
            for shape, stride, offset in mats:
                assert (
                    offset == 0
                    and stride[0] % 8 == 0
                    and stride[1] == 1
                    or (stride[0] == 1 and stride[1] % 8 == 0 and offset == 0)
                ), (name, shape, stride, offset)
            k = mats[0][0][1]  # x's columns: the GEMM's K
            assert k % 8 == 0, (name, k)


@pytest.mark.parametrize("index", range(len(dequant_gemm._CONFIGS)))
def test_every_dequant_config(poison, monkeypatch, index) -> None:
    """Each dequant tile candidate alone (the tuner may pick any) on odd shapes: K = 96 or 224
    (a partial K-block), 100 features of 300 from feature 150, two weights in one launch; a
    config whose K-block would span groups is left out (the first one stands in)."""
    cfg = dequant_gemm._CONFIGS[index]
    monkeypatch.setattr(dequant_gemm, "_configs", lambda: (cfg,))
    for bits, group, k in ((4, PER_CHANNEL, 96), (4, 128, 224), (8, 64, 224), (2, 32, 96)):
        qw = random_qweight(300, k, bits, group, False)
        qw2 = random_qweight(300, k, bits, group, False)
        out = torch.full((200, k), float("nan"), device=DEVICE)
        dequant_gemm.dequantize_chunk(qw, 150, 250, out, second=qw2)
        ref = torch.cat((qw.dequantize()[150:250], qw2.dequantize()[150:250]))
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=0)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("index", range(5))
def test_every_fused_config(poison, monkeypatch, dtype, index) -> None:
    """Each one-launch candidate alone (the tuner may pick any), 1-4 rows, on a shape every
    candidate takes (K = 1,024, groups of 128): 37 heavy neurons (partial heavy units), 416
    light (partial light units), biases."""
    from ffnsplit.kernels import fused_decode

    cfg = fused_decode._CONFIGS[index]
    monkeypatch.setattr(fused_decode, "_CONFIGS", (cfg,))
    w = random_split_weights(1024, 37, 416, "silu", True, True, dtype, bits=4, group=128)
    assert fused_decode._config_ok(cfg, w)
    for m in (1, 2, 3, 4):
        x = torch.randn(m, 1024, device=DEVICE).to(dtype)
        out = sffn.split_ffn(x, w, path="fused")
        assert rel_err(out, ref_split_ffn(x, w)) < TOL[dtype], (m, cfg)


def _tier_cases() -> list[tuple[str, int]]:
    return [(tier, i) for tier in ("decode", "small", "prefill")
            for i in range(max(len(qmm._CONFIGS[tier]), len(sffn._CONFIGS[tier])))]  # fmt: skip


def test_down_projection_k_splits() -> None:
    """Split-K of the down projection: per_sm configs fill exactly one wave (floor), the others at
    least 2 programs an SM (ceil); a split always keeps 4 K-blocks and one tile per split."""
    cfg = tiles.TileConfig(16, 64, 128, 64, num_warps=4, num_stages=4)
    # Llama-3-8B down projection at M = 16: 64 column tiles, 12 heavy + 107 light K-blocks
    assert qmm.n_splits(cfg, 16, 4096, 720, 13632, 132) == 5  # ceil(264 / 64)
    five = dataclasses.replace(cfg, per_sm=5)
    assert qmm.n_splits(five, 16, 4096, 720, 13632, 132) == 10  # 10 * 64 <= 660 < 11 * 64
    assert qmm.n_splits(dataclasses.replace(cfg, per_sm=4), 16, 4096, 720, 13632, 132) == 8
    assert qmm.n_splits(five, 16, 4096, 0, 256, 132) == 1  # 2 K-blocks: nothing to split
    assert qmm.n_splits(five, 2048, 4096, 720, 13632, 132) == 1  # the tiles fill the GPU
    two = dataclasses.replace(five, waves=2)
    assert qmm.n_splits(two, 16, 4096, 720, 13632, 132) == 20  # 20 * 64 <= 1,320 < 21 * 64
    # kernel A at M = 16: 258 tiles, 3 an SM, two waves: 3 slices (774 of 792 slots)
    assert qmm.wave_splits(dataclasses.replace(cfg, per_sm=3, waves=2), 258, 32, 132) == 3


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("tier", "index"), _tier_cases())
def test_every_config(poison, monkeypatch, dtype, tier, index) -> None:
    """Each candidate config of a tier (autotune may pick any of them), alone, at odd shapes:
    int4 g128 (blocks inside a group: the uniform dequant) and int4 g32 (scales per word row)."""
    m = {"decode": 11, "small": 77, "prefill": 300}[tier]
    for module in (qmm, sffn):
        configs = module._CONFIGS[tier]
        monkeypatch.setitem(module._CONFIGS, tier, (configs[min(index, len(configs) - 1)],))
    for group, symmetric in ((128, False), (32, True)):
        w = random_split_weights(1056, 72, 2016, "silu", True, True, dtype, bits=4, group=group,
                                 symmetric=symmetric)  # fmt: skip
        x = torch.randn(m, 1056, device=DEVICE, dtype=dtype)
        assert rel_err(sffn.split_ffn(x, w, path=tier), ref_split_ffn(x, w)) < TOL[dtype]


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("index", range(len(gemv_module._CONFIGS)))
def test_every_gemv_config(poison, monkeypatch, dtype, index) -> None:
    """Each candidate of the GEMV decode path alone (its tuner may pick any, per kernel; kernel B's
    fused-reduction candidates included), at odd shapes, 1 and 3 rows, twice (the arrival
    counters are left at zero: the second call agrees bitwise, up to rounding for atomic
    configs, whose accumulators are left at zero too)."""
    monkeypatch.setattr(gemv_module, "_CONFIGS", (gemv_module._CONFIGS[index],))
    monkeypatch.setattr(gemv_module, "ATOMIC_OK", True)  # the atomic configs too, whatever the env
    for group, symmetric in ((128, False), (32, True)):
        w = random_split_weights(1056, 72, 2016, "silu", True, True, dtype, bits=4, group=group,
                                 symmetric=symmetric)  # fmt: skip
        for m in (1, 3):
            x = torch.randn(m, 1056, device=DEVICE, dtype=dtype)
            out = sffn.split_ffn(x, w, path="gemv")
            assert rel_err(out, ref_split_ffn(x, w)) < TOL[dtype]
            again = sffn.split_ffn(x, w, path="gemv")
            if gemv_module._CONFIGS[0].atomic:  # sums in arrival order: equal up to rounding
                assert rel_err(again, out) < REPEAT_TOL[dtype]
            else:
                assert torch.equal(out, again)


@gpu
@needs_cuda
def test_cuda_graph_replay() -> None:
    """After one warm-up call, split_ffn captures into a CUDA graph and replays on new inputs."""
    w = random_split_weights(512, 32, 992, "silu", True, True, torch.float16, bits=4, group=128)
    x = torch.randn(4, 512, device=DEVICE, dtype=torch.float16)
    sffn.split_ffn(x, w)  # tunes and compiles outside the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        sffn.split_ffn(x, w)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = sffn.split_ffn(x, w)
    for _ in range(2):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(y, ref_split_ffn(x, w)) < TOL[torch.float16]


def test_tuner_keeps_the_faster_round(monkeypatch) -> None:
    """The tuner times every config in two interleaved rounds and keeps each one's faster median
    (the first timings on an idle GPU are slow while clocks ramp up); configs that do not fit the
    GPU are skipped."""
    import triton

    script = iter([10.0, 4.0, 3.0, 1.0, 4.5, 3.2])  # round 1 then round 2, "fits" skipped
    monkeypatch.setattr(tiles, "AUTOTUNE", True)

    def fake_time(fn):
        fn()
        return next(script)

    monkeypatch.setattr(tiles, "_time_ms", fake_time)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    runs = []

    def run(cfg):
        runs.append(cfg)
        if cfg == "too-big":
            raise triton.runtime.errors.OutOfResources(1, 0, "shared memory")

    tuner = tiles.Tuner()
    assert tuner.pick(("k",), ["a", "b", "too-big", "c"], run) == "a"
    assert tuner.timings[("k",)] == {"a": 1.0, "b": 4.0, "c": 3.0}
    assert runs.count("too-big") == 1
    assert tuner.pick(("k",), ["a", "b", "too-big", "c"], run) == "a"  # cached: no new timing


@gpu
@needs_cuda
def test_tuner_timing_on_gpu(poison) -> None:
    """The tuner's GPU timing (CUDA-graph replays of a GEMV split FFN): a positive time, and the
    kernel's output is still right after the capture and replays."""
    w = random_split_weights(512, 32, 992, "silu", True, True, torch.float16, bits=4, group=128)
    x = torch.randn(2, 512, device=DEVICE, dtype=torch.float16)
    ms = tiles._time_ms(lambda: sffn.split_ffn(x, w, path="gemv"))
    assert 0 < ms < 100
    assert rel_err(sffn.split_ffn(x, w, path="gemv"), ref_split_ffn(x, w)) < TOL[torch.float16]
