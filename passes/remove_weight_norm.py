"""remove-weight-norm: store weight-normalized weights as plain tensors.

Identity (Salimans & Kingma 2016). Weight normalization computes a layer's weight from a
direction ``v`` and a magnitude ``g``::

    w = g · v / ‖v‖        ‖v‖ = the 2-norm of v over every dim except ``dim``
                           (over all of v when dim is None / -1), kept as size-1 dims

At inference the weight is a constant: compute it once (in float64, cast to v's dtype) and store
it. What reaches the pass, by API and tracer:

* ``torch.nn.utils.weight_norm`` (hook API): parameters ``<name>_g`` / ``<name>_v`` and a forward
  pre-hook writing ``<name>``. symbolic_trace keeps the layer as a ``call_module`` (the hook runs
  at call time): the hook is removed and ``<name>`` becomes a parameter. torch.export traces the
  hook: ``aten._weight_norm(v, g, dim)`` feeding the layer.
* ``torch.nn.utils.parametrizations.weight_norm``: ``parametrizations.<name>.original0`` (g) and
  ``original1`` (v). symbolic_trace: a ``call_module`` of the parametrized module — the
  parametrization is removed. torch.export: ``aten._weight_norm(original1, original0, dim)``.
* decomposed programs (``run_decompositions``, or this tool's ``apply-weight-norm``):
  ``mul(v, div(g, linalg_vector_norm(v, 2, dims, keepdim=True)))`` (or ``mul(g, div(v, ‖v‖))``), and
  ``aten._weight_norm_interface(v, g, dim)[0]``.

In graphs, any such computation from stored ``g`` and ``v`` is replaced by a ``get_attr`` of the new
tensor, named ``<layer>.<name>`` (from ``<name>_g`` or ``parametrizations.<name>.original0``);
``g``/``v`` are dropped when nothing else reads them. Preconditions: ``g`` and ``v`` are stored
tensors; a parametrization list holding anything besides the weight norm is left alone.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.fx import GraphModule, Node
from torch.nn.utils import parametrize
from torch.nn.utils.weight_norm import WeightNorm

from normrewrite.core.graph import (
    constant_fqn,
    erase_unused,
    get_tensor,
    has_tensor,
    node_label,
    set_tensor,
)
from normrewrite.core.ops import call_args
from normrewrite.core.pass_infra import Change, PassContext, Skip, TensorRecipe, compute_tensors
from normrewrite.core.rewrite import Rewrite, RewritePass

aten = torch.ops.aten

# --------------------------------------------------------------------------- tensor math


def reduced_dims(ndim: int, dim: int | None) -> tuple[int, ...]:
    """The dims ``torch._weight_norm(v, g, dim)`` takes the norm over."""
    if dim is None or dim == -1:
        return tuple(range(ndim))
    dim %= ndim
    return tuple(d for d in range(ndim) if d != dim)


def materialize(v: Tensor, g: Tensor, dims: tuple[int, ...]) -> Tensor:
    """``g · v / ‖v‖`` (norm over ``dims``, kept), computed in float64, in v's dtype."""
    v64 = v.double()
    norm = torch.linalg.vector_norm(v64, 2, dim=dims, keepdim=True)
    return (v64 * (g.double() / norm)).to(v.dtype)


# --------------------------------------------------------------------------- matchers


@dataclass(frozen=True)
class GraphMatch:
    """A weight computed in the graph from stored ``g`` and ``v``."""

    output: Node  # the node producing w
    nodes: tuple[Node, ...]  # the computation, erased once unused
    g: str
    v: str
    dims: tuple[int, ...]

    @property
    def label(self) -> str:
        return node_label(next(iter(self.output.users), self.output))


@dataclass(frozen=True)
class ModuleMatch:
    """A module whose weight is weight-normalized by a hook or a parametrization."""

    path: str
    name: str
    api: str  # "hook" | "parametrize"
    g: str
    v: str
    dim: int | None


_WN_FUNCS = {aten._weight_norm.default, getattr(torch, "_weight_norm", None)}
_MUL = {aten.mul.Tensor, operator.mul, torch.mul}
_DIV = {aten.div.Tensor, operator.truediv, torch.div}
_NORM = {aten.linalg_vector_norm.default, torch.linalg.vector_norm}


def _stored(gm: GraphModule, node: object) -> str | None:
    fqn = constant_fqn(node)
    return fqn if fqn is not None and has_tensor(gm, fqn) else None


def _ndim(gm: GraphModule, fqn: str) -> int:
    return get_tensor(gm, fqn).dim()


