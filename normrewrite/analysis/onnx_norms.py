"""Norms in ONNX graphs: the fused norm ops, the decomposed ones (``ReduceMean → Add → Sqrt``),
and a structural guess of each norm's placement around residual adds (ONNX graphs carry no module
paths). Used by ``inspect``, by fuse-norm (what stayed decomposed) and by the ONNX pipeline (which
precision decomposed norms reduce in)."""

from __future__ import annotations

from typing import Literal

import onnx_ir as ir

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
