"""Expected programs: for the canonical case of every pass (tests/test_contract.py), the rewritten
graph must be the program a person would write by hand for the result — traced with the same tracer
and compared op by op (in the spirit of PyTorch's test/fx/test_subgraph_rewriter.py). Numeric
parity of the same rewrites is the contract test's job; this one pins the structure."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from test_contract import CASES, Blocks, ConvBN
from torch import nn
from torch.fx import GraphModule

from normrewrite.core.pass_infra import PassContext
from normrewrite.passes import REGISTRY
from normrewrite.trace import trace


def program(gm: GraphModule) -> list[str]:
    """The ops a graph computes, in order: module types for call_module, the function / ATen
    overload otherwise (inputs, outputs, stored tensors and export's guard module left out)."""
    ops = []
    for n in gm.graph.nodes:
        if n.op in ("placeholder", "output", "get_attr"):
            continue
        if n.op == "call_module":
            kind = type(gm.get_submodule(str(n.target))).__name__
            if kind != "GuardsFn":
                ops.append(kind)
        elif n.op == "call_method":
            ops.append(str(n.target))
        else:
            ops.append(str(n.target) if hasattr(n.target, "_schema") else n.target.__name__)
    return ops


# ----------------------------------------------------------------- the programs, written by hand


class FoldedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)))


class FusedRMSNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight, self.out = nn.Parameter(torch.ones(16)), nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.rms_norm(x, (16,), self.weight, 1e-6))


class AffineFreeNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm, self.out = nn.LayerNorm(16, elementwise_affine=False), nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(x))


class RMSBlocks(nn.Module):
    """Pre-norm blocks whose norms are RMSNorms; the final norm keeps its β as an add."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(16, 16)
        self.w = nn.ParameterList(nn.Parameter(torch.ones(16)) for _ in range(3))
        self.up = nn.ModuleList(nn.Linear(16, 32) for _ in range(2))
        self.down = nn.ModuleList(nn.Linear(32, 16) for _ in range(2))
        self.beta = nn.Parameter(torch.zeros(16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for i in range(2):
            h = h + self.down[i](torch.relu(self.up[i](F.rms_norm(h, (16,), self.w[i], 1e-5))))
        return F.rms_norm(h, (16,), self.w[2], 1e-5) + self.beta


class FrozenBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)
        self.register_buffer("scale", torch.ones(8, 1, 1))
        self.register_buffer("shift", torch.zeros(8, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x) * self.scale + self.shift))


class PlainConv1d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 6, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv(x))


class WeightNormed(nn.Module):
    """Each conv weight computed as v / ‖v‖ · g in the graph; the BatchNorm stays."""

    def __init__(self) -> None:
        super().__init__()
        self.v1, self.g1 = (
            nn.Parameter(torch.randn(8, 3, 3, 3)),
            nn.Parameter(torch.ones(8, 1, 1, 1)),
        )
        self.v2, self.g2 = (
            nn.Parameter(torch.randn(4, 8, 1, 1)),
            nn.Parameter(torch.ones(4, 1, 1, 1)),
        )
        self.b1, self.b2 = nn.Parameter(torch.zeros(8)), nn.Parameter(torch.zeros(4))
        self.bn = nn.BatchNorm2d(8)

    @staticmethod
    def weight(v: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return g * (v / torch.linalg.vector_norm(v, dim=(1, 2, 3), keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.conv2d(x, self.weight(self.v1, self.g1), self.b1, padding=1)
        return F.conv2d(torch.relu(self.bn(h)), self.weight(self.v2, self.g2), self.b2)


class Contiguous(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.clone(self.lin(x).transpose(1, 2), memory_format=torch.contiguous_format)
        return y.view(x.shape[0], -1)


EXPECTED: dict[str, type[nn.Module] | object] = {
    "fold-bn": FoldedConv,
    "fuse-norm": FusedRMSNorm,
    "fold-norm-affine": AffineFreeNorm,
    "ln-to-rmsnorm": RMSBlocks,
    "swap-norm": FrozenBN,
    "remove-weight-norm": PlainConv1d,
    "apply-weight-norm": WeightNormed,
    "post-to-pre": lambda: Blocks("pre"),  # norms at the branch starts, one final norm
    "pre-to-post": lambda: Blocks("post"),  # norms on the sums, no final norm
    "recalibrate-bn": ConvBN,  # statistics change, the program does not
    "fix-export": Contiguous,
}


def test_every_contract_case_has_an_expected_program() -> None:
    assert set(EXPECTED) == set(CASES)


CASES_BY_TRACER = [(name, t) for name in sorted(CASES) for t in CASES[name].tracers]


@pytest.mark.parametrize(
    ("name", "tracer"), CASES_BY_TRACER, ids=[f"{n}-{t}" for n, t in CASES_BY_TRACER]
)
def test_rewritten_graph_is_the_expected_program(name: str, tracer: str) -> None:
    case = CASES[name]
    torch.manual_seed(0)
    model, inputs = case.build().eval(), case.inputs()
    gm = trace(copy.deepcopy(model), inputs, tracer).graph_module
    result = REGISTRY.create(case.spec)(gm, PassContext(example_inputs=inputs, reference=model))
    result.graph_module.graph.lint()

    expected = EXPECTED[name]().eval()  # type: ignore[operator]
    want = program(trace(expected, inputs, tracer).graph_module)
    assert program(result.graph_module) == want
