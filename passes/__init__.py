"""The passes normrewrite ships, one per module, registered here by explicit import.

A test keeps this registry, the files in this folder and the README's pass table in sync.
"""

from normrewrite.pass_infra import PassRegistry

from .fold_bn import FoldBatchNorm

REGISTRY = PassRegistry([FoldBatchNorm])

__all__ = ["REGISTRY", "FoldBatchNorm"]
