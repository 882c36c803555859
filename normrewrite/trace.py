"""Tracing a module into a ``torch.fx.GraphModule``.

``auto`` tries ``torch.fx.symbolic_trace`` first (readable module-call graphs) and checks the
result actually runs on the example inputs; where it fails — every Hugging Face model does —
``torch.export`` takes over, producing an ATen graph whose nodes keep their module path in
``nn_module_stack``. Both results have their tensor shapes recorded in node metadata.

The traced module never shares mutable state with the caller's model: symbolic_trace works on a
deep copy; torch.export's module holds the same tensors, which passes never write into (they only
rebind names, see :func:`normrewrite.core.graph.set_tensor`).
"""

from __future__ import annotations

import contextlib
import copy
import io
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.fx import GraphModule
from torch.fx.passes.shape_prop import ShapeProp

from normrewrite.errors import TraceError, first_line

Tracer = Literal["auto", "fx", "export"]


@dataclass
class Traced:
    graph_module: GraphModule
    tracer: str  # "fx" | "export" | "pt2"
    notes: list[str]


def on_meta(inputs: tuple[Any, ...]) -> bool:
    return any(isinstance(t, torch.Tensor) and t.device.type == "meta" for t in inputs)


def trace(
    module: nn.Module, example_inputs: tuple[Any, ...], tracer: Tracer = "auto", *, dynamic: bool = False
) -> Traced:
    """``dynamic``: torch.export with every input dim free (``Dim.AUTO``), so no shape is baked in
    (for ``--dynamic`` ONNX); symbolic_trace graphs are shape-free anyway."""
    if tracer not in ("auto", "fx", "export"):
        raise TraceError(f"unknown tracer {tracer!r} (use auto, fx or export)")
    notes: list[str] = []
    if tracer in ("auto", "fx"):
        try:
            gm = _fx(module, example_inputs)
            return Traced(gm, "fx", notes)
        except Exception as e:
            if tracer == "fx":
                raise TraceError(f"torch.fx.symbolic_trace failed: {type(e).__name__}: {first_line(e)}") from e
            notes.append(f"symbolic_trace failed ({type(e).__name__}: {first_line(e)}); used torch.export")
    try:
        gm = _export(module, example_inputs, dynamic=dynamic)
    except Exception as e:
        raise TraceError(f"torch.export failed: {type(e).__name__}: {first_line(e)}") from e
    return Traced(gm, "export", notes)




def _fx(module: nn.Module, example_inputs: tuple[Any, ...]) -> GraphModule:
    gm = torch.fx.symbolic_trace(copy.deepcopy(module))
    # symbolic_trace can "succeed" and still produce a graph that does not run (e.g. it baked in
    # a shape-dependent branch wrongly or lost a kwarg): propagate shapes, which runs it.
    with torch.no_grad(), silenced():  # ShapeProp prints a traceback before re-raising
        ShapeProp(gm).propagate(*example_inputs)
    return gm


def _export(module: nn.Module, example_inputs: tuple[Any, ...], *, dynamic: bool = False) -> GraphModule:
    with warnings.catch_warnings(), silenced():
        warnings.simplefilter("ignore")
        ep = torch.export.export(module, tuple(example_inputs), strict=False,
                                 dynamic_shapes=dynamic_shapes(example_inputs) if dynamic else None)
    return exported_module(ep)


def exported_module(ep: torch.export.ExportedProgram) -> GraphModule:
    """The unlifted, editable GraphModule of an exported program (parameters as ``get_attr``)."""
    gm = ep.module()
    if not isinstance(gm, GraphModule):  # pragma: no cover - future torch
        raise TraceError("torch.export returned a module that is not an fx GraphModule")
    return gm


@contextlib.contextmanager
def silenced() -> Iterator[None]:
    """torch.export prints the partial graph to stderr when it fails: keep it out of ours (the
    error message says what failed)."""
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        yield


def dynamic_shapes(example_inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    """``torch.export`` dynamic_shapes with every dim of every tensor input ``Dim.AUTO`` (export
    keeps the dims the model constrains, e.g. channels, static)."""
    auto = torch.export.Dim.AUTO
    return tuple({i: auto for i in range(t.dim())} if isinstance(t, torch.Tensor) else None
                 for t in example_inputs)
