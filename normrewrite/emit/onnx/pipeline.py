"""The one ONNX pipeline: every ONNX file normrewrite writes comes out of these stages.

==========  ==============================================  ==========================================
stage       torch program in (in memory, ``--meta``)        ONNX in
==========  ==============================================  ==========================================
source      :func:`~.export.export_onnx` unoptimized,       :func:`~normrewrite.load.onnx.load_onnx`
            then :func:`~.cleanup.optimize` once (the        (+ :func:`~.export.convert_opset`)
            exporter's optimizer + ONNX-op fusions, static
            shapes folded unless ``--dynamic``)
passes      the norm fusions (:data:`NORM_FUSIONS`)         the passes asked for (``-p``)
cleanup     :func:`~.cleanup.optimize` again only when a    :func:`~.cleanup.optimize`
            pass changed the graph; none with ``--meta``,
            whose export stage optimized around the
            weights on disk
runtime     GroupNorm as InstanceNorm (no Skip*Norm       — (an input keeps its ops)
            fusions: slower on onnxruntime CPU)
check       the opset is the one asked for; fp16            the same
            reductions flagged
write       atomic write + validation (:mod:`.write`)       the same
parity      onnxruntime vs the torch outputs (and, with     onnxruntime vs the input model
            ``--dynamic``, onnxruntime and the torch        (before any write)
            program at another batch/sequence size)
==========  ==============================================  ==========================================

:func:`transform` runs passes → cleanup → runtime → check. :func:`emit_program` is the in-memory
path (``normrewrite.convert(..., outputs=["m.onnx"])``), :func:`convert_onnx_file` the ONNX-in
path, and ``normrewrite.stream.convert_checkpoint_onnx`` (``--meta``) calls the same stages with
its weights streamed from disk.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx_ir as ir

from normrewrite.analysis.onnx_norms import decomposed_norm_dtypes
from normrewrite.core.onnx_graph import count_nodes, model_opset, symbolic_dims
from normrewrite.core.onnx_pass import OnnxContext, OnnxPass, OnnxPassRun, run_onnx_passes
from normrewrite.emit.onnx.cleanup import groupnorm_as_instancenorm, optimize
from normrewrite.emit.onnx.export import export_onnx
from normrewrite.emit.onnx.options import OnnxOptions
from normrewrite.emit.onnx.write import atomic_pair, validate_file, write_model
from normrewrite.errors import EmitError, first_line
from normrewrite.verify import Comparison, run
from normrewrite.verify.onnxruntime import (
    ort_outputs,
    other_size_inputs,
    parity,
    session,
)

# the ONNX passes every torch-program export runs: decomposed norms the exporter wrote as


class Cleanup(enum.Enum):
    STATIC = "static"  # fold shape chains when every input shape is static
    SYMBOLIC = "symbolic"  # keep shape computations (--dynamic)
    NONE = "none"  # --meta: the export stage already optimized around the weights on disk


@dataclass
class Transformed:
    runs: list[OnnxPassRun]
    notes: list[str] = field(default_factory=list)

    def fusion_notes(self) -> list[str]:
        """The passes' outcome as report notes (for passes the user did not ask for)."""
        notes = []
        for r in self.runs:
            res = r.result
            if res.modified:
                notes.append(f"{r.pass_.name} (ONNX): {len(res.changes)} decomposed norms fused")
            if res.skipped:
                notes.append(f"{len(res.skipped)} norms stay decomposed: {res.skipped[0].reason}")
        return notes


def transform(
    model: ir.Model,
    passes: Sequence[OnnxPass],
    options: OnnxOptions,
    *,
    cleanup: Cleanup,
    runtime_forms: bool = True,
    before_pass: Callable[[OnnxPass], None] | None = None,
    optimized: bool = False,
) -> Transformed:
    """The stages between source and write, in place: passes → cleanup → runtime forms → check.
    ``optimized``: the source stage already ran the cleanup's optimizer; it runs again only on
    what a pass changed."""
    opset = model_opset(model)
    done = Transformed(
        run_onnx_passes(model, passes, OnnxContext(options.target), before_pass=before_pass)
    )
    if cleanup is not Cleanup.NONE and (not optimized or any(r.result.modified for r in done.runs)):
        before = count_nodes(model)
        mode = optimize(model, allow_static=cleanup is Cleanup.STATIC)
        if count_nodes(model) < before:
            done.notes.append(
                f"onnxscript optimizer cleanup ({mode}): {before} → {count_nodes(model)} nodes"
            )
    if runtime_forms:
        gn = groupnorm_as_instancenorm(model)
        if gn:
            done.notes.append(
                f"{gn} GroupNormalization → InstanceNormalization form (runs fused in "
                "onnxruntime; the opset-21 op is expanded into ~30 nodes)"
            )
    if model_opset(model) != opset:
        raise EmitError(
            f"asked for opset {opset}, the written model has opset {model_opset(model)}"
        )
    if options.dtype == "float16":
        bad = [d for d in decomposed_norm_dtypes(model) if d not in ("FLOAT", "DOUBLE")]
        if bad:
            done.notes.append(
                f"{len(bad)} decomposed norm reductions run in {bad[0]} (may overflow on GPU)"
            )
    return done


