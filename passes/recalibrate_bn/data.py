"""recalibrate-bn's data: batches read from a ``.pt``/``.npz`` file or drawn at random like the
example inputs (the formats are in :mod:`normrewrite.passes.recalibrate_bn`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from normrewrite.errors import PassError, UsageError

from .measure import Batch


def random_batches(
    example: Sequence[Any], n: int, batch_size: int | None, seed: int
) -> list[Batch]:
    """``n`` random batches shaped like ``example`` (see the module docstring)."""
    leaves = pytree.tree_leaves(tuple(example))
    tensors = [t for t in leaves if isinstance(t, Tensor)]
    if len(tensors) != len(leaves) or not tensors:
        raise PassError(
            "recalibrate-bn: the example inputs must be tensors to draw random batches like them"
        )
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        out.append(tuple(_draw(t, batch_size, g) for t in tensors))
    return out


def _draw(t: Tensor, batch_size: int | None, g: torch.Generator) -> Tensor:
    shape = list(t.shape)
    if batch_size is not None and shape:
        shape[0] = batch_size
    if t.dtype.is_floating_point:
        ref = t.detach().double()
        mean = float(ref.mean()) if ref.numel() else 0.0
        std = float(ref.std()) if ref.numel() > 1 else 1.0
        if not math.isfinite(std) or std <= 0:
            std = 1.0
        x = torch.randn(shape, generator=g, dtype=torch.float64) * std + mean
        return x.to(t.dtype)
    if t.dtype is torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    lo = int(t.min()) if t.numel() else 0
    hi = int(t.max()) if t.numel() else 0
    return torch.randint(lo, hi + 1, shape, generator=g, dtype=t.dtype)


def load_batches(
    path: str | Path, example: Sequence[Any], n: int | None, batch_size: int | None
) -> list[Batch]:
    """Batches from a ``.pt`` or ``.npz`` file (see the module docstring), at most ``n``."""
    path = Path(path)
    tensors = [t for t in pytree.tree_leaves(tuple(example)) if isinstance(t, Tensor)]
    n_inputs = len(tensors)
    if not path.is_file():
        raise UsageError(f"recalibrate-bn: data file {path} does not exist")
    if path.suffix == ".npz":
        raw: Any = _load_npz(path)
        if isinstance(raw, list) and len(raw) > 1:
            raw = _zip_inputs(raw, n_inputs, batch_size, tensors, path)
    elif path.suffix in (".pt", ".pth"):
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            msg = " ".join(str(e).split())[:160]
            raise UsageError(
                f"recalibrate-bn: cannot read {path} with torch.load(weights_only=True): {msg}"
            ) from None
    else:
        raise UsageError(f"recalibrate-bn: data file {path} must be .pt or .npz")
    if isinstance(raw, list) and len(raw) == 1 and path.suffix == ".npz":
        raw = raw[0]
    if isinstance(raw, Tensor):
        if n_inputs != 1:
            raise UsageError(
                f"recalibrate-bn: {path} holds one tensor but the model takes {n_inputs} inputs"
            )
        batches = [(b,) for b in _split(raw, batch_size, tensors[0], path)]
    elif isinstance(raw, list | tuple):
        batches = [_batch(item, n_inputs, path, i) for i, item in enumerate(raw)]
    else:
        raise UsageError(
            f"recalibrate-bn: {path} holds a {type(raw).__name__}, not a tensor or a list of batches"
        )
    if not batches:
        raise UsageError(f"recalibrate-bn: {path} holds no batches")
    batches = batches[:n] if n is not None else batches
    return [tuple(_cast(x, ref) for x, ref in zip(b, tensors, strict=True)) for b in batches]


def _load_npz(path: Path) -> list[Tensor]:
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as data:
            return [torch.from_numpy(np.array(data[k])) for k in data.files]
    except Exception as e:
        msg = " ".join(str(e).split())[:160]
        raise UsageError(f"recalibrate-bn: cannot read {path}: {msg}") from None


def _zip_inputs(
    arrays: list[Tensor], n_inputs: int, batch_size: int | None, refs: list[Tensor], path: Path
) -> list[Batch]:
    if len(arrays) != n_inputs:
        raise UsageError(
            f"recalibrate-bn: {path} holds {len(arrays)} arrays but the model takes {n_inputs} inputs"
        )
    parts = [_split(a, batch_size, r, path) for a, r in zip(arrays, refs, strict=True)]
    if len({len(p) for p in parts}) != 1:
        raise UsageError(f"recalibrate-bn: the arrays in {path} hold different numbers of samples")
    return [tuple(b) for b in zip(*parts, strict=True)]


def _split(t: Tensor, batch_size: int | None, ref: Tensor, path: Path) -> list[Tensor]:
    if t.dim() == 0:
        raise UsageError(f"recalibrate-bn: {path} holds a scalar, not samples")
    size = batch_size or (ref.shape[0] if ref.dim() else 1)
    return list(torch.split(t, size))


def _batch(item: Any, n_inputs: int, path: Path, i: int) -> Batch:
    parts = (
        [item]
        if isinstance(item, Tensor)
        else list(item)
        if isinstance(item, list | tuple)
        else None
    )
    if parts is None or not all(isinstance(p, Tensor) for p in parts):
        raise UsageError(
            f"recalibrate-bn: batch {i} in {path} is not a tensor or a list of tensors"
        )
    if len(parts) != n_inputs:
        raise UsageError(
            f"recalibrate-bn: batch {i} in {path} has {len(parts)} tensors, the model takes {n_inputs} inputs"
        )
    return tuple(parts)


def _cast(x: Tensor, ref: Tensor) -> Tensor:
    if x.dtype == ref.dtype:
        return x
    if x.dtype.is_floating_point != ref.dtype.is_floating_point and ref.dtype is not torch.bool:
        kind = "floating" if ref.dtype.is_floating_point else "integer"
        raise UsageError(
            f"recalibrate-bn: data of dtype {x.dtype} for a model input that is {kind} ({ref.dtype})"
        )
    return x.to(ref.dtype)


__all__ = ["load_batches", "random_batches"]
