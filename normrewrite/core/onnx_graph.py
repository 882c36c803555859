"""Graph tools for ONNX models held as ``onnx_ir`` objects: constants, initializers, shapes,
counts and well-formedness. What the ONNX passes, the ONNX pipeline and the analyses share;
everything edits the IR (no protobuf surgery)."""

from __future__ import annotations

import contextlib

import numpy as np
import onnx_ir as ir


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The numpy value of an initializer or Constant output, else None."""
    if value is None:
        return None
    t = ir.convenience.get_const_tensor(value)
    return None if t is None else t.numpy()


def is_graph_input(graph: ir.Graph, value: ir.Value) -> bool:
    return any(v is value for v in graph.inputs)


def is_graph_output(graph: ir.Graph, value: ir.Value) -> bool:
    return any(v is value for v in graph.outputs)


def private_initializer(graph: ir.Graph, value: ir.Value | None) -> str | None:
    """None when ``value`` is an initializer read by exactly one node input; else why not."""
    if value is None:
        return "missing"
    if value.const_value is None or value.name not in graph.initializers:
        return f"{value.name} is not a stored initializer"
    if is_graph_input(graph, value):
        return f"{value.name} is also a graph input (overridable at run time)"
    if is_graph_output(graph, value):
        return f"{value.name} is also a graph output"
    n = sum(1 for u in value.uses() if u.node.op_type != "Shape")  # Shape reads no values
    if n != 1:
        return f"initializer {value.name} is shared by {n} readers"
    return None


def set_initializer(value: ir.Value, array: np.ndarray) -> None:
    """Store ``array`` as the value of the initializer ``value`` (shape and dtype follow)."""
    value.const_value = ir.tensor(np.ascontiguousarray(array), name=value.name)
    value.shape = ir.Shape(array.shape)
    value.dtype = ir.DataType.from_numpy(array.dtype)


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """A new initializer holding ``array``, named ``name`` (made unique)."""
    base, i = name, 1
    while name in graph.initializers:
        name, i = f"{base}_{i}", i + 1
    tensor = ir.tensor(np.ascontiguousarray(array), name=name)
    value = ir.Value(
        name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype), const_value=tensor
    )
    graph.register_initializer(value)
    return value


def infer_shapes(model: ir.Model) -> None:
    """onnx shape inference into the IR (best effort: contrib ops leave their shapes unknown)."""
    from onnx_ir.passes.common import ShapeInferencePass

    with contextlib.suppress(Exception):
        ShapeInferencePass()(model)


def static_inputs(model: ir.Model) -> bool:
    """True when every graph input has a fully static shape (no symbolic or unknown dim)."""
    return all(
        v.shape is not None and all(isinstance(d, int) for d in v.shape) for v in model.graph.inputs
    )


def symbolic_dims(model: ir.Model) -> list[set[int]]:
    """Per graph input, the axes whose size is symbolic."""
    return [
        {i for i, d in enumerate(v.shape or ()) if not isinstance(d, int)}
        for v in model.graph.inputs
    ]


def count_nodes(model: ir.Model) -> int:
    """Nodes of the main graph (subgraphs not counted)."""
    return sum(1 for _ in model.graph)


def model_opset(model: ir.Model) -> int:
    """The model's default-domain opset (0 when it imports none)."""
    return int(model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0)))


# --------------------------------------------------------------------------- opsets


def exporter_max_opset() -> int:
    """The newest opset torch.onnx.export writes."""
    try:
        from torch.onnx import _constants

        return int(_constants.ONNX_MAX_OPSET)
    except Exception:  # pragma: no cover - older/newer torch layouts
        return 18


def ort_max_opset() -> int:
    """The newest default-domain opset onnxruntime has kernels for."""
    from onnxruntime.capi import _pybind_state as C

    versions = [k.version_range[0] for k in C.get_all_opkernel_def() if k.domain in ("", "ai.onnx")]
    return max(versions) if versions else 17


def default_opset() -> int:
    """The newest default-domain opset that onnx, onnxruntime and the torch exporter all support."""
    import onnx

    return min(onnx.defs.onnx_opset_version(), ort_max_opset(), exporter_max_opset())


def model_bytes(model: ir.Model) -> bytes:
    """The serialized ``ModelProto`` (for an onnxruntime session on the model in memory)."""
    return ir.serde.serialize_model(model).SerializeToString()


def graph_problem(model: ir.Model) -> str | None:
    """Why the main graph is not well formed (a cycle, a node reading a value nothing produces),
    or None. Sorts the graph topologically as a side effect."""
    graph = model.graph
    try:
        graph.sort()
    except Exception as e:
        return f"a cyclic graph: {e}"
    known = {id(v) for v in graph.inputs} | {id(v) for v in graph.initializers.values()}
    for node in graph:
        for v in node.inputs:
            if (
                v is not None
                and id(v) not in known
                and v.producer() is None
                and v.const_value is None
            ):
                return f"{node.op_type} {node.name} reading an undefined value {v.name}"
        known.update(id(o) for o in node.outputs)
    return None
