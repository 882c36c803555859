"""fold-bn's tensor math: pure functions of tensors, shared by the fx and ONNX forms.

A BatchNorm in eval mode is the per-channel affine ``s·x + t`` (:func:`bn_affine`); it folds into
the output channels of the layer before it (:func:`fold_output`) or the input channels of the
layer after it (:func:`fold_input`). The identities are in :mod:`normrewrite.passes.fold_bn`.
Everything is computed in float64 (float32 on devices without it) and cast back to the weight
dtype, so fp16/bf16 models fold without overflow.
"""

from __future__ import annotations

import enum

import torch
from torch import Tensor


class Side(enum.StrEnum):
    """Which channels of the layer the BN folds into: its output (BN after it) or input (BN before)."""

    OUTPUT = "output"
    INPUT = "input"


def _work_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.device.type in ("cpu", "meta", "cuda") else torch.float32


def bn_affine(
    mean: Tensor, var: Tensor, gamma: Tensor | None, beta: Tensor | None, eps: float
) -> tuple[Tensor, Tensor]:
    """(s, t) with BN(x) = s·x + t per channel, in float64."""
    dt = _work_dtype(mean)
    mean, var = mean.to(dt), var.to(dt)
    scale = torch.rsqrt(var + eps)
    if gamma is not None:
        scale = scale * gamma.to(dt)
    shift = -mean * scale
    if beta is not None:
        shift = shift + beta.to(dt)
    return scale, shift


def fold_output(
    weight: Tensor,
    bias: Tensor | None,
    scale: Tensor,
    shift: Tensor,
    *,
    transposed: bool,
    groups: int,
) -> tuple[Tensor, Tensor]:
    """Fold ``y ↦ scale·y + shift`` on the output channels of a conv/linear layer.

    A ConvTranspose weight is ``(C_in, C_out/g, k…)``: output channel ``g·(C_out/g) + j`` lives in
    ``W[g·C_in/g : (g+1)·C_in/g, j]``."""
    dt = scale.dtype
    w = weight.to(dt)
    extra = (1,) * (w.dim() - 2)
    if transposed:
        c_in, c_out_g = w.shape[0], w.shape[1]
        wg = w.reshape(groups, c_in // groups, c_out_g, *w.shape[2:])
        wg = wg * scale.reshape(groups, 1, c_out_g, *extra)
        w = wg.reshape(w.shape)
    else:
        w = w * scale.reshape(-1, 1, *extra)
    b = shift if bias is None else bias.to(dt) * scale + shift
    return w.to(weight.dtype), b.to(weight.dtype)


def fold_input(
    weight: Tensor,
    bias: Tensor | None,
    scale: Tensor,
    shift: Tensor,
    *,
    groups: int,
    repeat: int = 1,
) -> tuple[Tensor, Tensor]:
    """Fold ``x ↦ scale·x + shift`` on the input channels of a (non-transposed) conv/linear layer.

    ``repeat`` is the number of consecutive input features per channel (H·W after a flatten)."""
    dt = scale.dtype
    if repeat > 1:
        scale, shift = scale.repeat_interleave(repeat), shift.repeat_interleave(repeat)
    w = weight.to(dt)
    c_out, c_in_g = w.shape[0], w.shape[1]
    extra = (1,) * (w.dim() - 2)
    s = scale.reshape(groups, 1, c_in_g).expand(groups, c_out // groups, c_in_g)
    t = shift.reshape(groups, 1, c_in_g).expand(groups, c_out // groups, c_in_g)
    s, t = s.reshape(c_out, c_in_g), t.reshape(c_out, c_in_g)
    new_w = w * s.reshape(c_out, c_in_g, *extra)
    const = (w * t.reshape(c_out, c_in_g, *extra)).flatten(1).sum(1)
    b = const if bias is None else bias.to(dt) + const
    return new_w.to(weight.dtype), b.to(weight.dtype)


__all__ = ["Side", "bn_affine", "fold_input", "fold_output"]
