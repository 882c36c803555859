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
reason. Every norm placed ``post`` is moved or listed in ``skipped``: a written-out norm (no fused
op to move: run ``fuse-norm`` first), and a res-post norm ``x + N(F(x))`` (Swin-v2, OLMo-2), which
normalizes a branch output rather than the sum — its block is not Post-Norm, and moving ``N`` onto
the branch input would be another model, not this rewrite. A model with no Post-Norm block says so
in a note (how many blocks are Pre-Norm / res-post). Both graph flavours work: ``call_module`` norms are moved as module calls, ATen norms with
their ``get_attr`` parameter reads.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from torch.fx import GraphModule, Node

from normrewrite.analysis.residual import (
    NormPlacement,
    ResidualAdd,
    norm_placements,
    residual_adds,
    residual_sums,
)
from normrewrite.core.pass_infra import Change, PassContext, PassResult, Skip
from normrewrite.core.rewrite import M, Rewrite, RewritePass, Sweep, rewrite_each
from normrewrite.errors import PassError, UsageError

from .surgery import apply_post, apply_pre, copy_norm

# --------------------------------------------------------------------------- matchers


@dataclass(frozen=True)
class PostBlock:
    """A Post-Norm residual sum: ``norm`` normalizes ``sum``; its branches read ``skip``."""

    placement: NormPlacement
    skip: Node
    sum: Node
    entries: tuple[Node, ...]  # branch nodes reading the skip value
    last: bool  # no residual sum downstream: the output needs a final norm

    def preview(self) -> str:
        return "would move to the start of its branch" + (" (+ final norm)" if self.last else "")

    def describe(self) -> str:
        text = f"moved from the residual sum to the start of the branch ({_where(self.placement)})"
        return text + ("; final norm added after the last block" if self.last else "")


@dataclass(frozen=True)
class PreBlock:
    """A Pre-Norm residual: ``norm`` normalizes ``skip`` at the start of the branches into ``sum``."""

    placement: NormPlacement
    skip: Node
    sum: Node
    finals: tuple[NormPlacement, ...] = ()  # final norms on ``sum``, removed by the move

    def preview(self) -> str:
        return "would move onto its residual sum"

    def describe(self) -> str:
        text = (
            f"moved from the start of the branch onto the residual sum ({_where(self.placement)})"
        )
        if self.finals:
            text += f"; final norm {', '.join(f.norm.label for f in self.finals)} removed"
        return text


def _where(p: NormPlacement) -> str:
    return f"block {p.block}" if p.block else f"residual {p.step}"


WRITTEN_OUT = "written-out norm: run fuse-norm first"
RES_POST = (
    "res-post norm x + N(F(x)): it normalizes the branch output, not the residual sum, so the "
    "block is not Post-Norm (its stream is never normalized, as in Pre-Norm); left in place"
)


def _params_problem(p: NormPlacement) -> str | None:
    info = p.norm.info
    if info is None:
        return WRITTEN_OUT
    computed = (info.has_weight and info.weight is None) or (info.has_bias and info.bias is None)
    if computed and info.node.op != "call_module":
        return "its parameters are computed in the graph, not stored"
    return None


def _branches_of(res: list[ResidualAdd], total: Node) -> list[ResidualAdd]:
    return [r for r in res if r.sum is total]


def match_post(
    gm: GraphModule, p: NormPlacement, res: list[ResidualAdd], planned: bool = False
) -> PostBlock | Skip | None:
    """``planned``: ``p`` was a post norm when the pass started (once the other blocks are
    rewritten, the last block's post norm looks like a final norm)."""
    if p.residual is None:
        return None
    if p.placement == "res-post":
        return Skip(p.norm.label, RES_POST)
    if not (p.placement == "post" or (planned and p.placement == "final")):
        return None
    problem = _params_problem(p)
    if problem:
        return Skip(p.norm.label, problem)
    total = p.residual.sum
    branches = _branches_of(res, total)
    skip = branches[0].skip
    entries = {n for r in branches for n in r.entries}
    if not entries:
        return Skip(p.norm.label, "its branch does not read the skip value directly")
    last = not p.continues
    ordered = tuple(n for n in gm.graph.nodes if n in entries)
    return PostBlock(p, skip, total, ordered, last)


