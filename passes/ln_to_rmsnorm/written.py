"""LayerNorms the model writes out as arithmetic (Cohere): ln-to-rmsnorm fuses them first with
fuse-norm's rewrite, but only those whose stream it then converts.

Which ones is decided on a copy of the graph (sharing the stored tensors) where every written-out
LayerNorm is fused: the streams and plans of that copy are what ``explain`` reports and what
``call`` does — it fuses the written-out LayerNorms the copy converts and leaves the others as
written (a Post-LN model's, refused with the copy's reason)."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch.fx import Graph, GraphModule, Node

from normrewrite.analysis.norms.conditions import NormKind
from normrewrite.analysis.norms.written import NormPattern, match
from normrewrite.analysis.residual_stream import ResidualStream, residual_streams
from normrewrite.core.graph import node_label
from normrewrite.core.pass_infra import Skip

from ..fuse_norm.fx import apply as fuse
from .plan import StreamPlan, plan_all


@dataclass
class Analysis:
    """The streams of ``gm`` (or of its copy with the written-out LayerNorms fused) and their
    plans; ``written``: each fused norm of the copy → the original's statistic node (the
    candidate fuse-norm matches) and the name ``explain`` reports it under."""

    gm: GraphModule
    streams: list[ResidualStream]
    plans: list[StreamPlan | tuple[Skip, ...]]
    written: dict[Node, tuple[Node, str]] = field(default_factory=dict)

    def name(self, ln: Node) -> str:
        return self.written[ln][1] if ln in self.written else ln.name

    def to_fuse(self) -> list[Node]:
        """The original statistic nodes of the written-out LayerNorms whose stream converts."""
        return [
            self.written[ln][0]
            for s, p in zip(self.streams, self.plans, strict=True)
            if not isinstance(p, tuple)
            for ln in s.readers
            if ln in self.written
        ]

    def refused(self) -> list[Skip]:
        """Why each written-out LayerNorm left as written is not converted."""
        return [
            skip
            for s, p in zip(self.streams, self.plans, strict=True)
            if isinstance(p, tuple)
            for ln, skip in zip(s.readers, p, strict=True)
            if ln in self.written
        ]


def analyse(gm: GraphModule, untie: bool) -> Analysis:
    """The streams and plans of ``gm``, seen with its written-out LayerNorms fused."""
    found = {
        n: m
        for n in gm.graph.nodes
        if isinstance(m := match(gm, n), NormPattern) and m.kind is NormKind.LAYERNORM
    }
    if not found:
        streams = residual_streams(gm)
        return Analysis(gm, streams, plan_all(gm, streams, untie))
    graph, copies = Graph(), {}
    graph.output(graph.graph_copy(gm.graph, copies))
    copy = GraphModule(gm, graph)
    written: dict[Node, tuple[Node, str]] = {}
    for n, original in found.items():
        m = match(copy, copies[n])
        assert isinstance(m, NormPattern)  # as on the original: the norms share no node
        written[fuse(copy, m)] = (n, original.out.name)
    streams = residual_streams(copy)
    return Analysis(copy, streams, plan_all(copy, streams, untie), written)


def fuse_chosen(gm: GraphModule, nodes: list[Node]) -> list[str]:
    """Fuse the written-out LayerNorms whose statistic is one of ``nodes``; their labels."""
    labels = []
    for n in nodes:
        m = match(gm, n)
        assert isinstance(m, NormPattern)
        labels.append(node_label(m.core))
        fuse(gm, m)
    return labels
