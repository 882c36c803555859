"""The one norm model: every normalization of an fx graph as one :class:`Norm` record, whatever
its spelling — an ``nn`` module call, an ``F.*`` call, the ATen op torch.export writes, or the
arithmetic a model writes out by hand.

Everything above this layer (``inspect``, placement, the passes) asks :func:`find_norms` and
reads :class:`Norm`; none of it matches norm spellings itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch.fx import GraphModule, Node

from normrewrite.core.graph import node_label, node_shape
from normrewrite.core.ops import NormInfo, norms

Kind = Literal[
    "batchnorm", "layernorm", "rmsnorm", "groupnorm", "instancenorm", "weightnorm", "l2norm",
    "grn", "unknown",
]
Scale = Literal["none", "gamma", "1+gamma"]
Form = Literal["module", "function", "aten", "written"]


@dataclass(frozen=True)
class Norm:
    """One recognised normalization.

    ``node`` is what the rest of the graph reads (the normalized, scaled, shifted value);
    ``input`` the value normalized; ``nodes`` every node the norm spans (for a fused op, the op
    and its getitem). ``axes`` are the normalized axes of ``input`` in the model's own layout
    (non-negative; None when unknown). ``info`` is the fused op's :class:`NormInfo`, None for a
    written-out norm."""

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
    casts: tuple[str, ...] = ()  # dtype casts inside the norm, e.g. ("float32", "bfloat16")

    @property
    def label(self) -> str:
        return node_label(self.nodes[0] if self.nodes else self.node)

    @property
    def fused(self) -> bool:
        return self.info is not None


def _axes(info: NormInfo) -> tuple[int, ...] | None:
    shape = node_shape(info.input)
    if shape is None:
        return None
    rank = len(shape)
    if info.kind in ("layernorm", "rmsnorm") and info.normalized_shape is not None:
        return tuple(range(rank - len(info.normalized_shape), rank))
    if info.kind == "batchnorm":
        return (0, *range(2, rank))
    if info.kind in ("instancenorm", "groupnorm"):
        return tuple(range(2, rank)) if info.kind == "instancenorm" else tuple(range(1, rank))
    return None


def _form(info: NormInfo) -> Form:
    node = info.op_node or info.node
    if node.op == "call_module":
        return "module"
    module = getattr(node.target, "__module__", "") or ""
    return "aten" if "torch._ops" in module or hasattr(node.target, "overloadpacket") else "function"


def from_info(info: NormInfo) -> Norm:
    """The :class:`Norm` of a fused norm op."""
    nodes = tuple(n for n in (info.op_node, info.node) if n is not None)
    return Norm(
        kind=info.kind,  # type: ignore[arg-type]
        node=info.node,
        input=info.input,
        nodes=tuple(dict.fromkeys(nodes)),
        axes=_axes(info),
        eps=info.eps,
        scale="gamma" if info.has_weight else "none",
        shift=info.has_bias,
        form=_form(info),
        info=info,
    )


def find_norms(gm: GraphModule) -> list[Norm]:
    """Every normalization in ``gm``, in execution order."""
    return [from_info(info) for info in norms(gm)]
