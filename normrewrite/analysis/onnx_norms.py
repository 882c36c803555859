"""Norms in ONNX graphs: the fused norm ops, the decomposed ones (``ReduceMean → Add → Sqrt``),
and a structural guess of each norm's placement around residual adds (ONNX graphs carry no module
paths). Used by ``inspect``, by fuse-norm (what stayed decomposed) and by the ONNX pipeline (which
precision decomposed norms reduce in)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import onnx_ir as ir

from normrewrite.core.onnx_graph import const_array

NORM_OPS = frozenset(
    {
        "BatchNormalization",
        "LayerNormalization",
        "RMSNormalization",
        "GroupNormalization",
        "InstanceNormalization",
        "SimplifiedLayerNormalization",
        "SkipLayerNormalization",
        "SkipSimplifiedLayerNormalization",
        "LpNormalization",
        "MeanVarianceNormalization",
    }
)

Placement = Literal["pre", "post", "other"]

# the fused op's kind in the one norm model's vocabulary (normrewrite.analysis.norms.Kind);
# LpNormalization and MeanVarianceNormalization depend on their attributes (see op_kind)
_KINDS = {
    "BatchNormalization": "batchnorm",
    "LayerNormalization": "layernorm",
    "SkipLayerNormalization": "layernorm",
    "RMSNormalization": "rmsnorm",
    "SimplifiedLayerNormalization": "rmsnorm",
    "SkipSimplifiedLayerNormalization": "rmsnorm",
    "GroupNormalization": "groupnorm",
    "InstanceNormalization": "instancenorm",
}


@dataclass(frozen=True)
class OnnxNorm:
    """One norm of an ONNX graph: a fused op (``form`` "op") or the ``ReduceMean`` starting a
    decomposed one (``form`` "decomposed"). ``axes`` are the normalized axes of the input."""

    node: ir.Node
    kind: str
    form: Literal["op", "decomposed"]
    shape: list[int] | None
    axes: list[int] | None
    eps: float | None
    reason: str | None = None  # kind "unknown": why


def norm_nodes(model: ir.Model) -> list[ir.Node]:
    """Every fused norm op of the model, subgraphs included."""
    return [n for n in model.graph.all_nodes() if n.op_type in NORM_OPS]


def decomposed_norms(model: ir.Model) -> list[ir.Node]:
    """The ``ReduceMean`` nodes that start a decomposed norm: their output feeds an ``Add`` (of ε)
    whose output feeds a ``Sqrt`` — the mean of squares (RMSNorm) or the variance (LayerNorm)."""
    out = []
    for n in model.graph.all_nodes():
        if n.op_type != "ReduceMean":
            continue
        if any(
            u.node.op_type == "Add"
            and any(w.node.op_type == "Sqrt" for w in u.node.outputs[0].uses())
            for u in n.outputs[0].uses()
        ):
            out.append(n)
    return out


def decomposed_norm_dtypes(model: ir.Model) -> list[str]:
    """Element types the decomposed norms reduce in (their ReduceMean inputs): with --dtype
    float16 every one must be float (fp16 x² overflows at |x| > 256)."""
    dtypes = [n.inputs[0].dtype for n in decomposed_norms(model) if n.inputs[0] is not None]
    return ["unknown" if dt is None else dt.name for dt in dtypes]


def placement(node: ir.Node) -> Placement:
    """pre / post / other: is the norm fed by a residual Add (post) or does its input also feed an
    Add further on (pre)? A structural guess for ONNX graphs (no module paths)."""
    x = node.inputs[0]
    if x is None:
        return "other"
    prod = x.producer()
    if prod is not None and prod.op_type == "Add" and len(x.uses()) == 1:
        return "post"
    if len(x.uses()) > 1 and any(u.node.op_type == "Add" for u in x.uses()):
        return "pre"
    return "other"


def decomposed_kind(node: ir.Node) -> str:
    """The kind of the decomposed norm a :func:`decomposed_norms` ``ReduceMean`` starts: layernorm
    when it averages a centred value (``x − mean(x)``, squared), rmsnorm when it averages ``x²``."""
    src = node.inputs[0]
    prod = src.producer() if src is not None else None
    if prod is None or prod.op_type not in ("Pow", "Mul"):
        return "unknown"
    base = prod.inputs[0]
    base_prod = base.producer() if base is not None else None
    return "layernorm" if base_prod is not None and base_prod.op_type == "Sub" else "rmsnorm"


def _shape(v: ir.Value | None) -> list[int] | None:
    if v is None or v.shape is None:
        return None
    return [d if isinstance(d, int) else -1 for d in v.shape]


def _attr(node: ir.Node, name: str, default: object = None) -> object:
    a = node.attributes.get(name)
    return default if a is None else a.value


def op_kind(node: ir.Node, rank: int | None) -> tuple[str, list[int] | None, str | None]:
    """(kind, normalized axes, reason when unknown) of a fused norm op of :data:`NORM_OPS`."""
    op = node.op_type
    if rank is None:
        axes = None
    elif op in ("BatchNormalization",):
        axes = [0, *range(2, rank)]
    elif op == "InstanceNormalization":
        axes = list(range(2, rank))
    elif op == "GroupNormalization":
        axes = list(range(1, rank))
    elif op in ("LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization"):
        axes = list(range(int(_attr(node, "axis", -1)) % rank, rank))  # type: ignore[call-overload]
    else:  # Skip*: the last dim; Lp/MVN below
        axes = [rank - 1]
    if op in _KINDS:
        return _KINDS[op], axes, None
    if op == "LpNormalization":
        axis, p = int(_attr(node, "axis", -1)), int(_attr(node, "p", 2))  # type: ignore[call-overload]
        if p != 2:
            return "unknown", None, f"L{p} normalization (only L2 is a known kind)"
        return "l2norm", None if rank is None else [axis % rank], None
    # MeanVarianceNormalization: (x − mean) / std over ``axes`` (default 0, 2, 3), no ε, no affine
    mvn = [int(a) for a in _attr(node, "axes", [0, 2, 3])]  # type: ignore[union-attr]
    if rank is not None:
        mvn = sorted(a % rank for a in mvn)
        if mvn == list(range(mvn[0], rank)) and mvn[0] >= 1:
            return "layernorm", mvn, None
        if mvn == [0, *range(2, rank)]:
            return "batchnorm", mvn, None
    return "unknown", mvn, f"MeanVarianceNormalization over axes {mvn}"


def _decomposed_eps(node: ir.Node) -> float | None:
    for use in node.outputs[0].uses():
        add = use.node
        if add.op_type == "Add":
            for v in add.inputs:
                arr = None if v is None or v is node.outputs[0] else const_array(v)
                if arr is not None and arr.size == 1:
                    return float(arr.reshape(()))
    return None


def _decomposed_input(node: ir.Node) -> ir.Value | None:
    """x of ``mean(x²)`` / ``mean((x − x̄)²)``."""
    src = node.inputs[0]
    prod = src.producer() if src is not None else None
    base = prod.inputs[0] if prod is not None and prod.op_type in ("Pow", "Mul") else None
    base_prod = base.producer() if base is not None else None
    if base_prod is not None and base_prod.op_type == "Sub":
        return base_prod.inputs[0]
    return base


def onnx_norms(model: ir.Model) -> list[OnnxNorm]:
    """Every norm of ``model``: its fused norm ops, then its decomposed norms. Shapes and axes
    are what the graph records (run :func:`~normrewrite.core.onnx_graph.infer_shapes` first)."""
    out = []
    for n in norm_nodes(model):
        shape = _shape(n.inputs[0])
        if shape is None and n.op_type.startswith("Skip") and len(n.inputs) > 1:
            shape = _shape(n.inputs[1])  # the skip input has the input's shape
        kind, axes, why = op_kind(n, None if shape is None else len(shape))
        eps = _attr(n, "epsilon")
        out.append(OnnxNorm(n, kind, "op", shape, axes, None if eps is None else float(eps), why))  # type: ignore[arg-type]
    for n in decomposed_norms(model):
        kind = decomposed_kind(n)
        shape = _shape(_decomposed_input(n))
        axes = _attr(n, "axes")
        if axes is None and len(n.inputs) > 1 and n.inputs[1] is not None:
            arr = const_array(n.inputs[1])
            axes = None if arr is None else arr.reshape(-1).tolist()
        if axes is not None and shape is not None:
            axes = sorted(int(a) % len(shape) for a in axes)  # type: ignore[union-attr]
        elif axes is not None and min(axes) < 0:  # type: ignore[call-overload]
            axes = None  # negative with an unknown rank
        why = "ReduceMean…Sqrt of an unrecognised value" if kind == "unknown" else None
        out.append(OnnxNorm(n, kind, "decomposed", shape, axes, _decomposed_eps(n), why))  # type: ignore[arg-type]
    return out
