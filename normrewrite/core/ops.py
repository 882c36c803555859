"""Op semantics, independent of how a graph spells them.

A convolution can reach a pass as ``call_module`` of an ``nn.Conv2d`` (symbolic_trace), as
``call_function`` of ``torch.nn.functional.conv2d`` (symbolic_trace of functional code) or as
``aten.conv2d`` / ``aten.convolution`` (torch.export). Passes match on the small frozen records
returned here — :class:`ConvInfo`, :class:`LinearInfo`, :class:`NormInfo` — and never on the
class names of the models they were tested on. Each record also knows how to rebind the one thing
passes change in place: a missing bias.

Stored tensors are named by FQN (see :mod:`normrewrite.core.graph`). A parameter computed inside the
graph (e.g. a weight-norm parametrization that was traced through) has FQN ``None``: passes that
change weights must leave such a layer alone and say so.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node

from normrewrite.core.graph import add_parameter, constant_fqn, node_label, node_shape

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


# --------------------------------------------------------------------------- helpers


def _arg(node: Node, gm: GraphModule, name: str, default: Any = None) -> Any:
    kwargs = _normalized(node, gm)
    return kwargs.get(name, default)


def _normalized(node: Node, gm: GraphModule) -> dict[str, Any]:
    try:
        pair = node.normalized_arguments(gm, normalize_to_only_use_kwargs=True)
    except Exception:
        pair = None
    kwargs = dict(pair.kwargs) if pair is not None else {}
    if pair is None:
        # fall back to the op's schema for overloads fx cannot normalise
        schema = getattr(node.target, "_schema", None)
        if schema is not None:
            for a, v in zip(schema.arguments, node.args, strict=False):
                kwargs[a.name] = v
            kwargs.update(node.kwargs)
        elif node.op == "call_function":
            # torch builtins with overloads that differ only in types (F.conv2d's padding:
            # list or str) are "ambiguous" to fx; their parameter names agree, so take the first
            from torch.fx.operator_schemas import get_signature_for_torch_op

            for sig in get_signature_for_torch_op(node.target) or ():
                try:
                    kwargs = dict(sig.bind(*node.args, **node.kwargs).arguments)
                    break
                except TypeError:
                    continue
    return kwargs


def set_arg(node: Node, name: str, value: Any) -> None:
    """Set argument ``name`` of a call_function node, positional if it is passed positionally."""
    names = _param_names(node.target)
    if name in node.kwargs or names is None or name not in names:
        node.update_kwarg(name, value)
        return
    idx = names.index(name)
    if idx < len(node.args):
        node.update_arg(idx, value)
    elif idx == len(node.args):
        node.args = (*node.args, value)
    else:
        node.update_kwarg(name, value)


def _param_names(target: Any) -> list[str] | None:
    schema = getattr(target, "_schema", None)
    if schema is not None:
        return [a.name for a in schema.arguments]
    import inspect

    try:
        return list(inspect.signature(target).parameters)
    except (TypeError, ValueError):
        return None


def _tup(v: Any, n: int) -> tuple[int, ...]:
    if isinstance(v, int):
        return (v,) * n
    v = tuple(int(x) for x in v)
    return v * n if len(v) == 1 and n > 1 else v


def _fqn_of(arg: Any) -> tuple[str | None, bool]:
    """(FQN, present) for a tensor argument of a call_function node."""
    if arg is None:
        return None, False
    return constant_fqn(arg), True


def called_module(gm: GraphModule, node: Node) -> nn.Module | None:
    """The submodule a ``call_module`` node calls, else None."""
    if node.op != "call_module":
        return None
    try:
        return gm.get_submodule(str(node.target))
    except AttributeError:
        return None


def _module_fqn(node: Node, mod: nn.Module, attr: str) -> tuple[str | None, bool]:
    t = getattr(mod, attr, None)
    if t is None:
        return None, False
    # parametrized modules compute the weight on access: not a stored tensor
    if nn.utils.parametrize.is_parametrized(mod, attr):
        return None, True
    if attr in mod._parameters or attr in mod._buffers:
        return f"{node.target}.{attr}", True
    return None, True


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
        w, _ = _module_fqn(node, mod, "weight")
        b, has_b = _module_fqn(node, mod, "bias")
        n = len(mod.kernel_size)
        return ConvInfo(
            node, node.args[0], w, b, has_b, mod.transposed, n, _tup(mod.stride, n),
            mod.padding if isinstance(mod.padding, str) else _tup(mod.padding, n),
            _tup(mod.dilation, n), mod.groups, mod.padding_mode,
        )
    if node.op != "call_function":
        return None
    if node.target is aten.convolution.default:
        kw = _normalized(node, gm)
        n = len(kw["stride"])
        transposed = bool(kw["transposed"])
    elif node.target in _ATEN_CONV or node.target in _F_CONV:
        n, transposed = _ATEN_CONV.get(node.target) or _F_CONV[node.target]
        kw = _normalized(node, gm)
    else:
        return None
    w, _ = _fqn_of(kw.get("weight"))
    b, has_b = _fqn_of(kw.get("bias"))
    padding = kw.get("padding", 0)
    return ConvInfo(
        node, kw["input"], w, b, has_b, transposed, n, _tup(kw.get("stride", 1), n),
        padding if isinstance(padding, str) else _tup(padding, n),
        _tup(kw.get("dilation", 1), n), int(kw.get("groups", 1)), "zeros",
    )


# --------------------------------------------------------------------------- linear

_LINEAR_FUNCS = {aten.linear.default, F.linear}


def linear_info(gm: GraphModule, node: Node) -> LinearInfo | None:
    mod = called_module(gm, node)
    if mod is not None:
        if not isinstance(mod, nn.Linear) or not node.args:
            return None
        w, _ = _module_fqn(node, mod, "weight")
        b, has_b = _module_fqn(node, mod, "bias")
        return LinearInfo(node, node.args[0], w, b, has_b)
    if node.op == "call_function" and node.target in _LINEAR_FUNCS:
        kw = _normalized(node, gm)
        w, _ = _fqn_of(kw.get("weight"))
        b, has_b = _fqn_of(kw.get("bias"))
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


# --------------------------------------------------------------------------- norms

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
        kw = _normalized(node, gm)
        out = node
        if t is aten._native_batch_norm_legit_no_training.default:
            out = _tuple_output(node)
            if out is None:
                return None
            kw.setdefault("training", False)
        w, has_w = _fqn_of(kw.get("weight"))
        b, has_b = _fqn_of(kw.get("bias"))
        rm, has_rm = _fqn_of(kw.get("running_mean"))
        rv, _ = _fqn_of(kw.get("running_var"))
        return NormInfo(
            out, kw["input"], "batchnorm", w, b, has_w, has_b, float(kw["eps"]),
            running_mean=rm, running_var=rv, tracks_stats=has_rm,
            training=bool(kw.get("training", False)) or not has_rm, op_node=node,
        )
    if t in (aten.layer_norm.default, F.layer_norm):
        kw = _normalized(node, gm)
        w, has_w = _fqn_of(kw.get("weight"))
        b, has_b = _fqn_of(kw.get("bias"))
        return NormInfo(node, kw["input"], "layernorm", w, b, has_w, has_b,
                        float(kw.get("eps", 1e-5)),
                        normalized_shape=tuple(int(d) for d in kw["normalized_shape"]))
    if t in (aten.rms_norm.default, getattr(F, "rms_norm", None)):
        kw = _normalized(node, gm)
        w, has_w = _fqn_of(kw.get("weight"))
        eps = kw.get("eps")
        return NormInfo(node, kw["input"], "rmsnorm", w, None, has_w, False,
                        None if eps is None else float(eps),
                        normalized_shape=tuple(int(d) for d in kw["normalized_shape"]))
    if t in (aten.group_norm.default, F.group_norm):
        kw = _normalized(node, gm)
        w, has_w = _fqn_of(kw.get("weight"))
        b, has_b = _fqn_of(kw.get("bias"))
        return NormInfo(node, kw["input"], "groupnorm", w, b, has_w, has_b,
                        float(kw.get("eps", 1e-5)), num_groups=int(kw["num_groups"]))
    if t in (aten.instance_norm.default, F.instance_norm):
        kw = _normalized(node, gm)
        w, has_w = _fqn_of(kw.get("weight"))
        b, has_b = _fqn_of(kw.get("bias"))
        rm, has_rm = _fqn_of(kw.get("running_mean"))
        rv, _ = _fqn_of(kw.get("running_var"))
        use_input_stats = bool(kw.get("use_input_stats", True))
        return NormInfo(node, kw["input"], "instancenorm", w, b, has_w, has_b,
                        float(kw.get("eps", 1e-5)), running_mean=rm, running_var=rv,
                        tracks_stats=has_rm, training=use_input_stats)
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
    w, has_w = _module_fqn(node, mod, "weight")
    b, has_b = _module_fqn(node, mod, "bias")
    if isinstance(mod, nn.modules.batchnorm._BatchNorm):
        tracks = mod.running_mean is not None
        rm = f"{node.target}.running_mean" if tracks else None
        rv = f"{node.target}.running_var" if tracks else None
        return NormInfo(node, x, "batchnorm", w, b, has_w, has_b, float(mod.eps),
                        running_mean=rm, running_var=rv, tracks_stats=tracks,
                        training=mod.training or not tracks)
    if isinstance(mod, nn.modules.instancenorm._InstanceNorm):
        tracks = mod.running_mean is not None
        return NormInfo(node, x, "instancenorm", w, b, has_w, has_b, float(mod.eps),
                        running_mean=f"{node.target}.running_mean" if tracks else None,
                        running_var=f"{node.target}.running_var" if tracks else None,
                        tracks_stats=tracks, training=mod.training or not tracks)
    if isinstance(mod, nn.LayerNorm):
        return NormInfo(node, x, "layernorm", w, b, has_w, has_b, float(mod.eps),
                        normalized_shape=tuple(mod.normalized_shape))
    if isinstance(mod, nn.RMSNorm):
        return NormInfo(node, x, "rmsnorm", w, None, has_w, False,
                        None if mod.eps is None else float(mod.eps),
                        normalized_shape=tuple(mod.normalized_shape))
    if isinstance(mod, nn.GroupNorm):
        return NormInfo(node, x, "groupnorm", w, b, has_w, has_b, float(mod.eps),
                        num_groups=mod.num_groups)
    return None


def batchnorm_info(gm: GraphModule, node: Node) -> NormInfo | None:
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


# --------------------------------------------------------------------------- flatten

_FLATTEN_FUNCS = {aten.flatten.using_ints, torch.flatten}


def flatten_start_end(gm: GraphModule, node: Node) -> tuple[Node, int, int] | None:
    """(input, start_dim, end_dim) if ``node`` is a flatten in any form."""
    if node.op == "call_function" and node.target in _FLATTEN_FUNCS:
        kw = _normalized(node, gm)
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
    kw = _normalized(node, gm)
    if "input" not in kw or "pad" not in kw:
        return None
    value = kw.get("value")
    return PadInfo(node, kw["input"], tuple(int(p) for p in kw["pad"]), str(kw.get("mode") or "constant"),
                   None if value is None else float(value))


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
        kw = _normalized(node, gm)
        if kw.get("beta", 1) != 1 or kw.get("alpha", 1) != 1:
            return None
        weight = constant_fqn(kw.get("mat2"))
        if weight is None:  # a matmul of two activations is not a layer
            return None
        b, has_b = _fqn_of(kw.get("input"))
        return DenseInfo(node, kw["mat1"], weight, b, has_b, 1)
    return None


# --------------------------------------------------------------------------- emitting ops

# name → (ATen overload for torch.export graphs, callable for symbolic_trace graphs); both take
# the same positional arguments.
_EMIT: dict[str, tuple[Any, Any]] = {
    "add": (aten.add.Tensor, operator.add),
    "sub": (aten.sub.Tensor, operator.sub),
    "mul": (aten.mul.Tensor, operator.mul),
    "div": (aten.div.Tensor, operator.truediv),
    "tanh": (aten.tanh.default, torch.tanh),
    "reshape": (aten.reshape.default, torch.reshape),
    "permute": (aten.permute.default, torch.permute),
    "vector_norm": (aten.linalg_vector_norm.default, torch.linalg.vector_norm),
}


def emit_op(gm: GraphModule, name: str, *args: Any, aten_form: bool) -> Node:
    """Insert ``name(*args)`` (see ``_EMIT``) at the graph's insertion point, as an ATen op in
    torch.export graphs (``aten_form``) or a torch/operator call in symbolic_trace graphs."""
    target = _EMIT[name][0 if aten_form else 1]
    return gm.graph.call_function(target, tuple(args))


def emit_norm(
    gm: GraphModule,
    kind: str,
    x: Node,
    *,
    aten_form: bool,
    weight: Node | None = None,
    bias: Node | None = None,
    eps: float | None = 1e-5,
    num_groups: int | None = None,
    normalized_shape: tuple[int, ...] | None = None,
    running_mean: Node | None = None,
    running_var: Node | None = None,
    momentum: float = 0.1,
) -> Node:
    """Insert one normalization op of ``kind`` (see :data:`NORM_KINDS`) reading ``x``, in the
    graph's flavour: ``aten.<kind>`` for torch.export graphs, ``F.<kind>`` for symbolic_trace
    graphs. BatchNorm is emitted in eval form (running statistics, ``training=False``);
    InstanceNorm always uses input statistics. :func:`norm_info` reads every form back."""
    shape = list(normalized_shape or ())
    if kind == "batchnorm":
        if aten_form:
            args = (x, weight, bias, running_mean, running_var, False, momentum, eps, False)
            return gm.graph.call_function(aten.batch_norm.default, args)
        return gm.graph.call_function(
            F.batch_norm, (x, running_mean, running_var, weight, bias, False, momentum, eps))
    if kind == "groupnorm":
        if aten_form:
            return gm.graph.call_function(aten.group_norm.default, (x, num_groups, weight, bias, eps, False))
        return gm.graph.call_function(F.group_norm, (x, num_groups, weight, bias, eps))
    if kind == "instancenorm":
        if aten_form:
            args = (x, weight, bias, None, None, True, momentum, eps, False)
            return gm.graph.call_function(aten.instance_norm.default, args)
        return gm.graph.call_function(F.instance_norm, (x, None, None, weight, bias, True, momentum, eps))
    if kind == "layernorm":
        if aten_form:
            return gm.graph.call_function(aten.layer_norm.default, (x, shape, weight, bias, eps, False))
        return gm.graph.call_function(F.layer_norm, (x, shape, weight, bias, eps))
    if kind == "rmsnorm":
        target = aten.rms_norm.default if aten_form else F.rms_norm
        return gm.graph.call_function(target, (x, shape, weight, eps))
    raise ValueError(f"unknown norm kind {kind!r} (one of {', '.join(NORM_KINDS)})")


def call_args(gm: GraphModule, node: Node) -> dict[str, Any]:
    """A call_function node's arguments by parameter name, positional ones included."""
    return _normalized(node, gm)
