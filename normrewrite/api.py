"""The library API export pipelines call: :func:`convert` and :func:`inspect`.

    import normrewrite
    result = normrewrite.convert(model, passes=["fold-bn"], example_inputs=(x,))
    result.graph_module   # the rewritten torch.fx.GraphModule
    result.report         # what changed, node counts, verification errors

Both are thin calls into the pipeline layer (:mod:`normrewrite.pipeline`); the CLI is a shell over
them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from normrewrite.core.pass_infra import Pass, PassResult
from normrewrite.pipeline import (
    ConvertOptions,
    ConvertResult,
    Hooks,
    InspectResult,
    ModelLike,
    NormEntry,
    inspect,
    prepare,
)
from normrewrite.pipeline import convert as _run_pipeline


def convert(
    model: ModelLike,
    passes: Sequence[str | Pass] | None = None,
    example_inputs: Any = None,
    *,
    options: ConvertOptions | None = None,
    on_stage: Callable[[str], None] | None = None,
    after_change: Callable[[Pass, PassResult], None] | None = None,
    progress: Any = None,
    **settings: Any,
) -> ConvertResult:
    """Load, trace, rewrite, verify and (optionally) write ``model``.

    ``passes`` (default: ``options.passes``, else ``fold-bn``) run in order. ``settings`` are the fields of :class:`~normrewrite.pipeline.ConvertOptions` (``outputs``,
    ``tracer``, ``verify``, ``rtol``, ``force``, ``onnx`` / ``opset``, ``compile``, ``device``,
    ``report_path``, ``meta``, the ``trust_*`` opt-ins, …), applied over ``options``. A ``.onnx``
    ``model`` is rewritten ONNX in → ONNX out with the ONNX forms of the passes; ``meta=True``
    streams a Hugging Face checkpoint larger than memory.

    Outputs that would overwrite, contain or lie inside anything the run reads, or each other, are
    refused before any work; outputs and the report are committed in one step. Raises
    :class:`~normrewrite.errors.VerifyError` (and writes nothing) when an exact pipeline changes the
    outputs by more than ``rtol`` relative to the largest output magnitude.
    """
    if passes is not None:
        settings["passes"] = tuple(passes)
    opts = ConvertOptions.of(options, **settings)
    hooks = Hooks(on_stage=on_stage or (lambda _stage: None), after_change=after_change, progress=progress)
    return _run_pipeline(model, opts, example_inputs, hooks)


__all__ = ["ConvertOptions", "ConvertResult", "InspectResult", "NormEntry", "convert", "inspect", "prepare"]
