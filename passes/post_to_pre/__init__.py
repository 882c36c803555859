"""post-to-pre / pre-to-post: move each block's norm between the residual sum and the branch input.

Rewrite (Xiong et al. 2020, "On Layer Normalization in the Transformer Architecture")::

    Post-Norm   y = LN(x + F(x))          →    Pre-Norm   y = x + F(LN(x))
    last block  out = LN_L(x_L + F(x_L))  →               out = LN_final(x_L + F_L(LN_L(x_L)))

Each Post-Norm block keeps its norm *parameters*; the norm moves from the residual sum to the start
of the same block's branch (every branch of a parallel sum ``x + F1(x) + F2(x)`` reads the one
moved norm). Because a Pre-Norm stream is never normalized, one *final* norm is added after the
last block (a copy of the last block's norm, its own trainable parameters) so the output the heads
read stays normalized. Embedding norms and any norm that is not a block's post norm stay put.

This is an **architecture change, not an identity**: no choice of weights makes ``x + F(LN(x))``
compute ``LN(x + F(x))`` for all inputs, so the pass is approximate (``exact = False``); the
report gives the measured output difference, and ``heal=STEPS`` fine-tunes the result towards the
original's outputs (:mod:`normrewrite.passes.post_to_pre.heal`).

``pre-to-post`` is the reverse: each block's pre norm moves onto its residual sum, and a final
norm that normalizes the last sum is removed (its parameters are dropped; the last block's own norm
now normalizes the output). Right after ``post-to-pre`` the final norm is a copy of the last
block's norm, so ``pre-to-post ∘ post-to-pre`` restores the original function exactly.

Preconditions: residual connections are found structurally (:mod:`normrewrite.analysis.residual`); a graph
with none is refused (:class:`~normrewrite.errors.PassError`). A norm whose parameters are computed
in the graph, and (for ``pre-to-post``) a residual sum whose branches read two different pre norms
(GPT-NeoX parallel blocks: there is no single post norm to move them to), are skipped with the
reason. Both graph flavours work: ``call_module`` norms are moved as module calls, ATen norms with
their ``get_attr`` parameter reads.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import networkx as nx
import torch
from torch import Tensor
from torch.fx import GraphModule, Node

from normrewrite.analysis.residual import (
    NormPlacement,
    ResidualAdd,
    norm_placements,
    residual_adds,
    residual_sums,
    source,
)
from normrewrite.core.graph import add_parameter, erase_unused, get_tensor, to_networkx
from normrewrite.core.ops import norm_info
from normrewrite.core.pass_infra import Change, Pass, PassContext, PassResult, Skip, compute_tensors
from normrewrite.errors import PassError

# --------------------------------------------------------------------------- tensor math


def _copy(*tensors: Tensor) -> tuple[Tensor, ...]:
    return tuple(t.detach().clone() for t in tensors)


# --------------------------------------------------------------------------- matchers


@dataclass(frozen=True)
class PostBlock:
    """A Post-Norm residual sum: ``norm`` normalizes ``sum``; its branches read ``skip``."""

    placement: NormPlacement
    skip: Node
    sum: Node
    entries: tuple[Node, ...]  # branch nodes reading the skip value
    last: bool  # no residual sum downstream: the output needs a final norm

    def describe(self) -> str:
        text = f"moved from the residual sum to the start of the branch ({_where(self.placement)})"
        return text + ("; final norm added after the last block" if self.last else "")


@dataclass(frozen=True)
class PreBlock:
    """A Pre-Norm residual: ``norm`` normalizes ``skip`` at the start of the branches into ``sum``."""

    placement: NormPlacement
    skip: Node
    sum: Node

    def describe(self) -> str:
        return (
            f"moved from the start of the branch onto the residual sum ({_where(self.placement)})"
        )


@dataclass(frozen=True)
class NoMatch:
    label: str
    reason: str


def _where(p: NormPlacement) -> str:
    return f"block {p.block}" if p.block else f"residual {p.step}"


def _params_problem(p: NormPlacement) -> str | None:
    info = p.norm
    computed = (info.has_weight and info.weight is None) or (info.has_bias and info.bias is None)
    if computed and info.node.op != "call_module":
        return "its parameters are computed in the graph, not stored"
    return None


def _branches_of(res: list[ResidualAdd], total: Node) -> list[ResidualAdd]:
    return [r for r in res if r.sum is total]


def match_post(
    gm: GraphModule,
    p: NormPlacement,
    res: list[ResidualAdd],
    g: nx.DiGraph,
    sums: set[str],
    planned: bool = False,
) -> PostBlock | NoMatch | None:
    """``planned``: ``p`` was a post norm when the pass started (once the other blocks are
    rewritten, the last block's post norm looks like a final norm)."""
    if p.residual is None or not (p.placement == "post" or (planned and p.placement == "final")):
        return None
    problem = _params_problem(p)
    if problem:
        return NoMatch(p.norm.label, problem)
    total = p.residual.sum
    branches = _branches_of(res, total)
    skip = branches[0].skip
    entries = {n for r in branches for n in r.entries}
    if not entries:
        return NoMatch(p.norm.label, "its branch does not read the skip value directly")
    last = not (nx.descendants(g, p.norm.node.name) & sums)
    ordered = tuple(n for n in gm.graph.nodes if n in entries)
    return PostBlock(p, skip, total, ordered, last)


def match_pre(
    gm: GraphModule, p: NormPlacement, res: list[ResidualAdd]
) -> PreBlock | NoMatch | None:
    if p.placement != "pre" or p.residual is None:
        return None
    problem = _params_problem(p)
    if problem:
        return NoMatch(p.norm.label, problem)
    total = p.residual.sum
    readers = set()
    for r in _branches_of(res, total):
        for q in norm_nodes_in(gm, r):
            readers.add(q)
    if len(readers) > 1:
        return NoMatch(
            p.norm.label,
            f"the residual sum has {len(readers)} branches with their own pre norms (parallel "
            "residual): there is no single post norm to move them to",
        )
    return PreBlock(p, p.residual.skip, total)


def norm_nodes_in(gm: GraphModule, r: ResidualAdd) -> list[Node]:
    """Output nodes of the norms at the start of ``r``'s branch (normalizing the skip value)."""
    out = []
    for n in r.branch_nodes:
        info = norm_info(gm, n)
        if (
            info is not None
            and isinstance(info.input, Node)
            and source(gm, info.input) is source(gm, r.skip)
        ):
            out.append(info.node)
    return out


# --------------------------------------------------------------------------- graph surgery


def _norm_ops(p: NormPlacement) -> list[Node]:
    info = p.norm
    if info.op_node is not None and info.op_node is not info.node:
        return [info.op_node, info.node]
    return [info.node]


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
        for op in _norm_ops(p):
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
    info = p.norm
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
    erase_unused(gm, reversed(_norm_ops(p)))


def _rename_module(node: Node, path: str) -> None:
    """Record ``path`` as the module a copied norm belongs to (for reports and ``inspect``)."""
    for n in (node, *node.all_input_nodes):
        stack = n.meta.get("nn_module_stack")
        if n.op != "get_attr" and stack:
            kind = list(stack.values())[-1][1]
            n.meta["nn_module_stack"] = {**stack, path: (path, kind)}


def apply_pre(gm: GraphModule, m: PreBlock, finals: list[NormPlacement]) -> None:
    p = m.placement
    for f in finals:  # the moved norm normalizes the output now
        f.norm.node.replace_all_uses_with(f.norm.input)
        erase_unused(gm, reversed(_norm_ops(f)))
    p.norm.node.replace_all_uses_with(p.norm.input)
    post = copy_norm(gm, p, m.sum, m.sum.next)
    ops = _norm_ops_of(post)
    m.sum.replace_all_uses_with(post, delete_user_cb=lambda u: u not in ops)
    erase_unused(gm, reversed(_norm_ops(p)))


def _norm_ops_of(node: Node) -> set[Node]:
    """The norm output ``node`` and, for a tuple-returning op, the op it takes item 0 of."""
    return {node, *(a for a in node.all_input_nodes if a.op != "get_attr")}


# --------------------------------------------------------------------------- passes


def _analyse(gm: GraphModule) -> tuple[list[ResidualAdd], list[NormPlacement]]:
    res = residual_adds(gm)
    return res, norm_placements(gm, res)


def _no_residuals(name: str) -> PassError:
    return PassError(
        f"{name}: no residual connections found in the graph (no add of a value and a branch "
        "computed from it through a linear/conv/attention layer); nothing to move"
    )


@dataclass(frozen=True)
class PostToPreOptions:
    heal: int = 0
    """fine-tune the result for this many steps to match the original's outputs (0: off)"""
    lr: float = 1e-3
    """learning rate of the healing fine-tune (Adam)"""
    heal_data: str | None = None
    """inputs for healing: a .pt file (tensor or tuple of tensors, samples on dim 0) or .npz"""


class PostToPre(Pass):
    name = "post-to-pre"
    summary = (
        "move each Post-Norm block's norm to the start of its residual branch, add a final norm"
    )
    exact = False

    Options = PostToPreOptions

    def validate_options(self) -> None:
        from normrewrite.errors import UsageError

        if self.options.heal < 0:
            raise UsageError(f"pass {self.name}: heal must be ≥ 0 steps")
        if self.options.lr <= 0:
            raise UsageError(f"pass {self.name}: lr must be positive")

    def call(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        res, places = _analyse(gm)
        if not res:
            raise _no_residuals(self.name)
        planned = {p.norm.node.name for p in places if p.placement == "post"}
        teacher = None
        if self.options.heal:
            teacher = ctx.reference if ctx.reference is not None else copy.deepcopy(gm)
        changes: list[Change] = []
        skipped: dict[str, Skip] = {}
        done: set[str] = set()
        while True:
            g = to_networkx(gm)
            sums = {s.name for s in residual_sums(res)}
            todo = None
            for p in places:
                if p.norm.node.name in done or p.norm.node.name not in planned:
                    continue
                found = match_post(gm, p, res, g, sums, planned=True)
                if isinstance(found, NoMatch):
                    skipped[found.label] = Skip(found.label, found.reason)
                    done.add(p.norm.node.name)
                elif found is not None:
                    todo = found
                    break
            if todo is None:
                break
            label = todo.placement.norm.label
            apply_post(gm, todo, ctx, self.name)
            changes.append(Change(label, todo.describe()))
            done.add(todo.placement.norm.node.name)
            res, places = _analyse(gm)
        notes: list[str] = []
        if not changes:
            kinds = sorted({p.placement for p in places})
            notes.append(
                f"no Post-Norm blocks found (norm placements: {', '.join(kinds) or 'none'}); nothing to do"
            )
        else:
            notes.append(
                "post-to-pre changes the architecture: the output differs from the original "
                "(see verify; heal=STEPS fine-tunes towards it)"
            )
        if changes and self.options.heal:
            from normrewrite.passes.post_to_pre.heal import heal

            assert teacher is not None
            h = heal(
                gm,
                teacher,
                ctx,
                steps=self.options.heal,
                lr=self.options.lr,
                data=self.options.heal_data,
                origin=self.name,
            )
            notes.append(h.describe())
        gm.recompile()
        return PassResult(gm, bool(changes), changes, list(skipped.values()), notes)

    def explain(self, gm: GraphModule, ctx: PassContext) -> dict[str, str]:
        res, places = _analyse(gm)
        g = to_networkx(gm)
        sums = {s.name for s in residual_sums(res)}
        out: dict[str, str] = {}
        for p in places:
            found = match_post(gm, p, res, g, sums)
            key = (p.norm.op_node or p.norm.node).name
            if isinstance(found, PostBlock):
                out[key] = "would move to the start of its branch" + (
                    " (+ final norm)" if found.last else ""
                )
            elif isinstance(found, NoMatch):
                out[key] = f"not movable: {found.reason}"
        return out


class PreToPost(Pass):
    name = "pre-to-post"
    summary = "move each Pre-Norm block's norm onto its residual sum, drop the final norm"
    exact = False

    def call(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        res, places = _analyse(gm)
        if not res:
            raise _no_residuals(self.name)
        final_names = {p.norm.node.name for p in places if p.placement == "final"}
        changes: list[Change] = []
        skipped: dict[str, Skip] = {}
        done: set[str] = set()
        while True:
            todo = None
            for p in places:
                if p.norm.node.name in done:
                    continue
                found = match_pre(gm, p, res)
                if isinstance(found, NoMatch):
                    skipped[found.label] = Skip(found.label, found.reason)
                    done.add(p.norm.node.name)
                elif found is not None:
                    todo = found
                    break
            if todo is None:
                break
            finals = [
                f
                for f in places
                if f.norm.node.name in final_names
                and f.residual is not None
                and f.residual.sum is todo.sum
            ]
            label = todo.placement.norm.label
            apply_pre(gm, todo, finals)
            text = todo.describe()
            if finals:
                text += f"; final norm {', '.join(f.norm.label for f in finals)} removed"
            changes.append(Change(label, text))
            res, places = _analyse(gm)
        notes = [] if changes else ["no Pre-Norm blocks found; nothing to do"]
        gm.recompile()
        return PassResult(gm, bool(changes), changes, list(skipped.values()), notes)

    def explain(self, gm: GraphModule, ctx: PassContext) -> dict[str, str]:
        res, places = _analyse(gm)
        out: dict[str, str] = {}
        for p in places:
            found = match_pre(gm, p, res)
            key = (p.norm.op_node or p.norm.node).name
            if isinstance(found, PreBlock):
                out[key] = "would move onto its residual sum"
            elif isinstance(found, NoMatch):
                out[key] = f"not movable: {found.reason}"
        return out


__all__ = [
    "NoMatch",
    "PostBlock",
    "PostToPre",
    "PreBlock",
    "PreToPost",
    "copy_norm",
    "match_post",
    "match_pre",
]
