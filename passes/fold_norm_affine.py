"""fold-norm-affine: fold a LayerNorm/RMSNorm's γ (and β) into the linear layers that read it.

Identity. With ``n`` the normalized value (LayerNorm: ``(x − x̄)/σ``, RMSNorm: ``x/rms(x)``) and a
linear layer ``L(z) = W z + b`` (``W`` of shape ``(out, in)``)::

    L(γ ⊙ n + β) = (W · diag(γ)) n + (W β + b)   ⇒   W' = W · diag(γ),   b' = b + W β

For a layer that stores its weight transposed (GPT-2's Conv1D, traced as ``addmm(b, x, W)``
with ``W`` of shape ``(in, out)``) the same holds with ``W' = diag(γ) · W``, ``b' = b + βᵀ W``.
The norm is then affine-free (``weight = bias = None``, ``elementwise_affine=False``): the
step SliceGPT/QuaRot-style pipelines need before rotating or quantizing the stream.

Preconditions, each checked and reported when it fails: the norm normalizes the last dim only and
its γ/β are stored tensors; **every** user of its output is a linear layer reading it as its input
— directly or through ``view``/``reshape`` ops that keep the last dim (GPT-2 flattens tokens before
``addmm``) — so several consumers (q/k/v projections) are fine but a residual add, an attention
matmul or a model output is not; the consumers' weights and biases are stored and read by that
layer only (tied or shared weights would change the other readers). A layer without a bias gets
one when β ≠ None.

Numerics: folded tensors are computed in float64 and cast back to the layer's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.fx import GraphModule, Node

from normrewrite.analysis.norms.ops import binary, is_noop_cast, op_name
from normrewrite.core.graph import (
    erase_unused,
    get_tensor,
    node_dtype,
    node_shape,
    users,
)
from normrewrite.core.ops import (
    DenseInfo,
    NormInfo,
    dense_info,
    linear_info,
    norm_info,
    set_arg,
    set_bias,
)
from normrewrite.core.pass_infra import Change, PassContext, Skip, compute_tensors
from normrewrite.core.rewrite import Rewrite, RewritePass
from normrewrite.core.usage import TensorUsage

aten = torch.ops.aten

# --------------------------------------------------------------------------- tensor math


def fold_affine(
    weight: Tensor,
    bias: Tensor | None,
    gamma: Tensor | None,
    beta: Tensor | None,
    *,
    out_dim: int = 0,
) -> tuple[Tensor, Tensor | None]:
    """(W', b') of ``z ↦ W(γ⊙z + β) + b``; ``out_dim`` is the weight dim of the outputs
    (0 for a Linear ``(out, in)``, 1 for a Conv1D ``(in, out)``). ``b'`` is None only when
    neither ``bias`` nor ``beta`` is given."""
    dt = torch.float64 if weight.device.type in ("cpu", "meta", "cuda") else torch.float32
    w = weight.to(dt)
    new_w = w
    if gamma is not None:
        g = gamma.to(dt)
        new_w = w * (g[None, :] if out_dim == 0 else g[:, None])
    new_b = None if bias is None else bias.to(dt)
    if beta is not None:
        shift = w @ beta.to(dt) if out_dim == 0 else beta.to(dt) @ w
        new_b = shift if new_b is None else new_b + shift
    return new_w.to(weight.dtype), None if new_b is None else new_b.to(weight.dtype)


# --------------------------------------------------------------------------- matcher

_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, torch.reshape}
_VIEW_METHODS = {"view", "reshape"}


def keeps_last_dim(node: Node) -> bool:
    """A view/reshape whose input and output end in the same (known) dim."""
    if not (
        (node.op == "call_function" and node.target in _VIEWS)
        or (node.op == "call_method" and node.target in _VIEW_METHODS)
    ):
        return False
    src = node.args[0] if node.args else None
    a, b = node_shape(src), node_shape(node)
    return bool(a) and bool(b) and a[-1] == b[-1]  # type: ignore[index]


def dense_consumers(gm: GraphModule, value: Node) -> tuple[list[DenseInfo], str | None]:
    """The linear layers reading ``value`` as their input (through last-dim-keeping views), or
    the reason some user is not one."""
    found: list[DenseInfo] = []
    us = users(value)
    if not us:
        return [], "its output is not used"
    for u in us:
        if u.op == "output":
            return [], "its output is a model output"
        if keeps_last_dim(u) and u.args[0] is value:
            inner, why = dense_consumers(gm, u)
            if why is not None:
                return [], why
            found += inner
            continue
        d = dense_info(gm, u)
        if d is None:
            what = u.target if u.op != "call_function" else getattr(u.target, "__name__", u.target)
            return [], f"its output also feeds {u.name} ({what}), which is not a linear layer"
        if d.input is not value:
            return [], f"its output is a weight operand of {d.label}, not its input"
        found.append(d)
    return found, None


@dataclass(frozen=True)
class AffineFold:
    norm: NormInfo
    layers: tuple[DenseInfo, ...]

    @property
    def label(self) -> str:
        return self.norm.label

    def preview(self) -> str:
        return f"γ/β foldable into {', '.join(d.label for d in self.layers)}"

    def describe(self) -> str:
        what = (
            "γ and β"
            if self.norm.bias is not None and self.norm.weight is not None
            else ("γ" if self.norm.weight is not None else "β")
        )
        return f"folded {what} into {', '.join(d.label for d in self.layers)}"


def _gamma_after_cast(out: Node) -> str | None:
    """Why a γ multiplied after the norm's down-cast is not folded (None: no such γ).

    fuse-norm leaves γ outside the fused op when the model rounds the normalized value to a
    narrower dtype first (HF Llama: ``γ * x.to(bfloat16)``). Folding γ into the next layers'
    weights would round ``W·diag(γ)`` instead of ``γ ⊙ x``: not exact, so it is refused."""
    us = users(out)
    if len(us) != 1 or op_name(us[0]) != "cast" or is_noop_cast(us[0]):
        return None
    cast = us[0]
    after = users(cast)
    if len(after) != 1 or op_name(after[0]) != "mul":
        return None
    other = [a for a in binary(after[0]) if a is not cast]
    if len(other) != 1 or not (isinstance(other[0], Node) and other[0].op == "get_attr"):
        return None
    return (
        f"γ multiplies the norm's output after its cast to {str(node_dtype(cast)).removeprefix('torch.')}; folding it "
        f"into the next layers would round W·γ instead of γ·x (not exact)"
    )


def match(gm: GraphModule, node: Node, usage: TensorUsage) -> AffineFold | Skip | None:
    info = norm_info(gm, node)
    if info is None or info.kind not in ("layernorm", "rmsnorm"):
        return None
    if not info.has_weight and not info.has_bias:
        late = _gamma_after_cast(info.node)
        if late is not None:  # bf16/fp16 Llama after fuse-norm: γ · cast(rms_norm(x))
            return Skip(info.label, late)
        return None  # affine-free already
    label = info.label
    if (info.has_weight and info.weight is None) or (info.has_bias and info.bias is None):
        return Skip(label, "γ/β are computed in the graph, not stored")
    if not info.normalized_shape or len(info.normalized_shape) != 1:
        return Skip(label, f"normalizes {info.normalized_shape}, not the last dim only")
    features = info.normalized_shape[0]
    layers, why = dense_consumers(gm, info.node)
    if why is not None:
        return Skip(label, why)
    seen: set[str] = set()
    for d in layers:
        if d.weight is None or (d.has_bias and d.bias is None):
            return Skip(label, f"the weights of {d.label} are computed in the graph, not stored")
        w = get_tensor(gm, d.weight)
        in_features = w.shape[1 - d.out_dim] if w.dim() == 2 else None
        if in_features != features:
            return Skip(label, f"{d.label} reads {in_features} features, the norm has {features}")
        if not (usage.exclusive(d.weight) and usage.exclusive(d.bias)) or d.weight in seen:
            return Skip(label, f"the weights of {d.label} are shared (tied or read elsewhere)")
        seen.add(d.weight)
    return AffineFold(info, tuple(layers))


# --------------------------------------------------------------------------- rewrite


def fold_into_layers(
    gm: GraphModule,
    ctx: PassContext,
    layers: tuple[DenseInfo, ...],
    gamma: str | None,
    beta: str | None,
    origin: str,
) -> None:
    """Fold stored γ/β (FQNs, either may be None) into every layer (reads the tensors first)."""
    for d in layers:
        assert d.weight is not None
        bias = d.bias
        if bias is None and beta is not None:
            lin = linear_info(gm, d.node)
            assert lin is not None  # addmm always has a bias
            w = get_tensor(gm, d.weight)
            bias = set_bias(gm, lin, w.new_zeros(w.shape[d.out_dim]))
        inputs = [d.weight, *(n for n in (bias, gamma, beta) if n is not None)]
        has = (bias is not None, gamma is not None, beta is not None)
        out_dim = d.out_dim

        def fn(
            w: Tensor, *rest: Tensor, has: tuple[bool, bool, bool] = has, out_dim: int = out_dim
        ) -> tuple[Tensor, ...]:
            it = iter(rest)
            b, g, be = (next(it) if h else None for h in has)
            nw, nb = fold_affine(w, b, g, be, out_dim=out_dim)
            return (nw,) if nb is None else (nw, nb)

        outputs = [d.weight] + ([bias] if bias is not None else [])
        compute_tensors(gm, ctx, outputs, inputs, fn, origin=origin)


def drop_affine(gm: GraphModule, info: NormInfo) -> None:
    """Make the norm affine-free: γ = β = None."""
    node = info.op_node or info.node
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        mod.register_parameter("weight", None)
        if hasattr(mod, "bias"):
            mod.register_parameter("bias", None)
        if hasattr(mod, "elementwise_affine"):
            mod.elementwise_affine = False
        return
    getters = [a for a in node.all_input_nodes if a.op == "get_attr"]
    set_arg(node, "weight", None)
    if info.kind == "layernorm":
        set_arg(node, "bias", None)
    erase_unused(gm, getters)


def apply(gm: GraphModule, m: AffineFold, ctx: PassContext) -> None:
    fold_into_layers(gm, ctx, m.layers, m.norm.weight, m.norm.bias, "fold-norm-affine")
    drop_affine(gm, m.norm)


# --------------------------------------------------------------------------- pass


class _FoldAffine(Rewrite[AffineFold]):
    refused = "γ/β not foldable"

    def __init__(self, gm: GraphModule, ctx: PassContext) -> None:
        super().__init__(gm, ctx)
        self.usage = TensorUsage.of(gm)

    def match(self, candidate: Node) -> AffineFold | Skip | None:
        return match(self.gm, candidate, self.usage)

    def apply(self, found: AffineFold) -> Change:
        change = Change(found.label, found.describe())
        logged = len(self.ctx.recipes)
        apply(self.gm, found, self.ctx)
        touched = {n for r in self.ctx.recipes[logged:] for n in (*r.outputs, *r.inputs)}
        touched |= {n for n in (found.norm.weight, found.norm.bias) if n is not None}
        self.usage.refresh(self.gm, touched)
        return change


class FoldNormAffine(RewritePass):
    name = "fold-norm-affine"
    summary = "fold LayerNorm/RMSNorm γ/β into the linear layers that read the norm (exact)"
    exact = True

    def rewriter(self, gm: GraphModule, ctx: PassContext) -> _FoldAffine:
        return _FoldAffine(gm, ctx)


__all__ = [
    "AffineFold",
    "FoldNormAffine",
    "dense_consumers",
    "drop_affine",
    "fold_affine",
    "fold_into_layers",
    "match",
]
