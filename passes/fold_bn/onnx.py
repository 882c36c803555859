"""fold-bn on ONNX models: fold ``BatchNormalization`` into ``Conv``, ``ConvTranspose``, ``Gemm``
and ``MatMul`` (+ ``Add``).

The identity and the tensor math are those of :mod:`passes.fold_bn` (``bn_affine``,
``fold_output``, ``fold_input``), applied to the ONNX weight layouts:

* ``Conv`` W ``(C_out, C_in/g, k…)``; ``ConvTranspose`` W ``(C_in, C_out/g, k…)`` (``group``);
* ``Gemm`` ``Y = α·A·op(B) + β·C``: the fold scales op(B)'s output columns and sets
  ``C' = s·C + t/β``;
* ``MatMul`` ``Y = X·B`` (+ ``Add`` of a constant): ``B`` is ``(K, N)``, the transposed Linear weight.

Output side (layer → BN) and input side (BN → layer, only ``Conv`` without zero padding and
rank-2 ``Gemm``/``MatMul``). Preconditions, as in the torch pass, each reported when it fails:
``training_mode`` 0 and only the ``Y`` output used; statistics, γ, β constant; the layer's weights
are initializers read by this node only (not shared, not graph inputs); exactly one consumer
between the two; the BN channel axis (dim 1) is the layer's channel axis (rank-2 outputs for
Gemm/MatMul); no zero padding on an input-side conv.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_ir as ir
import torch

from normrewrite.core.onnx_graph import (
    add_initializer,
    const_array,
    count_nodes,
    infer_shapes,
    is_graph_output,
    private_initializer,
    set_initializer,
)
from normrewrite.core.onnx_pass import OnnxPass, OnnxPassResult
from normrewrite.core.ops.layout import ChannelAxis
from normrewrite.core.pass_infra import Change, Skip
from normrewrite.errors import UsageError

from .conditions import (
    bad_statistics,
    channel_mixed_by,
    channel_moved_by,
    input_features_not_channels,
    layer_output_shared,
    statistics_not_stored,
    transposed_after,
    uses_batch_statistics,
    zero_padded_after,
)
from .math import bn_affine, fold_input, fold_output
from .onnx_layout import carry, chain_after, chain_before, channel_problem, describe, shared_output
from .options import FoldBatchNormOptions


@dataclass(frozen=True)
class OnnxFoldMatch:
    bn: ir.Node
    layer: ir.Node
    side: Literal["output", "input"]
    add: ir.Node | None = None  # the bias Add after a MatMul (output side)
    repeat: int = 1  # input side through a flatten: features per channel

    def describe(self) -> str:
        where = "after" if self.side == "output" else "before"
        return f"folded into {self.layer.op_type} {self.layer.name} (BN {where} it)"


def _attr(node: ir.Node, name: str, default: object) -> object:
    a = node.attributes.get(name)
    return default if a is None else a.value


def _shape(v: ir.Value) -> tuple[int | str, ...] | None:
    return None if v.shape is None else tuple(d if isinstance(d, int) else str(d) for d in v.shape)


def _single_consumer(graph: ir.Graph, v: ir.Value) -> ir.Node | None:
    users = v.uses()
    if len(users) != 1 or is_graph_output(graph, v):
        return None
    return users[0].node


def match(graph: ir.Graph, bn: ir.Node) -> OnnxFoldMatch | str:
    """The fold to make for BatchNormalization ``bn``, or why there is none."""
    training = bool(_attr(bn, "training_mode", 0)) or any(
        o.uses() or is_graph_output(graph, o) for o in bn.outputs[1:]
    )
    why = uses_batch_statistics(
        tracks_running_stats=True, training=training
    ) or statistics_not_stored(
        statistics=all(const_array(v) is not None for v in bn.inputs[3:5]),
        affine=all(const_array(v) is not None for v in bn.inputs[1:3]),
    )
    if why:
        return why
    gamma, beta, mean, var = (
        torch.from_numpy(const_array(v).astype("float64")) for v in bn.inputs[1:5]
    )
    why = bad_statistics(mean, var, gamma, beta)
    if why:
        return why
    x = bn.inputs[0]
    reasons = []
    layer, before = chain_before(x) if x is not None else (None, [])
    if layer is not None:
        found = _output_side(graph, bn, layer, before)
        if isinstance(found, OnnxFoldMatch):
            return found
        if found:
            reasons.append(found)
    out, after = chain_after(graph, bn.outputs[0])
    consumer = _single_consumer(graph, out)
    if consumer is None:
        whose = f"the output of {describe(after[-1])}" if after else "its output"
        reasons.append(
            f"{whose} is a graph output"
            if is_graph_output(graph, out)
            else f"{whose} has {len(out.uses())} consumers"
        )
    else:
        found = _input_side(graph, bn, consumer, out, after)
        if isinstance(found, OnnxFoldMatch):
            return found
        if found:
            reasons.append(found)
    return "; ".join(reasons) or "no Conv/ConvTranspose/Gemm/MatMul directly before or after it"


def _weights(graph: ir.Graph, layer: ir.Node, idx: Sequence[int]) -> str | None:
    for i in idx:
        if i < len(layer.inputs) and layer.inputs[i] is not None:
            why = private_initializer(graph, layer.inputs[i])
            if why:
                return f"{layer.op_type} {layer.name}: {why}"
    return None


def _output_side(
    graph: ir.Graph, bn: ir.Node, layer: ir.Node, ops: list[ir.Node]
) -> OnnxFoldMatch | str | None:
    op = layer.op_type
    if op not in ("Conv", "ConvTranspose", "Gemm", "MatMul", "Add") or layer.domain not in (
        "",
        "ai.onnx",
    ):
        return None
    add = None
    if op == "Add":  # MatMul + bias Add
        mm = next(
            (
                v.producer()
                for v in layer.inputs
                if v is not None and v.producer() is not None and v.producer().op_type == "MatMul"
            ),
            None,
        )
        if mm is None:
            return None
        add, layer, op = layer, mm, "MatMul"
        if _single_consumer(graph, mm.outputs[0]) is not add:
            return f"the MatMul {mm.name} output has other consumers than its bias Add"
    out = (add or layer).outputs[0]
    why = layer_output_shared(f"{op} {layer.name}", len(out.uses()) + is_graph_output(graph, out))
    why = why or shared_output(graph, ops) or channel_problem(layer, out, ops, bn.inputs[0])
    if why:
        return why
    if op == "MatMul" and const_array(layer.inputs[1]) is None:
        return f"the MatMul {layer.name} right operand is not a constant"
    if op == "Gemm" and float(_attr(layer, "beta", 1.0)) == 0.0 and len(layer.inputs) > 2:
        return f"Gemm {layer.name} has beta=0"
    why = _weights(graph, layer, (1, 2))
    if why is None and add is not None:
        bias = next(v for v in add.inputs if v is not layer.outputs[0])
        why = private_initializer(graph, bias)
        if (
            why is None
            and const_array(bias).ndim > 1
            and const_array(bias).shape[:-1] != (1,) * (const_array(bias).ndim - 1)
        ):
            why = f"the bias {bias.name} is not per output feature"
    if why is None and op == "Gemm" and len(layer.inputs) > 2 and layer.inputs[2] is not None:
        c = const_array(layer.inputs[2])
        if c is not None and c.ndim == 2 and c.shape[0] != 1:
            why = f"Gemm {layer.name}: C has a row dimension {c.shape}, not a per-feature bias"
    if why:
        return why
    return OnnxFoldMatch(bn, layer, "output", add)


def _input_side(
    graph: ir.Graph, bn: ir.Node, layer: ir.Node, x: ir.Value, ops: list[ir.Node]
) -> OnnxFoldMatch | str | None:
    """BN → ``ops`` → ``layer`` reading ``x``."""
    op = layer.op_type
    if op not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or layer.inputs[0] is not x:
        return None
    repeat = 1
    if ops:
        shape, x_shape = _shape(bn.outputs[0]), _shape(x)
        if shape is None or len(shape) < 2 or not isinstance(shape[1], int) or x_shape is None:
            return f"the shapes around {describe(ops[0])} are unknown"
        ch, mixer = carry(ChannelAxis(1, shape[1]), ops)
        if mixer is not None:
            return channel_mixed_by(describe(mixer), "the BN")
        assert ch is not None  # carry returns an axis when no op mixes it
        want = len(x_shape) - 1 if op in ("Gemm", "MatMul") else 1
        if ch.axis != want or (want == 1 and op not in ("Gemm", "MatMul") and ch.repeat != 1):
            where = "its input features (last dim)" if want != 1 else f"dim 1 of {op} {layer.name}"
            return channel_moved_by(describe(ops[-1]), "the BN", ch.axis, where)
        repeat = ch.repeat
    if op == "ConvTranspose":
        return transposed_after(f"ConvTranspose {layer.name}")
    if op == "Conv":
        pads = _attr(layer, "pads", None)
        auto = _attr(layer, "auto_pad", "NOTSET")
        zero = (pads is not None and any(pads)) or auto in ("SAME_UPPER", "SAME_LOWER")
        why = zero_padded_after(f"Conv {layer.name}", zero_padding=zero)
        if why:
            return why
    else:
        why = None if ops else input_features_not_channels(f"{op} {layer.name}", _shape(x))
        if why:
            return why
        if op == "Gemm" and _attr(layer, "transA", 0):
            return f"Gemm {layer.name} has transA=1"
        if op == "MatMul" and const_array(layer.inputs[1]) is None:
            return f"the MatMul {layer.name} right operand is not a constant"
    why = _weights(graph, layer, (1, 2))
    return why or OnnxFoldMatch(bn, layer, "input", repeat=repeat)


# --------------------------------------------------------------------------- rewrite


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


def apply(graph: ir.Graph, m: OnnxFoldMatch) -> None:
    """Rewrite the layer's initializers with the folded values and remove the BN.

    Every layer is brought to torch's layout — effective weight ``α·W`` as ``(N, K)`` for
    Gemm/MatMul, effective bias ``β·C`` — folded with :mod:`passes.fold_bn`'s math, and mapped back."""
    bn, layer = m.bn, m.layer
    gamma, beta, mean, var = (_t(const_array(v)) for v in bn.inputs[1:5])
    scale, shift = bn_affine(mean, var, gamma, beta, float(_attr(bn, "epsilon", 1e-5)))
    op = layer.op_type
    w_val = layer.inputs[1]
    w = _t(const_array(w_val))
    linear_t = op == "MatMul" or (op == "Gemm" and not _attr(layer, "transB", 0))
    alpha = float(_attr(layer, "alpha", 1.0)) if op == "Gemm" else 1.0
    beta_g = float(_attr(layer, "beta", 1.0)) if op == "Gemm" else 1.0
    w = (w.T if linear_t else w).double() * alpha
    if op == "MatMul":
        bias_val = (
            next((v for v in m.add.inputs if v is not layer.outputs[0]), None) if m.add else None
        )
    else:
        bias_val = layer.inputs[2] if len(layer.inputs) > 2 else None
    bias = None if bias_val is None else _t(const_array(bias_val)).double().reshape(-1) * beta_g
    c_out = w.shape[1] * int(_attr(layer, "group", 1)) if op == "ConvTranspose" else w.shape[0]
    if bias is not None and bias.numel() == 1:
        bias = bias.expand(c_out).clone()
    groups = int(_attr(layer, "group", 1))
    if m.side == "output":
        new_w, new_b = fold_output(
            w, bias, scale, shift, transposed=op == "ConvTranspose", groups=groups
        )
    else:
        new_w, new_b = fold_input(w, bias, scale, shift, groups=groups, repeat=m.repeat)
    dtype = const_array(w_val).dtype
    new_w = new_w / alpha
    new_b = new_b / beta_g
    set_initializer(w_val, (new_w.T if linear_t else new_w).contiguous().numpy().astype(dtype))
    b_np = new_b.contiguous().numpy().astype(dtype)
    if bias_val is not None:
        old = const_array(bias_val)
        shape = (
            old.shape
            if old.size == b_np.size
            else (1,) * (old.ndim - 1) + b_np.shape
            if old.ndim
            else b_np.shape
        )
        set_initializer(bias_val, b_np.reshape(shape))
    elif op == "MatMul":  # a MatMul without bias gets an Add
        b_init = add_initializer(graph, f"{w_val.name}_bias", b_np)
        add = ir.node("Add", [None, b_init], name=f"{layer.name}_bias")
        graph.insert_after(layer, add)
        layer.outputs[0].replace_all_uses_with(add.outputs[0])
        add.replace_input_with(0, layer.outputs[0])
    else:  # Conv / ConvTranspose / Gemm without bias: add the optional input
        b_init = add_initializer(graph, f"{w_val.name}_bias", b_np)
        layer.resize_inputs(3)
        layer.replace_input_with(2, b_init)
    if m.side == "output":  # the BN's input: the layer's output, or the layout ops' after it
        _bypass(graph, bn, bn.inputs[0])
    else:
        bn.outputs[0].replace_all_uses_with(bn.inputs[0])
        _drop(graph, bn)


