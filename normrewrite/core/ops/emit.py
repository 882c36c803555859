"""Inserting ops into a graph in its own flavour: ATen overloads in torch.export graphs,
``torch`` / ``operator`` / ``F`` callables in symbolic_trace graphs. What is emitted here,
:mod:`normrewrite.core.ops.norms` and :mod:`normrewrite.core.ops.layers` read back.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from normrewrite.core.ops.norms import NORM_KINDS

aten = torch.ops.aten

# name → (ATen overload for torch.export graphs, callable for symbolic_trace graphs); both take
# the same positional arguments.
_EMIT: dict[str, tuple[Any, Any]] = {
    "add": (aten.add.Tensor, operator.add),
    "sub": (aten.sub.Tensor, operator.sub),
    "mul": (aten.mul.Tensor, operator.mul),
    "div": (aten.div.Tensor, operator.truediv),
    "tanh": (aten.tanh.default, torch.tanh),
    "reshape": (aten.reshape.default, torch.reshape),
    "permute": (aten.permute.default, torch.permute),
    "vector_norm": (aten.linalg_vector_norm.default, torch.linalg.vector_norm),
}


def emit_op(gm: GraphModule, name: str, *args: Any, aten_form: bool) -> Node:
    """Insert ``name(*args)`` (see ``_EMIT``) at the graph's insertion point, as an ATen op in
    torch.export graphs (``aten_form``) or a torch/operator call in symbolic_trace graphs."""
    target = _EMIT[name][0 if aten_form else 1]
    return gm.graph.call_function(target, tuple(args))


def emit_norm(
    gm: GraphModule,
    kind: str,
    x: Node,
    *,
    aten_form: bool,
    weight: Node | None = None,
    bias: Node | None = None,
    eps: float | None = 1e-5,
    num_groups: int | None = None,
    normalized_shape: tuple[int, ...] | None = None,
    running_mean: Node | None = None,
    running_var: Node | None = None,
    momentum: float = 0.1,
) -> Node:
    """Insert one normalization op of ``kind`` (see :data:`NORM_KINDS`) reading ``x``, in the
    graph's flavour: ``aten.<kind>`` for torch.export graphs, ``F.<kind>`` for symbolic_trace
    graphs. BatchNorm is emitted in eval form (running statistics, ``training=False``);
    InstanceNorm always uses input statistics. :func:`norm_info` reads every form back."""
    shape = list(normalized_shape or ())
    if kind == "batchnorm":
        if aten_form:
            args = (x, weight, bias, running_mean, running_var, False, momentum, eps, False)
            return gm.graph.call_function(aten.batch_norm.default, args)
        return gm.graph.call_function(
            F.batch_norm, (x, running_mean, running_var, weight, bias, False, momentum, eps)
        )
    if kind == "groupnorm":
        if aten_form:
            return gm.graph.call_function(
                aten.group_norm.default, (x, num_groups, weight, bias, eps, False)
            )
        return gm.graph.call_function(F.group_norm, (x, num_groups, weight, bias, eps))
    if kind == "instancenorm":
        if aten_form:
            args = (x, weight, bias, None, None, True, momentum, eps, False)
            return gm.graph.call_function(aten.instance_norm.default, args)
        return gm.graph.call_function(
            F.instance_norm, (x, None, None, weight, bias, True, momentum, eps)
        )
    if kind == "layernorm":
        if aten_form:
            return gm.graph.call_function(
                aten.layer_norm.default, (x, shape, weight, bias, eps, False)
            )
        return gm.graph.call_function(F.layer_norm, (x, shape, weight, bias, eps))
    if kind == "rmsnorm":
        target = aten.rms_norm.default if aten_form else F.rms_norm
        return gm.graph.call_function(target, (x, shape, weight, eps))
    raise ValueError(f"unknown norm kind {kind!r} (one of {', '.join(NORM_KINDS)})")
