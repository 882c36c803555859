"""The cleanup stage and the runtime forms of the ONNX pipeline: exact rewrites that make an
exported or rewritten graph smaller and runnable as fused kernels.

* :func:`optimize` — onnxscript's optimizer (constant folding, dead code, identities, CSE), with
  raised folding limits when every input shape is static (shape chains, position tables and masks
  become initializers, as onnxsim does), plus :func:`remove_neutral_ops` and
  :func:`fold_gather_elements`;
* :func:`optimize_keeping` — the same optimizer for a model whose weights stay on disk (``--meta``):
  no node reading one of them is ever folded into an in-memory constant;
* :func:`rotary_caches_per_batch` — the exporter's fused ``RotaryEmbedding`` made to run at any
  batch size;
* :func:`groupnorm_as_instancenorm` — ``GroupNormalization`` in the form onnxruntime runs fused.

onnxruntime's residual-add + norm ops (``SkipLayerNormalization``,
``SkipSimplifiedLayerNormalization``) are deliberately not emitted for ``--onnx-target ort``: on
the CPU provider (onnxruntime 1.32, one thread, 128×768 fp32) each runs 6–7× slower than the
``Add`` + norm it replaces (``bench/bench_onnx.py --profile``; README, ONNX run time).

Every rewrite evaluates the same ops on constants or restates the same function: exact (the
pipeline compares the result in onnxruntime).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from normrewrite.core.onnx_graph import (
    add_initializer,
    const_array,
    is_graph_input,
    is_graph_output,
    static_inputs,
)
from normrewrite.errors import EmitError

# constant folding limits (elements) when every graph input has a static shape: large enough for
# position tables, attention masks and shape chains of real models, bounded so that folding never
# materializes a huge tensor (the optimizer's defaults, 8192 in / 262144 out, stop at the first
# embedding table or seq x seq mask)
STATIC_FOLD_INPUT_LIMIT = 1 << 24
STATIC_FOLD_OUTPUT_LIMIT = 1 << 22
_NEUTRAL = {"Add": 0, "Sub": 0, "Mul": 1, "Div": 1}  # x op c == x when c is all this value


def remove_neutral_ops(model: ir.Model) -> int:
    """Drop ``x + 0``, ``x - 0``, ``x * 1``, ``x / 1`` whose constant (any shape) does not broadcast
    ``x`` to a larger shape nor change its dtype (onnxscript's no-op rules take scalars only; a
    freshly initialized Linear has an all-zero bias vector). Exact: IEEE ``x + 0 == x`` for every
    ``x`` (a ``-0.0`` input comes out ``-0.0`` instead of ``+0.0``, which compares equal)."""
    graph, n = model.graph, 0
    for node in list(graph):
        if (
            node.op_type not in _NEUTRAL
            or node.domain not in ("", "ai.onnx")
            or len(node.inputs) != 2
        ):
            continue
        sides = (1,) if node.op_type in ("Sub", "Div") else (1, 0)
        for c_at in sides:
            x, c = node.inputs[1 - c_at], node.inputs[c_at]
            out = node.outputs[0]
            arr = const_array(c)
            if x is None or c is None or arr is None or x.shape is None:
                continue
            if is_graph_output(graph, out) or is_graph_input(graph, c):
                continue  # an initializer that is also an input can be overridden at run time
            if (
                x.dtype != out.dtype
                or arr.ndim > len(x.shape)
                or not np.all(arr == _NEUTRAL[node.op_type])
            ):
                continue
            dims = list(x.shape)[len(x.shape) - arr.ndim :]
            if any(k != 1 and k != d for k, d in zip(arr.shape, dims, strict=True)):
                continue  # the constant would broadcast x to a larger shape
            ir.convenience.replace_all_uses_with(out, x)
            graph.remove(node, safe=True)
            n += 1
            break
    return n


def fold_gather_elements(model: ir.Model) -> int:
    """Fold ``GatherElements`` of two constants with numpy (onnx's reference evaluator, which the
    optimizer's constant folding uses, fails on e.g. a (1, 512) table read at (1, 128) indices)."""
    graph, n = model.graph, 0
    for node in list(graph):
        if node.op_type != "GatherElements" or node.domain not in ("", "ai.onnx"):
            continue
        data, idx = (const_array(v) for v in node.inputs[:2])
        out = node.outputs[0]
        if data is None or idx is None or is_graph_output(graph, out):
            continue
        if any(is_graph_input(graph, v) for v in node.inputs[:2] if v is not None):
            continue
        if idx.size > STATIC_FOLD_OUTPUT_LIMIT:
            continue
        axis = node.attributes.get_int("axis", 0) % data.ndim
        got = np.take_along_axis(data, np.where(idx < 0, idx + data.shape[axis], idx), axis=axis)
        value = add_initializer(graph, out.name or "gather_elements", got)
        ir.convenience.replace_all_uses_with(out, value)
        graph.remove(node, safe=True)
        n += 1
    return n


def _fold_feeding_constants(node: ir.Node) -> bool | None:
    """The optimizer keeps ``ConstantOfShape`` (folding it alone only grows the file): fold it
    when every reader's other inputs are constants too, so the chain (e.g. a causal mask
    ``ConstantOfShape → Trilu``) folds on into one initializer. None: the default rules."""
    if node.op_type != "ConstantOfShape" or node.domain not in ("", "ai.onnx"):
        return None
    out = node.outputs[0]
    readers = [u.node for u in out.uses()]
    if not readers or any(
        v is not None and v is not out and v.const_value is None for r in readers for v in r.inputs
    ):
        return None
    return True


def optimize(model: ir.Model, *, allow_static: bool = True, fuse: bool = False) -> str:
    """onnxscript's optimizer plus :func:`remove_neutral_ops`, in place. When every graph input is
    static and ``allow_static`` (no ``--dynamic``), the folding limits are raised and
    :func:`fold_gather_elements` runs; a model with symbolic dims keeps its shape computations.
    ``fuse``: also onnxscript's ONNX-op fusions after the first round (``RMSNormalization``,
    ``RotaryEmbedding``, ...) — with it this is a superset of what ``torch.onnx.export(...,
    optimize=True)`` runs, so the export stage need not optimize first. Returns which mode ran."""
    import onnxscript.optimizer

    static = allow_static and static_inputs(model)
    limits = (
        dict(
            input_size_limit=STATIC_FOLD_INPUT_LIMIT,
            output_size_limit=STATIC_FOLD_OUTPUT_LIMIT,
            should_fold=_fold_feeding_constants,
        )
        if static
        else {}
    )
    for round_ in range(2):
        onnxscript.optimizer.optimize_ir(model, **limits)  # type: ignore[arg-type]
        if fuse and round_ == 0:
            _onnx_fusions(model)
        changed = remove_neutral_ops(model) + (fold_gather_elements(model) if static else 0)
        if not changed:
            break
    return "static shapes" if static else "symbolic shapes kept"


def _onnx_fusions(model: ir.Model) -> None:
    """onnxscript's fusions into ONNX ops (what the exporter's ``optimize=True`` runs after its
    optimizer); older onnxscript releases without them leave the graph as it is."""
    try:
        from onnxscript.rewriter import onnx_fusions
    except ImportError:  # older onnxscript: no fusions
        return
    onnx_fusions.fuse(model)
    rotary_caches_per_batch(model)  # a fused RotaryEmbedding made valid at every batch


def optimize_keeping(model: ir.Model, weights: Collection[str]) -> None:
    """onnxscript's optimizer (what ``torch.onnx.export(optimize=True)`` runs), never folding a
    node that reads one of the initializers ``weights`` (they stay where they are stored)."""
    import onnxscript.optimizer

    from normrewrite.emit.onnx.export import export_error

    def guard(node: ir.Node) -> bool | None:
        for v in node.inputs:
            if v is not None and v.name in weights and v.is_initializer():
                return False
        return None

    try:
        onnxscript.optimizer.optimize_ir(model, should_fold=guard)
    except Exception as e:
        raise EmitError(f"optimizing the ONNX graph failed: {export_error(e)}") from e


def rotary_caches_per_batch(model: ir.Model) -> int:
    """Give every fused ``RotaryEmbedding`` (opset 23, no ``position_ids``) cos/sin caches with
    the batch size of its input ``x``; returns how many were changed.

    torch.onnx.export's optimizer fuses Hugging Face's rotary embedding
    ``x·cos + rotate_half(x)·sin`` into ``RotaryEmbedding(x, cos, sin)``, where ``cos``/``sin``
    are computed from ``position_ids`` of shape ``(1, S)``: they have shape ``(1, S, D/2)`` while
    ``x`` has batch ``B``. The unfused graph broadcast them over the batch; the ONNX op instead
    requires caches of shape ``(B, S, D/2)``, and onnxruntime refuses any other batch than 1.
    The repair states the broadcast explicitly::

        RotaryEmbedding(x, cos, sin) ← RotaryEmbedding(x, Expand(cos, [B, 1, 1]), Expand(sin, [B, 1, 1]))
        with B = Shape(x)[0]

    Exact: every batch row gets the one cache row the original broadcast to it (``Expand`` copies;
    caches that already have batch ``B`` are left as they are by the broadcast). Passing
    ``position_ids`` instead would need the cache as a table indexed by position, which the
    exported graph does not have."""
    graph, n = model.graph, 0
    for node in list(graph):
        if node.op_type != "RotaryEmbedding" or node.domain not in ("", "ai.onnx"):
            continue
        x, cos, sin = (node.inputs[i] if len(node.inputs) > i else None for i in range(3))
        if x is None or cos is None or sin is None:
            continue
        if len(node.inputs) > 3 and node.inputs[3] is not None:
            continue  # position_ids given: the caches are tables indexed by position
        if _same_batch(x, cos) and _same_batch(x, sin):
            continue
        batch = ir.node("Shape", [x], attributes={"start": 0, "end": 1})
        ones = add_initializer(graph, "rotary_cache_ones", np.ones(2, dtype=np.int64))
        shape = ir.node("Concat", [batch.outputs[0], ones], attributes={"axis": 0})
        cos_b = ir.node("Expand", [cos, shape.outputs[0]])
        sin_b = ir.node("Expand", [sin, shape.outputs[0]])
        graph.insert_before(node, [batch, shape, cos_b, sin_b])
        node.replace_input_with(1, cos_b.outputs[0])
        node.replace_input_with(2, sin_b.outputs[0])
        n += 1
    return n


def _same_batch(x: ir.Value, cache: ir.Value) -> bool:
    """Is the cache's dim 0 known to equal x's (the same static size or symbolic dim)?"""
    if x.shape is None or cache.shape is None or len(x.shape) == 0 or len(cache.shape) == 0:
        return False
    a, b = x.shape[0], cache.shape[0]
    if isinstance(a, int) or isinstance(b, int):
        return a == b
    return a.value is not None and a.value == b.value


# --------------------------------------------------------------------------- runtime forms


@dataclass(frozen=True)
class _GroupNorm:
    groups: int
    channels: int
    rank: int
    eps: float


def _groupnorm(x: ir.Value, scale: ir.Value, y: ir.Value) -> _GroupNorm | str:
    """The parameters of the matched ``GroupNormalization`` producing ``y``, or why it cannot take
    the InstanceNormalization form."""
    if x.shape is None or len(x.shape) < 3 or not isinstance(x.shape[1], int):
        return "rank or channel count unknown"
    node = y.producer()
    if node is None:
        return "no producer"
    c = int(x.shape[1])
    if scale.shape is None or list(scale.shape) != [c]:
        return "scale is per group (opset 18 layout)"
    eps = node.attributes.get_float("epsilon", 1e-5)
    return _GroupNorm(node.attributes.get_int("num_groups", 1), c, len(x.shape), eps)


def groupnorm_as_instancenorm(model: ir.Model) -> int:
    """``GroupNormalization`` (opset 18/21) has no onnxruntime kernel (CPU or CUDA) and is
    expanded into ~30 small ops; rewrite it as the opset-20 form the exporter uses below 21::

        GN(x, γ, β) = InstanceNormalization(reshape(x, [N, G, -1]), 1, 0) reshaped back · γ_c + β_c

    (exact: both normalize each (sample, group) over its channels and positions). onnxruntime's
    ``GroupNorm`` contrib op would be fused on CUDA too, but it wants NHWC and has no CPU kernel.
    The rule reads everything it needs from its bindings (no state between check and rewrite)."""
    from onnxscript.rewriter import pattern

    class Rule(pattern.RewriteRuleClassBase):
        def pattern(self, op, x, scale, bias):
            return op.GroupNormalization(
                x, scale, bias, _allow_other_attributes=True, _outputs=["y"]
            )

        def check(self, context, x, scale, bias, y, **_):
            found = _groupnorm(x, scale, y)
            result = pattern.MatchResult()
            return result.fail(found, x) if isinstance(found, str) else result

        def rewrite(self, op, x, scale, bias, y, **_):
            gn = _groupnorm(x, scale, y)
            assert isinstance(gn, _GroupNorm)  # check() accepted these bindings
            dt = x.dtype.numpy() if x.dtype is not None else np.float32
            tag = f"{x.name or id(x)}_"  # initializer names must be unique per rewritten GroupNorm

            def const(name: str, array: np.ndarray):
                return op.initializer(ir.tensor(array), name=f"{tag}{name}")

            grouped = op.Reshape(x, const("gn_shape", np.array([0, gn.groups, -1], np.int64)))
            ones = const("gn_ones", np.ones(gn.groups, dtype=dt))
            zeros = const("gn_zeros", np.zeros(gn.groups, dtype=dt))
            normed = op.Reshape(
                op.InstanceNormalization(grouped, ones, zeros, epsilon=gn.eps), op.Shape(x)
            )
            per_c = const("gn_cshape", np.array([gn.channels] + [1] * (gn.rank - 2), np.int64))
            return op.Add(op.Mul(normed, op.Reshape(scale, per_c)), op.Reshape(bias, per_c))

    return pattern.RewriteRuleSet([Rule.rule("GroupNormAsInstanceNorm")]).apply_to_model(model)
