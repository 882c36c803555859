"""One contract every registered pass keeps, checked on the canonical model of each pass.

For every pass in ``normrewrite.passes.REGISTRY``: converting never touches the user's model; the
rewritten graph lints and changes on its canonical model, under both tracers; a second run changes
nothing (or, for passes that re-measure, nothing numerically); exact passes match an fp64 run of
the original to fp32 rounding, approximate ones report their measured error; the ONNX written by the
shipped emitter matches the rewritten graph in onnxruntime; the report names the pass, its
exactness and its changes. A pass with no canonical case must be listed in ``NO_CASE`` with the
reason, so a new pass cannot slip past the contract.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from harness import fp64_reference, onnx_parity, rel_err, run
from torch import nn

from normrewrite.core.pass_infra import PassContext
from normrewrite.passes import REGISTRY
from normrewrite.trace import trace

# --------------------------------------------------------------------------- canonical models


def _bn(c: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return bn


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(3, 8, 3, padding=1), _bn(8), nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.conv(x))))


class WrittenRMSNorm(nn.Module):
    """A Llama-style RMSNorm written as elementwise ops, then a linear layer."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(d) + 0.5)
        self.out = nn.Linear(d, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.out(self.weight * h)


class NormLinear(nn.Module):
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.norm, self.out = nn.LayerNorm(d), nn.Linear(d, 8)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.bias.uniform_(-0.5, 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(x))


class Blocks(nn.Module):
    """Residual blocks with the norm before the branch (pre) or on the sum (post)."""

    def __init__(self, placement: str, d: int = 16, layers: int = 2) -> None:
        super().__init__()
        self.placement = placement
        self.inp = nn.Linear(d, d)
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(layers))
        self.up = nn.ModuleList(nn.Linear(d, 2 * d) for _ in range(layers))
        self.down = nn.ModuleList(nn.Linear(2 * d, d) for _ in range(layers))
        self.final = nn.LayerNorm(d) if placement == "pre" else None
        with torch.no_grad():
            for n in [*self.norms, *([self.final] if self.final else [])]:
                n.weight.uniform_(0.5, 1.5)
                n.bias.uniform_(-0.5, 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for norm, up, down in zip(self.norms, self.up, self.down, strict=True):
            if self.placement == "pre":
                h = h + down(torch.relu(up(norm(h))))
            else:
                h = norm(h + down(torch.relu(up(h))))
        return self.final(h) if self.final is not None else h


class WeightNormConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        conv = nn.Conv1d(4, 6, 3, padding=1)
        self.conv = nn.utils.parametrizations.weight_norm(conv)
        with torch.no_grad():
            self.conv.parametrizations.weight.original0.uniform_(0.5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv(x))


class NonContiguousView(nn.Module):
    """transpose → contiguous → reshape: what T5/Swin attention ends in, which the ONNX exporter
    cannot take as torch.export records it."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x).transpose(1, 2).contiguous()
        return y.view(x.shape[0], -1)


@dataclass(frozen=True)
class Case:
    spec: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], tuple[torch.Tensor, ...]]
    tracers: tuple[str, ...] = ("fx", "export")
    remeasures: bool = False  # a second run re-measures (same values), so it reports changes again


def _images() -> tuple[torch.Tensor, ...]:
    return (torch.randn(2, 3, 8, 8),)


def _tokens() -> tuple[torch.Tensor, ...]:
    return (torch.randn(2, 5, 16),)


CASES: dict[str, Case] = {
    "fold-bn": Case("fold-bn", ConvBN, _images),
    "fuse-norm": Case("fuse-norm", WrittenRMSNorm, _tokens),
    "fold-norm-affine": Case("fold-norm-affine", NormLinear, _tokens),
    "ln-to-rmsnorm": Case("ln-to-rmsnorm", lambda: Blocks("pre"), _tokens),
    "swap-norm": Case("swap-norm:from=batchnorm,to=frozen", ConvBN, _images),
    "remove-weight-norm": Case(
        "remove-weight-norm", WeightNormConv, lambda: (torch.randn(2, 4, 7),)
    ),
    "apply-weight-norm": Case("apply-weight-norm", ConvBN, _images),
    "post-to-pre": Case("post-to-pre", lambda: Blocks("post"), _tokens),
    "pre-to-post": Case("pre-to-post", lambda: Blocks("pre"), _tokens),
    "recalibrate-bn": Case("recalibrate-bn:batches=2", ConvBN, _images, remeasures=True),
    "fix-export": Case(
        "fix-export", NonContiguousView, lambda: (torch.randn(2, 3, 8),), tracers=("export",)
    ),
}

# Registered passes with no canonical case here, and why. Empty today: every pass has one.
NO_CASE: dict[str, str] = {}


def test_every_registered_pass_has_a_contract_case() -> None:
    names = set(REGISTRY.names())
    assert names == set(CASES) | set(NO_CASE), (
        f"without a contract case: {sorted(names - set(CASES) - set(NO_CASE))}; "
        f"cases for unregistered passes: {sorted((set(CASES) | set(NO_CASE)) - names)}"
    )
    assert not set(CASES) & set(NO_CASE)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _params(name: str) -> list[tuple[str, Case, str]]:
    return [(name, CASES[name], t) for t in CASES[name].tracers]


ALL = [p for name in sorted(CASES) for p in _params(name)]


@pytest.mark.parametrize(("name", "case", "tracer"), ALL, ids=[f"{n}-{t}" for n, _, t in ALL])
def test_pass_contract(name: str, case: Case, tracer: str) -> None:
    torch.manual_seed(0)
    model = case.build().eval()
    inputs = case.inputs()
    before = _state(model)
    pass_ = REGISTRY.create(case.spec)  # exactness may depend on the options (swap-norm)
    assert pass_.name == name

    gm = trace(copy.deepcopy(model), inputs, tracer).graph_module
    ctx = PassContext(example_inputs=inputs, reference=model, seed=0)
    result = pass_(gm, ctx)
    result.graph_module.graph.lint()
    assert result.modified and result.changes, f"{name} changed nothing on its canonical model"

    got = run(result.graph_module, *inputs)
    if pass_.exact:
        assert rel_err(fp64_reference(model, *inputs), got) <= 1e-5
    else:
        assert rel_err(run(model, *inputs), got) < float("inf")

    # a second run: nothing left to do (or, for a re-measuring pass, the same values again)
    again = REGISTRY.create(case.spec)(
        result.graph_module, PassContext(example_inputs=inputs, reference=model, seed=0)
    )
    again.graph_module.graph.lint()
    if case.remeasures:
        assert rel_err(got, run(again.graph_module, *inputs)) <= 1e-6
    else:
        assert not again.modified and not again.changes, (
            f"{name} is not idempotent: {again.changes[:3]}"
        )

    # the user's model is never touched
    after = _state(model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("name", sorted(CASES))
def test_pass_contract_through_convert_and_onnx(name: str, tmp_path: Path) -> None:
    case = CASES[name]
    torch.manual_seed(0)
    model = case.build().eval()
    inputs = case.inputs()
    before = _state(model)
    exact = REGISTRY.create(case.spec).exact

    result, onnx_err = onnx_parity(model, [case.spec], inputs, tmp_path / "m.onnx", tracer="export")
    assert onnx_err <= 1e-4, f"{name}: ONNX differs from the rewritten graph by {onnx_err:.3g}"
    assert all(torch.equal(before[k], v) for k, v in _state(model).items())

    report = result.report
    ran = {p.name: p for p in report.passes}
    assert name in ran and ran[name].exact is exact and ran[name].modified and ran[name].changes
    assert report.verify is not None
    if exact:
        assert report.verify.passed is True and report.verify.max_rel_err <= 1e-4
    else:
        assert report.verify.passed is None and report.verify.exact is False
    out = report.to_json()
    assert (
        out["outputs"][0]["format"] == "onnx" and out["outputs"][0]["onnx_max_rel_err"] is not None
    )


def test_convert_options_object_and_keyword_overrides(tmp_path: Path) -> None:
    """normrewrite.convert takes one ConvertOptions; keywords override its fields; an unknown
    keyword is a TypeError naming it; passes come from the options unless given."""
    import normrewrite

    model, inputs = ConvBN().eval(), _images()
    opts = normrewrite.ConvertOptions(passes=("swap-norm:from=batchnorm,to=frozen",), verify=False)
    r = normrewrite.convert(model, example_inputs=inputs, options=opts)
    assert [p.name for p in r.report.passes] == ["swap-norm"] and r.report.verify is None
    r = normrewrite.convert(model, ["fold-bn"], inputs, options=opts, verify=True)
    assert [p.name for p in r.report.passes] == ["fold-bn"] and r.report.verify.passed
    with pytest.raises(TypeError, match="'no_such_setting'"):
        normrewrite.convert(model, example_inputs=inputs, no_such_setting=1)
