"""normrewrite: compiler-style graph rewriting for the normalization layers of PyTorch models.

Library API::

    import normrewrite
    result = normrewrite.convert(model, passes=["fold-bn"], example_inputs=(x,), outputs=["m.onnx"])
    result.graph_module, result.report

Layers: :mod:`~normrewrite.load` → :mod:`~normrewrite.trace` → passes
(:mod:`~normrewrite.core.pass_infra`, :mod:`normrewrite.passes`) → :mod:`~normrewrite.verify` →
:mod:`~normrewrite.emit`; :mod:`~normrewrite.cli` is a thin shell over :mod:`~normrewrite.api`.
"""

__version__ = "0.1.0"

from normrewrite.api import ConvertOptions, ConvertResult, InspectResult, convert, inspect, prepare
from normrewrite.core.pass_infra import Change, Pass, PassContext, PassManager, PassResult, Skip
from normrewrite.errors import (
    EmitError,
    LoadError,
    NormRewriteError,
    PassError,
    TraceError,
    UsageError,
    VerifyError,
)
from normrewrite.passes import REGISTRY

_LAZY = {"param_groups", "scale_invariant_params"}  # normrewrite.analysis.scale_invariance


def __getattr__(name: str) -> object:
    """The scale-invariance analysis, imported when first asked for (it is not on the path of a
    conversion, and its imports are heavy)."""
    if name in _LAZY:
        from normrewrite.analysis import scale_invariance

        return getattr(scale_invariance, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "REGISTRY",
    "Change",
    "ConvertOptions",
    "ConvertResult",
    "EmitError",
    "InspectResult",
    "LoadError",
    "NormRewriteError",
    "Pass",
    "PassContext",
    "PassError",
    "PassManager",
    "PassResult",
    "Skip",
    "TraceError",
    "UsageError",
    "VerifyError",
    "__version__",
    "convert",
    "inspect",
    "param_groups",
    "prepare",
    "scale_invariant_params",
]
