"""L2 normalization (``F.normalize``: ``x / max(‖x‖₂, ε)`` over ``dim``) as :class:`Norm` records:
the ``F.normalize`` call of symbolic_trace graphs, the ``linalg_vector_norm → clamp_min →
(expand_as) → div`` torch.export writes, and ``x / x.norm(dim=…, keepdim=True)`` written without
ε (CLIP's embeddings; ``eps`` None)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from normrewrite.analysis.norms.ops import binary, kwarg, op_name, scalar
from normrewrite.analysis.norms.record import Norm
from normrewrite.analysis.norms.written import square_of
from normrewrite.core.graph import node_shape

aten = torch.ops.aten


def _axes(x: Node, dims: object) -> tuple[int, ...] | None:
    shape = node_shape(x)
    if shape is None:
        return None
    dims = [dims] if isinstance(dims, int) else list(dims or ())  # type: ignore[call-overload]
    return tuple(sorted(d % len(shape) for d in dims))


def _single_user(node: Node) -> Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def l2_norms(gm: GraphModule) -> list[Norm]:
    """Every L2 normalization of ``gm`` with p = 2."""
    out: list[Norm] = []
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is F.normalize:
            x = n.args[0]
            p = n.kwargs.get("p", n.args[1] if len(n.args) > 1 else 2.0)
            if isinstance(x, Node) and p == 2.0:
                dim = n.kwargs.get("dim", n.args[2] if len(n.args) > 2 else 1)
                eps = n.kwargs.get("eps", n.args[3] if len(n.args) > 3 else 1e-12)
                out.append(
                    Norm("l2norm", n, x, (n,), _axes(x, dim), float(eps), "none", False, "function")
                )
            continue
        if op_name(n) == "sum":
            found = _sum_of_squares(n)
            if found is not None:
                out.append(found)
            continue
        if op_name(n) != "norm":
            continue
        x, ord_ = kwarg(n, 0, "input"), kwarg(n, 1, "ord", kwarg(n, 1, "p", 2.0))
        nodes, den, eps = [n], n, None
        nxt = _single_user(den)
        if nxt is not None and op_name(nxt) == "clamp" and binary(nxt)[0] is den:
            eps = scalar(nxt.kwargs.get("min", nxt.args[1] if len(nxt.args) > 1 else None))
            if eps is None:
                continue
            nodes.append(nxt)
            den, nxt = nxt, _single_user(nxt)
        if nxt is not None and op_name(nxt) == "expand":
            nodes.append(nxt)
            den, nxt = nxt, _single_user(nxt)
        if not kwarg(n, 3, "keepdim", False) and den is n:
            continue  # x / ‖x‖ without keepdim broadcasts over other dims
        if ord_ not in (2, 2.0) or nxt is None or op_name(nxt) != "div" or binary(nxt) != (x, den):
            continue
        dims = kwarg(n, 2, "dim")
        form = "aten" if n.target is aten.linalg_vector_norm.default else "function"
        out.append(Norm("l2norm", nxt, x, (*nodes, nxt), _axes(x, dims), eps, "none", False, form))
    return out


def _sum_of_squares(total: Node) -> Norm | None:
    """``x / sqrt(sum(x², dim, keepdim))`` (``pow(·, 0.5)`` or ``sqrt``; CLIP's embeddings)."""
    sq = kwarg(total, 0, "input")
    x = square_of(sq)
    root = _single_user(total)
    if x is None or root is None or not kwarg(total, 2, "keepdim", False):
        return None
    if not (op_name(root) == "sqrt" or (op_name(root) == "pow" and scalar(binary(root)[1]) == 0.5)):
        return None
    div = _single_user(root)
    if div is None or op_name(div) != "div" or binary(div) != (x, root):
        return None
    axes = _axes(x, kwarg(total, 1, "dim"))
    form = "aten" if isinstance(total.target, torch._ops.OpOverload) else "function"
    return Norm("l2norm", div, x, (sq, total, root, div), axes, None, "none", False, form)
