"""fold-bn through layout ops (normrewrite/core/ops/layout.py, fx_layout.py, onnx_layout.py): a BN folds
into the Linear/conv whose channels it normalizes when flatten/reshape/transpose/permute between
them only move or merge other axes, on both fx flavours and ONNX; the channel-mixing cases are
refused with a reason naming the op. Real models: LeViT (Linear → flatten(0,1) → BN1d →
reshape_as) and PatchTST with ``norm_type="batchnorm"`` (transpose → BN1d → transpose), with
randomized BN statistics; fp64 parity, onnxruntime parity through the shipped pipeline and on an
ONNX input."""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from harness import rel_err
from models import _transformers, randomize_norms
from onnx_helpers import onnx_outputs, op_types
from torch import nn

from normrewrite.core.graph import count_ops
from normrewrite.core.onnx_graph import model_bytes
from normrewrite.core.ops import norms
from normrewrite.core.ops.layout import ChannelAxis, through_reshape
from normrewrite.passes import FoldBatchNorm
from normrewrite.passes.fold_bn.onnx import OnnxFoldBatchNorm
from normrewrite.trace import trace
from normrewrite.verify.onnxruntime import session

TRACERS = ("fx", "export")
BLOCK_RTOL = 1e-5  # fp32, relative to max |y|
NET_RTOL = 1e-4


def n_bn(gm: torch.nn.Module) -> int:
    return sum(n.kind == "batchnorm" for n in norms(gm))


def fp64(model: nn.Module, *xs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = copy.deepcopy(model).double()(*(x.double() for x in xs))
    return out if torch.is_tensor(out) else out[0]


def first(out: object) -> torch.Tensor:
    return out if torch.is_tensor(out) else out[0]  # type: ignore[index]


# --------------------------------------------------------------------------- small patterns


class LinearFlattenBN(nn.Module):
    """LeViT: Linear on (B, N, C) → flatten(0, 1) → BN1d(C) → reshape back (output side)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn = nn.Linear(8, 6), nn.BatchNorm1d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        return self.bn(y.flatten(0, 1)).reshape_as(y)


class LinearTransposeBN(nn.Module):
    """PatchTST / CLAP: Linear → transpose(1, 2) → BN1d → transpose(1, 2) (output side)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn = nn.Linear(8, 6, bias=False), nn.BatchNorm1d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x).transpose(1, 2)).transpose(1, 2)


