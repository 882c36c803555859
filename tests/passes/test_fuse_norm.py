"""fuse-norm: written-out RMSNorm / LayerNorm → one fused op, in both graph flavours."""

from __future__ import annotations

import copy
from collections.abc import Callable

import models
import pytest
import torch
from torch import nn

from normrewrite.core.pass_infra import PassResult
from normrewrite.passes.fuse_norm import FuseNorm, op_name
from normrewrite.trace import trace
from normrewrite.verify import compare

aten = torch.ops.aten
D = 16


class LlamaRMS(nn.Module):
    """Llama/Qwen2: x.to(fp32) → pow → mean → +eps → rsqrt → mul → .to(dtype) → γ·."""

    def __init__(self, dim: int = -1) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(D) * 0.5 + 1)
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        var = h.pow(2).mean(self.dim, keepdim=True)
        h = h * torch.rsqrt(var + 1e-6)
        return self.weight * h.to(dtype)


class T5LN(nn.Module):
    """T5: variance of x.to(fp32), normalizes x itself; γ after."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(D) * 0.5 + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + 1e-6))


class PlainRMS(nn.Module):
    """No γ, x / sqrt(mean(x·x) + eps)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / torch.sqrt((x * x).mean(dim=2, keepdim=True) + 1e-5)


class BertLN(nn.Module):
    """The classic hand-written LayerNorm: x − u computed twice, divided by sqrt."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(D) * 0.5 + 1)
        self.bias = nn.Parameter(torch.randn(D) * 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(-1, keepdim=True)
        s = (x - u).pow(2).mean(-1, keepdim=True)
        x = (x - u) / torch.sqrt(s + 1e-12)
        return self.weight * x + self.bias


class VarLN(nn.Module):
    """mean / var(unbiased=False) / rsqrt form."""

    def __init__(self, correction: int = 0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(D) * 0.5 + 1)
        self.bias = nn.Parameter(torch.randn(D) * 0.2)
        self.correction = correction

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mu = x.mean(-1, keepdim=True)
        var = torch.var(x, -1, correction=self.correction, keepdim=True)
        return (x - mu) * torch.rsqrt(var + 1e-5) * self.weight + self.bias


class SharedSubLN(nn.Module):
    """x − mean computed once, squared as d·d, normalized by rsqrt; no β."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(D) * 0.5 + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x - torch.mean(x, dim=-1, keepdim=True)
        return d * torch.rsqrt((d * d).mean(-1, keepdim=True) + 1e-5) * self.weight