def match_pre(
    gm: GraphModule,
    p: NormPlacement,
    res: list[ResidualAdd],
    places: list[NormPlacement],
    final_names: set[str],
) -> PreBlock | Skip | None:
    """``final_names``: the final norms when the pass started (a moved norm can look final later)."""
    if p.placement != "pre" or p.residual is None:
        return None
    problem = _params_problem(p)
    if problem:
        return Skip(p.norm.label, problem)
    total = p.residual.sum
    readers = {
        q.norm.node
        for q in places
        if q.placement == "pre" and q.residual is not None and q.residual.sum is total
    }
    if len(readers) > 1:
        return Skip(
            p.norm.label,
            f"the residual sum has {len(readers)} branches with their own pre norms (parallel "
            "residual): there is no single post norm to move them to",
        )
    finals = tuple(
        f
        for f in places
        if f.norm.node.name in final_names and f.residual is not None and f.residual.sum is total
    )
    return PreBlock(p, p.residual.skip, total, finals)


def block_kinds(places: list[NormPlacement], res: list[ResidualAdd]) -> dict[str, int]:
    """How many residual blocks (sums) are Post-Norm, Pre-Norm, res-post or without a norm."""
    on: dict[Node, set[str]] = {s: set() for s in residual_sums(res)}
    for p in places:
        if p.residual is not None and p.residual.sum in on:
            on[p.residual.sum].add(p.placement)
    counts: dict[str, int] = {}
    for kinds in on.values():
        if "post" in kinds:
            kind = "Post-Norm"
        elif "pre" in kinds:
            kind = "Pre-Norm"
        elif "res-post" in kinds:
            kind = "res-post"
        else:
            kind = "without a norm"
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def _nothing_moved(blocks: dict[str, int], skipped: int) -> str:
    total = sum(blocks.values())
    if blocks.get("Post-Norm"):
        return f"no block moved: {blocks['Post-Norm']} Post-Norm blocks, all skipped (see skipped)"
    if len(blocks) == 1:
        text = f"no Post-Norm blocks: all {total} blocks are {next(iter(blocks))}"
    else:
        parts = ", ".join(f"{n} {kind}" for kind, n in blocks.items())
        text = f"no Post-Norm blocks: {total} blocks ({parts})"
    return text + (f"; {skipped} norms skipped (see skipped)" if skipped else "; nothing to do")


# --------------------------------------------------------------------------- passes


def _no_residuals(name: str) -> PassError:
    return PassError(
        f"{name}: no residual connections found in the graph (no add of a value and a branch "
        "computed from it through a linear/conv/attention layer); nothing to move"
    )


class _MoveNorms(Rewrite[M]):
    """Candidates are the norm placements of a fresh residual analysis: each move changes the
    blocks around it, so the driver rematches after every move (:attr:`Sweep.UNTIL_NONE`)."""

    refused = "not movable"

    def __init__(self, gm: GraphModule, ctx: PassContext) -> None:
        super().__init__(gm, ctx)
        self.residuals: list[ResidualAdd] = residual_adds(gm)
        self.places = norm_placements(gm, self.residuals)
        self.stale = False  # the graph changed since the analysis

    def candidates(self) -> list[NormPlacement]:
        if self.stale:
            self.residuals = residual_adds(self.gm)
            self.places = norm_placements(self.gm, self.residuals)
            self.stale = False
        return self.places

    def key(self, candidate: NormPlacement) -> str:
        return (candidate.norm.nodes or (candidate.norm.node,))[0].name


