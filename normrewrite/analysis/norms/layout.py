"""A norm's axes in the model's own layout: from the value a norm reads back through the layout
ops that produced it (transpose, permute, view/reshape/flatten/unflatten, contiguous), mapping
the normalized axes onto the tensor before them. A reshape is followed only while every group of
dims it merges or splits is either wholly normalized or wholly not (else the channel is mixed
with a normalized axis and the source has no such axes)."""

from __future__ import annotations

import math

import torch
from torch.fx import Node

from normrewrite.analysis.norms.ops import kwarg
from normrewrite.core.graph import node_shape

aten = torch.ops.aten

_PERMUTE = {aten.permute.default, torch.permute, "permute"}
_TRANSPOSE = {aten.transpose.int, torch.transpose, "transpose", aten.t.default, "t"}
_RESHAPE = {
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.flatten.using_ints,
    aten.unflatten.int, torch.reshape, torch.flatten, torch.unflatten,
    "view", "reshape", "flatten", "unflatten",
}  # fmt: skip
_SAME = {aten.contiguous.default, aten.clone.default, "contiguous", "clone"}


def _target(node: Node) -> object:
    return node.target if node.op in ("call_function", "call_method") else None


def _permutation(node: Node, rank: int) -> list[int] | None:
    """out dim i = source dim perm[i]."""
    t = _target(node)
    if t in _PERMUTE:
        dims = (
            node.args[1:]
            if node.op == "call_method" and len(node.args) > 2
            else [kwarg(node, 1, "dims")]
        )
        dims = dims[0] if len(dims) == 1 and not isinstance(dims[0], int) else dims
        return [int(d) % rank for d in dims] if dims and None not in dims else None
    if t in _TRANSPOSE:
        a, b = (
            (0, 1)
            if t in (aten.t.default, "t")
            else (kwarg(node, 1, "dim0"), kwarg(node, 2, "dim1"))
        )
        if not isinstance(a, int) or not isinstance(b, int):
            return None
        perm = list(range(rank))
        perm[a % rank], perm[b % rank] = perm[b % rank], perm[a % rank]
        return perm
    return None


def _group_of(shape: tuple[int, ...], bounds: list[int]) -> list[int]:
    """For each dim of ``shape``, the index of the group (between consecutive ``bounds``) it
    lies in; a size-1 dim joins the group before it (the first group when it leads)."""
    out, start = [], 1
    for size in shape:
        inside = [
            k for k, b in enumerate(bounds[:-1] or [1]) if b < start or (size > 1 and b == start)
        ]
        out.append(max(inside, default=0))
        start *= size
    return out


def _reshaped(src: tuple[int, ...], out: tuple[int, ...], axes: set[int]) -> set[int] | None:
    """``axes`` of ``out`` as axes of ``src`` for a reshape, or None when a group of merged or
    split dims holds both normalized and unnormalized dims of size > 1."""
    prefix = [math.prod(src[:i]) for i in range(len(src) + 1)]
    common = sorted(set(prefix) & {math.prod(out[:i]) for i in range(len(out) + 1)})
    g_src, g_out = _group_of(src, common), _group_of(out, common)
    mapped: set[int] = set()
    for g in set(g_out) | set(g_src):
        dims = [o for o in range(len(out)) if g_out[o] == g]
        big = [o for o in dims if out[o] != 1] or dims
        hit = {o in axes for o in big}
        if len(hit) > 1:
            return None
        if hit == {True}:
            mapped.update(s for s in range(len(src)) if g_src[s] == g)
    return mapped


def _through(node: Node, axes: set[int]) -> tuple[Node, set[int]] | None:
    """(the layout op's source, the axes of it) or None when ``node`` is not a layout op that
    keeps ``axes`` apart from the others."""
    t = _target(node)
    src = node.args[0] if node.args else None
    if t is None or not isinstance(src, Node):
        return None
    if t in _SAME:
        return src, axes
    shape, src_shape = node_shape(node), node_shape(src)
    if shape is None or src_shape is None:
        return None
    perm = _permutation(node, len(shape))
    if perm is not None:
        return src, {perm[a] for a in axes}
    if t not in _RESHAPE:
        return None
    mapped = _reshaped(src_shape, shape, axes)
    return None if mapped is None else (src, mapped)


def source_axes(x: Node, axes: tuple[int, ...]) -> tuple[Node, tuple[int, ...]]:
    """The value before the layout ops that produced ``x`` and the normalized ``axes`` of ``x``
    as axes of it (``(x, axes)`` when ``x`` is not produced by a layout op)."""
    cur, now = x, set(axes)
    while (step := _through(cur, now)) is not None:
        cur, now = step
    return cur, tuple(sorted(now))


__all__ = ["source_axes"]