class GemmaRMS(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(D) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return (h * (1.0 + self.weight.float())).type_as(x)


class Block(nn.Module):
    """Two norms and a residual around a linear, so the norm input has other users."""

    def __init__(self) -> None:
        super().__init__()
        self.n1, self.lin, self.n2 = LlamaRMS(), nn.Linear(D, D), BertLN()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.lin(self.n1(x))
        return self.n2(x)


class ChannelFirstLN(nn.Module):
    """ConvNeXt-style LN over dim 1 of (N, C, H, W): not the last dim."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        return (x - u) / torch.sqrt(s + 1e-6)


class SharedSquare(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sq = x.pow(2)
        return x * torch.rsqrt(sq.mean(-1, keepdim=True) + 1e-6) + sq


def _x(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1)) * 3 + 0.5


def _fused(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    targets = {aten.rms_norm.default, aten.layer_norm.default,
               torch.nn.functional.rms_norm, torch.nn.functional.layer_norm}
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in targets]


def _leftover(gm: torch.fx.GraphModule) -> list[str]:
    return [n.name for n in gm.graph.nodes if op_name(n) in ("pow", "rsqrt", "sqrt", "var", "mean")]


def _run(module: nn.Module, x: torch.Tensor, tracer: str) -> tuple[torch.fx.GraphModule, PassResult]:
    gm = trace(module, (x,), tracer).graph_module  # type: ignore[arg-type]
    return gm, FuseNorm()(gm)


def _ref64(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return copy.deepcopy(module).double()(x.double())


CASES: list[tuple[str, Callable[[], nn.Module], tuple[int, ...], list[tuple[str, float]]]] = [
    ("llama", LlamaRMS, (2, 5, D), [("rmsnorm", 1e-6)]),
    ("llama-pos-dim", lambda: LlamaRMS(dim=2), (2, 5, D), [("rmsnorm", 1e-6)]),
    ("t5", T5LN, (2, 5, D), [("rmsnorm", 1e-6)]),
    ("plain", PlainRMS, (2, 5, D), [("rmsnorm", 1e-5)]),
    ("bert-ln", BertLN, (2, 5, D), [("layernorm", 1e-12)]),
    ("var-ln", VarLN, (3, D), [("layernorm", 1e-5)]),
    ("shared-sub-ln", SharedSubLN, (2, 5, D), [("layernorm", 1e-5)]),
    ("block", Block, (2, 5, D), [("rmsnorm", 1e-6), ("layernorm", 1e-12)]),
]


@pytest.mark.parametrize("tracer", ["fx", "export"])
@pytest.mark.parametrize(("name", "build", "shape", "kinds"), CASES, ids=[c[0] for c in CASES])
def test_fuses_exactly(name: str, build: Callable[[], nn.Module], shape: tuple[int, ...],
                       kinds: list[tuple[str, float]], tracer: str) -> None:
    module, x = build().eval(), _x(*shape)
    gm, result = _run(module, x, tracer)
    assert result.modified and [c.detail.split()[1] for c in result.changes] == [k for k, _ in kinds]
    fused = _fused(gm)
    assert len(fused) == len(kinds)  # one fused op per norm
    assert _leftover(gm) == []  # no pow/mean/rsqrt/sqrt/var left
    has_weight = name != "plain"
    for node, (kind, eps) in zip(fused, kinds, strict=True):
        assert (node.args[2] is not None) == has_weight
        assert ("rms" in str(node.target)) == (kind == "rmsnorm")
        assert node.args[-1] == eps  # eps kept exactly
    if tracer == "export":
        assert all(isinstance(n.target, torch._ops.OpOverload) for n in fused)
    else:
        assert all(not isinstance(n.target, torch._ops.OpOverload) for n in fused)
    err = compare([_ref64(module, x)], [gm(x)])
    assert err.max_rel_err <= 1e-5, err
    assert not FuseNorm()(gm).modified  # idempotent


def test_eps_kept() -> None:
    gm, _ = _run(BertLN().eval(), _x(2, D), "export")
    (node,) = _fused(gm)
    assert node.target is aten.layer_norm.default and node.args[4] == 1e-12
    assert node.args[2].target == "weight" and node.args[3].target == "bias"


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_gemma_offset_kept_separate(tracer: str) -> None:
    module, x = GemmaRMS().eval(), _x(2, 5, D)
    gm, result = _run(module, x, tracer)
    (node,) = _fused(gm)
    assert node.args[2] is None  # (1 + γ) is not a stored weight: left as a multiply
    assert "1 + γ" in result.changes[0].detail
    assert compare([_ref64(module, x)], [gm(x)]).max_rel_err <= 1e-5


def test_bf16_cast_kept_and_weight_after_it() -> None:
    module = LlamaRMS().to(torch.bfloat16).eval()
    x = _x(2, 5, D).to(torch.bfloat16)
    gm, result = _run(module, x, "export")
    (node,) = _fused(gm)
    assert node.args[2] is None and "bfloat16 cast" in result.changes[0].detail
    (user,) = node.users
    assert op_name(user) == "cast" and op_name(next(iter(user.users))) == "mul"
    with torch.no_grad():
        want = module(x)
    assert torch.equal(gm(x), want)  # same op order, same roundings


@pytest.mark.parametrize(
    ("build", "shape", "reason"),
    [
        (ChannelFirstLN, (1, D, 3, 3), "not the last dim"),
        (lambda: VarLN(correction=1), (3, D), "unbiased"),
        (SharedSquare, (2, D), "x² has other users"),
    ],
    ids=["channel-first", "unbiased-var", "shared-square"],
)
@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_refuses_with_reason(build: Callable[[], nn.Module], shape: tuple[int, ...], reason: str,
                             tracer: str) -> None:
    gm, result = _run(build().eval(), _x(*shape), tracer)
    assert not result.modified and _fused(gm) == []
    assert any(reason in s.reason for s in result.skipped), result.skipped


def t5_encoder() -> nn.Module:
    import transformers as t

    torch.manual_seed(0)
    cfg = t.T5Config(vocab_size=100, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                     feed_forward_proj="gated-gelu")
    return models.randomize_norms(t.T5EncoderModel(cfg)).eval()


def gemma() -> nn.Module:
    import transformers as t

    torch.manual_seed(0)
    cfg = t.GemmaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                        max_position_embeddings=64, use_cache=False)
    return models.randomize_norms(t.GemmaModel(cfg)).eval()


@pytest.mark.parametrize(("build", "gamma_fused"), [(models.llama, True), (t5_encoder, True), (gemma, False)],
                         ids=["llama", "t5-encoder", "gemma"])
def test_real_models_one_fused_op_per_norm(build: Callable[[], nn.Module], gamma_fused: bool) -> None:
    model, ids = build(), models.token_ids()
    gm = trace(model, (ids,), "export").graph_module
    result = FuseNorm()(gm)
    fused = _fused(gm)
    assert len(result.changes) == len(fused) == 5  # 2 per layer + final
    assert all(n.target is aten.rms_norm.default for n in fused)
    assert all((n.args[2] is not None) == gamma_fused for n in fused)  # Gemma's 1 + γ stays apart
    assert not any(op_name(n) in ("rsqrt", "mean") for n in gm.graph.nodes)
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(ids).last_hidden_state
    assert compare([ref], [gm(ids)[0]]).max_rel_err <= 1e-5
    assert not FuseNorm()(gm).modified


@pytest.mark.parametrize(("opset", "node_type"), [(18, None), (23, "RMSNormalization")])
def test_onnx(tmp_path, opset: int, node_type: str | None) -> None:
    from onnx_helpers import onnx_outputs, op_types

    module, x = Block().eval(), _x(2, 5, D)
    gm, _ = _run(module, x, "export")
    path = tmp_path / "m.onnx"
    (out,) = onnx_outputs(gm, (x,), path, opset=opset)
    types = op_types(path)
    assert types.count("LayerNormalization") == 1
    if node_type is not None:
        assert types.count(node_type) == 1
    assert compare([_ref64(module, x)], [torch.from_numpy(out)]).max_rel_err <= 1e-5
