"""Numeric verification: run the original and the rewritten model on the same inputs, compare.

The relative error is ``max |a - b| / max |a|`` over each output tensor (the largest over all
outputs is reported): it is insensitive to near-zero elements, which make elementwise relative
errors meaningless, and it is the measure the tolerance (``--rtol``) applies to.
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

    def within(self, rtol: float) -> bool:
        return self.max_rel_err <= rtol


def tensor_leaves(value: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor)]


def compare(reference: Sequence[torch.Tensor], candidate: Sequence[torch.Tensor]) -> Comparison:
    if len(reference) != len(candidate):
        raise ValueError(f"output count differs: {len(reference)} vs {len(candidate)}")
    max_abs = 0.0
    max_rel = 0.0
    for a, b in zip(reference, candidate, strict=True):
        a = torch.as_tensor(a).detach().to("cpu")
        b = torch.as_tensor(b).detach().to("cpu")
        if tuple(a.shape) != tuple(b.shape):
            raise ValueError(f"output shape differs: {tuple(a.shape)} vs {tuple(b.shape)}")
        if not a.is_floating_point() and not a.is_complex():
            # integer/bool outputs must match exactly
            err = float((a != b).any())
            max_abs, max_rel = max(max_abs, err), max(max_rel, err)
            continue
        a64, b64 = a.double(), b.double()
        if a64.numel() == 0:
            continue
        if not torch.isfinite(b64).all() and not torch.equal(torch.isfinite(a64), torch.isfinite(b64)):
            return Comparison(float("inf"), float("inf"), len(reference))
        diff = (a64 - b64).abs().nan_to_num(nan=0.0)
        abs_err = float(diff.max())
        scale = float(a64.abs().nan_to_num(nan=0.0, posinf=0.0, neginf=0.0).max())
        rel_err = abs_err / scale if scale > 0 else abs_err
        max_abs, max_rel = max(max_abs, abs_err), max(max_rel, rel_err)
    return Comparison(max_abs, max_rel, len(reference))


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