def match_graph(gm: GraphModule, node: Node) -> GraphMatch | None:
    """``node`` computes ``g · v / ‖v‖`` from stored g and v in one of the traced forms."""
    if node.op != "call_function":
        return None
    if node.target in _WN_FUNCS:
        kw = call_args(gm, node)
        v, g = _stored(gm, kw.get("v")), _stored(gm, kw.get("g"))
        if v is None or g is None:
            return None
        dims = reduced_dims(_ndim(gm, v), kw.get("dim", 0))
        return GraphMatch(node, (node,), g, v, dims)
    if node.target is operator.getitem and node.args[1] == 0:
        op = node.args[0]
        if isinstance(op, Node) and op.target is aten._weight_norm_interface.default:
            if any(u is not node and u.users for u in op.users):
                return None
            v, g = _stored(gm, op.args[0]), _stored(gm, op.args[1])
            if v is None or g is None:
                return None
            dim = op.args[2] if len(op.args) > 2 else op.kwargs.get("dim", 0)
            return GraphMatch(node, (node, op, *op.users), g, v, reduced_dims(_ndim(gm, v), dim))
    if node.target in _MUL and len(node.args) == 2:
        for a, b in (node.args, node.args[::-1]):
            found = _chain(gm, node, a, b)
            if found is not None:
                return found
    return None


def _chain(gm: GraphModule, mul: Node, a: object, b: object) -> GraphMatch | None:
    """mul(a, b) with b = div(c, ‖v‖) and {a, c} = {v, g}; v the tensor under the norm."""
    if not (
        isinstance(b, Node) and b.op == "call_function" and b.target in _DIV and len(b.args) == 2
    ):
        return None
    c, norm = b.args
    if not (isinstance(norm, Node) and norm.op == "call_function" and norm.target in _NORM):
        return None
    kw = call_args(gm, norm)
    ord_, dims, keep = kw.get("ord", 2), kw.get("dim"), kw.get("keepdim", False)
    if float(ord_) != 2.0:
        return None
    src = kw.get("input", kw.get("x"))
    src_fqn, a_fqn, c_fqn = _stored(gm, src), _stored(gm, a), _stored(gm, c)
    if src_fqn is None or a_fqn is None or c_fqn is None:
        return None
    if src_fqn == a_fqn:
        v, g = a_fqn, c_fqn
    elif src_fqn == c_fqn:
        v, g = c_fqn, a_fqn
    else:
        return None
    ndim = _ndim(gm, v)
    if dims is None:
        red = tuple(range(ndim))
    else:
        red = tuple(sorted(int(d) % ndim for d in ([dims] if isinstance(dims, int) else dims)))
    if not keep and len(red) != ndim:  # a partial norm without kept dims broadcasts differently
        return None
    if len(b.users) != 1 or len(norm.users) != 1:
        return None
    return GraphMatch(mul, (mul, b, norm), g, v, red)


def match_modules(gm: nn.Module) -> tuple[list[ModuleMatch], list[Skip]]:
    """Modules carrying a weight-norm hook or parametrization (symbolic_trace graphs)."""
    found: list[ModuleMatch] = []
    skipped: list[Skip] = []
    for path, mod in gm.named_modules():
        prefix = f"{path}." if path else ""
        for hook in mod._forward_pre_hooks.values():
            if isinstance(hook, WeightNorm):
                name = hook.name
                found.append(
                    ModuleMatch(
                        path, name, "hook", f"{prefix}{name}_g", f"{prefix}{name}_v", hook.dim
                    )
                )
        if not parametrize.is_parametrized(mod):
            continue
        for name, plist in mod.parametrizations.items():
            wn = [p for p in plist if isinstance(p, nn.utils.parametrizations._WeightNorm)]
            if not wn:
                continue
            if len(plist) != 1:
                skipped.append(
                    Skip(f"{prefix}{name}", "other parametrizations are stacked on the weight norm")
                )
                continue
            if len(mod.parametrizations) != 1:
                skipped.append(
                    Skip(f"{prefix}{name}", "other tensors of the module are parametrized too")
                )
                continue
            base = f"{prefix}parametrizations.{name}"
            found.append(
                ModuleMatch(
                    path, name, "parametrize", f"{base}.original0", f"{base}.original1", wn[0].dim
                )
            )
    return found, skipped


# --------------------------------------------------------------------------- rewrite


def _fn(dims: tuple[int, ...]):
    def fn(g: Tensor, v: Tensor) -> tuple[Tensor]:
        return (materialize(v, g, dims),)

    return fn


def _target_name(gm: GraphModule, g: str) -> str:
    """Where the materialized weight goes: ``<layer>.<name>``, a free name on an existing module."""
    prefix, _, last = g.rpartition(".")
    if last == "original0" and ".parametrizations." in f".{prefix}":
        owner, _, name = prefix.rpartition(".")  # "<layer>.parametrizations", "<name>"
        owner = owner[: -len("parametrizations")].rstrip(".")
    elif last.endswith("_g"):
        owner, name = prefix, last[:-2]
    else:
        owner, name = prefix, f"{last}_materialized"
    try:
        gm.get_submodule(owner)
    except AttributeError:
        owner, name = "", f"{owner.replace('.', '_')}_{name}" if owner else name
    fqn = f"{owner}.{name}" if owner else name
    base, i = fqn, 1
    while has_tensor(gm, fqn):
        fqn, i = f"{base}_{i}", i + 1
    return fqn


