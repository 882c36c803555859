"""apply-weight-norm: re-parameterise conv/linear weights as ``g · v / ‖v‖`` for training.

Identity (Salimans & Kingma, "Weight Normalization", NeurIPS 2016). For a stored weight ``W``
set ``v = W`` and ``g = ‖W‖`` per output channel (the 2-norm over every other dim, kept as
size-1 dims); then ``g · v / ‖v‖ = W`` exactly, so the model is unchanged at conversion. The
graph computes the weight from two new trainable parameters ``<layer>.weight_g`` and
``<layer>.weight_v`` as ``mul(v, div(g, linalg_vector_norm(v, 2, dims, keepdim=True)))`` — the
form torch.export decomposes ``torch.nn.utils.parametrizations.weight_norm`` into, so it exports
to ONNX as plain ops and ``remove-weight-norm`` undoes it. The output channel is dim 0 of a
Conv/Linear weight and dim 1 of an ungrouped ConvTranspose weight ``(C_in, C_out, k…)``.

``mean_only_bn=true`` also replaces each eval-mode BatchNorm directly after such a layer by
mean-only BatchNorm (the paper's §3: subtract the mean, do not divide by the standard deviation,
keep β). At conversion it is exact too: with ``r = γ / √(σ² + ε)`` per channel,
``BN(Wx + b) = r·(Wx + b) − r·μ + β``, so ``g ← r·g``, ``b ← r·b`` and the mean-only BN subtracts
``μ' = r·μ`` (stored as its running mean) and adds β. Negative γ gives a negative g, which weight
normalization allows. The mean-only BN is emitted in eval form (``y − μ' + β``): fine-tuning
changes the model's training dynamics by design (that part is the paper's architecture, not an
identity), but the outputs at conversion are identical, so the pass is labelled exact and
verified as such.

Preconditions, each reported when it fails: the weight (and bias) are stored tensors read by this
layer only; no output channel of W is all zeros (``g · v / ‖v‖`` is undefined there); grouped
ConvTranspose is not supported (its output channels are not one weight dim); in symbolic_trace
graphs the layer must be an ``nn.Linear`` or a zero-padded ``nn.ConvNd`` / ``nn.ConvTransposeNd`` (it
becomes an ``F.*`` call taking the computed weight).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.fx import GraphModule, Node

from normrewrite.core.graph import (
    Flavour,
    erase_unused,
    flavour,
    get_tensor,
    has_tensor,
    node_shape,
    replace_with_holder,
)
from normrewrite.core.ops import (
    ConvInfo,
    LinearInfo,
    NormInfo,
    batchnorm_info,
    call_args,
    conv_info,
    emit_op,
    linear_info,
    set_arg,
)
from normrewrite.core.pass_infra import Change, PassContext, PassResult, Skip, compute_tensors
from normrewrite.core.rewrite import Rewrite, RewritePass, Sweep, rewrite_each
from normrewrite.core.usage import TensorUsage

from .fold_bn import bn_affine

Layer = ConvInfo | LinearInfo

# --------------------------------------------------------------------------- tensor math


def norm_dims(ndim: int, out_dim: int) -> tuple[int, ...]:
    return tuple(d for d in range(ndim) if d != out_dim)


def split_weight(w: Tensor, out_dim: int, scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(g, v) with ``g · v / ‖v‖ = scale · W`` per output channel (``scale`` along ``out_dim``)."""
    w64 = w.double()
    g = torch.linalg.vector_norm(w64, 2, dim=norm_dims(w.dim(), out_dim), keepdim=True)
    if scale is not None:
        shape = [1] * w.dim()
        shape[out_dim] = -1
        g = g * scale.double().reshape(shape)
    return g.to(w.dtype), w.clone()


# --------------------------------------------------------------------------- matcher


@dataclass(frozen=True)
class WNMatch:
    layer: Layer
    out_dim: int
    bn: NormInfo | None = None  # the BN to make mean-only

    @property
    def label(self) -> str:
        return self.layer.label

    def preview(self) -> str:
        return self.describe()

    def describe(self) -> str:
        extra = f"; {self.bn.label} made mean-only" if self.bn is not None else ""
        return f"weight = g·v/‖v‖ over dim {self.out_dim}{extra}"


def _layer(gm: GraphModule, node: Node) -> Layer | None:
    return conv_info(gm, node) or linear_info(gm, node)


