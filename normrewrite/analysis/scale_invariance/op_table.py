"""Which transfer rule each op follows, as data: one line per op, its identity as the comment.

An op is named by :func:`op_name` whatever the graph's spelling (``aten.relu_.default``,
``torch.relu``, ``x.relu()``, ``nn.ReLU`` → ``"relu"``). ``c > 0`` is the scale, ``h`` a value
scaled with it, ``a`` a term independent of it. The :class:`Rule` of each name decides what its
output state is (:mod:`normrewrite.analysis.scale_invariance.rules`); a name not listed has no
rule, so a scaled value reaching it is ``undecided``.
"""

from __future__ import annotations

import operator
from enum import Enum

import torch
from torch import nn
from torch.fx import GraphModule, Node


class Rule(Enum):
    CHANNELWISE = "linear, and a term constant along some axes stays constant along them"
    LINEAR = "linear: H(k) → H(k); where an additive term is constant becomes unknown"
    HOMOGENEOUS = "positively homogeneous: H(k) → H(k); an additive term does not survive"
    NONLINEAR = "not homogeneous: any dependence on c → X"
    SHIFT_INVARIANT = "not homogeneous, but removes an additive term along its axis"
    ADD = "sum of two operands"
    MUL = "product of two operands"
    DIV = "quotient of two operands"
    MATMUL = "matrix product of two operands"
    CAT = "concatenation of a list of operands"
    EMBEDDING = "table lookup"
    ATTENTION = "softmax(q·kᵀ)·v"


