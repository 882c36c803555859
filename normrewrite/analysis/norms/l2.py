"""L2 normalization (``F.normalize``: ``x / max(‖x‖₂, ε)`` over ``dim``) as :class:`Norm` records:
the ``F.normalize`` call of symbolic_trace graphs and the ``linalg_vector_norm → clamp_min →
(expand_as) → div`` torch.export writes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from normrewrite.analysis.norms.record import Norm
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
        if n.op != "call_function" or n.target is not aten.linalg_vector_norm.default:
            continue
        x, ord_ = n.args[0], n.args[1] if len(n.args) > 1 else 2.0
        clamp = _single_user(n)
        if ord_ != 2.0 or clamp is None or clamp.target is not aten.clamp_min.default:
            continue
        nodes, den = [n, clamp], clamp
        nxt = _single_user(den)
        if nxt is not None and nxt.target is aten.expand_as.default:
            nodes.append(nxt)
            den, nxt = nxt, _single_user(nxt)
        if nxt is None or nxt.target is not aten.div.Tensor or nxt.args[:2] != (x, den):
            continue
        out.append(
            Norm(
                "l2norm",
                nxt,
                x,
                (*nodes, nxt),
                _axes(x, n.args[2] if len(n.args) > 2 else None),
                float(clamp.args[1]),
                "none",
                False,
                "aten",
            )
        )
    return out
