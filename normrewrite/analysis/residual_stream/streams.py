"""Streams: the walks merged into connected components, with their readers and problems."""

from __future__ import annotations

import operator
from collections.abc import Set as AbstractSet
from dataclasses import replace

import networkx as nx
import torch
from torch.fx import GraphModule, Node

from normrewrite.core.graph import node_label
from normrewrite.core.graph import users as _all_users
from normrewrite.core.ops import dense_info, norm_info, shape_only_use

from .ops import _ADD, _SCALE, _VIEW, ResidualStream, StreamWriter, _is, _passthrough, _rank
from .walk import _Walk

aten = torch.ops.aten


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


def users(node: Node, live: AbstractSet[Node]) -> list[Node]:
    """Users that read ``node``'s values (not only its shape: ``x.shape``, ``x.size()``, the
    template of ``b.expand_as(x)``) for something the model computes (``live``: mBART's
    ``inputs_embeds[..., -1]``, "just for the shape", is left dead in the exported graph)."""
    return [u for u in _all_users(node) if u in live and not shape_only_use(u, node)]


def _effect(n: Node) -> bool:
    """``n`` is an output, a module call, or may write a tensor (in-place ops, ``x += y``)."""
    if n.op in ("output", "placeholder", "call_module") or n.is_impure():
        return True
    name = getattr(n.target, "__name__", n.target) if n.op == "call_function" else n.target
    in_place = n.op == "call_function" and n.target in _IN_PLACE_OPERATORS
    return in_place or (isinstance(name, str) and name.endswith("_") and not name.endswith("__"))


_IN_PLACE_OPERATORS = {
    getattr(operator, f"i{op}")
    for op in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or")
}


def live_nodes(gm: GraphModule) -> set[Node]:
    """The nodes an output or a side effect depends on."""
    todo = [n for n in gm.graph.nodes if _effect(n)]
    live: set[Node] = set()
    while todo:
        n = todo.pop()
        if n not in live:
            live.add(n)
            todo.extend(n.all_input_nodes)
    return live


def _post_ln(gm: GraphModule, u: Node, start: Node | None) -> str:
    """Why a reader ``u`` of a stream built on a norm's output is the Post-LN pattern: a layer
    of the next branch reads the sum un-normalized."""
    if start is None or dense_info(gm, u) is None:
        return ""
    return f" (Post-LN: the stream is built on the output of {node_label(start)})"


def _walk(
    gm: GraphModule, lns: list[Node], cuts: frozenset[Node], live: AbstractSet[Node]
) -> list[ResidualStream]:
    walk = _Walk(gm, set(lns), cuts)
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
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    streams = []
    for comp in nx.connected_components(g):
        values = frozenset(n for n in comp if n in walk.axis)
        readers = tuple(n for n in lns if n in comp)
        problems = [
            walk.problems[n]
            for n in sorted((n for n in comp if isinstance(n, Node)), key=order.__getitem__)
            if n in walk.problems
        ]
        writers, post_ln = [], False
        for w in sorted((walk.writers[n] for n in comp if n in walk.writers), key=_order(order)):
            if w.kind != "centre":
                writers.append(w)
                continue
            # the centred copy goes to the stream's users only; the others keep the original
            uses = [
                u
                for u in users(w.node, live)
                if u in values or (u in readers and inputs[u] is w.node)
            ]
            others = [u for u in users(w.node, live) if u not in uses]
            if w.node in lns and others:
                post_ln |= dense_info(gm, others[0]) is not None
                problems.append(
                    f"the output of the LayerNorm {node_label(w.node)} is read un-normalized by "
                    f"{others[0].name}" + (" (Post-LN)" if dense_info(gm, others[0]) else "")
                )
            writers.append(replace(w, uses=tuple(uses)))
        start = next((w.node for w in writers if w.node in lns), None)

        stored = [w.node for w in writers if w.kind not in ("centre", "shift")]
        for v in [*sorted(values, key=order.__getitem__), *stored]:
            for u in users(v, live):
                if u in values or (u in readers and inputs[u] is v):
                    continue
                if u.op == "output":
                    problems.append(f"the stream value {v.name} is a model output")
                else:
                    post_ln |= bool(_post_ln(gm, u, start))
                    problems.append(
                        f"the stream value {v.name} is also read by {u.name}, not through a "
                        f"LayerNorm{_post_ln(gm, u, start)}{_downstream(gm, u, live)}"
                    )
        explicit = sum(w.kind == "centre" for w in writers) >= len(readers)
        if explicit and not problems:
            writers = _at_readers(readers, inputs)
        features = None
        if readers:
            info = norm_info(gm, readers[0])
            features = info.normalized_shape[0] if info and info.normalized_shape else None
        streams.append(
            ResidualStream(
                values,
                tuple(writers),
                readers,
                features,
                tuple(dict.fromkeys(problems)),
                explicit and not problems,
                post_ln,
            )
        )
    return streams


