"""Normalization-like arithmetic no recognizer names: a reduction (``mean``, ``var``, a vector
norm) of a value whose result — after ε, square roots, reciprocals, clamps, casts or broadcasts —
is subtracted from or divides that same value. Each becomes one kind ``unknown`` :class:`Norm`
whose ``reason`` says what was seen, so ``inspect`` lists it instead of staying silent."""

from __future__ import annotations

from torch.fx import GraphModule, Node

from normrewrite.analysis.norms.ops import binary, kwarg, op_name, reduced_axes, same_value, scalar
from normrewrite.analysis.norms.record import Norm
from normrewrite.analysis.norms.written import square_of
from normrewrite.core.graph import users

# ops a statistic passes through on its way to dividing the input (pointwise in the statistic)
_CARRY = {"add", "sqrt", "rsqrt", "cast", "pow", "reciprocal", "clamp", "expand"}
_INVERTING = {"rsqrt", "reciprocal"}


def _bases(red: Node) -> list[Node]:
    """The values ``red`` is a statistic of: its input, and x for an input x² or (x − c)²."""
    src = red.args[0] if red.args else red.kwargs.get("input")
    if not isinstance(src, Node):
        return []
    out = [src]
    sq = square_of(src)
    if sq is not None:
        out.append(sq)
        if op_name(sq) == "sub":
            a, _ = binary(sq)
            if isinstance(a, Node):
                out.append(a)
    return out


def _carried(red: Node) -> list[tuple[Node, bool]]:
    """``red`` and the values computed from it by :data:`_CARRY` ops alone, with whether an odd
    number of inversions lies on the way (then ``x · v`` divides x)."""
    seen, todo, out = {red}, [(red, False, 0)], []
    while todo:
        v, inverted, depth = todo.pop()
        out.append((v, inverted))
        for u in users(v):
            name = op_name(u)
            if u not in seen and name in _CARRY and depth < 6:
                seen.add(u)
                flips = name in _INVERTING or (name == "pow" and (scalar(binary(u)[1]) or 0) < 0)
                todo.append((u, inverted ^ flips, depth + 1))
    return out


def _scaled_by(w: Node, v: Node, covered: set[Node]) -> bool:
    """``w`` multiplies or divides ``v`` by a value carried from a reduction in ``covered`` (the
    centred x of a LayerNorm-like whose variance a recognizer already reported)."""
    if op_name(w) not in ("mul", "div"):
        return False
    a, b = binary(w)
    todo, seen = [(b if a is v else a, 0)], set()
    while todo:
        cur, depth = todo.pop()
        if not isinstance(cur, Node) or cur in seen or depth > 6:
            continue
        seen.add(cur)
        if cur in covered:
            return True
        if op_name(cur) in _CARRY:
            todo += [(t, depth + 1) for t in cur.args if isinstance(t, Node)]
    return False


def _use_on_base(red: Node, bases: list[Node], covered: set[Node]) -> str | None:
    """How a value carried from ``red`` normalizes one of ``bases``, or None (also when that
    use feeds a norm already found: the centring of a LayerNorm-like the matcher reported)."""
    for v, inverted in _carried(red):
        for u in users(v):
            name = op_name(u)
            if name not in ("sub", "div", "mul"):
                continue
            a, b = binary(u)
            other = b if a is v else a if b is v else None
            if not isinstance(other, Node) or not any(same_value(other, x) for x in bases):
                continue
            if covered & {u, *users(u)} or any(_scaled_by(w, u, covered) for w in users(u)):
                return None
            if name == "sub" and v is red:
                return "subtracts it from that value"
            if name == "div" and a is other:
                return "divides that value by it"
            if name == "mul" and inverted:
                return "multiplies that value by its inverse"
    return None


def unknown_norms(gm: GraphModule, known: list[Norm]) -> list[Norm]:
    """Every reduction of ``gm`` that normalizes its own input outside the ``known`` norms."""
    covered = {n for m in known for n in (*m.nodes, m.node)}
    out: list[Norm] = []
    for n in gm.graph.nodes:
        name = op_name(n)
        if name not in ("mean", "var", "norm") or n in covered:
            continue
        bases = _bases(n)
        how = _use_on_base(n, bases, covered) if bases else None
        if how is None:
            continue
        axes = reduced_axes(n, bases[-1])
        dims = list(axes) if axes is not None else kwarg(n, 1 if name != "norm" else 2, "dim")
        reason = f"a {name} over dims {dims} of a value {how}: no known norm has this form"
        out.append(Norm("unknown", n, bases[-1], (n,), axes, None, "none", False, "written",
                        reason=reason))  # fmt: skip
    return out
