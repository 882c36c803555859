"""Arguments of an op node by parameter name, whichever way the graph passes them.

``F.conv2d(x, w, None, 1, 1)``, ``F.conv2d(x, w, padding=1)`` and
``aten.conv2d.default(x, w, None, [1, 1], [1, 1])`` all answer ``call_args(...)["padding"]``.
The other helpers turn what an argument holds into what the op records need: the FQN of a stored
tensor, a per-dim tuple, the module a ``call_module`` node calls.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule, Node
from torch.fx.operator_schemas import get_signature_for_torch_op

from normrewrite.core.graph import constant_fqn

aten = torch.ops.aten


def call_args(gm: GraphModule, node: Node) -> dict[str, Any]:
    """A call node's arguments by parameter name, positional ones included (``{}`` when neither
    fx, the op's schema nor a torch signature can name them)."""
    try:
        pair = node.normalized_arguments(gm, normalize_to_only_use_kwargs=True)
    except Exception:
        pair = None
    if pair is not None:
        return dict(pair.kwargs)
    kwargs: dict[str, Any] = {}
    # fall back to the op's schema for overloads fx cannot normalise
    schema = getattr(node.target, "_schema", None)
    if schema is not None:
        for a, v in zip(schema.arguments, node.args, strict=False):
            kwargs[a.name] = v
        kwargs.update(node.kwargs)
    elif node.op == "call_function":
        # torch builtins with overloads that differ only in types (F.conv2d's padding:
        # list or str) are "ambiguous" to fx; their parameter names agree, so take the first
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
    try:
        return list(inspect.signature(target).parameters)
    except (TypeError, ValueError):
        return None


def per_dim(v: Any, n: int) -> tuple[int, ...]:
    """An int-or-sequence argument (stride, padding, …) as one int per spatial dim."""
    if isinstance(v, int):
        return (v,) * n
    v = tuple(int(x) for x in v)
    return v * n if len(v) == 1 and n > 1 else v


def arg_fqn(arg: Any) -> tuple[str | None, bool]:
    """(FQN, present) for a tensor argument of a call_function node; the FQN is None when the
    tensor is computed in the graph."""
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


def module_fqn(node: Node, mod: nn.Module, attr: str) -> tuple[str | None, bool]:
    """(FQN, present) for tensor ``attr`` of the module a ``call_module`` node calls; the FQN is
    None when the module computes it on access (a parametrization)."""
    t = getattr(mod, attr, None)
    if t is None:
        return None, False
    if nn.utils.parametrize.is_parametrized(mod, attr):
        return None, True
    if attr in mod._parameters or attr in mod._buffers:
        return f"{node.target}.{attr}", True
    return None, True


_SHAPE_ATTRS = ("shape", "dtype", "device", "ndim")
_SHAPE_READS = {"size", "dim", aten.sym_size.int, aten.sym_numel.default, aten.dim.default}
# ``y.reshape_as(x)``, ``torch.zeros_like(x)``: the second / first argument's metadata only
_TEMPLATE_SECOND = {
    "reshape_as",
    "view_as",
    "expand_as",
    aten.reshape_as.default,
    aten.view_as.default,
    aten.expand_as.default,
}
_TEMPLATE_FIRST = {
    aten.new_zeros.default,
    aten.new_ones.default,
    aten.new_empty.default,
    aten.new_full.default,
    aten.zeros_like.default,
    aten.ones_like.default,
    aten.empty_like.default,
    aten.full_like.default,
    "new_zeros",
    "new_ones",
    "new_empty",
    "new_full",
    torch.zeros_like,
    torch.ones_like,
    torch.empty_like,
    torch.full_like,
}


def shape_only_use(user: Node, node: Node) -> bool:
    """``user`` reads only the shape (or dtype, device) of ``node``, not its values: ``x.shape``,
    ``x.size()``, ``aten.sym_size``, the template of ``y.reshape_as(x)`` / ``b.expand_as(x)``,
    ``x.new_ones(…)``, ``torch.zeros_like(x)``."""
    if user.op not in ("call_function", "call_method"):
        return False
    t = user.target
    if user.op == "call_function" and t is getattr:
        return user.args[1:] in {(a,) for a in _SHAPE_ATTRS}
    if t in _SHAPE_READS:
        return True
    rest = [*user.args[1:], *user.kwargs.values()]
    if t in _TEMPLATE_FIRST:
        return bool(user.args) and user.args[0] is node and node not in rest
    return t in _TEMPLATE_SECOND and user.args[0] is not node and node not in user.kwargs.values()