def match(
    gm: GraphModule, node: Node, usage: TensorUsage, mean_only_bn: bool
) -> WNMatch | Skip | None:
    layer = _layer(gm, node)
    if layer is None:
        return None
    label = layer.label
    if layer.weight is None:
        return Skip(
            label, "the weight is computed in the graph (already re-parameterised?), not stored"
        )
    if layer.has_bias and layer.bias is None:
        return Skip(label, "the bias is computed in the graph, not stored")
    for fqn in (layer.weight, layer.bias):
        if not usage.exclusive(fqn):
            return Skip(label, f"{fqn} is shared ({usage.count(fqn)} readers or tied names)")
    out_dim = 0
    if isinstance(layer, ConvInfo) and layer.transposed:
        if layer.groups != 1:
            return Skip(label, "grouped ConvTranspose: its output channels are not one weight dim")
        out_dim = 1
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        if isinstance(layer, ConvInfo) and mod.padding_mode != "zeros":
            return Skip(
                label,
                f"{mod.padding_mode} padding: in symbolic_trace graphs only zero-padded "
                "convs are rewritten (trace with torch.export for the others)",
            )
    w = get_tensor(gm, layer.weight)
    if w.device.type != "meta" and bool(
        (torch.linalg.vector_norm(w, dim=norm_dims(w.dim(), out_dim)) == 0).any()
    ):
        return Skip(
            label, "an output channel of the weight is all zeros: g·v/‖v‖ is undefined there"
        )
    bn = _mean_only_bn(gm, layer, usage) if mean_only_bn else None
    return WNMatch(layer, out_dim, bn)


def _mean_only_bn(gm: GraphModule, layer: Layer, usage: TensorUsage) -> NormInfo | None:
    users = list(layer.node.users)
    if len(users) != 1:
        return None
    bn = batchnorm_info(gm, users[0])
    if bn is None or bn.input is not layer.node or bn.training or not bn.tracks_stats:
        return None
    if bn.running_mean is None or bn.running_var is None:
        return None
    if (bn.has_weight and bn.weight is None) or (bn.has_bias and bn.bias is None):
        return None
    if not all(usage.exclusive(f) for f in (bn.weight, bn.bias, bn.running_mean, bn.running_var)):
        return None
    shape = node_shape(layer.node)
    if shape is None or (isinstance(layer, LinearInfo) and len(shape) != 2):
        return None  # a Linear on (N, L, F) feeds BN's dim 1 = L, not its output features
    return bn


# --------------------------------------------------------------------------- rewrite


def _free(gm: GraphModule, owner: str, name: str) -> str:
    fqn = f"{owner}.{name}" if owner else name
    base, i = fqn, 1
    while has_tensor(gm, fqn):
        fqn, i = f"{base}_{i}", i + 1
    return fqn


def apply(gm: GraphModule, m: WNMatch, ctx: PassContext) -> None:
    layer, bn, out_dim = m.layer, m.bn, m.out_dim
    assert layer.weight is not None
    aten_form = flavour(gm) is Flavour.ATEN
    owner = layer.weight.rpartition(".")[0]
    g_fqn, v_fqn = _free(gm, owner, "weight_g"), _free(gm, owner, "weight_v")
    outputs, inputs = [g_fqn, v_fqn], [layer.weight]
    if bn is None:
        compute_tensors(
            gm, ctx, outputs, inputs, lambda w: split_weight(w, out_dim), origin="apply-weight-norm"
        )
    else:
        assert bn.running_mean is not None and bn.running_var is not None
        has_b, has_gamma, eps = layer.bias is not None, bn.weight is not None, bn.eps or 0.0
        outputs += [bn.running_mean] + ([layer.bias] if has_b else [])
        inputs += [bn.running_mean, bn.running_var] + [
            n for n in (bn.weight, layer.bias) if n is not None
        ]

        def fold(w: Tensor, mean: Tensor, var: Tensor, *rest: Tensor) -> tuple[Tensor, ...]:
            it = iter(rest)
            gamma = next(it) if has_gamma else None
            bias = next(it) if has_b else None
            r, _ = bn_affine(mean, var, gamma, None, eps)
            g, v = split_weight(w, out_dim, r)
            new_mean = (mean.double() * r).to(mean.dtype)
            if bias is None:
                return g, v, new_mean
            return g, v, new_mean, (bias.double() * r).to(bias.dtype)

        compute_tensors(gm, ctx, outputs, inputs, fold, origin="apply-weight-norm")

    node, g = layer.node, gm.graph
    ndim = get_tensor(gm, v_fqn).dim()
    with g.inserting_before(node):
        v_node = g.get_attr(v_fqn)
        norm = emit_op(
            gm, "vector_norm", v_node, 2, list(norm_dims(ndim, out_dim)), True, aten_form=aten_form
        )
        w_node = emit_op(
            gm,
            "mul",
            v_node,
            emit_op(gm, "div", g.get_attr(g_fqn), norm, aten_form=aten_form),
            aten_form=aten_form,
        )
        if node.op == "call_module":
            new = _functional(gm, node, layer, w_node)
            node.replace_all_uses_with(new)
            new.meta.update(node.meta)
    doomed: list[Node] = []
    if node.op == "call_module":
        doomed.append(node)
        path = str(node.target)
    else:
        old = call_args(gm, node)["weight"]
        set_arg(node, "weight", w_node)
        doomed.append(old)
        path = ""
    if bn is not None:
        _mean_only(gm, bn, aten_form)
        doomed += [bn.node] + ([bn.op_node] if bn.op_node is not None else [])
        counter = bn.running_mean.rpartition(".")[0] + ".num_batches_tracked"
        doomed += [n for n in g.nodes if n.op == "get_attr" and n.target == counter and not n.users]
    erase_unused(gm, doomed)
    for p in (path, str(bn.node.target) if bn is not None and bn.node.op == "call_module" else ""):
        if p:
            replace_with_holder(gm, p)


