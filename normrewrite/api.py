"""The library API export pipelines call: :func:`convert` and :func:`inspect`.

    import normrewrite
    result = normrewrite.convert(model, passes=["fold-bn"], example_inputs=(x,))
    result.graph_module   # the rewritten torch.fx.GraphModule
    result.report         # what changed, node counts, verification errors

The CLI is a thin shell over these two functions.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.fx import GraphModule

from normrewrite import emit as _emit
from normrewrite.core.graph import count_ops, node_label
from normrewrite.core.ops import norms
from normrewrite.core.pass_infra import Pass, PassContext, PassManager, PassResult
from normrewrite.errors import UsageError, VerifyError
from normrewrite.load import LoadedModel, load
from normrewrite.load.inputs import InputSpec, as_tuple, describe
from normrewrite.passes import REGISTRY
from normrewrite.report import OutputReport, PassReport, Report, VerifyReport
from normrewrite.report import save as save_report
from normrewrite.trace import Tracer, on_meta, trace
from normrewrite.verify import compare, run

if TYPE_CHECKING:
    from normrewrite.load.onnx import OnnxLimits

ModelLike = str | os.PathLike[str] | nn.Module | LoadedModel


@dataclass
class ConvertResult:
    graph_module: GraphModule
    report: Report
    original: nn.Module
    example_inputs: tuple[Any, ...]
    exported: torch.export.ExportedProgram | None = None  # set when an output needed it
    onnx_model: Any = None  # the rewritten onnx_ir.Model, for .onnx inputs (graph_module is None)


@dataclass
class NormEntry:
    name: str
    type: str
    shape: list[int] | None
    eps: float | None
    affine: bool
    node: str
    actions: dict[str, str] = field(default_factory=dict)
    placement: str = "other"  # pre / post / sandwich / final / other (normrewrite.analysis.residual)
    block: str | None = None  # the residual branch it belongs to (module path)


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
        from dataclasses import asdict

        return asdict(self)


def _resolve_passes(passes: Sequence[str | Pass]) -> list[Pass]:
    return [REGISTRY.create(p) for p in passes]


def _load(
    model: ModelLike,
    example_inputs: Any,
    input_specs: Sequence[InputSpec] | None,
    trust_remote_code: bool,
    seed: int,
    trust_pickle: bool = False,
    trust_native_code: bool = False,
) -> LoadedModel:
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, nn.Module):
        if example_inputs is None:
            if not input_specs:
                raise UsageError("example_inputs are needed to trace an nn.Module")
            from normrewrite.load.inputs import make_inputs

            example_inputs = make_inputs(input_specs, seed)
        return LoadedModel(model, as_tuple(example_inputs), "module", type(model).__name__)
    loaded = load(model, input_specs, trust_remote_code=trust_remote_code, seed=seed,
                  trust_pickle=trust_pickle, trust_native_code=trust_native_code)
    if example_inputs is not None:
        loaded.example_inputs, loaded.input_origin = as_tuple(example_inputs), "given"
    return loaded


def _training_modules(module: nn.Module) -> list[str]:
    return [name or "<root>" for name, m in module.named_modules() if m.training and _has_mode(m)]


def _has_mode(m: nn.Module) -> bool:
    # modules whose behaviour depends on train/eval
    return isinstance(
        m,
        nn.modules.batchnorm._BatchNorm
        | nn.modules.instancenorm._InstanceNorm
        | nn.Dropout
        | nn.modules.dropout._DropoutNd,
    )


def prepare(
    model: ModelLike,
    example_inputs: Any = None,
    *,
    input_specs: Sequence[InputSpec] | None = None,
    tracer: Tracer = "auto",
    keep_training: bool = False,
    trust_remote_code: bool = False,
    seed: int = 0,
    trust_pickle: bool = False,
    dynamic: bool = False,
    trust_native_code: bool = False,
) -> tuple[LoadedModel, GraphModule, str, list[str]]:
    """Load and trace: (loaded model, traced graph, tracer used, notes)."""
    loaded = _load(model, example_inputs, input_specs, trust_remote_code, seed, trust_pickle,
                   trust_native_code)
    notes = list(loaded.notes)
    if loaded.exported is not None:
        from normrewrite.trace import exported_module

        return loaded, exported_module(loaded.exported), "pt2", notes
    training = _training_modules(loaded.module)
    if training and not keep_training:
        shown = ", ".join(training[:3]) + (f" and {len(training) - 3} more" if len(training) > 3 else "")
        notes.append(f"model was in training mode ({shown}); switched to eval mode before tracing")
        loaded.module.eval()
    traced = trace(loaded.module, loaded.example_inputs, tracer, dynamic=dynamic)
    return loaded, traced.graph_module, traced.tracer, notes + traced.notes


def convert(
    model: ModelLike,
    passes: Sequence[str | Pass] = ("fold-bn",),
    example_inputs: Any = None,
    *,
    input_specs: Sequence[InputSpec] | None = None,
    tracer: Tracer = "auto",
    verify: bool = True,
    rtol: float = 1e-4,
    outputs: Sequence[str | os.PathLike[str]] = (),
    force: bool = False,
    opset: int | None = None,
    keep_training: bool = False,
    trust_remote_code: bool = False,
    seed: int = 0,
    verify_each: bool = False,
    on_stage: Callable[[str], None] | None = None,
    after_change: Callable[[Pass, PassResult], None] | None = None,
    trust_pickle: bool = False,
    onnx_options: Any = None,
    compile: str | None = None,
    device: str = "cpu",
    trust_native_code: bool = False,
    report_path: str | os.PathLike[str] | None = None,
) -> ConvertResult:
    """Load, trace, rewrite, verify and (optionally) write ``model``.

    ``onnx_options`` (:class:`normrewrite.emit.onnx.options.OnnxOptions`): how ONNX outputs are emitted
    (opset, target runtime, dynamic axes, dtype). A ``.onnx`` ``model`` is rewritten ONNX in →
    ONNX out with the ONNX forms of the passes (no torch tracing).

    ``compile="aoti"`` writes every ``.pt2`` output as an AOTInductor package for ``device``
    (``"cpu"`` or ``"cuda"``); outputs named ``*.aoti.pt2`` are packages regardless
    (:mod:`normrewrite.emit.aoti`).

    ``report_path``: the report as JSON, committed with the outputs in one step
    (:func:`normrewrite.emit.files.transaction`). Outputs that would overwrite, contain or lie
    inside anything the run reads, or each other, are refused before any work.

    Raises :class:`~normrewrite.errors.VerifyError` (and writes nothing) when an exact pipeline
    changes the outputs by more than ``rtol`` relative to the largest output magnitude.
    """
    stage = on_stage or (lambda _s: None)
    timings: dict[str, float] = {}
    onnx_opts = _onnx_options(onnx_options, opset)
    from normrewrite.emit.files import transaction

    out_paths = [Path(o) for o in outputs]
    report_file = Path(report_path) if report_path is not None else None
    if isinstance(model, str | os.PathLike) and os.fspath(model).endswith(".onnx"):
        from normrewrite.passes import ONNX_REGISTRY

        onnx_passes = [p if isinstance(p, Pass) else ONNX_REGISTRY.create(p) for p in passes]
        dests = _check_outputs(model, onnx_passes, out_paths, report_file, force)
        with transaction(dests):
            result = _convert_onnx(Path(os.fspath(model)), onnx_passes, outputs, onnx_opts,
                                   input_specs=input_specs, verify=verify, rtol=rtol, force=force,
                                   seed=seed, stage=stage)
            if report_file is not None:
                save_report(result.report, report_file)
        return result
    pipeline = _resolve_passes(passes)
    if rtol <= 0:
        raise UsageError("rtol must be positive")
    formats = [_emit.output_format(p) for p in out_paths]
    from normrewrite.emit.aoti import check_compile_options, output_formats

    check_compile_options(compile, device)
    formats = output_formats(out_paths, formats, compile)
    dests = _check_outputs(model, pipeline, out_paths, report_file, force)

    wants_onnx = "onnx" in formats
    reference32 = None  # --dtype: the fp32 original's outputs, which ONNX parity is measured against
    with _timed(timings, "load+trace"):
        stage("loading and tracing")
        if wants_onnx and onnx_opts.dtype != "float32":
            model = _load(model, example_inputs, input_specs, trust_remote_code, seed, trust_pickle,
                          trust_native_code)
            reference32 = _cast_model(model, onnx_opts)
            example_inputs = model.example_inputs
            from normrewrite.emit.onnx.options import DTYPE_RTOL

            rtol = max(rtol, DTYPE_RTOL[onnx_opts.dtype])  # the torch-side checks run in that dtype too
        loaded, gm, tracer_used, notes = prepare(
            model, example_inputs, input_specs=input_specs, tracer=tracer,
            keep_training=keep_training, trust_remote_code=trust_remote_code, seed=seed,
            trust_pickle=trust_pickle, dynamic=wants_onnx and onnx_opts.dynamic,
            trust_native_code=trust_native_code,
        )
    inputs = loaded.example_inputs
    meta = on_meta(inputs)
    report = Report(
        model=loaded.description, source=loaded.source, tracer=tracer_used,
        inputs=describe(inputs), input_origin=loaded.input_origin, notes=notes,
    )
    report.nodes_before = count_ops(gm)
    reference = None
    if not meta and (verify or verify_each or any(f == "onnx" for f in formats)):
        with _timed(timings, "reference"):
            stage("running the original model")
            reference = run(loaded.module, inputs)

    ctx = PassContext(example_inputs=inputs, reference=loaded.module, seed=seed,
                      warn=report.notes.append)

    def check_each(p: Pass, r: PassResult) -> None:
        if reference is None or not p.exact:
            return
        cmp = compare(reference, run(r.graph_module, inputs))
        if not cmp.within(rtol):
            raise VerifyError(
                f"after pass {p.name}: max rel err {cmp.max_rel_err:.3g} exceeds rtol {rtol:g}"
            )

    def before(p: Pass) -> None:
        stage(f"pass {p.name}")

    with _timed(timings, "passes"):
        pm = PassManager(pipeline, verify_each=check_each if verify_each else None,
                         after_change=after_change, before_pass=before)
        result = pm(gm, ctx)
    for run_ in result.runs:
        p, r = run_.pass_, run_.result
        report.passes.append(
            PassReport(p.name, p.describe(), p.exact, r.modified, r.changes, r.skipped, r.notes,
                       round(run_.seconds, 4))
        )
    gm = result.graph_module
    report.nodes_after = count_ops(gm)

    if verify and reference is not None:
        with _timed(timings, "verify"):
            stage("verifying")
            cmp = compare(reference, run(gm, inputs))
        exact = report.exact
        passed = cmp.within(rtol) if exact else None
        report.verify = VerifyReport(cmp.max_abs_err, cmp.max_rel_err, rtol, exact, passed,
                                     cmp.unverified, list(cmp.unverified_outputs),
                                     cmp.nonfinite_introduced)
        if cmp.unverified:
            report.notes.append(
                f"cannot verify {cmp.unverified} output elements: NaN/Inf in the original's output "
                f"{', '.join(map(str, cmp.unverified_outputs))}"
            )
        if passed is False and cmp.nonfinite_introduced:
            raise VerifyError(
                f"rewritten model gives {cmp.nonfinite_introduced} NaN/Inf values where the "
                "original is finite; nothing written"
            )
        if passed is False:
            raise VerifyError(
                f"rewritten model differs from the original: max rel err {cmp.max_rel_err:.3g} "
                f"> rtol {rtol:g} (max abs err {cmp.max_abs_err:.3g}); nothing written"
            )
    elif verify and meta:
        report.notes.append("model is on the meta device: numeric verification skipped")

    conv = ConvertResult(gm, report, loaded.module, inputs)
    if out_paths:
        with _timed(timings, "emit"), transaction(dests):
            stage("exporting the rewritten model")
            if wants_onnx:
                _fix_export(gm, ctx, report)
            ep = _emit.export_program(gm, inputs, dynamic=wants_onnx and onnx_opts.dynamic)
            conv.exported = ep
            for path, fmt in zip(out_paths, formats, strict=True):
                stage(f"writing {path}")
                if fmt == "onnx":
                    report.outputs.append(_write_onnx(ep, path, inputs, reference32 or reference, rtol, report,
                                                      onnx_opts, loaded.module))
                    continue
                if fmt == "aoti":
                    from normrewrite.emit.aoti import write_aoti

                    report.outputs.append(write_aoti(ep, path, inputs, device=device, reference=reference,
                                                     rtol=rtol, exact=report.exact, timings=timings))
                    continue
                report.outputs.append(_write(ep, path, fmt, inputs, reference, rtol, report, opset))
            report.seconds = {k: round(v, 3) for k, v in timings.items()}
            if report_file is not None:
                save_report(report, report_file)  # committed with the outputs, in one step
    elif report_file is not None:
        report.seconds = {k: round(v, 3) for k, v in timings.items()}
        save_report(report, report_file)
    report.seconds = {k: round(v, 3) for k, v in timings.items()}
    return conv


def _check_outputs(
    model: ModelLike, pipeline: Sequence[Pass], outputs: list[Path], report: Path | None, force: bool
) -> list[Path]:
    """Refuse outputs that would destroy an input or each other, existing outputs without
    ``force`` and unwritable directories, before any work; the paths the run will create."""
    from normrewrite.emit.files import check_output, companions, plan_outputs, read_paths

    plan_outputs(outputs, inputs=read_paths(model if isinstance(model, str | os.PathLike) else None,
                                            pipeline), report=report)
    dests = [*outputs, *(c for o in outputs for c in companions(o)), *([report] if report else [])]
    for p in [*outputs, *([report] if report else [])]:
        check_output(p, force=force)
    return dests


def _write(
    ep: torch.export.ExportedProgram,
    path: Path,
    fmt: str,
    inputs: tuple[Any, ...],
    reference: list[torch.Tensor] | None,
    rtol: float,
    report: Report,
    opset: int | None,
) -> OutputReport:
    if fmt == "pt2":
        r = _emit.write_pt2(ep, path)
        return OutputReport(r.path, r.format)
    r = _emit.write_dir(ep, path, title=f"{report.model}, rewritten by normrewrite")
    return OutputReport(r.path, r.format)


def _onnx_options(options: Any, opset: int | None) -> Any:
    from normrewrite.emit.onnx.options import OnnxOptions

    if options is None:
        return OnnxOptions(opset=opset)
    if opset is not None and options.opset is None:
        from dataclasses import replace

        return replace(options, opset=opset)
    return options


def _cast_model(loaded: LoadedModel, options: Any) -> list[torch.Tensor]:
    """--dtype: run the fp32 original (the parity reference), then cast the module to the dtype
    (inputs too, unless --keep-io-types: then casts wrap the module and its I/O stays fp32)."""
    import copy

    ref = run(loaded.module, loaded.example_inputs)
    dtype = options.torch_dtype()
    module = copy.deepcopy(loaded.module).to(dtype)  # .to() is in place: keep the caller's model
    if options.keep_io_types:
        loaded.module = _KeepIO(module, dtype).eval()
    else:
        loaded.module = module
        loaded.example_inputs = tuple(
            t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
            for t in loaded.example_inputs
        )
    loaded.notes.append(f"model cast to {options.dtype}" + (" (fp32 inputs/outputs kept)" if options.keep_io_types else ""))
    return ref


class _KeepIO(nn.Module):
    """fp32 in, ``dtype`` inside, fp32 out (``--keep-io-types``)."""

    def __init__(self, inner: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.inner, self.dtype = inner, dtype

    def forward(self, *args: Any) -> Any:
        from torch.utils import _pytree as pytree

        args = tuple(a.to(self.dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
        out = self.inner(*args)
        return pytree.tree_map(
            lambda t: t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t, out)


def _fix_export(gm: GraphModule, ctx: PassContext, report: Report) -> None:
    """Before ONNX emission: repair what torch.onnx.export cannot take (passes/fix_export.py)."""
    fix = REGISTRY.create("fix-export")
    result = fix(gm, ctx)
    if result.modified:
        report.passes.append(PassReport(fix.name, fix.describe(), fix.exact, True, result.changes,
                                        result.skipped, ["run automatically before ONNX emission", *result.notes]))


def _write_onnx(
    ep: torch.export.ExportedProgram,
    path: Path,
    inputs: tuple[Any, ...],
    reference: list[torch.Tensor] | None,
    rtol: float,
    report: Report,
    options: Any,
    module: nn.Module,
) -> OutputReport:
    """An ONNX output of the in-memory path (:func:`normrewrite.emit.onnx.pipeline.emit_program`),
    gated on onnxruntime parity when the passes are exact."""
    from normrewrite.emit.onnx.options import DTYPE_RTOL
    from normrewrite.emit.onnx.pipeline import emit_program

    tol = max(rtol, 1e-4, DTYPE_RTOL[options.dtype])

    def gate(cmp: Any) -> None:
        if report.exact and not cmp.within(tol):
            raise VerifyError(
                f"onnxruntime output of {path} differs from the original model: max rel err "
                f"{cmp.max_rel_err:.3g} > {tol:g}; nothing written"
            )

    r = emit_program(ep, path, inputs, reference, options, module=module, check=gate)
    out = OutputReport(r.path, "onnx", r.parity.max_abs_err if r.parity else None,
                       r.parity.max_rel_err if r.parity else None)
    out.notes.extend([f"opset {r.opset}, {r.nodes} nodes, target {options.target}, {options.dtype}", *r.notes])
    return out


def _convert_onnx(
    src: Path,
    passes: Sequence[Any],  # pass specs or OnnxPass instances
    outputs: Sequence[str | os.PathLike[str]],
    options: Any,
    *,
    input_specs: Sequence[InputSpec] | None,
    verify: bool,
    rtol: float,
    force: bool,
    seed: int,
    stage: Callable[[str], None],
    limits: OnnxLimits | None = None,
) -> ConvertResult:
    """ONNX in → ONNX out: the ONNX forms of the passes (``passes.ONNX_REGISTRY``), no torch
    (:func:`normrewrite.emit.onnx.pipeline.convert_onnx_file`)."""
    from normrewrite.emit.files import check_output
    from normrewrite.emit.onnx.pipeline import convert_onnx_file
    from normrewrite.passes import ONNX_REGISTRY

    pipeline = [ONNX_REGISTRY.create(p) for p in passes]
    out_paths = [Path(o) for o in outputs]
    for p in out_paths:
        check_output(p, force=force, inputs=(src,))
    shapes = [s.shape for s in input_specs] if input_specs else None
    model, report = convert_onnx_file(src, pipeline, out_paths, options, limits=limits, input_shapes=shapes,
                                      verify=verify, rtol=1e-5 if rtol == 1e-4 else rtol, seed=seed, stage=stage)
    result = ConvertResult(None, report, None, ())  # type: ignore[arg-type]
    result.onnx_model = model
    return result


@contextlib.contextmanager
def _timed(timings: dict[str, float], key: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - start


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
) -> InspectResult:
    """Every norm layer of ``model`` with what each registered pass could do with it."""
    if isinstance(model, str | os.PathLike) and os.fspath(model).endswith(".onnx"):
        return _inspect_onnx(Path(os.fspath(model)))
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
    from normrewrite.analysis.residual import norm_placements

    placed = {p.norm.node: p for p in norm_placements(gm)}
    entries = []
    for info in norms(gm):
        from normrewrite.core.graph import node_shape

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
    from normrewrite.analysis.scale_invariance import analyze

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
