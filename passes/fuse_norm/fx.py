"""fuse-norm on torch.fx graphs: the rewrite of a written-out norm (matched by
:func:`normrewrite.analysis.norms.written.match`, see the identities in
:mod:`normrewrite.passes.fuse_norm`) to one fused op."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from normrewrite.analysis.norms.conditions import NormKind
from normrewrite.analysis.norms.written import NormPattern, match
from normrewrite.core.graph import Flavour, assertions_on, erase_unused, flavour

aten = torch.ops.aten

__all__ = ["NormPattern", "apply", "match"]


def apply(gm: GraphModule, m: NormPattern) -> Node:
    aten_flavour = flavour(gm) is Flavour.ATEN
    with gm.graph.inserting_after(m.out):
        if m.kind is NormKind.RMSNORM:
            if aten_flavour:
                fused = gm.graph.call_function(
                    aten.rms_norm.default, (m.x, [m.features], m.weight, m.eps)
                )
            else:
                fused = gm.graph.call_function(F.rms_norm, (m.x, (m.features,), m.weight, m.eps))
        elif aten_flavour:
            fused = gm.graph.call_function(
                aten.layer_norm.default, (m.x, [m.features], m.weight, m.bias, m.eps)
            )
        else:
            fused = gm.graph.call_function(
                F.layer_norm, (m.x, (m.features,), m.weight, m.bias, m.eps)
            )
    fused.meta = dict(m.out.meta)
    if "val" in m.core.meta and m.out is not m.core:
        fused.meta["val"] = m.out.meta.get("val", m.core.meta["val"])
    doomed = [*assertions_on(list(m.nodes)), *reversed(m.nodes)]
    m.out.replace_all_uses_with(fused)
    # the fused op reads x and γ/β: move those reads before it if they came later
    for dep in (m.weight, m.bias):
        if dep is not None:
            _move_before(gm, dep, fused)
    for n in doomed[: len(doomed) - len(m.nodes)]:
        gm.graph.erase_node(n)  # export's dtype assertions on the old values
    erase_unused(gm, list(reversed(m.nodes)))
    return fused


def _move_before(gm: GraphModule, dep: Node, node: Node) -> None:
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    if order[dep] > order[node]:
        node.prepend(dep)
