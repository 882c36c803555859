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
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule

from . import emit as _emit
from .errors import UsageError, VerifyError
from .graph import count_ops, node_label
from .inputs import InputSpec, as_tuple, describe
from .load import LoadedModel, load
from .ops import norms
from .pass_infra import Pass, PassContext, PassManager, PassResult
from .passes import REGISTRY
from .report import OutputReport, PassReport, Report, VerifyReport
from .trace import Tracer, on_meta, trace
from .verify import compare, run

ModelLike = str | os.PathLike[str] | nn.Module | LoadedModel


@dataclass
class ConvertResult:
    graph_module: GraphModule
    report: Report
    original: nn.Module
    example_inputs: tuple[Any, ...]
    exported: torch.export.ExportedProgram | None = None  # set when an output needed it


@dataclass
class NormEntry:
    name: str
    type: str
    shape: list[int] | None
    eps: float | None
    affine: bool
    node: str
    actions: dict[str, str] = field(default_factory=dict)


@dataclass
class InspectResult:
    model: str
    tracer: str
    inputs: list[str]
    norms: list[NormEntry]
    nodes: int

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
) -> LoadedModel:
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, nn.Module):
        if example_inputs is None:
            if not input_specs:
                raise UsageError("example_inputs are needed to trace an nn.Module")
            from .inputs import make_inputs

            example_inputs = make_inputs(input_specs, seed)
        return LoadedModel(model, as_tuple(example_inputs), "module", type(model).__name__)
    loaded = load(model, input_specs, trust_remote_code=trust_remote_code, seed=seed)
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
) -> tuple[LoadedModel, GraphModule, str, list[str]]:
    """Load and trace: (loaded model, traced graph, tracer used, notes)."""
    loaded = _load(model, example_inputs, input_specs, trust_remote_code, seed)
    notes = list(loaded.notes)
    if loaded.exported is not None:
        from .trace import exported_module

        return loaded, exported_module(loaded.exported), "pt2", notes
    training = _training_modules(loaded.module)
    if training and not keep_training:
        shown = ", ".join(training[:3]) + (f" and {len(training) - 3} more" if len(training) > 3 else "")
        notes.append(f"model was in training mode ({shown}); switched to eval mode before tracing")
        loaded.module.eval()
    traced = trace(loaded.module, loaded.example_inputs, tracer)
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
) -> ConvertResult:
    """Load, trace, rewrite, verify and (optionally) write ``model``.

    Raises :class:`~normrewrite.errors.VerifyError` (and writes nothing) when an exact pipeline
    changes the outputs by more than ``rtol`` relative to the largest output magnitude.
    """
    stage = on_stage or (lambda _s: None)
    timings: dict[str, float] = {}
    pipeline = _resolve_passes(passes)
    if rtol <= 0:
        raise UsageError("rtol must be positive")
    out_paths = [Path(o) for o in outputs]
    formats = [_emit.output_format(p) for p in out_paths]
    src = Path(os.fspath(model)) if isinstance(model, str | os.PathLike) else None
    for p in out_paths:
        from .fsutil import check_output

        check_output(p, force=force, inputs=(src,) if src else ())

    with _timed(timings, "load+trace"):
        stage("loading and tracing")
        loaded, gm, tracer_used, notes = prepare(
            model, example_inputs, input_specs=input_specs, tracer=tracer,
            keep_training=keep_training, trust_remote_code=trust_remote_code, seed=seed,
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
        report.verify = VerifyReport(cmp.max_abs_err, cmp.max_rel_err, rtol, exact, passed)
        if passed is False:
            raise VerifyError(
                f"rewritten model differs from the original: max rel err {cmp.max_rel_err:.3g} "
                f"> rtol {rtol:g} (max abs err {cmp.max_abs_err:.3g}); nothing written"
            )
    elif verify and meta:
        report.notes.append("model is on the meta device: numeric verification skipped")

    conv = ConvertResult(gm, report, loaded.module, inputs)
    if out_paths:
        with _timed(timings, "emit"):
            stage("exporting the rewritten model")
            ep = _emit.export_program(gm, inputs)
            conv.exported = ep
            for path, fmt in zip(out_paths, formats, strict=True):
                stage(f"writing {path}")
                report.outputs.append(_write(ep, path, fmt, inputs, reference, rtol, report, opset))
    report.seconds = {k: round(v, 3) for k, v in timings.items()}
    return conv


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
    if fmt == "onnx":
        def gate(cmp: Any) -> None:
            if report.exact and not cmp.within(max(rtol, 1e-4)):
                raise VerifyError(
                    f"onnxruntime output of {path} differs from the original model: max rel err "
                    f"{cmp.max_rel_err:.3g} > {max(rtol, 1e-4):g}; nothing written"
                )

        r = _emit.write_onnx(ep, path, inputs, reference, opset=opset, check=gate)
        p = r.parity
        return OutputReport(r.path, r.format, p.max_abs_err if p else None, p.max_rel_err if p else None)
    r = _emit.write_dir(ep, path, title=f"{report.model}, rewritten by normrewrite")
    return OutputReport(r.path, r.format)


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
) -> InspectResult:
    """Every norm layer of ``model`` with what each registered pass could do with it."""
    loaded, gm, tracer_used, _ = prepare(
        model, example_inputs, input_specs=input_specs, tracer=tracer,
        trust_remote_code=trust_remote_code, seed=seed,
    )
    ctx = PassContext(example_inputs=loaded.example_inputs, reference=loaded.module, seed=seed)
    actions: dict[str, dict[str, str]] = {}
    for cls in REGISTRY:
        for node_name, text in cls().explain(gm, ctx).items():
            actions.setdefault(node_name, {})[cls.name] = text
    entries = []
    for info in norms(gm):
        from .graph import node_shape

        shape = node_shape(info.node)
        entries.append(
            NormEntry(
                name=node_label(info.op_node or info.node), type=info.kind,
                shape=list(shape) if shape else None, eps=info.eps,
                affine=info.has_weight or info.has_bias, node=info.node.name,
                actions=actions.get((info.op_node or info.node).name, {}),
            )
        )
    return InspectResult(loaded.description, tracer_used, describe(loaded.example_inputs), entries,
                         count_ops(gm))
