"""Verification in onnxruntime: sessions (CPU, graph optimizations off by default, so what is
written is what runs and onnxruntime's own fusions cannot hide a bug), example feeds for an ONNX
model, and parity against a reference measured as :func:`normrewrite.verify.compare` measures it."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from normrewrite.errors import EmitError, LoadError
from normrewrite.verify import Comparison, compare, tensor_leaves


def session(model: str | os.PathLike[str] | bytes, *, optimize: bool = False) -> Any:
    """An ``InferenceSession`` on CPU for a model file or serialized model."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    opts.log_severity_level = 4  # errors surface as exceptions; no log spam
    src = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


_NP = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
}


def make_feeds(
    sess: Any, shapes: Sequence[Sequence[int]] | None = None, seed: int = 0, dim: int = 2
) -> dict[str, np.ndarray]:
    """Random inputs for a session: ``shapes`` per input, or the model's shapes with every
    symbolic dimension set to ``dim``. Integer inputs (token ids) are drawn from [0, 2)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    inputs = sess.get_inputs()
    if shapes is not None and len(shapes) != len(inputs):
        raise LoadError(
            f"the ONNX model takes {len(inputs)} inputs; {len(shapes)} --input shapes given"
        )
    for i, inp in enumerate(inputs):
        dt = _NP.get(inp.type)
        if dt is None:
            raise LoadError(
                f"input {inp.name}: cannot make example values of type {inp.type}; pass --input"
            )
        shape = (
            list(shapes[i])
            if shapes is not None
            else [d if isinstance(d, int) else dim for d in inp.shape]
        )
        if np.issubdtype(dt, np.floating):
            feeds[inp.name] = rng.standard_normal(shape).astype(dt)
        elif dt is np.bool_:
            feeds[inp.name] = np.ones(shape, dtype=dt)
        else:
            feeds[inp.name] = rng.integers(0, 2, size=shape).astype(dt)
    return feeds


def torch_feeds(sess: Any, inputs: Sequence[Any]) -> dict[str, np.ndarray]:
    """The tensors of ``inputs`` (a torch model's example inputs), in order, as a session feed."""
    leaves = tensor_leaves(tuple(inputs))
    names = [i.name for i in sess.get_inputs()]
    if len(names) != len(leaves):
        raise EmitError(f"the ONNX model takes {len(names)} inputs, the torch model {len(leaves)}")
    feed = {}
    for n, t in zip(names, leaves, strict=True):
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16: such inputs are kept fp32 upstream
            raise EmitError("bfloat16 graph inputs cannot be fed from numpy; use --keep-io-types")
        feed[n] = np.ascontiguousarray(t.detach().cpu().numpy())
    return feed


def ort_outputs(model: str | os.PathLike[str] | bytes, inputs: Sequence[Any]) -> list[torch.Tensor]:
    """Run ``model`` in onnxruntime (optimizations off) on a torch model's inputs; float16
    outputs come back as float32 tensors."""
    sess = session(model)
    return [
        torch.from_numpy(np.asarray(o, dtype=np.float32) if o.dtype == np.float16 else o)
        for o in sess.run(None, torch_feeds(sess, inputs))
    ]


def parity(reference: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor]) -> Comparison:
    """:func:`~normrewrite.verify.compare`, with outputs that do not line up as an EmitError."""
    try:
        return compare(list(reference), list(outputs))
    except ValueError as e:
        raise EmitError(f"the ONNX model's outputs do not line up with the reference's: {e}") from e


def relative_error(ref: Sequence[np.ndarray], out: Sequence[np.ndarray]) -> tuple[float, float]:
    """(max abs error, max relative error) of onnxruntime outputs against reference arrays."""
    cmp = parity(
        [torch.from_numpy(np.asarray(a)) for a in ref],
        [torch.from_numpy(np.asarray(b)) for b in out],
    )
    return cmp.max_abs_err, cmp.max_rel_err


def other_size(d: int, upper: int | None = None) -> int:
    """A size for a dynamic dim other than ``d`` and other than 2 when ``d`` is 1 (a size-1
    example is traced at 2): half again, at least 3, at most ``upper`` (the program's bound, e.g.
    a model's maximum sequence length); below ``d`` when ``d`` is at the bound."""
    grown = max(3, d + d // 2)
    if upper is None or grown <= upper:
        return grown
    return upper if upper != d else max(1, d - max(1, d // 4))


def other_size_inputs(
    inputs: Sequence[Any],
    dynamic_dims: Sequence[set[int]],
    seed: int = 1,
    upper: Sequence[dict[int, int]] | None = None,
) -> tuple[Any, ...]:
    """Example inputs with every dynamic dim resized (:func:`other_size`; ``upper``: per input,
    the largest size a dim may take): a shape other than the export example's and the tracing
    size's, for checking ``--dynamic`` output in onnxruntime and torch."""
    g = torch.Generator().manual_seed(seed)
    out: list[Any] = []
    bounds = list(upper) if upper is not None else [{} for _ in inputs]
    for t, dims, up in zip(inputs, dynamic_dims, bounds, strict=True):
        if not isinstance(t, torch.Tensor) or not dims:
            out.append(t)
            continue
        shape = [other_size(d, up.get(i)) if i in dims else d for i, d in enumerate(t.shape)]
        if t.is_floating_point():
            out.append(torch.randn(shape, generator=g, dtype=torch.float32).to(t.dtype))
        else:
            hi = max(int(t.max()) + 1, 2) if t.numel() else 2
            out.append(torch.randint(0, hi, shape, generator=g, dtype=t.dtype))
    return tuple(out)
