"""GPTQ (Frantar et al. 2022): group quantization that compensates each column's rounding error.

Minimises ||X W^T - X Wq^T||_F over the calibration inputs X through their Hessian H = X^T X:
columns are quantized one by one and the not yet quantized columns absorb the error through the
inverse Hessian's Cholesky factor, in blocks with lazy batch updates. Grids follow
`quant.group_grid` (same conventions as round-to-nearest) and each group's grid is computed from
the error-updated weights when the group is entered. With `act_order` columns are visited by
decreasing H_ii, and group grids are static (computed from W before any update) so they still index
contiguous groups of the original columns, as the packed format needs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from ffnsplit.compress.quant import (
    check_finite,
    dequantize_codes,
    group_grid,
    quantize_codes,
    validate_quant_options,
)
from ffnsplit.errors import NumericalError, OptionError
from ffnsplit.kernels.format import QuantizedWeight, n_groups, pack_planes


class HessianAccumulator:
    """Running fp32 sum of x x^T over calibration inputs of one linear layer; mergeable."""

    def __init__(self, in_features: int, device: torch.device | str | None = None) -> None:
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.n_tokens = 0

    @property
    def in_features(self) -> int:
        return int(self.hessian.shape[0])

    def add(self, x: torch.Tensor) -> None:
        """Add inputs x [..., K] (every leading position counts as one token)."""
        if x.shape[-1] != self.in_features:
            raise OptionError(
                f"input has {x.shape[-1]} features, the accumulator expects {self.in_features}"
            )
        flat = x.detach().reshape(-1, self.in_features).to(self.hessian.device, torch.float32)
        check_finite(flat, "the calibration inputs")
        self.hessian.addmm_(flat.t(), flat)
        self.n_tokens += int(flat.shape[0])

    def merge(self, other: HessianAccumulator) -> HessianAccumulator:
        """Add another accumulator's sums into this one (e.g. from another batch or process)."""
        if other.in_features != self.in_features:
            raise OptionError(
                f"cannot merge Hessians of {other.in_features} and {self.in_features} features"
            )
        self.hessian += other.hessian.to(self.hessian.device)
        self.n_tokens += other.n_tokens
        return self

    def second_moment(self) -> torch.Tensor:
        """E[x x^T] over the tokens seen."""
        if self.n_tokens == 0:
            raise OptionError("no calibration tokens were accumulated: feed inputs first")
        return self.hessian / self.n_tokens


def _inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damping)^-1; damping grows tenfold until it factors."""
    diag_mean = float(torch.diagonal(hessian).mean())
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    for attempt in range(4):
        damped = hessian + (damp * 10**attempt * diag_mean) * eye
        lower, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if int(info) == 0:
                return upper
    raise NumericalError(
        "the calibration Hessian is not positive definite even with damping: use more "
        "calibration tokens or a larger damp"
    )


@contextmanager
def _one_thread_on_cpu(device: torch.device) -> Iterator[None]:
    """Run GPTQ on one CPU thread: its per-column updates are too small to share, and on a busy
    CPU waking a second thread for each one costs milliseconds (measured: 10-50x slower)."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _block_size(k: int, group_size: int, block_size: int) -> int:
    """A block size such that every group either lies in one block or starts at a block start."""
    if group_size >= k or group_size % block_size == 0:
        return block_size
    if group_size <= block_size:
        return block_size // group_size * group_size
    return group_size


def quantize_gptq(
    W: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    scale_dtype: torch.dtype = torch.float16,
) -> QuantizedWeight:
    """GPTQ-quantize W [N, K] given the input Hessian [K, K] (sum of x x^T); runs on W's device.

    Inputs never seen in calibration (H_ii == 0) get weight 0, as in the reference implementation.
    `damp` is the fraction of mean(H_ii) added to the diagonal.
    """
    if W.dim() != 2:
        raise OptionError(f"expected a 2-D weight [N, K], got shape {tuple(W.shape)}")
    n, k = W.shape
    validate_quant_options(k, bits, group_size, scale_dtype)
    if tuple(hessian.shape) != (k, k):
        raise OptionError(
            f"Hessian must be [{k}, {k}] for a weight with K={k}, got {tuple(hessian.shape)}"
        )
    if not damp > 0:
        raise OptionError(f"damp must be > 0, got {damp}")
    if block_size <= 0:
        raise OptionError(f"block_size must be > 0, got {block_size}")
    w = W.detach().to(torch.float32).clone()
    check_finite(w, "the weight to quantize")
    h = hessian.detach().to(w.device, torch.float32).clone()
    check_finite(h, "the calibration Hessian")

    dead = torch.diagonal(h) == 0
    torch.diagonal(h).masked_fill_(dead, 1.0)
    w[:, dead] = 0.0

    size = min(group_size, k)
    groups = n_groups(k, group_size)
    scales = torch.empty(groups, n, dtype=torch.float32, device=w.device)
    zeros = None if symmetric else torch.empty_like(scales)
    if act_order:
        static = F.pad(w, (0, groups * size - k)).view(n, groups, size)
        static_scale, static_zero = group_grid(static, bits, symmetric, scale_dtype)
        scales.copy_(static_scale.t())
        if zeros is not None:
            zeros.copy_(static_zero.t())
        perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)
        w = w[:, perm]
        h = h[perm][:, perm]
    else:
        perm = torch.arange(k, device=w.device)
    group_of = (perm // size).tolist()  # group (in original order) of each visited column
    # Work on W^T [K, N]: a column of W is a contiguous row, so the per-column rank-1 updates are
    # contiguous (an order of magnitude faster on CPU than strided ones).
    wt = w.t().contiguous()
    del w
    codes = torch.empty(k, n, dtype=torch.float32, device=wt.device)
    step = _block_size(k, size, block_size)
    scale = zero = None
    with _one_thread_on_cpu(wt.device):
        hinv = _inverse_hessian_factor(h, damp)
        del h
        for i1 in range(0, k, step):
            i2 = min(i1 + step, k)
            block = wt[i1:i2].clone()
            errors = torch.empty_like(block)
            hinv_block = hinv[i1:i2, i1:i2]
            for i in range(i2 - i1):
                col = i1 + i
                if act_order:
                    g = group_of[col]
                    scale, zero = scales[g], None if zeros is None else zeros[g]
                elif col % size == 0:
                    end = min(col + size, k)
                    # Groups never straddle blocks unless they start at one (see _block_size).
                    current = block[i : end - i1] if end <= i2 else wt[col:end]
                    scale, zero = group_grid(current.t(), bits, symmetric, scale_dtype)
                    scales[col // size] = scale
                    if zeros is not None:
                        zeros[col // size] = zero
                row = block[i]
                q = quantize_codes(row, scale, zero, bits)
                codes[col] = q
                err = (row - dequantize_codes(q, scale, zero, bits)) / hinv_block[i, i]
                block[i + 1 :].addr_(hinv_block[i, i + 1 :], err, alpha=-1.0)
                errors[i] = err
            wt[i2:].addmm_(hinv[i1:i2, i2:].t(), errors, alpha=-1.0)

    codes = codes.t()
    if act_order:
        codes = codes[:, torch.argsort(perm)]
    return QuantizedWeight(
        planes=pack_planes(codes.to(torch.uint8), bits),
        scales=scales.to(scale_dtype),
        zeros=None if zeros is None else zeros.to(scale_dtype),
        bits=bits,
        group_size=group_size,
        shape=(n, k),
    )
