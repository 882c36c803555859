"""Normalization ops as one record, :class:`NormInfo`, whatever their kind and spelling.

Kinds are :data:`NORM_KINDS`. Each is read from a ``call_module`` of its ``nn`` layer, from
``F.<kind>`` and from the ATen ops torch.export produces (``aten.batch_norm``,
``aten._native_batch_norm_legit_no_training`` with its ``getitem``, ``aten.layer_norm``, …).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node

from normrewrite.core.graph import node_label, node_shape
from normrewrite.core.ops.args import arg_fqn, call_args, called_module, module_fqn

aten = torch.ops.aten

NORM_KINDS = ("batchnorm", "layernorm", "rmsnorm", "groupnorm", "instancenorm")


@dataclass(frozen=True)
class NormInfo:
    """Any normalization op. Fields that do not apply to a kind are ``None``."""

    node: Node  # the node producing the normalized tensor
    input: Node
    kind: str  # one of NORM_KINDS
    weight: str | None
    bias: str | None
    has_weight: bool
    has_bias: bool
    eps: float | None
    # batchnorm / instancenorm
    running_mean: str | None = None
    running_var: str | None = None
    tracks_stats: bool = False  # running statistics present
    training: bool = False  # uses batch statistics (and, for BN, updates running ones)
    # layernorm / rmsnorm
    normalized_shape: tuple[int, ...] | None = None
    # groupnorm
    num_groups: int | None = None
    # the node(s) the op itself is (for tuple-returning ATen ops: the op, then the getitem)
    op_node: Node | None = None

    @property
    def label(self) -> str:
        return node_label(self.op_node or self.node)

    @property
    def num_features(self) -> int | None:
        shape = node_shape(self.node)
        if self.kind in ("batchnorm", "groupnorm", "instancenorm"):
            return shape[1] if shape and len(shape) > 1 else None
        if self.normalized_shape:
            n = 1
            for d in self.normalized_shape:
                n *= d
            return n
        return None


_ATEN_BN = {aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default}


def norm_info(gm: GraphModule, node: Node) -> NormInfo | None:
    """Describe ``node`` if it is a normalization layer of any supported kind and form."""
    mod = called_module(gm, node)
    if mod is not None:
        return _module_norm(node, mod)
    if node.op != "call_function":
        return None
    t = node.target
    if t in _ATEN_BN or t is F.batch_norm:
        kw = call_args(gm, node)
        out = node
        if t is aten._native_batch_norm_legit_no_training.default:
            out = _tuple_output(node)
            if out is None:
                return None
            kw.setdefault("training", False)
        w, has_w = arg_fqn(kw.get("weight"))
        b, has_b = arg_fqn(kw.get("bias"))
        rm, has_rm = arg_fqn(kw.get("running_mean"))
        rv, _ = arg_fqn(kw.get("running_var"))
        return NormInfo(
            out,
            kw["input"],
            "batchnorm",
            w,
            b,
            has_w,
            has_b,
            float(kw["eps"]),
            running_mean=rm,
            running_var=rv,
            tracks_stats=has_rm,
            training=bool(kw.get("training", False)) or not has_rm,
            op_node=node,
        )
    if t in (aten.layer_norm.default, F.layer_norm):
        kw = call_args(gm, node)
        w, has_w = arg_fqn(kw.get("weight"))
        b, has_b = arg_fqn(kw.get("bias"))
        return NormInfo(
            node,
            kw["input"],
            "layernorm",
            w,
            b,
            has_w,
            has_b,
            float(kw.get("eps", 1e-5)),
            normalized_shape=tuple(int(d) for d in kw["normalized_shape"]),
        )
    if t in (aten.rms_norm.default, getattr(F, "rms_norm", None)):
        kw = call_args(gm, node)
        w, has_w = arg_fqn(kw.get("weight"))
        eps = kw.get("eps")
        return NormInfo(
            node,
            kw["input"],
            "rmsnorm",
            w,
            None,
            has_w,
            False,
            None if eps is None else float(eps),
            normalized_shape=tuple(int(d) for d in kw["normalized_shape"]),
        )
    if t in (aten.group_norm.default, F.group_norm):
        kw = call_args(gm, node)
        w, has_w = arg_fqn(kw.get("weight"))
        b, has_b = arg_fqn(kw.get("bias"))
        return NormInfo(
            node,
            kw["input"],
            "groupnorm",
            w,
            b,
            has_w,
            has_b,
            float(kw.get("eps", 1e-5)),
            num_groups=int(kw["num_groups"]),
        )
    if t in (aten.instance_norm.default, F.instance_norm):
        kw = call_args(gm, node)
        w, has_w = arg_fqn(kw.get("weight"))
        b, has_b = arg_fqn(kw.get("bias"))
        rm, has_rm = arg_fqn(kw.get("running_mean"))
        rv, _ = arg_fqn(kw.get("running_var"))
        use_input_stats = bool(kw.get("use_input_stats", True))
        return NormInfo(
            node,
            kw["input"],
            "instancenorm",
            w,
            b,
            has_w,
            has_b,
            float(kw.get("eps", 1e-5)),
            running_mean=rm,
            running_var=rv,
            tracks_stats=has_rm,
            training=use_input_stats,
        )
    return None


def _tuple_output(node: Node) -> Node | None:
    """For an op returning a tuple, the getitem(…, 0) node, if the other outputs are unused."""
    first = None
    for u in node.users:
        if u.op != "call_function" or u.target is not operator.getitem:
            return None
        if u.args[1] == 0:
            first = u
        elif u.users:
            return None
    return first


def _module_norm(node: Node, mod: nn.Module) -> NormInfo | None:
    if not node.args:
        return None
    x = node.args[0]
    w, has_w = module_fqn(node, mod, "weight")
    b, has_b = module_fqn(node, mod, "bias")
    if isinstance(mod, nn.modules.batchnorm._BatchNorm):
        tracks = mod.running_mean is not None
        rm = f"{node.target}.running_mean" if tracks else None
        rv = f"{node.target}.running_var" if tracks else None
        return NormInfo(
            node,
            x,
            "batchnorm",
            w,
            b,
            has_w,
            has_b,
            float(mod.eps),
            running_mean=rm,
            running_var=rv,
            tracks_stats=tracks,
            training=mod.training or not tracks,
        )
    if isinstance(mod, nn.modules.instancenorm._InstanceNorm):
        tracks = mod.running_mean is not None
        return NormInfo(
            node,
            x,
            "instancenorm",
            w,
            b,
            has_w,
            has_b,
            float(mod.eps),
            running_mean=f"{node.target}.running_mean" if tracks else None,
            running_var=f"{node.target}.running_var" if tracks else None,
            tracks_stats=tracks,
            training=mod.training or not tracks,
        )
    if isinstance(mod, nn.LayerNorm):
        return NormInfo(
            node,
            x,
            "layernorm",
            w,
            b,
            has_w,
            has_b,
            float(mod.eps),
            normalized_shape=tuple(mod.normalized_shape),
        )
    if isinstance(mod, nn.RMSNorm):
        return NormInfo(
            node,
            x,
            "rmsnorm",
            w,
            None,
            has_w,
            False,
            None if mod.eps is None else float(mod.eps),
            normalized_shape=tuple(mod.normalized_shape),
        )
    if isinstance(mod, nn.GroupNorm):
        return NormInfo(
            node, x, "groupnorm", w, b, has_w, has_b, float(mod.eps), num_groups=mod.num_groups
        )
    return None


def batchnorm_info(gm: GraphModule, node: Node) -> NormInfo | None:
    """:func:`norm_info`, for BatchNorms only."""
    info = norm_info(gm, node)
    return info if info is not None and info.kind == "batchnorm" else None


def norms(gm: GraphModule) -> list[NormInfo]:
    """Every normalization op in the graph, in execution order."""
    out = []
    for n in gm.graph.nodes:
        info = norm_info(gm, n)
        if info is not None:
            out.append(info)
    return out
