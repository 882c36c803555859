"""fuse-norm on ONNX models (passes/fuse_norm/onnx.py): decomposed LayerNorm / RMSNorm chains from
the TorchScript exporter (``dynamo=False``) become one fused node per norm, for each target; the
positive-axis spelling of torch's own rms_norm decomposition; what must not fuse; fp16 chains that
cannot be fused reduce in fp32; parity in onnxruntime (optimizations off) and against fp64."""

from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from models import randomize_norms
from torch import nn

from normrewrite.analysis.onnx_norms import decomposed_norm_dtypes
from normrewrite.core.onnx_graph import model_bytes
from normrewrite.core.onnx_pass import OnnxContext
from normrewrite.passes.fuse_norm.onnx import OnnxFuseNorm
from normrewrite.verify.onnxruntime import relative_error, session

RTOL = 1e-5


class LlamaRMS(nn.Module):
    """HF Llama's RMSNorm: upcast, x * rsqrt(mean(x²) + ε), cast back, times γ."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(v + 1e-6)).to(x.dtype)


class TorchRMS(nn.Module):
    """torch's own rms_norm decomposition: the reduce axis is the last *positive* index."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(x.dim() - 1, keepdim=True) + 1e-5) * self.weight


class Block(nn.Module):
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.rms = LlamaRMS(d)
        self.plain = nn.LayerNorm(d, elementwise_affine=False)
        self.trms = TorchRMS(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trms(self.plain(self.rms(self.ln(x))))


class NotANorm(nn.Module):
    """Mean-of-squares over dim 1 (not the trailing axis): must not be fused."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + 1e-5)


def legacy_onnx(module: nn.Module, x: torch.Tensor, opset: int) -> ir.Model:
    f = io.BytesIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x,), f, dynamo=False, opset_version=min(opset, 18))
    proto = onnx.load_from_string(f.getvalue())
    if opset > 18:
        proto = onnx.version_converter.convert_version(proto, opset)
    return ir.from_proto(proto)


def run(model: ir.Model, x: np.ndarray) -> list[np.ndarray]:
    sess = session(model_bytes(model))
    return sess.run(None, {sess.get_inputs()[0].name: x})


def ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


@pytest.mark.parametrize(
    ("opset", "target", "expected"),
    [
        (14, "ort", ["LayerNormalization", "SimplifiedLayerNormalization"] * 2),
        (18, "ort", ["LayerNormalization", "SimplifiedLayerNormalization"] * 2),
        (23, "standard", ["LayerNormalization", "RMSNormalization"] * 2),
    ],
)
def test_every_norm_becomes_one_node(opset: int, target: str, expected: list[str]) -> None:
    module = randomize_norms(Block()).eval()
    x = torch.randn(2, 4, 16) * 3
    model = legacy_onnx(module, x, opset)
    before = run(model, x.numpy())
    result = OnnxFuseNorm(context=OnnxContext(target=target))(model)
    norms = [o for o in ops(model) if "Normalization" in o]
    assert norms == expected
    assert not {"ReduceMean", "Sqrt", "Pow"} & set(ops(model))
    assert result.modified and not result.skipped
    after = run(model, x.numpy())
    assert relative_error(before, after)[1] <= RTOL
    ref64 = module.double()(x.double()).detach().numpy()
    assert relative_error([ref64], after)[1] <= 1e-5
    for n in model.graph:
        if "Normalization" in n.op_type:
            assert n.attributes["axis"].value == -1
            stash = n.attributes.get("stash_type")
            assert stash is None or stash.value == 1  # fp32 compute (1 is the default)
    again = OnnxFuseNorm(context=OnnxContext(target=target))(model)
    assert not again.modified


def test_standard_below_17_and_23_is_left_with_reasons() -> None:
    module = randomize_norms(Block()).eval()
    x = torch.randn(2, 4, 16)
    model = legacy_onnx(module, x, 14)
    result = OnnxFuseNorm(context=OnnxContext(target="standard"))(model)
    assert not result.modified
    reasons = {s.reason.split(" (")[0] for s in result.skipped}
    assert reasons == {"LayerNormalization needs opset 17", "no standard RMSNorm op below opset 23"}


def test_non_trailing_reduction_is_not_fused() -> None:
    x = torch.randn(2, 4, 16)
    model = legacy_onnx(NotANorm(), x, 23)
    before = ops(model)
    result = OnnxFuseNorm(context=OnnxContext())(model)
    assert not result.modified and ops(model) == before
    assert len(result.skipped) == 1


def test_fp16_chain_without_fused_op_reduces_in_fp32() -> None:
    """Opset 18, standard ops: no RMSNorm op exists, so the fp16 chain is kept decomposed but its
    x² / mean / ε-add move to fp32; at |x| ~ 1000 fp16 x² would be inf (a GPU shows it)."""
    module = TorchRMS(16).eval()
    with torch.no_grad():
        module.weight.copy_(torch.randn(16))
    x = torch.randn(2, 4, 16) * 1000
    model = legacy_onnx(module.half(), x.half(), 18)
    assert decomposed_norm_dtypes(model) != []
    result = OnnxFuseNorm(context=OnnxContext(target="standard"))(model)
    assert result.modified
    assert decomposed_norm_dtypes(model) == ["FLOAT"]
    out = run(model, x.half().numpy())[0]
    ref64 = module.double()(x.double()).detach().numpy()
    assert np.isfinite(out).all()
    assert relative_error([ref64], [out])[1] <= 2e-3
    assert not OnnxFuseNorm(context=OnnxContext(target="standard"))(model).modified
