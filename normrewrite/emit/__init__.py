"""Writing the rewritten model.

* ``.pt2`` — a ``torch.export`` program of the rewritten GraphModule (``torch.export.load``);
* ``.onnx`` — ``torch.onnx.export(..., dynamo=True)`` of that program, checked with
  ``onnx.checker`` (``full_check=True``) and compared in onnxruntime, graph optimizations off,
  against the original model's outputs;
* a directory — ``model.py`` (the graph as readable Python over ATen ops) + ``weights.safetensors``
  + ``README.txt``; ``model.load()`` rebuilds an ``nn.Module`` without normrewrite.

Every output is written to a temporary name beside the destination and renamed on success.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import textwrap
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.export import ExportedProgram
from torch.fx import GraphModule

from normrewrite.emit.files import atomic_dir, atomic_file, guarded_writer
from normrewrite.errors import EmitError, first_line
from normrewrite.trace import silenced
from normrewrite.verify import Comparison, compare, tensor_leaves


@dataclass(frozen=True)
class EmitResult:
    path: str
    format: str  # "pt2" | "onnx" | "dir"
    parity: Comparison | None = None  # onnxruntime vs original, for ONNX
    notes: tuple[str, ...] = ()


def output_format(path: Path) -> str:
    s = str(path)
    if s.endswith(".pt2"):
        return "pt2"
    if s.endswith(".onnx"):
        return "onnx"
    if s.endswith(("/", "\\")) or path.is_dir() or path.suffix == "":
        return "dir"
    raise EmitError(f"cannot tell the output format of {path}: use .pt2, .onnx or a directory (DIR/)")


def export_program(gm: GraphModule, example_inputs: tuple[Any, ...], *, dynamic: bool = False) -> ExportedProgram:
    """A fresh ``torch.export`` program of the rewritten module (``dynamic``: all dims free)."""
    from normrewrite.trace import dynamic_shapes

    try:
        with warnings.catch_warnings(), silenced():
            warnings.simplefilter("ignore")
            return torch.export.export(gm, tuple(example_inputs), strict=False,
                                       dynamic_shapes=dynamic_shapes(example_inputs) if dynamic else None)
    except Exception as e:
        raise EmitError(f"torch.export of the rewritten model failed: {type(e).__name__}: {first_line(e)}") from e




# --------------------------------------------------------------------------- .pt2


def write_pt2(ep: ExportedProgram, dest: Path) -> EmitResult:
    """``torch.export.save`` through a guarded file object: a write error (a full disk) becomes
    one :class:`EmitError` instead of an abort in torch's C++ zip writer."""
    with atomic_file(dest) as tmp:
        try:
            with guarded_writer(tmp) as f:
                torch.export.save(ep, f)
        except EmitError:
            raise
        except Exception as e:
            raise EmitError(f"writing {dest} failed: {type(e).__name__}: {first_line(e)}") from e
    return EmitResult(str(dest), "pt2")


# --------------------------------------------------------------------------- .onnx


def to_onnx(ep: ExportedProgram, *, opset: int | None = None) -> Any:
    """``torch.onnx.export`` of a program, quietly; returns the ``ONNXProgram``."""
    sink = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
            warnings.simplefilter("ignore")
            return torch.onnx.export(ep, (), dynamo=True, opset_version=opset, verbose=False,
                                     optimize=True)
    except Exception as e:
        raise EmitError(f"ONNX export failed: {type(e).__name__}: {first_line(e)}") from e


