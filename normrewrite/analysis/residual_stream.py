"""The residual stream as seen by its LayerNorms: which values carry it, who writes it, who reads it.

Starting from the input of every LayerNorm over the last dim, the analysis walks the data-flow
graph backwards through ops that act on each feature vector linearly and independently — residual
adds, dropout (eval), no-op casts, reshapes that keep the feature dim, transposes/permutes/flatten
(the feature axis is tracked through them), ``cat``/``expand``/``slice`` along other axes, scaling
by a number — and stops at the **writers**: the ops whose output enters the stream and whose
stored tensors can be edited:

* a linear layer (``Linear`` or GPT-2's Conv1D ``addmm``) — its output features,
* a (non-grouped) convolution with the features as channels (ViT's patch embedding),
* an embedding table (token, position, token-type embeddings),
* a stored tensor added in directly (ViT's ``cls_token`` and position embeddings).

The values visited form the stream; the walks that share values are merged into one stream with
networkx (connected components), so an encoder and a decoder, or two towers, are separate
streams. Then every user of a stream value (or of a writer's output) must be inside the stream or
a LayerNorm reading it over the feature axis; anything else — a model output, a post-norm branch
reading the un-normalized sum, an RMSNorm, a pooling — is recorded as a problem of that stream.

This is what ``ln-to-rmsnorm`` needs: subtracting the feature mean from every writer makes every
stream value zero-mean (each op above commutes with centring ``C = I − 11ᵀ/D``), which is harmless
exactly when nothing but LayerNorms reads the stream. It only reads the graph.
"""

from __future__ import annotations

import operator
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

import networkx as nx
import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node

from normrewrite.core.graph import get_tensor, node_dtype, node_label, node_shape, users
from normrewrite.core.ops import called_module, conv_info, dense_info, norm_info

aten = torch.ops.aten


@dataclass(frozen=True)
class StreamWriter:
    """An op whose output enters the stream; ``tensors`` are the stored tensors to centre, each
    with the dim that indexes the stream's features."""

    node: Node
    kind: str  # "linear" | "conv" | "embedding" | "constant" | "scaled"
    tensors: tuple[tuple[str, int], ...]
    scale: str | None = None  # "scaled": the layer scale λ (D,) of ``λ ⊙ linear(x)``, to fold in
    scaled: Node | None = None  # "scaled": the value λ multiplies (the linear's output)

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


# --------------------------------------------------------------------------- walk


