"""fold-bn's preconditions, independent of the graph form: each is a function of plain values
(booleans, counts, ranks, names, tensors) returning the reason the fold is refused, or None.

The fx matcher (:mod:`.fx`) reads the values off a torch.fx graph; an ONNX rule reads the same
values off an ONNX graph and calls the same functions, so both refuse the same cases with the
same words. A layer is named by the caller as it wants it reported (``"Conv2d 0"``, ``"Conv conv_1"``).
"""

from __future__ import annotations

import torch
from torch import Tensor

CLONE_HINT = "fold-bn:shared=clone folds into a copy"


# --------------------------------------------------------------------------- the BatchNorm


def uses_batch_statistics(*, tracks_running_stats: bool, training: bool) -> str | None:
    """The BN must normalize with stored running statistics (eval mode)."""
    if not tracks_running_stats:
        return "track_running_stats=False: it normalizes with batch statistics, nothing to fold"
    if training:
        return "BatchNorm is in training mode (batch statistics); call model.eval() before folding"
    return None


def statistics_not_stored(*, statistics: bool, affine: bool) -> str | None:
    """The running statistics and γ/β must be stored tensors (constants), not computed."""
    if not statistics:
        return "running statistics are computed in the graph, not stored"
    if not affine:
        return "γ/β are computed in the graph, not stored"
    return None


def bad_statistics(
    mean: Tensor, var: Tensor, gamma: Tensor | None = None, beta: Tensor | None = None
) -> str | None:
    """The statistics must describe a real affine map: ``running_var`` finite and ≥ 0, ``running_mean``,
    γ and β finite. A negative or NaN variance makes ``rsqrt`` NaN, and a fold would write NaN
    (or inf) weights that a NaN-blind comparison waves through.

    Values on the ``meta`` device are unknown: not refused here (the checkpoint's tensors are only
    seen when the recorded rewrite is replayed)."""
    named = [("running_var", var), ("running_mean", mean), ("γ", gamma), ("β", beta)]
    tensors = [(n, t) for n, t in named if t is not None]
    if any(t.device.type == "meta" for _, t in tensors):
        return None
    problems = []
    for name, t in tensors:
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            problems.append(f"{name} has {int(bad.sum())} non-finite values")
    if bool((var < 0).any()):
        problems.insert(0, f"running_var has {int((var < 0).sum())} negative values")
    if not problems:
        return None
    return "; ".join(problems) + ": not a valid BatchNorm, folding would write NaN/inf weights"


# --------------------------------------------------------------------------- the layer


def layer_output_shared(layer: str, n_users: int) -> str | None:
    """Output side: the layer's output must feed the BN only."""
    if n_users == 1:
        return None
    return f"the output of {layer} has {n_users} users: folding would change the others"


def shared_weights(why: str, *, clone: bool) -> str:
    """The layer's weights are read elsewhere too (``why`` says how); with ``clone`` the caller can
    offer to fold into a private copy."""
    tail = f" ({CLONE_HINT})" if clone else ""
    return f"{why}; folding would change the other users{tail}"


def output_features_not_channels(layer: str, out_shape: tuple[int, ...] | None) -> str | None:
    """Output side of a linear layer (Linear, Gemm, MatMul): its features are the last dim, the
    BN's channels dim 1; they coincide for rank-2 outputs only."""
    if out_shape is not None and len(out_shape) == 2:
        return None
    shown = tuple(out_shape) if out_shape is not None else "?"
    return (
        f"{layer} outputs {shown}: the BN normalizes dim 1, not the output features "
        "(last dim; only rank-2 outputs fold)"
    )


def input_features_not_channels(layer: str, bn_shape: tuple[int, ...] | None) -> str | None:
    """Input side of a linear layer: the BN's channels (dim 1) must be its input features."""
    if bn_shape is not None and len(bn_shape) == 2:
        return None
    shown = tuple(bn_shape) if bn_shape is not None else "?"
    return f"BN output {shown} feeds {layer}: its channels (dim 1) are not the input features"


def channel_mismatch(layer_channels: int, bn_channels: int | None) -> str | None:
    if bn_channels is None or layer_channels == bn_channels:
        return None
    return f"channel count mismatch ({layer_channels} vs {bn_channels})"


def channel_mixed_by(op: str, owner: str) -> str:
    """A layout op between the layer and the BN splits the channel axis or merges it with
    another axis: the channels no longer have an axis of their own."""
    return f"{op} splits the channel axis of {owner} or merges it with another axis"


def channel_moved_by(op: str, owner: str, axis: int, where: str = "BN") -> str:
    """After the layout ops the channels sit on another axis than the one the fold needs."""
    need = "the BN's channel axis (dim 1)" if where == "BN" else where
    return f"after {op}, the channels of {owner} are on dim {axis}, not {need}"


def transposed_after(layer: str) -> str:
    """Input side: a transposed conv spreads each input over overlapping outputs at the borders."""
    return f"BN before {layer}: the shift does not fold exactly"


def zero_padded_after(layer: str, *, zero_padding: bool) -> str | None:
    """Input side: zero padding would pad with 0 where the BN'd input has the shift ``t``."""
    if not zero_padding:
        return None
    return (
        f"BN before zero-padded {layer}: not exact (the padding would be 0 instead of the BN shift)"
    )


__all__ = [
    "CLONE_HINT",
    "bad_statistics",
    "channel_mismatch",
    "channel_mixed_by",
    "channel_moved_by",
    "input_features_not_channels",
    "layer_output_shared",
    "output_features_not_channels",
    "shared_weights",
    "statistics_not_stored",
    "transposed_after",
    "uses_batch_statistics",
    "zero_padded_after",
]
