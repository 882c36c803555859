"""Op semantics, independent of how a graph spells them.

A convolution can reach a pass as ``call_module`` of an ``nn.Conv2d`` (symbolic_trace), as
``call_function`` of ``torch.nn.functional.conv2d`` (symbolic_trace of functional code) or as
``aten.conv2d`` / ``aten.convolution`` (torch.export). Passes match on the small frozen records
returned here — :class:`ConvInfo`, :class:`LinearInfo`, :class:`DenseInfo`, :class:`PadInfo`,
:class:`NormInfo` — and never on the class names of the models they were tested on. Each record
also knows how to rebind the one thing passes change in place: a missing bias.

Stored tensors are named by FQN (see :mod:`normrewrite.core.graph`). A parameter computed inside the
graph (e.g. a weight-norm parametrization that was traced through) has FQN ``None``: passes that
change weights must leave such a layer alone and say so.

Modules: :mod:`~normrewrite.core.ops.args` (arguments by name, whatever the spelling),
:mod:`~normrewrite.core.ops.layers` (conv, linear, dense, pad, flatten),
:mod:`~normrewrite.core.ops.norms` (every norm kind) and :mod:`~normrewrite.core.ops.emit`
(inserting ops in the graph's flavour). The names below are the public surface.
"""

from normrewrite.core.ops.args import call_args, called_module, set_arg, shape_only_use
from normrewrite.core.ops.emit import emit_norm, emit_op
from normrewrite.core.ops.layers import (
    ConvInfo,
    DenseInfo,
    LinearInfo,
    PadInfo,
    conv_info,
    dense_info,
    flatten_start_end,
    linear_info,
    pad_info,
    set_bias,
)
from normrewrite.core.ops.norms import NORM_KINDS, NormInfo, batchnorm_info, norm_info, norms

__all__ = [
    "NORM_KINDS",
    "ConvInfo",
    "DenseInfo",
    "LinearInfo",
    "NormInfo",
    "PadInfo",
    "batchnorm_info",
    "call_args",
    "called_module",
    "conv_info",
    "dense_info",
    "emit_norm",
    "emit_op",
    "flatten_start_end",
    "linear_info",
    "norm_info",
    "norms",
    "pad_info",
    "set_arg",
    "set_bias",
    "shape_only_use",
]
