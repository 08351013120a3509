"""The Hopper prefill kernels A and B (ffnsplit/kernels/wgmma_prefill.py).

Gluon has no interpreter: the kernel runs on sm_90 GPUs only (the `gpu` tests: odd shapes, partial
last steps and groups, heavy counts off the 64-neuron tiles, rows off the 128-row tiles, every
activation, biases, fp16 and bf16, symmetric or not, against float64; "auto" dispatch). On CPU:
the formats it takes, that "auto" never takes it off sm_90, and that it compiles for sm_90 with
the installed Triton (Gluon's API moves between releases) with its wgmmas kept asynchronous.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from ffnsplit.kernels import mma_decode, reference, tiles, wgmma_prefill
from ffnsplit.kernels import split_ffn as sffn
from ffnsplit.kernels.format import SplitFFNWeights, pad_heavy
from tests.test_kernels import (
    DEVICE,
    ON_GPU,
    TOL,
    gpu,
    random_split_weights,
    ref_split_ffn,
    rel_err,
)
from tests.test_mma_decode import _aot

needs_sm90 = pytest.mark.skipif(
    not (ON_GPU and wgmma_prefill.available(torch.device(DEVICE))),
    reason="needs Gluon's Hopper ops and an sm_90 GPU",
)

# (hidden, heavy, light, m, group, symmetric, activation, biases): K with a partial last step of
# 64 (4160, 1088) or a partial last group (576 in groups of 256), no heavy neurons, rows past one
# and two 128-row tiles, a light count off the 64-neuron tiles
SHAPES = [
    (4160, 77, 1024, 77, 128, False, "silu", False),
    (1088, 200, 544, 300, 64, True, "gelu", True),
    (576, 0, 224, 129, 256, False, "gelu_tanh", True),
    (640, 48, 4128, 200, 128, False, "relu", False),
]


def _ref_activations(x: torch.Tensor, w: SplitFFNWeights) -> torch.Tensor:
    """Kernel A in float64 through the torch reference."""
    names = ("heavy_up", "heavy_gate", "heavy_down", "up_bias", "gate_bias", "down_bias")
    as64 = {n: (None if getattr(w, n) is None else getattr(w, n).double()) for n in names}
    return reference.split_activations(x.double(), replace(w, **as64))


def _weights(case: int, dtype: torch.dtype) -> tuple[SplitFFNWeights, int, int]:
    hidden, h, light, m, group, symmetric, activation, biases = SHAPES[case]
    w = random_split_weights(hidden, h, light, activation, True, biases, dtype, bits=4,
                             group=group, symmetric=symmetric)  # fmt: skip
    return w, hidden, m


def test_formats_it_takes() -> None:
    """int4 in groups of 64 or more (powers of two), gated, with light neurons, fp16/bf16 rows;
    anything else is left to the other paths, with the reason."""
    x = torch.empty(0, 576, dtype=torch.float16)
    w = random_split_weights(576, 20, 64, "silu", True, False, torch.float16, bits=4, group=128,
                             device="cpu")  # fmt: skip
    assert wgmma_prefill.unsupported(x, w) is None
    assert "fp16/bf16" in wgmma_prefill.unsupported(x.float(), w)
    g32 = random_split_weights(576, 20, 64, "silu", True, False, torch.float16, bits=4, group=32,
                               device="cpu")  # fmt: skip
    assert "groups of 32" in wgmma_prefill.unsupported(x, g32)
    b8 = random_split_weights(576, 20, 64, "silu", True, False, torch.float16, bits=8, group=128,
                              device="cpu")  # fmt: skip
    assert "8-bit" in wgmma_prefill.unsupported(x, b8)
    ungated = random_split_weights(576, 20, 64, "gelu", False, False, torch.float16, bits=4,
                                   group=128, device="cpu")  # fmt: skip
    assert "gated" in wgmma_prefill.unsupported(x, ungated)
    heavy_only = random_split_weights(576, 20, 0, "silu", True, False, torch.float16,
                                      device="cpu")  # fmt: skip
    assert "light" in wgmma_prefill.unsupported(x, heavy_only)
    f32_zeros = replace(w, light_up=replace(w.light_up, zeros=w.light_up.zeros.float()))
    assert "dtype" in wgmma_prefill.unsupported(x, f32_zeros)


def test_auto_never_takes_it_off_sm90() -> None:
    """On a CPU (and on GPUs other than sm_90) "auto" keeps the tl tiers at every M."""
    if ON_GPU and wgmma_prefill.available(torch.device(DEVICE)):
        pytest.skip("an sm_90 GPU: the gpu tests cover the dispatch")
    w = random_split_weights(576, 20, 64, "silu", True, False, torch.float16, bits=4, group=128,
                             device="cpu")  # fmt: skip
    x = torch.empty(0, 576, dtype=torch.float16)
    for m in (1, 256, 512):
        assert not wgmma_prefill.use(m, x, w)
        assert sffn.kernel_a_path(m, x, w) == sffn.kernel_path(m, x, w)
        assert not sffn.ffn_path(m, x, w).startswith("wgmma")


def test_down_formats_and_slices() -> None:
    """Kernel B takes int4 light columns with heavy rows 16 bytes apart; its K-slices fill one
    wave of two programs an SM (132 SMs: 128 tiles at 129-256 rows -> 2 slices)."""
    w = random_split_weights(576, 24, 64, "silu", True, False, torch.float16, bits=4, group=128,
                             device="cpu")  # fmt: skip
    a = torch.empty(0, 88, dtype=torch.float16)
    assert wgmma_prefill.down_unsupported(a, w.heavy_down, w.light_down) is None
    assert "light" in wgmma_prefill.down_unsupported(a, w.heavy_down, None)
    odd = torch.zeros(576, 21, dtype=torch.float16)  # rows 42 bytes apart
    assert "16-byte" in wgmma_prefill.down_unsupported(a, odd, w.light_down)
    assert "fp16/bf16" in wgmma_prefill.down_unsupported(a.float(), w.heavy_down, w.light_down)
    assert wgmma_prefill.down_splits(256, 4096, 132) == 2
    assert wgmma_prefill.down_splits(512, 4096, 132) == 1
    assert wgmma_prefill.down_splits(129, 64, 132) == 8


@pytest.mark.parametrize("kernel", ["aot_compile", "aot_compile_down"])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_compiles_for_sm90_without_serialized_wgmmas(kernel, dtype) -> None:
    """The kernel compiles for sm_90 with the installed Triton (no GPU: its own ptxas), fits the
    two programs an SM its grid assumes (255 registers, 2 x 128 threads), and ptxas keeps its
    wgmmas asynchronous: a non-wgmma instruction writing an accumulator between a wgmma and its
    wait makes ptxas serialize them (warning C7515; a one-step loop of the light tile did)."""
    if mma_decode.gluon is None or wgmma_prefill.warpgroup_mma is None:
        pytest.skip(f"Gluon's Hopper ops do not import here: {wgmma_prefill._IMPORT_ERROR}")
    res = _aot(f"from ffnsplit.kernels import wgmma_prefill as wp\nc = wp.{kernel}({dtype!r})")
    assert res["regs"] <= 255
    assert "wgmma.mma_async" in res["ptx"] and "cp.async" in res["ptx"]
    assert "C7515" not in tiles.ptxas_log(res["ptx"], 90)


@gpu
@needs_sm90
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", range(len(SHAPES)))
def test_kernel_a_matches_float64(poison, dtype, case) -> None:
    w, hidden, m = _weights(case, dtype)
    x = torch.randn(m, hidden, device=DEVICE).to(dtype)
    assert wgmma_prefill.unsupported(x, w) is None
    a = torch.empty(m, w.n_heavy + w.n_light, device=DEVICE, dtype=dtype)
    wgmma_prefill.split_activations(x, w, a)
    ref = _ref_activations(x, w)
    assert rel_err(a, ref) < TOL[dtype]
    # for kernel B: each part in its k order, the heavy one zero-padded to whole 32-k blocks
    h = w.n_heavy
    a = torch.empty(m, wgmma_prefill.heavy_cols(h) + w.n_light, device=DEVICE, dtype=dtype)
    wgmma_prefill.split_activations(x, w, a, for_down=True)
    assert rel_err(a, _down_layout(ref, h)) < TOL[dtype]


def _down_layout(a: torch.Tensor, h: int) -> torch.Tensor:
    """a [M, h + l] in kernel B's x layout (`split_activations(..., for_down=True)`)."""
    heavy = torch.zeros(a.shape[0], wgmma_prefill.heavy_cols(h), dtype=a.dtype, device=a.device)
    heavy[:, :h] = a[:, :h]
    parts = [wgmma_prefill.permute_x(heavy, dense=True)] if h else []
    return torch.cat([*parts, wgmma_prefill.permute_x(a[:, h:])], dim=1)


