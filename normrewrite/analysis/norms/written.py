"""Written-out RMSNorm/LayerNorm in fx graphs (both flavours): the matcher from a ``mean``/``var``
node to the whole norm. Identities::

    x · rsqrt(mean(x²) + ε)                 = rms_norm(x, [D], None, ε)
    x / sqrt(mean(x²) + ε)                  = rms_norm(x, [D], None, ε)
    (x − x̄) · rsqrt(mean((x − x̄)²) + ε)     = layer_norm(x, [D], None, None, ε)
    (x − x̄) / sqrt(var(x, correction=0) + ε) = layer_norm(x, [D], None, None, ε)
    γ · norm(x) [+ β]                        = norm(x, γ [, β])

The record also says which γ/β the fuse-norm rewrite can take into the fused op (stored
``(D,)`` tensors of the activation's dtype after no-op casts only)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from normrewrite.analysis.norms import conditions
from normrewrite.analysis.norms.conditions import NormKind
from normrewrite.analysis.norms.ops import (
    binary,
    cast_input,
    is_last_dim,
    is_noop_cast,
    kwarg,
    op_name,
    plain_binary,
    reduced_dims,
    same_value,
    scalar,
    var_correction,
)
from normrewrite.core.graph import (
    get_tensor,
    node_dtype,
    node_label,
    node_shape,
    users,
)
from normrewrite.core.pass_infra import Skip

aten = torch.ops.aten


@dataclass(frozen=True)
class NormPattern:
    """A written-out norm: ``out`` (the last node of the pattern) computes
    ``kind(x, [features], weight, bias, eps)`` followed by the kept ``tail`` ops."""

    kind: NormKind
    x: Node
    features: int
    eps: float
    core: Node  # the node computing the normalized value (before casts and γ)
    out: Node  # the node whose uses the fused op (plus nothing) takes over
    weight: Node | None  # get_attr of γ, when fused
    bias: Node | None
    nodes: tuple[Node, ...]  # pattern nodes that become dead
    notes: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return node_label(self.core)

    def preview(self) -> str:
        return f"fusable: {self.describe()}"

    def describe(self) -> str:
        parts = [f"{self.kind} over {self.features} features, eps={self.eps:g}"]
        parts.append("γ fused" if self.weight is not None else "no γ fused")
        if self.kind is NormKind.LAYERNORM:
            parts.append("β fused" if self.bias is not None else "no β fused")
        return "; ".join(parts + list(self.notes))


def only_user(node: Node, expected: Node | None = None) -> Node | None:
    us = users(node)
    if len(us) != 1 or (expected is not None and us[0] is not expected):
        return None
    return us[0]


def square_of(node: object) -> Node | None:
    """x if node is x², else None."""
    name = op_name(node)
    if name == "pow" and scalar(kwarg(node, 1, "exponent")) == 2.0:
        x = kwarg(node, 0, "input", kwarg(node, 0, "self"))
        return x if isinstance(x, Node) else None
    if name == "square":
        x = node.args[0] if node.args else None
        return x if isinstance(x, Node) else None
    if name == "mul" and plain_binary(node):
        a, b = binary(node)
        return a if isinstance(a, Node) and a is b else None
    return None


def _eps_add(node: Node) -> float | None:
    if op_name(node) != "add" or not plain_binary(node):
        return None
    a, b = binary(node)
    for t, s in ((a, b), (b, a)):
        if isinstance(t, Node) and scalar(s) is not None:
            return scalar(s)
    return None


def _normalize_step(den: Node, num_of: str) -> tuple[Node, Node, list[Node]] | str:
    """From ``den = stat + ε``: (numerator, normalized node, nodes) for ``num·rsqrt(den)`` or
    ``num / sqrt(den)``; else the reason."""
    root = only_user(den)
    if root is None:
        return f"{num_of} + eps has {len(users(den))} users"
    name = op_name(root)
    if name not in ("rsqrt", "sqrt"):
        return f"{num_of} + eps feeds {root.target}, not rsqrt/sqrt"
    step = only_user(root)
    if step is None:
        return f"the {name} has {len(users(root))} users"
    sname = op_name(step)
    a, b = binary(step) if sname in ("mul", "div") else (None, None)
    if name == "rsqrt" and sname == "mul" and plain_binary(step):
        num = a if b is root else b if a is root else None
    elif name == "sqrt" and sname == "div" and plain_binary(step) and b is root:
        num = a
    else:
        num = None
    if not isinstance(num, Node):
        return f"the {name} is not used as x·rsqrt(…) or x/sqrt(…)"
    return num, step, [root, step]


def match(gm: GraphModule, mean: Node) -> NormPattern | Skip | None:
    """A written-out RMSNorm/LayerNorm whose statistic is ``mean`` (or a var node); None when
    ``mean`` does not start one."""
    name = op_name(mean)
    if name not in ("mean", "var"):
        return None
    src = mean.args[0] if mean.args else mean.kwargs.get("input")
    if not isinstance(src, Node):
        return None
    label = node_label(mean)
    reduced = reduced_dims(mean)
    sq_of = square_of(src) if name == "mean" else None
    centred = _centred(mean) if name == "mean" else None
    if name == "var" or (
        sq_of is not None and op_name(sq_of) == "sub" and _centred_sub(sq_of) is not None
    ):
        kind = NormKind.LAYERNORM
    elif sq_of is not None:
        kind = NormKind.RMSNORM
    elif centred is not None:
        return None  # the mean of a LayerNorm: matched from its variance
    else:
        return None  # a plain mean (pooling, loss): not a norm
    if reduced is None or not reduced[1]:
        return Skip(label, "the reduction does not keep its dim (keepdim=False)")
    if name == "var" and var_correction(mean) != 0.0:
        return Skip(label, "the variance is unbiased (correction=1); LayerNorm uses the biased one")

    nodes: list[Node] = [mean]
    if kind is NormKind.RMSNORM:
        x_sq = sq_of
        assert x_sq is not None
        if only_user(src, mean) is None:
            return Skip(label, "x² has other users")
        nodes.insert(0, src)
        stat_of = "mean(x²)"
    elif name == "var":
        x_sq = src
        stat_of = "var(x)"
    else:
        sub = sq_of
        assert sub is not None
        if only_user(src, mean) is None:
            return Skip(label, "(x − mean)² has other users")
        nodes.insert(0, src)
        x_sq = sub
        stat_of = "mean((x − mean)²)"
    x_red = x_sq if kind is NormKind.RMSNORM or name == "var" else _centred_sub(x_sq)[0]  # type: ignore[index]
    if not is_last_dim(reduced[0], x_red):
        return Skip(
            label,
            f"reduces dims {reduced[0]}, not the last dim only (channel-first norms are not fused)",
        )
    den = only_user(mean)
    if den is None:
        return Skip(label, f"{stat_of} has {len(users(mean))} users")
    eps = _eps_add(den)
    if eps is None:
        return Skip(label, f"{stat_of} is not followed by + eps (a Python number)")
    nodes.append(den)
    step = _normalize_step(den, stat_of)
    if isinstance(step, str):
        return Skip(label, step)
    num, core, more = step
    nodes += more

    if kind is NormKind.RMSNORM:
        if not same_value(num, x_sq):
            return Skip(
                label,
                "the value normalized is not the value squared (or differs from it by a cast)",
            )
        x = x_sq
    else:
        # numerator: x − mean(x), the same mean node as the variance's (or mean of same x)
        if name == "var":
            c = _centred_sub(num)
            if c is None or not same_value(c[0], x_sq) or op_name(c[1]) != "mean":
                return Skip(label, "the numerator is not x − mean(x) of the variance's x")
            mu = c[1]
            r = reduced_dims(mu)
            if r is None or not r[1] or not is_last_dim(r[0], c[0]):
                return Skip(label, "the mean subtracted is not over the last dim with keepdim")
            x = c[0]
            extra = [num, mu]
        else:
            c_var = _centred_sub(x_sq)
            c_num = _centred_sub(num)
            assert c_var is not None
            if c_num is None or c_num[0] is not c_var[0] or c_num[1] is not c_var[1]:
                return Skip(label, "the numerator is not the x − mean(x) that the variance squares")
            x, mu = c_var
            extra = [x_sq] + ([num] if num is not x_sq else []) + [mu]
        allowed = set(nodes) | set(extra)
        for n in extra:
            if any(u not in allowed for u in users(n)):
                return Skip(label, f"the intermediate {n.name} has users outside the norm")
        if any(u not in allowed for u in users(mu)):
            return Skip(label, "mean(x) has users outside the norm")
        nodes = [n for n in extra if n not in nodes] + nodes
    shape = node_shape(x)
    if not shape:
        return Skip(label, "the input shape is unknown (trace with shapes recorded)")
    features = shape[-1]
    if any(u not in nodes for n in nodes[:-1] for u in users(n)):
        return Skip(label, "an intermediate value has users outside the norm")

    # tail: casts, then γ (and β for LayerNorm)
    notes: list[str] = []
    out, weight, bias = core, None, None
    casts: list[Node] = []
    cur = core
    while (u := only_user(cur)) is not None and op_name(u) == "cast" and cast_input(u) is cur:
        casts.append(u)
        cur = u
    w_node, w_mul = _affine_operand(gm, cur, "mul", features, node_dtype(cur))
    if isinstance(w_node, str):
        notes.append(w_node)
    elif w_node is not None:
        if all(is_noop_cast(c) for c in casts):
            nodes += casts
            out, weight = w_mul, w_node
            nodes.append(w_mul)
            if kind is NormKind.LAYERNORM:
                b_node, b_add = _affine_operand(gm, w_mul, "add", features, node_dtype(w_mul))
                if isinstance(b_node, Node):
                    out, bias = b_add, b_node
                    nodes.append(b_add)
        else:
            notes.append(f"γ kept as a separate multiply after the {node_dtype(casts[-1])} cast")
    elif kind is NormKind.LAYERNORM and not casts:
        b_node, b_add = _affine_operand(gm, core, "add", features, node_dtype(core))
        if isinstance(b_node, Node):
            out, bias = b_add, b_node
            nodes.append(b_add)
    return NormPattern(kind, x, features, eps, core, out, weight, bias, tuple(nodes), tuple(notes))


def _centred_sub(node: object) -> tuple[Node, Node] | None:
    """(x, mu) if node is ``x − mu`` with ``mu`` a mean of ``x`` (or of the same value)."""
    if op_name(node) != "sub" or not plain_binary(node):  # type: ignore[arg-type]
        return None
    x, mu = binary(node)  # type: ignore[arg-type]
    if not isinstance(x, Node) or not isinstance(mu, Node) or op_name(mu) != "mean":
        return None
    src = mu.args[0] if mu.args else None
    if not isinstance(src, Node) or not same_value(src, x):
        return None
    return x, mu


def _centred(mean: Node) -> bool | None:
    return True if any(_centred_sub(u) is not None for u in users(mean)) else None


def _affine_operand(
    gm: GraphModule, value: Node, op: str, features: int, dtype: torch.dtype | None
) -> tuple[Node | str | None, Node | None]:
    """If ``value``'s only user is ``value ∘ c`` (``op`` mul/add) with ``c`` a stored ``(features,)``
    tensor of ``dtype``: (c's get_attr, the op node). A string explains a near miss."""
    u = only_user(value)
    if u is None or op_name(u) != op or not plain_binary(u):
        return None, None
    a, b = binary(u)
    other = b if a is value else a if b is value else None
    if not isinstance(other, Node):
        return None, None
    if other.op != "get_attr":
        if op == "mul" and op_name(other) in ("add", "cast"):
            return (
                "γ is computed in the graph (e.g. Gemma's 1 + γ): kept as a separate multiply",
                None,
            )
        return None, None
    try:
        t = get_tensor(gm, str(other.target))
    except (AttributeError, KeyError):
        return None, None
    why = conditions.affine_problem(
        "γ" if op == "mul" else "β", t.shape, (features,), t.dtype, dtype
    )
    return (why, None) if why else (other, u)
