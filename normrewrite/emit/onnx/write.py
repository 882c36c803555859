"""The write and validation stages: an ONNX model (and its external data) is written under a
temporary directory beside the destination, validated there, and renamed into place only when
everything succeeded — a failure leaves nothing behind.

Validation is ``onnx.checker`` (``full_check``: types and shapes) for standard models and an
onnxruntime session for models with onnxruntime-only ops, which the checker cannot follow;
external-data locations are checked as an input's would be (:mod:`normrewrite.load.safety`)."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import onnx_ir as ir

from normrewrite.emit.files import publish_together
from normrewrite.errors import EmitError, first_line
from normrewrite.verify.onnxruntime import session

# ops that live in onnxruntime's contrib set (default domain by mistake, or com.microsoft):
# onnx.checker cannot follow them, so such models are validated by creating a session
ORT_ONLY_OPS = frozenset(
    {
        "SimplifiedLayerNormalization",
        "SkipSimplifiedLayerNormalization",
        "SkipLayerNormalization",
        "GroupNorm",
        "FusedMatMul",
        "BiasGelu",
        "FastGelu",
        "MultiHeadAttention",
        "GroupQueryAttention",
    }
)


@contextlib.contextmanager
def atomic_pair(dest: Path) -> Iterator[Path]:
    """A temporary path for ``dest`` in a directory beside it; the model and its external data
    are committed together (data first) only when the block succeeds, as one step of the run's
    output transaction (:func:`normrewrite.emit.files.publish_together`)."""
    parent = dest.parent if str(dest.parent) else Path(".")
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=parent))
    try:
        yield tmp / dest.name
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = sorted(tmp.iterdir(), key=lambda f: f.name == dest.name)  # data first, model last
    publish_together([(f, parent / f.name) for f in files], scratch=tmp)


def initializer_bytes(model: ir.Model) -> int:
    return sum(
        v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None
    )


def write_model(
    model: ir.Model,
    path: Path,
    *,
    threshold: int,
    on_tensor: Callable[[Any, Any], None] | None = None,
    max_in_flight_bytes: int | None = None,
) -> list[str]:
    """Save ``model`` to ``path``; its weights go to ``PATH.data`` beside it when the initializers
    exceed ``threshold`` bytes (protobuf's 2 GB limit; 0: always). ``on_tensor`` and
    ``max_in_flight_bytes`` reach ``onnx_ir.save`` (progress, memory bound while streaming)."""
    kwargs: dict[str, Any] = {}
    if on_tensor is not None:
        kwargs["callback"] = on_tensor
    if max_in_flight_bytes is not None:
        kwargs["max_in_flight_bytes"] = max_in_flight_bytes
    try:
        if initializer_bytes(model) > threshold:
            data = path.name + ".data"
            ir.save(model, str(path), external_data=data, size_threshold_bytes=1024, **kwargs)
            over = f" (initializers over {threshold} bytes)" if threshold else ""
            return [f"weights written as external data to {data}{over}"]
        ir.save(model, str(path), **kwargs)
    except Exception as e:
        raise EmitError(f"writing {path.name} failed: {type(e).__name__}: {first_line(e)}") from e
    return []


def validate_file(path: Path, model: ir.Model | None = None) -> list[str]:
    """Validate a written model (see the module docstring); returns notes for the report.

    ``model``: the in-memory model just written to ``path`` (in a directory of its own, as
    :func:`atomic_pair` gives): its op set is read from it, and the file is parsed here only when
    something was written beside it — external data, whose locations are checked. Without it the
    file is parsed once for every check."""
    import onnx

    from normrewrite.load.safety import check_external_data

    proto = None
    if model is None or any(f != path for f in path.parent.iterdir()):
        proto = onnx.load(str(path), load_external_data=False)  # without the weights' bytes
        check_external_data(path, proto)
    nodes = proto.graph.node if model is None else model.graph  # NodeProto / ir.Node alike
    ort_ops = sorted(
        {n.op_type for n in nodes if n.op_type in ORT_ONLY_OPS or n.domain == "com.microsoft"}
    )
    del proto, nodes  # the checks below read the file themselves: do not hold a second copy
    if ort_ops:
        try:
            session(path)
        except Exception as e:
            raise EmitError(f"onnxruntime refuses the model: {first_line(e)}") from e
        return [f"uses onnxruntime ops ({', '.join(ort_ops)}): validated by an onnxruntime session"]
    try:
        # by path: handing it the proto makes the checker serialize a second copy (+1× the model
        # in peak RSS, measured on BERT-base), and with external data it reads the files itself
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:
        raise EmitError(f"the ONNX model fails onnx.checker: {first_line(e)}") from e
    return []


def save_validated(model: ir.Model, dest: Path, *, threshold: int) -> list[str]:
    """Write ``model`` to ``dest`` atomically, validated before the rename."""
    with atomic_pair(dest) as tmp:
        notes = write_model(model, tmp, threshold=threshold)
        notes += validate_file(tmp, model)
    return notes
