"""The export stage: a ``torch.export`` program → an ``onnx_ir.Model`` at the opset asked for
(``torch.onnx.export(..., dynamo=True)``), the exporter's long errors cut to one line, and onnx's
version converter for ONNX inputs written at another opset."""

from __future__ import annotations

import contextlib
import io
import re
import warnings
from typing import Any

import onnx_ir as ir

from normrewrite.core.onnx_graph import model_opset
from normrewrite.emit.onnx.cleanup import rotary_caches_per_batch
from normrewrite.errors import EmitError, first_line


def export_onnx(ep: Any, opset: int, *, optimize: bool = True) -> ir.Model:
    """``torch.onnx.export(ep, dynamo=True)`` as an ``onnx_ir.Model`` at ``opset``; ``optimize``:
    the exporter's own onnxscript optimization (off when weights must not be folded, ``--meta``).

    The exporter never writes an opset below 18 (asking for 17 silently gives 18, and onnx's
    version converter cannot take its ReduceMean down to 17): such requests are refused, and the
    written opset is asserted."""
    import torch

    if opset < 18:
        raise EmitError(
            f"torch.onnx.export writes opset 18 at the lowest (asking for {opset} silently gives 18); "
            "use --opset 18 or newer"
        )
    sink = io.StringIO()
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(sink),
            contextlib.redirect_stderr(sink),
        ):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                ep, (), dynamo=True, opset_version=opset, verbose=False, optimize=optimize
            )
    except Exception as e:
        raise EmitError(export_error(e)) from e
    model = program.model
    _static_digits(model)
    if optimize:
        rotary_caches_per_batch(model)  # the exporter's fused rotary op, valid at every batch
    if model_opset(model) != opset:
        raise EmitError(f"asked the exporter for opset {opset}, it wrote {model_opset(model)}")
    return model


def _static_digits(model: ir.Model) -> None:
    """With dynamic shapes the exporter names dims torch.export kept static (e.g. channels) as
    symbolic dims spelled "3": write them as the static sizes they are."""
    for v in [*model.graph.inputs, *model.graph.outputs]:
        if v.shape is not None and any(
            isinstance(d, ir.SymbolicDim) and str(d.value).isdigit() for d in v.shape
        ):
            v.shape = ir.Shape(
                [
                    int(d.value) if isinstance(d, ir.SymbolicDim) and str(d.value).isdigit() else d
                    for d in v.shape
                ]
            )


def export_error(e: BaseException) -> str:
    """One line naming the op torch.onnx.export stopped on, from its (long) error text."""
    text = str(e)
    while e.__cause__ is not None:  # the exporter wraps the real error
        e = e.__cause__
        text += "\n" + str(e)
    op = None
    m = re.search(r"Unsupported FX nodes: \{'call_function': \[([^\]]+)\]", text) or re.search(
        r"No ONNX function found for <OpOverload\(op='([^']+)'", text
    )
    if m:
        op = m.group(1).replace("'", "")
    else:
        m = re.search(r"While executing %\S+ : .*?target=([\w.]+)", text)
        op = m.group(1) if m else None
    reason = next(
        (
            ln.strip()
            for ln in text.splitlines()
            if re.search(r"Cannot |No ONNX function|No decomposition|not supported", ln)
        ),
        first_line(e),
    )
    reason = re.sub(r"^<class '[\w.]+'>: ", "", reason)
    where = f" at op {op}" if op else ""
    return f"ONNX export failed{where}: {reason[:300]}"


def convert_opset(model: ir.Model, opset: int) -> ir.Model:
    """onnx's version converter between opsets; the result's opset is checked."""
    import onnx

    got = model_opset(model)
    try:
        proto = onnx.version_converter.convert_version(ir.serde.serialize_model(model), opset)
        out = ir.from_proto(proto)
    except Exception as e:
        raise EmitError(
            f"cannot write opset {opset}: the model has opset {got} and converting failed: "
            f"{type(e).__name__}: {first_line(e)}"
        ) from e
    if model_opset(out) != opset:
        raise EmitError(f"asked for opset {opset}, got {model_opset(out)}")
    return out