def _bypass(graph: ir.Graph, bn: ir.Node, new: ir.Value) -> None:
    """Replace the BN's output by ``new`` (keeping a graph output's name) and remove the BN."""
    old = bn.outputs[0]
    if is_graph_output(graph, old):
        name = old.name
        ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
        old.name = None
        new.name = name
    else:
        old.replace_all_uses_with(new)
    _drop(graph, bn)


def _drop(graph: ir.Graph, bn: ir.Node) -> None:
    """Remove ``bn`` (its output must be unused) and the initializers only it read."""
    bn_inputs = list(bn.inputs)
    for i in range(len(bn.inputs)):
        bn.replace_input_with(i, None)
    graph.remove(bn, safe=True)
    for v in bn_inputs[1:]:
        if v is not None and v.name in graph.initializers and not v.uses():
            graph.initializers.pop(v.name)


def _fold_constants(model: ir.Model) -> list[str]:
    """Constant-fold first (onnxscript's optimizer), so biases and weights computed from
    constants (``Expand(Shape(W))`` zero biases of unoptimized exports) become initializers."""
    import onnxscript.optimizer

    before = count_nodes(model)
    onnxscript.optimizer.fold_constants(model)
    onnxscript.optimizer.remove_unused_nodes(model)
    infer_shapes(model)  # ranks decide which folds are exact
    after = count_nodes(model)
    return [f"constant folding removed {before - after} nodes"] if after < before else []


