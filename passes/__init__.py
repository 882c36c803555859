"""The passes normrewrite ships, one per module, registered here by explicit import.

A test keeps this registry, the files in this folder and the README's pass table in sync.
"""

from normrewrite.core.pass_infra import NamedPass, PassRegistry

from .apply_weight_norm import ApplyWeightNorm
from .fix_export import FixExport
from .fold_bn import FoldBatchNorm
from .fold_norm_affine import FoldNormAffine
from .fuse_norm import FuseNorm
from .ln_to_rmsnorm import LnToRmsNorm
from .post_to_pre import PostToPre, PreToPost
from .recalibrate_bn import RecalibrateBatchNorm
from .remove_weight_norm import RemoveWeightNorm
from .swap_norm import SwapNorm

REGISTRY = PassRegistry(
    [
        FoldBatchNorm,
        FuseNorm,
        FoldNormAffine,
        LnToRmsNorm,
        SwapNorm,
        RemoveWeightNorm,
        ApplyWeightNorm,
        PostToPre,
        PreToPost,
        RecalibrateBatchNorm,
        FixExport,
    ]
)

# A rewrite is registered once, with its forms: the ONNX form of a pass (its ``onnx_form``, in the
# same home) answers to the same name, so `-p fold-bn` on an .onnx input runs OnnxFoldBatchNorm.
# The forms are imported on first use (they import onnx_ir/onnxscript): a torch-only conversion
# never loads them.
ONNX_REGISTRY = PassRegistry(lazy={p.name: p.onnx_form for p in REGISTRY if p.onnx_form})

# the ONNX passes every exported torch program gets: the norms the exporter writes as ReduceMean
# chains become one fused node
NORM_FUSIONS = ("fuse-norm",)


def norm_fusions() -> list[NamedPass]:
    """Fresh instances of the :data:`NORM_FUSIONS` passes, for one ONNX output."""
    return [ONNX_REGISTRY.create(name) for name in NORM_FUSIONS]


__all__ = [
    "NORM_FUSIONS",
    "ONNX_REGISTRY",
    "REGISTRY",
    "ApplyWeightNorm",
    "FixExport",
    "FoldBatchNorm",
    "FoldNormAffine",
    "FuseNorm",
    "LnToRmsNorm",
    "PostToPre",
    "PreToPost",
    "RecalibrateBatchNorm",
    "RemoveWeightNorm",
    "SwapNorm",
    "norm_fusions",
]