def check_onnx(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:
        raise EmitError(f"the ONNX model fails onnx.checker: {first_line(e)}") from e


def onnx_outputs(path: Path, inputs: tuple[Any, ...], *, optimize: bool = False) -> list[Any]:
    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    leaves = tensor_leaves(inputs)
    names = [i.name for i in sess.get_inputs()]
    if len(names) != len(leaves):
        raise EmitError(f"the ONNX model takes {len(names)} inputs, the torch model {len(leaves)}")
    feed = {n: np.ascontiguousarray(t.detach().cpu().numpy()) for n, t in zip(names, leaves, strict=True)}
    return sess.run(None, feed)


def onnx_parity(path: Path, inputs: tuple[Any, ...], reference: list[torch.Tensor]) -> Comparison:
    outs = [torch.from_numpy(o) for o in onnx_outputs(path, inputs)]
    try:
        return compare(reference, outs)
    except ValueError as e:
        raise EmitError(f"the ONNX model's outputs do not line up with the torch model's: {e}") from e


def write_onnx(
    ep: ExportedProgram,
    dest: Path,
    example_inputs: tuple[Any, ...],
    reference: list[torch.Tensor] | None,
    *,
    opset: int | None = None,
    check: Callable[[Comparison], None] | None = None,
) -> EmitResult:
    """Export, save, check and compare; ``check`` may reject the parity (raise) before the
    file is renamed into place."""
    program = to_onnx(ep, opset=opset)
    with atomic_file(dest) as tmp:
        try:
            program.save(str(tmp), external_data=False)
        except Exception as e:
            raise EmitError(f"writing {dest} failed: {type(e).__name__}: {first_line(e)}") from e
        check_onnx(tmp)
        parity = onnx_parity(tmp, example_inputs, reference) if reference is not None else None
        if parity is not None and check is not None:
            check(parity)
    return EmitResult(str(dest), "onnx", parity)


# --------------------------------------------------------------------------- code + weights

_MODEL_PY = '''\
"""{title}

Generated by normrewrite {version}. The forward pass is the rewritten graph written out as
ATen ops; weights live in weights.safetensors. Needs only torch and safetensors:

    import model; m = model.load(); y = m(*inputs)
"""

import operator  # noqa: F401
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import device, inf, nan  # noqa: F401

# FQN of every stored tensor, in the order the graph takes them
TENSORS = {tensors!r}
# inputs, in order: {inputs}
OUTPUTS = {n_outputs}


class Graph(torch.nn.Module):
{code}


class Model(torch.nn.Module):
    def __init__(self, weights=None):
        super().__init__()
        state = load_file(str(weights or Path(__file__).with_name("weights.safetensors")))
        self.graph = Graph()
        self.names = []
        for i, (fqn, kind) in enumerate(TENSORS):
            t = state[fqn]
            attr = f"t{{i}}"
            if kind == "parameter":
                self.register_parameter(attr, torch.nn.Parameter(t, requires_grad=t.is_floating_point()))
            else:
                self.register_buffer(attr, t)
            self.names.append(attr)

    def forward(self, *inputs):
        out = self.graph(*[getattr(self, a) for a in self.names], *inputs)
        return out[0] if OUTPUTS == 1 else tuple(out)


def load(weights=None):
    return Model(weights).eval()
'''


def write_dir(ep: ExportedProgram, dest: Path, title: str) -> EmitResult:
    from safetensors.torch import save_file

    from normrewrite import __version__

    sig = ep.graph_signature
    tensors: list[tuple[str, str]] = []
    state: dict[str, torch.Tensor] = {}
    user_inputs: list[str] = []
    constants = ep.constants
    for spec in sig.input_specs:
        kind = spec.kind.name.lower()
        if kind == "user_input":
            user_inputs.append(spec.arg.name)
            continue
        fqn = spec.target
        if kind == "parameter":
            t = ep.state_dict[fqn]
        elif kind == "buffer":
            t = ep.state_dict[fqn] if fqn in ep.state_dict else constants[fqn]
        elif kind in ("constant_tensor", "custom_obj"):
            t = constants[fqn]
            if not isinstance(t, torch.Tensor):
                raise EmitError(f"cannot write {fqn}: a {type(t).__name__} constant is not a tensor")
        else:
            raise EmitError(f"cannot write an input of kind {kind} as code + weights")
        tensors.append((fqn, "parameter" if kind == "parameter" else "buffer"))
        state[fqn] = t.detach().contiguous().cpu()
    gm = ep.graph_module
    code = gm.code
    body = [ln for ln in code.splitlines() if not ln.lstrip().startswith("def ")]
    if any(re.search(r"\bself\.", ln) for ln in body):
        raise EmitError("the graph calls submodules; write .pt2 instead of code + weights")
    code = textwrap.indent(code.strip("\n"), "    ")
    n_out = len(sig.user_outputs)
    with atomic_dir(dest) as tmp:
        save_file(_dedupe(state), str(tmp / "weights.safetensors"))
        (tmp / "model.py").write_text(
            _MODEL_PY.format(
                title=title, version=__version__, tensors=tensors,
                inputs=", ".join(user_inputs), n_outputs=n_out, code=code,
            )
        )
        (tmp / "manifest.json").write_text(
            json.dumps({"inputs": user_inputs, "outputs": n_out, "tensors": [t for t, _ in tensors]}, indent=2)
        )
    return EmitResult(str(dest), "dir")


def _dedupe(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing memory: give each name its own storage."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for k, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else (id(t), 0)
        if key in seen:
            t = t.clone()
        seen.add(key)
        out[k] = t
    return out
