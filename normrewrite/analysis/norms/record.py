"""The :class:`Norm` record every recognizer returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch.fx import Node

from normrewrite.core.graph import node_label
from normrewrite.core.ops import NormInfo

Kind = Literal[
    "batchnorm",
    "layernorm",
    "rmsnorm",
    "groupnorm",
    "instancenorm",
    "weightnorm",
    "l2norm",
    "grn",
    "unknown",
]
Scale = Literal["none", "gamma", "1+gamma"]
Form = Literal["module", "function", "aten", "written"]


@dataclass(frozen=True)
class Norm:
    """One recognised normalization.

    ``node`` is what the rest of the graph reads (the normalized, scaled, shifted value);
    ``input`` the value normalized; ``nodes`` every node the norm spans (for a fused op, the op
    and its getitem). ``info`` is the fused op's :class:`NormInfo`, None for a written-out norm.

    Axes (non-negative; None when unknown):

    - ``axes``: the dims of ``input`` the statistics are taken over (BatchNorm: all but dim 1;
      LayerNorm/RMSNorm: the trailing normalized dims; weight norm: the dims of v ‖v‖ spans;
      GRN: the dims ‖x‖₂ spans).
    - ``source``: the value ``input`` is computed from by layout ops only (transpose, permute,
      view/reshape/flatten/unflatten, contiguous), followed back as far as they keep the normalized
      dims apart from the others; ``input`` itself when no layout op produced it.
    - ``source_axes``: ``axes`` as dims of ``source`` — the model's own layout. A BatchNorm1d on
      ``x.transpose(1, 2)`` of an ``(N, L, C)`` ``x`` has ``axes`` (0, 2) of the ``(N, C, L)``
      input and ``source_axes`` (0, 1) of ``x``."""

    kind: Kind
    node: Node
    input: Node
    nodes: tuple[Node, ...]
    axes: tuple[int, ...] | None
    eps: float | None
    scale: Scale
    shift: bool
    form: Form
    info: NormInfo | None = None
    reason: str | None = None  # kind "unknown": why it could not be classified
    casts: tuple[str, ...] = ()  # dtype casts inside the norm, e.g. ("float32", "bfloat16")
    source: Node | None = None
    source_axes: tuple[int, ...] | None = None

    @property
    def label(self) -> str:
        return node_label(self.nodes[0] if self.nodes else self.node)

    @property
    def fused(self) -> bool:
        return self.info is not None
