"""fold-bn: fold BatchNorm running statistics into the neighbouring conv/linear weights.

Identity. In eval mode a BatchNorm is a per-channel affine map::

    BN(x) = s * x + t,    s = γ / sqrt(σ² + ε),    t = β - μ * s     (γ = 1, β = 0 if affine=False)

*Output side* — BN after a layer ``L(x) = W ⊛ x + b`` that is linear in ``x``::

    BN(L(x))_c = s_c (W ⊛ x)_c + (s_c b_c + t_c)   ⇒   W'_c = s_c W_c,   b' = s b + t

where ``c`` is the layer's output channel: dim 0 of a Conv/Linear weight ``(C_out, C_in/g, k…)``;
for a ConvTranspose, whose weight is ``(C_in, C_out/g, k…)``, output channel ``c = g·(C_out/g) + j``
lives in ``W[g·C_in/g : (g+1)·C_in/g, j]`` — the grouped layout folders commonly get wrong.
A missing conv bias is created (``b = 0``); an existing one is rescaled.

*Input side* — BN before a layer: ``L(s x + t) = (W · diag(s)) ⊛ x + (W ⊛ t + b)``. The second term
is a constant per output channel only when every output sees a full kernel of ``t``: true for
Linear (also after ``flatten(1)`` of a BN2d output, each channel repeated H·W times) and for
unpadded Conv (zero padding would mix 0 with ``t`` at the borders; reflect/replicate/circular
padding pads with BN'd values and stays exact, whether the conv pads itself or torch.export wrote
it as a separate ``pad`` node before an unpadded conv). Transposed convs are never input-folded.

Preconditions, each checked and reported when it fails: BN in eval mode with running statistics;
the layer's weight and bias are stored tensors read by this layer only (a conv module called at two
sites or a tied weight is skipped, or cloned with ``shared=clone``); exactly one user between the
two; the BN channel axis (dim 1) is the layer's channel axis (``Linear`` on ``(N, L, F)`` followed
by ``BatchNorm1d(L)`` normalizes ``L``, not ``F``). BN → ReLU → Conv is not adjacent and never
matches.

Numerics: the folded tensors are computed in float64 and cast back to the weight dtype, so fp16/bf16
models fold without overflow (an fp16 ``running_var`` above 65504 would be ``inf``).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from torch.fx import GraphModule, Node

from normrewrite.core.graph import (
    TensorUsage,
    add_parameter,
    erase_unused,
    get_tensor,
    node_shape,
)
from normrewrite.core.ops import (
    ConvInfo,
    LinearInfo,
    NormInfo,
    batchnorm_info,
    conv_info,
    flatten_start_end,
    linear_info,
    pad_info,
    set_arg,
    set_bias,
)
from normrewrite.core.pass_infra import (
    Change,
    Pass,
    PassContext,
    PassResult,
    Skip,
    TensorRecipe,
    compute_tensors,
    rewrite_each,
)

# --------------------------------------------------------------------------- tensor math


def _work_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.device.type in ("cpu", "meta", "cuda") else torch.float32


def bn_affine(
    mean: Tensor, var: Tensor, gamma: Tensor | None, beta: Tensor | None, eps: float
) -> tuple[Tensor, Tensor]:
    """(s, t) with BN(x) = s·x + t per channel, in float64."""
    dt = _work_dtype(mean)
    mean, var = mean.to(dt), var.to(dt)
    scale = torch.rsqrt(var + eps)
    if gamma is not None:
        scale = scale * gamma.to(dt)
    shift = -mean * scale
    if beta is not None:
        shift = shift + beta.to(dt)
    return scale, shift


def fold_output(
    weight: Tensor, bias: Tensor | None, scale: Tensor, shift: Tensor, *, transposed: bool, groups: int
) -> tuple[Tensor, Tensor]:
    """Fold ``y ↦ scale·y + shift`` on the output channels of a conv/linear layer."""
    dt = scale.dtype
    w = weight.to(dt)
    extra = (1,) * (w.dim() - 2)
    if transposed:
        c_in, c_out_g = w.shape[0], w.shape[1]
        wg = w.reshape(groups, c_in // groups, c_out_g, *w.shape[2:])
        wg = wg * scale.reshape(groups, 1, c_out_g, *extra)
        w = wg.reshape(w.shape)
    else:
        w = w * scale.reshape(-1, 1, *extra)
    b = shift if bias is None else bias.to(dt) * scale + shift
    return w.to(weight.dtype), b.to(weight.dtype)


def fold_input(
    weight: Tensor, bias: Tensor | None, scale: Tensor, shift: Tensor, *, groups: int, repeat: int = 1
) -> tuple[Tensor, Tensor]:
    """Fold ``x ↦ scale·x + shift`` on the input channels of a (non-transposed) conv/linear layer.

    ``repeat`` is the number of consecutive input features per channel (H·W after a flatten)."""
    dt = scale.dtype
    if repeat > 1:
        scale, shift = scale.repeat_interleave(repeat), shift.repeat_interleave(repeat)
    w = weight.to(dt)
    c_out, c_in_g = w.shape[0], w.shape[1]
    extra = (1,) * (w.dim() - 2)
    s = scale.reshape(groups, 1, c_in_g).expand(groups, c_out // groups, c_in_g).reshape(c_out, c_in_g)
    t = shift.reshape(groups, 1, c_in_g).expand(groups, c_out // groups, c_in_g).reshape(c_out, c_in_g)
    new_w = w * s.reshape(c_out, c_in_g, *extra)
    const = (w * t.reshape(c_out, c_in_g, *extra)).flatten(1).sum(1)
    b = const if bias is None else bias.to(dt) + const
    return new_w.to(weight.dtype), b.to(weight.dtype)


# --------------------------------------------------------------------------- matcher

Layer = ConvInfo | LinearInfo


@dataclass(frozen=True)
class FoldMatch:
    bn: NormInfo
    layer: Layer
    side: Literal["output", "input"]
    repeat: int = 1  # input side through flatten: features per channel
    clone: bool = False  # the layer's weights are shared: fold into a private copy

    def describe(self) -> str:
        where = "after" if self.side == "output" else "before"
        extra = " (weights cloned: they were shared)" if self.clone else ""
        return f"folded into {self.layer.label} (BN {where} it){extra}"


@dataclass(frozen=True)
class NoMatch:
    bn_label: str
    reason: str


def _layer(gm: GraphModule, node: object) -> Layer | None:
    if not isinstance(node, Node):
        return None
    return conv_info(gm, node) or linear_info(gm, node)


def _layer_kind(layer: Layer) -> str:
    if isinstance(layer, LinearInfo):
        return "Linear"
    return f"{'ConvTranspose' if layer.transposed else 'Conv'}{layer.ndim}d"


def _weights_problem(layer: Layer, usage: TensorUsage, shared: str) -> tuple[str | None, bool]:
    """(reason the layer's weights cannot be rewritten, or None; whether to clone them)."""
    if layer.weight is None:
        return f"the weight of {layer.label} is computed in the graph (e.g. a parametrization), not stored", False
    if layer.has_bias and layer.bias is None:
        return f"the bias of {layer.label} is computed in the graph, not stored", False
    if usage.exclusive(layer.weight) and usage.exclusive(layer.bias):
        return None, False
    if shared == "clone":
        return None, True
    n = max(usage.count(layer.weight), len(usage.aliases.get(layer.weight, ())))
    if layer.node.op == "call_module":
        why = f"module {layer.label} is called at {n} sites"
    else:
        why = f"the weights of {layer.label} are shared ({n} readers or tied names)"
    return f"{why}; folding would change the other users (fold-bn:shared=clone folds into a copy)", False


def match(gm: GraphModule, node: Node, usage: TensorUsage, shared: str = "skip") -> FoldMatch | NoMatch | None:
    """Decide what to do with ``node`` if it is a BatchNorm; None for other nodes."""
    bn = batchnorm_info(gm, node)
    if bn is None:
        return None
    label = bn.label
    if not bn.tracks_stats:
        return NoMatch(label, "track_running_stats=False: it normalizes with batch statistics, nothing to fold")
    if bn.training:
        return NoMatch(label, "BatchNorm is in training mode (batch statistics); call model.eval() before folding")
    if bn.running_mean is None or bn.running_var is None:
        return NoMatch(label, "running statistics are computed in the graph, not stored")
    if (bn.has_weight and bn.weight is None) or (bn.has_bias and bn.bias is None):
        return NoMatch(label, "γ/β are computed in the graph, not stored")
    channels = bn.num_features
    reasons: list[str] = []

    # output side: layer → BN
    layer = _layer(gm, bn.input)
    if layer is not None:
        problem = _output_problem(layer, bn, channels)
        if problem is None:
            problem, clone = _weights_problem(layer, usage, shared)
            if problem is None:
                return FoldMatch(bn, layer, "output", clone=clone)
        reasons.append(problem)

    # input side: BN → layer, or BN → flatten → Linear
    users = list(bn.node.users)
    if len(users) == 1:
        consumer, repeat, problem = _input_consumer(gm, bn, users[0])
        if consumer is not None and problem is None:
            problem, clone = _weights_problem(consumer, usage, shared)
            if problem is None:
                return FoldMatch(bn, consumer, "input", repeat=repeat, clone=clone)
        if problem is not None:
            reasons.append(problem)
    elif layer is None:
        reasons.append(f"no conv/linear feeds it and its output has {len(users)} users")
    if not reasons:
        producer = bn.input.name if isinstance(bn.input, Node) else "an input"
        reasons.append(f"no conv/linear directly before or after it (input comes from {producer})")
    return NoMatch(label, "; ".join(reasons))


def _output_problem(layer: Layer, bn: NormInfo, channels: int | None) -> str | None:
    kind = _layer_kind(layer)
    n_users = len(layer.node.users)
    if n_users != 1:
        return f"the output of {kind} {layer.label} has {n_users} users: folding would change the others"
    shape = node_shape(layer.node)
    if shape is None:
        return f"the output shape of {layer.label} is unknown"
    if isinstance(layer, LinearInfo) and len(shape) != 2:
        return (
            f"Linear {layer.label} outputs {tuple(shape)}: the BN normalizes dim 1, "
            "not the Linear's output features (last dim)"
        )
    if isinstance(layer, ConvInfo) and len(shape) != layer.ndim + 2:
        return f"{kind} {layer.label} is applied to an unbatched input"
    if channels is not None and shape[1] != channels:
        return f"channel count mismatch ({shape[1]} vs {channels})"
    return None


def _input_consumer(gm: GraphModule, bn: NormInfo, user: Node) -> tuple[Layer | None, int, str | None]:
    shape = node_shape(bn.node)
    repeat = 1
    target = user
    flat = flatten_start_end(gm, user)
    if flat is not None:
        _, start, end = flat
        rank = len(shape) if shape else 0
        if start != 1 or end not in (-1, rank - 1) or rank < 2:
            return None, 1, "it is followed by a flatten that does not keep the batch dim alone"
        if len(user.users) != 1:
            return None, 1, "the flatten after it has several users"
        repeat = math.prod(shape[2:]) if shape else 1
        target = next(iter(user.users))
    pad = pad_info(gm, user) if flat is None else None
    if pad is not None:  # torch.export spells a reflect/replicate/circular conv as pad → conv
        rank = len(shape) if shape else 0
        if not pad.commutes_with_channel_affine() or pad.dims > rank - 2:
            return None, 1, f"it is followed by a {pad.mode} pad, which does not commute with the BN shift"
        if len(user.users) != 1:
            return None, 1, "the pad after it has several users"
        target = next(iter(user.users))
    layer = _layer(gm, target)
    if layer is None:
        return None, 1, None
    via = user if flat is not None or pad is not None else bn.node
    if layer.input is not via:
        return None, 1, f"it feeds {layer.label} as a parameter, not as its input"
    if pad is not None and (not isinstance(layer, ConvInfo) or layer.transposed):
        return None, 1, f"a pad between BN and {_layer_kind(layer)} {layer.label}"
    if isinstance(layer, LinearInfo):
        if flat is None and (shape is None or len(shape) != 2):
            return None, 1, (
                f"BN output {tuple(shape) if shape else '?'} feeds Linear {layer.label}: its channels "
                "(dim 1) are not the Linear's input features"
            )
        return layer, repeat, None
    if flat is not None:
        return None, 1, "a flatten between BN and a conv"
    if layer.transposed:
        return None, 1, f"BN before ConvTranspose {layer.label}: the shift does not fold exactly"
    if not layer.zero_padding() and layer.padding_mode == "zeros":
        return None, 1, (
            f"BN before zero-padded conv {layer.label}: not exact (the padding would be 0 "
            "instead of the BN shift)"
        )
    return layer, 1, None


# --------------------------------------------------------------------------- rewrite


def _clone_weights(gm: GraphModule, layer: Layer, ctx: PassContext) -> Layer:
    """Give ``layer`` private copies of its weight and bias; returns the refreshed record."""
    node = layer.node
    if node.op == "call_module":
        target = str(node.target)
        new_target, i = f"{target}_folded", 1
        while _has_submodule(gm, new_target):
            new_target, i = f"{target}_folded{i}", i + 1
        gm.add_submodule(new_target, copy.deepcopy(gm.get_submodule(target)))
        node.target = new_target
        names = [n for n in (layer.weight, layer.bias) if n is not None]
        copies = [new_target + n[len(target):] for n in names]
        ctx.recipes.append(TensorRecipe(tuple(copies), tuple(names), _copy, "fold-bn"))
    else:
        for arg in ("weight", "bias"):
            fqn = getattr(layer, arg)
            if fqn is None:
                continue
            owner, _, name = fqn.rpartition(".")
            new_fqn = add_parameter(gm, owner, f"{name}_folded", get_tensor(gm, fqn))
            compute_tensors(gm, ctx, [new_fqn], [fqn], _copy, origin="fold-bn")
            with gm.graph.inserting_before(node):
                getter = gm.graph.get_attr(new_fqn)
            set_arg(node, arg, getter)
    refreshed = _layer(gm, node)
    assert refreshed is not None
    return refreshed


def _copy(*tensors: Tensor) -> tuple[Tensor, ...]:
    return tuple(t.clone() for t in tensors)


def _has_submodule(gm: GraphModule, path: str) -> bool:
    try:
        gm.get_submodule(path)
    except AttributeError:
        return False
    return True


def apply(gm: GraphModule, m: FoldMatch, ctx: PassContext) -> None:
    bn, layer = m.bn, m.layer
    if m.clone:
        layer = _clone_weights(gm, layer, ctx)
    assert layer.weight is not None and bn.running_mean and bn.running_var
    groups = layer.groups if isinstance(layer, ConvInfo) else 1
    transposed = isinstance(layer, ConvInfo) and layer.transposed
    eps, side, repeat = bn.eps or 0.0, m.side, m.repeat
    has_gamma, has_beta, has_bias = bn.weight is not None, bn.bias is not None, layer.bias is not None
    inputs = [layer.weight, bn.running_mean, bn.running_var]
    inputs += [name for name in (bn.weight, bn.bias, layer.bias) if name is not None]

    def fold(weight: Tensor, mean: Tensor, var: Tensor, *rest: Tensor) -> tuple[Tensor, Tensor]:
        it = iter(rest)
        gamma = next(it) if has_gamma else None
        beta = next(it) if has_beta else None
        bias = next(it) if has_bias else None
        scale, shift = bn_affine(mean, var, gamma, beta, eps)
        if side == "output":
            return fold_output(weight, bias, scale, shift, transposed=transposed, groups=groups)
        return fold_input(weight, bias, scale, shift, groups=groups, repeat=repeat)

    bias_name = layer.bias
    if bias_name is None:  # give the layer a bias slot; the recipe fills it
        w = get_tensor(gm, layer.weight)
        c_out = w.shape[1] * groups if transposed else w.shape[0]
        bias_name = set_bias(gm, layer, w.new_zeros(c_out))
    compute_tensors(gm, ctx, [layer.weight, bias_name], inputs, fold, origin="fold-bn")
    bn.node.replace_all_uses_with(bn.input)
    doomed = [bn.node, *([bn.op_node] if bn.op_node is not None else [])]
    # the BN's step counter is read by a use-less get_attr in export graphs: drop it too
    counter = bn.running_mean.rpartition(".")[0] + ".num_batches_tracked"
    doomed += [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == counter and not n.users]
    erase_unused(gm, doomed, finalize=False)  # Pass.ensures lints and recompiles once


# --------------------------------------------------------------------------- pass


@dataclass(frozen=True)
class FoldBatchNormOptions:
    shared: Literal["skip", "clone"] = "skip"
    """What to do when the layer's weights are shared: skip the fold, or fold into a copy."""


class FoldBatchNorm(Pass):
    name = "fold-bn"
    summary = "fold eval-mode BatchNorm into the adjacent conv/linear weights (exact)"
    exact = True
    Options = FoldBatchNormOptions

    def call(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        usage = [TensorUsage.of(gm)]

        def find(node: Node) -> FoldMatch | Skip | None:
            found = match(gm, node, usage[0], self.options.shared)
            return Skip(found.bn_label, found.reason) if isinstance(found, NoMatch) else found

        def fold(found: FoldMatch) -> Change:
            change = Change(found.bn.label, found.describe())
            apply(gm, found, ctx)
            usage[0] = TensorUsage.of(gm)  # the fold added/removed tensors
            return change

        return rewrite_each(gm, find, fold)

    def explain(self, gm: GraphModule, ctx: PassContext) -> dict[str, str]:
        usage = TensorUsage.of(gm)
        out: dict[str, str] = {}
        for node in gm.graph.nodes:
            found = match(gm, node, usage, self.options.shared)
            if isinstance(found, FoldMatch):
                out[node.name] = f"foldable into {found.layer.label} ({found.side} side)"
            elif isinstance(found, NoMatch):
                out[node.name] = f"not foldable: {found.reason}"
        return out


__all__ = ["FoldBatchNorm", "FoldMatch", "NoMatch", "bn_affine", "fold_input", "fold_output", "match"]
