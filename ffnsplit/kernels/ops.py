"""Dispatch of the kernel ops: Triton on CUDA tensors, the torch reference elsewhere.

backend="auto" picks Triton when x is on CUDA and the torch reference otherwise; "triton" forces
the kernels (CPU tensors only under TRITON_INTERPRET=1); "torch" forces the reference. Both paths
are CUDA-graph friendly on the GPU after a first (tuning) call per shape: no host syncs and no
data-dependent allocations.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ffnsplit.kernels import quant_matmul as triton_quant_matmul
from ffnsplit.kernels import reference
from ffnsplit.kernels import split_ffn as triton_split_ffn
from ffnsplit.kernels.format import QuantizedWeight, SplitFFNWeights

BACKENDS = ("auto", "triton", "torch")


def _use_triton(x: torch.Tensor, backend: str) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    return backend == "triton" or (backend == "auto" and x.is_cuda)


def quant_matmul(
    x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None, backend: str = "auto"
) -> torch.Tensor:
    """x [..., K] @ qw.dequantize().T (+ bias) -> [..., N] in x's dtype."""
    if _use_triton(x, backend):
        return triton_quant_matmul.quant_matmul(x, qw, bias)
    return reference.quant_matmul(x, qw, bias)


def _heavy_in_dtype(w: SplitFFNWeights, dtype: torch.dtype) -> SplitFFNWeights:
    """`w` with its dense heavy weights in `dtype` (a copy per call: cast them at load time)."""
    changes = {
        name: t.to(dtype)
        for name in ("heavy_up", "heavy_gate", "heavy_down")
        if (t := getattr(w, name)) is not None and t.dtype != dtype
    }
    return replace(w, **changes) if changes else w


def split_ffn(x: torch.Tensor, w: SplitFFNWeights, backend: str = "auto") -> torch.Tensor:
    """The split FFN x [..., H] -> y [..., H] (see docs/ARCHITECTURE.md)."""
    if _use_triton(x, backend):
        return triton_split_ffn.split_ffn(x, _heavy_in_dtype(w, x.dtype))
    return reference.split_ffn(x, w)
