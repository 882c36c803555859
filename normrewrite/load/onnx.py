"""Loading an ONNX model as an ``onnx_ir.Model``, safely and within bounds (no torch tracing).

Every check runs before anything is built from the file, and each refusal is one
:class:`~normrewrite.errors.LoadError` line:

* the leading bytes must be a ``ModelProto`` (not empty, not a zip archive);
* external-data locations must stay inside the model's directory (:mod:`normrewrite.load.safety`);
* :class:`OnnxLimits` — the size of the work a file can ask for: nodes (all graphs, subgraphs and
  functions included), graph nesting depth (``If`` / ``Loop`` / ``Scan`` bodies), and the bytes
  the tensors declare (dims × element size) against the bytes actually stored (the file and its
  external data). A 25 MB file of a million tiny nodes would otherwise take gigabytes and minutes
  to convert; a tensor declaring more than it stores is a decompression bomb or a corrupt file.
  The defaults are generous for real models (the largest transformer exports have some 10⁴–10⁵
  nodes and nest 1–3 graphs deep); each message names the keyword that raises its limit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any

import onnx_ir as ir

from normrewrite.errors import LoadError, first_line


@dataclass(frozen=True)
class OnnxLimits:
    """Bounds on what an ONNX input may ask normrewrite to process."""

    max_nodes: int = 500_000  # nodes in all graphs, subgraphs and functions
    max_depth: int = 32  # graph nesting (the main graph is depth 1)
    max_declared_ratio: float = 16.0  # declared tensor bytes / stored bytes (varint int64: 8)


def load_onnx(path: str | os.PathLike[str], limits: OnnxLimits | None = None) -> ir.Model:
    """An ``onnx_ir.Model`` from ``path`` (external data resolved), or a one-line LoadError."""
    from onnx.external_data_helper import load_external_data_for_model

    from normrewrite.load.safety import check_external_data, parse_onnx

    p = Path(path)
    if not p.is_file():
        raise LoadError(f"no such file: {p}")
    with p.open("rb") as f:
        head = f.read(4)
    if not head:
        raise LoadError(f"{p}: empty file, not an ONNX model")
    if head[:2] == b"PK":
        raise LoadError(f"{p}: a zip archive (a .pt2 program?), not an ONNX model")
    if head[:1] != b"\x08":  # every ModelProto starts with field 1 (ir_version), varint
        raise LoadError(f"{p}: not an ONNX model (bad leading bytes {head!r})")
    proto = parse_onnx(p)
    data_files = check_external_data(p, proto)  # locations stay inside the model's directory
    if not proto.opset_import or not proto.graph.node:
        raise LoadError(f"{p}: not a usable ONNX model (no opset import or an empty graph)")
    stored = p.stat().st_size + sum(f.stat().st_size for f in set(data_files))
    check_limits(proto, stored, limits or OnnxLimits(), where=str(p))
    try:
        load_external_data_for_model(proto, str(p.parent if str(p.parent) else Path(".")))
        return ir.from_proto(proto)
    except Exception as e:
        raise LoadError(
            f"{p}: cannot read the ONNX model: {type(e).__name__}: {first_line(e)}"
        ) from e


def check_limits(proto: Any, stored_bytes: int, limits: OnnxLimits, *, where: str) -> None:
    """Refuse a ``ModelProto`` (external data not loaded) over ``limits``, before any of it is
    converted. Walks graphs breadth first, refusing as soon as the node count is over."""
    from onnx import AttributeProto

    stack: list[tuple[Any, int]] = [(proto.graph, 1)] + [(f, 1) for f in proto.functions]
    nodes = 0
    declared = 0
    while stack:
        graph, depth = stack.pop()
        if depth > limits.max_depth:
            raise LoadError(
                f"{where}: graphs nested {depth} deep exceed the limit max_depth="
                f"{limits.max_depth} (raise it for a genuine model: --onnx-limit KEY=N)"
            )
        nodes += len(graph.node)
        if nodes > limits.max_nodes:
            raise LoadError(
                f"{where}: more than {limits.max_nodes} nodes exceed the limit max_nodes="
                f"{limits.max_nodes} (raise it for a genuine model: --onnx-limit KEY=N)"
            )
        declared += sum(_declared_bytes(t) for t in getattr(graph, "initializer", ()))
        for node in graph.node:
            for a in node.attribute:
                if a.type == AttributeProto.GRAPH:
                    stack.append((a.g, depth + 1))
                elif a.type == AttributeProto.GRAPHS:
                    stack.extend((g, depth + 1) for g in a.graphs)
                elif a.type == AttributeProto.TENSOR:
                    declared += _declared_bytes(a.t)
                elif a.type == AttributeProto.TENSORS:
                    declared += sum(_declared_bytes(t) for t in a.tensors)
    if declared > limits.max_declared_ratio * stored_bytes:
        raise LoadError(
            f"{where}: its tensors declare {declared} bytes, more than max_declared_ratio="
            f"{limits.max_declared_ratio:g} times the {stored_bytes} bytes stored (a corrupt or "
            "hostile file; raise the ratio for a genuine model)"
        )


def _declared_bytes(tensor: Any) -> int:
    """dims × element size of a ``TensorProto`` (strings: what they store)."""
    from onnx import TensorProto, helper

    if tensor.data_type == TensorProto.STRING:
        return sum(len(s) for s in tensor.string_data)
    if any(d < 0 for d in tensor.dims):
        raise LoadError(f"tensor {tensor.name!r} has a negative dimension {list(tensor.dims)}")
    try:
        size = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except Exception:  # an unknown element type: ir.from_proto refuses it with its own message
        size = 1
    return prod(tensor.dims) * size
