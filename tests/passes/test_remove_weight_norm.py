"""remove-weight-norm: both weight-norm APIs, three traced forms, several dims.

A hand-written model carries weight norm through the hook API (``torch.nn.utils.weight_norm``)
and the parametrization API (``torch.nn.utils.parametrizations.weight_norm``), on Conv and Linear,
with ``dim`` 0, 1, 2 and None. Traced three ways — symbolic_trace (the layers stay ``call_module``
with hooks/parametrizations), torch.export (``aten._weight_norm``) and a decomposed export
(``mul(v, div(g, linalg_vector_norm(v)))``) — the pass must leave plain stored weights, equal
to PyTorch's own weight-norm computation, and the same outputs as an fp64 run of the original.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
import torch
from harness import rel_err
from onnx_helpers import onnx_outputs, op_types
from torch import nn
from torch.fx import GraphModule
from torch.nn.utils import parametrizations, parametrize, weight_norm

from normrewrite.core.pass_infra import PassContext
from normrewrite.passes import RemoveWeightNorm
from normrewrite.passes.remove_weight_norm import materialize, reduced_dims
from normrewrite.trace import trace

FORMS = ("fx", "export", "decomposed")
RTOL = 1e-5  # fp32 network vs fp64 reference, relative to max |y|


class WN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c0 = weight_norm(nn.Conv2d(3, 6, 3))  # hook API, dim=0
        self.c1 = weight_norm(nn.Conv2d(6, 6, 3, bias=False), dim=None)  # hook API, whole tensor
        self.c2 = parametrizations.weight_norm(nn.Conv1d(6, 4, 3), dim=2)  # parametrize, a kernel dim
        self.l0 = parametrizations.weight_norm(nn.Linear(4, 5))  # parametrize, dim=0
        self.l1 = parametrizations.weight_norm(nn.Linear(5, 3), dim=1)  # parametrize, input dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.c1(torch.relu(self.c0(x))))
        y = self.c2(y.flatten(2))
        return self.l1(torch.tanh(self.l0(y.mean(2))))


LAYERS = ("c0", "c1", "c2", "l0", "l1")


def build() -> nn.Module:
    torch.manual_seed(0)
    m = WN().eval()
    with torch.no_grad():  # make g ≠ ‖v‖ so a wrong formula shows
        for name in ("c0", "c1"):
            getattr(m, name).weight_g.mul_(torch.rand_like(getattr(m, name).weight_g) + 0.5)
        for name in ("c2", "l0", "l1"):
            g = getattr(m, name).parametrizations.weight.original0
            g.mul_(torch.rand_like(g) + 0.5)
        m(torch.randn(1, 3, 9, 9))  # the hook API's weight becomes a leaf: deepcopy works
    return m


def traced(model: nn.Module, x: torch.Tensor, form: str) -> GraphModule:
    if form == "decomposed":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the hook API assigns .weight during export
            return torch.export.export(model, (x,)).run_decompositions().module()
    return trace(model, (x,), form).graph_module


def run(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return m(x)




def torch_weight(model: nn.Module, name: str) -> torch.Tensor:
    with torch.no_grad():
        return getattr(model, name).weight.detach().clone()


@pytest.fixture
def model_and_input() -> tuple[nn.Module, torch.Tensor]:
    return build(), torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("form", FORMS)
def test_weights_materialized_exactly(form: str, model_and_input: tuple[nn.Module, torch.Tensor]) -> None:
    model, x = model_and_input
    ref64 = run(copy.deepcopy(model).double(), x.double())
    gm = traced(model, x, form)
    result = RemoveWeightNorm()(gm, PassContext())
    assert result.modified and len(result.changes) == len(LAYERS) and not result.skipped
    names = dict(gm.named_parameters())
    assert not [n for n in names if n.endswith(("_g", "_v")) or "original" in n]
    for layer in LAYERS:
        w = names[f"{layer}.weight"]
        assert isinstance(w, nn.Parameter)
        assert torch.allclose(w, torch_weight(model, layer), rtol=1e-6, atol=1e-7), layer
        mod = gm.get_submodule(layer) if form == "fx" else None
        if mod is not None:
            assert not parametrize.is_parametrized(mod) and not mod._forward_pre_hooks
    assert not any("weight_norm" in str(n.target) or "vector_norm" in str(n.target) for n in gm.graph.nodes)
    assert rel_err(ref64, run(gm, x)) <= RTOL
    assert not RemoveWeightNorm()(gm, PassContext()).modified  # idempotent
    # the caller's model is untouched (symbolic_trace's deep copy shares parametrized classes)
    assert parametrize.is_parametrized(model.l0) and hasattr(model.c0, "weight_g")
    assert rel_err(ref64, run(model, x)) <= RTOL


@pytest.mark.parametrize("form", ["export"])
def test_onnx_of_the_result_runs_in_onnxruntime(form: str, model_and_input: tuple[nn.Module, torch.Tensor],
                                                tmp_path: Any) -> None:
    model, x = model_and_input
    gm = traced(model, x, form)
    RemoveWeightNorm()(gm, PassContext())
    path = tmp_path / "m.onnx"
    ort = torch.from_numpy(onnx_outputs(gm, (x,), path)[0])
    assert not {"ReduceL2", "LpNormalization", "Div"} & set(op_types(path))
    assert rel_err(run(gm, x), ort) <= 1e-5


def test_recipe_is_logged_for_replay(model_and_input: tuple[nn.Module, torch.Tensor]) -> None:
    model, x = model_and_input
    ctx = PassContext()
    gm = traced(model, x, "fx")
    RemoveWeightNorm()(gm, ctx)
    by_output = {r.outputs: r for r in ctx.recipes}
    recipe = by_output[("l0.weight",)]
    assert recipe.inputs == ("l0.parametrizations.weight.original0", "l0.parametrizations.weight.original1")
    g = model.l0.parametrizations.weight.original0
    v = model.l0.parametrizations.weight.original1
    assert torch.allclose(recipe.fn(g, v)[0], torch_weight(model, "l0"), rtol=1e-6)
    assert by_output[("c0.weight",)].inputs == ("c0.weight_g", "c0.weight_v")


def test_weight_norm_of_a_computed_g_is_left_alone() -> None:
    class Computed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.v = nn.Parameter(torch.randn(4, 3))
            self.g = nn.Parameter(torch.rand(4, 1) + 0.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            w = torch._weight_norm(self.v, self.g * x.mean(), 0)  # g depends on the input
            return x @ w.t()

    x = torch.randn(2, 3)
    gm = trace(Computed(), (x,), "export").graph_module
    result = RemoveWeightNorm()(gm, PassContext())
    assert not result.modified
    assert "computed in the graph" in result.skipped[0].reason


def test_stacked_parametrizations_are_skipped_with_the_reason() -> None:
    class Double(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return 2 * w

    lin = parametrizations.weight_norm(nn.Linear(3, 4))
    parametrize.register_parametrization(lin, "weight", Double())
    model = nn.Sequential(lin).eval()
    x = torch.randn(2, 3)
    gm = trace(model, (x,), "fx").graph_module
    result = RemoveWeightNorm()(gm, PassContext())
    assert not result.modified
    assert "other parametrizations" in result.skipped[0].reason


@pytest.mark.parametrize(("shape", "dim"), [((4, 3, 2), 0), ((4, 3, 2), 1), ((4, 3, 2), 2), ((4, 3), None),
                                            ((5, 2, 3, 3), -1)])
def test_materialize_matches_torch_weight_norm(shape: tuple[int, ...], dim: int | None) -> None:
    v = torch.randn(shape, dtype=torch.float64)
    g_shape = [1] * len(shape)
    if dim not in (None, -1):
        g_shape[dim] = shape[dim]
    g = torch.rand(g_shape, dtype=torch.float64) + 0.5
    expected = torch._weight_norm(v, g, -1 if dim is None else dim)
    got = materialize(v, g, reduced_dims(len(shape), dim))
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-14)