class ConvPermuteViewBN(nn.Module):
    """Conv1d (N, C, L) → permute(0, 2, 1) → view(N·L, C) → BN1d(C) (output side, into the conv)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv1d(4, 6, 3, padding=1), nn.BatchNorm1d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x).permute(0, 2, 1)
        return self.bn(y.reshape(-1, 6))


class BNTransposeLinear(nn.Module):
    """BN1d on (N, C, L) → transpose(1, 2) → Linear(C) (input side)."""

    def __init__(self) -> None:
        super().__init__()
        self.bn, self.fc = nn.BatchNorm1d(8), nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(x.transpose(1, 2)).transpose(1, 2))


class BNFlattenTransposeLinear(nn.Module):
    """BN2d → flatten(2) → transpose(1, 2) → Linear(C) (input side, ViT-style patch tokens)."""

    def __init__(self) -> None:
        super().__init__()
        self.bn, self.fc = nn.BatchNorm2d(4), nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(x).flatten(2).transpose(1, 2))


class BNViewLinear(nn.Module):
    """BN1d on (B·N, C) → view(B, N, C) → Linear (input side, LeViT the other way round)."""

    def __init__(self) -> None:
        super().__init__()
        self.bn, self.fc = nn.BatchNorm1d(8), nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(x.flatten(0, 1)).view(x.shape))


FOLDS = {  # model, input shape, the layer the BN folds into
    "linear-flatten01-bn-reshape": (LinearFlattenBN, (2, 3, 8), "fc"),
    "linear-transpose-bn-transpose": (LinearTransposeBN, (2, 3, 8), "fc"),
    "conv-permute-view-bn": (ConvPermuteViewBN, (2, 4, 5), "conv"),
    "bn-transpose-linear": (BNTransposeLinear, (2, 3, 8), "fc"),
    "bn2d-flatten2-transpose-linear": (BNFlattenTransposeLinear, (2, 4, 3, 3), "fc"),
    "bn-flatten01-view-linear": (BNViewLinear, (2, 3, 8), "fc"),
}


def _model(build: type[nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return randomize_norms(build(), seed=1).eval()


def _x(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("tracer", TRACERS)
@pytest.mark.parametrize("case", list(FOLDS))
def test_folds_through_layout_ops(case: str, tracer: str) -> None:
    build, shape, into = FOLDS[case]
    model, x = _model(build), _x(shape)
    gm = trace(model, (x,), tracer).graph_module
    ops = count_ops(gm)
    result = FoldBatchNorm()(gm)
    assert not result.skipped and len(result.changes) == 1, (result.changes, result.skipped)
    assert result.changes[0].detail.startswith(f"folded into {into} ")
    assert n_bn(gm) == 0 and count_ops(gm) < ops
    gm.graph.lint()
    err = rel_err(fp64(model, x), run(gm, x))
    assert err <= BLOCK_RTOL, f"{case}/{tracer}: rel err {err:.3g}"
    code = gm.code
    assert not FoldBatchNorm()(gm).modified and gm.code == code  # idempotent


def run(gm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return first(gm(x))


# --------------------------------------------------------------------------- refusals


class FlattenMergesChannel(nn.Module):
    """Linear (N, L, F) → flatten(1) → BN1d(L·F): the channel is merged with L."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn = nn.Linear(4, 4), nn.BatchNorm1d(12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x).flatten(1))


class ViewSplitsChannel(nn.Module):
    """Linear (N, 8) → view(N, 2, 4) → BN1d(2): the channel axis is split."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn = nn.Linear(5, 8), nn.BatchNorm1d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x).view(-1, 2, 4))


class TransposeMovesChannelOff(nn.Module):
    """Linear (N, L, F) → transpose(0, 1) → BN1d over N: the BN normalizes a non-channel axis."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn = nn.Linear(4, 3), nn.BatchNorm1d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x).transpose(0, 1))


class PermuteOffFeatures(nn.Module):
    """BN2d → permute(0, 2, 1, 3) → Linear over W: the BN channels are not its input features."""

    def __init__(self) -> None:
        super().__init__()
        self.bn, self.fc = nn.BatchNorm2d(3), nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(x).permute(0, 2, 1, 3))


REFUSALS = {  # model, input shape, what the reason must say (fx op name, export op name)
    "flatten-merges-channel": (
        FlattenMergesChannel,
        (2, 3, 4),
        "splits the channel axis of Linear",
        ("flatten", "flatten"),
    ),
    "view-splits-channel": (
        ViewSplitsChannel,
        (3, 5),
        "splits the channel axis of Linear",
        ("view", "view"),
    ),
    "transpose-moves-channel-off": (
        TransposeMovesChannelOff,
        (2, 3, 4),
        "are on dim 2, not the BN's channel axis (dim 1)",
        ("transpose", "transpose"),
    ),
    "permute-off-features": (
        PermuteOffFeatures,
        (2, 3, 3, 3),
        "are on dim 2, not its input features",
        ("permute", "permute"),
    ),
}


@pytest.mark.parametrize("tracer", TRACERS)
@pytest.mark.parametrize("case", list(REFUSALS))
def test_refuses_when_the_channel_axis_is_mixed(case: str, tracer: str) -> None:
    build, shape, reason, names = REFUSALS[case]
    model, x = _model(build), _x(shape)
    gm = trace(model, (x,), tracer).graph_module
    code = gm.code
    result = FoldBatchNorm()(gm)
    assert not result.modified and gm.code == code
    [skip] = result.skipped
    op = names[TRACERS.index(tracer)]
    assert reason in skip.reason and f"({op})" in skip.reason, skip.reason
    assert rel_err(fp64(model, x), run(gm, x)) <= BLOCK_RTOL