# kernel B: (hidden = outputs, heavy, light, m, group, symmetric, bias, slices): heavy counts
# off the 32-k blocks (padded to 8: 80, 200) and none, light K with a partial pair-step of 128
# (544, 4128), slices whose ranges cross from heavy to light pair-steps
DOWN_SHAPES = [
    (1088, 77, 544, 300, 64, True, True, 3),
    (576, 0, 224, 129, 256, False, False, 2),
    (640, 200, 4128, 200, 128, False, True, 5),
    (4160, 720, 1024, 77, 128, False, False, 1),
]


@gpu
@needs_sm90
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", range(len(DOWN_SHAPES)))
def test_kernel_b_matches_float64(poison, dtype, case) -> None:
    hidden, h, light, m, group, symmetric, bias, slices = DOWN_SHAPES[case]
    w = pad_heavy(random_split_weights(hidden, h, light, "silu", True, bias, dtype, bits=4,
                                       group=group, symmetric=symmetric))  # fmt: skip
    a = torch.randn(m, w.n_heavy + w.n_light, device=DEVICE).to(dtype)
    heavy = w.heavy_down if w.n_heavy else None
    assert wgmma_prefill.down_unsupported(a, heavy, w.light_down) is None
    ref = reference.split_linear(a.double(), None if heavy is None else heavy.double(),
                                 w.light_down, w.down_bias)  # fmt: skip
    for split in (slices, None):
        out = torch.empty(m, hidden, device=DEVICE, dtype=dtype)
        wgmma_prefill.split_linear(a, heavy, w.light_down, w.down_bias, out, split=split)
        assert rel_err(out, ref) < TOL[dtype], split
    out = torch.empty(m, hidden, device=DEVICE, dtype=dtype)  # x as kernel A writes it for B
    wgmma_prefill.split_linear(_down_layout(a, w.n_heavy), heavy, w.light_down, w.down_bias, out,
                               split=slices, permuted=True)  # fmt: skip
    assert rel_err(out, ref) < TOL[dtype]


