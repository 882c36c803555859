"""ONNX through the pipeline normrewrite ships: write a rewritten graph as ``.onnx`` with
:func:`normrewrite.emit.onnx.pipeline.emit_program` (export → norm fusions → cleanup → runtime
forms → validation → atomic write, exactly what ``normrewrite convert -o m.onnx`` runs) and read
back what onnxruntime computes from the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from harness import ort_run

from normrewrite.emit import export_program
from normrewrite.emit.onnx.options import OnnxOptions
from normrewrite.emit.onnx.pipeline import emit_program
from normrewrite.passes import norm_fusions


def write_onnx(gm: torch.nn.Module, inputs: tuple[Any, ...], path: Path, **options: Any) -> Path:
    """Export ``gm`` (a rewritten GraphModule) to ``path`` through the shipped ONNX pipeline;
    ``options`` are :class:`OnnxOptions` fields (``opset=23``, ``target="ort"`` …)."""
    emit_program(
        export_program(gm, tuple(inputs)), Path(path), inputs, None, OnnxOptions(**options),
        fusions=norm_fusions(),
    )
    return Path(path)


def onnx_outputs(
    gm: torch.nn.Module, inputs: tuple[Any, ...], path: Path, **options: Any
) -> list[np.ndarray]:
    """:func:`write_onnx`, then onnxruntime's outputs of the file (graph optimizations off)."""
    return ort_run(write_onnx(gm, inputs, path, **options), *inputs)


def op_types(path: Path) -> list[str]:
    """The op types of the main graph of an ONNX file, in order."""
    return [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]
