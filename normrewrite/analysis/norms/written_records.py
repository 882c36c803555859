"""Written-out RMSNorm/LayerNorm as :class:`Norm` records: the part :func:`.written.match` finds
(what fuse-norm can fuse) plus the affine tail it leaves outside (casts, a ``1 + γ`` weight, γ/β
after a widening cast), and kind ``unknown`` for a statistic that starts a norm but does not
complete one."""

from __future__ import annotations

from torch.fx import GraphModule, Node

from normrewrite.analysis.norms.conditions import NormKind
from normrewrite.analysis.norms.ops import (
    binary,
    cast_input,
    op_name,
    plain_binary,
    reduced_axes,
    scalar,
)
from normrewrite.analysis.norms.record import Norm, Scale
from normrewrite.analysis.norms.written import NormPattern, match, only_user
from normrewrite.core.graph import node_dtype, node_shape
from normrewrite.core.pass_infra import Skip


def _tail(gm: GraphModule, m: NormPattern) -> tuple[Node, list[Node], Scale, bool, list[str]]:
    """From the matched part of a norm on: the casts, γ (stored or ``1 + γ``) and β the matcher
    left outside the fusable part. Returns (last node, nodes, scale, shift, cast dtypes)."""
    cur, nodes = m.out, []
    scale: Scale = "gamma" if m.weight is not None else "none"
    shift = m.bias is not None
    casts = [str(node_dtype(n)).removeprefix("torch.") for n in m.nodes if op_name(n) == "cast"]
    while (u := only_user(cur)) is not None and op_name(u) == "cast" and cast_input(u) is cur:
        nodes.append(u)
        casts.append(str(node_dtype(u)).removeprefix("torch."))
        cur = u
    u = only_user(cur)
    if scale == "none" and u is not None and op_name(u) == "mul" and plain_binary(u):
        a, b = binary(u)
        other = b if a is cur else a
        form = _weight_form(other)
        if form is not None:
            scale, cur = form, u
            nodes.append(u)
            if isinstance(other, Node) and other.op != "get_attr":
                nodes.append(other)
    u = only_user(cur)
    if m.kind is NormKind.LAYERNORM and not shift and u is not None and op_name(u) == "add":
        a, b = binary(u)
        other = b if a is cur else a
        if isinstance(other, Node) and _weight_form(other) == "gamma":
            shift, cur = True, u
            nodes.append(u)
    return cur, nodes, scale, shift, casts


def _weight_form(v: object) -> Scale | None:
    """``gamma`` for a stored tensor (through casts), ``1+gamma`` for ``1 + γ``."""
    if not isinstance(v, Node):
        return None
    while op_name(v) == "cast" and cast_input(v) is not None:
        v = cast_input(v)  # type: ignore[assignment]
    if v.op == "get_attr":
        return "gamma"
    if op_name(v) == "add":
        a, b = binary(v)
        if any(scalar(s) == 1.0 for s in (a, b)) and any(
            _weight_form(t) == "gamma" for t in (a, b)
        ):
            return "1+gamma"
    return None


def written_norms(gm: GraphModule) -> list[Norm]:
    """Every written-out RMSNorm/LayerNorm of ``gm``; a ``mean``/``var`` that starts one but does
    not complete it becomes kind ``unknown`` with the matcher's reason."""
    out: list[Norm] = []
    for n in list(gm.graph.nodes):
        found = match(gm, n)
        if found is None:
            continue
        if isinstance(found, Skip):
            src = n.args[0] if n.args and isinstance(n.args[0], Node) else n
            out.append(
                Norm(
                    "unknown",
                    n,
                    src,
                    (n,),
                    reduced_axes(n, src),
                    None,
                    "none",
                    False,
                    "written",
                    reason=found.reason,
                )
            )
            continue
        last, more, scale, shift, casts = _tail(gm, found)
        shape = node_shape(found.x)
        out.append(
            Norm(
                kind=str(found.kind),  # type: ignore[arg-type]
                node=last,
                input=found.x,
                nodes=(*found.nodes, *more),
                axes=(len(shape) - 1,) if shape else None,
                eps=found.eps,
                scale=scale,
                shift=shift,
                form="written",
                casts=tuple(casts),
            )
        )
    return out