class _Walk:
    def __init__(self, gm: GraphModule, layernorms: set[Node]) -> None:
        self.gm = gm
        self.layernorms = layernorms
        self.axis: dict[Node, int] = {}
        self.writers: dict[Node, StreamWriter] = {}
        self.problems: dict[Node, str] = {}
        self.edges: list[tuple[Node, Node]] = []

    def visit(self, node: Node, axis: int, reader: Node) -> None:
        if node in self.layernorms:  # a stream made of a LayerNorm's output: Post-LN
            self.problems.setdefault(
                reader,
                (
                    f"the stream at {node_label(reader)} is built on the output of the LayerNorm "
                    f"{node_label(node)} (Post-LN: the next branch reads the sum un-normalized)"
                ),
            )
            return
        self.edges.append((reader, node))
        if node in self.axis or node in self.writers:
            if self.axis.get(node, axis) != axis:
                self.problems[node] = f"{node.name} carries the features on two different axes"
            return
        rank = _rank(node)
        if rank is None:
            self.problems[node] = f"the shape of {node.name} is unknown"
            return
        w = self._writer(node, axis, rank)
        if w is not None:
            self.writers[node] = w
            return
        self.axis[node] = axis
        for src, src_axis in self._sources(node, axis, rank):
            self.visit(src, src_axis, node)
        for u in users(node):  # ``node.add_(y)`` changes what every later reader of node sees
            if _is(u, *_IN_PLACE) and u.args and u.args[0] is node:
                self.visit(u, axis, node)

    def _writer(self, node: Node, axis: int, rank: int) -> StreamWriter | None:
        gm = self.gm
        scaled = self._layer_scale(node, axis, rank)
        if scaled is not None:
            return scaled
        d = dense_info(gm, node)
        if (
            d is not None
            and axis == rank - 1
            and d.weight is not None
            and (d.bias or not d.has_bias)
        ):
            tensors = ((d.weight, d.out_dim),) + (((d.bias, 0),) if d.bias else ())
            return StreamWriter(node, "linear", tensors)
        c = conv_info(gm, node)
        if (
            c is not None
            and axis == 1
            and not c.transposed
            and c.groups == 1
            and c.weight is not None
            and (c.bias or not c.has_bias)
        ):
            return StreamWriter(node, "conv", ((c.weight, 0),) + (((c.bias, 0),) if c.bias else ()))
        table = _embedding(gm, node)
        if table is not None and axis == rank - 1:
            return StreamWriter(node, "embedding", ((table, 1),))
        if node.op == "get_attr":
            t = get_tensor(gm, str(node.target))
            if t.dim() == rank and t.shape[axis] > 1:
                return StreamWriter(node, "constant", ((str(node.target), axis),))
        return None

    def _layer_scale(self, node: Node, axis: int, rank: int) -> StreamWriter | None:
        """``λ ⊙ linear(x)`` with a stored per-feature λ (layer scale, BEiT/DINOv2/CaiT), the
        linear's output read only on the way to the multiply."""
        if not (_is(node, *_SCALE) and node.target in (aten.mul.Tensor, operator.mul)):
            return None
        if len(node.args) != 2 or axis != rank - 1:
            return None
        for lam, other in (node.args, node.args[::-1]):
            if not (isinstance(lam, Node) and lam.op == "get_attr" and isinstance(other, Node)):
                continue
            t = get_tensor(self.gm, str(lam.target))
            shape = node_shape(node)
            if shape is None or t.dim() < 1 or t.numel() != t.shape[-1] != shape[axis]:
                continue
            inner = other
            while len(inner.users) == 1 and _passthrough(self.gm, inner):
                inner = inner.args[0]
            if len(inner.users) != 1 or node_shape(inner) != shape:
                continue
            w = self._writer(inner, axis, rank)
            if w is not None and w.kind == "linear":
                return StreamWriter(node, "scaled", w.tensors, str(lam.target), other)
        return None

    def _sources(self, node: Node, axis: int, rank: int) -> list[tuple[Node, int]]:
        gm, shape = self.gm, node_shape(node)
        assert shape is not None
        fail = self.problems.setdefault
        if _passthrough(gm, node):
            return [(node.args[0], axis)]
        if _is(node, *_ADD) and len(node.args) == 2 and node.kwargs.get("alpha", 1) == 1:
            out = []
            for a in node.args:
                r = _rank(a)
                if not isinstance(a, Node) or r is None:
                    fail(node, f"{node.name} adds a constant to the stream")
                    return []
                ax = axis - (rank - r)
                a_shape = node_shape(a)
                if ax < 0 or a_shape is None or a_shape[ax] != shape[axis]:
                    fail(node, f"{node.name} adds a value broadcast across the features")
                    return []
                out.append((a, ax))
            return out
        if _is(node, *_SCALE) and len(node.args) == 2:
            a, b = node.args
            if isinstance(a, Node) and isinstance(b, int | float):
                return [(a, axis)]
            if (
                isinstance(b, Node)
                and isinstance(a, int | float)
                and node.target in (aten.mul.Tensor, operator.mul)
            ):
                return [(b, axis)]
        if _is(node, *_VIEW):
            src = node.args[0]
            src_shape = node_shape(src)
            if axis == rank - 1 and src_shape and src_shape[-1] == shape[-1]:
                return [(src, len(src_shape) - 1)]
            fail(node, f"{node.name} reshapes the feature dim")
            return []
        if _is(node, {aten.transpose.int}, {torch.transpose}, {"transpose"}):
            src = node.args[0]
            d0, d1 = (_dim(int(d), rank) for d in node.args[1:3])
            return [(src, d1 if axis == d0 else d0 if axis == d1 else axis)]
        if _is(node, {aten.permute.default}, {torch.permute}, set()):
            return [(node.args[0], _dim(int(node.args[1][axis]), rank))]
        if _is(node, {aten.flatten.using_ints}, {torch.flatten}, {"flatten"}):
            src = node.args[0]
            r_in = _rank(src) or 0
            start = _dim(int(node.args[1]) if len(node.args) > 1 else 0, r_in)
            end = _dim(int(node.args[2]) if len(node.args) > 2 else -1, r_in)
            if axis < start or (axis == start and end == start):
                return [(src, axis)]
            if axis > start:
                return [(src, axis + end - start)]
            fail(node, f"{node.name} flattens the feature dim with others")
            return []
        if _is(node, {aten.cat.default}, {torch.cat}, set()):
            dim = _dim(int(node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)), rank)
            if dim == axis:
                fail(node, f"{node.name} concatenates along the features")
                return []
            return [(t, axis) for t in node.args[0]]
        if _is(node, {aten.expand.default}, set(), {"expand"}):
            src = node.args[0]
            r = _rank(src) or 0
            ax = axis - (rank - r)
            s_shape = node_shape(src)
            if ax < 0 or not s_shape or s_shape[ax] != shape[axis]:
                fail(node, f"{node.name} broadcasts across the features")
                return []
            return [(src, ax)]
        if _is(node, {aten.slice.Tensor}, set(), set()):
            dim = _dim(int(node.args[1]) if len(node.args) > 1 else 0, rank)
            if dim != axis:
                return [(node.args[0], axis)]
        if _is(node, {aten.select.int}, set(), set()):
            r_in = rank + 1
            dim = _dim(int(node.args[1]), r_in)
            return [(node.args[0], axis if axis < dim else axis + 1)]
        what = (
            node.target
            if node.op != "call_function"
            else getattr(node.target, "__name__", node.target)
        )
        if node.op == "placeholder":
            fail(
                node,
                f"the stream starts at the model input {node.name}, which cannot be re-centred",
            )
        else:
            fail(node, f"the stream is written by {node.name} ({what}), which cannot be re-centred")
        return []