def _functional(gm: GraphModule, node: Node, layer: Layer, weight: Node) -> Node:
    """The call_module Linear/Conv as an F.* call with the computed weight."""
    g = gm.graph
    bias = g.get_attr(layer.bias) if layer.bias is not None else None
    x = node.args[0]  # not layer.input: an earlier rewrite may have replaced that node
    if isinstance(layer, LinearInfo):
        return g.call_function(F.linear, (x, weight, bias))
    if layer.transposed:
        mod = gm.get_submodule(str(node.target))
        fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[layer.ndim]
        args = (
            layer.stride,
            layer.padding,
            tuple(mod.output_padding),
            layer.groups,
            layer.dilation,
        )
        return g.call_function(fn, (x, weight, bias, *args))
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[layer.ndim]
    return g.call_function(
        fn, (x, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    )


def _mean_only(gm: GraphModule, bn: NormInfo, aten_form: bool) -> None:
    """Replace ``bn`` by ``y − running_mean + β`` (per channel, dim 1)."""
    g = gm.graph
    shape = node_shape(bn.node) or ()
    chan = [-1] + [1] * max(len(shape) - 2, 0)
    with g.inserting_before(bn.op_node or bn.node):
        x = (bn.op_node or bn.node).args[0]  # the layer's node may have been replaced
        out = emit_op(
            gm,
            "sub",
            x,
            emit_op(gm, "reshape", g.get_attr(bn.running_mean), chan, aten_form=aten_form),
            aten_form=aten_form,
        )
        if bn.bias is not None:
            out = emit_op(
                gm,
                "add",
                out,
                emit_op(gm, "reshape", g.get_attr(bn.bias), chan, aten_form=aten_form),
                aten_form=aten_form,
            )
    for key in ("val", "tensor_meta"):
        if key in bn.node.meta:
            out.meta[key] = bn.node.meta[key]
    bn.node.replace_all_uses_with(out)


# --------------------------------------------------------------------------- pass


@dataclass(frozen=True)
class ApplyWeightNormOptions:
    mean_only_bn: bool = False
    """Also make each eval BatchNorm right after a re-parameterised layer mean-only."""


class _Reparameterise(Rewrite[WNMatch]):
    refused = "not re-parameterised"

    def __init__(self, gm: GraphModule, ctx: PassContext, mean_only_bn: bool) -> None:
        super().__init__(gm, ctx)
        self.mean_only_bn = mean_only_bn
        self.usage = TensorUsage.of(gm)
        self.made_mean_only = False

    def match(self, candidate: Node) -> WNMatch | Skip | None:
        return match(self.gm, candidate, self.usage, self.mean_only_bn)

    def apply(self, found: WNMatch) -> Change:
        apply(self.gm, found, self.ctx)
        self.made_mean_only |= found.bn is not None
        return Change(found.label, found.describe())


class ApplyWeightNorm(RewritePass):
    name = "apply-weight-norm"
    summary = (
        "re-parameterise conv/linear weights as trainable g·v/‖v‖ (exact at conversion; "
        "mean_only_bn=true: mean-only BatchNorm after them)"
    )
    exact = True
    Options = ApplyWeightNormOptions
    sweep = Sweep.MATCH_ALL_FIRST  # every layer is judged on the original graph

    def rewriter(self, gm: GraphModule, ctx: PassContext) -> _Reparameterise:
        return _Reparameterise(gm, ctx, self.options.mean_only_bn)

    def call(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        rewrite = self.rewriter(gm, ctx)
        result = rewrite_each(rewrite, self.sweep)
        if rewrite.made_mean_only:
            result.notes.append(
                "mean-only BatchNorm is emitted in eval form (running mean); outputs are unchanged"
            )
        return result


__all__ = [
    "ApplyWeightNorm",
    "ApplyWeightNormOptions",
    "WNMatch",
    "match",
    "norm_dims",
    "split_weight",
]
