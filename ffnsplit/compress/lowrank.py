"""Low-rank light parts: W [N, K] ~ A [N, r] @ B [r, K], by truncated SVD.

Plain SVD minimises the weight error ||W - AB||_F. What matters is the output error on real inputs,
||X (W - AB)^T||_F, so two activation-weighted variants are offered:
- `input_scale` s [K] (e.g. sqrt of E[x_k^2]): SVD of W diag(s), then B diag(s)^-1. Optimal when
  input features are uncorrelated.
- `hessian` H [K, K] (sum or mean of x x^T): with H + damping = L L^T (Cholesky), SVD of W L, then
  B L^-1. Optimal for the (damped) calibration inputs, correlations included (as in SVD-LLM).
The singular values are split evenly (sqrt) between A and B so both factors have similar ranges.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ffnsplit.compress.quant import check_finite
from ffnsplit.errors import CheckpointError, OptionError


@dataclass
class LowRank:
    """A rank-r factorization W ~ a @ b of a weight [N, K] (y = x W^T = (x b^T) a^T)."""

    a: torch.Tensor  # [N, r]
    b: torch.Tensor  # [r, K]

    def __post_init__(self) -> None:
        if self.a.dim() != 2 or self.b.dim() != 2 or self.a.shape[1] != self.b.shape[0]:
            raise ValueError(
                f"low-rank factors must be [N, r] and [r, K], got {tuple(self.a.shape)} and "
                f"{tuple(self.b.shape)}"
            )

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.a.shape[0]), int(self.b.shape[1])

    @property
    def rank(self) -> int:
        return int(self.a.shape[1])

    def nbytes(self) -> int:
        return self.a.numel() * self.a.element_size() + self.b.numel() * self.b.element_size()

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight [N, K] this factorization represents."""
        return (self.a.to(torch.float32) @ self.b.to(torch.float32)).to(dtype)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> x W^T [..., N], in x's dtype, without forming W."""
        return (x @ self.b.to(x.dtype).t()) @ self.a.to(x.dtype).t()

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        """A copy on `device`, factors cast to `dtype` when given."""
        return LowRank(a=self.a.to(device, dtype), b=self.b.to(device, dtype))

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """Flat tensors for a safetensors file, keys prefixed with `prefix`."""
        return {f"{prefix}.lowrank_a": self.a, f"{prefix}.lowrank_b": self.b}

    def meta(self) -> dict:
        """JSON-able description needed (with `tensors`) to rebuild this factorization."""
        return {"rank": self.rank, "shape": list(self.shape)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str, meta: dict) -> LowRank:
        try:
            a, b = tensors[f"{prefix}.lowrank_a"], tensors[f"{prefix}.lowrank_b"]
        except KeyError as missing:
            raise CheckpointError(f"checkpoint lacks tensor {missing}: it is incomplete") from None
        n, k = (int(d) for d in meta["shape"])
        rank = int(meta["rank"])
        if tuple(a.shape) != (n, rank) or tuple(b.shape) != (rank, k):
            raise CheckpointError(
                f"low-rank factors {prefix} are {tuple(a.shape)} and {tuple(b.shape)}, the "
                f"checkpoint's metadata says rank {rank} of [{n}, {k}]: the file is corrupt"
            )
        return cls(a=a, b=b)


def rank_for_budget(n: int, k: int, nbytes: int, dtype_bytes: int = 2) -> int:
    """Largest rank whose factors fit in `nbytes` (0 if none fits), at most min(N, K)."""
    return max(0, min(n, k, nbytes // ((n + k) * dtype_bytes)))


def lowrank_factorize(
    W: torch.Tensor,
    rank: int,
    hessian: torch.Tensor | None = None,
    input_scale: torch.Tensor | None = None,
    damp: float = 0.01,
    dtype: torch.dtype = torch.float16,
) -> LowRank:
    """Rank-`rank` factorization of W [N, K], plain or activation-weighted (see module docstring).

    Computed in fp32 on W's device; factors stored in `dtype`. `damp` (fraction of mean H_ii added
    to H's diagonal) keeps the Hessian invertible when some inputs are dead or collinear.
    """
    if W.dim() != 2:
        raise OptionError(f"expected a 2-D weight [N, K], got shape {tuple(W.shape)}")
    n, k = W.shape
    if not 1 <= rank <= min(n, k):
        raise OptionError(
            f"rank {rank} is out of range for a [{n}, {k}] weight: use 1..{min(n, k)}"
        )
    if hessian is not None and input_scale is not None:
        raise OptionError(
            "give either a Hessian or an input scale for low-rank weighting, not both"
        )
    w = W.detach().to(torch.float32)
    check_finite(w, "the weight to factorize")

    if hessian is not None:
        if tuple(hessian.shape) != (k, k):
            raise OptionError(f"Hessian must be [{k}, {k}], got {tuple(hessian.shape)}")
        if not damp > 0:
            raise OptionError(f"damp must be > 0, got {damp}")
        h = hessian.detach().to(w.device, torch.float32)
        check_finite(h, "the calibration Hessian")
        mean_diag = float(torch.diagonal(h).mean())
        if mean_diag <= 0:
            raise OptionError("the Hessian is zero: no calibration inputs reached this layer")
        h = h + damp * mean_diag * torch.eye(k, dtype=torch.float32, device=w.device)
        lower, info = torch.linalg.cholesky_ex(h)
        if int(info):
            raise OptionError("the Hessian is not positive semi-definite: it is not a sum of x x^T")
        u, s, vh = torch.linalg.svd(w @ lower, full_matrices=False)
    elif input_scale is not None:
        if tuple(input_scale.shape) != (k,):
            raise OptionError(f"input_scale must be [{k}], got {tuple(input_scale.shape)}")
        scale = input_scale.detach().to(w.device, torch.float32)
        check_finite(scale, "the input scale")
        if bool((scale < 0).any()) or float(scale.max()) == 0:
            raise OptionError("input_scale must be >= 0 and not all zero")
        scale = scale.clamp(min=float(scale.max()) * 1e-6)  # dead inputs: weight kept, barely
        u, s, vh = torch.linalg.svd(w * scale, full_matrices=False)
    else:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)

    root = s[:rank].sqrt()
    a = u[:, :rank] * root
    b = root[:, None] * vh[:rank]
    if hessian is not None:
        b = torch.linalg.solve_triangular(lower, b, upper=False, left=False)  # b L^-1
    elif input_scale is not None:
        b = b / scale
    return LowRank(a=a.to(dtype).contiguous(), b=b.to(dtype).contiguous())
