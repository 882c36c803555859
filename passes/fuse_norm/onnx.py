"""fuse-norm on ONNX models: decomposed LayerNorm / RMSNorm subgraphs → one fused node.

Identities (``E`` = ReduceMean over the trailing axes ``A = [-k..-1]``, keepdims)::

    LayerNorm:  (x - E[x]) / sqrt(E[(x - E[x])²] + ε) · γ + β  =  LayerNormalization(x, γ, β, axis=-k, ε)
    RMSNorm:    x / sqrt(E[x²] + ε) · γ                       =  RMSNormalization(x, γ, axis=-k, ε)

with the spellings exporters use for each step: ``Pow(d, 2)`` or ``Mul(d, d)``; ``Div(d, s)``,
``Mul(d, Reciprocal(s))`` or ``Mul(d, Div(1, s))``; optional ``Cast`` to a wider compute type
around the normalization (kept as ``stash_type``); γ and β in either operand order; axes as an
attribute (opset < 18) or an input, written as ``-1`` **or as the last positive index** (torch's
own ``rms_norm`` decomposition writes ``rank - 1``, which the exporter's rules miss).

The fused op depends on the target: ``LayerNormalization`` needs opset 17 (onnxruntime also runs
it below, as a contrib op, for ``--onnx-target ort``); RMSNorm becomes ``RMSNormalization`` at
opset ≥ 23, onnxruntime's ``SimplifiedLayerNormalization`` for ``ort`` below 23, and stays
decomposed for ``standard`` below 23 (no standard op; reported as skipped). The fused ops compute
in fp32 (``stash_type=1``) for fp16/bf16 inputs, which also fixes fp16 overflow of ``x²``.

Preconditions (``check``): both reductions over the same trailing axes of an input of known rank,
keepdims=1; ε a scalar constant; γ/β of the normalized shape (leading 1s are squeezed); float x.
Exact up to float rounding (the fused kernels use a different summation order).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter._basics import MatchResult

from normrewrite.analysis.onnx_norms import decomposed_norms
from normrewrite.core.onnx_graph import const_array, default_opset, infer_shapes, model_opset
from normrewrite.core.onnx_pass import OnnxPass, OnnxPassResult, Target
from normrewrite.core.pass_infra import Change, Skip

FLOATS = frozenset(
    {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}
)


def reduce_axes(node: ir.Node) -> list[int] | None:
    """The axes of a ReduceMean, from its attribute (opset < 18) or its constant input."""
    attr = node.attributes.get("axes")
    if attr is not None:
        return list(attr.value)
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        arr = const_array(node.inputs[1])
        return None if arr is None else [int(a) for a in arr.reshape(-1)]
    return None


def trailing_axis(node: ir.Node, rank: int | None) -> int | str:
    """``-k`` when ``node`` (a ReduceMean, keepdims) reduces exactly the last k axes, else why not."""
    keep = node.attributes.get("keepdims")
    if keep is not None and keep.value == 0:
        return "the reduction drops its axes (keepdims=0)"
    axes = reduce_axes(node)
    if not axes:
        return "the reduction axes are not constant"
    if any(a >= 0 for a in axes) and rank is None:
        return "the reduction axes are positive and the input rank is unknown"
    norm = sorted(a - rank if a >= 0 else a for a in axes) if rank is not None else sorted(axes)
    k = len(norm)
    if norm != list(range(-k, 0)):
        return f"the reduction axes {axes} are not the trailing axes"
    return -k


@dataclass(frozen=True)
class Emit:
    """Where the fused op goes: target runtime and opset of the model being rewritten."""

    target: Target
    opset: int

    def layer_norm(self) -> str | None:
        if self.opset >= 17 or self.target == "ort":
            return None
        return f"LayerNormalization needs opset 17 (this model is opset {self.opset}); use --onnx-target ort"

    def rms_norm(self) -> tuple[str, str | None]:
        if self.opset >= 23:
            return "RMSNormalization", None
        if self.target == "ort":
            return "SimplifiedLayerNormalization", None
        return (
            "",
            f"no standard RMSNorm op below opset 23 (model is opset {self.opset}); use --onnx-target ort or --opset 23",
        )


class Normalize(enum.Enum):
    """How an exporter spelled the division of the centred (or raw) input ``d`` by the norm ``s``."""

    DIV = "Div(d, s)"
    RECIPROCAL = "Mul(d, Reciprocal(s))"
    DIV_ONE = "Mul(d, Div(1, s))"

    def pattern(self, op, d, s):
        if self is Normalize.DIV:
            return op.Div(d, s)
        if self is Normalize.RECIPROCAL:
            return op.Mul(d, op.Reciprocal(s))
        return op.Mul(d, op.Div(1.0, s))


def stash_type(x: ir.Value) -> ir.DataType:
    """The precision the fused op computes in (its ``stash_type``): float for float/fp16/bf16
    inputs (fp16 x² overflows at |x| > 256), double for double."""
    low = (ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.FLOAT, None)
    return ir.DataType.FLOAT if x.dtype in low else ir.DataType.DOUBLE


@dataclass(frozen=True)
class NormMatch:
    """What a matched decomposed norm fuses into: the first normalized axis and ε."""

    axis: int
    eps: float


def match_norm(
    x: ir.Value,
    eps: ir.Value,
    reductions: list[ir.Value],
    scale: ir.Value | None,
    bias: ir.Value | None,
) -> NormMatch | MatchResult:
    """The fused form of a matched chain (bound values), or the failed match with its reason."""
    result = MatchResult()
    if x.dtype is not None and x.dtype not in FLOATS:
        return result.fail("x is not a float tensor", x)
    e = const_array(eps)
    if e is None or e.size != 1:
        return result.fail("epsilon is not a scalar constant", eps)
    rank = None if x.shape is None else len(x.shape)
    axes = []
    for r in reductions:
        producer = r.producer()
        a = trailing_axis(producer, rank) if producer is not None else "no reduction node"
        if isinstance(a, str):
            return result.fail(a, r)
        axes.append(a)
    if not axes or any(a != axes[0] for a in axes):
        return result.fail("the two reductions use different axes", reductions[-1])
    axis = axes[0]
    static = x.shape is not None and all(isinstance(d, int) for d in list(x.shape)[axis:])
    if scale is None and not static:  # γ = 1 is materialized: the normalized dims must be static
        why = _param_problem(eps, x, axis) if x.shape is None else None
        return result.fail(why or "the normalized dims are not static", x)
    for name, v in (("scale", scale), ("bias", bias)):
        if v is None:
            continue
        why = _param_problem(v, x, axis)
        if why:
            return result.fail(f"{name}: {why}", v)
    return NormMatch(axis, float(e.reshape(-1)[0]))


class _NormRule(pattern.RewriteRuleClassBase):
    """Shared parts of the LayerNorm and RMSNorm rules. A rule instance is one spelling of the
    pattern (operand order, :class:`Normalize`, which of γ/β); everything about a match is
    recomputed from the bindings (:func:`match_norm`), never kept on the rule."""

    def __init__(
        self,
        name: str,
        emit: Emit,
        *,
        swap: bool = False,
        scale: bool = True,
        bias: bool = False,
        normalize: Normalize = Normalize.DIV,
        swap_add: bool = False,
    ) -> None:
        super().__init__(name, remove_nodes=False)
        self.emit, self.swap, self.scale, self.bias = emit, swap, scale, bias
        self.normalize, self.swap_add = normalize, swap_add

    def _scaled(self, op, normed, scale):
        return op.Mul(scale, normed) if self.swap else op.Mul(normed, scale)

    @staticmethod
    def _param(op, v: ir.Value | None, x: ir.Value, axis: int):
        """γ/β squeezed to the normalized shape (a constant is re-stored; a tensor is reshaped)."""
        if v is None:
            return None
        arr = const_array(v)
        want = list(x.shape)[axis:] if x.shape is not None else None
        if arr is not None:
            if want is not None and all(isinstance(d, int) for d in want):
                arr = np.broadcast_to(arr, want) if arr.size != np.prod(want) else arr.reshape(want)
            return op.initializer(ir.tensor(np.ascontiguousarray(arr)), name=f"{v.name}_norm")
        return v

    @staticmethod
    def _ones(op, x: ir.Value, axis: int):
        want = list(x.shape)[axis:]
        dt = x.dtype.numpy() if x.dtype is not None else np.float32
        return op.initializer(ir.tensor(np.ones(want, dtype=dt)), name="norm_ones")


def _param_problem(v: ir.Value, x: ir.Value, axis: int) -> str | None:
    if x.shape is None or v.shape is None:
        return "shape unknown"
    want = list(x.shape)[axis:]
    if not all(isinstance(d, int) for d in want):
        return "the normalized dims are not static"
    shape = list(v.shape)
    while shape and shape[0] == 1 and len(shape) > len(want):
        shape = shape[1:]
    if shape == want:
        return None
    if const_array(v) is not None and int(np.prod([d for d in shape if isinstance(d, int)])) == 1:
        return None  # a scalar: broadcast to the normalized shape
    return f"shape {list(v.shape)} is not the normalized shape {want}"


class LayerNormRule(_NormRule):
    def pattern(self, op, x, scale, bias, eps, compute, out_dtype):
        xc = pattern.OrValue([op.Cast(x, to=compute), x])
        mean = op.ReduceMean(
            xc, _allow_other_inputs=True, _allow_other_attributes=True, _outputs=["mean"]
        )
        d = op.Sub(xc, mean)
        sq = pattern.OrValue([op.Pow(d, 2.0), op.Pow(d, 2), op.Mul(d, d)])
        var = op.ReduceMean(
            sq, _allow_other_inputs=True, _allow_other_attributes=True, _outputs=["var"]
        )
        std = op.Sqrt(op.Add(var, eps))
        normed = self.normalize.pattern(op, d, std)
        if not self.scale and not self.bias:
            return normed  # (a returned value cannot be a choice)
        normed = pattern.OrValue([op.Cast(normed, to=out_dtype), normed])
        y = self._scaled(op, normed, scale) if self.scale else normed
        if not self.bias:
            return y
        return op.Add(bias, y) if self.swap_add else op.Add(y, bias)

    def check(self, context, x, eps, mean, var, scale=None, bias=None, **_) -> MatchResult:
        why = self.emit.layer_norm()
        if why:
            return MatchResult().fail(why)
        m = match_norm(x, eps, [mean, var], scale, bias)
        return m if isinstance(m, MatchResult) else MatchResult()

    def rewrite(self, op, x, eps, mean, var, compute=None, scale=None, bias=None, **_):
        m = match_norm(x, eps, [mean, var], scale, bias)
        assert isinstance(m, NormMatch)  # check() accepted these bindings
        s = self._param(op, scale, x, m.axis) if scale is not None else self._ones(op, x, m.axis)
        inputs = [x, s] + ([self._param(op, bias, x, m.axis)] if bias is not None else [])
        return op.LayerNormalization(
            *inputs, axis=m.axis, epsilon=m.eps, stash_type=stash_type(x).value
        )


class RmsNormRule(_NormRule):
    def pattern(self, op, x, scale, eps, compute, out_dtype):
        xc = pattern.OrValue([op.Cast(x, to=compute), x])
        sq = pattern.OrValue([op.Pow(xc, 2.0), op.Pow(xc, 2), op.Mul(xc, xc)])
        ms = op.ReduceMean(
            sq, _allow_other_inputs=True, _allow_other_attributes=True, _outputs=["ms"]
        )
        rms = op.Sqrt(op.Add(ms, eps))
        normed = self.normalize.pattern(op, xc, rms)
        if not self.scale:
            return normed
        normed = pattern.OrValue([op.Cast(normed, to=out_dtype), normed])
        return self._scaled(op, normed, scale)

    def check(self, context, x, eps, ms, scale=None, compute=None, **_) -> MatchResult:
        _, why = self.emit.rms_norm()
        # no fused op: an fp16/bf16 chain is still rewritten to reduce in fp32 (x² overflows
        # fp16 at |x| > 256; onnxruntime-CPU may hide that, a GPU does not)
        low = x.dtype in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16) and compute is None
        if why and not low:
            return MatchResult().fail(why)
        m = match_norm(x, eps, [ms], scale, None)
        return m if isinstance(m, MatchResult) else MatchResult()

    def rewrite(self, op, x, eps, ms, scale=None, **_):
        m = match_norm(x, eps, [ms], scale, None)
        assert isinstance(m, NormMatch)  # check() accepted these bindings
        name, why = self.emit.rms_norm()
        if why:  # no fused op (check() let only fp16/bf16 chains through): reduce in fp32
            f32 = op.Cast(x, to=ir.DataType.FLOAT)
            mean = op.ReduceMean(op.Mul(f32, f32), op.Constant(value_ints=[m.axis]), keepdims=1)
            eps32 = op.Constant(value=ir.tensor(np.array(m.eps, dtype=np.float32)))
            normed = op.Cast(op.Mul(f32, op.Reciprocal(op.Sqrt(op.Add(mean, eps32)))), to=x.dtype)
            return normed if scale is None else op.Mul(normed, scale)
        s = self._param(op, scale, x, m.axis) if scale is not None else self._ones(op, x, m.axis)
        return getattr(op, name)(x, s, axis=m.axis, epsilon=m.eps, stash_type=stash_type(x).value)


def rules(emit: Emit) -> list[list[pattern.RewriteRule]]:
    """Rule sets in the order they must run: full (scaled, biased) forms before their prefixes."""

    def variants(cls, **kw):
        return [
            cls.rule(f"{cls.__name__}-{i}", emit, swap=s, normalize=n, **kw)
            for i, (s, n) in enumerate((s, n) for s in (False, True) for n in Normalize)
        ]

    # LayerNorm first: x - E[x] normalized by RMS is also an RMSNorm of a centred input
    return [
        variants(LayerNormRule, bias=True) + variants(LayerNormRule, bias=True, swap_add=True),
        variants(LayerNormRule) + variants(LayerNormRule, scale=False, bias=True),
        variants(LayerNormRule, scale=False),
        variants(RmsNormRule),
        variants(RmsNormRule, scale=False),
    ]


FUSED = frozenset({"LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization"})


@dataclass(frozen=True)
class FuseNormOptions:
    pass


class OnnxFuseNorm(OnnxPass):
    name = "fuse-norm"
    summary = "fuse decomposed LayerNorm/RMSNorm subgraphs into one LayerNormalization/RMSNormalization node (exact)"
    exact = True
    Options = FuseNormOptions

    def call(self, model: ir.Model) -> OnnxPassResult:
        import onnxscript.optimizer
        from onnx_ir.passes.common import NameFixPass, RemoveUnusedNodesPass

        emit = Emit(self.context.target, model_opset(model) or default_opset())
        onnxscript.optimizer.basic_constant_propagation(model.graph)
        infer_shapes(model)
        before = {id(n) for n in model.graph.all_nodes() if n.op_type in FUSED}
        before_rm = {id(n) for n in model.graph.all_nodes() if n.op_type == "ReduceMean"}
        for group in rules(emit):
            if pattern.RewriteRuleSet(group).apply_to_model(model):
                RemoveUnusedNodesPass()(model)
        new = [n for n in model.graph.all_nodes() if n.op_type in FUSED and id(n) not in before]
        upcast = [
            n
            for n in model.graph.all_nodes()
            if n.op_type == "ReduceMean" and id(n) not in before_rm
        ]
        if new or upcast:
            NameFixPass()(model)
            infer_shapes(model)
        changes = [
            Change(
                n.outputs[0].name or n.name,
                f"fused into {n.op_type} (axis {n.attributes['axis'].value})",
            )
            for n in new
        ]
        changes += [
            Change(
                n.outputs[0].name or n.name,
                "decomposed RMSNorm now reduces in float32 (no fused op)",
            )
            for n in upcast
        ]
        fused = len(new) + len(upcast)
        done = {id(n) for n in upcast}
        skipped = [
            Skip(n.name or n.outputs[0].name, self._why(n, emit))
            for n in decomposed_norms(model)
            if id(n) not in done
        ]
        return OnnxPassResult(model, fused > 0, changes, skipped)

    @staticmethod
    def _why(node: ir.Node, emit: Emit) -> str:
        centred = (
            node.inputs[0] is not None
            and node.inputs[0].producer() is not None
            and any(n.op_type == "Sub" for n in node.inputs[0].producer().predecessors())
        ) or (
            node.inputs[0] is not None
            and node.inputs[0].producer() is not None
            and node.inputs[0].producer().op_type == "Sub"
        )
        why = emit.layer_norm() if centred else emit.rms_norm()[1]
        return why or "a decomposed norm whose structure or shapes do not match LayerNorm/RMSNorm"

    def explain(self, model: ir.Model) -> dict[str, str]:
        return {
            n.name: "decomposed norm: fuse-norm would try to fuse it"
            for n in decomposed_norms(model)
        }


__all__ = [
    "Emit",
    "LayerNormRule",
    "NormMatch",
    "Normalize",
    "OnnxFuseNorm",
    "RmsNormRule",
    "match_norm",
    "rules",
    "trailing_axis",
]