@gpu
@needs_sm90
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_auto_takes_them_at_prefill_sizes(poison, monkeypatch, dtype) -> None:
    """split_ffn "auto" at M = 256 runs kernels A and B here (B only while DOWN_ENABLED: else
    the tl prefill tier), the FFN matching float64; below MIN_M it takes neither."""
    w = pad_heavy(random_split_weights(1088, 200, 544, "silu", True, True, dtype, bits=4,
                                       group=128))  # fmt: skip
    calls = []
    for name in ("split_activations", "split_linear"):
        run = getattr(wgmma_prefill, name)
        monkeypatch.setattr(wgmma_prefill, name,
                            lambda *args, run=run, name=name, **kw: calls.append(name)
                            or run(*args, **kw))  # fmt: skip
    x = torch.randn(256, 1088, device=DEVICE).to(dtype)
    monkeypatch.setattr(wgmma_prefill, "DOWN_ENABLED", True)
    out = sffn.split_ffn(x, w)
    assert calls == ["split_activations", "split_linear"]
    assert sffn.ffn_path(256, x, w) == "wgmma"
    assert rel_err(out, ref_split_ffn(x, w)) < TOL[dtype]
    monkeypatch.setattr(wgmma_prefill, "DOWN_ENABLED", False)
    calls.clear()
    assert rel_err(sffn.split_ffn(x, w), ref_split_ffn(x, w)) < TOL[dtype]
    assert calls == ["split_activations"] and sffn.ffn_path(256, x, w) == "wgmma+prefill"
    assert rel_err(sffn.split_activations(x, w), _ref_activations(x, w)) < TOL[dtype]
    calls.clear()
    sffn.split_ffn(x[: wgmma_prefill.MIN_M - 1], w)
    assert not calls
