"""Structured pruning of FFN neurons: drop the coldest ones (by a profile score) outright."""

from __future__ import annotations

import torch

from ffnsplit.compress.quant import check_finite
from ffnsplit.errors import OptionError


def prune_order(scores: torch.Tensor, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Neuron indices from coldest to hottest by `scores` [I]; ties keep index order.

    `exclude` (indices, e.g. the heavy set) are left out of the order: they are never pruned.
    """
    if scores.dim() != 1:
        raise OptionError(f"neuron scores must be 1-D [I], got shape {tuple(scores.shape)}")
    check_finite(scores, "the neuron scores")
    order = torch.argsort(scores.detach().cpu().to(torch.float64), stable=True)
    if exclude is None or exclude.numel() == 0:
        return order
    excluded = torch.zeros(scores.numel(), dtype=torch.bool)
    index = exclude.detach().cpu().long()
    if bool((index < 0).any()) or bool((index >= scores.numel()).any()):
        raise OptionError(f"excluded neuron indices must lie in [0, {scores.numel()})")
    excluded[index] = True
    return order[~excluded[order]]


def select_pruned(
    scores: torch.Tensor, n_prune: int, exclude: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split neurons into (kept, pruned) index tensors, each ascending; the n_prune coldest go."""
    order = prune_order(scores, exclude)
    if not 0 <= n_prune <= order.numel():
        raise OptionError(
            f"cannot prune {n_prune} neurons: {order.numel()} of {scores.numel()} are prunable"
        )
    pruned = torch.sort(order[:n_prune]).values
    keep = torch.ones(scores.numel(), dtype=torch.bool)
    keep[pruned] = False
    return torch.nonzero(keep).flatten(), pruned
