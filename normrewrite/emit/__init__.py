"""Writing the rewritten model.

* ``.pt2`` — a ``torch.export`` program of the rewritten GraphModule (``torch.export.load``);
* ``.onnx`` — the ONNX pipeline (:mod:`normrewrite.emit.onnx.pipeline`): export of that
  program, cleanup and norm fusions, validation, and parity in onnxruntime against the original
  model's outputs;
* a directory — ``model.py`` (the graph as readable Python over ATen ops) + ``weights.safetensors``
  + ``README.txt``; ``model.load()`` rebuilds an ``nn.Module`` without normrewrite.

Every output is written to a temporary name beside the destination and renamed on success.
"""

from __future__ import annotations

import copy
import inspect
import json
import re
import textwrap
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.export import ExportedProgram
from torch.fx import GraphModule
from torch.utils import _pytree as pytree

from normrewrite.emit.files import atomic_dir, atomic_file, guarded_writer
from normrewrite.errors import EmitError, first_line
from normrewrite.load.specs import OUTPUT_NAMES_META, OUTPUTS_FILE
from normrewrite.trace import silenced
from normrewrite.verify import Comparison


@dataclass(frozen=True)
class EmitResult:
    path: str
    format: str  # "pt2" | "onnx" | "dir"
    parity: Comparison | None = None  # onnxruntime vs original, for ONNX
    notes: tuple[str, ...] = ()
    outputs: Outputs | None = None  # what a .pt2 program returns (names in order)


def output_format(path: Path) -> str:
    s = str(path)
    if s.endswith(".pt2"):
        return "pt2"
    if s.endswith(".onnx"):
        return "onnx"
    if s.endswith(("/", "\\")) or path.is_dir() or path.suffix == "":
        return "dir"
    raise EmitError(
        f"cannot tell the output format of {path}: use .pt2, .onnx or a directory (DIR/)"
    )


# the output contract of an emitted program, kept on its graph module (``output_names``) and
# written into a ``.pt2`` as ``normrewrite/outputs.json``
_OUTPUTS_META = "normrewrite.outputs"


@dataclass(frozen=True)
class Outputs:
    """What an emitted program returns: ``names`` of its outputs in order (``last_hidden_state``,
    ``pooler_output``; ``hidden_states.0`` inside a sequence; ``output`` for a lone tensor) and
    whether they were ``flattened`` into a tuple (False: the model's own output classes kept)."""

    names: tuple[str, ...]
    flattened: bool

    def to_json(self) -> str:
        from normrewrite import __version__

        return json.dumps(
            {"normrewrite": __version__, "outputs": list(self.names), "flattened": self.flattened},
            indent=2,
        )


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):  # MappingKey, GetAttrKey, SequenceKey
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return pytree.keystr((key,))


def _flatten(value: Any) -> tuple[list[Any], tuple[str, ...]]:
    """The leaves of an output tree and their names (positions when a node type cannot name its
    children: registered without ``flatten_with_keys_fn``)."""
    if isinstance(value, torch.Tensor):
        return [value], ("output",)
    try:
        pairs, _ = pytree.tree_flatten_with_path(value)
    except ValueError:
        leaves = pytree.tree_leaves(value)
        return leaves, tuple(str(i) for i in range(len(leaves)))
    return [v for _, v in pairs], tuple(".".join(map(_key_name, p)) for p, _ in pairs)


class _FlatOutputs(nn.Module):
    """``module`` with its outputs flattened into a tuple of tensors (a lone tensor stays one), to
    be exported in its place. It shares the module's parameters, buffers, submodules and tensor
    attributes under the same names (no ``module.`` prefix in the program's state dict), and its
    forward has the module's signature (the program's inputs keep their names)."""

    def __init__(self, module: nn.Module, flatten: bool, names: list[str]) -> None:
        super().__init__()
        self._parameters = module._parameters
        self._buffers = module._buffers
        self._non_persistent_buffers_set = module._non_persistent_buffers_set
        self._modules = module._modules
        for k, v in vars(module).items():
            if isinstance(v, torch.Tensor) and not k.startswith("__"):
                self.__dict__[k] = v  # tensor constants (``_tensor_constant0``)
        inner = module.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            out = inner(*args, **kwargs)
            leaves, found = _flatten(out)
            names[:] = found  # a closure: export restores the module's own attributes
            if not flatten or isinstance(out, torch.Tensor):
                return out
            return tuple(leaves)

        forward.__signature__ = inspect.signature(inner)  # type: ignore[attr-defined]
        self.__dict__["forward"] = forward