# --------------------------------------------------------------------------- torch program in


@dataclass
class OnnxEmitted:
    path: str
    parity: Comparison | None  # at the example shape
    other_size: Comparison | None = None  # at another shape (--dynamic)
    notes: list[str] = field(default_factory=list)
    nodes: int = 0
    opset: int = 0


def check_exportable(module: Any) -> None:
    """Refuse what torch.onnx.export would silently get wrong: BatchNorm in training mode (it
    writes eval behaviour, the running statistics)."""
    from torch import nn

    training = [
        n
        for n, m in module.named_modules()
        if m.training and isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    if training:
        raise EmitError(
            f"BatchNorm {training[0] or '<root>'} is in training mode: torch.onnx.export would silently "
            "write eval behaviour (running statistics); call model.eval() or drop --keep-training-mode"
        )


def emit_program(
    ep: Any,
    dest: Path,
    inputs: Sequence[Any],
    reference: Sequence[Any] | None,
    options: OnnxOptions,
    *,
    fusions: Sequence[OnnxPass] = (),
    module: Any = None,
    check: Callable[[Comparison], None] | None = None,
) -> OnnxEmitted:
    """The in-memory path: export ``ep``, transform, write ``dest`` atomically, validate, and
    compare in onnxruntime with ``reference`` (the original's outputs); with ``--dynamic`` also
    run ``module`` and the ONNX model at a shape other than the example's. ``check(comparison)``
    may reject before the rename. ``fusions``: the ONNX passes every output gets
    (:func:`normrewrite.passes.norm_fusions`), given by the caller: emission runs passes, it does
    not choose them."""
    if module is not None:
        check_exportable(module)
    # one optimization of the exported graph, not the exporter's and then the cleanup's: ours is
    # the exporter's (onnxscript optimizer + ONNX-op fusions) with the static-shape folding limits
    model = export_onnx(ep, options.resolved_opset, optimize=False)
    exported = count_nodes(model)
    mode = optimize(model, allow_static=not options.dynamic, fuse=True)
    cleanup = Cleanup.SYMBOLIC if options.dynamic else Cleanup.STATIC
    done = transform(model, fusions, options, cleanup=cleanup, optimized=True)
    notes = done.fusion_notes() + done.notes
    notes.append(f"onnxscript optimizer ({mode}): {exported} → {count_nodes(model)} nodes")
    same = other = None
    with atomic_pair(dest) as tmp:
        notes += write_model(model, tmp, threshold=options.external_data_threshold)
        notes += validate_file(tmp, model)
        measurable = True
        if options.dtype == "bfloat16":
            try:
                session(tmp)
            except Exception as e:  # onnxruntime CPU lacks many bfloat16 kernels
                if "NOT_IMPLEMENTED" not in str(e):
                    raise EmitError(f"onnxruntime refuses the model: {first_line(e)}") from e
                measurable = False
                notes.append(
                    f"onnxruntime CPU cannot run it ({first_line(e)[:120]}): parity not measured"
                )
        if reference is not None and measurable:
            same = parity(reference, ort_outputs(tmp, inputs))
            if check is not None:
                check(same)
        if options.dynamic and module is not None and reference is not None and measurable:
            other, in_torch, shapes = _other_size(model, tmp, inputs, module, ep)
            notes.append(
                f"dynamic axes checked at {shapes}: max rel err {other.max_rel_err:.3g} "
                f"(onnxruntime), {in_torch.max_rel_err:.3g} (torch program)"
            )
            if check is not None:
                check(other)
                check(in_torch)
    return OnnxEmitted(str(dest), same, other, notes, count_nodes(model), model_opset(model))


def _other_size(
    model: ir.Model, path: Path, inputs: Sequence[Any], module: Any, ep: Any
) -> tuple[Comparison, Comparison, str]:
    """The ONNX model and the torch program ``ep`` (the ``.pt2`` of the same run) against the
    original at a batch and sequence size other than the example's (within the program's
    bounds): (onnxruntime, torch, the shapes)."""
    from normrewrite.emit import dim_upper_bounds

    dims = symbolic_dims(model)
    if not any(dims):
        raise EmitError("--dynamic: the exported model has no symbolic dimension")
    bigger = other_size_inputs(inputs, dims, upper=dim_upper_bounds(ep))
    reference = run(module, bigger)
    found = []
    for name, runner in (("ONNX model", lambda: ort_outputs(path, bigger)),
                         ("torch program", lambda: run(ep.module(), bigger))):  # fmt: skip
        try:
            found.append(parity(reference, runner()))
        except EmitError:
            raise
        except Exception as e:
            raise EmitError(
                f"--dynamic: the {name} does not run at other input sizes: {first_line(e)}"
            ) from e
    shapes = ", ".join("x".join(map(str, t.shape)) for t in bigger if hasattr(t, "shape"))
    return found[0], found[1], shapes


# --------------------------------------------------------------------------- ONNX in
