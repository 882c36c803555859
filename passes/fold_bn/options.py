"""fold-bn's options, shared by its torch.fx and ONNX forms."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class FoldBatchNormOptions:
    shared: Literal["skip", "clone"] = "skip"
    """What to do when the layer's weights are shared: skip the fold, or fold into a copy."""
