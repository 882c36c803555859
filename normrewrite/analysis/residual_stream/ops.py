"""Op classes the residual-stream walk steps through, and the stream's data model."""

from __future__ import annotations

import operator
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node

from normrewrite.core.graph import node_dtype, node_label, node_shape
from normrewrite.core.ops import called_module

aten = torch.ops.aten


@dataclass(frozen=True)
class StreamWriter:
    """An op whose output enters the stream; ``tensors`` are the stored tensors to centre, each
    with the dim that indexes the stream's features."""

    node: Node
    # "linear" | "conv" | "embedding" | "constant" | "scaled" | "centre" | "part" | "shift"
    kind: str
    tensors: tuple[tuple[str, int], ...]
    scale: str | None = None  # "scaled": the layer scale λ (D,) of ``λ ⊙ linear(x)``, to fold in
    scaled: Node | None = None  # "scaled": the value λ multiplies (the linear's output)
    axis: int = -1  # "centre": the feature axis of ``node``'s output, to subtract the mean over
    uses: tuple[Node, ...] = ()  # "centre": the stream's users of ``node`` (others keep it as is)
    # "part": (features split as, dim picked, index): only that part of the output features,
    # centred along the split's last dim (per-head QK-LayerNorm)
    part: tuple[tuple[int, ...], int, int] | None = None
    # "shift": ``node`` is ``x ± c`` with ``c`` the same for every feature (centred, it is 0):
    # the position of ``x`` in its args; the rewrite replaces ``node`` by ``x``
    keep: int | None = None

    @property
    def label(self) -> str:
        return str(self.node.target) if self.node.op == "get_attr" else node_label(self.node)


@dataclass(frozen=True)
class ResidualStream:
    values: frozenset[Node]  # nodes carrying the stream
    writers: tuple[StreamWriter, ...]
    readers: tuple[Node, ...]  # LayerNorm nodes reading a stream value over its features
    features: int | None
    problems: tuple[str, ...]  # why centring the stream would change the model, if it would
    # centred only by a mean subtraction at each norm's input (no stored tensor can do it): exact,
    # but it saves nothing over the LayerNorms' own centring
    explicit: bool = False
    post_ln: bool = False  # a problem is the Post-LN pattern (the next branch reads the raw sum)


# --------------------------------------------------------------------------- op classes


def _rank(node: object) -> int | None:
    shape = node_shape(node)
    return None if shape is None else len(shape)


def _dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


def _is(
    node: Node,
    atens: AbstractSet[object],
    funcs: AbstractSet[object] = frozenset(),
    methods: AbstractSet[str] = frozenset(),
) -> bool:
    """``node`` calls one of ``atens`` / ``funcs``, or is a method call named in ``methods``."""
    if node.op == "call_function":
        return node.target in atens or node.target in funcs
    return node.op == "call_method" and node.target in methods


def _passthrough(gm: GraphModule, node: Node) -> bool:
    """Identity at inference: eval dropout, clone, contiguous, a cast to the same dtype."""
    if node.op == "call_function" and node.target is aten.dropout.default:
        return not bool(node.args[2] if len(node.args) > 2 else node.kwargs.get("train", False))
    if node.op == "call_function" and node.target is F.dropout:
        return not bool(node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True))
    if _is(
        node,
        {aten.clone.default, aten.contiguous.default, aten.alias.default, aten.detach.default},
        {torch.clone},
        {"clone", "contiguous", "detach"},
    ):
        return True
    if _is(
        node,
        {aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default},
        set(),
        {"to", "float", "type_as"},
    ):
        src = node.args[0] if node.args else None
        return node_dtype(src) is not None and node_dtype(src) == node_dtype(node)
    mod = called_module(gm, node)
    return isinstance(mod, nn.Identity) or (isinstance(mod, nn.Dropout) and not mod.training)


def _embedding(gm: GraphModule, node: Node) -> str | None:
    """The FQN of the table if ``node`` is an embedding lookup with a stored table."""
    if node.op == "call_function" and node.target is aten.embedding.default:
        w = node.args[0]
        return str(w.target) if isinstance(w, Node) and w.op == "get_attr" else None
    if node.op == "call_function" and node.target is F.embedding:
        w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        return str(w.target) if isinstance(w, Node) and w.op == "get_attr" else None
    mod = called_module(gm, node)
    if isinstance(mod, nn.Embedding):
        return f"{node.target}.weight"
    return None


_ADD = (
    {aten.add.Tensor, aten.sub.Tensor, aten.add_.Tensor, aten.sub_.Tensor},
    {operator.add, operator.sub, operator.iadd, operator.isub, torch.add, torch.sub},
    {"add", "sub", "__add__", "__sub__", "add_", "sub_"},
)
_SUB = (
    {aten.sub.Tensor, aten.sub_.Tensor},
    {operator.sub, operator.isub, torch.sub},
    {"sub", "__sub__", "sub_"},
)
_IN_PLACE = ({aten.add_.Tensor, aten.sub_.Tensor}, {operator.iadd, operator.isub}, {"add_", "sub_"})
_SCALE = (
    {aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar},
    {operator.mul, operator.truediv, torch.mul, torch.div},
    {"mul", "div"},
)
_VIEW = (
    {aten.view.default, aten.reshape.default, aten._unsafe_view.default},
    {torch.reshape},
    {"view", "reshape"},
)
_REDUCE = (
    {aten.mean.dim, aten.sum.dim_IntList},
    {torch.mean, torch.sum},
    {"mean", "sum"},
)


def uniform_shift(node: Node, axis: int, rank: int) -> StreamWriter | None:
    """``x + c``, ``c + x`` or ``x − c`` where ``c`` is the same for every feature (a number, or a
    tensor of size 1 along ``axis`` or without it: MusicGen's ``sum()`` starting at 0) and ``x``
    has the output's shape and dtype: centring maps ``c`` to 0, so the rewrite drops it (exact
    because only LayerNorms, which ignore a shift, read the stream). Not in place."""
    if not (_is(node, *_ADD) and len(node.args) == 2) or _is(node, *_IN_PLACE):
        return None
    if node.kwargs.get("alpha", 1) != 1:
        return None
    shape = node_shape(node)
    if shape is None or shape[axis] < 2:  # one feature: every addend is "the same for each"
        return None
    sub = _is(node, *_SUB)
    for keep in (0, 1) if not sub else (0,):
        x, c = node.args[keep], node.args[1 - keep]
        if not (isinstance(x, Node) and node_shape(x) == shape):
            continue
        if node_dtype(x) != node_dtype(node) or not _uniform(c, axis, rank):
            continue
        return StreamWriter(node, "shift", (), keep=keep)
    return None


def _uniform(c: object, axis: int, rank: int) -> bool:
    """``c`` broadcasts to the same value for every feature on ``axis`` of a rank-``rank``
    result."""
    if isinstance(c, bool | int | float):
        return True
    shape = node_shape(c)
    if shape is None:
        return False
    ax = axis - (rank - len(shape))
    return ax < 0 or shape[ax] == 1


def shifted_by(w: StreamWriter) -> str:
    """What a "shift" writer adds to the stream, for the report (``""`` when it adds 0)."""
    assert w.keep is not None
    c = w.node.args[1 - w.keep]
    if isinstance(c, Node):
        return c.name
    return "" if c == 0 else repr(c)
