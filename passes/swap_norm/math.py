"""swap-norm's tensor math: pure functions of tensors."""

from __future__ import annotations

from torch import Tensor

from normrewrite.passes.fold_bn.math import bn_affine


def frozen_affine(
    mean: Tensor, var: Tensor, gamma: Tensor | None, beta: Tensor | None, eps: float, rank: int
) -> tuple[Tensor, Tensor]:
    """(scale, shift) of an eval BatchNorm, shaped ``(C, 1, …)`` to broadcast over a rank-``rank``
    input, in the dtype of the running mean."""
    scale, shift = bn_affine(mean, var, gamma, beta, eps)
    shape = (-1,) + (1,) * max(rank - 2, 0)
    return scale.reshape(shape).to(mean.dtype), shift.reshape(shape).to(mean.dtype)


def default_groups(channels: int, at_most: int = 32) -> int:
    """The largest divisor of ``channels`` not above ``at_most``."""
    return max(g for g in range(1, min(channels, at_most) + 1) if channels % g == 0)


def channel_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel (dim 1) mean and biased variance over every other dim, in float64."""
    dims = [d for d in range(x.dim()) if d != 1]
    x = x.double()
    return x.mean(dims), x.var(dims, unbiased=False)


def broadcast_chw(t: Tensor, shape: tuple[int, ...]) -> Tensor:
    """A per-channel ``(C,)`` tensor broadcast to ``(C, *S)`` (a copy, so it trains per element)."""
    view = t.reshape((-1,) + (1,) * (len(shape) - 1))
    return view.expand(shape).clone()


__all__ = ["broadcast_chw", "channel_stats", "default_groups", "frozen_affine"]
