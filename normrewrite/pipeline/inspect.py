"""``inspect``: every norm of a model, where it sits, and what each pass could do with it —
for torch graphs and ONNX inputs alike."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from normrewrite.analysis.residual import norm_placements
from normrewrite.analysis.scale_invariance import analyze
from normrewrite.core.graph import count_ops, node_label, node_shape
from normrewrite.core.ops import norms
from normrewrite.core.pass_infra import PassContext
from normrewrite.errors import UsageError
from normrewrite.load.inputs import InputSpec, describe
from normrewrite.passes import REGISTRY
from normrewrite.pipeline.prepare import ModelLike, prepare
from normrewrite.pipeline.results import InspectResult, NormEntry
from normrewrite.trace import Tracer

if TYPE_CHECKING:
    from normrewrite.load.onnx import OnnxLimits


def inspect(
    model: ModelLike,
    example_inputs: Any = None,
    *,
    input_specs: Sequence[InputSpec] | None = None,
    tracer: Tracer = "auto",
    trust_remote_code: bool = False,
    seed: int = 0,
    trust_pickle: bool = False,
    trust_native_code: bool = False,
    onnx_limits: OnnxLimits | None = None,
) -> InspectResult:
    """Every norm layer of ``model`` with what each registered pass could do with it."""
    if isinstance(model, str | os.PathLike) and os.fspath(model).endswith(".onnx"):
        return _inspect_onnx(Path(os.fspath(model)), onnx_limits)
    loaded, gm, tracer_used, _ = prepare(
        model, example_inputs, input_specs=input_specs, tracer=tracer,
        trust_remote_code=trust_remote_code, seed=seed, trust_pickle=trust_pickle,
        trust_native_code=trust_native_code,
    )
    ctx = PassContext(example_inputs=loaded.example_inputs, reference=loaded.module, seed=seed)
    actions: dict[str, dict[str, str]] = {}
    for cls in REGISTRY:
        try:
            pass_ = cls()
        except UsageError:  # a pass with required options has nothing to say without them
            continue
        for node_name, text in pass_.explain(gm, ctx).items():
            actions.setdefault(node_name, {})[cls.name] = text
    placed = {p.norm.node: p for p in norm_placements(gm)}
    entries = []
    for info in norms(gm):
        shape = node_shape(info.node)
        entries.append(
            NormEntry(
                name=node_label(info.op_node or info.node), type=info.kind,
                shape=list(shape) if shape else None, eps=info.eps,
                affine=info.has_weight or info.has_bias, node=info.node.name,
                actions=actions.get((info.op_node or info.node).name, {}),
                placement=placed[info.node].placement if info.node in placed else "other",
                block=placed[info.node].block if info.node in placed else None,
            )
        )
    si = analyze(gm)
    return InspectResult(loaded.description, tracer_used, describe(loaded.example_inputs), entries,
                         count_ops(gm), {"summary": si.summary(), **si.to_json()})


def _inspect_onnx(path: Path, limits: OnnxLimits | None = None) -> InspectResult:
    """``inspect`` of an ONNX model: its norm ops, their placement, and what the ONNX passes
    could do (BatchNorms to fold, decomposed norms to fuse)."""
    from normrewrite.analysis.onnx_norms import norm_nodes, placement
    from normrewrite.core.onnx_graph import const_array, count_nodes, model_opset
    from normrewrite.load.onnx import load_onnx
    from normrewrite.passes import ONNX_REGISTRY

    model = load_onnx(path, limits)
    actions: dict[str, dict[str, str]] = {}
    for cls in ONNX_REGISTRY:
        for node_name, text in cls().explain(model).items():
            actions.setdefault(node_name, {})[cls.name] = text
    entries = []
    for n in norm_nodes(model):
        eps = n.attributes.get("epsilon")
        x = n.inputs[0]
        shape = [d if isinstance(d, int) else -1 for d in x.shape] if x is not None and x.shape is not None else None
        affine = len(n.inputs) > 1 and n.inputs[1] is not None and (
            (arr := const_array(n.inputs[1])) is None or not (arr == 1).all())
        entries.append(NormEntry(n.name or n.outputs[0].name, n.op_type, shape,
                                 None if eps is None else float(eps.value), bool(affine), n.name,
                                 actions.get(n.name, {}), placement(n)))
    for name, acts in actions.items():
        if "fuse-norm" in acts:
            entries.append(NormEntry(name, "decomposed (ReduceMean…Sqrt)", None, None, False, name, acts))
    inputs = [f"{v.name}: {'x'.join(str(d) for d in (v.shape or ()))}" for v in model.graph.inputs]
    return InspectResult(str(path), f"onnx (opset {model_opset(model)})", inputs, entries, count_nodes(model))
