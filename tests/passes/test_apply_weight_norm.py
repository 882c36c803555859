"""apply-weight-norm: trainable g·v/‖v‖ weights, unchanged outputs at conversion.

The re-parameterised model must (1) compute the same outputs as an fp64 run of the original,
(2) hold the weight only as ``weight_g`` / ``weight_v`` parameters with the norm computed in the
graph, (3) train: gradients reach g and v and a step changes them, (4) export to ONNX, and
(5) round-trip through ``remove-weight-norm`` back to the original weights. With
``mean_only_bn=true`` the BatchNorms after those layers become ``y − μ' + β`` (no division by σ)
and the outputs are still unchanged at conversion.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from checks import assert_streamed_equals_in_memory
from harness import rel_err
from models import randomize_norms
from onnx_helpers import onnx_outputs
from torch import nn
from torch.fx import GraphModule

import normrewrite
from normrewrite.core.graph import get_tensor
from normrewrite.core.ops import norms
from normrewrite.core.pass_infra import PassContext
from normrewrite.passes import REGISTRY, ApplyWeightNorm, RemoveWeightNorm
from normrewrite.passes.apply_weight_norm import split_weight
from normrewrite.trace import trace

TRACERS = ("fx", "export")
RTOL = 1e-5  # fp32 vs fp64 reference, relative to max |y|


class Net(nn.Module):
    """conv → BN → relu → conv(no bias) → BN → conv-transpose → grouped conv → mean → linear."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.bn1 = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)
        self.c2, self.bn2 = nn.Conv2d(8, 8, 3, bias=False), nn.BatchNorm2d(8)
        self.t = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.g = nn.Conv2d(4, 4, 3, groups=2)
        self.l = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.c1(x)))
        y = self.bn2(self.c2(y))
        y = self.g(self.t(y))
        return self.l(y.mean((2, 3)))


LAYERS = ("c1", "c2", "t", "g", "l")


def net() -> nn.Module:
    torch.manual_seed(0)
    m = randomize_norms(Net()).eval()
    with torch.no_grad():
        m.bn2.weight[0] = -0.7  # a negative γ gives a negative g under mean_only_bn
    return m


