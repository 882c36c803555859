"""The ONNX pass base, built on onnx_ir's own pass infrastructure (``onnx_ir.passes``).

An ONNX pass is an :class:`onnx_ir.passes.InPlacePass`: ``call(model)`` edits the
``onnx_ir.Model`` it is given and returns it in an :class:`OnnxPassResult`, and onnx_ir's
``PassBase.__call__`` runs ``requires``, the pass, ``ensures`` on the output and checks that the
pass really was in place. On top of that, :class:`OnnxPass` carries what normrewrite's registry,
CLI and report need — the same ``name`` / ``summary`` / ``exact`` / typed ``Options`` surface as a
torch pass (:class:`~normrewrite.core.pass_infra.NamedPass`), the ``changes`` / ``skipped`` /
``notes`` records of its result, and ``explain`` for ``inspect`` — so ``-p fold-bn`` means the same
rewrite on a torch program and on an ONNX file.

Run-time settings that are not options of one pass (the runtime the output targets) come in an
:class:`OnnxContext` given at construction: :meth:`OnnxPass.in_context` makes a configured copy.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Self

import onnx_ir as ir

from normrewrite.core.onnx_graph import graph_problem
from normrewrite.core.pass_infra import Change, NamedPass, Skip
from normrewrite.errors import PassError

Target = Literal["standard", "ort"]  # the runtime the ONNX is for: any, or onnxruntime's ops too


@dataclass(frozen=True)
class OnnxContext:
    """What an ONNX pass may need beyond its options: the runtime the output targets
    (``--onnx-target``; ``ort`` allows onnxruntime's contrib ops)."""

    target: Target = "standard"


@dataclass
class OnnxPassResult(ir.passes.PassResult):
    """onnx_ir's result (``model``, ``modified``) plus what the report shows."""

    changes: list[Change] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class InvalidGraph(PassError, ir.passes.PostconditionError):
    """A pass left a malformed graph: a user-facing :class:`PassError` that onnx_ir's pass base
    also recognises as a postcondition failure (it re-raises it unwrapped)."""


class OnnxPass(NamedPass, ir.passes.InPlacePass):
    """Base class of the ONNX passes: set the :class:`NamedPass` attributes, implement
    :meth:`call` (and :meth:`explain`). The postcondition is a well-formed, topologically sorted
    graph."""

    form: ClassVar[str] = "onnx"

    def __init__(
        self, options: Any | None = None, *, context: OnnxContext | None = None, **kwargs: Any
    ) -> None:
        super().__init__(options, **kwargs)
        self.context = context or OnnxContext()

    def in_context(self, context: OnnxContext) -> Self:
        """This pass, same options, for ``context``."""
        return type(self)(self.options, context=context)

    def call(self, model: ir.Model) -> OnnxPassResult:
        raise NotImplementedError

    def ensures(self, model: ir.Model) -> None:
        why = graph_problem(model)
        if why:
            raise InvalidGraph(f"pass {self.name} produced an invalid graph: {why}")

    def __call__(self, model_or_result: ir.Model | ir.passes.PassResult, /) -> OnnxPassResult:
        result = super().__call__(model_or_result)
        assert isinstance(result, OnnxPassResult), f"{self.name} must return an OnnxPassResult"
        return result

    def explain(self, model: ir.Model) -> dict[str, str]:
        """For ``inspect``: node name → what this pass would do there (or why it would not).
        Must not modify ``model``."""
        return {}


@dataclass(frozen=True)
class OnnxPassRun:
    pass_: OnnxPass
    result: OnnxPassResult
    seconds: float


def run_onnx_passes(
    model: ir.Model,
    passes: Sequence[OnnxPass],
    context: OnnxContext,
    *,
    before_pass: Callable[[OnnxPass], None] | None = None,
) -> list[OnnxPassRun]:
    """Run ``passes`` in order on ``model`` (in place), each configured for ``context``; one
    record per pass (its result and wall time) for the report."""
    runs = []
    for p in passes:
        if before_pass is not None:
            before_pass(p)
        start = time.perf_counter()
        result = p.in_context(context)(model)
        runs.append(OnnxPassRun(p, result, time.perf_counter() - start))
    return runs
