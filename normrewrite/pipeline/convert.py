"""The one pipeline driver: load → trace → passes → verify → emit → report.

:func:`convert` is configured by one :class:`~normrewrite.pipeline.options.ConvertOptions`; the
three ways a model can travel are configurations of it, chosen by the input form and options:

* **in memory** (a module, factory, Hugging Face folder or ``.pt2``): traced with torch.fx or
  torch.export, rewritten, verified against the original, emitted from one exported program;
* **ONNX in** (a ``.onnx`` file): the ONNX forms of the passes, verified in onnxruntime;
* **streamed** (``meta=True``, a Hugging Face folder): traced on the ``meta`` device, the weight
  edits replayed tensor by tensor from the checkpoint (:mod:`normrewrite.stream`).

All three plan their outputs before any work and commit outputs and report in one step
(:func:`normrewrite.emit.files.transaction`); their ONNX comes from the one ONNX pipeline.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from normrewrite import emit
from normrewrite.core.graph import count_ops
from normrewrite.core.pass_infra import Pass, PassContext, PassManager, PassResult
from normrewrite.emit.aoti import check_compile_options, output_formats, write_aoti
from normrewrite.emit.files import transaction
from normrewrite.emit.onnx.options import DTYPE_RTOL
from normrewrite.errors import UnchangedError, UsageError, VerifyError
from normrewrite.load.inputs import describe
from normrewrite.passes import ONNX_REGISTRY, REGISTRY
from normrewrite.pipeline.options import ConvertOptions, Hooks
from normrewrite.pipeline.outputs import check_outputs, fix_for_onnx, write_onnx, write_output
from normrewrite.pipeline.prepare import ModelLike, cast_model, load_and_trace, load_model
from normrewrite.pipeline.results import ConvertResult
from normrewrite.report import PassReport, Report, VerifyReport
from normrewrite.report import save as save_report
from normrewrite.trace import on_meta
from normrewrite.verify import compare, run


def convert(
    model: ModelLike, options: ConvertOptions, example_inputs: Any = None, hooks: Hooks | None = None
) -> ConvertResult:
    """Run the pipeline on ``model`` as ``options`` say (see the module docs)."""
    hooks = hooks or Hooks()
    if isinstance(model, str | os.PathLike) and os.fspath(model).endswith(".onnx"):
        return _convert_onnx_file(Path(os.fspath(model)), options, hooks)
    if options.meta:
        return _convert_streamed(model, options, hooks)
    return _convert_in_memory(model, options, example_inputs, hooks)


@contextlib.contextmanager
def _timed(timings: dict[str, float], key: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - start


def _convert_onnx_file(src: Path, options: ConvertOptions, hooks: Hooks) -> ConvertResult:
    """ONNX in → ONNX out: the ONNX forms of the passes, no torch
    (:func:`normrewrite.pipeline.onnx_in.convert_onnx_file`)."""
    from normrewrite.pipeline.onnx_in import convert_onnx_file

    passes = [ONNX_REGISTRY.create(p) for p in options.passes]
    dests = check_outputs(src, passes, options.outputs, options.report_path, options.force)
    shapes = [s.shape for s in options.input_specs] if options.input_specs else None
    with transaction(dests):
        model, report = convert_onnx_file(
            src, passes, list(options.outputs), options.onnx, limits=options.onnx_limits,
            input_shapes=shapes, verify=options.verify, rtol=options.rtol_for(onnx_input=True),
            seed=options.seed, stage=hooks.on_stage,
        )
        _check_changed(report, options)  # inside the transaction: nothing is committed
        if options.report_path is not None:
            save_report(report, options.report_path)
    return ConvertResult(None, report, None, (), onnx_model=model)


def _convert_streamed(model: ModelLike, options: ConvertOptions, hooks: Hooks) -> ConvertResult:
    """``meta=True``: a checkpoint larger than memory, to sharded safetensors or ONNX."""
    from normrewrite.stream import convert_checkpoint, convert_checkpoint_onnx

    if not isinstance(model, str | os.PathLike):
        raise UsageError("--meta converts a Hugging Face checkpoint folder, not an in-memory module")
    outs = options.outputs
    if len(outs) != 1 or outs[0].suffix == ".pt2":
        raise UsageError("--meta writes sharded safetensors (-o OUT_DIR/) or ONNX with external data "
                         "(-o OUT.onnx): give one of them")
    passes = [REGISTRY.create(p) for p in options.passes]
    dests = check_outputs(model, passes, outs, options.report_path, options.force)
    with transaction(dests):
        if outs[0].suffix == ".onnx":
            r = convert_checkpoint_onnx(model, passes, outs[0], options=options.onnx, force=options.force,
                                        trust_remote_code=options.trust_remote_code, progress=hooks.progress)
            summary = [*r.notes, f"wrote {r.path} (opset {r.opset}, {r.nodes} nodes) and {r.data_path.name} "
                       f"({r.bytes_written / 1e9:.2f} GB) in {r.seconds['total']:.1f} s"]
            report = r.report
        else:
            s = convert_checkpoint(model, passes, outs[0], force=options.force,
                                   max_shard_size=options.max_shard_size,
                                   trust_remote_code=options.trust_remote_code, progress=hooks.progress)
            summary = [f"wrote {s.tensors} tensors ({s.bytes_written / 1e9:.2f} GB) in {len(s.shards)} "
                       f"shards to {s.out_dir} in {s.seconds['total']:.1f} s"]
            report = s.report
        _check_changed(report, options)  # inside the transaction: nothing is committed
        if options.report_path is not None:
            save_report(report, options.report_path)
    return ConvertResult(None, report, None, (), summary=summary)


def _convert_in_memory(
    model: ModelLike, options: ConvertOptions, example_inputs: Any, hooks: Hooks
) -> ConvertResult:
    stage, timings = hooks.on_stage, {}
    pipeline = [REGISTRY.create(p) for p in options.passes]
    rtol = options.rtol_for(onnx_input=False)
    out_paths = list(options.outputs)
    check_compile_options(options.compile, options.device)
    formats = output_formats(out_paths, [emit.output_format(p) for p in out_paths], options.compile)
    dests = check_outputs(model, pipeline, out_paths, options.report_path, options.force)

    onnx = options.onnx
    wants_onnx = "onnx" in formats
    reference32 = None  # --dtype: the fp32 original's outputs, which ONNX parity is measured against
    load_args = dict(seed=options.seed, trust_remote_code=options.trust_remote_code,
                     trust_pickle=options.trust_pickle, trust_native_code=options.trust_native_code)
    with _timed(timings, "load+trace"):
        stage("loading and tracing")
        if wants_onnx and onnx.dtype != "float32":
            model = load_model(model, example_inputs, input_specs=options.input_specs, **load_args)
            reference32 = cast_model(model, onnx)
            example_inputs = model.example_inputs
            rtol = max(rtol, DTYPE_RTOL[onnx.dtype])  # the torch-side checks run in that dtype too
        prepared = load_and_trace(
            model, example_inputs, input_specs=options.input_specs, tracer=options.tracer,
            keep_training=options.keep_training, dynamic=wants_onnx and onnx.dynamic, **load_args,
        )
    loaded, gm, tracer_used, notes = prepared.loaded, prepared.graph_module, prepared.tracer, prepared.notes
    inputs = loaded.example_inputs
    meta = on_meta(inputs)
    report = Report(model=loaded.description, source=loaded.source, tracer=tracer_used,
                    inputs=describe(inputs), input_origin=loaded.input_origin, notes=notes)
    report.nodes_before = count_ops(gm)
    reference = None
    if not meta and (options.verify or options.verify_each or wants_onnx):
        with _timed(timings, "reference"):
            stage("running the original model")
            reference = run(loaded.module, inputs)

    ctx = PassContext(example_inputs=inputs, reference=loaded.module, seed=options.seed,
                      warn=report.notes.append)

    def check_each(p: Pass, r: PassResult) -> None:
        if reference is None or not p.exact:
            return
        cmp = compare(reference, run(r.graph_module, inputs))
        if not cmp.within(rtol):
            raise VerifyError(f"after pass {p.name}: max rel err {cmp.max_rel_err:.3g} exceeds rtol {rtol:g}")

    with _timed(timings, "passes"):
        pm = PassManager(pipeline, verify_each=check_each if options.verify_each else None,
                         after_change=hooks.after_change, before_pass=lambda p: stage(f"pass {p.name}"))
        result = pm(gm, ctx)
    for run_ in result.runs:
        p, r = run_.pass_, run_.result
        report.passes.append(PassReport(p.name, p.describe(), p.exact, r.modified, r.changes, r.skipped,
                                        r.notes, round(run_.seconds, 4)))
    gm = result.graph_module
    report.nodes_after = count_ops(gm)
    _check_changed(report, options)  # before verifying and writing anything

    if options.verify and reference is not None:
        with _timed(timings, "verify"):
            stage("verifying")
            _verify(report, reference, run(gm, inputs), rtol)
    elif options.verify and meta:
        report.notes.append("model is on the meta device: numeric verification skipped")

    conv = ConvertResult(gm, report, loaded.module, inputs)
    with _timed(timings, "emit"), transaction(dests):
        if out_paths:
            stage("exporting the rewritten model")
            dynamic = wants_onnx and onnx.dynamic
            fixed = wants_onnx and fix_for_onnx(gm, ctx, report)
            # trace once: the traced program serves while no pass changed the graph (a --dynamic
            # program is exported again: the exporter needs the re-export's graph to keep its
            # dims free, tests/test_deploy.py)
            reuse = prepared.program is not None and not dynamic and not fixed
            ep = None
            if reuse and not any(r.result.modified for r in result.runs):
                ep = emit.reuse_program(prepared.program, keep_output_classes=options.keep_output_classes)
            if ep is None:
                ep = emit.export_program(gm, inputs, dynamic=dynamic,
                                         keep_output_classes=options.keep_output_classes)
            contract = emit.output_names(ep)
            if contract is not None:
                report.program_outputs = list(contract.names)
                report.outputs_flattened = contract.flattened
            conv.exported = ep
        for path, fmt in zip(out_paths, formats, strict=True):
            stage(f"writing {path}")
            if fmt == "onnx":
                out = write_onnx(ep, path, inputs, reference32 or reference, rtol, report, onnx, loaded.module)
            elif fmt == "aoti":
                out = write_aoti(ep, path, inputs, device=options.device, reference=reference, rtol=rtol,
                                 exact=report.exact, timings=timings)
            else:
                out = write_output(ep, path, fmt, report)
            report.outputs.append(out)
        report.seconds = {k: round(v, 3) for k, v in timings.items()}
        if options.report_path is not None:
            save_report(report, options.report_path)  # committed with the outputs, in one step
    report.seconds = {k: round(v, 3) for k, v in timings.items()}
    return conv


def _check_changed(report: Report, options: ConvertOptions) -> None:
    """``fail_if_unchanged``: refuse a run in which no pass changed the model."""
    if options.fail_if_unchanged and not any(p.modified for p in report.passes):
        names = ", ".join(p.spec for p in report.passes) or "no passes"
        raise UnchangedError(f"no changes: {names} left the model unchanged (--fail-if-unchanged); "
                             "nothing written")


def _verify(report: Report, reference: list[Any], got: list[Any], rtol: float) -> None:
    """Judge the rewritten model's outputs against the original's (NaN/Inf-aware); an exact
    pipeline beyond ``rtol`` fails and nothing is written."""
    cmp = compare(reference, got)
    exact = report.exact
    passed = cmp.within(rtol) if exact else None
    report.verify = VerifyReport(cmp.max_abs_err, cmp.max_rel_err, rtol, exact, passed, cmp.unverified,
                                 list(cmp.unverified_outputs), cmp.nonfinite_introduced)
    if cmp.unverified:
        report.notes.append(
            f"cannot verify {cmp.unverified} output elements: NaN/Inf in the original's output "
            f"{', '.join(map(str, cmp.unverified_outputs))}"
        )
    if passed is False and cmp.nonfinite_introduced:
        raise VerifyError(f"rewritten model gives {cmp.nonfinite_introduced} NaN/Inf values where the "
                          "original is finite; nothing written")
    if passed is False:
        raise VerifyError(
            f"rewritten model differs from the original: max rel err {cmp.max_rel_err:.3g} "
            f"> rtol {rtol:g} (max abs err {cmp.max_abs_err:.3g}); nothing written"
        )
