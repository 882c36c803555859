"""fuse-norm: replace norms written out as elementwise ops by one fused norm op.

Identities (over the last dim, ``D`` features, ``x̄ = mean(x)``)::

    x · rsqrt(mean(x²) + ε)                 = rms_norm(x, [D], None, ε)        (Llama, Qwen, T5)
    x / sqrt(mean(x²) + ε)                  = rms_norm(x, [D], None, ε)
    (x − x̄) · rsqrt(mean((x − x̄)²) + ε)     = layer_norm(x, [D], None, None, ε)
    (x − x̄) / sqrt(var(x, correction=0) + ε) = layer_norm(x, [D], None, None, ε)
    γ · norm(x) [+ β]                        = norm(x, γ [, β])      (γ, β stored, shape (D,))

Matched on op semantics in both graph flavours: ATen (``aten.pow.Tensor_Scalar``,
``aten.mean.dim``, ``aten.rsqrt.default``, ``aten.to.dtype`` …) and symbolic_trace (``torch.*``
functions, ``operator`` arithmetic, tensor methods). The fused op is ``aten.rms_norm`` /
``aten.layer_norm`` in ATen graphs and ``F.rms_norm`` / ``F.layer_norm`` in fx graphs.

Preconditions, each checked (a near miss is reported with the reason):

* the reduction is a ``mean`` over the last dim only (``-1`` or ``rank − 1``) with
  ``keepdim=True``, of ``x²`` (``pow(x, 2)``, ``square(x)``, ``x * x``); a variance has
  ``correction=0``; ε is a Python number added to it;
* every intermediate value is read only inside the pattern;
* the value squared and the value normalized are the same, or differ only by lossless casts
  (T5 squares ``x.to(float32)`` and multiplies ``x``);
* dtype casts are kept exactly: a cast that is a no-op (same dtype in and out, known from the
  trace) between the normalization and γ is dropped; a real down-cast (the bf16 Llama
  ``.to(input_dtype)``) stays, and γ is then left as a separate multiply after it, because
  fusing it would multiply before rounding instead of after;
* γ/β are fused only when they are stored tensors of shape ``(D,)`` with the activation's dtype.
  Gemma's ``x · (1 + γ)`` is left as a separate multiply after the fused op (still exact; folding
  the offset would re-parameterise the weight), and the change says so.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from normrewrite.core.graph import (
    assertions_on,
    erase_unused,
    flavour,
    get_tensor,
    node_dtype,
    node_label,
    node_shape,
    users,
)
from normrewrite.core.pass_infra import Change, Pass, PassContext, PassResult, Skip, rewrite_each

aten = torch.ops.aten

# --------------------------------------------------------------------------- op semantics

# op name -> (ATen overloads, fx functions, tensor methods)
_OPS: dict[str, tuple[set[Any], set[Any], set[str]]] = {
    "pow": ({aten.pow.Tensor_Scalar}, {torch.pow, operator.pow}, {"pow", "__pow__"}),
    "square": ({aten.square.default}, {torch.square}, {"square"}),
    "mul": ({aten.mul.Tensor, aten.mul.Scalar}, {torch.mul, operator.mul}, {"mul", "__mul__"}),
    "add": ({aten.add.Tensor, aten.add.Scalar}, {torch.add, operator.add}, {"add", "__add__"}),
    "sub": ({aten.sub.Tensor}, {torch.sub, operator.sub}, {"sub", "__sub__"}),
    "div": ({aten.div.Tensor}, {torch.div, operator.truediv}, {"div", "__truediv__"}),
    "rsqrt": ({aten.rsqrt.default}, {torch.rsqrt}, {"rsqrt"}),
    "sqrt": ({aten.sqrt.default}, {torch.sqrt}, {"sqrt"}),
    "mean": ({aten.mean.dim}, {torch.mean}, {"mean"}),
    "var": ({aten.var.correction, aten.var.dim}, {torch.var}, {"var"}),
    "cast": (
        {aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout, aten.type_as.default},
        set(),
        {"to", "float", "half", "bfloat16", "double", "type_as", "type"},
    ),
}


def op_name(node: object) -> str | None:
    """The semantic name of an elementwise/reduction op node, or None."""
    if not isinstance(node, Node):
        return None
    for name, (atens, funcs, methods) in _OPS.items():
        if node.op == "call_function" and (node.target in atens or node.target in funcs):
            return name
        if node.op == "call_method" and node.target in methods:
            return name
    return None


def _kw(node: Node, index: int, name: str, default: Any = None) -> Any:
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[index] if len(node.args) > index else default






def _binary(node: Node) -> tuple[Any, Any]:
    return _kw(node, 0, "input", _kw(node, 0, "self")), _kw(node, 1, "other")


def _plain_binary(node: Node) -> bool:
    """No alpha scaling / rounding mode."""
    return node.kwargs.get("alpha", 1) == 1 and node.kwargs.get("rounding_mode") is None and len(node.args) <= 2


def _reduced_dims(node: Node) -> tuple[list[int], bool] | None:
    """(dims, keepdim) of a mean/var node."""
    dim = _kw(node, 1, "dim")
    keepdim = bool(node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 and op_name(node) == "mean" else False))
    if op_name(node) == "var":
        keepdim = bool(node.kwargs.get("keepdim", keepdim))
        if node.target is aten.var.dim and len(node.args) > 3:
            keepdim = bool(node.args[3])
    if dim is None:
        return None
    dims = [dim] if isinstance(dim, int) else list(dim)
    return dims, keepdim


def _var_correction(node: Node) -> float | None:
    if node.target is aten.var.dim:
        unbiased = node.args[2] if len(node.args) > 2 else node.kwargs.get("unbiased", True)
        return 1.0 if unbiased else 0.0
    if "correction" in node.kwargs:
        c = node.kwargs["correction"]
        return 1.0 if c is None else float(c)
    if "unbiased" in node.kwargs:
        return 1.0 if node.kwargs["unbiased"] else 0.0
    positional = node.op == "call_method" or node.target is torch.var
    if positional and len(node.args) > 2 and isinstance(node.args[2], bool):
        return 1.0 if node.args[2] else 0.0
    return 1.0


def _is_last_dim(dims: list[int], x: Node) -> bool:
    if len(dims) != 1:
        return False
    shape = node_shape(x)
    return dims[0] == -1 or (shape is not None and dims[0] == len(shape) - 1)


_WIDER = {torch.float16: 1, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}


def _cast_input(node: Node) -> Node | None:
    x = node.args[0] if node.args else node.kwargs.get("self")
    return x if isinstance(x, Node) else None


def _lossless_root(node: Node) -> tuple[Node, bool]:
    """``node`` with casts looked through backwards, and whether every cast was lossless."""
    ok = True
    while op_name(node) == "cast":
        src = _cast_input(node)
        if src is None:
            break
        a, b = node_dtype(src), node_dtype(node)
        if a is None or b is None or not (a == b or _WIDER.get(b, 0) > _WIDER.get(a, 9)):
            ok = False
        node = src
    return node, ok


def _same_value(a: Node, b: Node) -> bool:
    """``a`` and ``b`` hold the same numbers: one node, or lossless casts of one node to one dtype."""
    if a is b:
        return True
    ra, oka = _lossless_root(a)
    rb, okb = _lossless_root(b)
    da, db = node_dtype(a), node_dtype(b)
    return ra is rb and oka and okb and da is not None and da == db


def _is_noop_cast(node: Node) -> bool:
    src = _cast_input(node)
    return src is not None and node_dtype(src) is not None and node_dtype(src) == node_dtype(node)


def _scalar(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


# --------------------------------------------------------------------------- matcher


@dataclass(frozen=True)
class NormPattern:
    """A written-out norm: ``out`` (the last node of the pattern) computes
    ``kind(x, [features], weight, bias, eps)`` followed by the kept ``tail`` ops."""

    kind: str  # "rmsnorm" | "layernorm"
    x: Node
    features: int
    eps: float
    core: Node  # the node computing the normalized value (before casts and γ)
    out: Node  # the node whose uses the fused op (plus nothing) takes over
    weight: Node | None  # get_attr of γ, when fused
    bias: Node | None
    nodes: tuple[Node, ...]  # pattern nodes that become dead
    notes: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return node_label(self.core)

    def describe(self) -> str:
        parts = [f"{self.kind} over {self.features} features, eps={self.eps:g}"]
        parts.append("γ fused" if self.weight is not None else "no γ fused")
        if self.kind == "layernorm":
            parts.append("β fused" if self.bias is not None else "no β fused")
        return "; ".join(parts + list(self.notes))


@dataclass(frozen=True)
class NoMatch:
    label: str
    reason: str


def _only_user(node: Node, expected: Node | None = None) -> Node | None:
    us = users(node)
    if len(us) != 1 or (expected is not None and us[0] is not expected):
        return None
    return us[0]


def _square_of(node: object) -> Node | None:
    """x if node is x², else None."""
    name = op_name(node)
    if name == "pow" and _scalar(_kw(node, 1, "exponent")) == 2.0:
        x = _kw(node, 0, "input", _kw(node, 0, "self"))
        return x if isinstance(x, Node) else None
    if name == "square":
        x = node.args[0] if node.args else None
        return x if isinstance(x, Node) else None
    if name == "mul" and _plain_binary(node):
        a, b = _binary(node)
        return a if isinstance(a, Node) and a is b else None
    return None


def _eps_add(node: Node) -> float | None:
    if op_name(node) != "add" or not _plain_binary(node):
        return None
    a, b = _binary(node)
    for t, s in ((a, b), (b, a)):
        if isinstance(t, Node) and _scalar(s) is not None:
            return _scalar(s)
    return None


def _normalize_step(den: Node, num_of: str) -> tuple[Node, Node, list[Node]] | str:
    """From ``den = stat + ε``: (numerator, normalized node, nodes) for ``num·rsqrt(den)`` or
    ``num / sqrt(den)``; else the reason."""
    root = _only_user(den)
    if root is None:
        return f"{num_of} + eps has {len(users(den))} users"
    name = op_name(root)
    if name not in ("rsqrt", "sqrt"):
        return f"{num_of} + eps feeds {root.target}, not rsqrt/sqrt"
    step = _only_user(root)
    if step is None:
        return f"the {name} has {len(users(root))} users"
    sname = op_name(step)
    a, b = _binary(step) if sname in ("mul", "div") else (None, None)
    if name == "rsqrt" and sname == "mul" and _plain_binary(step):
        num = a if b is root else b if a is root else None
    elif name == "sqrt" and sname == "div" and _plain_binary(step) and b is root:
        num = a
    else:
        num = None
    if not isinstance(num, Node):
        return f"the {name} is not used as x·rsqrt(…) or x/sqrt(…)"
    return num, step, [root, step]


def match(gm: GraphModule, mean: Node) -> NormPattern | NoMatch | None:
    """A written-out RMSNorm/LayerNorm whose statistic is ``mean`` (or a var node); None when
    ``mean`` does not start one."""
    name = op_name(mean)
    if name not in ("mean", "var"):
        return None
    src = mean.args[0] if mean.args else mean.kwargs.get("input")
    if not isinstance(src, Node):
        return None
    label = node_label(mean)
    reduced = _reduced_dims(mean)
    sq_of = _square_of(src) if name == "mean" else None
    centred = _centred(mean) if name == "mean" else None
    if name == "var" or (sq_of is not None and op_name(sq_of) == "sub" and _centred_sub(sq_of) is not None):
        kind = "layernorm"
    elif sq_of is not None:
        kind = "rmsnorm"
    elif centred is not None:
        return None  # the mean of a LayerNorm: matched from its variance
    else:
        return None  # a plain mean (pooling, loss): not a norm
    if reduced is None or not reduced[1]:
        return NoMatch(label, "the reduction does not keep its dim (keepdim=False)")
    if name == "var" and _var_correction(mean) != 0.0:
        return NoMatch(label, "the variance is unbiased (correction=1); LayerNorm uses the biased one")

    nodes: list[Node] = [mean]
    if kind == "rmsnorm":
        x_sq = sq_of
        assert x_sq is not None
        if _only_user(src, mean) is None:
            return NoMatch(label, "x² has other users")
        nodes.insert(0, src)
        stat_of = "mean(x²)"
    elif name == "var":
        x_sq = src
        stat_of = "var(x)"
    else:
        sub = sq_of
        assert sub is not None
        if _only_user(src, mean) is None:
            return NoMatch(label, "(x − mean)² has other users")
        nodes.insert(0, src)
        x_sq = sub
        stat_of = "mean((x − mean)²)"
    x_red = x_sq if kind == "rmsnorm" or name == "var" else _centred_sub(x_sq)[0]  # type: ignore[index]
    if not _is_last_dim(reduced[0], x_red):
        return NoMatch(label, f"reduces dims {reduced[0]}, not the last dim only (channel-first norms are not fused)")
    den = _only_user(mean)
    if den is None:
        return NoMatch(label, f"{stat_of} has {len(users(mean))} users")
    eps = _eps_add(den)
    if eps is None:
        return NoMatch(label, f"{stat_of} is not followed by + eps (a Python number)")
    nodes.append(den)
    step = _normalize_step(den, stat_of)
    if isinstance(step, str):
        return NoMatch(label, step)
    num, core, more = step
    nodes += more

    if kind == "rmsnorm":
        if not _same_value(num, x_sq):
            return NoMatch(label, "the value normalized is not the value squared (or differs from it by a cast)")
        x = x_sq
    else:
        # numerator: x − mean(x), the same mean node as the variance's (or mean of same x)
        if name == "var":
            c = _centred_sub(num)
            if c is None or not _same_value(c[0], x_sq) or op_name(c[1]) != "mean":
                return NoMatch(label, "the numerator is not x − mean(x) of the variance's x")
            mu = c[1]
            r = _reduced_dims(mu)
            if r is None or not r[1] or not _is_last_dim(r[0], c[0]):
                return NoMatch(label, "the mean subtracted is not over the last dim with keepdim")
            x = c[0]
            extra = [num, mu]
        else:
            c_var = _centred_sub(x_sq)
            c_num = _centred_sub(num)
            assert c_var is not None
            if c_num is None or c_num[0] is not c_var[0] or c_num[1] is not c_var[1]:
                return NoMatch(label, "the numerator is not the x − mean(x) that the variance squares")
            x, mu = c_var
            extra = [x_sq] + ([num] if num is not x_sq else []) + [mu]
        allowed = set(nodes) | set(extra)
        for n in extra:
            if any(u not in allowed for u in users(n)):
                return NoMatch(label, f"the intermediate {n.name} has users outside the norm")
        if any(u not in allowed for u in users(mu)):
            return NoMatch(label, "mean(x) has users outside the norm")
        nodes = [n for n in extra if n not in nodes] + nodes
    shape = node_shape(x)
    if not shape:
        return NoMatch(label, "the input shape is unknown (trace with shapes recorded)")
    features = shape[-1]
    if any(u not in nodes for n in nodes[:-1] for u in users(n)):
        return NoMatch(label, "an intermediate value has users outside the norm")

    # tail: casts, then γ (and β for LayerNorm)
    notes: list[str] = []
    out, weight, bias = core, None, None
    casts: list[Node] = []
    cur = core
    while (u := _only_user(cur)) is not None and op_name(u) == "cast" and _cast_input(u) is cur:
        casts.append(u)
        cur = u
    w_node, w_mul = _affine_operand(gm, cur, "mul", features, node_dtype(cur))
    if isinstance(w_node, str):
        notes.append(w_node)
    elif w_node is not None:
        if all(_is_noop_cast(c) for c in casts):
            nodes += casts
            out, weight = w_mul, w_node
            nodes.append(w_mul)
            if kind == "layernorm":
                b_node, b_add = _affine_operand(gm, w_mul, "add", features, node_dtype(w_mul))
                if isinstance(b_node, Node):
                    out, bias = b_add, b_node
                    nodes.append(b_add)
        else:
            notes.append(f"γ kept as a separate multiply after the {node_dtype(casts[-1])} cast")
    elif kind == "layernorm" and not casts:
        b_node, b_add = _affine_operand(gm, core, "add", features, node_dtype(core))
        if isinstance(b_node, Node):
            out, bias = b_add, b_node
            nodes.append(b_add)
    return NormPattern(kind, x, features, eps, core, out, weight, bias, tuple(nodes), tuple(notes))


def _centred_sub(node: object) -> tuple[Node, Node] | None:
    """(x, mu) if node is ``x − mu`` with ``mu`` a mean of ``x`` (or of the same value)."""
    if op_name(node) != "sub" or not _plain_binary(node):  # type: ignore[arg-type]
        return None
    x, mu = _binary(node)  # type: ignore[arg-type]
    if not isinstance(x, Node) or not isinstance(mu, Node) or op_name(mu) != "mean":
        return None
    src = mu.args[0] if mu.args else None
    if not isinstance(src, Node) or not _same_value(src, x):
        return None
    return x, mu


def _centred(mean: Node) -> bool | None:
    return True if any(_centred_sub(u) is not None for u in users(mean)) else None


def _affine_operand(
    gm: GraphModule, value: Node, op: str, features: int, dtype: torch.dtype | None
) -> tuple[Node | str | None, Node | None]:
    """If ``value``'s only user is ``value ∘ c`` (``op`` mul/add) with ``c`` a stored ``(features,)``
    tensor of ``dtype``: (c's get_attr, the op node). A string explains a near miss."""
    u = _only_user(value)
    if u is None or op_name(u) != op or not _plain_binary(u):
        return None, None
    a, b = _binary(u)
    other = b if a is value else a if b is value else None
    if not isinstance(other, Node):
        return None, None
    if other.op != "get_attr":
        if op == "mul" and op_name(other) in ("add", "cast"):
            return "γ is computed in the graph (e.g. Gemma's 1 + γ): kept as a separate multiply", None
        return None, None
    try:
        t = get_tensor(gm, str(other.target))
    except (AttributeError, KeyError):
        return None, None
    if tuple(t.shape) != (features,):
        return f"the {'γ' if op == 'mul' else 'β'} of shape {tuple(t.shape)} is not ({features},): kept separate", None
    if dtype is not None and t.dtype != dtype:
        return f"γ/β dtype {t.dtype} differs from the activation's {dtype}: kept separate", None
    return other, u


# --------------------------------------------------------------------------- rewrite


def apply(gm: GraphModule, m: NormPattern) -> Node:
    aten_graph = flavour(gm) == "aten"
    with gm.graph.inserting_after(m.out):
        if m.kind == "rmsnorm":
            if aten_graph:
                fused = gm.graph.call_function(aten.rms_norm.default, (m.x, [m.features], m.weight, m.eps))
            else:
                fused = gm.graph.call_function(F.rms_norm, (m.x, (m.features,), m.weight, m.eps))
        elif aten_graph:
            fused = gm.graph.call_function(
                aten.layer_norm.default, (m.x, [m.features], m.weight, m.bias, m.eps)
            )
        else:
            fused = gm.graph.call_function(F.layer_norm, (m.x, (m.features,), m.weight, m.bias, m.eps))
    fused.meta = dict(m.out.meta)
    if "val" in m.core.meta and m.out is not m.core:
        fused.meta["val"] = m.out.meta.get("val", m.core.meta["val"])
    doomed = [*assertions_on(list(m.nodes)), *reversed(m.nodes)]
    m.out.replace_all_uses_with(fused)
    # the fused op reads x and γ/β: move those reads before it if they came later
    for dep in (m.weight, m.bias):
        if dep is not None:
            _move_before(gm, dep, fused)
    for n in doomed[: len(doomed) - len(m.nodes)]:
        gm.graph.erase_node(n)  # export's dtype assertions on the old values
    erase_unused(gm, list(reversed(m.nodes)))
    return fused


def _move_before(gm: GraphModule, dep: Node, node: Node) -> None:
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    if order[dep] > order[node]:
        node.prepend(dep)


# --------------------------------------------------------------------------- pass


class FuseNorm(Pass):
    name = "fuse-norm"
    summary = "replace RMSNorm/LayerNorm written out as elementwise ops by one fused op (exact)"
    exact = True

    def call(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        def find(node: Node) -> NormPattern | Skip | None:
            found = match(gm, node)
            return Skip(found.label, found.reason) if isinstance(found, NoMatch) else found

        def fuse(found: NormPattern) -> Change:
            change = Change(found.label, f"fused {found.describe()}")
            apply(gm, found)
            return change

        return rewrite_each(gm, find, fuse)

    def explain(self, gm: GraphModule, ctx: PassContext) -> dict[str, str]:
        out: dict[str, str] = {}
        for node in gm.graph.nodes:
            found = match(gm, node)
            if isinstance(found, NormPattern):
                out[node.name] = f"fusable: {found.describe()}"
            elif isinstance(found, NoMatch):
                out[node.name] = f"not fusable: {found.reason}"
        return out


__all__ = ["FuseNorm", "NoMatch", "NormPattern", "match", "op_name"]
