"""Numeric verification: run the original and the rewritten model on the same inputs, compare.

The relative error is ``max |a - b| / max |a|`` over each output tensor (the largest over all
outputs is reported): it is insensitive to near-zero elements, which make elementwise relative
errors meaningless, and it is the measure the tolerance (``--rtol``) applies to.

Non-finite values never compare as zero: a NaN or ±Inf in the rewritten output where the
original is finite fails the comparison (``nonfinite_introduced``); elements that are NaN or ±Inf
in the original's output cannot be verified — they are left out of the error, counted
(``unverified``) and their outputs named (``unverified_outputs``) so the report can say so.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree


@dataclass(frozen=True)
class Comparison:
    max_abs_err: float
    max_rel_err: float
    outputs: int
    unverified: int = 0  # elements non-finite in the reference: not compared
    unverified_outputs: tuple[int, ...] = ()  # which outputs hold them
    nonfinite_introduced: int = 0  # NaN/Inf in the candidate where the reference is finite

    def within(self, rtol: float) -> bool:
        return self.nonfinite_introduced == 0 and self.max_rel_err <= rtol


def tensor_leaves(value: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor)]


def compare(reference: Sequence[torch.Tensor], candidate: Sequence[torch.Tensor]) -> Comparison:
    if len(reference) != len(candidate):
        raise ValueError(f"output count differs: {len(reference)} vs {len(candidate)}")
    max_abs = max_rel = 0.0
    unverified, introduced, where = 0, 0, []
    for i, (a, b) in enumerate(zip(reference, candidate, strict=True)):
        a = torch.as_tensor(a).detach().to("cpu")
        b = torch.as_tensor(b).detach().to("cpu")
        if tuple(a.shape) != tuple(b.shape):
            raise ValueError(f"output shape differs: {tuple(a.shape)} vs {tuple(b.shape)}")
        if not a.is_floating_point() and not a.is_complex():
            # integer/bool outputs must match exactly
            err = float((a != b).any())
            max_abs, max_rel = max(max_abs, err), max(max_rel, err)
            continue
        a64, b64 = (
            a.to(torch.complex128 if a.is_complex() else torch.float64),
            b.to(torch.complex128 if a.is_complex() else torch.float64),
        )
        finite = torch.isfinite(a64)
        skipped = int((~finite).sum())
        if skipped:
            unverified += skipped
            where.append(i)
        introduced += int((finite & ~torch.isfinite(b64)).sum())
        if not bool(finite.any()):
            continue
        a_ok, b_ok = a64[finite], b64[finite]
        diff = (a_ok - b_ok).abs()
        abs_err = float(diff.nan_to_num(nan=float("inf")).max())
        scale = float(a_ok.abs().max())
        rel_err = abs_err / scale if scale > 0 else abs_err
        max_abs, max_rel = max(max_abs, abs_err), max(max_rel, rel_err)
    return Comparison(max_abs, max_rel, len(reference), unverified, tuple(where), introduced)


def run(model: Callable[..., Any], inputs: tuple[Any, ...]) -> list[torch.Tensor]:
    with torch.no_grad():
        return tensor_leaves(model(*inputs))


def compare_models(
    reference: Callable[..., Any],
    candidate: Callable[..., Any],
    inputs: tuple[Any, ...],
    reference_outputs: list[torch.Tensor] | None = None,
) -> Comparison:
    ref = reference_outputs if reference_outputs is not None else run(reference, inputs)
    return compare(ref, run(candidate, inputs))