# --------------------------------------------------------------------------- ONNX


class Zoo(nn.Module):
    """Every fold pattern above in one graph, for the ONNX checks."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = LinearFlattenBN(), LinearTransposeBN()
        self.c, self.d = BNTransposeLinear(), BNViewLinear()
        self.e = ConvPermuteViewBN()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ys = (self.a(x), self.b(x), self.c(x), self.d(x), self.e(x.transpose(1, 2)[:, :4]))
        return torch.cat([y.flatten() for y in ys])


def to_onnx(module: nn.Module, *xs: torch.Tensor):
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        return torch.onnx.export(module, xs, dynamo=True, optimize=False, verbose=False).model


def ort(model, *xs: torch.Tensor) -> list[np.ndarray]:
    sess = session(model_bytes(model))
    feeds = {i.name: x.numpy() for i, x in zip(sess.get_inputs(), xs, strict=True)}
    return sess.run(None, feeds)


def _bn_ops(model) -> int:
    return sum(n.op_type == "BatchNormalization" for n in model.graph)


def test_onnx_input_folds_through_reshape_and_transpose() -> None:
    model, x = _model(Zoo), _x((2, 3, 8))
    onnx_model = to_onnx(model, x)
    assert _bn_ops(onnx_model) == 5
    result = OnnxFoldBatchNorm()(onnx_model)
    assert len(result.changes) == 5 and not result.skipped, result.skipped
    assert _bn_ops(onnx_model) == 0
    [out] = ort(onnx_model, x)
    assert rel_err(fp64(model, x), torch.from_numpy(out)) <= BLOCK_RTOL


def test_onnx_input_refusal_names_the_op() -> None:
    model, x = _model(TransposeMovesChannelOff), _x((2, 3, 4))
    result = OnnxFoldBatchNorm()(to_onnx(model, x))
    [skip] = result.skipped
    assert "after Transpose " in skip.reason and "not the BN's channel axis" in skip.reason


# --------------------------------------------------------------------------- real models


def levit() -> tuple[nn.Module, torch.Tensor]:
    t = _transformers()
    cfg = t.LevitConfig(
        image_size=32,
        hidden_sizes=[16, 32],
        num_attention_heads=[1, 2],
        depths=[1, 1],
        key_dim=[8, 8],
        attention_ratio=[2, 2],
        mlp_ratio=[2, 2],
        down_ops=[["Subsample", 8, 2, 2, 2, 2]],
        patch_size=16,
    )
    torch.manual_seed(0)
    return randomize_norms(t.LevitModel(cfg), seed=1).eval(), _x((2, 3, 32, 32))


def patchtst() -> tuple[nn.Module, torch.Tensor]:
    t = _transformers()
    cfg = t.PatchTSTConfig(
        num_input_channels=3,
        context_length=32,
        patch_length=8,
        patch_stride=8,
        d_model=16,
        num_attention_heads=2,
        num_hidden_layers=2,
        ffn_dim=32,
        norm_type="batchnorm",
    )
    torch.manual_seed(0)
    return randomize_norms(t.PatchTSTModel(cfg), seed=1).eval(), _x((2, 32, 3))


REAL = {  # builder, BNs in the model, BNs a neighbouring layer can absorb
    "levit": (levit, 17, 17),
    # the two BNs right after a residual add (norm_sublayer1) have no layer on either side
    "patchtst": (patchtst, 4, 2),
}


@functools.cache
def folded(name: str):
    """(model, input, the export graph after fold-bn, the result, BNs that must stay)."""
    build, total, foldable = REAL[name]
    model, x = build()
    gm = trace(model, (x,), "export").graph_module
    assert n_bn(gm) == total
    return model, x, gm, FoldBatchNorm()(gm), total - foldable


@pytest.mark.parametrize("name", list(REAL))
def test_real_model_folds_every_absorbable_bn(name: str) -> None:
    model, x, gm, result, left = folded(name)
    assert n_bn(gm) == left and len(result.skipped) == left
    for skip in result.skipped:  # what stays has no layer next to it
        assert skip.reason.startswith("no conv/linear feeds it"), skip
    err = rel_err(fp64(model, x), run(gm, x))
    assert err <= NET_RTOL, f"{name}: rel err {err:.3g}"


def test_clap_refusal_names_both_neighbours() -> None:
    """CLAP's BatchNorm normalizes the mel bins of the raw input, which a transpose then turns
    into a spatial axis that a bicubic upsample interpolates before the patch conv: no layer can
    absorb it, and the reason names what is on each side instead of only "no conv/linear"."""
    t = _transformers()
    cfg = t.ClapAudioConfig(
        spec_size=64, num_mel_bins=16, window_size=4, patch_size=4, patch_stride=(4, 4),
        hidden_size=32, depths=[1, 1], num_attention_heads=[2, 2], patch_embeds_hidden_size=16,
        projection_dim=16,
    )  # fmt: skip
    torch.manual_seed(0)
    model = t.ClapAudioModel(cfg).eval()
    gm = trace(model, (torch.randn(1, 1, 64, 16),), "export").graph_module
    [skip] = FoldBatchNorm()(gm).skipped
    assert "input comes from input_features through transpose" in skip.reason, skip.reason
    assert "output goes to upsample_bicubic2d" in skip.reason, skip.reason
    assert n_bn(gm) == 1


def test_levit_onnx_pipeline_parity(tmp_path: Path) -> None:
    model, x, gm, _, _ = folded("levit")
    path = tmp_path / "levit.onnx"
    [out, *_] = onnx_outputs(gm, (x,), path)
    err = rel_err(fp64(model, x), torch.from_numpy(out))
    assert err <= NET_RTOL, f"levit: ORT rel err {err:.3g}"
    assert "BatchNormalization" not in op_types(path)


# --------------------------------------------------------------------------- the axis math


def _carries(labels: torch.Tensor, axis: int, size: int, repeat: int) -> bool:
    """Every element's channel is ``index along axis // repeat`` (and the axis holds them all)."""
    if labels.shape[axis] != size * repeat:
        return False
    idx = torch.arange(labels.shape[axis]) // repeat
    view = [1] * labels.dim()
    view[axis] = -1
    return bool((labels == idx.reshape(view)).all())


