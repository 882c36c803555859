"""The abstract values of the scale-invariance analysis and the operations on them.

When one parameter ``P`` is replaced by ``c·P`` (``c > 0``), every value ``v`` of the graph
becomes a function ``v(c)``; a :class:`State` says which shape that function is known to have
(the table in :mod:`normrewrite.analysis.scale_invariance`):

* ``I`` — independent of ``c``;
* ``H(k)`` — ``cᵏ·v(1)``, ``k ≠ 0`` (``H(0)`` is ``I``, see :func:`homogeneous`);
* ``A(k, V)`` — ``cᵏ·h + a``, ``a`` constant along every axis not in ``V``;
* ``S(V)`` — ``h + s(c)``, only an additive term varying along ``V`` depends on ``c``;
* ``X`` — depends on ``c`` in a way no later op is known to undo; ``U`` — no rule.

``X`` and ``U`` are absorbing: an op reading one passes it on (``X`` first, see
:func:`first_absorbing`). Axes are counted from the left at the value they describe;
:func:`lift` re-counts them at a value of another rank (right-aligned, as broadcasting does).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from torch.fx import Node

from normrewrite.core.graph import node_shape

Kind = Literal["I", "H", "A", "S", "X", "U"]


@dataclass(frozen=True)
class State:
    kind: Kind
    k: int = 0  # degree, for H and A
    axes: frozenset[int] | None = None  # V, for A and S (None: unknown)
    why: str = ""  # for X and U


INDEPENDENT = State("I")


def homogeneous(k: int) -> State:
    """``H(k)``; degree 0 is independence."""
    return INDEPENDENT if k == 0 else State("H", k)


def not_invariant(why: str) -> State:
    """``X``: the scaling reaches this value in a way no later op is known to undo."""
    return State("X", why=why)


def undecided(why: str) -> State:
    """``U``: no rule decides how this value depends on the scaling."""
    return State("U", why=why)


def absorbing(st: State) -> bool:
    return st.kind in ("X", "U")


def first_absorbing(states: Iterable[State]) -> State | None:
    """X wins over U: a path known to carry ``c`` makes the claim "not invariant" anyway."""
    states = list(states)
    for s in states:
        if s.kind == "X":
            return s
    for s in states:
        if s.kind == "U":
            return s
    return None


def join_axes(*sets: frozenset[int] | None) -> frozenset[int] | None:
    """The union of axis sets; unknown (None) if any is."""
    if any(s is None for s in sets):
        return None
    out: frozenset[int] = frozenset()
    for s in sets:
        out |= s  # type: ignore[operator]
    return out


def rank(node: Any) -> int | None:
    shape = node_shape(node)
    return None if shape is None else len(shape)


def lift(st: State, src: Any, dst: Node) -> State:
    """Re-express the axes of ``st`` (valid at ``src``) at ``dst`` (right-aligned broadcast)."""
    if st.kind not in ("A", "S") or st.axes is None:
        return st
    r_in, r_out = rank(src), rank(dst)
    if r_in is None or r_out is None:
        return State(st.kind, st.k, None)
    shift = r_out - r_in
    return State(st.kind, st.k, frozenset(a + shift for a in st.axes))


def const_axes(arg: Any, out: Node) -> frozenset[int] | None:
    """Axes along which a constant operand varies (right-aligned to ``out``), or None when the
    operand is an activation (not a constant)."""
    if not isinstance(arg, Node):
        return frozenset()  # a Python scalar
    if arg.op != "get_attr":
        return None
    shape, r_out = node_shape(arg), rank(out)
    if shape is None or r_out is None:
        return None
    shift = r_out - len(shape)
    return frozenset(i + shift for i, d in enumerate(shape) if d != 1)
