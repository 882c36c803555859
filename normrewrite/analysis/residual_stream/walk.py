"""The backward walk from the LayerNorms' inputs to the stream's writers."""

from __future__ import annotations

import operator
from collections.abc import Set as AbstractSet

import torch
from torch.fx import GraphModule, Node

from normrewrite.core.graph import get_tensor, node_shape, users
from normrewrite.core.ops import conv_info, dense_info
from normrewrite.core.ops.layers import matmul_linear_info

from .layout import getitem_axis, layout_sources
from .ops import (
    _ADD,
    _IN_PLACE,
    _REDUCE,
    _SCALE,
    _VIEW,
    StreamWriter,
    _dim,
    _embedding,
    _is,
    _passthrough,
    _rank,
    uniform_shift,
)

aten = torch.ops.aten


# --------------------------------------------------------------------------- walk


class _Walk:
    def __init__(
        self, gm: GraphModule, layernorms: set[Node], cuts: AbstractSet[Node] = frozenset()
    ) -> None:
        self.gm = gm
        self.cuts = cuts  # stream values to centre explicitly (their sources are not walked)
        self.layernorms = layernorms
        self.axis: dict[Node, int] = {}
        self.writers: dict[object, StreamWriter] = {}
        self.problems: dict[Node, str] = {}
        self.edges: list[tuple[Node, Node]] = []

    def visit(self, node: Node, axis: int, reader: Node) -> None:
        if node in self.layernorms:  # the stream starts at a LayerNorm's output (BLOOM, CLIP)
            key = ("out", node)  # a vertex apart from the norm as a reader of its own stream
            self.edges.append((reader, key))
            self.writers.setdefault(key, StreamWriter(node, "centre", (), axis=axis))
            return
        self.edges.append((reader, node))
        if node in self.axis or node in self.writers:
            if self.axis.get(node, axis) != axis:
                self.problems[node] = f"{node.name} carries the features on two different axes"
            return
        rank = _rank(node)
        if rank is None:
            self.problems[node] = f"the shape of {node.name} is unknown"
            return
        if node in self.cuts:
            self.writers[node] = StreamWriter(node, "centre", (), axis=axis)
            return
        w = self._writer(node, axis, rank)
        if w is not None:
            self.writers[node] = w
            return
        sources = self._sources(node, axis, rank)
        if sources is None:  # no weight surgery centres it: subtract the mean after it
            self.writers[node] = StreamWriter(node, "centre", (), axis=axis)
            return
        self.axis[node] = axis
        for src, src_axis in sources:
            self.visit(src, src_axis, node)
        for u in users(node):  # ``node.add_(y)`` changes what every later reader of node sees
            if _is(u, *_IN_PLACE) and u.args and u.args[0] is node:
                self.visit(u, axis, node)

    def _writer(self, node: Node, axis: int, rank: int) -> StreamWriter | None:
        gm = self.gm
        scaled = self._layer_scale(node, axis, rank) or self._head_part(node, axis, rank)
        if scaled is not None:
            return scaled
        d = dense_info(gm, node) or matmul_linear_info(node)
        if (
            d is not None
            and axis == rank - 1
            and d.weight is not None
            and (d.bias or not d.has_bias)
        ):
            tensors = ((d.weight, d.out_dim),) + (((d.bias, 0),) if d.bias else ())
            return StreamWriter(node, "linear", tensors)
        c = conv_info(gm, node)
        if (
            c is not None
            and axis == 1
            and not c.transposed
            and c.groups == 1
            and c.weight is not None
            and (c.bias or not c.has_bias)
        ):
            return StreamWriter(node, "conv", ((c.weight, 0),) + (((c.bias, 0),) if c.bias else ()))
        table = _embedding(gm, node)
        if table is not None and axis == rank - 1:
            return StreamWriter(node, "embedding", ((table, 1),))
        if node.op == "get_attr":
            t = get_tensor(gm, str(node.target))
            if t.dim() == rank and t.shape[axis] > 1:
                return StreamWriter(node, "constant", ((str(node.target), axis),))
        return None

    def _head_part(self, node: Node, axis: int, rank: int) -> StreamWriter | None:
        """Persimmon's per-head QK-LayerNorm input: ``select(view(linear(x), (..., H, 3, hd)),
        -2, i)``, the fused projection's output split into heads and q/k/v parts, one part
        picked. Centring that part's rows per head (along ``hd``) is weight surgery on the
        projection; the other parts, read by their own selects, stay as they are."""
        if node.target is not aten.select.int or axis != rank - 1:
            return None
        view, dim, idx = node.args[0], int(node.args[1]), int(node.args[2])
        if not (isinstance(view, Node) and _is(view, *_VIEW) and isinstance(view.args[0], Node)):
            return None
        lin, shape = view.args[0], node_shape(view)
        d = dense_info(self.gm, lin) or matmul_linear_info(lin)
        lin_shape = node_shape(lin)
        if d is None or d.weight is None or not (d.bias or not d.has_bias) or not lin_shape:
            return None
        lead = len(lin_shape) - 1
        dim = _dim(dim, rank + 1)
        if shape is None or tuple(shape[:lead]) != tuple(lin_shape[:lead]) or dim < lead:
            return None
        split = tuple(shape[lead:])  # the projection's output features, reshaped
        if dim == len(shape) - 1 or list(users(lin)) != [view]:
            return None
        picks = [(u.target, u.args[1:]) for u in users(view)]
        if any(t is not aten.select.int or _dim(int(a[0]), rank + 1) != dim for t, a in picks):
            return None
        if [int(a[1]) % split[dim - lead] for _, a in picks].count(idx % split[dim - lead]) != 1:
            return None
        tensors = ((d.weight, d.out_dim),) + (((d.bias, 0),) if d.bias else ())
        return StreamWriter(node, "part", tensors, part=(split, dim - lead, idx))

    def _layer_scale(self, node: Node, axis: int, rank: int) -> StreamWriter | None:
        """``λ ⊙ linear(x)`` with a stored per-feature λ (layer scale, BEiT/DINOv2/CaiT), the
        linear's output read only on the way to the multiply."""
        if not (_is(node, *_SCALE) and node.target in (aten.mul.Tensor, operator.mul)):
            return None
        if len(node.args) != 2 or axis != rank - 1:
            return None
        for lam, other in (node.args, node.args[::-1]):
            if not (isinstance(lam, Node) and lam.op == "get_attr" and isinstance(other, Node)):
                continue
            t = get_tensor(self.gm, str(lam.target))
            shape = node_shape(node)
            if shape is None or t.dim() < 1 or t.numel() != t.shape[-1] != shape[axis]:
                continue
            inner = other
            while len(inner.users) == 1 and _passthrough(self.gm, inner):
                inner = inner.args[0]
            if len(inner.users) != 1 or node_shape(inner) != shape:
                continue
            w = self._writer(inner, axis, rank)
            if w is not None and w.kind == "linear":
                return StreamWriter(node, "scaled", w.tensors, str(lam.target), other)
        return None

    def _sources(self, node: Node, axis: int, rank: int) -> list[tuple[Node, int]] | None:
        """Where ``node``'s stream features come from, or None if only an explicit mean
        subtraction after it can centre it (a GELU, a gather, a model input)."""
        gm, shape = self.gm, node_shape(node)
        assert shape is not None
        fail = self.problems.setdefault
        if _passthrough(gm, node):
            return [(node.args[0], axis)]
        if _is(node, *_ADD) and len(node.args) == 2 and node.kwargs.get("alpha", 1) == 1:
            if (shift := uniform_shift(node, axis, rank)) is not None:  # x + c: c is dropped
                self.writers[("shift", node)] = shift
                self.edges.append((node, ("shift", node)))
                return [(node.args[shift.keep], axis)]
            out = []
            for a in node.args:
                r = _rank(a)
                if not isinstance(a, Node) or r is None:
                    fail(node, f"{node.name} adds a constant to the stream")
                    return []
                ax = axis - (rank - r)
                a_shape = node_shape(a)
                if ax < 0 or a_shape is None or a_shape[ax] != shape[axis]:
                    fail(node, f"{node.name} adds a value broadcast across the features")
                    return []
                out.append((a, ax))
            return out
        if _is(node, *_SCALE) and len(node.args) == 2:
            a, b = node.args
            if isinstance(a, Node) and isinstance(b, int | float):
                return [(a, axis)]
            if (
                isinstance(b, Node)
                and isinstance(a, int | float)
                and node.target in (aten.mul.Tensor, operator.mul)
            ):
                return [(b, axis)]
        moved = layout_sources(node, axis, rank)
        if isinstance(moved, str):
            fail(node, moved)
            return []
        if moved is not None:
            return moved
        if _is(node, *_REDUCE):
            return _reduced(node, axis, rank)
        return _indexing(node, axis, rank)


