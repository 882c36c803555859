"""The pipeline layer: one driver (load → trace → passes → verify → emit → report) configured by
one :class:`ConvertOptions`, and ``inspect``. :mod:`normrewrite.api` and the CLI call into it."""

from normrewrite.pipeline.convert import convert
from normrewrite.pipeline.inspect import inspect
from normrewrite.pipeline.options import ConvertOptions, Hooks
from normrewrite.pipeline.prepare import ModelLike, prepare
from normrewrite.pipeline.results import ConvertResult, InspectResult, NormEntry

__all__ = ["ConvertOptions", "ConvertResult", "Hooks", "InspectResult", "ModelLike", "NormEntry", "convert",
           "inspect", "prepare"]
