"""The pipeline's first stages: load the model (any input form) and trace it."""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule
from torch.utils import _pytree as pytree

from normrewrite.emit.onnx.options import OnnxOptions
from normrewrite.errors import UsageError
from normrewrite.load import LoadedModel, load
from normrewrite.load.inputs import InputSpec, as_tuple, make_inputs
from normrewrite.trace import Tracer, exported_module, trace
from normrewrite.verify import run

ModelLike = str | os.PathLike[str] | nn.Module | LoadedModel


def load_model(
    model: ModelLike,
    example_inputs: Any = None,
    *,
    input_specs: Sequence[InputSpec] | None = None,
    seed: int = 0,
    trust_remote_code: bool = False,
    trust_pickle: bool = False,
    trust_native_code: bool = False,
) -> LoadedModel:
    """A :class:`LoadedModel` from any input form; ``example_inputs`` override the form's own."""
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, nn.Module):
        if example_inputs is None:
            if not input_specs:
                raise UsageError("example_inputs are needed to trace an nn.Module")
            example_inputs = make_inputs(input_specs, seed)
        return LoadedModel(model, as_tuple(example_inputs), "module", type(model).__name__)
    loaded = load(model, input_specs, trust_remote_code=trust_remote_code, seed=seed,
                  trust_pickle=trust_pickle, trust_native_code=trust_native_code)
    if example_inputs is not None:
        loaded.example_inputs, loaded.input_origin = as_tuple(example_inputs), "given"
    return loaded


def training_modules(module: nn.Module) -> list[str]:
    """Modules whose behaviour depends on train/eval and that are in training mode."""
    modal = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm,
             nn.modules.dropout._DropoutNd)
    return [name or "<root>" for name, m in module.named_modules() if m.training and isinstance(m, modal)]


@dataclass
class Prepared:
    """A loaded and traced model; ``program`` is torch.export's program of ``graph_module`` (the
    ``export`` tracer), which emission reuses while no pass changed the graph."""

    loaded: LoadedModel
    graph_module: GraphModule
    tracer: str
    notes: list[str]
    program: torch.export.ExportedProgram | None = None


def load_and_trace(
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
) -> Prepared:
    """Load and trace (see :class:`Prepared`)."""
    loaded = load_model(model, example_inputs, input_specs=input_specs, seed=seed,
                        trust_remote_code=trust_remote_code, trust_pickle=trust_pickle,
                        trust_native_code=trust_native_code)
    notes = list(loaded.notes)
    if loaded.exported is not None:
        return Prepared(loaded, exported_module(loaded.exported), "pt2", notes)
    training = training_modules(loaded.module)
    if training and not keep_training:
        shown = ", ".join(training[:3]) + (f" and {len(training) - 3} more" if len(training) > 3 else "")
        notes.append(f"model was in training mode ({shown}); switched to eval mode before tracing")
        loaded.module.eval()
    traced = trace(loaded.module, loaded.example_inputs, tracer, dynamic=dynamic)
    return Prepared(loaded, traced.graph_module, traced.tracer, notes + traced.notes, traced.program)


def prepare(
    model: ModelLike, example_inputs: Any = None, **settings: Any
) -> tuple[LoadedModel, GraphModule, str, list[str]]:
    """Load and trace: (loaded model, traced graph, tracer used, notes). ``settings`` are
    :func:`load_and_trace`'s keywords (one list of them, kept there)."""
    p = load_and_trace(model, example_inputs, **settings)
    return p.loaded, p.graph_module, p.tracer, p.notes


def cast_model(loaded: LoadedModel, options: OnnxOptions) -> list[torch.Tensor]:
    """``--dtype``: run the fp32 original (the parity reference), then cast the module to the dtype
    (inputs too, unless ``--keep-io-types``: then casts wrap the module and its I/O stays fp32)."""
    ref = run(loaded.module, loaded.example_inputs)
    dtype = options.torch_dtype()
    module = copy.deepcopy(loaded.module).to(dtype)  # .to() is in place: keep the caller's model
    if options.keep_io_types:
        loaded.module = KeepIOTypes(module, dtype).eval()
    else:
        loaded.module = module
        loaded.example_inputs = tuple(
            t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
            for t in loaded.example_inputs
        )
    kept = " (fp32 inputs/outputs kept)" if options.keep_io_types else ""
    loaded.notes.append(f"model cast to {options.dtype}{kept}")
    return ref


class KeepIOTypes(nn.Module):
    """fp32 in, ``dtype`` inside, fp32 out (``--keep-io-types``)."""

    def __init__(self, inner: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.inner, self.dtype = inner, dtype

    def forward(self, *args: Any) -> Any:
        args = tuple(a.to(self.dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                     for a in args)
        out = self.inner(*args)
        return pytree.tree_map(
            lambda t: t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t, out)