class _PostToPre(_MoveNorms[PostBlock]):
    def __init__(self, gm: GraphModule, ctx: PassContext) -> None:
        super().__init__(gm, ctx)
        # post (and res-post) norms when the pass started: once the other blocks are rewritten,
        # the last block's post norm looks like a final norm
        self.planned = {
            p.norm.node.name for p in self.places if p.placement in ("post", "res-post")
        }

    def match(self, candidate: NormPlacement) -> PostBlock | Skip | None:
        if candidate.norm.node.name not in self.planned:
            return None
        return match_post(self.gm, candidate, self.residuals, planned=True)

    def apply(self, found: PostBlock) -> Change:
        change = Change(found.placement.norm.label, found.describe())
        apply_post(self.gm, found, self.ctx, PostToPre.name)
        self.stale = True
        return change


class _PreToPost(_MoveNorms[PreBlock]):
    def __init__(self, gm: GraphModule, ctx: PassContext) -> None:
        super().__init__(gm, ctx)
        self.final_names = {p.norm.node.name for p in self.places if p.placement == "final"}

    def match(self, candidate: NormPlacement) -> PreBlock | Skip | None:
        return match_pre(self.gm, candidate, self.residuals, self.places, self.final_names)

    def apply(self, found: PreBlock) -> Change:
        change = Change(found.placement.norm.label, found.describe())
        apply_pre(self.gm, found)
        self.stale = True
        return change


@dataclass(frozen=True)
class PostToPreOptions:
    heal: int = 0
    """fine-tune the result for this many steps to match the original's outputs (0: off)"""
    lr: float = 1e-3
    """learning rate of the healing fine-tune (Adam)"""
    heal_data: str | None = None
    """inputs for healing: a .pt file (tensor or tuple of tensors, samples on dim 0) or .npz"""


class PostToPre(RewritePass):
    name = "post-to-pre"
    summary = (
        "move each Post-Norm block's norm to the start of its residual branch, add a final norm"
    )
    exact = False
    sweep = Sweep.UNTIL_NONE
    Options = PostToPreOptions

    def validate_options(self) -> None:
        if self.options.heal < 0:
            raise UsageError(f"pass {self.name}: heal must be ≥ 0 steps")
        if self.options.lr <= 0:
            raise UsageError(f"pass {self.name}: lr must be positive")

    def rewriter(self, gm: GraphModule, ctx: PassContext) -> _PostToPre:
        return _PostToPre(gm, ctx)

    def call(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        rewrite = self.rewriter(gm, ctx)
        if not rewrite.residuals:
            raise _no_residuals(self.name)
        teacher = None
        if self.options.heal:
            teacher = ctx.reference if ctx.reference is not None else copy.deepcopy(gm)
        blocks = block_kinds(rewrite.places, rewrite.residuals)
        result = rewrite_each(rewrite, self.sweep)
        if not result.changes:
            result.notes.append(_nothing_moved(blocks, len(result.skipped)))
            return result
        result.notes.append(
            "post-to-pre changes the architecture: the output differs from the original "
            "(see verify; heal=STEPS fine-tunes towards it)"
        )
        if teacher is not None:
            from normrewrite.passes.post_to_pre.heal import heal

            gm.recompile()  # heal runs the rewritten graph; the matches left the code stale
            h = heal(
                gm,
                teacher,
                ctx,
                steps=self.options.heal,
                lr=self.options.lr,
                data=self.options.heal_data,
                origin=self.name,
            )
            result.notes.append(h.describe())
        return result


class PreToPost(RewritePass):
    name = "pre-to-post"
    summary = "move each Pre-Norm block's norm onto its residual sum, drop the final norm"
    exact = False
    sweep = Sweep.UNTIL_NONE

    def rewriter(self, gm: GraphModule, ctx: PassContext) -> _PreToPost:
        return _PreToPost(gm, ctx)

    def call(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        rewrite = self.rewriter(gm, ctx)
        if not rewrite.residuals:
            raise _no_residuals(self.name)
        result = rewrite_each(rewrite, self.sweep)
        if not result.changes:
            result.notes.append("no Pre-Norm blocks found; nothing to do")
        return result


__all__ = [
    "RES_POST",
    "WRITTEN_OUT",
    "PostBlock",
    "PostToPre",
    "PreBlock",
    "PreToPost",
    "copy_norm",
    "match_post",
    "match_pre",
]
