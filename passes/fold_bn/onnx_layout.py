"""Layout ops on ONNX graphs: ``Reshape``, ``Flatten``, ``Squeeze``, ``Unsqueeze``, ``Identity``
(row-major reinterpretations, judged from the inferred shapes) and ``Transpose`` (its ``perm``),
and how a layer's channel axis crosses them (the shape math is :mod:`normrewrite.core.ops.layout`)."""

from __future__ import annotations

import onnx_ir as ir

from normrewrite.core.onnx_graph import is_graph_output
from normrewrite.core.ops.layout import ChannelAxis, Dim, through_permute, through_reshape

from .conditions import channel_mixed_by, channel_moved_by, output_features_not_channels

_RESHAPES = ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity")


def _shape(v: ir.Value) -> tuple[int | str, ...] | None:
    return None if v.shape is None else tuple(d if isinstance(d, int) else str(d) for d in v.shape)


def _dims(v: ir.Value | None) -> list[Dim] | None:
    if v is None or v.shape is None:
        return None
    return [d if isinstance(d, int) else None for d in v.shape]


def is_layout(node: ir.Node | None) -> bool:
    return (
        node is not None
        and node.domain in ("", "ai.onnx")
        and (node.op_type in _RESHAPES or node.op_type == "Transpose")
    )


def describe(node: ir.Node) -> str:
    return f"{node.op_type} {node.name}"


def carry_one(ch: ChannelAxis, node: ir.Node) -> ChannelAxis | None:
    """The channel axis after layout op ``node``, or None when it splits or merges it."""
    before, after = _dims(node.inputs[0]), _dims(node.outputs[0])
    if node.op_type == "Transpose":
        perm = node.attributes.get("perm")
        if perm is not None:
            return through_permute(ch, list(perm.value))
        return None if before is None else through_permute(ch, range(len(before))[::-1])
    if before is None or after is None:
        return None
    return through_reshape(ch, before, after)


def carry(ch: ChannelAxis, ops: list[ir.Node]) -> tuple[ChannelAxis | None, ir.Node | None]:
    """Carry ``ch`` across ``ops``: (the final axis, None) or (None, the op that mixes it)."""
    for op in ops:
        moved = carry_one(ch, op)
        if moved is None:
            return None, op
        ch = moved
    return ch, None


def chain_before(value: ir.Value) -> tuple[ir.Node | None, list[ir.Node]]:
    """Walk back from ``value`` through layout ops: (the first non-layout producer, the ops in
    program order)."""
    ops: list[ir.Node] = []
    node = value.producer()
    while is_layout(node):
        ops.insert(0, node)
        src = node.inputs[0]
        node = src.producer() if src is not None else None
    return node, ops


def chain_after(graph: ir.Graph, value: ir.Value) -> tuple[ir.Value, list[ir.Node]]:
    """Walk forward from ``value`` through layout ops that are its only consumer: (the last
    value, the ops in program order)."""
    ops: list[ir.Node] = []
    while True:
        uses = value.uses()
        if len(uses) != 1 or is_graph_output(graph, value):
            return value, ops
        node = uses[0].node
        if not is_layout(node) or node.inputs[0] is not value:
            return value, ops
        ops.append(node)
        value = node.outputs[0]


def shared_output(graph: ir.Graph, ops: list[ir.Node]) -> str | None:
    """The first op whose output feeds more than the chain, as a reason."""
    for op in ops:
        out = op.outputs[0]
        n = len(out.uses()) + is_graph_output(graph, out)
        if n != 1:
            return f"the output of {describe(op)} has {n} users: folding would change the others"
    return None


def channel_problem(
    layer: ir.Node, out: ir.Value, ops: list[ir.Node], bn_in: ir.Value
) -> str | None:
    """Output side: the layer's channels must reach the BN's dim 1 through ``ops``."""
    named = f"{layer.op_type} {layer.name}"
    dense = layer.op_type in ("Gemm", "MatMul")
    if not ops:
        return output_features_not_channels(named, _shape(out)) if dense else None
    shape = _dims(out)
    axis = len(shape) - 1 if dense and shape else 1
    if shape is None or len(shape) <= axis or shape[axis] is None:
        return f"the output shape of {named} is unknown"
    ch, mixer = carry(ChannelAxis(axis, shape[axis]), ops)
    if mixer is not None:
        return channel_mixed_by(describe(mixer), named)
    bn_shape = _dims(bn_in)
    if ch is None or ch.axis != 1 or ch.repeat != 1 or bn_shape is None or len(bn_shape) < 2:
        return channel_moved_by(describe(ops[-1]), named, -1 if ch is None else ch.axis)
    return None


__all__ = [
    "carry",
    "chain_after",
    "chain_before",
    "channel_problem",
    "describe",
    "is_layout",
    "shared_output",
]
