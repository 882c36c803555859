"""swap-norm's matcher: which norms to swap and how their axes map (see the package docstring
for the axis semantics); impossible requests raise :class:`~normrewrite.errors.PassError`."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Literal

from torch.fx import GraphModule, Node

from normrewrite.core.graph import node_shape
from normrewrite.core.ops import NormInfo, norm_info
from normrewrite.core.pass_infra import Skip
from normrewrite.core.usage import TensorUsage
from normrewrite.errors import PassError, UsageError

from .math import default_groups

NormKind = Literal["batchnorm", "groupnorm", "instancenorm", "layernorm", "rmsnorm"]
Target = Literal["batchnorm", "groupnorm", "instancenorm", "layernorm", "rmsnorm", "frozen", "dyt"]
CHANNEL_KINDS = ("batchnorm", "groupnorm", "instancenorm")
TRAILING_KINDS = ("layernorm", "rmsnorm")


class AxisMap(enum.StrEnum):
    """How the source norm's axes map onto the target's."""

    CHANNEL = (
        "channel"  # channel norm → channel norm (or frozen/dyt of one): γ/β per channel, dim 1
    )
    TRAILING = "trailing"  # over the trailing normalized_shape (also channel norms on (N, C))
    CHW = "chw"  # channel norm → trailing norm over (C, *S): one statistic per sample
    CHANNELS = "channels"  # channel norm → per-position trailing norm over C (channels-last)


@dataclass(frozen=True)
class SwapNormOptions:
    from_: NormKind | None = None
    """The kind of norm to replace (CLI: ``from=``)."""
    to: Target | None = None
    """What to replace it with."""
    groups: int | None = None
    """to=groupnorm: number of groups (default: C for instancenorm, else the largest divisor ≤ 32)."""
    eps: float | None = None
    """ε of the new norm (default: the old norm's)."""
    alpha: float = 0.5
    """to=dyt: initial α."""
    layout: Literal["auto", "chw", "channels"] = "auto"
    """channel norm → layernorm/rmsnorm on (N, C, *S): over (C, *S), or per position over C."""
    calibrate: bool = True
    """to=batchnorm: running statistics from the example inputs (else mean 0, variance 1)."""


def is_exact(o: SwapNormOptions) -> bool:
    pair = (o.from_, o.to)
    return pair in (("batchnorm", "frozen"), ("groupnorm", "instancenorm")) or (
        pair == ("instancenorm", "groupnorm") and o.groups is None
    )


def validate(o: SwapNormOptions) -> None:
    """Reject impossible option combinations with a :class:`UsageError`."""
    kinds = "batchnorm, groupnorm, instancenorm, layernorm, rmsnorm"
    if o.from_ is None or o.to is None:
        raise UsageError(
            f"swap-norm needs from=KIND and to=KIND (from: {kinds}; to: those, frozen, dyt)"
        )
    if o.from_ == o.to:
        raise UsageError(f"swap-norm: from and to are both {o.to}")
    if o.to == "frozen" and o.from_ != "batchnorm":
        raise UsageError(
            "swap-norm: to=frozen freezes BatchNorm statistics; it needs from=batchnorm"
        )
    if o.groups is not None and (o.to != "groupnorm" or o.groups <= 0):
        raise UsageError("swap-norm: groups=G needs to=groupnorm and G > 0")
    if o.eps is not None and not (o.eps > 0 and math.isfinite(o.eps)):
        raise UsageError("swap-norm: eps must be positive")
    if o.to == "frozen" and o.eps is not None:
        raise UsageError("swap-norm: to=frozen keeps the BatchNorm's eps; eps= does not apply")
    if o.layout != "auto" and not (o.from_ in CHANNEL_KINDS and o.to in TRAILING_KINDS):
        raise UsageError(
            "swap-norm: layout= applies to batchnorm/groupnorm/instancenorm → layernorm/rmsnorm"
        )
    if o.from_ in TRAILING_KINDS and o.to == "instancenorm":
        raise UsageError(
            f"swap-norm: InstanceNorm normalizes each channel over spatial dims; a {o.from_} "
            "input has none at dim 2+ (features are last)"
        )


@dataclass(frozen=True)
class SwapPlan:
    src: NormInfo
    to: str
    shape: tuple[int, ...]  # input shape
    layout: AxisMap
    groups: int | None = None
    eps: float | None = None

    @property
    def channels(self) -> int:
        return self.shape[1]

    @property
    def label(self) -> str:
        return self.src.label

    def preview(self) -> str:
        return self.describe()

    def describe(self) -> str:
        extra = f" ({self.groups} groups)" if self.to == "groupnorm" else ""
        if self.layout in (AxisMap.CHW, AxisMap.CHANNELS):
            extra += f" (layout={self.layout})"
        return f"{self.src.kind} → {self.to}{extra}"


def _axis_map(src: NormInfo, to: str, shape: tuple[int, ...], o: SwapNormOptions) -> AxisMap:
    """How the source's axes map onto the target's, or raise PassError for impossible requests."""
    rank = len(shape)
    label = src.label
    src_channel = src.kind in CHANNEL_KINDS
    if to in ("frozen", "dyt"):
        return AxisMap.CHANNEL if src_channel else AxisMap.TRAILING
    if src_channel and to in CHANNEL_KINDS:
        if to == "instancenorm" and rank < 3:
            raise PassError(
                f"swap-norm: {label} has input {shape}: InstanceNorm needs spatial dims (N, C, *S)"
            )
        return AxisMap.CHANNEL
    if not src_channel and to in TRAILING_KINDS:
        return AxisMap.TRAILING
    if src_channel:  # → layernorm / rmsnorm
        if rank == 2:
            return AxisMap.TRAILING
        if o.layout == "auto":
            raise PassError(
                f"swap-norm: {label} normalizes channels of a {shape} tensor; {to} over (C, *S) "
                f"(one statistic per sample) and per-position channel {to} (ConvNeXt-style, over C "
                "of the channels-last tensor) are different norms: choose layout=chw or layout=channels"
            )
        return AxisMap(o.layout)
    # trailing → channel norm
    normalized = tuple(src.normalized_shape or ())
    if rank > 2 and normalized == shape[1:]:
        raise PassError(
            f"swap-norm: {label} is a LayerNorm over (C, *S) = {normalized} with a per-element affine "
            f"(one statistic per sample, like GroupNorm(1)), not a per-channel {to}; refusing to guess"
        )
    if rank > 2:
        raise PassError(
            f"swap-norm: {label} normalizes the last dim of a {shape} tensor (features last: a "
            f"transformer's tokens, or ConvNeXt's per-pixel LayerNorm on channels-last); {to} normalizes "
            "channel dim 1 of (N, C, *S): only (N, C) inputs map onto it"
        )
    if normalized != shape[1:]:
        raise PassError(
            f"swap-norm: {label} normalizes {normalized} of a {shape} tensor: not its channels"
        )
    if to == "instancenorm":
        raise PassError(
            f"swap-norm: {label} has input {shape}: InstanceNorm needs spatial dims (N, C, *S)"
        )
    return AxisMap.CHANNEL


def plan(
    gm: GraphModule, node: Node, o: SwapNormOptions, usage: TensorUsage
) -> SwapPlan | Skip | None:
    """What to do with ``node`` if it is a norm of kind ``from``; None for other nodes.

    Raises :class:`PassError` for requests that cannot be met on this layer."""
    src = norm_info(gm, node)
    if src is None or src.kind != o.from_ or o.to is None:
        return None
    label = src.label
    stored = [src.weight, src.bias, src.running_mean, src.running_var]
    if (src.has_weight and src.weight is None) or (src.has_bias and src.bias is None):
        return Skip(label, "γ/β are computed in the graph, not stored")
    for fqn in stored:
        if fqn is not None and not usage.exclusive(fqn):
            n = usage.count(fqn)
            return Skip(
                label,
                f"{fqn} is shared ({n} readers or tied names); swapping would change the others",
            )
    if src.kind == "instancenorm" and src.tracks_stats:
        return Skip(
            label,
            "InstanceNorm with track_running_stats uses running statistics in eval: a fixed "
            "per-channel affine, not an instance (or group) norm; not swapped",
        )
    shape = node_shape(src.input)
    if shape is None:
        return Skip(label, "the input shape is unknown")
    if src.kind in CHANNEL_KINDS and len(shape) < 2:
        return Skip(label, f"input {shape} has no channel dim")
    if o.to == "frozen":
        if not src.tracks_stats or src.training:
            return Skip(
                label,
                "BatchNorm uses batch statistics (training mode or no running stats): nothing to freeze",
            )
        if src.running_mean is None or src.running_var is None:
            return Skip(label, "running statistics are computed in the graph, not stored")
    layout = _axis_map(src, o.to, shape, o)
    eps = o.eps if o.eps is not None else src.eps
    groups = None
    if o.to == "groupnorm":
        c = shape[1]
        groups = o.groups or (c if src.kind == "instancenorm" else default_groups(c))
        if c % groups:
            raise PassError(
                f"swap-norm: groups={groups} does not divide the {c} channels of {label}"
            )
    if o.to == "instancenorm" and src.kind == "groupnorm" and src.num_groups != shape[1]:
        return Skip(
            label,
            f"GroupNorm has {src.num_groups} groups for {shape[1]} channels: InstanceNorm "
            "would be an approximation (exact only with groups = channels)",
        )
    return SwapPlan(src, o.to, tuple(shape), layout, groups, eps)


__all__ = ["AxisMap", "SwapNormOptions", "SwapPlan", "is_exact", "plan", "validate"]
