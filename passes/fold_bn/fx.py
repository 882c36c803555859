"""fold-bn on torch.fx graphs (both flavours): the matcher and the graph surgery.

:func:`match` reads a BatchNorm node's neighbourhood into a :class:`FoldMatch` (or a
:class:`~normrewrite.core.pass_infra.Skip` whose reason comes from :mod:`.conditions`);
:func:`apply` rewrites the layer's stored tensors with :mod:`.math` (logged as a tensor recipe,
so a ``meta`` trace can be replayed on real weights) and removes the BN.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from torch import Tensor
from torch.fx import GraphModule, Node

from normrewrite.core.graph import add_parameter, erase_unused, get_tensor, node_shape
from normrewrite.core.ops import (
    ConvInfo,
    LinearInfo,
    NormInfo,
    batchnorm_info,
    conv_info,
    linear_info,
    pad_info,
    set_arg,
    set_bias,
    shape_only_use,
)
from normrewrite.core.ops.layout import ChannelAxis
from normrewrite.core.pass_infra import PassContext, Skip, TensorRecipe, compute_tensors
from normrewrite.core.usage import TensorUsage

from . import conditions
from .fx_layout import LayoutOp, carry, chain_after, chain_before
from .math import Side, bn_affine, fold_input, fold_output

Layer = ConvInfo | LinearInfo


@dataclass(frozen=True)
class FoldMatch:
    """Fold ``bn`` into ``layer`` on ``side`` (the layer's output or input channels)."""

    bn: NormInfo
    layer: Layer
    side: Side
    repeat: int = 1  # input side through flatten: features per channel
    clone: bool = False  # the layer's weights are shared: fold into a private copy

    @property
    def label(self) -> str:
        return self.bn.label

    def describe(self) -> str:
        where = "after" if self.side is Side.OUTPUT else "before"
        extra = " (weights cloned: they were shared)" if self.clone else ""
        return f"folded into {self.layer.label} (BN {where} it){extra}"

    def preview(self) -> str:
        return f"foldable into {self.layer.label} ({self.side} side)"


# --------------------------------------------------------------------------- matcher


def _layer(gm: GraphModule, node: object) -> Layer | None:
    if not isinstance(node, Node):
        return None
    return conv_info(gm, node) or linear_info(gm, node)


def _layer_kind(layer: Layer) -> str:
    if isinstance(layer, LinearInfo):
        return "Linear"
    return f"{'ConvTranspose' if layer.transposed else 'Conv'}{layer.ndim}d"


def _named(layer: Layer) -> str:
    return f"{_layer_kind(layer)} {layer.label}"


def _weights_problem(layer: Layer, usage: TensorUsage, shared: str) -> tuple[str | None, bool]:
    """(reason the layer's weights cannot be rewritten, or None; whether to clone them)."""
    if layer.weight is None:
        return (
            f"the weight of {layer.label} is computed in the graph (e.g. a parametrization), not stored",
            False,
        )
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
    return conditions.shared_weights(why, clone=True), False


def _bn_problem(gm: GraphModule, bn: NormInfo) -> str | None:
    why = conditions.uses_batch_statistics(
        tracks_running_stats=bn.tracks_stats, training=bn.training
    ) or conditions.statistics_not_stored(
        statistics=bn.running_mean is not None and bn.running_var is not None,
        affine=not ((bn.has_weight and bn.weight is None) or (bn.has_bias and bn.bias is None)),
    )
    if why is not None:
        return why
    assert bn.running_mean is not None and bn.running_var is not None  # stored: checked above

    def get(fqn: str | None) -> Tensor | None:
        return None if fqn is None else get_tensor(gm, fqn)

    mean, var = get_tensor(gm, bn.running_mean), get_tensor(gm, bn.running_var)
    return conditions.bad_statistics(mean, var, get(bn.weight), get(bn.bias))


def match(
    gm: GraphModule, node: Node, usage: TensorUsage, shared: str = "skip"
) -> FoldMatch | Skip | None:
    """Decide what to do with ``node`` if it is a BatchNorm; None for other nodes."""
    bn = batchnorm_info(gm, node)
    if bn is None:
        return None
    why = _bn_problem(gm, bn)
    if why is not None:
        return Skip(bn.label, why)
    reasons: list[str] = []

    # output side: layer → [layout ops] → BN
    producer, before = chain_before(gm, bn.input)
    layer = _layer(gm, producer)
    if layer is not None:
        problem = _output_problem(layer, bn.num_features, before)
        if problem is None:
            problem, clone = _weights_problem(layer, usage, shared)
            if problem is None:
                return FoldMatch(bn, layer, Side.OUTPUT, clone=clone)
        reasons.append(problem)

    # input side: BN → [layout ops] → layer, or BN → pad → conv
    users, after = chain_after(gm, bn.node)
    if len(users) == 1:
        consumer, repeat, problem = _input_consumer(gm, bn, users[0], after)
        if consumer is not None and problem is None:
            problem, clone = _weights_problem(consumer, usage, shared)
            if problem is None:
                return FoldMatch(bn, consumer, Side.INPUT, repeat=repeat, clone=clone)
        if problem is not None:
            reasons.append(problem)
    elif layer is None:
        last = after[-1].describe() if after else "its output"
        reasons.append(f"no conv/linear feeds it and {last} has {len(users)} users")
    if not reasons:
        name = producer.name if isinstance(producer, Node) else "an input"
        reasons.append(
            f"no conv/linear directly before or after it (input comes from {name}"
            f"{_through(before)}; output goes to {_reader(users, after)})"
        )
    return Skip(bn.label, "; ".join(reasons))


def _through(ops: list[LayoutOp]) -> str:
    return f" through {', '.join(op.node.name for op in ops)}" if ops else ""


def _reader(users: list[Node], after: list[LayoutOp]) -> str:
    """Who reads the BN's output (past the layout ops ``after``), for a refusal."""
    names = [
        "the model output"
        if u.op == "output"
        else f"{u.name} ({getattr(u.target, '__name__', u.target)})"
        for u in users
    ]
    return (", ".join(names) or "nothing") + _through(after)


def _value_users(node: Node) -> int:
    """Users that read the values of ``node``; shape reads (``x.shape``, ``x.size()``,
    ``aten.sym_size``, the template of ``y.reshape_as(x)``) do not count."""
    return sum(not shape_only_use(u, node) for u in node.users)


def _output_problem(layer: Layer, channels: int | None, ops: list[LayoutOp]) -> str | None:
    """Why ``layer → ops → BN`` does not fold on the layer's output channels, or None."""
    why = conditions.layer_output_shared(_named(layer), _value_users(layer.node))
    for op in ops:
        why = why or conditions.layer_output_shared(op.describe(), _value_users(op.node))
    if why is not None:
        return why
    shape = node_shape(layer.node)
    if shape is None:
        return f"the output shape of {layer.label} is unknown"
    if isinstance(layer, LinearInfo):
        if not ops:
            return conditions.output_features_not_channels(
                _named(layer), shape
            ) or conditions.channel_mismatch(shape[-1], channels)
        start = ChannelAxis(len(shape) - 1, shape[-1])
    else:
        if len(shape) != layer.ndim + 2:
            return f"{_named(layer)} is applied to an unbatched input"
        start = ChannelAxis(1, shape[1])
    ch, mixer = carry(start, ops)
    if mixer is not None:
        return conditions.channel_mixed_by(mixer.describe(), _named(layer))
    assert ch is not None  # carry returns an axis when no op mixes it
    if ops and (ch.axis != 1 or ch.repeat != 1):
        return conditions.channel_moved_by(ops[-1].describe(), _named(layer), ch.axis, "BN")
    return conditions.channel_mismatch(ch.size, channels)


def _input_consumer(
    gm: GraphModule, bn: NormInfo, user: Node, ops: list[LayoutOp]
) -> tuple[Layer | None, int, str | None]:
    """(the layer reading the BN's output as its input, features per channel, or the reason not)."""
    shape = node_shape(bn.node)
    rank = len(shape) if shape else 0
    target = user
    pad = pad_info(gm, user) if not ops else None
    if pad is not None:  # torch.export spells a reflect/replicate/circular conv as pad → conv
        if not pad.commutes_with_channel_affine() or pad.dims > rank - 2:
            return (
                None,
                1,
                f"it is followed by a {pad.mode} pad, which does not commute with the BN shift",
            )
        if len(user.users) != 1:
            return None, 1, "the pad after it has several users"
        target = next(iter(user.users))
    layer = _layer(gm, target)
    if layer is None:
        return None, 1, None
    via = user if pad is not None else ops[-1].node if ops else bn.node
    if layer.input is not via:
        return None, 1, f"it feeds {layer.label} as a parameter, not as its input"
    if pad is not None and (not isinstance(layer, ConvInfo) or layer.transposed):
        return None, 1, f"a pad between BN and {_named(layer)}"
    if not shape or rank < 2:
        return None, 1, f"the output shape of {bn.label} is unknown"
    ch, mixer = carry(ChannelAxis(1, shape[1]), ops)
    if mixer is not None:
        return None, 1, conditions.channel_mixed_by(mixer.describe(), "the BN")
    assert ch is not None  # carry returns an axis when no op mixes it
    in_shape = node_shape(layer.input) or ()
    if isinstance(layer, LinearInfo):
        if ch.axis == len(in_shape) - 1:
            return layer, ch.repeat, None
        if not ops:
            return None, 1, conditions.input_features_not_channels(_named(layer), shape)
        where = "its input features (last dim)"
        return None, 1, conditions.channel_moved_by(ops[-1].describe(), "the BN", ch.axis, where)
    if ops and (ch.axis != 1 or ch.repeat != 1):
        where = f"the input channels of {_named(layer)} (dim 1)"
        return None, 1, conditions.channel_moved_by(ops[-1].describe(), "the BN", ch.axis, where)
    if layer.transposed:
        return None, 1, conditions.transposed_after(f"ConvTranspose {layer.label}")
    zero_padded = not layer.zero_padding() and layer.padding_mode == "zeros"
    why = conditions.zero_padded_after(f"conv {layer.label}", zero_padding=zero_padded)
    return (None, 1, why) if why else (layer, 1, None)


# --------------------------------------------------------------------------- rewrite


def _copy(*tensors: Tensor) -> tuple[Tensor, ...]:
    return tuple(t.clone() for t in tensors)


def _has_submodule(gm: GraphModule, path: str) -> bool:
    try:
        gm.get_submodule(path)
    except AttributeError:
        return False
    return True


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
        copies = [new_target + n[len(target) :] for n in names]
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
    assert refreshed is not None  # the same node, with new weight names
    return refreshed


def apply(gm: GraphModule, m: FoldMatch, ctx: PassContext) -> None:
    """Rewrite the layer's weight and bias (a missing bias is created) and remove the BN."""
    bn, layer = m.bn, m.layer
    if m.clone:
        layer = _clone_weights(gm, layer, ctx)
    assert layer.weight is not None and bn.running_mean and bn.running_var  # checked by match
    groups = layer.groups if isinstance(layer, ConvInfo) else 1
    transposed = isinstance(layer, ConvInfo) and layer.transposed
    eps, side, repeat = bn.eps or 0.0, m.side, m.repeat
    has_gamma, has_beta, has_bias = (
        bn.weight is not None,
        bn.bias is not None,
        layer.bias is not None,
    )
    inputs = [layer.weight, bn.running_mean, bn.running_var]
    inputs += [name for name in (bn.weight, bn.bias, layer.bias) if name is not None]

    def fold(weight: Tensor, mean: Tensor, var: Tensor, *rest: Tensor) -> tuple[Tensor, Tensor]:
        it = iter(rest)
        gamma = next(it) if has_gamma else None
        beta = next(it) if has_beta else None
        bias = next(it) if has_bias else None
        scale, shift = bn_affine(mean, var, gamma, beta, eps)
        if side is Side.OUTPUT:
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
    doomed += [
        n for n in gm.graph.nodes if n.op == "get_attr" and n.target == counter and not n.users
    ]
    erase_unused(gm, doomed)


__all__ = ["FoldMatch", "apply", "match"]
