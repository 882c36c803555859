"""The norm model on ONNX inputs (normrewrite.analysis.onnx_norms): fused ops are named by kind
(onnxruntime's SimplifiedLayerNormalization/Skip* ops included), decomposed norms by the kind
their arithmetic computes, each with its axes and ε, and ``inspect`` of a .onnx lists them."""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

import normrewrite
from normrewrite.core.onnx_pass import OnnxContext
from normrewrite.passes.fuse_norm.onnx import OnnxFuseNorm


class _RMS(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


class _LN(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x - x.mean(-1, keepdim=True)
        return c / torch.sqrt(c.pow(2).mean(-1, keepdim=True) + 1e-5)


def _legacy(tmp_path: Path) -> Path:
    """Two decomposed norms (TorchScript exporter, opset 18) around a Linear."""
    model = nn.Sequential(_LN(), nn.Linear(16, 16), _RMS(16)).eval()
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (torch.randn(2, 4, 16),), str(path), dynamo=False, opset_version=18
        )
    return path


def test_decomposed_then_fused_norms_by_kind(tmp_path: Path) -> None:
    path = _legacy(tmp_path)
    got = normrewrite.inspect(path).norms
    assert [(n.type, n.form, n.axes, n.shape) for n in got] == [
        ("layernorm", "decomposed", [2], [2, 4, 16]),
        ("rmsnorm", "decomposed", [2], [2, 4, 16]),
    ]
    assert [n.eps for n in got] == pytest.approx([1e-5, 1e-6], rel=1e-6)  # fp32 constants
    model = ir.load(path)
    OnnxFuseNorm(context=OnnxContext(target="ort"))(model)
    fused = tmp_path / "fused.onnx"
    ir.save(model, fused)
    got = normrewrite.inspect(fused).norms
    ops = [n.op_type for n in model.graph if "Normalization" in n.op_type]
    assert ops == ["LayerNormalization", "SimplifiedLayerNormalization"]
    assert [(n.type, n.form, n.axes) for n in got] == [
        ("layernorm", "op", [2]),
        ("rmsnorm", "op", [2]),
    ]
    assert got[1].affine and not got[0].affine


def test_onnxruntime_skip_norms_are_named_by_kind(tmp_path: Path) -> None:
    x, skip = (helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 4, 8]) for n in "xs")
    out = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "z")]
    gamma = helper.make_tensor("g", TensorProto.FLOAT, [8], [2.0] * 8)
    beta = helper.make_tensor("b", TensorProto.FLOAT, [8], [0.5] * 8)
    nodes = [
        helper.make_node("SkipLayerNormalization", ["x", "s", "g", "b"], ["y"], name="skip_ln",
                         domain="com.microsoft", epsilon=1e-5),
        helper.make_node("SkipSimplifiedLayerNormalization", ["y", "s", "g"], ["z"],
                         name="skip_rms", domain="com.microsoft", epsilon=1e-6),
    ]  # fmt: skip
    graph = helper.make_graph(nodes, "g", [x, skip], out, [gamma, beta])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    path = tmp_path / "skip.onnx"
    onnx.save(helper.make_model(graph, opset_imports=opsets), path)
    got = normrewrite.inspect(path).norms
    assert [(n.name, n.type, n.form, n.axes, n.affine) for n in got] == [
        ("skip_ln", "layernorm", "op", [2], True),
        ("skip_rms", "rmsnorm", "op", [2], True),
    ]
    assert [n.eps for n in got] == pytest.approx([1e-5, 1e-6], rel=1e-6)
