"""The match protocol every graph rewrite follows, and its driver.

A rewrite is a :class:`Rewrite` bound to one graph: ``match(candidate)`` returns a small frozen
record of what matched, a :class:`~normrewrite.core.pass_infra.Skip` with the reason, or None (not
a candidate); ``apply(match)`` rewrites the graph and returns a
:class:`~normrewrite.core.pass_infra.Change`. :func:`rewrite_each` drives it — one walk in order,
match-all-then-apply, or rematch-until-none (:class:`Sweep`) — and :func:`explain_each` derives
``explain`` from the same matcher. :class:`RewritePass` is a :class:`~normrewrite.core.pass_infra.Pass`
made of one such rewrite.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import Any, ClassVar, Generic, TypeVar

from torch.fx import GraphModule, Node

from normrewrite.core.pass_infra import Change, Pass, PassContext, PassResult, Skip
from normrewrite.errors import PassError

M = TypeVar("M")  # a pass's match record


class Sweep(enum.Enum):
    """How :func:`rewrite_each` walks the candidates of a :class:`Rewrite`."""

    IN_ORDER = "in order"
    """One walk: match each candidate and apply its match at once (later candidates see the
    rewritten graph)."""
    MATCH_ALL_FIRST = "match all first"
    """Match every candidate on the untouched graph, run :meth:`Rewrite.prepare` on the matches
    (e.g. to measure something on the original), then apply them in order."""
    UNTIL_NONE = "until none"
    """After each rewrite list the candidates again (the rewrite may change what an analysis
    sees) and rematch from the first one not yet decided; stop when a walk finds no match. Each
    candidate (by :meth:`Rewrite.key`) is decided once: rewritten or skipped."""


class Rewrite(Generic[M]):
    """One rewrite bound to one graph for one run: the match protocol every graph pass follows.

    * :meth:`candidates` — what to look at (the graph's nodes by default);
    * :meth:`match` — ``M`` (a small frozen record of what matched), a :class:`Skip` (a candidate
      left alone, with the reason) or None (not a candidate); it must not modify the graph;
    * :meth:`apply` — rewrite one match and describe it as a :class:`Change` (None: the match
      turned out to need no change).

    :func:`rewrite_each` drives it for ``call``; :func:`explain_each` derives ``explain`` from the
    same :meth:`match`, so ``inspect`` and the rewrite never disagree."""

    refused: ClassVar[str] = "not rewritten"
    """How :func:`explain_each` introduces a skip's reason (``"not foldable"``)."""

    def __init__(self, gm: GraphModule, ctx: PassContext) -> None:
        self.gm = gm
        self.ctx = ctx

    def candidates(self) -> Iterable[Any]:
        return list(self.gm.graph.nodes)

    def key(self, candidate: Any) -> str:
        """The name ``explain`` reports a candidate under (and UNTIL_NONE decides it by)."""
        return candidate.name

    def match(self, candidate: Any) -> M | Skip | None:
        raise NotImplementedError

    def apply(self, found: M) -> Change | None:
        raise NotImplementedError

    def preview(self, found: M) -> str:
        """What ``explain`` says about a match: the record's own ``preview()``."""
        return found.preview()  # type: ignore[attr-defined]

    def prepare(self, matches: list[M]) -> None:
        """:attr:`Sweep.MATCH_ALL_FIRST` only: runs once after matching, before applying."""


def _alive(candidate: Any) -> bool:
    return not isinstance(candidate, Node) or candidate.graph is not None  # erased by a rewrite


def rewrite_each(rewrite: Rewrite[Any], sweep: Sweep = Sweep.IN_ORDER) -> PassResult:
    """The pass driver: walk ``rewrite``'s candidates as ``sweep`` says, collecting the changes
    and skips. The graph's code is not regenerated here: :meth:`Pass.ensures` lints and recompiles
    once per pass."""
    changes: list[Change] = []
    skipped: list[Skip] = []

    def applied(found: Any) -> None:
        change = rewrite.apply(found)
        if change is not None:
            changes.append(change)

    if sweep is Sweep.UNTIL_NONE:
        decided: set[str] = set()
        skips: dict[str, Skip] = {}
        progress = True
        while progress:
            progress = False
            for candidate in rewrite.candidates():
                key = rewrite.key(candidate)
                if key in decided or not _alive(candidate):
                    continue
                found = rewrite.match(candidate)
                if found is None:
                    continue
                decided.add(key)
                if isinstance(found, Skip):
                    skips[found.target] = found
                    continue
                applied(found)
                progress = True
                break  # the graph changed: list the candidates again
        skipped = list(skips.values())
    else:
        matches: list[Any] = []
        for candidate in list(rewrite.candidates()):
            if not _alive(candidate):
                continue
            found = rewrite.match(candidate)
            if found is None:
                continue
            if isinstance(found, Skip):
                skipped.append(found)
            elif sweep is Sweep.IN_ORDER:
                applied(found)
            else:
                matches.append(found)
        if matches:
            rewrite.prepare(matches)
            for found in matches:
                applied(found)
    return PassResult(rewrite.gm, bool(changes), changes, skipped)


def explain_each(rewrite: Rewrite[Any]) -> dict[str, str]:
    """``Pass.explain`` from the matcher: candidate name → :meth:`Rewrite.preview` of its match,
    ``"<refused>: <reason>"`` for a skip, ``"refused: <error>"`` where the pass would stop with a
    :class:`~normrewrite.errors.PassError`. Reads the graph only."""
    out: dict[str, str] = {}
    for candidate in rewrite.candidates():
        try:
            found = rewrite.match(candidate)
        except PassError as e:
            out[rewrite.key(candidate)] = f"refused: {e}"
            continue
        if isinstance(found, Skip):
            out[rewrite.key(candidate)] = f"{rewrite.refused}: {found.reason}"
        elif found is not None:
            out[rewrite.key(candidate)] = rewrite.preview(found)
    return out


class RewritePass(Pass):
    """A pass that is one :class:`Rewrite` driven by :func:`rewrite_each`: subclasses implement
    :meth:`rewriter` (and set :attr:`sweep` if one walk in order does not fit); ``call`` and
    ``explain`` follow from it. A pass with more to report extends ``call`` around ``super()``."""

    sweep: ClassVar[Sweep] = Sweep.IN_ORDER

    def rewriter(self, gm: GraphModule, ctx: PassContext) -> Rewrite[Any]:
        raise NotImplementedError

    def call(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        return rewrite_each(self.rewriter(gm, ctx), self.sweep)

    def explain(self, gm: GraphModule, ctx: PassContext) -> dict[str, str]:
        return explain_each(self.rewriter(gm, ctx))
