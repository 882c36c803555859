"""The one norm model: every normalization of an fx graph as one :class:`Norm` record, whatever
its spelling — an ``nn`` module call, an ``F.*`` call, the ATen op torch.export writes, or the
arithmetic a model writes out by hand.

Everything above this layer (``inspect``, placement, the passes) asks :func:`find_norms` and
reads :class:`Norm`; none of it matches norm spellings itself.
"""

from __future__ import annotations

from dataclasses import replace

from torch.fx import GraphModule

from normrewrite.analysis.norms.fused import from_info
from normrewrite.analysis.norms.grn import grn_norms
from normrewrite.analysis.norms.l2 import l2_norms
from normrewrite.analysis.norms.layout import source_axes
from normrewrite.analysis.norms.record import Form, Kind, Norm, Scale
from normrewrite.analysis.norms.unknown import unknown_norms
from normrewrite.analysis.norms.weight import weight_norms
from normrewrite.analysis.norms.written_records import written_norms
from normrewrite.core.ops import norms


def find_norms(gm: GraphModule) -> list[Norm]:
    """Every normalization in ``gm``, in execution order: fused norm ops, written-out
    RMSNorm/LayerNorm (and normalization-like arithmetic it cannot classify, kind ``unknown``),
    weight norms, L2 normalizations, GRN, then any other reduction that normalizes its own
    input (kind ``unknown``)."""
    found = [from_info(info) for info in norms(gm)]
    found += written_norms(gm)
    found += weight_norms(gm)
    found += l2_norms(gm)
    found += grn_norms(gm)
    found += unknown_norms(gm, found)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return [_in_source_layout(m) for m in sorted(found, key=lambda m: order.get(m.node, 0))]


def _in_source_layout(norm: Norm) -> Norm:
    """``norm`` with ``source``/``source_axes`` set (see :class:`Norm`)."""
    if norm.axes is None or norm.kind == "weightnorm":
        return replace(norm, source=norm.input, source_axes=norm.axes)
    source, axes = source_axes(norm.input, norm.axes)
    return replace(norm, source=source, source_axes=axes)


__all__ = ["Form", "Kind", "Norm", "Scale", "find_norms", "from_info"]