def run(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return m(x)




def reparameterised(mean_only_bn: bool, tracer: str) -> tuple[nn.Module, torch.Tensor, GraphModule, Any]:
    model = net()
    x = torch.randn(2, 3, 10, 10, generator=torch.Generator().manual_seed(1))
    gm = trace(model, (x,), tracer).graph_module
    result = ApplyWeightNorm(mean_only_bn=mean_only_bn)(gm, PassContext())
    return model, x, gm, result


@pytest.mark.parametrize("tracer", TRACERS)
@pytest.mark.parametrize("mean_only_bn", [False, True], ids=["plain", "mean-only-bn"])
def test_reparameterised_model_is_unchanged_and_trainable(mean_only_bn: bool, tracer: str) -> None:
    model, x, gm, result = reparameterised(mean_only_bn, tracer)
    assert ApplyWeightNorm(mean_only_bn=mean_only_bn).exact
    assert result.modified and len(result.changes) == len(LAYERS) and not result.skipped
    params = dict(gm.named_parameters())
    for layer in LAYERS:
        assert f"{layer}.weight" not in params, layer
        assert {f"{layer}.weight_g", f"{layer}.weight_v"} <= set(params), layer
    assert params["t.weight_g"].shape == (1, 4, 1, 1)  # ConvTranspose: output channels are dim 1
    assert params["c1.weight_g"].shape == (8, 1, 1, 1)
    assert sum("vector_norm" in str(n.target) for n in gm.graph.nodes) == len(LAYERS)
    assert [n.kind for n in norms(gm)] == ([] if mean_only_bn else ["batchnorm", "batchnorm"])
    err = rel_err(run(copy.deepcopy(model).double(), x.double()), run(gm, x))
    assert err <= RTOL, f"rel err {err:.3g}"
    second = ApplyWeightNorm(mean_only_bn=mean_only_bn)(gm, PassContext())
    assert not second.modified and all("computed in the graph" in s.reason for s in second.skipped)

    names = [f"{layer}.weight_{p}" for layer in LAYERS for p in "gv"]
    before = {n: get_tensor(gm, n).detach().clone() for n in names}
    opt = torch.optim.SGD(gm.parameters(), lr=0.05)
    (gm(x) ** 2).mean().backward()
    for n in names:
        grad = get_tensor(gm, n).grad
        assert grad is not None and grad.abs().sum() > 0, n
    opt.step()
    assert all(not torch.equal(get_tensor(gm, n).detach(), before[n]) for n in names)


@pytest.mark.parametrize("tracer", TRACERS)
def test_mean_only_bn_subtracts_the_rescaled_mean_and_keeps_beta(tracer: str) -> None:
    model, _, gm, _ = reparameterised(True, tracer)
    bn = model.bn2
    r = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    state = gm.state_dict()
    assert not any(k.startswith("bn2.") and ("var" in k or "weight" in k or "num_batches" in k) for k in state)
    assert torch.allclose(state["bn2.running_mean"], bn.running_mean * r, rtol=1e-6)
    assert torch.allclose(state["bn2.bias"], bn.bias)
    assert state["c2.weight_g"].flatten()[0] < 0  # γ < 0 carried by g
    assert not any("batch_norm" in str(n.target) or "sqrt" in str(n.target) for n in gm.graph.nodes)


@pytest.mark.parametrize("tracer", TRACERS)
def test_round_trip_through_remove_weight_norm(tracer: str) -> None:
    model, _, gm, _ = reparameterised(False, tracer)
    removed = RemoveWeightNorm()(gm, PassContext())
    assert len(removed.changes) == len(LAYERS)
    for layer in LAYERS:
        w = get_tensor(gm, f"{layer}.weight")
        assert torch.allclose(w, getattr(model, layer).weight, rtol=1e-6, atol=1e-7), layer
    assert not any("vector_norm" in str(n.target) for n in gm.graph.nodes)


def test_onnx_export_of_the_trainable_graph(tmp_path: Any) -> None:
    model, x, gm, _ = reparameterised(True, "export")
    ort = torch.from_numpy(onnx_outputs(gm, (x,), tmp_path / "wn.onnx")[0])
    assert rel_err(run(model, x), ort) <= 1e-5


def test_convert_reports_it_exact_and_verified() -> None:
    model = net()
    x = torch.randn(2, 3, 10, 10)
    result = normrewrite.convert(model, ["apply-weight-norm:mean_only_bn=true"], (x,), tracer="export")
    rep = result.report
    assert rep.exact and rep.verify is not None and rep.verify.passed is True
    assert rep.verify.max_rel_err <= 1e-5
    assert any("mean-only" in n for n in rep.passes[0].notes)


def test_layers_that_cannot_be_reparameterised_are_skipped_with_reasons() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tied_a, self.tied_b = nn.Linear(4, 4), nn.Linear(4, 4)
            self.tied_b.weight = self.tied_a.weight
            self.dead = nn.Linear(4, 3)
            self.gt = nn.ConvTranspose1d(4, 4, 3, groups=2)
            with torch.no_grad():
                self.dead.weight[1] = 0.0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.tied_b(self.tied_a(x))
            return self.dead(y) + self.gt(y.unsqueeze(-1)).mean((1, 2))[:, None]

    x = torch.randn(2, 4)
    gm = trace(Odd().eval(), (x,), "export").graph_module
    result = ApplyWeightNorm()(gm, PassContext())
    reasons = " | ".join(s.reason for s in result.skipped)
    assert not result.modified
    assert "shared" in reasons and "all zeros" in reasons and "grouped ConvTranspose" in reasons


def test_split_weight_reconstructs_w_per_output_channel() -> None:
    w = torch.randn(6, 3, 2, 2, dtype=torch.float64)
    scale = torch.randn(6, dtype=torch.float64)
    g, v = split_weight(w, 0, scale)
    rebuilt = v * (g / torch.linalg.vector_norm(v, dim=(1, 2, 3), keepdim=True))
    assert torch.allclose(rebuilt, w * scale.reshape(-1, 1, 1, 1), rtol=1e-12)
    assert REGISTRY.create("apply-weight-norm:mean_only_bn=true").options.mean_only_bn


@pytest.mark.parametrize("passes", [["apply-weight-norm:mean_only_bn=true"], ["apply-weight-norm", "remove-weight-norm"]],
                         ids=["mean-only-bn", "round-trip"])
def test_streamed_conversion_equals_in_memory(passes: list[str], tmp_path: Any) -> None:
    """g, v (and the rescaled mean) are written through compute_tensors: replaying the recipes
    on the checkpoint (model traced on meta) gives the in-memory result bit for bit."""
    model = net()
    assert_streamed_equals_in_memory(model, passes, torch.randn(2, 3, 10, 10), tmp_path)
