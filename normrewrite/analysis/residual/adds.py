"""Residual adds: where a value joins a branch computed from it.

A *residual add* is an addition ``s = x + F(x)`` whose one operand (the *skip*, the residual
stream ``x``) reaches the other (the *branch* output ``F(x)``) in the data-flow graph, through
a branch that contains at least one weighted layer (linear, conv, matmul/attention). The test is
purely structural — reachability on the networkx view of the fx graph
(:func:`normrewrite.core.graph.to_networkx`) — so it finds residuals in any architecture and through
anything a branch may contain: dropout, attention masks (which reach the branch from elsewhere;
the skip need not dominate the branch), reshapes, GELU. Sums of several terms
(``x + attn(LN1(x)) + mlp(LN2(x))``, the GPT-NeoX/GPT-J parallel residual) are flattened first,
so every branch of the sum is found whatever order the terms are added in. Adds whose branch holds
no weighted layer (the ``x + 0.044715·x³`` inside a tanh-GELU) are not residuals.

Everything here only reads the graph.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from dataclasses import dataclass

import networkx as nx
import torch
from torch.fx import GraphModule, Node

from normrewrite.core.graph import module_path, node_shape, to_networkx
from normrewrite.core.ops import conv_info, linear_info

aten = torch.ops.aten

# --------------------------------------------------------------------------- op tables

_ADD_FUNCS = {aten.add.Tensor, aten.add_.Tensor, operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_", "__add__", "__iadd__"}
# ops that pass a value through unchanged (in eval mode) — looked through when matching values
_TRANSPARENT_FUNCS = {
    aten.dropout.default,
    aten.clone.default,
    aten.alias.default,
    aten.contiguous.default,
    aten._to_copy.default,
    aten.to.dtype,
    aten.detach.default,
    aten.native_dropout.default,
    torch.nn.functional.dropout,
    torch.clone,
}
_TRANSPARENT_METHODS = {"contiguous", "clone", "to", "float", "type_as", "detach"}
_TRANSPARENT_MODULES = (torch.nn.Dropout, torch.nn.Identity)
# weighted ops that make a branch a real sublayer rather than elementwise arithmetic
_MATMUL_FUNCS = {
    aten.mm.default,
    aten.bmm.default,
    aten.matmul.default,
    aten.addmm.default,
    aten.baddbmm.default,
    aten.einsum.default,
    aten.scaled_dot_product_attention.default,
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.matmul,
    torch.bmm,
    torch.mm,
    torch.einsum,
    operator.matmul,
    torch.nn.functional.scaled_dot_product_attention,
}


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class ResidualAdd:
    """A residual connection: ``node`` adds ``branch`` (computed from ``skip``) to the stream.

    ``branch_nodes`` are the nodes on paths from ``skip`` to ``branch`` (``branch`` included,
    ``skip`` not). ``output`` is the value that carries the stream on: ``node`` itself, or the
    last add of a multi-term sum (``x + a + b``) that ``node`` belongs to.
    """

    node: Node
    skip: Node
    branch: Node
    branch_nodes: frozenset[Node]
    output: Node | None = None

    @property
    def sum(self) -> Node:
        """The residual sum: the value the stream continues with."""
        return self.output if self.output is not None else self.node

    @property
    def entries(self) -> list[Node]:
        """The branch nodes that read the skip value itself: where the branch starts."""
        return [n for n in self.skip.users if n in self.branch_nodes]


# --------------------------------------------------------------------------- helpers


def is_add(node: Node) -> bool:
    """``node`` adds two tensors (no ``alpha`` scaling), in any graph flavour."""
    if node.op == "call_function" and node.target in _ADD_FUNCS:
        if node.kwargs.get("alpha", 1) != 1 or len(node.args) > 2:
            return False
    elif not (node.op == "call_method" and node.target in _ADD_METHODS):
        return False
    return len(node.args) >= 2 and all(isinstance(a, Node) for a in node.args[:2])


def is_transparent(gm: GraphModule, node: Node) -> bool:
    """An op that passes its first input through unchanged at inference (dropout, clone, cast)."""
    if node.op == "call_function":
        return node.target in _TRANSPARENT_FUNCS
    if node.op == "call_method":
        return node.target in _TRANSPARENT_METHODS
    if node.op == "call_module":
        try:
            return isinstance(gm.get_submodule(str(node.target)), _TRANSPARENT_MODULES)
        except AttributeError:
            return False
    return False


def source(gm: GraphModule, node: Node) -> Node:
    """``node`` with transparent ops (dropout, clone, casts) looked through, backwards."""
    while is_transparent(gm, node) and node.args and isinstance(node.args[0], Node):
        node = node.args[0]
    return node


def consumers(gm: GraphModule, node: Node) -> list[Node]:
    """The users of ``node``, looking through transparent ops forwards."""
    out: list[Node] = []
    for u in node.users:
        if is_transparent(gm, u) and u.args and u.args[0] is node:
            out.extend(consumers(gm, u))
        else:
            out.append(u)
    return out


def is_weighted(gm: GraphModule, node: Node) -> bool:
    """A linear/conv layer, a matmul/attention op, or a module with parameters."""
    if node.op == "call_module":
        try:
            mod = gm.get_submodule(str(node.target))
        except AttributeError:
            return False
        return any(True for _ in mod.parameters())
    if node.op == "call_function" and node.target in _MATMUL_FUNCS:
        return True
    if node.op == "call_method" and node.target in ("matmul", "bmm", "mm"):
        return True
    return conv_info(gm, node) is not None or linear_info(gm, node) is not None


def _same_shape(a: Node, b: Node) -> bool:
    sa, sb = node_shape(a), node_shape(b)
    return sa is None or sb is None or sa == sb


def _sum_terms(root: Node) -> list[tuple[Node, Node]]:
    """(term, the add that reads it) for a sum of adds, flattening single-use inner adds."""
    out: list[tuple[Node, Node]] = []
    for a in root.args[:2]:
        assert isinstance(a, Node)
        if is_add(a) and len(a.users) == 1:
            out.extend(_sum_terms(a))
        else:
            out.append((a, root))
    return out


def _sum_roots(gm: GraphModule) -> list[Node]:
    """Adds that are not a single-use term of a larger sum."""
    roots = []
    for n in gm.graph.nodes:
        if not is_add(n):
            continue
        users = list(n.users)
        if len(users) == 1 and is_add(users[0]) and n in users[0].args[:2]:
            continue
        roots.append(n)
    return roots


# --------------------------------------------------------------------------- residual adds


def residual_adds(gm: GraphModule, graph: nx.DiGraph | None = None) -> list[ResidualAdd]:
    """Every residual connection of ``gm``, in graph order (one record per branch).

    For each sum of terms, the *skip* is the term from which most other terms are reachable; each
    such term whose connecting subgraph holds a weighted layer is a branch.
    """
    g = graph if graph is not None else to_networkx(gm)
    found: list[ResidualAdd] = []
    for root in _sum_roots(gm):
        terms = _sum_terms(root)
        if len(terms) < 2:
            continue
        desc = {t: nx.descendants(g, t.name) for t, _ in terms if t.name in g}
        best: tuple[int, Node] | None = None
        for t, _ in terms:
            reach = sum(1 for o, _ in terms if o is not t and o.name in desc.get(t, ()))
            if reach and (best is None or reach > best[0]):
                best = (reach, t)
        if best is None:
            continue
        skip = best[1]
        if not _same_shape(skip, root):
            continue
        skip_desc = desc[skip]
        for term, add in terms:
            if term is skip or term.name not in skip_desc:
                continue
            anc = nx.ancestors(g, term.name)
            names = (skip_desc & anc) | {term.name}
            nodes = frozenset(g.nodes[n]["node"] for n in names)
            if not any(is_weighted(gm, n) for n in nodes):
                continue
            found.append(ResidualAdd(add, skip, term, nodes, root))
    return found


def residual_sums(residuals: Iterable[ResidualAdd]) -> list[Node]:
    """The distinct residual sums (stream steps), in the order given."""
    seen: dict[Node, None] = {}
    for r in residuals:
        seen.setdefault(r.sum, None)
    return list(seen)


def block_name(r: ResidualAdd) -> str | None:
    """The common module path of the weighted layers in a branch (e.g. ``encoder.layer.0``)."""
    paths = [p.split(".") for p in (module_path(n) for n in r.branch_nodes) if p]
    if not paths:
        return None
    common = paths[0]
    for p in paths[1:]:
        i = 0
        while i < min(len(common), len(p)) and common[i] == p[i]:
            i += 1
        common = common[:i]
    return ".".join(common) or None


__all__ = [
    "ResidualAdd",
    "block_name",
    "consumers",
    "is_add",
    "is_transparent",
    "is_weighted",
    "residual_adds",
    "residual_sums",
    "source",
]
