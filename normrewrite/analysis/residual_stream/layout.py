"""The feature axis through layout ops: where the walk finds a stream value's features in the
op's input.

Each op here moves, merges, picks or resamples whole feature vectors, so it commutes with
centring them:

* reshapes (``view``/``reshape``/``flatten``/``squeeze``/``unflatten``) that keep each position's
  feature vector whole — a conv layout ``(N, C, H, W) → (N, C, H·W)`` merges H and W only, a
  flatten of ``(1, 32, 1)`` merges a size-1 dim; the shape math is
  :func:`normrewrite.core.ops.layout.through_reshape`,
* ``transpose``/``permute``, ``expand`` of other dims, ``slice``/``select`` along other axes,
* ``cat`` along other axes. A ``cat`` along the features (Swin's patch merging: four positions'
  C-wide stream values into one 4C-wide vector) is no such op: centring each C-part moves the
  parts by different means, which the LayerNorm over 4C does not ignore (it only ignores one
  shift of all 4C features), so the walk stops there and the cat is a ``"centre"`` writer (an
  explicit mean subtraction over 4C after it); the C-wide values it reads are then read by a
  non-norm op, and the C-wide stream is retried with a cut there,
* interpolation over the spatial axes of ``(N, C, *spatial)`` (YOLOS resizing its position
  table): the same weights for every channel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.fx import Node

from normrewrite.core.graph import node_shape
from normrewrite.core.ops.layout import ChannelAxis, through_reshape

from .ops import _dim, _is, _rank

aten = torch.ops.aten

Sources = list[tuple[Node, int]]

_RESHAPE = (
    {
        aten.view.default,
        aten.reshape.default,
        aten._unsafe_view.default,
        aten.flatten.using_ints,
        aten.unflatten.int,
        aten.squeeze.dim,
        aten.squeeze.dims,
        aten.squeeze.default,
    },
    {torch.reshape, torch.flatten, torch.squeeze, torch.unflatten},
    {"view", "reshape", "flatten", "squeeze", "unflatten"},
)
_RESAMPLE = (
    {
        getattr(aten, op).vec
        for op in (
            "upsample_nearest1d",
            "upsample_nearest2d",
            "upsample_nearest3d",
            "upsample_linear1d",
            "upsample_bilinear2d",
            "upsample_bicubic2d",
            "upsample_trilinear3d",
            "_upsample_bilinear2d_aa",
            "_upsample_bicubic2d_aa",
        )
    },
    {F.interpolate, F.upsample},
    set(),
)


def reshaped_axis(src_shape: tuple[int, ...], shape: tuple[int, ...], axis: int) -> int | None:
    """The axis of ``src_shape`` that a row-major reshape to ``shape`` moves to ``axis``, if it
    keeps each feature vector whole (the features, and only they, on one axis of each)."""
    if axis >= len(shape):
        return None
    ch = through_reshape(ChannelAxis(axis, shape[axis]), shape, src_shape)
    return ch.axis if ch is not None and ch.repeat == 1 else None


def layout_sources(node: Node, axis: int, rank: int) -> Sources | str | None:
    """Where the features of ``node`` (on ``axis``) come from if ``node`` is a layout op: its
    sources with their feature axes, or why the op mixes the features (a problem), or None if
    ``node`` is no layout op handled here (``slice`` or ``cat`` along the features included:
    only a mean subtraction after it centres its output)."""
    if _is(node, {aten.cat.default}, {torch.cat}, set()):
        return _cat(node, axis, rank)
    src = node.args[0] if node.args else None
    if not isinstance(src, Node):
        return None
    shape, src_shape = node_shape(node), node_shape(src)
    if _is(node, *_RESHAPE):
        flat = _flatten_axis(node, axis)
        if flat is not None:
            return [(src, flat)]
        if src_shape is not None and shape is not None:
            ax = reshaped_axis(src_shape, shape, axis)
            if ax is not None:
                return [(src, ax)]
        flattens = "flatten" in str(node.target)
        verb = "flattens the feature dim with others" if flattens else "reshapes the feature dim"
        return f"{node.name} {verb}"
    if _is(node, {aten.transpose.int}, {torch.transpose}, {"transpose"}):
        d0, d1 = (_dim(int(d), rank) for d in node.args[1:3])
        return [(src, d1 if axis == d0 else d0 if axis == d1 else axis)]
    if _is(node, {aten.permute.default}, {torch.permute}, {"permute"}):
        perm = node.args[1] if isinstance(node.args[1], list | tuple) else node.args[1:]
        return [(src, _dim(int(perm[axis]), rank))]
    if _is(node, {aten.expand.default, aten.expand_as.default}, set(), {"expand", "expand_as"}):
        ax = axis - (rank - (_rank(src) or 0))
        if ax < 0 or not src_shape or shape is None or src_shape[ax] != shape[axis]:
            return f"{node.name} broadcasts across the features"
        return [(src, ax)]
    if _is(node, {aten.slice.Tensor}, set(), set()):
        dim = _dim(int(node.args[1]) if len(node.args) > 1 else 0, rank)
        return [(src, axis)] if dim != axis else None
    if _is(node, {aten.select.int}, set(), set()):
        dim = _dim(int(node.args[1]), rank + 1)
        return [(src, axis if axis < dim else axis + 1)]
    if _is(node, *_RESAMPLE):
        if axis >= 2:
            return f"{node.name} resamples along the features"
        return [(src, axis)]
    return None


def _flatten_axis(node: Node, axis: int) -> int | None:
    """A flatten's source axis by its dims alone (no shapes needed), if the features are not
    merged: before ``start``, after ``end``, or ``start == end``."""
    if not _is(node, {aten.flatten.using_ints}, {torch.flatten}, {"flatten"}):
        return None
    r_in = _rank(node.args[0])
    if r_in is None:
        return None
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
    start, end = _dim(int(start), r_in), _dim(int(end), r_in)  # type: ignore[arg-type]
    if axis < start or (axis == start and end == start):
        return axis
    return axis + end - start if axis > start else None


def _cat(node: Node, axis: int, rank: int) -> Sources | str | None:
    parts = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if _dim(int(dim), rank) == axis:  # type: ignore[arg-type]
        return None
    if not isinstance(parts, list | tuple) or not all(isinstance(t, Node) for t in parts):
        return f"{node.name} concatenates a constant into the stream"
    return [(t, axis) for t in parts]


def getitem_axis(idx: tuple[object, ...], r_in: int, axis: int) -> int | None:
    """The source axis of output axis ``axis`` of ``x[idx]`` under basic indexing (ints, slices,
    ``None``, ``...``; no tensors), if it is a whole source axis (a full slice or not indexed);
    YOLOS's ``pos[:, 0][:, None]`` keeps the features, ``x[..., :k]`` does not."""
    if any(isinstance(i, Node) for i in idx) or sum(i is Ellipsis for i in idx) > 1:
        return None
    consumed = sum(i is not None and i is not Ellipsis for i in idx)
    if consumed > r_in:
        return None
    items: list[object] = []
    for i in idx:
        items += [slice(None)] * (r_in - consumed) if i is Ellipsis else [i]
    items += [slice(None)] * (r_in - sum(i is not None for i in items))
    d_in = d_out = 0
    for i in items:
        if i is None or isinstance(i, slice):
            if d_out == axis:
                return d_in if i == slice(None) else None
            d_out += 1
            d_in += i is not None
        elif isinstance(i, int):
            d_in += 1
        else:
            return None
    return None
