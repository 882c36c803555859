"""Which residual streams ln-to-rmsnorm rewrites, and which stored tensors it must untie first."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from torch.fx import GraphModule

from normrewrite.analysis.residual_stream import ResidualStream
from normrewrite.core.graph import node_label
from normrewrite.core.pass_infra import Skip
from normrewrite.core.usage import TensorUsage


@dataclass(frozen=True)
class StreamPlan:
    stream: ResidualStream
    untie: tuple[str, ...]  # FQNs to give their own copy first (tied embeddings)


def plan_all(
    gm: GraphModule, streams: list[ResidualStream], untie: bool
) -> list[StreamPlan | tuple[Skip, ...]]:
    """The plan of each stream, or why not (one :class:`Skip` per norm reading it).

    A stored tensor may write several streams (mBART's one token table for its encoder and
    decoder): re-centring it is exact when every read of it is a writer of a stream that is
    rewritten too, so a tensor's reads are counted over all the streams that pass; a stream
    refused drops out and the others are planned again without it."""
    usage = TensorUsage.of(gm)
    ok = {id(s) for s in streams}
    while True:
        inside = _reads(s for s in streams if id(s) in ok)
        inside.update(_unread(gm))  # a get_attr nothing reads counts as one read in ``usage``
        plans = [plan(gm, s, usage, untie, inside) for s in streams]
        refused = {id(s) for s, p in zip(streams, plans, strict=True) if isinstance(p, tuple)}
        if not ok & refused:
            return plans
        ok -= refused


def _reads(streams: Iterable[ResidualStream]) -> Counter[str]:
    """How often the streams' writers read each stored tensor (a table read by several slices
    counts each)."""
    reads: Counter[str] = Counter()
    for s in streams:
        for w in s.writers:
            for fqn, _ in w.tensors:
                reads[fqn] += len(w.node.users) if w.node.op == "get_attr" else 1
    return reads


def _unread(gm: GraphModule) -> Counter[str]:
    """Names of stored tensors fetched by a ``get_attr`` nothing reads (mBART's fetch of its tied
    encoder.embed_tokens.weight), each counted as one read by :class:`TensorUsage`."""
    return Counter(str(n.target) for n in gm.graph.find_nodes(op="get_attr") if not n.users)


def plan(
    gm: GraphModule,
    stream: ResidualStream,
    usage: TensorUsage,
    untie: bool,
    inside: Counter[str] | None = None,
) -> StreamPlan | tuple[Skip, ...]:
    """The rewrite of one residual stream, or why not; ``inside``: the reads of each tensor by
    the writers of all streams rewritten along with it (default: this stream's)."""
    labels = tuple(node_label(n) for n in stream.readers)

    def skip(reason: str) -> tuple[Skip, ...]:
        return tuple(Skip(label, reason) for label in labels)

    if stream.problems:
        more = f" (and {len(stream.problems) - 1} more)" if len(stream.problems) > 1 else ""
        return skip(stream.problems[0] + more)
    if not stream.writers:
        return skip("no writer of the stream found")
    inside = inside if inside is not None else _reads([stream])
    to_untie: list[str] = []
    for w in stream.writers:
        for fqn, _ in w.tensors:
            names = usage.aliases.get(fqn, frozenset({fqn}))
            if usage.count(fqn) <= sum(inside[n] for n in names):
                continue
            if untie and w.kind in ("embedding", "constant") and w.node.op != "call_module":
                to_untie.append(fqn)
                continue
            hint = (
                " (ln-to-rmsnorm:untie=true gives it its own copy)"
                if w.kind in ("embedding", "constant")
                else ""
            )
            return skip(
                f"{fqn}, written into the stream by {w.label}, is also read elsewhere "
                f"(a tied output head?){hint}"
            )
    return StreamPlan(stream, tuple(dict.fromkeys(to_untie)))
