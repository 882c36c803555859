"""fold-norm-affine: γ/β of LayerNorm/RMSNorm folded into the linear layers reading the norm."""

from __future__ import annotations

import copy

import models
import pytest
import torch
from torch import nn

from normrewrite.core.graph import get_tensor
from normrewrite.core.ops import norms
from normrewrite.passes.fold_norm_affine import FoldNormAffine, fold_affine
from normrewrite.passes.fuse_norm import FuseNorm
from normrewrite.trace import trace
from normrewrite.verify import compare, tensor_leaves

D = 16


@pytest.mark.parametrize("out_dim", [0, 1])
@pytest.mark.parametrize("with_bias", [True, False])
def test_fold_affine_math(out_dim: int, with_bias: bool) -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, D, generator=g)  # Linear layout (out, in)
    b = torch.randn(8, generator=g) if with_bias else None
    gamma, beta, z = (
        torch.randn(D, generator=g),
        torch.randn(D, generator=g),
        torch.randn(5, D, generator=g),
    )
    stored = w if out_dim == 0 else w.t().contiguous()
    nw, nb = fold_affine(stored, b, gamma, beta, out_dim=out_dim)
    want = torch.nn.functional.linear(gamma * z + beta, w, b)
    got = torch.nn.functional.linear(z, nw if out_dim == 0 else nw.t(), nb)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


class QKV(nn.Module):
    """A LayerNorm read by three linears (one without bias), an RMSNorm by one."""

    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(D)
        self.q, self.k, self.v = nn.Linear(D, D), nn.Linear(D, D, bias=False), nn.Linear(D, 8)
        self.rms = nn.RMSNorm(D, eps=1e-6)
        self.o = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln(x)
        y = self.q(h) * self.k(h)
        return self.o(self.rms(y)).sum(-1) + self.v(h).sum(-1)


class Residual(nn.Module):
    """The LN output also feeds the residual: not foldable."""

    def __init__(self) -> None:
        super().__init__()
        self.ln, self.fc = nn.LayerNorm(D), nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln(x)
        return h + self.fc(h)


class Tied(nn.Module):
    """The consumer's weight is also used by another layer."""

    def __init__(self) -> None:
        super().__init__()
        self.ln, self.fc, self.other = nn.LayerNorm(D), nn.Linear(D, D), nn.Linear(D, D)
        self.other.weight = self.fc.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.ln(x)) + self.other(x)


def _x() -> torch.Tensor:
    return torch.randn(2, 5, D, generator=torch.Generator().manual_seed(3)) * 2 + 0.3


def _ref64(model: nn.Module, *inputs: torch.Tensor) -> list[torch.Tensor]:
    m = copy.deepcopy(model).double()
    with torch.no_grad():
        return tensor_leaves(m(*(t.double() if t.is_floating_point() else t for t in inputs)))


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_folds_into_several_linears(tracer: str) -> None:
    model = models.randomize_norms(QKV()).eval()
    x = _x()
    gm = trace(model, (x,), tracer).graph_module  # type: ignore[arg-type]
    result = FoldNormAffine()(gm)
    assert [c.target for c in result.changes] == ["ln", "rms"]
    assert "q, k, v" in result.changes[0].detail
    infos = norms(gm)
    assert [i.kind for i in infos] == ["layernorm", "rmsnorm"]
    assert all(not i.has_weight and not i.has_bias for i in infos)  # affine-free
    if tracer == "fx":
        assert not gm.get_submodule("ln").elementwise_affine
    assert get_tensor(gm, "k.bias").shape == (D,)  # β needed a bias
    assert compare(_ref64(model, x), [gm(x)]).max_rel_err <= 1e-5
    assert not FoldNormAffine()(gm).modified


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_usage_is_kept_current_without_rescans(tracer: str) -> None:
    """The rewrite refreshes only the tensors a fold touched; the result equals a full rescan."""
    from normrewrite.core.pass_infra import PassContext
    from normrewrite.core.rewrite import rewrite_each
    from normrewrite.core.usage import TensorUsage

    gm = trace(models.randomize_norms(QKV()).eval(), (_x(),), tracer).graph_module
    rewrite = FoldNormAffine().rewriter(gm, PassContext())
    assert len(rewrite_each(rewrite).changes) == 2
    fresh = TensorUsage.of(gm)
    assert rewrite.usage.reads == fresh.reads and rewrite.usage.aliases == fresh.aliases
    assert "k.bias" in rewrite.usage.aliases  # created by the fold


def test_bf16_llama_says_why_gamma_after_the_cast_is_not_folded() -> None:
    gm = trace(models.llama().to(torch.bfloat16), (models.token_ids(),), "export").graph_module
    FuseNorm()(gm)
    result = FoldNormAffine()(gm)
    assert not result.modified and len(result.skipped) == 5  # two per layer + the final norm
    assert all("after its cast to bfloat16" in s.reason for s in result.skipped)


@pytest.mark.parametrize(
    ("build", "reason"),
    [(Residual, "which is not a linear layer"), (Tied, "shared")],
    ids=["residual", "tied"],
)
@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_refuses(build: type[nn.Module], reason: str, tracer: str) -> None:
    model = models.randomize_norms(build()).eval()
    gm = trace(model, (_x(),), tracer).graph_module  # type: ignore[arg-type]
    result = FoldNormAffine()(gm)
    assert not result.modified
    assert len(result.skipped) == 1 and reason in result.skipped[0].reason
    assert norms(gm)[0].has_weight


@pytest.mark.parametrize("name", ["gpt2", "vit", "llama"])
def test_real_models(name: str) -> None:
    model = getattr(models, name)()
    x = models.pixels() if name == "vit" else models.token_ids()
    gm = trace(model, (x,), "export").graph_module
    if name == "llama":
        FuseNorm()(gm)  # its RMSNorms are written out: fuse them first
    result = FoldNormAffine()(gm)
    assert len(result.changes) == 4  # two per layer
    final = result.skipped[0]
    assert len(result.skipped) == 1 and final.target in ("ln_f", "layernorm", "norm")
    assert sum(1 for i in norms(gm) if i.has_weight) == 1  # only the final norm keeps γ
    if name == "llama":
        assert "q_proj" in result.changes[0].detail and "v_proj" in result.changes[0].detail
    assert compare(_ref64(model, x), tensor_leaves(gm(x))).max_rel_err <= 1e-5
    assert not FoldNormAffine()(gm).modified


def test_onnx(tmp_path) -> None:
    from onnx_helpers import onnx_outputs, op_types

    model, ids = models.gpt2(), models.token_ids()
    gm = trace(model, (ids,), "export").graph_module
    FoldNormAffine()(gm)
    path = tmp_path / "m.onnx"
    outs = [torch.from_numpy(o) for o in onnx_outputs(gm, (ids,), path)]
    assert op_types(path).count("LayerNormalization") == 5
    assert compare(_ref64(model, ids), outs).max_rel_err <= 1e-5