# fmt: off
OP_RULES: dict[str, Rule] = {
    "identity": Rule.CHANNELWISE,  # id(c·h + a) = c·h + a
    "clone": Rule.CHANNELWISE,  # clone(v) = v
    "contiguous": Rule.CHANNELWISE,  # contiguous(v) = v
    "alias": Rule.CHANNELWISE,  # alias(v) = v
    "detach": Rule.CHANNELWISE,  # detach(v) = v (forward)
    "lift_fresh_copy": Rule.CHANNELWISE,  # a copy: v
    "_assert_tensor_metadata": Rule.CHANNELWISE,  # a check, returns nothing new
    "dropout": Rule.CHANNELWISE,  # dropout(v) = v (eval)
    "feature_dropout": Rule.CHANNELWISE,  # = v (eval)
    "alpha_dropout": Rule.CHANNELWISE,  # = v (eval)
    "to": Rule.CHANNELWISE,  # cast(c·h + a) = c·cast(h) + cast(a), up to rounding
    "_to_copy": Rule.CHANNELWISE,  # cast, as above
    "type_as": Rule.CHANNELWISE,  # cast, as above
    "float": Rule.CHANNELWISE,  # cast, as above
    "half": Rule.CHANNELWISE,  # cast, as above
    "bfloat16": Rule.CHANNELWISE,  # cast, as above
    "double": Rule.CHANNELWISE,  # cast, as above
    "adaptive_avg_pool1d": Rule.CHANNELWISE,  # pool(c·h + a) = c·pool(h) + a, a per channel (no padding)
    "adaptive_avg_pool2d": Rule.CHANNELWISE,  # as above
    "adaptive_avg_pool3d": Rule.CHANNELWISE,  # as above
    "_adaptive_avg_pool2d": Rule.CHANNELWISE,  # as above
    "view": Rule.LINEAR,  # view(c·h) = c·view(h)
    "reshape": Rule.LINEAR,  # reshape(c·h) = c·reshape(h)
    "_unsafe_view": Rule.LINEAR,  # as view
    "flatten": Rule.LINEAR,  # flatten(c·h) = c·flatten(h)
    "unflatten": Rule.LINEAR,  # unflatten(c·h) = c·unflatten(h)
    "permute": Rule.LINEAR,  # permute(c·h) = c·permute(h)
    "transpose": Rule.LINEAR,  # (c·h)ᵀ = c·hᵀ
    "t": Rule.LINEAR,  # (c·h)ᵀ = c·hᵀ
    "swapaxes": Rule.LINEAR,  # (c·h)ᵀ = c·hᵀ
    "movedim": Rule.LINEAR,  # movedim(c·h) = c·movedim(h)
    "squeeze": Rule.LINEAR,  # squeeze(c·h) = c·squeeze(h)
    "unsqueeze": Rule.LINEAR,  # unsqueeze(c·h) = c·unsqueeze(h)
    "expand": Rule.LINEAR,  # expand(c·h) = c·expand(h)
    "expand_as": Rule.LINEAR,  # as expand
    "repeat": Rule.LINEAR,  # repeat(c·h) = c·repeat(h)
    "slice": Rule.LINEAR,  # (c·h)[s] = c·h[s]
    "select": Rule.LINEAR,  # (c·h)[i] = c·h[i]
    "getitem": Rule.LINEAR,  # (c·h)[i] = c·h[i]
    "narrow": Rule.LINEAR,  # a slice
    "index_select": Rule.LINEAR,  # (c·h)[idx] = c·h[idx]
    "split": Rule.LINEAR,  # slices
    "split_with_sizes": Rule.LINEAR,  # slices
    "chunk": Rule.LINEAR,  # slices
    "unbind": Rule.LINEAR,  # slices
    "flip": Rule.LINEAR,  # flip(c·h) = c·flip(h)
    "roll": Rule.LINEAR,  # roll(c·h) = c·roll(h)
    "pixel_shuffle": Rule.LINEAR,  # a permutation of elements
    "pixel_unshuffle": Rule.LINEAR,  # a permutation of elements
    "neg": Rule.LINEAR,  # −(c·h) = c·(−h)
    "sum": Rule.LINEAR,  # Σ c·h = c·Σ h
    "mean": Rule.LINEAR,  # mean(c·h) = c·mean(h)
    "avg_pool1d": Rule.LINEAR,  # avg(c·h) = c·avg(h) (zero padding: a constant does not stay one)
    "avg_pool2d": Rule.LINEAR,  # as above
    "avg_pool3d": Rule.LINEAR,  # as above
    "interpolate": Rule.LINEAR,  # interpolation is a weighted sum
    "upsample_nearest1d": Rule.LINEAR,  # as interpolate
    "upsample_nearest2d": Rule.LINEAR,  # as interpolate
    "upsample_nearest3d": Rule.LINEAR,  # as interpolate
    "upsample_linear1d": Rule.LINEAR,  # as interpolate
    "upsample_bilinear2d": Rule.LINEAR,  # as interpolate
    # cumsum: linear, but no rule yet (stays undecided)
    "relu": Rule.HOMOGENEOUS,  # relu(c·h) = c·relu(h)
    "leaky_relu": Rule.HOMOGENEOUS,  # lrelu(c·h) = c·lrelu(h)
    "prelu": Rule.HOMOGENEOUS,  # prelu(c·h) = c·prelu(h)
    "abs": Rule.HOMOGENEOUS,  # |c·h| = c·|h|
    "max": Rule.HOMOGENEOUS,  # max(c·h) = c·max(h)
    "min": Rule.HOMOGENEOUS,  # min(c·h) = c·min(h)
    "amax": Rule.HOMOGENEOUS,  # as max
    "amin": Rule.HOMOGENEOUS,  # as min
    "max_pool1d": Rule.HOMOGENEOUS,  # as max
    "max_pool2d": Rule.HOMOGENEOUS,  # as max
    "max_pool3d": Rule.HOMOGENEOUS,  # as max
    "max_pool2d_with_indices": Rule.HOMOGENEOUS,  # as max
    "max_pool3d_with_indices": Rule.HOMOGENEOUS,  # as max
    "adaptive_max_pool1d": Rule.HOMOGENEOUS,  # as max
    "adaptive_max_pool2d": Rule.HOMOGENEOUS,  # as max
    "adaptive_max_pool3d": Rule.HOMOGENEOUS,  # as max
    "gelu": Rule.NONLINEAR,  # gelu(c·h) ≠ c·gelu(h)
    "silu": Rule.NONLINEAR,  # silu(c·h) ≠ c·silu(h)
    "mish": Rule.NONLINEAR,  # as silu
    "tanh": Rule.NONLINEAR,  # tanh(c·h) ≠ c·tanh(h)
    "sigmoid": Rule.NONLINEAR,  # σ(c·h) ≠ c·σ(h)
    "logsigmoid": Rule.NONLINEAR,  # as sigmoid
    "hardtanh": Rule.NONLINEAR,  # clamps at ±1
    "relu6": Rule.NONLINEAR,  # clamps at 6
    "clamp": Rule.NONLINEAR,  # fixed bounds
    "clip": Rule.NONLINEAR,  # fixed bounds
    "hardswish": Rule.NONLINEAR,  # fixed breakpoints
    "hardsigmoid": Rule.NONLINEAR,  # fixed breakpoints
    "elu": Rule.NONLINEAR,  # exp for h < 0
    "selu": Rule.NONLINEAR,  # exp for h < 0
    "celu": Rule.NONLINEAR,  # exp for h < 0
    "softplus": Rule.NONLINEAR,  # log(1 + exp(c·h))
    "glu": Rule.NONLINEAR,  # a·σ(b)
    "exp": Rule.NONLINEAR,  # exp(c·h) ≠ c·exp(h)
    "log": Rule.NONLINEAR,  # log(c·h) = log c + log h: a shift, no rule
    "erf": Rule.NONLINEAR,  # erf(c·h) ≠ c·erf(h)
    "sin": Rule.NONLINEAR,  # sin(c·h) ≠ c·sin(h)
    "cos": Rule.NONLINEAR,  # cos(c·h) ≠ c·cos(h)
    "softmax": Rule.SHIFT_INVARIANT,  # softmax(x + a·1) = softmax(x), softmax(c·x) ≠ softmax(x)
    "_softmax": Rule.SHIFT_INVARIANT,  # as softmax
    "log_softmax": Rule.SHIFT_INVARIANT,  # log_softmax(x + a·1) = log_softmax(x)
    "add": Rule.ADD,  # x + y
    "iadd": Rule.ADD,  # x += y
    "sub": Rule.ADD,  # x − y = x + (−y)
    "isub": Rule.ADD,  # x −= y
    "mul": Rule.MUL,  # x·y
    "imul": Rule.MUL,  # x *= y
    "div": Rule.DIV,  # x / y
    "truediv": Rule.DIV,  # x / y
    "itruediv": Rule.DIV,  # x /= y
    "matmul": Rule.MATMUL,  # x @ y
    "mm": Rule.MATMUL,  # x @ y, 2-d
    "bmm": Rule.MATMUL,  # x @ y, batched
    "cat": Rule.CAT,  # [c·h, c·g] = c·[h, g]
    "concat": Rule.CAT,  # as cat
    "concatenate": Rule.CAT,  # as cat
    "stack": Rule.CAT,  # as cat
    "embedding": Rule.EMBEDDING,  # (c·W)[i] = c·W[i]
    "scaled_dot_product_attention": Rule.ATTENTION,  # softmax(q·kᵀ/√d)·(c·v) = c·(…)
}

