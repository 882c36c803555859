"""Tracing a module into a ``torch.fx.GraphModule``.

``auto`` tries ``torch.fx.symbolic_trace`` first (readable module-call graphs) and checks the
result actually runs on the example inputs; where it fails — every Hugging Face model does —
``torch.export`` takes over, producing an ATen graph whose nodes keep their module path in
``nn_module_stack``. Both results have their tensor shapes recorded in node metadata.

The traced module never shares mutable state with the caller's model: a symbolic_trace graph is
deep-copied once the trace succeeded (a failed attempt, as on every Hugging Face model, copies
nothing); torch.export's module holds the same tensors, which passes never write into (they only
rebind names, see :func:`normrewrite.core.graph.set_tensor`). The exported program is kept
(:attr:`Traced.program`), so an emitter can reuse it while the graph is unchanged.
"""

from __future__ import annotations

import contextlib
import copy
import io
import re
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
    program: torch.export.ExportedProgram | None = None  # torch.export's program of the graph


def on_meta(inputs: tuple[Any, ...]) -> bool:
    return any(isinstance(t, torch.Tensor) and t.device.type == "meta" for t in inputs)


def trace(
    module: nn.Module,
    example_inputs: tuple[Any, ...],
    tracer: Tracer = "auto",
    *,
    dynamic: bool = False,
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
                raise TraceError(
                    f"torch.fx.symbolic_trace failed: {type(e).__name__}: {first_line(e)}"
                    + integer_ids_hint(module, example_inputs, e)
                ) from e
            notes.append(
                f"symbolic_trace failed ({type(e).__name__}: {first_line(e)}); used torch.export"
            )
    try:
        ep = _export(module, example_inputs, dynamic=dynamic)
    except Exception as e:
        raise TraceError(
            f"torch.export failed: {type(e).__name__}: {first_line(e)}"
            + integer_ids_hint(module, example_inputs, e)
        ) from e
    return Traced(exported_module(ep), "export", notes, ep)


_INDEX_ERROR = re.compile(r"\bindices\b|embedding", re.IGNORECASE)
_INTEGER_EXPECTED = re.compile(r"\b(Long|Int)\b")


def integer_ids_hint(module: nn.Module, example_inputs: tuple[Any, ...], e: BaseException) -> str:
    """A hint appended to a tracing error when a floating-point example input probably feeds an
    embedding (token ids given as ``--input 1x16`` instead of ``--input 1x16:int64``): the error
    speaks of indices or an embedding, or the model has an ``nn.Embedding`` and the error asks for
    ``Long``/``Int``. Empty otherwise."""
    floats = [t for t in example_inputs if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not floats:
        return ""
    text = str(e)
    embeds = any(isinstance(m, nn.Embedding) for m in module.modules())
    if not (_INDEX_ERROR.search(text) or (embeds and _INTEGER_EXPECTED.search(text))):
        return ""
    shape = "x".join(map(str, floats[0].shape))
    return f" (token ids need an integer dtype: --input {shape}:int64)"


def _fx(module: nn.Module, example_inputs: tuple[Any, ...]) -> GraphModule:
    # a GraphModule shares the module's submodules and tensors: copy once the trace succeeded
    gm = copy.deepcopy(torch.fx.symbolic_trace(module))
    # symbolic_trace can "succeed" and still produce a graph that does not run (e.g. it baked in
    # a shape-dependent branch wrongly or lost a kwarg): propagate shapes, which runs it.
    with torch.no_grad(), silenced():  # ShapeProp prints a traceback before re-raising
        ShapeProp(gm).propagate(*example_inputs)
    return gm


def _export(
    module: nn.Module, example_inputs: tuple[Any, ...], *, dynamic: bool = False
) -> torch.export.ExportedProgram:
    if dynamic:
        return export_dynamic(module, example_inputs)
    with warnings.catch_warnings(), silenced():
        warnings.simplefilter("ignore")
        return torch.export.export(module, tuple(example_inputs), strict=False)


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
    """``torch.export`` dynamic_shapes for ``--dynamic``: the batch dim (0) of every tensor input
    and the sequence dim (1) of every integer input (token ids, masks) are marked dynamic
    explicitly (``Dim.DYNAMIC``); every other dim is ``Dim.AUTO``, so export keeps static what the
    model constrains (channels, features, a ViT's image size) and frees the rest."""
    auto, dyn = torch.export.Dim.AUTO, torch.export.Dim.DYNAMIC
    return tuple(
        {i: dyn if i in _marked_dims(t) else auto for i in range(t.dim())}
        if isinstance(t, torch.Tensor)
        else None
        for t in example_inputs
    )


def _marked_dims(t: torch.Tensor) -> set[int]:
    if t.dim() == 0:
        return set()
    integer = not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)
    return {0, 1} if integer and t.dim() >= 2 else {0}


def tracing_example(example_inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    """The example to export with when dims are marked dynamic: torch.export specialises every
    size-1 dim to 1 (the "0/1 specialisation"), so a marked dim of size 1 is grown to 2 by
    repeating the input along it. The program then accepts size 1 as well."""
    grown = []
    for t in example_inputs:
        if isinstance(t, torch.Tensor):
            for d in sorted(_marked_dims(t)):
                if t.shape[d] == 1:
                    t = torch.cat([t, t], dim=d)
        grown.append(t)
    return tuple(grown)


def export_dynamic(
    module: nn.Module, example_inputs: tuple[Any, ...]
) -> torch.export.ExportedProgram:
    """``torch.export`` with batch/sequence dims dynamic (:func:`dynamic_shapes`), traced at
    :func:`tracing_example`. A model that pins a marked dim to its example size (e.g. a reshape to
    a stored batch) cannot have it dynamic: export says so, and that is reported in one line."""
    with warnings.catch_warnings(), silenced():
        warnings.simplefilter("ignore")
        try:
            return torch.export.export(
                module,
                tracing_example(example_inputs),
                strict=False,
                dynamic_shapes=dynamic_shapes(example_inputs),
            )
        except Exception as e:
            if "specialized" in str(e) or "Constraints violated" in str(e) or "conflicts" in str(e):
                raise TraceError(
                    "--dynamic: the model fixes the size of its batch or sequence dimension "
                    f"({first_line(e)})"
                ) from e
            raise
