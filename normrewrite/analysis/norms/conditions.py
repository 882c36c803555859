"""Conditions on the values around a written-out norm, independent of the graph form:
functions of plain values (numbers, shapes, dtypes) returning what they found or why a part is
not fused. The fx matcher (:mod:`.written`) uses them; the ONNX rules state the same ideas in
:mod:`normrewrite.passes.fuse_norm.onnx` and can call these."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Any

import torch


class NormKind(enum.StrEnum):
    """The fused op a written-out norm becomes."""

    RMSNORM = "rmsnorm"
    LAYERNORM = "layernorm"


def epsilon(value: Any) -> float | None:
    """ε as a float when ``value`` is a plain number (not a bool, not a tensor), else None."""
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def trailing_dims(dims: Sequence[int], rank: int | None, count: int = 1) -> bool:
    """``dims`` are exactly the last ``count`` dims of a rank-``rank`` tensor (negative or positive
    spelling; with an unknown rank only the negative one is recognised)."""
    want_neg = set(range(-count, 0))
    if len(dims) != count:
        return False
    if set(dims) == want_neg:
        return True
    return rank is not None and {d - rank if d >= 0 else d for d in dims} == want_neg


def affine_problem(
    which: str,
    shape: Sequence[int],
    normalized: Sequence[int],
    dtype: torch.dtype | None,
    activation_dtype: torch.dtype | None,
) -> str | None:
    """Why the stored γ or β (``which``) cannot be fused into the norm op, or None: it must have
    the normalized shape and the activation's dtype (fusing a wider γ would change the rounding)."""
    if tuple(shape) != tuple(normalized):
        return f"the {which} of shape {tuple(shape)} is not {tuple(normalized)}: kept separate"
    if activation_dtype is not None and dtype != activation_dtype:
        return f"γ/β dtype {dtype} differs from the activation's {activation_dtype}: kept separate"
    return None


__all__ = ["NormKind", "affine_problem", "epsilon", "trailing_dims"]
