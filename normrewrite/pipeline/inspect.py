"""``inspect``: every norm of a model, where it sits, and what each pass could do with it —
for torch graphs and ONNX inputs alike."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from normrewrite.analysis.norms import Norm, find_norms
from normrewrite.analysis.residual import norm_placements
from normrewrite.analysis.scale_invariance import analyze
from normrewrite.core.graph import count_ops, node_shape
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
        model,
        example_inputs,
        input_specs=input_specs,
        tracer=tracer,
        trust_remote_code=trust_remote_code,
        seed=seed,
        trust_pickle=trust_pickle,
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
    for norm in find_norms(gm):
        shape = node_shape(norm.input if norm.kind == "weightnorm" else norm.node)
        acts: dict[str, str] = {}
        for n in norm.nodes:
            acts.update(actions.get(n.name, {}))
        if not acts:
            acts = {"-": _no_action(norm)}
        entries.append(
            NormEntry(
                name=norm.label,
                type=norm.kind,
                shape=list(shape) if shape else None,
                eps=norm.eps,
                affine=norm.scale != "none" or norm.shift,
                node=norm.node.name,
                actions=acts,
                placement=placed[norm.node].placement if norm.node in placed else "other",
                block=placed[norm.node].block if norm.node in placed else None,
                axes=None if norm.axes is None else list(norm.axes),
                scale=norm.scale,
                shift=norm.shift,
                form=norm.form,
                casts=list(norm.casts),
                reason=norm.reason,
                source_axes=None if norm.source_axes is None else list(norm.source_axes),
                source_shape=list(s) if (s := node_shape(norm.source)) else None,
            )
        )
    si = analyze(gm)
    return InspectResult(
        loaded.description,
        tracer_used,
        describe(loaded.example_inputs),
        entries,
        count_ops(gm),
        {"summary": si.summary(), **si.to_json()},
    )


def _no_action(norm: Norm) -> str:
    """Why no registered pass acts on ``norm``."""
    if norm.kind == "unknown":
        return f"unknown normalization-like: {norm.reason}"
    if norm.kind == "weightnorm":
        return "weight norm: no pass matched it (remove-weight-norm folds stored g/v)"
    if norm.kind in ("l2norm", "grn"):
        return f"{norm.kind}: no pass rewrites this kind"
    return "no pass matches this norm"


def _inspect_onnx(path: Path, limits: OnnxLimits | None = None) -> InspectResult:
    """``inspect`` of an ONNX model: its norm ops, their placement, and what the ONNX passes
    could do (BatchNorms to fold, decomposed norms to fuse)."""
    from normrewrite.analysis.onnx_norms import onnx_norms, placement
    from normrewrite.core.onnx_graph import const_array, count_nodes, infer_shapes, model_opset
    from normrewrite.load.onnx import load_onnx
    from normrewrite.passes import ONNX_REGISTRY

    model = load_onnx(path, limits)
    actions: dict[str, dict[str, str]] = {}
    for cls in ONNX_REGISTRY:
        for node_name, text in cls().explain(model).items():
            actions.setdefault(node_name, {})[cls.name] = text
    infer_shapes(model)  # shapes and axes of the norms' inputs
    entries = []
    for m in onnx_norms(model):
        n = m.node
        gamma = n.inputs[1] if m.form == "op" and len(n.inputs) > 1 else None
        if n.op_type.startswith("Skip"):  # (input, skip, gamma, [beta])
            gamma = n.inputs[2] if len(n.inputs) > 2 else None
        affine = gamma is not None and ((arr := const_array(gamma)) is None or not (arr == 1).all())
        entries.append(
            NormEntry(
                n.name or n.outputs[0].name,
                m.kind,
                m.shape,
                m.eps,
                bool(affine),
                n.name,
                actions.get(n.name, {}),
                placement(n) if m.form == "op" else "other",
                axes=m.axes,
                form=m.form,
                reason=m.reason,
            )
        )
    inputs = [f"{v.name}: {'x'.join(str(d) for d in (v.shape or ()))}" for v in model.graph.inputs]
    return InspectResult(
        str(path), f"onnx (opset {model_opset(model)})", inputs, entries, count_nodes(model)
    )