RESHAPES = [  # in shape, channel axis, out shape
    ((2, 3, 6), 2, (6, 6)),  # flatten(0, 1): channel kept (LeViT)
    ((6, 6), 1, (2, 3, 6)),  # and back
    ((2, 3, 4), 2, (2, 12)),  # flatten(1): merged with an outer axis
    ((2, 8), 1, (2, 2, 4)),  # split
    ((2, 4, 3, 3), 1, (2, 36)),  # flatten(1) of a BN2d output: repeat 9
    ((2, 4, 3, 3), 1, (2, 4, 9)),  # flatten(2)
    ((2, 4, 1), 1, (2, 1, 4)),  # size-1 axes
    ((4, 3, 2), 0, (2, 2, 6)),  # split of the outermost axis
]


@pytest.mark.parametrize(("in_shape", "axis", "out_shape"), RESHAPES)
def test_through_reshape_agrees_with_labelled_elements(
    in_shape: tuple[int, ...], axis: int, out_shape: tuple[int, ...]
) -> None:
    size = in_shape[axis]
    view = [1] * len(in_shape)
    view[axis] = -1
    labels = torch.arange(size).reshape(view).expand(in_shape).reshape(out_shape)
    found = through_reshape(ChannelAxis(axis, size), in_shape, out_shape)
    truth = [
        (b, r)
        for b in range(len(out_shape))
        for r in range(1, out_shape[b] + 1)
        if out_shape[b] % r == 0 and _carries(labels, b, size, r)
    ]
    if found is None:
        assert truth == [], truth
    else:
        assert _carries(labels, found.axis, size, found.repeat)
