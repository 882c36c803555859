"""Where a layer's channels (or a stream's features) are after layout ops: pure functions of
shapes, for every graph form (fold-bn, the residual-stream walk).

A fold through ``flatten``/``reshape``/``view``/``transpose``/``permute`` is exact when those ops only
move or merge *other* axes: every element keeps its channel, and the channel is read off one axis
of the tensor the BN (or the layer) sees. :class:`ChannelAxis` records that axis; the ``through_*``
functions carry it across one op, or return None when the op splits the channel axis or merges it
with an outer axis (the channel then no longer has an axis of its own).

Reshapes are row-major reinterpretations: an element at flat offset ``f`` has channel
``(f // (repeat·inner)) % size`` where ``inner`` is the product of the dims after the axis. The
channel survives a reshape onto axis ``b`` of the output iff ``inner' = ∏ out[b+1:]`` divides
``repeat·inner`` and ``out[b] = size · repeat·inner / inner'``. Only the dims from the channel axis
inwards must be known, so a symbolic batch dim is fine.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

Dim = int | None  # None: not known statically


@dataclass(frozen=True)
class ChannelAxis:
    """The channels of a layer, ``size`` of them, along ``axis``; ``repeat`` consecutive positions
    of that axis belong to one channel (a BN2d output flattened: ``repeat = H·W``)."""

    axis: int
    size: int
    repeat: int = 1


def _known(dims: Sequence[Dim]) -> int | None:
    if any(d is None or d < 0 for d in dims):
        return None
    return math.prod(dims)  # type: ignore[arg-type]


def through_reshape(
    ch: ChannelAxis, in_shape: Sequence[Dim], out_shape: Sequence[Dim]
) -> ChannelAxis | None:
    """The channel axis after a row-major reshape of ``in_shape`` to ``out_shape``, or None."""
    if ch.axis >= len(in_shape) or in_shape[ch.axis] != ch.size * ch.repeat:
        return None
    inner = _known(in_shape[ch.axis + 1 :])
    if inner is None:
        return None
    unit = ch.repeat * inner  # elements per channel, contiguous
    for b in range(len(out_shape) - 1, -1, -1):
        inner_b = _known(out_shape[b + 1 :])
        if inner_b is None or inner_b > unit:
            return None
        if unit % inner_b == 0 and out_shape[b] == ch.size * (unit // inner_b):
            return ChannelAxis(b, ch.size, unit // inner_b)
    return None


def through_permute(ch: ChannelAxis, perm: Sequence[int]) -> ChannelAxis:
    """The channel axis after ``y = x.permute(perm)``."""
    return ChannelAxis(list(perm).index(ch.axis), ch.size, ch.repeat)


def transpose_perm(rank: int, dim0: int, dim1: int) -> list[int]:
    perm = list(range(rank))
    d0, d1 = dim0 % rank, dim1 % rank
    perm[d0], perm[d1] = perm[d1], perm[d0]
    return perm


__all__ = ["ChannelAxis", "Dim", "through_permute", "through_reshape", "transpose_perm"]
