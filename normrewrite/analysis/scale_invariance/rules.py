"""Transfer functions: the state of an op's output from the states of its inputs.

Each function reads the states through a :class:`~.propagate.Propagation` (``p.get(value)``)
and returns the output's :class:`~.lattice.State`; each case is an identity for ``c > 0``, stated
where it is used. The op-independent classes (:class:`~.op_table.Rule`) share :func:`unary`;
products, sums, concatenation, attention, layers and norms have their own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from torch.fx import Node

from normrewrite.analysis.scale_invariance.lattice import (
    INDEPENDENT,
    State,
    absorbing,
    const_axes,
    first_absorbing,
    homogeneous,
    join_axes,
    lift,
    not_invariant,
    rank,
    undecided,
)
from normrewrite.analysis.scale_invariance.op_table import Rule
from normrewrite.core.graph import node_label, node_shape
from normrewrite.core.ops import ConvInfo, LinearInfo, NormInfo, call_args

if TYPE_CHECKING:
    from normrewrite.analysis.scale_invariance.propagate import Propagation


def unary(n: Node, name: str, rule: Rule | None, st: State, src: Any) -> State:
    """A one-input op of a :class:`Rule` class: ``H(k)`` passes every such op that is
    homogeneous (the caller sends the others to ``X``); an additive term survives only a linear
    op, with its axes when the op keeps per-channel constants."""
    if st.kind in ("I", "X", "U", "H"):
        return st
    if rule is Rule.CHANNELWISE:  # per-channel constants stay per-channel
        return lift(st, src, n)
    if rule is Rule.LINEAR:
        return State(st.kind, st.k, None)
    if rule is Rule.HOMOGENEOUS:
        return not_invariant(f"an additive term passes through {name} at {node_label(n)}")
    return not_invariant(f"{name} at {node_label(n)} is not positively homogeneous")


def add(p: Propagation, n: Node) -> State:
    a, b = (*n.args, None, None)[:2]
    sa, sb = p.get(a), p.get(b)
    if n.kwargs.get("alpha") is not None and isinstance(n.kwargs.get("alpha"), Node):
        return undecided(f"add with a computed alpha at {node_label(n)}")
    bad = first_absorbing((sa, sb))
    if bad is not None:
        return bad
    sa, sb = lift(sa, a, n), lift(sb, b, n)
    if sa.kind == "I" or sb.kind == "I":
        s, other = (sb, a) if sa.kind == "I" else (sa, b)
        if s.kind == "S":
            return s  # h + i + s(c): still only an additive term depends on c
        axes = const_axes(other, n)
        if axes is None:
            return not_invariant(f"{node_label(n)} adds a branch that is not scaled with it")
        return State("A", s.k, axes if s.kind == "H" else join_axes(s.axes, axes))
    if sa.kind == sb.kind == "S":
        return State("S", 0, join_axes(sa.axes, sb.axes))  # h + s₁(c) + s₂(c)
    if sa.kind in ("H", "A") and sb.kind in ("H", "A") and sa.k == sb.k:
        if sa.kind == sb.kind == "H":
            return sa  # cᵏ·h + cᵏ·g = cᵏ·(h + g)
        return State(
            "A",
            sa.k,
            join_axes(
                sa.axes if sa.kind == "A" else frozenset(),
                sb.axes if sb.kind == "A" else frozenset(),
            ),
        )
    return not_invariant(f"{node_label(n)} adds terms that scale differently")


def mul(p: Propagation, n: Node, *, divide: bool) -> State:
    a, b = (*n.args, None, None)[:2]
    sa, sb = p.get(a), p.get(b)
    bad = first_absorbing((sa, sb))
    if bad is not None:
        return bad
    if (sa.kind == "H" and sb.kind in ("H", "I")) or (sa.kind == "I" and sb.kind == "H"):
        kb = sb.k if sb.kind == "H" else 0
        ka = sa.k if sa.kind == "H" else 0
        return homogeneous(ka - kb if divide else ka + kb)  # cᵃ·h · cᵇ·g = cᵃ⁺ᵇ·hg
    # an additive term times a constant stays an additive term
    if sb.kind == "I" and sa.kind in ("A", "S"):
        axes = const_axes(b, n)
        if axes is not None:
            sa = lift(sa, a, n)
            return State(sa.kind, sa.k, join_axes(sa.axes, axes))
    if not divide and sa.kind == "I" and sb.kind in ("A", "S"):
        axes = const_axes(a, n)
        if axes is not None:
            sb = lift(sb, b, n)
            return State(sb.kind, sb.k, join_axes(sb.axes, axes))
    return undecided(f"{node_label(n)} multiplies a shifted value by an activation")


def matmul(p: Propagation, n: Node) -> State:
    a, b = (*n.args, None, None)[:2]
    sa, sb = p.get(a), p.get(b)
    bad = first_absorbing((sa, sb))
    if bad is not None:
        return bad
    if sa.kind in ("H", "I") and sb.kind in ("H", "I"):  # (cᵃ·h)(cᵇ·g) = cᵃ⁺ᵇ·hg
        return homogeneous((sa.k if sa.kind == "H" else 0) + (sb.k if sb.kind == "H" else 0))
    for s, other in ((sa, b), (sb, a)):
        if s.kind in ("A", "S") and p.get(other).kind == "I":
            if isinstance(other, Node) and other.op == "get_attr":
                return State(s.kind, s.k, None)
            # e.g. q·(k + b)ᵀ: a per-row constant a later softmax removes
            return undecided(f"{node_label(n)} multiplies a shifted value by an activation")
    return not_invariant(f"{node_label(n)} multiplies terms that scale differently")


def cat(p: Propagation, n: Node) -> State:
    seq = n.args[0] if n.args else []
    states = [p.get(a) for a in seq]
    bad = first_absorbing(states)
    if bad is not None:
        return bad
    if all(s.kind == "H" for s in states) and len({s.k for s in states}) == 1:
        return states[0]  # [cᵏ·h, cᵏ·g] = cᵏ·[h, g]
    return undecided(
        f"{node_label(n)} concatenates scaled and unscaled tensors (a later per-channel "
        "norm could still cancel it)"
    )


def attention(p: Propagation, n: Node) -> State:
    q, k, v = (*n.args, None, None, None)[:3]
    sq, sk = p.get(q), p.get(k)
    if sk.kind == "S" and sq.kind == "I":  # q·(k + c·b)ᵀ: a per-query constant
        return undecided(
            f"an additive term in the keys at {node_label(n)} may cancel in the softmax"
        )
    if sq.kind != "I" or sk.kind != "I":
        return not_invariant(
            f"the attention scores at {node_label(n)} are scaled (softmax is not homogeneous)"
        )
    sv = p.get(v)
    if absorbing(sv) or sv.kind == "H":
        return sv
    return State(sv.kind, sv.k, None)


def embedding(p: Propagation, n: Node) -> State:
    """``(c·W)[i] = c·W[i]``, unless rows are renormalized (``max_norm``)."""
    if n.op == "call_module":
        mod = p.gm.get_submodule(str(n.target))
        if getattr(mod, "max_norm", None) is not None:
            return undecided(f"{node_label(n)} renormalizes the rows it reads (max_norm)")
        return p.param_state(f"{n.target}.weight")
    kw = call_args(p.gm, n)
    if kw.get("max_norm") is not None:
        return undecided(f"{node_label(n)} renormalizes the rows it reads (max_norm)")
    w = kw.get("weight")
    idx = kw.get("indices", kw.get("input"))
    if p.get(idx).kind != "I":
        return undecided(f"embedding indices depend on the parameter at {node_label(n)}")
    return p.get(w)


def layer(p: Propagation, n: Node, info: ConvInfo | LinearInfo) -> State:
    """A conv or linear: ``W ⊛ x + b`` is a product of ``W`` and ``x`` plus the bias."""
    x = p.get(info.input)
    w = p.arg_state(n, "weight", info.weight)
    b = p.arg_state(n, "bias", info.bias) if info.has_bias else INDEPENDENT
    bad = first_absorbing((x, w, b))
    if bad is not None:
        return bad
    r = rank(n)
    if r is None:
        axes = None
    elif isinstance(info, ConvInfo):  # channel axis
        axes = frozenset({1 if r == info.ndim + 2 else 0})
    else:
        axes = frozenset({r - 1})
    if x.kind == "I" and w.kind == "I":
        if b.kind == "H" and b.k == 1:
            return State("S", 0, axes)  # W·x + c·b
        return INDEPENDENT
    if x.kind in ("H", "I") and w.kind in ("H", "I"):
        k = (x.k if x.kind == "H" else 0) + (w.k if w.kind == "H" else 0)
        if b.kind == "I":
            return State("A", k, axes) if info.has_bias else homogeneous(k)
        if b.kind == "H" and b.k == k:
            return homogeneous(k)  # cᵏ·(W ⊛ x) + cᵏ·b
        return not_invariant(f"{node_label(n)}: weight and bias scale differently")
    if x.kind in ("A", "S") and w.kind == "I" and b.kind == "I":
        # W ⊛ (c·h + a): W ⊛ a is constant per output channel when a is constant per input
        # channel and every output sees a full kernel (no zero padding, not transposed)
        r_in = rank(info.input)
        full = not isinstance(info, ConvInfo) or (not info.transposed and info.zero_padding())
        if full and x.axes is not None and r_in == r and axes is not None and x.axes <= axes:
            return State(x.kind, x.k, axes)
        return State(x.kind, x.k, None)
    return not_invariant(f"{node_label(n)}: inputs scale differently")


def norm(p: Propagation, n: Node, info: NormInfo) -> State:
    """A norm maps ``H`` to ``I`` (``Norm(c·h) = Norm(h)``) and ``A``/``S`` to ``I`` when it
    removes the additive term (:func:`removes`); γ/β scale its output as a layer's W/b do."""
    if n is not (info.op_node or info.node):
        return INDEPENDENT
    x = p.get(info.input)
    g = p.arg_state(n, "weight", info.weight) if info.has_weight else INDEPENDENT
    b = p.arg_state(n, "bias", info.bias) if info.has_bias else INDEPENDENT
    bad = first_absorbing((x, g, b))
    if bad is not None:
        return bad
    label = info.label
    r = rank(info.input)
    if r is None:
        chan = None
    elif info.kind in ("layernorm", "rmsnorm"):
        m = len(info.normalized_shape or ())
        chan = frozenset(range(r - m, r))
    else:
        chan = frozenset({1})
    if g.kind == "I" and b.kind == "I":
        if x.kind == "I":
            return INDEPENDENT
        uses_input_stats = info.kind != "instancenorm" or info.training
        if not uses_input_stats:
            return undecided(f"{label} normalizes with running statistics (instance norm, eval)")
        if x.kind == "H":
            return p.cancel(info)
        # A or S: is the additive term removed?
        if x.axes is None:
            return undecided(f"cannot tell whether {label} removes the additive term before it")
        if removes(info, x.axes, r, node_shape(info.input)):
            return p.cancel(info)
        what = "a bias" if x.kind == "A" else "the scaled additive term"
        return not_invariant(
            f"{label} ({info.kind}) does not remove {what} varying along axes {sorted(x.axes)}"
        )
    if x.kind == "I":
        if g.kind == "H" and b.kind == "I":
            return State("A", g.k, chan) if info.has_bias else g
        if g.kind == "I" and b.kind == "H" and b.k == 1:
            return State("S", 0, chan)
        if g.kind == b.kind == "H" and g.k == b.k:
            return g
    return not_invariant(f"{label}: its input and its γ/β scale differently")


def removes(
    info: NormInfo, axes: frozenset[int], ndim: int | None, shape: Sequence[int] | None
) -> bool:
    """Does ``info`` subtract the mean over every axis an additive term along ``axes`` is
    constant on (so that the term disappears)?"""
    if info.kind == "batchnorm":
        return axes <= {1}  # per channel, over N and space
    if info.kind == "instancenorm":
        return axes <= {0, 1}  # per sample and channel
    if (
        info.kind == "groupnorm"
    ):  # per sample and group: a per-channel term only at one channel a group
        channels = shape[1] if shape and len(shape) > 1 else None
        return axes <= {0} or (
            axes <= {0, 1} and channels is not None and info.num_groups == channels
        )
    if info.kind == "layernorm" and ndim is not None:  # over the last m axes
        m = len(info.normalized_shape or ())
        return not (axes & set(range(ndim - m, ndim)))
    return False  # rmsnorm: no mean subtraction