def _indexing(node: Node, axis: int, rank: int) -> list[tuple[Node, int]] | None:
    """Ops that pick, add or tile positions of a stored table without touching the features
    (``unsqueeze``, ``index_select``, ``index``/``getitem``, ``repeat``, ``gather`` with an index
    constant along the features): the table is the writer, centred in place."""
    src = node.args[0] if node.args else None
    if not isinstance(src, Node):
        return None
    r_in = _rank(src)
    if r_in is None:
        return None
    if _is(node, {aten.unsqueeze.default}, {torch.unsqueeze}, {"unsqueeze"}):
        dim = _dim(int(node.args[1]), rank)
        return [(src, axis if axis < dim else axis - 1)] if axis != dim else None
    if _is(node, {aten.index_select.default}, {torch.index_select}, {"index_select"}):
        return [(src, axis)] if _dim(int(node.args[1]), rank) != axis else None
    if _is(node, {aten.repeat.default}, set(), {"repeat"}):
        reps = node.args[1:] if node.op == "call_method" else node.args[1]
        reps = reps[0] if len(reps) == 1 and isinstance(reps[0], list | tuple) else reps
        ax = axis - (rank - r_in)
        return [(src, ax)] if ax >= 0 and int(reps[axis]) == 1 else None
    last = axis == rank - 1
    if last and _is(node, {aten.index.Tensor}, set(), set()):
        return [(src, r_in - 1)] if len(node.args[1]) < r_in else None
    if node.op == "call_function" and node.target is operator.getitem:
        idx = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        if not any(isinstance(i, Node) for i in idx):
            ax = getitem_axis(idx, r_in, axis)
            return [(src, ax)] if ax is not None else None
        plain = all(isinstance(i, slice | int | Node) for i in idx)  # no None / Ellipsis
        return [(src, r_in - 1)] if last and plain and len(idx) < r_in else None
    if _is(node, {aten.gather.default}, {torch.gather}, {"gather"}) and len(node.args) >= 3:
        dim, index = _dim(int(node.args[1]), rank), node.args[2]
        if dim != axis and _constant_along(index, axis, rank):
            return [(src, axis)]
    return None