_CARRY = (
    _ADD[0]
    | _SCALE[0]
    | _VIEW[0]
    | {aten.transpose.int, aten.permute.default, aten.select.int}
    | {aten.slice.Tensor, aten.unsqueeze.default, aten.squeeze.dim, operator.getitem},
    _ADD[1] | _SCALE[1] | _VIEW[1],
    _ADD[2] | _SCALE[2] | _VIEW[2] | {"transpose", "permute", "unsqueeze", "squeeze"},
)


def _downstream(gm: GraphModule, u: Node, live: AbstractSet[Node]) -> str:
    """Where a non-norm reader ``u`` takes the raw stream, when ``u`` only carries it on (a
    residual add after the last norm, a layout op, a pick of tokens): `` (add_3 → model
    output)``, `` (add_4 → transpose → conv2d)`` (the op that really reads it), or ``""``."""

    def name(n: Node) -> str:
        return "model output" if n.op == "output" else n.name

    path = [u]
    while _is(path[-1], *_CARRY) or _passthrough(gm, path[-1]):
        nxt = users(path[-1], live)
        if not nxt or len(path) > 8:
            return ""
        if len(nxt) != 1 or nxt[0].op == "output":
            ends = ", ".join(name(n) for n in nxt[:3]) + (", ..." if len(nxt) > 3 else "")
            return f" ({' → '.join(n.name for n in path)} → {ends})"
        path.append(nxt[0])
    return f" ({' → '.join(n.name for n in path)})" if len(path) > 1 else ""


def _at_readers(readers: tuple[Node, ...], inputs: dict[Node, Node]) -> list[StreamWriter]:
    """One mean subtraction per distinct norm input, for that input's norms only: the cheapest
    exact form of a stream that only explicit mean subtractions can centre (no weights change,
    the rest of the stream is left as it is)."""
    by_input: dict[Node, list[Node]] = {}
    for r in readers:
        by_input.setdefault(inputs[r], []).append(r)
    return [
        StreamWriter(x, "centre", (), axis=(_rank(x) or 1) - 1, uses=tuple(rs))
        for x, rs in by_input.items()
    ]


def _order(order: dict[Node, int]):
    return lambda w: order[w.node]


def residual_streams(gm: GraphModule) -> list[ResidualStream]:
    """The streams read by LayerNorms, each with its writers, readers and problems.

    A stream value also read by a non-norm op (wav2vec2's positional conv reads the projected
    features) is tried once more as a *cut*: its stream users get an explicitly centred copy and
    its sources are left alone. The retry is kept per stream only where it has no problems and,
    if only explicit mean subtractions centre it, where the first walk did not find Post-LN
    blocks (their sums are read by the next branch: a cut before each norm would convert it for
    no saving while the model stays Post-LN); else the first walk's problems stand (they name
    the op that reads the raw stream)."""
    lns = layernorm_readers(gm)
    live = live_nodes(gm)
    first = _walk(gm, lns, frozenset(), live)
    cuts = frozenset(
        v
        for s in first
        if s.problems
        for v in s.values
        if any(u not in s.values and u not in s.readers for u in users(v, live))
    )
    if not cuts:
        return first
    post_ln = {r for s in first if s.post_ln for r in s.readers}
    second = [
        s
        for s in _walk(gm, lns, cuts, live)
        if not s.problems and not (s.explicit and post_ln & set(s.readers))
    ]
    done = {r for s in second for r in s.readers}
    rest = []
    for s in first:
        readers = tuple(r for r in s.readers if r not in done)
        if readers:
            rest.append(s if len(readers) == len(s.readers) else replace(s, readers=readers))
    return second + rest