# module classes → the op they compute (norms, convs and linears are read by normrewrite.core.ops)
MODULE_OPS: tuple[tuple[type[nn.Module] | tuple[type[nn.Module], ...], str], ...] = (
    (nn.ReLU, "relu"),
    (nn.LeakyReLU, "leaky_relu"),
    ((nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d), "max_pool2d"),
    ((nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d), "adaptive_max_pool2d"),
    ((nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d), "avg_pool2d"),
    ((nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d), "adaptive_avg_pool2d"),
    ((nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout), "dropout"),
    (nn.Identity, "identity"),
    (nn.Flatten, "flatten"),
    (nn.Unflatten, "unflatten"),
    (nn.Upsample, "interpolate"),
    (nn.Embedding, "embedding"),
    ((nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.Softmax, nn.ELU, nn.Hardtanh, nn.ReLU6,
      nn.Softplus, nn.Mish, nn.Hardswish, nn.Hardsigmoid), "gelu"),  # any non-homogeneous one
)
# fmt: on


def op_name(gm: GraphModule, node: Node) -> str:
    """The name :data:`OP_RULES` knows ``node``'s op by (``"module <Class>"`` for a module
    without an entry in :data:`MODULE_OPS`); an in-place ``relu_`` is ``relu``."""
    t = node.target
    if node.op == "call_method":
        return str(t)
    if node.op == "call_module":
        mod = gm.get_submodule(str(t))
        for cls, name in MODULE_OPS:
            if isinstance(mod, cls):
                return name
        return f"module {type(mod).__name__}"
    if isinstance(t, torch._ops.OpOverload):
        name = t.overloadpacket.__name__
    elif t is operator.getitem:
        return "getitem"
    else:
        name = getattr(t, "__name__", str(t))
    return name[:-1] if name.endswith("_") and not name.startswith("_") else name
