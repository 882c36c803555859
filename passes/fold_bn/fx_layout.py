"""Layout ops on torch.fx graphs (both flavours): which nodes only move or merge axes, and how a
layer's channel axis crosses them (the shape math is :mod:`normrewrite.core.ops.layout`).

symbolic_trace spells them as ``call_method`` (``x.flatten(0, 1)``, ``x.transpose(1, 2)``), torch
functions or modules (``nn.Flatten``); torch.export as ATen ops (``aten.view``, ``aten.reshape``,
``aten._unsafe_view``, ``aten.flatten.using_ints``, ``aten.transpose.int``, ``aten.permute``…).
Reshape-like ops are judged from the shapes the trace recorded, permutes from their arguments.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.fx import GraphModule, Node

from normrewrite.core.graph import node_shape
from normrewrite.core.ops import called_module
from normrewrite.core.ops.layout import (
    ChannelAxis,
    through_permute,
    through_reshape,
    transpose_perm,
)

aten = torch.ops.aten

_RESHAPE_METHODS = {
    "flatten",
    "reshape",
    "view",
    "unflatten",
    "squeeze",
    "unsqueeze",
    "contiguous",
    "view_as",
    "reshape_as",
}
_RESHAPE_FUNCS = {
    torch.flatten,
    torch.reshape,
    torch.squeeze,
    torch.unsqueeze,
    torch.unflatten,
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.flatten.using_ints,
    aten.unflatten.int,
    aten.squeeze.default,
    aten.squeeze.dim,
    aten.squeeze.dims,
    aten.unsqueeze.default,
    aten.contiguous.default,
    aten.clone.default,
    aten.alias.default,
    aten.reshape_as.default,
    aten.view_as.default,
}
_TRANSPOSE = {"transpose", "swapaxes", torch.transpose, torch.swapaxes, aten.transpose.int}
_PERMUTE = {"permute", torch.permute, aten.permute.default}
_T = {"t", torch.t, aten.t.default}
_RESHAPE_MODULES = (nn.Flatten, nn.Unflatten, nn.Identity)


@dataclass(frozen=True)
class LayoutOp:
    """A node that only rearranges its input's elements: a row-major reshape (``perm`` None) or
    an axis permutation."""

    node: Node
    input: Node
    perm: tuple[int, ...] | None

    def describe(self) -> str:
        """The op as a reason names it: ``transpose_1 (transpose)``."""
        t = self.node.target
        kind = t if isinstance(t, str) else getattr(t, "__name__", str(t)).split(".")[0]
        if self.node.op == "call_module":
            kind = type(self.node.graph.owning_module.get_submodule(str(t))).__name__
        return f"{self.node.name} ({kind})"

    def carry(self, ch: ChannelAxis) -> ChannelAxis | None:
        """The channel axis after this op, or None when the op splits or merges it."""
        if self.perm is not None:
            return through_permute(ch, self.perm)
        before, after = node_shape(self.input), node_shape(self.node)
        if before is None or after is None:
            return None
        return through_reshape(ch, before, after)


def _dims(node: Node) -> list[object]:
    """The dim arguments after the tensor (varargs or one list)."""
    rest = list(node.args[1:])
    if len(rest) == 1 and isinstance(rest[0], list | tuple):
        rest = list(rest[0])
    for key in ("dim0", "dim1", "dims"):
        if key in node.kwargs:
            v = node.kwargs[key]
            rest += list(v) if isinstance(v, list | tuple) else [v]
    return rest


def layout_op(gm: GraphModule, node: object) -> LayoutOp | None:
    """Describe ``node`` if it is a layout op on a traced tensor."""
    if not isinstance(node, Node) or node.op not in ("call_method", "call_function", "call_module"):
        return None
    src = node.args[0] if node.args else node.kwargs.get("input")
    if not isinstance(src, Node):
        return None
    if node.op == "call_module":
        mod = called_module(gm, node)
        return LayoutOp(node, src, None) if isinstance(mod, _RESHAPE_MODULES) else None
    target = node.target
    if any(isinstance(a, torch.dtype) for a in node.args[1:]):
        return None  # x.view(dtype) reinterprets bits
    if (node.op == "call_method" and target in _RESHAPE_METHODS) or (
        node.op == "call_function" and target in _RESHAPE_FUNCS
    ):
        return LayoutOp(node, src, None)
    shape = node_shape(src)
    if shape is None or not (target in _TRANSPOSE or target in _PERMUTE or target in _T):
        return None
    rank, dims = len(shape), _dims(node)
    if not all(isinstance(d, int) for d in dims):
        return None
    if target in _T:
        perm = transpose_perm(rank, 0, -1) if rank == 2 else list(range(rank))
    elif target in _TRANSPOSE:
        if len(dims) != 2:
            return None
        perm = transpose_perm(rank, dims[0], dims[1])
    else:
        if len(dims) != rank:
            return None
        perm = [d % rank for d in dims]
    return LayoutOp(node, src, tuple(perm))


def chain_before(gm: GraphModule, node: object) -> tuple[object, list[LayoutOp]]:
    """Walk back from ``node`` through layout ops: (the first non-layout producer, the ops in
    program order)."""
    ops: list[LayoutOp] = []
    while (op := layout_op(gm, node)) is not None:
        ops.insert(0, op)
        node = op.input
    return node, ops


def chain_after(gm: GraphModule, node: Node) -> tuple[list[Node], list[LayoutOp]]:
    """Walk forward from ``node`` through single-user layout ops: (the users of the last value,
    the ops in program order)."""
    ops: list[LayoutOp] = []
    users = list(node.users)
    while len(users) == 1 and (op := layout_op(gm, users[0])) is not None and op.input is node:
        ops.append(op)
        node = op.node
        users = list(node.users)
    return users, ops


def carry(ch: ChannelAxis, ops: list[LayoutOp]) -> tuple[ChannelAxis | None, LayoutOp | None]:
    """Carry ``ch`` across ``ops``: (the final axis, None) or (None, the op that mixes it)."""
    for op in ops:
        moved = op.carry(ch)
        if moved is None:
            return None, op
        ch = moved
    return ch, None


__all__ = ["LayoutOp", "carry", "chain_after", "chain_before", "layout_op"]
