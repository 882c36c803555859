"""Fused norm ops (``nn`` modules, ``F.*``, ATen) as :class:`Norm` records."""

from __future__ import annotations

import torch
from torch.fx import Node

from normrewrite.analysis.norms.record import Form, Norm, Scale
from normrewrite.core.graph import node_shape
from normrewrite.core.ops import NormInfo

aten = torch.ops.aten


def _axes(info: NormInfo) -> tuple[int, ...] | None:
    shape = node_shape(info.input)
    if shape is None:
        return None
    rank = len(shape)
    if info.kind in ("layernorm", "rmsnorm") and info.normalized_shape is not None:
        return tuple(range(rank - len(info.normalized_shape), rank))
    if info.kind == "batchnorm":
        return (0, *range(2, rank))
    if info.kind in ("instancenorm", "groupnorm"):
        return tuple(range(2, rank)) if info.kind == "instancenorm" else tuple(range(1, rank))
    return None


def _form(info: NormInfo) -> Form:
    node = info.op_node or info.node
    if node.op == "call_module":
        return "module"
    module = getattr(node.target, "__module__", "") or ""
    return (
        "aten" if "torch._ops" in module or hasattr(node.target, "overloadpacket") else "function"
    )


def from_info(info: NormInfo) -> Norm:
    """The :class:`Norm` of a fused norm op."""
    nodes = tuple(n for n in (info.op_node, info.node) if n is not None)
    return Norm(
        kind=info.kind,  # type: ignore[arg-type]
        node=info.node,
        input=info.input,
        nodes=tuple(dict.fromkeys(nodes)),
        axes=_axes(info),
        eps=info.eps,
        scale=_scale(info),
        shift=info.has_bias,
        form=_form(info),
        info=info,
    )


def _scale(info: NormInfo) -> Scale:
    """``1+gamma`` when the weight handed to the op is ``γ + 1`` computed in the graph (Nemotron's
    ``LayerNorm1P``), else ``gamma`` / ``none``."""
    if not info.has_weight:
        return "none"
    op = info.op_node or info.node
    w = op.kwargs.get(
        "weight", op.args[2] if op.op == "call_function" and len(op.args) > 2 else None
    )
    if isinstance(w, Node) and w.op in ("call_function", "call_method"):
        from normrewrite.analysis.norms.ops import binary, op_name

        if op_name(w) == "add":
            a, b = binary(w)
            if 1 in (a, b) or 1.0 in (a, b):
                return "1+gamma"
    return "gamma"
