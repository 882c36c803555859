"""What a conversion is asked to do: one typed options object for every path.

:class:`ConvertOptions` configures the one pipeline driver (:func:`normrewrite.pipeline.convert`)
whatever the input: a model traced in memory, an ONNX file rewritten as ONNX, or a checkpoint
streamed on the ``meta`` device (``meta=True``). Callbacks that watch a run are not options; they
are :class:`Hooks`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from normrewrite.core.pass_infra import Pass, PassResult
from normrewrite.emit.onnx.options import OnnxOptions
from normrewrite.errors import UsageError
from normrewrite.load.inputs import InputSpec
from normrewrite.stream.shards import DEFAULT_MAX_SHARD_BYTES
from normrewrite.trace import Tracer

if TYPE_CHECKING:
    from normrewrite.load.onnx import OnnxLimits

DEFAULT_RTOL = 1e-4  # torch paths: relative to the largest output magnitude
DEFAULT_ONNX_IN_RTOL = 1e-5  # ONNX in → ONNX out: both sides run in onnxruntime


@dataclass(frozen=True)
class ConvertOptions:
    """Every setting of a conversion. ``rtol=None`` means the path's own default
    (:data:`DEFAULT_RTOL`, or :data:`DEFAULT_ONNX_IN_RTOL` for ONNX inputs)."""

    passes: tuple[str | Pass, ...] = ("fold-bn",)
    outputs: tuple[Path, ...] = ()
    report_path: Path | None = None
    force: bool = False
    # loading and tracing
    input_specs: tuple[InputSpec, ...] | None = None
    tracer: Tracer = "auto"
    keep_training: bool = False
    seed: int = 0
    trust_remote_code: bool = False
    trust_pickle: bool = False
    trust_native_code: bool = False
    onnx_limits: OnnxLimits | None = None
    # verification
    verify: bool = True
    verify_each: bool = False
    rtol: float | None = None
    # emission
    onnx: OnnxOptions = field(default_factory=OnnxOptions)
    compile: str | None = None
    device: str = "cpu"
    keep_output_classes: bool = False
    # models larger than memory: trace on meta, replay weight edits from the checkpoint
    meta: bool = False
    max_shard_size: int = DEFAULT_MAX_SHARD_BYTES
    # fail (UnchangedError, nothing written) when no pass changed the model
    fail_if_unchanged: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "passes", tuple(self.passes))
        object.__setattr__(self, "outputs", tuple(Path(os.fspath(o)) for o in self.outputs))
        if self.report_path is not None:
            object.__setattr__(self, "report_path", Path(os.fspath(self.report_path)))
        if self.input_specs is not None:
            object.__setattr__(self, "input_specs", tuple(self.input_specs))
        if self.rtol is not None and not self.rtol > 0:
            raise UsageError("rtol must be positive")

    @classmethod
    def of(cls, options: ConvertOptions | None = None, **settings: Any) -> ConvertOptions:
        """``options`` (or the defaults) with ``settings`` replaced; an unknown setting is a
        ``TypeError`` naming it, as for any Python call. ``opset=N`` is short for
        ``onnx=OnnxOptions(opset=N)``; ``onnx_options`` is the older name of ``onnx``."""
        base = options or cls()
        if "onnx_options" in settings:
            onnx = settings.pop("onnx_options")
            if onnx is not None:
                settings["onnx"] = onnx
        opset = settings.pop("opset", None)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(settings) - names)
        if unknown:
            raise TypeError(f"convert() got an unexpected keyword argument {unknown[0]!r}")
        out = dataclasses.replace(base, **settings)
        if opset is not None and out.onnx.opset is None:
            out = dataclasses.replace(out, onnx=dataclasses.replace(out.onnx, opset=opset))
        return out

    def rtol_for(self, onnx_input: bool) -> float:
        if self.rtol is not None:
            return self.rtol
        return DEFAULT_ONNX_IN_RTOL if onnx_input else DEFAULT_RTOL


@dataclass(frozen=True)
class Hooks:
    """Callbacks a caller (the CLI) uses to watch a run: the stage being entered, each pass that
    changed the graph (``--print-after-change``), and streaming progress (``--meta``)."""

    on_stage: Callable[[str], None] = lambda _stage: None
    after_change: Callable[[Pass, PassResult], None] | None = None
    progress: Any = None  # normrewrite.stream progress callback


def as_specs(specs: Sequence[InputSpec] | None) -> tuple[InputSpec, ...] | None:
    return None if specs is None else tuple(specs)
