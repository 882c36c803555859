"""ONNX in → ONNX out: the pipeline's configuration for an ``.onnx`` input. The file is loaded
(with its limits), the ONNX forms of the passes run through the one ONNX pipeline's stages
(:func:`normrewrite.emit.onnx.pipeline.transform`), the result is compared with the input in
onnxruntime and written."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import onnx_ir as ir

from normrewrite.core.onnx_graph import count_nodes, model_bytes, model_opset
from normrewrite.core.onnx_pass import OnnxPass
from normrewrite.emit.onnx.export import convert_opset
from normrewrite.emit.onnx.options import OnnxOptions
from normrewrite.emit.onnx.pipeline import (
    Cleanup,
    transform,
)
from normrewrite.emit.onnx.write import save_validated
from normrewrite.errors import UsageError, VerifyError
from normrewrite.load.onnx import OnnxLimits, load_onnx
from normrewrite.report import OutputReport, PassReport, Report, VerifyReport
from normrewrite.verify.onnxruntime import (
    make_feeds,
    relative_error,
    session,
)


def convert_onnx_file(
    src: Path,
    passes: Sequence[OnnxPass],
    outputs: Sequence[Path],
    options: OnnxOptions,
    *,
    limits: OnnxLimits | None = None,
    input_shapes: Sequence[Sequence[int]] | None = None,
    verify: bool = True,
    rtol: float = 1e-5,
    seed: int = 0,
    stage: Callable[[str], None] = lambda s: None,
) -> tuple[ir.Model, Any]:
    """The ONNX-in path: load ``src``, transform with ``passes``, compare the result with the
    input model in onnxruntime (graph optimizations off, so its own fusions cannot hide a bug)
    and write each output. Returns (model, :class:`~normrewrite.report.Report`)."""

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    stage("loading the ONNX model")
    model = load_onnx(src, limits)  # first: a file that is no ONNX model says so
    for out in outputs:
        if not str(out).endswith(".onnx"):
            raise UsageError(f"{src} is an ONNX model: it can only be written as .onnx, not {out}")
    notes: list[str] = []
    if options.opset is not None and options.opset != model_opset(model):
        notes.append(f"converted from opset {model_opset(model)} to {options.opset}")
        model = convert_opset(model, options.opset)
    original = model_bytes(model)
    timings["load"] = time.perf_counter() - t0
    report = Report(
        model=str(src),
        source="onnx",
        tracer=f"none (ONNX opset {model_opset(model)})",
        inputs=[],
        input_origin="",
        notes=notes,
    )
    report.nodes_before = count_nodes(model)
    t0 = time.perf_counter()
    done = transform(
        model,
        passes,
        options,
        cleanup=Cleanup.STATIC,
        runtime_forms=False,
        before_pass=lambda p: stage(f"pass {p.name}"),
    )
    for r in done.runs:
        p, res = r.pass_, r.result
        report.passes.append(
            PassReport(
                p.name, p.describe(), p.exact, res.modified, res.changes, res.skipped, res.notes,
                round(r.seconds, 4),
            )
        )  # fmt: skip
    report.notes.extend(done.notes)
    timings["passes"] = time.perf_counter() - t0
    report.nodes_after = count_nodes(model)
    if verify:
        stage("comparing in onnxruntime")
        t0 = time.perf_counter()
        before = session(original)
        feeds = make_feeds(before, input_shapes, seed)
        report.inputs = ["x".join(map(str, a.shape)) + f":{a.dtype}" for a in feeds.values()]
        report.input_origin = "given" if input_shapes else "model (symbolic dims = 2)"
        ref = before.run(None, feeds)
        out = session(model_bytes(model)).run(None, feeds)
        abs_err, rel_err = relative_error(ref, out)
        exact = report.exact
        passed = rel_err <= rtol if exact else None
        report.verify = VerifyReport(abs_err, rel_err, rtol, exact, passed)
        timings["verify"] = time.perf_counter() - t0
        if passed is False:
            raise VerifyError(
                f"rewritten ONNX model differs from the input in onnxruntime: max rel err "
                f"{rel_err:.3g} > rtol {rtol:g}; nothing written"
            )
    for dest in outputs:
        stage(f"writing {dest}")
        written = save_validated(model, Path(dest), threshold=options.external_data_threshold)
        v = report.verify
        o = OutputReport(
            str(dest), "onnx", v.max_abs_err if v else None, v.max_rel_err if v else None
        )
        o.notes.extend(written)
        report.outputs.append(o)
    report.seconds = {k: round(v, 3) for k, v in timings.items()}
    return model, report