def layernorm_readers(gm: GraphModule) -> list[Node]:
    """LayerNorm nodes normalizing the last dim only."""
    out = []
    for n in gm.graph.nodes:
        info = norm_info(gm, n)
        if (
            info is not None
            and info.kind == "layernorm"
            and info.normalized_shape
            and len(info.normalized_shape) == 1
            and isinstance(info.input, Node)
        ):
            out.append(info.node)
    return out


def residual_streams(gm: GraphModule) -> list[ResidualStream]:
    """The streams read by LayerNorms, each with its writers, readers and problems."""
    lns = layernorm_readers(gm)
    walk = _Walk(gm, set(lns))
    inputs: dict[Node, Node] = {}
    for ln in lns:
        info = norm_info(gm, ln)
        assert info is not None and isinstance(info.input, Node)
        rank = _rank(info.input)
        inputs[ln] = info.input
        if rank is None:
            walk.problems[ln] = f"the input shape of {node_label(ln)} is unknown"
            continue
        walk.visit(info.input, rank - 1, ln)
    g = nx.Graph()
    g.add_nodes_from(lns)
    g.add_edges_from(walk.edges)
    streams = []
    for comp in nx.connected_components(g):
        values = frozenset(n for n in comp if n in walk.axis)
        writers = tuple(walk.writers[n] for n in comp if n in walk.writers)
        readers = tuple(n for n in lns if n in comp)
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        problems = [
            walk.problems[n] for n in sorted(comp, key=order.__getitem__) if n in walk.problems
        ]
        inside = set(values) | {w.node for w in writers}
        for v in [*values, *(w.node for w in writers)]:
            for u in users(v):
                if u in inside or (u in readers and inputs[u] is v):
                    continue
                if u.op == "output":
                    problems.append(f"the stream value {v.name} is a model output")
                else:
                    problems.append(
                        f"the stream value {v.name} is also read by {u.name}, not through a LayerNorm"
                    )
        writers = tuple(sorted(writers, key=lambda w: order[w.node]))
        features = None
        if readers:
            info = norm_info(gm, readers[0])
            features = info.normalized_shape[0] if info and info.normalized_shape else None
        streams.append(
            ResidualStream(values, writers, readers, features, tuple(dict.fromkeys(problems)))
        )
    return streams


__all__ = ["ResidualStream", "StreamWriter", "layernorm_readers", "residual_streams"]
