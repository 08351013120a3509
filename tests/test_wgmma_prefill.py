"""The Hopper prefill kernel A (ffnsplit/kernels/wgmma_prefill.py).

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
from ffnsplit.kernels.format import SplitFFNWeights
from tests.test_kernels import DEVICE, ON_GPU, TOL, gpu, random_split_weights, rel_err
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


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_compiles_for_sm90_without_serialized_wgmmas(dtype) -> None:
    """The kernel compiles for sm_90 with the installed Triton (no GPU: its own ptxas), fits the
    two programs an SM its grid assumes (255 registers, 2 x 128 threads), and ptxas keeps its
    wgmmas asynchronous: a non-wgmma instruction writing an accumulator between a wgmma and its
    wait makes ptxas serialize them (warning C7515; a one-step loop of the light tile did)."""
    if mma_decode.gluon is None or wgmma_prefill.warpgroup_mma is None:
        pytest.skip(f"Gluon's Hopper ops do not import here: {wgmma_prefill._IMPORT_ERROR}")
    res = _aot(f"from ffnsplit.kernels import wgmma_prefill as wp\nc = wp.aot_compile({dtype!r})")
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
    assert rel_err(a, _ref_activations(x, w)) < TOL[dtype]


@gpu
@needs_sm90
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_auto_takes_it_at_prefill_sizes(poison, monkeypatch, dtype) -> None:
    """split_ffn "auto" at M = 256 runs kernel A here (and the down projection as before), the
    whole FFN matching float64; outside MIN_M .. MAX_M it does not."""
    w = random_split_weights(1088, 200, 544, "silu", True, True, dtype, bits=4, group=128)
    calls = []
    run = wgmma_prefill.split_activations
    monkeypatch.setattr(wgmma_prefill, "split_activations",
                        lambda *args: calls.append(1) or run(*args))  # fmt: skip
    x = torch.randn(256, 1088, device=DEVICE).to(dtype)
    out = sffn.split_ffn(x, w)
    assert calls and sffn.kernel_a_path(256, x, w) == "wgmma"
    ref = _ref_activations(x, w)
    assert rel_err(sffn.split_activations(x, w), ref) < TOL[dtype]
    assert out.shape == (256, 1088) and not out.isnan().any()
    calls.clear()
    sffn.split_activations(x[: wgmma_prefill.MIN_M - 1], w)
    assert not calls