def export_program(
    gm: GraphModule,
    example_inputs: tuple[Any, ...],
    *,
    dynamic: bool = False,
    keep_output_classes: bool = False,
) -> ExportedProgram:
    """A fresh ``torch.export`` program of the rewritten module (``dynamic``: batch and sequence
    dims marked dynamic, :func:`normrewrite.trace.export_dynamic`).

    Its outputs are plain tensors: a model returning an output class (every ``transformers``
    model: ``BaseModelOutput…``) or nested tuples/dicts returns the flat tuple of its tensors, so
    the program loads with ``torch`` alone (``torch.export.load`` needs every class named in the
    output spec registered). A lone tensor stays a tensor. ``keep_output_classes`` keeps the
    model's own output structure. Either way, one export; the output names in order are recorded
    (:func:`output_names`; a program loaded from a ``.pt2`` normrewrite wrote keeps the names
    stored in it) and :func:`write_pt2` stores them in the archive."""
    from normrewrite.trace import export_dynamic

    names: list[str] = []
    wrapper = _FlatOutputs(gm, not keep_output_classes, names)
    try:
        if dynamic:
            ep = export_dynamic(wrapper, example_inputs)
        else:
            with warnings.catch_warnings(), silenced():
                warnings.simplefilter("ignore")
                ep = torch.export.export(wrapper, tuple(example_inputs), strict=False)
    except Exception as e:
        raise EmitError(
            f"torch.export of the rewritten model failed: {type(e).__name__}: {first_line(e)}"
        ) from e
    found = tuple(names)
    known = gm.meta.get(OUTPUT_NAMES_META)  # a .pt2 normrewrite wrote: its flat outputs' names
    if known and len(known) == len(found) and found == tuple(map(str, range(len(found)))):
        found = tuple(known)
    ep.graph_module.meta[_OUTPUTS_META] = Outputs(found, not keep_output_classes)
    return ep


def reuse_program(
    ep: ExportedProgram, *, keep_output_classes: bool = False
) -> ExportedProgram | None:
    """:func:`export_program`'s result without exporting again, from the program the graph was
    traced with (``ep``, its graph unchanged since): the same graph and weights under the same
    output contract — the flat tuple of the output tensors (a lone tensor stays one), or the
    model's own structure with ``keep_output_classes``. None when an output is not a graph
    tensor (a constant): export it again then."""
    sig = ep.module_call_graph[0].signature
    if sig is None or sig.out_spec.num_leaves != len(ep.graph_signature.user_outputs):
        return None
    structure = pytree.tree_unflatten([torch.empty(0)] * sig.out_spec.num_leaves, sig.out_spec)
    _, found = _flatten(structure)
    flatten = not keep_output_classes and not isinstance(structure, torch.Tensor)
    calls = copy.deepcopy(ep.module_call_graph)
    if flatten:
        calls[0].signature.out_spec = pytree.tree_structure(tuple(range(len(found))))
    program = ExportedProgram(
        root=ep.graph_module,
        graph=ep.graph,
        graph_signature=ep.graph_signature,
        state_dict=ep.state_dict,
        range_constraints=ep.range_constraints,
        module_call_graph=calls,
        example_inputs=ep.example_inputs,
        constants=ep.constants,
        verifiers=ep.verifiers,
    )
    program.graph_module.meta[_OUTPUTS_META] = Outputs(found, not keep_output_classes)
    return program


def output_names(ep: ExportedProgram) -> Outputs | None:
    """The outputs :func:`export_program` recorded for ``ep`` (None for other programs)."""
    found = ep.graph_module.meta.get(_OUTPUTS_META)
    return found if isinstance(found, Outputs) else None


def dim_upper_bounds(ep: ExportedProgram) -> list[dict[int, int]]:
    """Per user input of ``ep``, the largest size each bounded symbolic dim may take (its range
    constraint; e.g. a sequence dim bounded by the model's position table)."""
    import sympy

    user = set(ep.graph_signature.user_inputs)
    bounds: list[dict[int, int]] = []
    for node in ep.graph.nodes:
        if node.op != "placeholder" or node.name not in user:
            continue
        val, found = node.meta.get("val"), {}
        for i, d in enumerate(getattr(val, "shape", ())):
            expr = getattr(getattr(d, "node", None), "expr", None)
            vr = ep.range_constraints.get(expr) if expr is not None else None
            if vr is not None and isinstance(vr.upper, sympy.Integer):  # not int_oo
                found[i] = int(vr.upper)
        bounds.append(found)
    return bounds


# --------------------------------------------------------------------------- .pt2


def write_pt2(ep: ExportedProgram, dest: Path) -> EmitResult:
    """``torch.export.save`` through a guarded file object: a write error (a full disk) becomes
    one :class:`EmitError` instead of an abort in torch's C++ zip writer. The output names
    (:class:`Outputs`) go into the archive as ``normrewrite/outputs.json`` (read them with
    ``torch.export.load(path, extra_files={"normrewrite/outputs.json": ""})``)."""
    outputs = output_names(ep)
    extra = {OUTPUTS_FILE: outputs.to_json()} if outputs is not None else None
    with atomic_file(dest) as tmp:
        try:
            with guarded_writer(tmp) as f:
                torch.export.save(ep, f, extra_files=extra)
        except EmitError:
            raise
        except Exception as e:
            raise EmitError(f"writing {dest} failed: {type(e).__name__}: {first_line(e)}") from e
    return EmitResult(str(dest), "pt2", outputs=outputs)


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
                raise EmitError(
                    f"cannot write {fqn}: a {type(t).__name__} constant is not a tensor"
                )
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
                title=title,
                version=__version__,
                tensors=tensors,
                inputs=", ".join(user_inputs),
                n_outputs=n_out,
                code=code,
            )
        )
        (tmp / "manifest.json").write_text(
            json.dumps(
                {"inputs": user_inputs, "outputs": n_out, "tensors": [t for t, _ in tensors]},
                indent=2,
            )
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