class OnnxFoldBatchNorm(OnnxPass):
    name = "fold-bn"
    summary = (
        "fold BatchNormalization into the adjacent Conv/ConvTranspose/Gemm/MatMul weights (exact)"
    )
    exact = True
    Options = FoldBatchNormOptions

    def validate_options(self) -> None:
        if self.options.shared != "skip":
            raise UsageError(
                "pass fold-bn on ONNX models: shared=clone is not supported (weights are never cloned)"
            )

    def call(self, model: ir.Model) -> OnnxPassResult:
        graph = model.graph
        changes: list[Change] = []
        skipped: list[Skip] = []
        notes = _fold_constants(model)
        for node in list(graph):
            if (
                node.graph is None
                or node.op_type != "BatchNormalization"
                or node.domain not in ("", "ai.onnx")
            ):
                continue
            label = node.name or node.outputs[0].name
            found = match(graph, node)
            if isinstance(found, str):
                skipped.append(Skip(label, found))
                continue
            text = found.describe()
            apply(graph, found)
            changes.append(Change(label, text))
        return OnnxPassResult(model, bool(changes), changes, skipped, notes if changes else [])

    def explain(self, model: ir.Model) -> dict[str, str]:
        """What :meth:`call` would do, judged on a constant-folded copy (``model`` is untouched)."""
        model = ir.serde.deserialize_model(ir.serde.serialize_model(model))
        _fold_constants(model)
        out = {}
        for node in model.graph:
            if node.op_type == "BatchNormalization":
                found = match(model.graph, node)
                out[node.name] = (
                    f"foldable into {found.layer.op_type} {found.layer.name} ({found.side} side)"
                    if isinstance(found, OnnxFoldMatch)
                    else f"not foldable: {found}"
                )
        return out


__all__ = ["OnnxFoldBatchNorm", "OnnxFoldMatch", "apply", "match"]
