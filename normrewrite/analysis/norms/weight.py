"""Weight normalization (Salimans & Kingma 2016, ``w = g · v / ‖v‖``) as :class:`Norm` records: the
ATen ops torch.export writes (``aten._weight_norm``, ``aten._weight_norm_interface``), and
symbolic_trace module calls of layers carrying a weight-norm parametrization or the old
``weight_g``/``weight_v`` hook."""

from __future__ import annotations

import operator

import torch
from torch import nn
from torch.fx import GraphModule, Node
from torch.nn.utils.weight_norm import WeightNorm

from normrewrite.analysis.norms.record import Norm
from normrewrite.core.graph import node_shape

aten = torch.ops.aten

_ATEN = {aten._weight_norm.default, aten._weight_norm_interface.default, torch._weight_norm}


def _dims(rank: int | None, dim: int) -> tuple[int, ...] | None:
    """The dims ‖v‖ is taken over: all but ``dim`` (all of v for dim -1)."""
    if rank is None:
        return None
    if dim == -1:
        return tuple(range(rank))
    return tuple(d for d in range(rank) if d != dim % rank)


def _module_weight_norm(gm: GraphModule, node: Node) -> Norm | None:
    try:
        mod = gm.get_submodule(str(node.target))
    except AttributeError:
        return None
    dim: int | None = None
    params = getattr(mod, "parametrizations", None)
    for p in getattr(params, "weight", ()) if params is not None else ():
        if type(p).__name__ == "_WeightNorm":
            dim = int(p.dim)
    for hook in getattr(mod, "_forward_pre_hooks", {}).values():
        if isinstance(hook, WeightNorm):
            dim = int(hook.dim)
    if dim is None:
        return None
    w = mod.weight if isinstance(mod, nn.Module) else None
    axes = _dims(w.dim() if isinstance(w, torch.Tensor) else None, dim)
    x = node.args[0] if node.args and isinstance(node.args[0], Node) else node
    return Norm("weightnorm", node, x, (node,), axes, None, "gamma", False, "module")


def weight_norms(gm: GraphModule) -> list[Norm]:
    """Every weight norm of ``gm``: ``node`` is the normalized weight (the module call for a
    symbolic_trace layer), ``input`` is v, ``axes`` the dims of v the norm is taken over."""
    out: list[Norm] = []
    for n in gm.graph.nodes:
        if n.op == "call_module":
            found = _module_weight_norm(gm, n)
            if found is not None:
                out.append(found)
            continue
        if n.op != "call_function" or n.target not in _ATEN:
            continue
        v = n.args[0]
        dim = int(n.args[2]) if len(n.args) > 2 else int(n.kwargs.get("dim", 0))
        node, nodes = n, (n,)
        if n.target is aten._weight_norm_interface.default:
            first = [u for u in n.users if u.target is operator.getitem and u.args[1] == 0]
            if first:
                node, nodes = first[0], (n, first[0])
        shape = node_shape(v) if isinstance(v, Node) else None
        axes = _dims(len(shape) if shape else None, dim)
        x = v if isinstance(v, Node) else n
        out.append(Norm("weightnorm", node, x, nodes, axes, None, "gamma", False, "aten"))
    return out
