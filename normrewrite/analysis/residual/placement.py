"""Norm placement: where each norm (:func:`normrewrite.analysis.norms.find_norms`) sits relative
to the residual stream (:mod:`normrewrite.analysis.residual.adds`).

* ``pre`` — it normalizes the skip value and feeds that branch: ``x + F(N(x))``;
* ``post`` — it normalizes a residual sum and the stream continues from it (``N(x + F(x))``), or
  it normalizes the last sum of a block whose branches hold no norm of their own (the last block
  of a Post-Norm stack, BART's encoder ``final_layer_norm``);
* ``sandwich`` — the last op of a branch that also has a pre norm: ``x + N2(F(N1(x)))`` (Gemma-2/3,
  GLM-4, Peri-LN);
* ``res-post`` — the last op of a branch without a pre norm: ``x + N(F(x))`` (Swin-v2, OLMo-2);
* ``final`` — it normalizes a residual sum the stream does not continue from, in a block with a
  pre norm, or with branch-output norms on a stream no post norm feeds: the output norm of a
  Pre-Norm (or res-post) stack;
* ``qk-norm`` — inside attention, on the queries or keys (OLMo-2, Qwen3, Gemma-3, Persimmon);
* ``other`` — anything else (an embedding norm, a per-layer output tap, a CNN's BatchNorm).

A norm is read through what sits between it and the stream without changing which value it is:
casts, dropout, and elementwise ops with a stored operand (a written-out ``1 + γ`` scale left
after ``fuse-norm``). "The stream continues from" a value when a later residual's skip is reached
from it without a weighted layer or another norm in between (looking through masking multiplies,
pooling, upsampling). Everything here only reads the graph.
"""

from __future__ import annotations

import operator
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch.fx import GraphModule, Node

from normrewrite.analysis.norms import Norm, find_norms

from .adds import ResidualAdd, block_name, is_weighted, residual_adds, source

aten = torch.ops.aten

Placement = Literal["pre", "post", "sandwich", "res-post", "final", "qk-norm", "other"]
PLACEMENTS: tuple[str, ...] = ("pre", "post", "sandwich", "res-post", "final", "qk-norm", "other")

# elementwise ops a norm's affine or a cast may be written with, looked through when the other
# operand is stored (a parameter, a constant, or computed from them only)
_ELEMENTWISE = {
    aten.mul.Tensor,
    aten.add.Tensor,
    aten.sub.Tensor,
    aten.div.Tensor,
    aten.type_as.default,
    operator.mul,
    operator.add,
    operator.sub,
    operator.truediv,
    torch.mul,
    torch.add,
}
_ELEMENTWISE_METHODS = {"mul", "add", "sub", "div", "type_as", "__mul__", "__add__"}
_SOFTMAX = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default, torch.softmax}
_SEARCH_LIMIT = 96  # nodes visited by one forward search (a block is a few dozen ops)


@dataclass(frozen=True)
class NormPlacement:
    """Where a norm sits relative to the residual stream."""

    norm: Norm
    placement: Placement
    residual: ResidualAdd | None  # the residual (branch or sum) it belongs to
    step: int | None  # index of that residual sum in graph order (two per transformer layer)
    block: str | None  # a readable name of the branch (common module path of its layers)
    continues: bool = False  # a norm on a residual sum: the stream goes on from its output


# --------------------------------------------------------------------------- value flow


def _stored(node: Node, memo: dict[Node, bool]) -> bool:
    """``node`` is computed from parameters and constants only (no graph input)."""
    if node not in memo:
        if node.op == "get_attr":
            memo[node] = True
        elif node.op in ("placeholder", "output"):
            memo[node] = False
        else:
            memo[node] = all(_stored(a, memo) for a in node.all_input_nodes)
    return memo[node]


def _elementwise(node: Node) -> bool:
    if node.op == "call_function":
        return node.target in _ELEMENTWISE
    return node.op == "call_method" and node.target in _ELEMENTWISE_METHODS


def _behind(gm: GraphModule, node: Node, memo: dict[Node, bool]) -> Node:
    """``node`` looked through backwards: casts, dropout, and elementwise ops with a stored
    operand (the value a norm's written-out affine or cast is applied to)."""
    while True:
        node = source(gm, node)
        if not _elementwise(node):
            return node
        data = [a for a in node.args[:2] if isinstance(a, Node) and not _stored(a, memo)]
        if node.target in (aten.type_as.default, "type_as"):
            data = data[:1]
        if len(data) != 1:
            return node
        node = data[0]


def _search(
    gm: GraphModule, start: Node, stop: Callable[[Node], bool], hit: Callable[[Node, Node], bool]
) -> bool:
    """Breadth-first from ``start`` along users, not entering nodes ``stop`` accepts; True when
    ``hit(user, from_node)`` holds for a user reached."""
    seen, queue = {start}, deque([start])
    while queue and len(seen) < _SEARCH_LIMIT:
        n = queue.popleft()
        for u in n.users:
            if hit(u, n):
                return True
            if u not in seen and not stop(u):
                seen.add(u)
                queue.append(u)
    return False


def _is_attention(node: Node) -> bool:
    if node.op != "call_function":
        return False
    name = getattr(node.target, "__name__", "") or str(node.target)
    return "scaled_dot_product" in name


