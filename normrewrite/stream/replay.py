"""Replaying a :class:`~normrewrite.stream.plan.StreamPlan` on real data.

Demand-driven, with reference counting: the plan's outputs are produced in order; a recipe runs
when its first output is due, reading its inputs from the checkpoint (or from earlier recipes);
a value is kept only while a recipe that still has to run needs it, and every final output goes
to the writer the moment it is computed. Peak memory: the tensors of the recipe being evaluated
plus the recipe outputs a later recipe still reads (about one layer's worth).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from normrewrite.errors import PassError
from normrewrite.load.checkpoint import Checkpoint
from normrewrite.stream.plan import RecipeOutput, Ref, Source, StreamPlan


class Sink(Protocol):
    def write(self, key: str, value: torch.Tensor) -> int: ...


class Replay:
    def __init__(
        self,
        plan: StreamPlan,
        ckpt: Checkpoint,
        sink: Sink,
        on_write: Callable[[int], None] = lambda n: None,
    ) -> None:
        self.plan, self.ckpt, self.sink, self.on_write = plan, ckpt, sink, on_write
        self.final: dict[Ref, list[str]] = {}
        for key, (ref, _, _) in plan.outputs.items():
            self.final.setdefault(ref, []).append(key)
        needed = {i for ref in self.final for i in self._closure(ref)}
        self.pending: Counter[Ref] = Counter()
        for i in needed:
            for ref in plan.recipes[i][1]:
                self.pending[ref] += 1
        self.cache: dict[Ref, torch.Tensor] = {}
        self.done: set[int] = set()

    def _closure(self, ref: Ref) -> set[int]:
        out: set[int] = set()
        stack = [ref]
        while stack:
            r = stack.pop()
            if isinstance(r, RecipeOutput) and r.recipe not in out:
                out.add(r.recipe)
                stack.extend(self.plan.recipes[r.recipe][1])
        return out

    def _emit(self, ref: Ref, value: torch.Tensor) -> None:
        for key in self.final.pop(ref, ()):
            self.on_write(self.sink.write(key, value))

    def value(self, ref: Ref) -> torch.Tensor:
        if ref in self.cache:
            return self.cache[ref]
        if isinstance(ref, Source):
            return self.ckpt.read(self.plan.source_keys[ref.name])
        self._run(ref.recipe)
        return self.cache[ref]

    def _release(self, ref: Ref) -> None:
        self.pending[ref] -= 1
        if self.pending[ref] <= 0:
            self.cache.pop(ref, None)

    def _run(self, i: int) -> None:
        if i in self.done:
            raise PassError(f"recipe {i} evaluated twice (internal)")
        recipe, ins = self.plan.recipes[i]
        args = []
        for ref in ins:
            v = self.value(ref)
            if self.pending[ref] > 1 and ref not in self.cache:
                self.cache[ref] = v  # another recipe reads it too
            args.append(v)
        with torch.no_grad():
            values = recipe.fn(*args)
        if isinstance(values, torch.Tensor):
            values = (values,)
        _check_finite(recipe, args, values)
        del args
        for ref in ins:
            self._release(ref)
        self.done.add(i)
        for j, v in enumerate(values):
            out = RecipeOutput(i, j)
            if out in self.final:
                self._emit(out, v)
            if self.pending[out] > 0:
                self.cache[out] = v

    def run(self) -> None:
        for key in list(self.plan.outputs):
            ref = self.plan.outputs[key][0]
            if ref not in self.final:
                continue  # already written with its recipe
            if isinstance(ref, RecipeOutput):
                self._run(ref.recipe)
            else:
                self._emit(ref, self.value(ref))


def _check_finite(recipe: Any, args: list[torch.Tensor], values: Sequence[torch.Tensor]) -> None:
    """On ``meta`` a pass cannot see the values it folds (a BatchNorm's running_var may be negative
    or NaN in a hostile or broken checkpoint), and a streamed conversion has no model to verify
    against: a rewritten tensor holding NaN/Inf is refused here, before it is written (the
    in-memory path refuses the same BatchNorms when matching, and verifies)."""
    for name, v in zip(recipe.outputs, values, strict=False):
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            bad = [n for n, a in zip(recipe.inputs, args, strict=False)
                   if a.is_floating_point() and not bool(torch.isfinite(a).all())]
            cause = f"non-finite values in {bad[0]}" if bad else "finite values (e.g. a negative running_var)"
            raise PassError(
                f"{recipe.origin or 'a pass'}: rewriting {name} gives NaN/Inf from the checkpoint's "
                f"{cause}; refused, nothing written"
            )
