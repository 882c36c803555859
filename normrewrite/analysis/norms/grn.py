"""Global Response Normalization (ConvNeXt-V2, Woo et al. 2023) as :class:`Norm` records::

    Gx = ‖x‖₂ over the spatial dims          (keepdim)
    Nx = Gx / (mean(Gx, channel dim) + ε)
    y  = γ · (x · Nx) + β + x

in both fx flavours (``aten.linalg_vector_norm`` of torch.export, ``torch.linalg.vector_norm`` /
``Tensor.norm`` of symbolic_trace). ``axes`` are the dims ‖x‖₂ is taken over; the response is then
divided by its mean over the one remaining non-batch dim (the channel)."""

from __future__ import annotations

from torch.fx import GraphModule, Node

from normrewrite.analysis.norms.ops import binary, kwarg, op_name, plain_binary, reduced_dims
from normrewrite.analysis.norms.record import Norm, Scale
from normrewrite.core.graph import node_shape, users


def _one(node: Node) -> Node | None:
    us = users(node)
    return us[0] if len(us) == 1 else None


def _other(node: Node, operand: Node) -> object:
    a, b = binary(node)
    return b if a is operand else a if b is operand else None


def _match(gx: Node) -> Norm | None:
    x = kwarg(gx, 0, "input")
    if not isinstance(x, Node) or kwarg(gx, 1, "ord", 2) not in (2, 2.0):
        return None
    dim, keepdim = kwarg(gx, 2, "dim"), kwarg(gx, 3, "keepdim", False)
    shape = node_shape(x)
    if dim is None or not keepdim or shape is None:
        return None
    axes = tuple(sorted(d % len(shape) for d in ([dim] if isinstance(dim, int) else dim)))
    means = [u for u in users(gx) if op_name(u) == "mean"]
    divs = [u for u in users(gx) if op_name(u) == "div"]
    if len(means) != 1 or len(divs) != 1 or len(users(gx)) != 2:
        return None
    mean, div = means[0], divs[0]
    red = reduced_dims(mean)
    channel = set(range(1, len(shape))) - set(axes)
    if red is None or not red[1] or {d % len(shape) for d in red[0]} != channel:
        return None
    den = _one(mean)
    if den is None or op_name(den) != "add" or not plain_binary(den):
        return None
    eps = _other(den, mean)
    if not isinstance(eps, int | float) or binary(div) != (gx, den):
        return None
    resp = _one(div)
    if resp is None or op_name(resp) != "mul" or _other(resp, div) is not x:
        return None
    nodes, cur, scale, shift = [gx, mean, den, div, resp], resp, "none", False
    step = _one(cur)
    if step is not None and op_name(step) == "mul" and isinstance(_other(step, cur), Node):
        nodes.append(step)
        cur, scale = step, "gamma"
        step = _one(cur)
    if step is not None and op_name(step) == "add":
        other = _other(step, cur)
        if isinstance(other, Node) and other.op == "get_attr":
            nodes.append(step)
            cur, shift = step, True
            step = _one(cur)
    if step is None or op_name(step) != "add" or _other(step, cur) is not x:
        return None  # GRN always adds its input back; without it this is not GRN
    nodes.append(step)
    s: Scale = scale  # type: ignore[assignment]
    return Norm("grn", step, x, tuple(nodes), axes, float(eps), s, shift, "written")


def grn_norms(gm: GraphModule) -> list[Norm]:
    """Every GRN of ``gm`` (``node`` is the final ``+ x``, ``input`` is x)."""
    found = (_match(n) for n in gm.graph.nodes if op_name(n) == "norm")
    return [m for m in found if m is not None]
