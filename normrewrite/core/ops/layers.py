"""Layers with stored weights, and the ops passes must see through around them.

:class:`ConvInfo` (a (transposed) 1d/2d/3d convolution), :class:`LinearInfo` (``y = x·Wᵀ + b``
with a Linear's ``(out, in)`` weight), :class:`DenseInfo` (the same, or GPT-2's Conv1D ``addmm``
with its ``(in, out)`` weight), :class:`PadInfo` (how torch.export spells a conv's
reflect/replicate/circular padding) and flatten, each read from every form a graph spells them in.
:func:`set_bias` rebinds the one thing passes add to such a layer: a missing bias.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node

from normrewrite.core.graph import add_parameter, constant_fqn, node_label
from normrewrite.core.ops.args import (
    arg_fqn,
    call_args,
    called_module,
    module_fqn,
    per_dim,
    set_arg,
)

aten = torch.ops.aten

# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class ConvInfo:
    node: Node
    input: Node
    weight: str | None  # FQN, or None when computed in the graph
    bias: str | None
    has_bias: bool  # bias present (stored or computed)
    transposed: bool
    ndim: int  # spatial dims: 1, 2 or 3
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    groups: int
    padding_mode: str  # "zeros" unless a module says otherwise

    @property
    def label(self) -> str:
        return node_label(self.node)

    def zero_padding(self) -> bool:
        if isinstance(self.padding, str):
            return self.padding == "valid"
        return all(p == 0 for p in self.padding)


@dataclass(frozen=True)
class LinearInfo:
    node: Node
    input: Node
    weight: str | None
    bias: str | None
    has_bias: bool

    @property
    def label(self) -> str:
        return node_label(self.node)


# --------------------------------------------------------------------------- conv

_ATEN_CONV = {
    aten.conv1d.default: (1, False),
    aten.conv2d.default: (2, False),
    aten.conv3d.default: (3, False),
    aten.conv1d.padding: (1, False),
    aten.conv2d.padding: (2, False),
    aten.conv3d.padding: (3, False),
    aten.conv_transpose1d.default: (1, True),
    aten.conv_transpose2d.input: (2, True),
    aten.conv_transpose3d.input: (3, True),
}
_F_CONV = {
    F.conv1d: (1, False),
    F.conv2d: (2, False),
    F.conv3d: (3, False),
    F.conv_transpose1d: (1, True),
    F.conv_transpose2d: (2, True),
    F.conv_transpose3d: (3, True),
    torch.conv1d: (1, False),
    torch.conv2d: (2, False),
    torch.conv3d: (3, False),
    torch.conv_transpose1d: (1, True),
    torch.conv_transpose2d: (2, True),
    torch.conv_transpose3d: (3, True),
}


def conv_info(gm: GraphModule, node: Node) -> ConvInfo | None:
    """Describe ``node`` if it is a (transposed) 1d/2d/3d convolution."""
    mod = called_module(gm, node)
    if mod is not None:
        if not isinstance(mod, nn.modules.conv._ConvNd) or not node.args:
            return None
        w, _ = module_fqn(node, mod, "weight")
        b, has_b = module_fqn(node, mod, "bias")
        n = len(mod.kernel_size)
        return ConvInfo(
            node,
            node.args[0],
            w,
            b,
            has_b,
            mod.transposed,
            n,
            per_dim(mod.stride, n),
            mod.padding if isinstance(mod.padding, str) else per_dim(mod.padding, n),
            per_dim(mod.dilation, n),
            mod.groups,
            mod.padding_mode,
        )
    if node.op != "call_function":
        return None
    if node.target is aten.convolution.default:
        kw = call_args(gm, node)
        n = len(kw["stride"])
        transposed = bool(kw["transposed"])
    elif node.target in _ATEN_CONV or node.target in _F_CONV:
        n, transposed = _ATEN_CONV.get(node.target) or _F_CONV[node.target]
        kw = call_args(gm, node)
    else:
        return None
    w, _ = arg_fqn(kw.get("weight"))
    b, has_b = arg_fqn(kw.get("bias"))
    padding = kw.get("padding", 0)
    return ConvInfo(
        node,
        kw["input"],
        w,
        b,
        has_b,
        transposed,
        n,
        per_dim(kw.get("stride", 1), n),
        padding if isinstance(padding, str) else per_dim(padding, n),
        per_dim(kw.get("dilation", 1), n),
        int(kw.get("groups", 1)),
        "zeros",
    )


# --------------------------------------------------------------------------- linear

_LINEAR_FUNCS = {aten.linear.default, F.linear}


def linear_info(gm: GraphModule, node: Node) -> LinearInfo | None:
    mod = called_module(gm, node)
    if mod is not None:
        if not isinstance(mod, nn.Linear) or not node.args:
            return None
        w, _ = module_fqn(node, mod, "weight")
        b, has_b = module_fqn(node, mod, "bias")
        return LinearInfo(node, node.args[0], w, b, has_b)
    if node.op == "call_function" and node.target in _LINEAR_FUNCS:
        kw = call_args(gm, node)
        w, _ = arg_fqn(kw.get("weight"))
        b, has_b = arg_fqn(kw.get("bias"))
        return LinearInfo(node, kw["input"], w, b, has_b)
    return None


def set_bias(gm: GraphModule, info: ConvInfo | LinearInfo, value: torch.Tensor) -> str:
    """Give a bias-less conv/linear node a stored bias; returns its FQN."""
    if info.has_bias:
        raise ValueError(f"{info.label} already has a bias")
    if info.node.op == "call_module":
        mod = gm.get_submodule(str(info.node.target))
        mod.bias = nn.Parameter(value.detach(), requires_grad=value.is_floating_point())
        return f"{info.node.target}.bias"
    owner = (info.weight or "").rpartition(".")[0]
    fqn = add_parameter(gm, owner, "bias", value)
    with gm.graph.inserting_before(info.node):
        getter = gm.graph.get_attr(fqn)
    getter.meta["val"] = value
    set_arg(info.node, "bias", getter)
    return fqn


# --------------------------------------------------------------------------- flatten

_FLATTEN_FUNCS = {aten.flatten.using_ints, torch.flatten}


def flatten_start_end(gm: GraphModule, node: Node) -> tuple[Node, int, int] | None:
    """(input, start_dim, end_dim) if ``node`` is a flatten in any form."""
    if node.op == "call_function" and node.target in _FLATTEN_FUNCS:
        kw = call_args(gm, node)
        return kw["input"], int(kw.get("start_dim", 0)), int(kw.get("end_dim", -1))
    if node.op == "call_method" and node.target == "flatten":
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        return node.args[0], int(start), int(end)
    mod = called_module(gm, node)
    if isinstance(mod, nn.Flatten):
        return node.args[0], mod.start_dim, mod.end_dim
    return None


# --------------------------------------------------------------------------- pad

_PAD_FUNCS = {aten.pad.default, F.pad}


@dataclass(frozen=True)
class PadInfo:
    node: Node
    input: Node
    pad: tuple[int, ...]  # F.pad order: last dim first, (before, after) per dim
    mode: str  # "constant" | "reflect" | "replicate" | "circular"
    value: float | None

    @property
    def dims(self) -> int:
        """How many trailing dims are padded."""
        return len(self.pad) // 2

    def commutes_with_channel_affine(self) -> bool:
        """pad(s·x + t) = s·pad(x) + t per channel: true for modes that copy input values."""
        return self.mode in ("reflect", "replicate", "circular")


def pad_info(gm: GraphModule, node: Node) -> PadInfo | None:
    """Describe ``node`` if it is ``F.pad`` / ``aten.pad`` (how torch.export spells a conv's
    reflect/replicate/circular padding)."""
    if node.op != "call_function" or node.target not in _PAD_FUNCS:
        return None
    kw = call_args(gm, node)
    if "input" not in kw or "pad" not in kw:
        return None
    value = kw.get("value")
    return PadInfo(
        node,
        kw["input"],
        tuple(int(p) for p in kw["pad"]),
        str(kw.get("mode") or "constant"),
        None if value is None else float(value),
    )


# --------------------------------------------------------------------------- dense (linear-like)


@dataclass(frozen=True)
class DenseInfo:
    """A layer ``y = x·Wᵀ + b`` over the last dim however it is spelled: a Linear (weight
    ``(out, in)``, ``out_dim = 0``) or GPT-2's Conv1D, traced as ``addmm(b, x2d, W)`` with the
    weight stored ``(in, out)`` (``out_dim = 1``). Kept apart from :class:`LinearInfo` so passes
    that assume the Linear layout never see the transposed one."""

    node: Node
    input: Node
    weight: str | None
    bias: str | None
    has_bias: bool
    out_dim: int  # the weight dim that indexes output features

    @property
    def label(self) -> str:
        return node_label(self.node)


def dense_info(gm: GraphModule, node: Node) -> DenseInfo | None:
    """Describe ``node`` if it is a Linear in any form, or an ``addmm`` with a stored weight."""
    lin = linear_info(gm, node)
    if lin is not None:
        return DenseInfo(lin.node, lin.input, lin.weight, lin.bias, lin.has_bias, 0)
    if node.op == "call_function" and node.target in (aten.addmm.default, torch.addmm):
        kw = call_args(gm, node)
        if kw.get("beta", 1) != 1 or kw.get("alpha", 1) != 1:
            return None
        weight = constant_fqn(kw.get("mat2"))
        if weight is None:  # a matmul of two activations is not a layer
            return None
        b, has_b = arg_fqn(kw.get("input"))
        return DenseInfo(node, kw["mat1"], weight, b, has_b, 1)
    return None


_MATMUL_FUNCS = {aten.matmul.default, torch.matmul, operator.matmul}
_TRANSPOSE_2D = {aten.t.default, aten.numpy_T.default, aten.mT.default, torch.t}


def _transposed_weight(node: object) -> str | None:
    """The FQN of a stored 2-D weight ``W`` if ``node`` is ``W.T`` read only here (``t``,
    ``numpy_T``, ``transpose(0, 1)``, ``permute(1, 0)`` or the ``.T`` attribute)."""
    if not isinstance(node, Node) or len(node.users) != 1 or not node.args:
        return None
    w = node.args[0]
    fqn = constant_fqn(w)
    val = w.meta.get("val") if isinstance(w, Node) else None
    if fqn is None or (val is not None and val.dim() != 2):
        return None
    if node.op == "call_function" and node.target in _TRANSPOSE_2D:
        return fqn
    if node.op == "call_function" and node.target in (aten.transpose.int, torch.transpose):
        return fqn if {int(d) % 2 for d in node.args[1:3]} == {0, 1} else None
    if node.op == "call_function" and node.target is aten.permute.default:
        return fqn if list(node.args[1]) in ([1, 0], [-1, -2]) else None
    if node.op == "call_function" and node.target is getattr:
        return fqn if node.args[1] in ("T", "mT") else None
    if node.op == "call_method" and node.target in ("t", "transpose"):
        return fqn if node.target == "t" or {int(d) % 2 for d in node.args[1:3]} == {0, 1} else None
    return None


def matmul_linear_info(node: Node) -> DenseInfo | None:
    """``x @ W.T`` with a stored ``(out, in)`` weight (Falcon's bias-free ``FalconLinear``): a
    bias-free linear layer. Kept apart from :func:`dense_info`, which promises passes a node they
    can give a bias."""
    if node.op != "call_function" or node.target not in _MATMUL_FUNCS or len(node.args) != 2:
        return None
    x, wt = node.args
    weight = _transposed_weight(wt)
    if weight is None or not isinstance(x, Node):
        return None
    return DenseInfo(node, x, weight, None, False, 0)
