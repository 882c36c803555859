"""post-to-pre / pre-to-post graph surgery: copy a norm (with its parameter reads) to a new place,
create a final norm's parameters, and move a block's norm (both graph flavours)."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.fx import GraphModule, Node

from normrewrite.analysis.residual import NormPlacement
from normrewrite.core.graph import add_parameter, erase_unused, get_tensor
from normrewrite.core.pass_infra import PassContext, compute_tensors

if TYPE_CHECKING:
    from . import PostBlock, PreBlock


def _copy(*tensors: Tensor) -> tuple[Tensor, ...]:
    return tuple(t.detach().clone() for t in tensors)


def norm_ops(p: NormPlacement) -> list[Node]:
    """The nodes of a fused norm op, in graph order (the op, and the item of it that is read)."""
    return list(p.norm.nodes) or [p.norm.node]


def copy_norm(
    gm: GraphModule,
    p: NormPlacement,
    new_input: Node,
    before: Node,
    *,
    params: dict[str, str] | None = None,
    module: str | None = None,
) -> Node:
    """A copy of the norm ``p`` reading ``new_input``, inserted before ``before``.

    Its ``get_attr`` parameter reads are copied beside it (``params`` renames their targets), so
    the copy is valid wherever it lands; ``module`` retargets a ``call_module`` norm."""
    old_input = p.norm.input
    mapping: dict[Node, Node] = {}
    with gm.graph.inserting_before(before):
        for op in norm_ops(p):
            for a in op.all_input_nodes:
                if a.op == "get_attr" and a not in mapping:
                    mapping[a] = gm.graph.get_attr((params or {}).get(str(a.target), str(a.target)))
                    mapping[a].meta = dict(a.meta)
            new = gm.graph.node_copy(
                op, lambda a: new_input if a is old_input else mapping.get(a, a)
            )
            if module is not None and new.op == "call_module":
                new.target = module
            mapping[op] = new
    return mapping[p.norm.node]


def _final_params(
    gm: GraphModule, p: NormPlacement, ctx: PassContext, origin: str
) -> tuple[str, dict[str, str]]:
    """A new module path for a final norm and its parameters, copied from ``p``'s:
    (path, old FQN → new FQN); for a ``call_module`` norm the path is a copy of its module."""
    info = p.norm.info
    assert info is not None  # the matchers skip written-out norms
    base, i = "final_norm", 1
    while hasattr(gm, base):
        base, i = f"final_norm_{i}", i + 1
    if info.node.op == "call_module":
        mod = gm.get_submodule(str(info.node.target))
        gm.add_submodule(base, copy.deepcopy(mod))
        old = [f"{info.node.target}.{n}" for n, _ in mod.named_parameters()]
        new = [f"{base}.{n}" for n, _ in mod.named_parameters()]
        if old:
            compute_tensors(gm, ctx, new, old, _copy, origin=origin)
        return base, {}
    gm.add_submodule(base, torch.nn.Module())
    renames: dict[str, str] = {}
    for fqn in (info.weight, info.bias):
        if fqn is None:
            continue
        name = add_parameter(gm, base, fqn.rpartition(".")[2], get_tensor(gm, fqn))
        renames[fqn] = name
    if renames:
        compute_tensors(gm, ctx, list(renames.values()), list(renames), _copy, origin=origin)
    return base, renames


def apply_post(gm: GraphModule, m: PostBlock, ctx: PassContext, origin: str) -> None:
    p = m.placement
    pre = copy_norm(gm, p, m.skip, m.entries[0])
    for e in m.entries:
        e.replace_input_with(m.skip, pre)
    if m.last:
        path, renames = _final_params(gm, p, ctx, origin)
        module = path if p.norm.node.op == "call_module" else None
        final = copy_norm(gm, p, m.sum, m.sum.next, params=renames, module=module)
        _rename_module(final, path)
        p.norm.node.replace_all_uses_with(final)
    else:
        p.norm.node.replace_all_uses_with(m.sum)
    erase_unused(gm, reversed(norm_ops(p)))


def _rename_module(node: Node, path: str) -> None:
    """Record ``path`` as the module a copied norm belongs to (for reports and ``inspect``)."""
    for n in (node, *node.all_input_nodes):
        stack = n.meta.get("nn_module_stack")
        if n.op != "get_attr" and stack:
            kind = list(stack.values())[-1][1]
            n.meta["nn_module_stack"] = {**stack, path: (path, kind)}


def apply_pre(gm: GraphModule, m: PreBlock) -> None:
    p = m.placement
    for f in m.finals:  # the moved norm normalizes the output now
        f.norm.node.replace_all_uses_with(f.norm.input)
        erase_unused(gm, reversed(norm_ops(f)))
    p.norm.node.replace_all_uses_with(p.norm.input)
    post = copy_norm(gm, p, m.sum, m.sum.next)
    ops = _norm_ops_of(post)
    m.sum.replace_all_uses_with(post, delete_user_cb=lambda u: u not in ops)
    erase_unused(gm, reversed(norm_ops(p)))


def _norm_ops_of(node: Node) -> set[Node]:
    """The norm output ``node`` and, for a tuple-returning op, the op it takes item 0 of."""
    return {node, *(a for a in node.all_input_nodes if a.op != "get_attr")}


__all__ = ["apply_post", "apply_pre", "copy_norm", "norm_ops"]
