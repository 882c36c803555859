"""What the pipeline hands back: the conversion result and the inspection result."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule

from normrewrite.report import Report


@dataclass
class ConvertResult:
    graph_module: GraphModule | None  # None for ONNX and --meta conversions
    report: Report
    original: nn.Module | None
    example_inputs: tuple[Any, ...]
    exported: torch.export.ExportedProgram | None = None  # set when an output needed it
    onnx_model: Any = None  # the rewritten onnx_ir.Model, for .onnx inputs
    summary: list[str] = field(default_factory=list)  # --meta: what was written, one line each


@dataclass
class NormEntry:
    name: str
    type: str
    shape: list[int] | None
    eps: float | None
    affine: bool
    node: str
    actions: dict[str, str] = field(default_factory=dict)
    # pre / post / sandwich / final / other (normrewrite.analysis.residual)
    placement: str = "other"
    block: str | None = None  # the residual branch it belongs to (module path)
    # normrewrite.analysis.norms.Norm: normalized axes of the input, affine form, spelling
    axes: list[int] | None = None
    scale: str = "none"  # none / gamma / 1+gamma
    shift: bool = False
    form: str = "module"  # module / function / aten / written (onnx: op / decomposed)
    casts: list[str] = field(default_factory=list)
    reason: str | None = None  # kind "unknown": why it could not be classified
    # the normalized axes in the model's own layout: ``axes`` as dims of the value the norm's
    # input is computed from by layout ops only (transpose/permute/reshape); see Norm.source_axes
    source_axes: list[int] | None = None
    source_shape: list[int] | None = None


@dataclass
class InspectResult:
    model: str
    tracer: str
    inputs: list[str]
    norms: list[NormEntry]
    nodes: int
    # normrewrite.analysis.scale_invariance: summary, scale_invariant, undecided, not_invariant, norm_params
    scale_invariance: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
