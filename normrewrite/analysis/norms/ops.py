"""What the ops of a written-out norm mean, in both fx graph flavours: the semantic name of a node
(ATen overload, torch function, ``operator`` arithmetic or tensor method), its operands, the dims
a reduction keeps, and whether casts between two values lose anything."""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch.fx import Node

from normrewrite.analysis.norms.conditions import epsilon, trailing_dims
from normrewrite.core.graph import node_dtype, node_shape

aten = torch.ops.aten

# op name -> (ATen overloads, fx functions, tensor methods)
_OPS: dict[str, tuple[set[Any], set[Any], set[str]]] = {
    "pow": ({aten.pow.Tensor_Scalar}, {torch.pow, operator.pow}, {"pow", "__pow__"}),
    "square": ({aten.square.default}, {torch.square}, {"square"}),
    "mul": ({aten.mul.Tensor, aten.mul.Scalar}, {torch.mul, operator.mul}, {"mul", "__mul__"}),
    "add": ({aten.add.Tensor, aten.add.Scalar}, {torch.add, operator.add}, {"add", "__add__"}),
    "sub": ({aten.sub.Tensor}, {torch.sub, operator.sub}, {"sub", "__sub__"}),
    "div": ({aten.div.Tensor}, {torch.div, operator.truediv}, {"div", "__truediv__"}),
    "rsqrt": ({aten.rsqrt.default}, {torch.rsqrt}, {"rsqrt"}),
    "sqrt": ({aten.sqrt.default}, {torch.sqrt}, {"sqrt"}),
    "mean": ({aten.mean.dim}, {torch.mean}, {"mean"}),
    "sum": ({aten.sum.dim_IntList}, {torch.sum}, {"sum"}),
    "var": ({aten.var.correction, aten.var.dim}, {torch.var}, {"var"}),
    "norm": ({aten.linalg_vector_norm.default}, {torch.linalg.vector_norm, torch.norm}, {"norm"}),
    "reciprocal": ({aten.reciprocal.default}, {torch.reciprocal}, {"reciprocal"}),
    "clamp": (
        {aten.clamp.default, aten.clamp_min.default},
        {torch.clamp, torch.clamp_min},
        {"clamp", "clamp_min"},
    ),
    "expand": ({aten.expand.default, aten.expand_as.default}, set(), {"expand", "expand_as"}),
    "cast": (
        {aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout, aten.type_as.default},
        set(),
        {"to", "float", "half", "bfloat16", "double", "type_as", "type"},
    ),
}


def op_name(node: object) -> str | None:
    """The semantic name of an elementwise/reduction op node, or None."""
    if not isinstance(node, Node):
        return None
    for name, (atens, funcs, methods) in _OPS.items():
        if node.op == "call_function" and (node.target in atens or node.target in funcs):
            return name
        if node.op == "call_method" and node.target in methods:
            return name
    return None


def kwarg(node: Node, index: int, name: str, default: Any = None) -> Any:
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[index] if len(node.args) > index else default


def binary(node: Node) -> tuple[Any, Any]:
    return kwarg(node, 0, "input", kwarg(node, 0, "self")), kwarg(node, 1, "other")


def plain_binary(node: Node) -> bool:
    """No alpha scaling / rounding mode."""
    return (
        node.kwargs.get("alpha", 1) == 1
        and node.kwargs.get("rounding_mode") is None
        and len(node.args) <= 2
    )


def reduced_dims(node: Node) -> tuple[list[int], bool] | None:
    """(dims, keepdim) of a mean/var node."""
    dim = kwarg(node, 1, "dim")
    keepdim = bool(
        node.kwargs.get(
            "keepdim", node.args[2] if len(node.args) > 2 and op_name(node) == "mean" else False
        )
    )
    if op_name(node) == "var":
        keepdim = bool(node.kwargs.get("keepdim", keepdim))
        if node.target is aten.var.dim and len(node.args) > 3:
            keepdim = bool(node.args[3])
    if dim is None:
        return None
    dims = [dim] if isinstance(dim, int) else list(dim)
    return dims, keepdim


def reduced_axes(node: Node, x: object) -> tuple[int, ...] | None:
    """The non-negative dims of ``x`` a mean/var/vector-norm ``node`` reduces, or None."""
    shape = node_shape(x)
    dim = reduced_dims(node)[0] if op_name(node) in ("mean", "var") and reduced_dims(node) else None
    if op_name(node) == "norm":
        dim = kwarg(node, 2, "dim")
    if shape is None or dim is None:
        return None
    return tuple(sorted(d % len(shape) for d in ([dim] if isinstance(dim, int) else dim)))


def var_correction(node: Node) -> float | None:
    if node.target is aten.var.dim:
        unbiased = node.args[2] if len(node.args) > 2 else node.kwargs.get("unbiased", True)
        return 1.0 if unbiased else 0.0
    if "correction" in node.kwargs:
        c = node.kwargs["correction"]
        return 1.0 if c is None else float(c)
    if "unbiased" in node.kwargs:
        return 1.0 if node.kwargs["unbiased"] else 0.0
    positional = node.op == "call_method" or node.target is torch.var
    if positional and len(node.args) > 2 and isinstance(node.args[2], bool):
        return 1.0 if node.args[2] else 0.0
    return 1.0


def is_last_dim(dims: list[int], x: Node) -> bool:
    shape = node_shape(x)
    return trailing_dims(dims, None if shape is None else len(shape))


_WIDER = {torch.float16: 1, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}


def cast_input(node: Node) -> Node | None:
    x = node.args[0] if node.args else node.kwargs.get("self")
    return x if isinstance(x, Node) else None


def lossless_root(node: Node) -> tuple[Node, bool]:
    """``node`` with casts looked through backwards, and whether every cast was lossless."""
    ok = True
    while op_name(node) == "cast":
        src = cast_input(node)
        if src is None:
            break
        a, b = node_dtype(src), node_dtype(node)
        if a is None or b is None or not (a == b or _WIDER.get(b, 0) > _WIDER.get(a, 9)):
            ok = False
        node = src
    return node, ok


def same_value(a: Node, b: Node) -> bool:
    """``a`` and ``b`` hold the same numbers: one node, or lossless casts of one node to one dtype."""
    if a is b:
        return True
    ra, oka = lossless_root(a)
    rb, okb = lossless_root(b)
    da, db = node_dtype(a), node_dtype(b)
    return ra is rb and oka and okb and da is not None and da == db


def is_noop_cast(node: Node) -> bool:
    src = cast_input(node)
    return src is not None and node_dtype(src) is not None and node_dtype(src) == node_dtype(node)


def scalar(v: Any) -> float | None:
    """A plain Python number as a float (ε, an exponent), else None."""
    return epsilon(v)
