"""Residual-stream structure of an fx graph: the residual adds (:mod:`.adds`) and where every norm
sits relative to them (:mod:`.placement`). Everything here only reads the graph."""

from .adds import (
    ResidualAdd,
    block_name,
    consumers,
    is_add,
    is_transparent,
    is_weighted,
    residual_adds,
    residual_sums,
    source,
)
from .placement import PLACEMENTS, NormPlacement, Placement, norm_placements

__all__ = [
    "PLACEMENTS",
    "NormPlacement",
    "Placement",
    "ResidualAdd",
    "block_name",
    "consumers",
    "is_add",
    "is_transparent",
    "is_weighted",
    "norm_placements",
    "residual_adds",
    "residual_sums",
    "source",
]