def _reduced(node: Node, axis: int, rank: int) -> list[tuple[Node, int]] | None:
    """A mean or sum over other axes than the features (BEiT's mean over tokens, ConvNeXt's over
    H, W): linear per feature, so it commutes with centring; ``None`` (centre after it) if it
    reduces the features too or its dims are unknown."""
    src = node.args[0]
    r_in = _rank(src)
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keep = bool(node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False))
    dims = [dims] if isinstance(dims, int) else dims
    if not isinstance(src, Node) or r_in is None or not isinstance(dims, list | tuple) or not dims:
        return None
    dims = {_dim(int(d), r_in) for d in dims}
    if keep:
        return None if axis in dims else [(src, axis)]
    kept = [d for d in range(r_in) if d not in dims]
    return [(src, kept[axis])] if len(kept) == rank else None


def _constant_along(index: object, axis: int, rank: int) -> bool:
    """``index`` is a size-1 dim tiled by ``expand``/``repeat`` along ``axis`` (ViT-MAE's
    ``ids.unsqueeze(-1).repeat(1, 1, D)``): a gather with it picks whole feature vectors."""
    if not (
        isinstance(index, Node)
        and _is(index, {aten.expand.default, aten.repeat.default}, set(), {"expand", "repeat"})
    ):
        return False
    shape = node_shape(index.args[0])
    return shape is not None and len(shape) == rank and shape[axis] == 1