def apply_graph(gm: GraphModule, m: GraphMatch, ctx: PassContext) -> str:
    fqn = _target_name(gm, m.g)
    compute_tensors(gm, ctx, [fqn], [m.g, m.v], _fn(m.dims), origin="remove-weight-norm")
    with gm.graph.inserting_before(m.output):
        getter = gm.graph.get_attr(fqn)
    if "val" in m.output.meta:
        getter.meta["val"] = m.output.meta["val"]
    m.output.replace_all_uses_with(getter)
    erase_unused(gm, list(m.nodes))
    return fqn


def apply_module(gm: GraphModule, m: ModuleMatch, ctx: PassContext) -> str:
    """Remove the hook / parametrization; the weight becomes a parameter named ``<path>.<name>``.

    The structure changes before the new tensor can be stored (setting a parametrized name would
    run its right-inverse), so the recipe is applied and logged here by hand, with the same
    contract as :func:`compute_tensors`: inputs named as they were, output by its final name."""
    mod = gm.get_submodule(m.path) if m.path else gm
    g, v = get_tensor(gm, m.g), get_tensor(gm, m.v)
    dims = reduced_dims(v.dim(), m.dim)
    fn = _fn(dims)
    (value,) = fn(g, v)
    requires_grad = v.requires_grad
    if m.api == "hook":
        for key, hook in list(mod._forward_pre_hooks.items()):
            if isinstance(hook, WeightNorm) and hook.name == m.name:
                del mod._forward_pre_hooks[key]
        mod.__dict__.pop(m.name, None)
        mod._parameters.pop(f"{m.name}_g")
        mod._parameters.pop(f"{m.name}_v")
    else:
        # not parametrize.remove_parametrizations: it deletes the property from the module's
        # class, which a symbolic_trace deep copy shares with the caller's model
        mod._modules.pop("parametrizations")
        mod.__class__ = type(mod).__bases__[0]
    fqn = f"{m.path}.{m.name}" if m.path else m.name
    set_tensor(gm, fqn, value)
    get_tensor(gm, fqn).requires_grad_(requires_grad and value.is_floating_point())
    ctx.recipes.append(TensorRecipe((fqn,), (m.g, m.v), fn, "remove-weight-norm"))
    return fqn


# --------------------------------------------------------------------------- pass


Candidate = ModuleMatch | Skip | Node


class _Materialize(Rewrite[ModuleMatch | GraphMatch]):
    """Candidates: the weight-norm hooks and parametrizations of the modules (symbolic_trace
    graphs call them), then the graph's nodes (torch.export graphs compute the weight)."""

    refused = "not materializable"

    def candidates(self) -> list[Candidate]:
        modules, skipped = match_modules(self.gm)
        return [*modules, *skipped, *self.gm.graph.nodes]

    def key(self, candidate: Candidate) -> str:
        if isinstance(candidate, Node):
            return candidate.name
        return candidate.target if isinstance(candidate, Skip) else candidate.path or "<root>"

    def match(self, candidate: Candidate) -> ModuleMatch | GraphMatch | Skip | None:
        if not isinstance(candidate, Node):
            return candidate
        found = match_graph(self.gm, candidate)
        if found is None and candidate.op == "call_function" and candidate.target in _WN_FUNCS:
            return Skip(node_label(candidate), "g or v is computed in the graph, not stored")
        return found

    def apply(self, found: ModuleMatch | GraphMatch) -> Change:
        if isinstance(found, ModuleMatch):
            fqn = apply_module(self.gm, found, self.ctx)
            return Change(
                found.path or "<root>",
                f"{found.name}: {found.api} weight norm materialized as {fqn}",
            )
        fqn = apply_graph(self.gm, found, self.ctx)
        return Change(found.label, f"weight norm of {found.v} materialized as {fqn}")


class RemoveWeightNorm(RewritePass):
    name = "remove-weight-norm"
    summary = (
        "store weight-normalized weights (hook or parametrization API) as plain weights (exact)"
    )
    exact = True

    def rewriter(self, gm: GraphModule, ctx: PassContext) -> _Materialize:
        return _Materialize(gm, ctx)

    def explain(self, gm: GraphModule, ctx: PassContext) -> dict[str, str]:
        """Reported at the layers that read a weight computed by weight norm."""
        rewrite = self.rewriter(gm, ctx)
        out: dict[str, str] = {}
        for node in gm.graph.nodes:
            found = rewrite.match(node)
            if isinstance(found, GraphMatch):
                for u in found.output.users:
                    out[u.name] = (
                        f"weight computed by weight norm from {found.g}, {found.v}: materializable"
                    )
        return out


__all__ = [
    "GraphMatch",
    "ModuleMatch",
    "RemoveWeightNorm",
    "match_graph",
    "match_modules",
    "materialize",
    "reduced_dims",
]
