"""The pipeline's emission stage for torch graphs: plan the outputs before any work, then write
each one (``.pt2``, code directory, AOTInductor package, ONNX) from one exported program, checking
each against the original where it can be run."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule

from normrewrite import emit
from normrewrite.core.pass_infra import Pass, PassContext
from normrewrite.emit.onnx.options import DTYPE_RTOL, OnnxOptions
from normrewrite.emit.plan import check_output, companions, plan_outputs, read_paths
from normrewrite.errors import VerifyError
from normrewrite.passes import REGISTRY, norm_fusions
from normrewrite.report import OutputReport, PassReport, Report


def check_outputs(
    model: Any, pipeline: Sequence[Any], outputs: Sequence[Path], report: Path | None, force: bool
) -> list[Path]:
    """Refuse outputs that would destroy an input or each other, existing outputs without
    ``force`` and unwritable directories, before any work; return the paths the run creates."""
    source = model if isinstance(model, str | os.PathLike) else None
    plan_outputs(list(outputs), inputs=read_paths(source, list(pipeline)), report=report)
    dests = [*outputs, *(c for o in outputs for c in companions(o)), *([report] if report else [])]
    for p in [*outputs, *([report] if report else [])]:
        check_output(p, force=force)
    return dests


def fix_for_onnx(gm: GraphModule, ctx: PassContext, report: Report) -> bool:
    """Before ONNX emission: repair what torch.onnx.export cannot take (passes/fix_export.py);
    whether it changed the graph."""
    fix: Pass = REGISTRY.create("fix-export")
    result = fix(gm, ctx)
    if result.modified:
        report.passes.append(PassReport(fix.name, fix.describe(), fix.exact, True, result.changes,
                                        result.skipped, ["run automatically before ONNX emission", *result.notes]))
    return result.modified


def write_output(ep: torch.export.ExportedProgram, path: Path, fmt: str, report: Report) -> OutputReport:
    """A ``.pt2`` program or a code + weights directory."""
    if fmt == "pt2":
        r = emit.write_pt2(ep, path)
        return OutputReport(r.path, r.format)
    r = emit.write_dir(ep, path, title=f"{report.model}, rewritten by normrewrite")
    return OutputReport(r.path, r.format)


def write_onnx(
    ep: torch.export.ExportedProgram,
    path: Path,
    inputs: tuple[Any, ...],
    reference: list[torch.Tensor] | None,
    rtol: float,
    report: Report,
    options: OnnxOptions,
    module: nn.Module,
) -> OutputReport:
    """An ONNX output through the one ONNX pipeline (:func:`normrewrite.emit.onnx.pipeline.emit_program`),
    gated on onnxruntime parity when the passes are exact."""
    from normrewrite.emit.onnx.pipeline import emit_program

    tol = max(rtol, 1e-4, DTYPE_RTOL[options.dtype])

    def gate(cmp: Any) -> None:
        if report.exact and not cmp.within(tol):
            raise VerifyError(
                f"onnxruntime output of {path} differs from the original model: max rel err "
                f"{cmp.max_rel_err:.3g} > {tol:g}; nothing written"
            )

    r = emit_program(ep, path, inputs, reference, options, fusions=norm_fusions(), module=module, check=gate)
    out = OutputReport(r.path, "onnx", r.parity.max_abs_err if r.parity else None,
                       r.parity.max_rel_err if r.parity else None)
    out.notes.extend([f"opset {r.opset}, {r.nodes} nodes, target {options.target}, {options.dtype}", *r.notes])
    return out