def _is_matmul(node: Node) -> bool:
    if node.op == "call_method":
        return node.target in ("matmul", "bmm")
    return node.op == "call_function" and node.target in (
        aten.matmul.default,
        aten.bmm.default,
        aten.einsum.default,
        torch.matmul,
        torch.bmm,
        torch.einsum,
        operator.matmul,
    )


# --------------------------------------------------------------------------- placement


class _Placer:
    """The analysis of one graph: residuals, norms, and the lookups placement needs."""

    def __init__(self, gm: GraphModule, res: list[ResidualAdd], found: list[Norm]) -> None:
        self.gm, self.res, self.norms = gm, res, found
        self.memo: dict[Node, bool] = {}
        self.norm_nodes = {n for norm in found for n in (*norm.nodes, norm.node)}
        self.skips = {source(gm, r.skip) for r in res} | {r.skip for r in res}
        self.by_skip: dict[Node, list[ResidualAdd]] = {}
        self.by_sum: dict[Node, list[ResidualAdd]] = {}
        for r in res:
            self.by_skip.setdefault(source(gm, r.skip), []).append(r)
            self.by_sum.setdefault(r.sum, []).append(r)
        self.branch_end = {_behind(gm, r.branch, self.memo): r for r in res}
        self.step_of = {s: i for i, s in enumerate(self.by_sum)}

    def _barrier(self, node: Node) -> bool:
        return node in self.norm_nodes or is_weighted(self.gm, node)

    def continues(self, norm: Norm) -> bool:
        """The stream continues from ``norm``'s output: a later residual's skip is reached from
        it without a weighted layer or another norm in between."""
        if norm.node in self.skips:
            return True
        return _search(
            self.gm, norm.node, self._barrier, lambda u, _: u in self.skips and not self._barrier(u)
        )

    def feeds_scores(self, norm: Norm) -> bool:
        """``norm``'s output reaches an attention's queries or keys before any weighted layer."""

        def scores(u: Node, came_from: Node) -> bool:
            if _is_attention(u):
                return any(a is came_from for a in u.args[:2])
            if _is_matmul(u):
                return _search(self.gm, u, self._barrier, lambda v, _: v.target in _SOFTMAX)
            return False

        return _search(self.gm, norm.node, self._barrier, scores)

    def pre_of(self, norm: Norm) -> ResidualAdd | None:
        x = source(self.gm, norm.input)
        for r in self.by_skip.get(x, []):
            if any(n in r.branch_nodes for n in (*norm.nodes, norm.node)):
                return r
        return None

    def branch_of(self, norm: Norm) -> ResidualAdd | None:
        """The residual whose branch ``norm`` ends (its output is what the branch adds)."""
        for n in (norm.node, *norm.nodes):
            if n in self.branch_end:
                return self.branch_end[n]
        return None

    def inside(self, norm: Norm) -> ResidualAdd | None:
        return next((r for r in self.res if norm.node in r.branch_nodes), None)

    def normed(self, r: ResidualAdd, pre_sums: set[Node], end_sums: set[Node]) -> bool:
        """The stream into ``r``'s sum is left unnormalized by its block, so a norm after the
        last sum is a *final* norm: the block has a pre norm, or branch-output norms on a stream
        that no post norm feeds (Swin-v2, OLMo-2; not ``N(x + N_out(F(x)))`` after a post norm)."""
        if r.sum in pre_sums:
            return True
        return r.sum in end_sums and _behind(self.gm, r.skip, self.memo) not in self.norm_nodes

    def place(self) -> list[NormPlacement]:
        pre = {id(n): self.pre_of(n) for n in self.norms}
        normed = {r for r in pre.values() if r is not None}  # branches with a pre norm
        ends = {id(n): self.branch_of(n) for n in self.norms}
        pre_sums = {r.sum for r in normed}
        end_sums = {r.sum for r in ends.values() if r is not None}
        out: list[NormPlacement] = []
        for norm in self.norms:
            placement: Placement = "other"
            goes_on = False
            owner = pre[id(norm)]
            end = ends[id(norm)]
            x = _behind(self.gm, norm.input, self.memo)
            if owner is not None:
                placement = "pre"
            elif end is not None:
                owner = end
                placement = "sandwich" if end in normed else "res-post"
            elif x in self.by_sum:
                owner = self.by_sum[x][0]
                goes_on = self.continues(norm)
                if goes_on:
                    placement = "post"
                elif x in self.skips:
                    placement = "other"  # the stream goes on from the sum itself: a side tap
                else:
                    placement = "final" if self.normed(owner, pre_sums, end_sums) else "post"
            elif self.feeds_scores(norm):
                owner, placement = self.inside(norm), "qk-norm"
            step = self.step_of.get(owner.sum) if owner is not None else None
            block = block_name(owner) if owner is not None else None
            out.append(NormPlacement(norm, placement, owner, step, block, goes_on))
        return out


def norm_placements(
    gm: GraphModule,
    residuals: list[ResidualAdd] | None = None,
    norms: list[Norm] | None = None,
) -> list[NormPlacement]:
    """The placement of every norm of ``gm`` (graph order); see the module docstring."""
    res = residual_adds(gm) if residuals is None else residuals
    found = find_norms(gm) if norms is None else norms
    return _Placer(gm, res, found).place()


__all__ = ["PLACEMENTS", "NormPlacement", "Placement", "norm_placements"]
