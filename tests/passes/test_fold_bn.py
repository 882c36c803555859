"""fold-bn: every pattern it must fold, every case it must leave, on both graph flavours.

Each fold case checks the graph after the pass (no BatchNorm left, exact compute-node count, the
layer the report names), parity against an fp64 run of the original (fp32: ≤ 1e-5 relative per
block), idempotence, and — once per flavour, for all blocks together — onnxruntime parity with its
graph optimizations disabled. Every model goes through ``randomize_norms``: default BN statistics
make folding an identity and hide bugs.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from harness import rel_err
from hypothesis import given, settings
from hypothesis import strategies as st
from models import randomize_norms
from torch import nn
from torch.fx import GraphModule

import normrewrite
from normrewrite.core.graph import count_ops, get_tensor
from normrewrite.core.ops import NormInfo, norms
from normrewrite.core.pass_infra import PassContext
from normrewrite.passes import FoldBatchNorm
from normrewrite.passes.fold_bn import bn_affine, fold_input, fold_output
from normrewrite.passes.fold_bn.conditions import bad_statistics
from normrewrite.trace import trace

TRACERS = ("fx", "export")
BLOCK_RTOL = 1e-5  # fp32, relative to max |y|, per block
NET_RTOL = 1e-4  # fp32, per network

# --------------------------------------------------------------------------- helpers




def fp64_reference(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    m64 = copy.deepcopy(model).double()
    with torch.no_grad():
        return m64(*(x.double() if x.is_floating_point() else x for x in inputs))


def batchnorms(gm: GraphModule) -> list[NormInfo]:
    return [n for n in norms(gm) if n.kind == "batchnorm"]


def nodes_per_bn(info: NormInfo) -> int:
    """Compute nodes one BatchNorm occupies: 1, or 2 for an ATen op + getitem."""
    return 1 if info.op_node is None or info.op_node is info.node else 2


def run(gm: nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    with torch.no_grad():
        return gm(*inputs)


def bn(num: int, dim: int = 2, **kw: Any) -> nn.Module:
    return {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dim](num, **kw)


def conv(dim: int, cin: int, cout: int, k: int = 3, **kw: Any) -> nn.Module:
    return {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dim](cin, cout, k, **kw)


def tconv(dim: int, cin: int, cout: int, k: int = 3, **kw: Any) -> nn.Module:
    return {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[dim](
        cin, cout, k, **kw
    )


SPATIAL = {1: (9,), 2: (7, 7), 3: (5, 5, 5)}


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[], nn.Module]
    shape: tuple[int, ...]
    folded: int  # BatchNorms the pass must fold
    into: tuple[str, ...] = ()  # labels of the layers they fold into, in order
    rtol: float = BLOCK_RTOL
    notes: dict[str, Any] = field(default_factory=dict)

    def model(self) -> nn.Module:
        torch.manual_seed(0)
        return randomize_norms(self.build(), seed=1).eval()

    def inputs(self) -> tuple[torch.Tensor, ...]:
        return (torch.randn(self.shape, generator=torch.Generator().manual_seed(2)),)


def _seq(*mods: nn.Module) -> Callable[[], nn.Module]:
    return lambda: nn.Sequential(*copy.deepcopy(mods))


# ---- output side: conv → BN

CONV_VARIANTS: dict[str, dict[str, Any]] = {
    "nobias": dict(bias=False),
    "bias-zeros-pad": dict(padding=1),
    "reflect-stride2": dict(padding=1, padding_mode="reflect", stride=2),
    "circular-dilation2": dict(padding=2, padding_mode="circular", dilation=2, bias=False),
    "replicate-same": dict(padding="same", padding_mode="replicate"),
    "groups2": dict(groups=2, padding=1),
}


def _conv_bn(dim: int, variant: str) -> Callable[[], nn.Module]:
    kw = CONV_VARIANTS[variant]

    def build() -> nn.Module:
        return nn.Sequential(conv(dim, 4, 6, **kw), bn(6, dim))

    return build


def _depthwise(dim: int, bias: bool) -> Callable[[], nn.Module]:
    return lambda: nn.Sequential(conv(dim, 4, 8, groups=4, padding=1, bias=bias), bn(8, dim))


CONV_CASES = [
    Case(f"conv{d}d-{v}", _conv_bn(d, v), (2, 4, *SPATIAL[d]), 1, ("0",))
    for d in (1, 2, 3)
    for v in CONV_VARIANTS
] + [
    Case(
        f"conv{d}d-depthwise-{'bias' if b else 'nobias'}",
        _depthwise(d, b),
        (2, 4, *SPATIAL[d]),
        1,
        ("0",),
    )
    for d in (1, 2, 3)
    for b in (False, True)
]


# ---- output side: conv-transpose → BN, C_in = 8 ≠ C_out = 16


def _tconv_bn(dim: int, groups: int, bias: bool, stride: int) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        extra = dict(stride=stride, output_padding=1) if stride > 1 else dict(padding=1)
        return nn.Sequential(tconv(dim, 8, 16, groups=groups, bias=bias, **extra), bn(16, dim))

    return build


TCONV_CASES = [
    Case(
        f"convT{d}d-g{g}-{'bias' if g % 2 else 'nobias'}-s{1 + (g == 2)}",
        _tconv_bn(d, g, bias=bool(g % 2), stride=1 + (g == 2)),
        (2, 8, *SPATIAL[d]),
        1,
        ("0",),
    )
    for d in (1, 2, 3)
    for g in (1, 2, 4, 8)
]


# ---- BN statistics and affine variants, Linear → BN1d


def _bn_variant(**bn_kw: Any) -> Callable[[], nn.Module]:
    return lambda: nn.Sequential(nn.Conv2d(4, 6, 3, bias=True), nn.BatchNorm2d(6, **bn_kw))


class StatsCase(Case):
    def model(self) -> nn.Module:
        m = super().model()
        with torch.no_grad():
            for mod in m.modules():
                if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                    for name, fn in self.notes.items():
                        getattr(mod, name).copy_(fn(mod.num_features))
        return m


def _neg(n: int) -> torch.Tensor:
    return -(torch.rand(n, generator=torch.Generator().manual_seed(3)) + 0.5)


STAT_CASES = [
    Case("bn-affine-false", _bn_variant(affine=False), (2, 4, 7, 7), 1, ("0",)),
    Case("bn-eps-1e-1", _bn_variant(eps=0.1), (2, 4, 7, 7), 1, ("0",)),
    Case("bn-eps-1e-3", _bn_variant(eps=1e-3), (2, 4, 7, 7), 1, ("0",)),
    StatsCase("bn-negative-gamma", _bn_variant(), (2, 4, 7, 7), 1, ("0",), notes={"weight": _neg}),
    StatsCase(
        "bn-tiny-variance",
        _bn_variant(eps=1e-10),
        (2, 4, 7, 7),
        1,
        ("0",),
        notes={"running_var": lambda n: torch.full((n,), 1e-7)},
    ),
    Case("linear-bn1d", _seq(nn.Linear(5, 7), nn.BatchNorm1d(7)), (3, 5), 1, ("0",)),
    Case(
        "linear-nobias-bn1d",
        _seq(nn.Linear(5, 7, bias=False), nn.BatchNorm1d(7)),
        (3, 5),
        1,
        ("0",),
    ),
]


# ---- input side: BN → layer


class BNFlattenLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 3 * 3, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.bn(x), 1))


INPUT_CASES = [
    Case("bn1d-linear", _seq(nn.BatchNorm1d(5), nn.Linear(5, 7)), (3, 5), 1, ("1",)),
    Case(
        "bn1d-linear-nobias",
        _seq(nn.BatchNorm1d(5), nn.Linear(5, 7, bias=False)),
        (3, 5),
        1,
        ("1",),
    ),
    Case("bn2d-flatten-linear", BNFlattenLinear, (2, 4, 3, 3), 1, ("fc",)),
    Case(
        "bn2d-Flatten-linear",
        _seq(nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(36, 5)),
        (2, 4, 3, 3),
        1,
        ("2",),
    ),
    Case(
        "bn2d-conv-pad0-stride2-groups2",
        _seq(nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, stride=2, groups=2)),
        (2, 4, 7, 7),
        1,
        ("1",),
    ),
    Case(
        "bn1d-conv1d-pad0-nobias",
        _seq(nn.BatchNorm1d(4), nn.Conv1d(4, 6, 3, bias=False)),
        (2, 4, 9),
        1,
        ("1",),
    ),
    Case(
        "bn3d-conv3d-pad0", _seq(nn.BatchNorm3d(4), nn.Conv3d(4, 6, 2)), (2, 4, 5, 5, 5), 1, ("1",)
    ),
    Case(
        "bn2d-conv-reflect",
        _seq(nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect")),
        (2, 4, 7, 7),
        1,
        ("1",),
    ),
    Case(
        "bn2d-conv-circular",
        _seq(nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, padding=1, padding_mode="circular")),
        (2, 4, 7, 7),
        1,
        ("1",),
    ),
]


class Functional(nn.Module):
    """The third graph form: F.conv2d / F.batch_norm / F.linear on plain parameters and buffers
    (symbolic_trace gives call_function + get_attr nodes)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(4)
        self.w = nn.Parameter(torch.randn(6, 4, 3, 3, generator=g) * 0.3)
        self.b = nn.Parameter(torch.randn(6, generator=g))
        self.gamma = nn.Parameter(torch.randn(6, generator=g))
        self.beta = nn.Parameter(torch.randn(6, generator=g))
        self.register_buffer("mean", torch.randn(6, generator=g))
        self.register_buffer("var", torch.rand(6, generator=g) + 0.1)
        self.fc = nn.Parameter(torch.randn(5, 6, generator=g))
        self.register_buffer("mean2", torch.randn(6, generator=g))
        self.register_buffer("var2", torch.rand(6, generator=g) + 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        F = torch.nn.functional
        y = F.conv2d(x, self.w, self.b, padding=1)
        y = F.batch_norm(y, self.mean, self.var, self.gamma, self.beta, False, 0.1, 1e-3)
        return F.linear(F.batch_norm(y.mean((2, 3)), self.mean2, self.var2), self.fc)


FOLD_CASES = (
    CONV_CASES
    + TCONV_CASES
    + STAT_CASES
    + INPUT_CASES
    + [Case("functional-conv-bn-bn-linear", Functional, (2, 4, 7, 7), 2, ("conv2d", "linear"))]
)


# --------------------------------------------------------------------------- fold cases


def _fold(
    case: Case, tracer: str
) -> tuple[nn.Module, tuple[torch.Tensor, ...], GraphModule, Any, int]:
    model, inputs = case.model(), case.inputs()
    gm = trace(model, inputs, tracer).graph_module
    before = batchnorms(gm)
    removed = sum(nodes_per_bn(b) for b in before[: case.folded])
    expected_nodes = count_ops(gm) - removed
    result = FoldBatchNorm()(gm)
    assert count_ops(gm) == expected_nodes, gm.code
    return model, inputs, gm, result, len(before)


@pytest.mark.parametrize("tracer", TRACERS)
@pytest.mark.parametrize("case", FOLD_CASES, ids=lambda c: c.id)
def test_fold(case: Case, tracer: str) -> None:
    model, inputs, gm, result, n_bn = _fold(case, tracer)
    pristine = case.model().state_dict()
    # structure: the BN is gone, folded into the layer the report names
    assert result.modified
    assert [c.target for c in result.changes] != []
    assert len(result.changes) == case.folded and not result.skipped, (
        result.changes,
        result.skipped,
    )
    assert (
        batchnorms(gm) == [] if n_bn == case.folded else len(batchnorms(gm)) == n_bn - case.folded
    )
    for change, layer in zip(result.changes, case.into, strict=True):
        assert change.detail.startswith(f"folded into {layer} "), change
    gm.graph.lint()
    # parity against an fp64 run of the original
    ref = fp64_reference(model, inputs)
    assert rel_err(ref, run(model, inputs)) <= case.rtol  # the measure itself is sane
    err = rel_err(ref, run(gm, inputs))
    assert err <= case.rtol, f"{case.id}/{tracer}: rel err {err:.3g}"
    for k, v in model.state_dict().items():  # the original model is untouched
        assert torch.equal(v, pristine[k]), k
    # idempotence: a second run finds nothing and changes nothing
    code = gm.code
    again = FoldBatchNorm()(gm)
    assert not again.modified and again.changes == [] and gm.code == code


# --------------------------------------------------------------------------- pure math (property)


@settings(max_examples=30, deadline=None)
@given(
    dim=st.integers(1, 2),
    groups=st.sampled_from([1, 2, 3]),
    cin_g=st.integers(1, 3),
    cout_g=st.integers(1, 3),
    stride=st.integers(1, 2),
    seed=st.integers(0, 2**16),
)
def test_fold_output_transposed_matches_functional(
    dim: int, groups: int, cin_g: int, cout_g: int, stride: int, seed: int
) -> None:
    """fold_output on a grouped ConvTranspose equals conv_transpose followed by the affine map."""
    g = torch.Generator().manual_seed(seed)
    cin, cout = groups * cin_g, groups * cout_g
    w = torch.randn(cin, cout_g, *(2,) * dim, generator=g, dtype=torch.float64)
    b = torch.randn(cout, generator=g, dtype=torch.float64)
    mean, var = (
        torch.randn(cout, generator=g, dtype=torch.float64),
        torch.rand(cout, generator=g, dtype=torch.float64) + 0.1,
    )
    gamma, beta = (
        torch.randn(cout, generator=g, dtype=torch.float64),
        torch.randn(cout, generator=g, dtype=torch.float64),
    )
    x = torch.randn(2, cin, *(4,) * dim, generator=g, dtype=torch.float64)
    fn = torch.nn.functional.conv_transpose1d if dim == 1 else torch.nn.functional.conv_transpose2d
    s, t = bn_affine(mean, var, gamma, beta, 1e-5)
    shape = (1, -1) + (1,) * dim
    expected = fn(x, w, b, stride=stride, groups=groups) * s.reshape(shape) + t.reshape(shape)
    w2, b2 = fold_output(w, b, s, t, transposed=True, groups=groups)
    torch.testing.assert_close(
        fn(x, w2, b2, stride=stride, groups=groups), expected, rtol=1e-12, atol=1e-12
    )


@settings(max_examples=30, deadline=None)
@given(groups=st.sampled_from([1, 2, 4]), cout_g=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_fold_input_grouped_conv_matches_functional(groups: int, cout_g: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    cin, cout = 4, groups * cout_g
    w = torch.randn(cout, cin // groups, 3, 3, generator=g, dtype=torch.float64)
    s, t = (
        torch.randn(cin, generator=g, dtype=torch.float64),
        torch.randn(cin, generator=g, dtype=torch.float64),
    )
    x = torch.randn(2, cin, 6, 6, generator=g, dtype=torch.float64)
    conv2d = torch.nn.functional.conv2d
    expected = conv2d(x * s.reshape(1, -1, 1, 1) + t.reshape(1, -1, 1, 1), w, None, groups=groups)
    w2, b2 = fold_input(w, None, s, t, groups=groups)
    torch.testing.assert_close(conv2d(x, w2, b2, groups=groups), expected, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- must not fold


class TwoUsers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


class SharedConv(nn.Module):
    """One conv module called at two sites; only the first feeds a BN."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) + self.conv(x * 2)


class TiedConv(nn.Module):
    """Two conv modules with one weight tensor; only the first feeds a BN."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.b = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.b.weight = self.a.weight
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.a(x)) - self.b(x)


class LinearSeq(nn.Module):
    """Linear over (N, L, F) then BatchNorm1d(L), with L == F: the BN axis is L."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x))


class SeqLinear(nn.Module):
    """BatchNorm1d(L) on (N, L, F) then Linear(F, …): the BN axis is not the Linear's input."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(x))


class BNReluConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.conv = nn.Conv2d(4, 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.relu(self.bn(x)))


@dataclass(frozen=True)
class Negative:
    id: str
    build: Callable[[], nn.Module]
    shape: tuple[int, ...]
    reason: str  # substring of the skip reason
    label: str = "bn"


NEGATIVES = [
    Negative(
        "no-running-stats",
        _seq(nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6, track_running_stats=False)),
        (2, 4, 7, 7),
        "track_running_stats=False",
        "1",
    ),
    Negative("conv-output-two-users", TwoUsers, (2, 4, 7, 7), "has 2 users"),
    Negative("conv-called-twice", SharedConv, (2, 4, 7, 7), "fold-bn:shared=clone"),
    Negative("tied-weights", TiedConv, (2, 4, 7, 7), "fold-bn:shared=clone"),
    Negative("linear-NLF-bn1d-L", LinearSeq, (2, 6, 6), "not the output features"),
    Negative("bn1d-L-linear-NLF", SeqLinear, (2, 6, 6), "not the input features"),
    Negative("bn-relu-conv", BNReluConv, (2, 4, 7, 7), "no conv/linear directly before or after"),
    Negative(
        "bn-zero-padded-conv",
        _seq(nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, padding=1)),
        (2, 4, 7, 7),
        "zero-padded conv",
        "0",
    ),
    Negative(
        "bn-conv-transpose",
        _seq(nn.BatchNorm2d(4), nn.ConvTranspose2d(4, 6, 3)),
        (2, 4, 7, 7),
        "ConvTranspose",
        "0",
    ),
]


def _bn_state(gm: GraphModule, info: NormInfo) -> dict[str, torch.Tensor]:
    names = [info.weight, info.bias, info.running_mean, info.running_var]
    return {n: get_tensor(gm, n).clone() for n in names if n is not None}


@pytest.mark.parametrize("tracer", TRACERS)
@pytest.mark.parametrize("neg", NEGATIVES, ids=lambda n: n.id)
def test_must_not_fold(neg: Negative, tracer: str) -> None:
    torch.manual_seed(0)
    model = randomize_norms(neg.build(), seed=1).eval()
    x = torch.randn(neg.shape, generator=torch.Generator().manual_seed(2))
    gm = trace(model, (x,), tracer).graph_module
    [before] = batchnorms(gm)
    state, code, nodes = _bn_state(gm, before), gm.code, count_ops(gm)
    result = FoldBatchNorm()(gm)
    assert not result.modified and result.changes == []
    [skip] = result.skipped
    assert skip.target == neg.label and neg.reason in skip.reason, skip
    # what remains of the BN is intact: same node, same args, same tensors, same program
    [after] = batchnorms(gm)
    assert after.node is before.node and after.op_node is before.op_node
    assert gm.code == code and count_ops(gm) == nodes
    for name, t in _bn_state(gm, after).items():
        assert torch.equal(t, state[name]), name
    assert rel_err(fp64_reference(model, (x,)), run(gm, (x,))) <= BLOCK_RTOL


@pytest.mark.parametrize("tracer", TRACERS)
@pytest.mark.parametrize("build", [SharedConv, TiedConv], ids=["called-twice", "tied"])
def test_shared_clone_folds_a_copy(build: Callable[[], nn.Module], tracer: str) -> None:
    torch.manual_seed(0)
    model = randomize_norms(build(), seed=1).eval()
    x = torch.randn(2, 4, 7, 7)
    gm = trace(model, (x,), tracer).graph_module
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    result = FoldBatchNorm(shared="clone")(gm)
    assert result.modified and len(result.changes) == 1 and not result.skipped
    assert "weights cloned" in result.changes[0].detail
    assert batchnorms(gm) == []
    assert rel_err(fp64_reference(model, (x,)), run(gm, (x,))) <= BLOCK_RTOL
    # the other user still reads the original, unscaled weight; the original model is untouched
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    assert not FoldBatchNorm(shared="clone")(gm).modified
    assert FoldBatchNorm.from_strings({"shared": "clone"}).options.shared == "clone"


@pytest.mark.parametrize("tracer", TRACERS)
def test_training_mode_bn_is_refused(tracer: str) -> None:
    torch.manual_seed(0)
    model = randomize_norms(nn.Sequential(nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6)), seed=1).train()
    x = torch.randn(2, 4, 7, 7)
    gm = trace(model, (x,), tracer).graph_module
    result = FoldBatchNorm()(gm)
    assert not result.modified
    [skip] = result.skipped
    assert "training mode" in skip.reason
    assert len(batchnorms(gm)) == 1


BAD_STATISTICS = {
    "negative-var": ("running_var", -0.5, "running_var has 1 negative values"),
    "nan-var": ("running_var", float("nan"), "running_var has 1 non-finite values"),
    "nan-mean": ("running_mean", float("nan"), "running_mean has 1 non-finite values"),
    "inf-mean": ("running_mean", float("inf"), "running_mean has 1 non-finite values"),
    "inf-gamma": ("weight", float("inf"), "γ has 1 non-finite values"),
    "nan-beta": ("bias", float("nan"), "β has 1 non-finite values"),
}


@pytest.mark.parametrize("tracer", TRACERS)
@pytest.mark.parametrize("case", BAD_STATISTICS, ids=list(BAD_STATISTICS))
def test_invalid_statistics_are_refused(case: str, tracer: str) -> None:
    """A BN whose statistics are not a real affine map (issue 10 item 6) is skipped with the
    reason: folding it would write NaN/inf weights."""
    tensor, value, reason = BAD_STATISTICS[case]
    torch.manual_seed(0)
    model = randomize_norms(nn.Sequential(nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6)), seed=1).eval()
    with torch.no_grad():
        getattr(model[1], tensor)[2] = value
    x = torch.randn(2, 4, 7, 7)
    gm = trace(model, (x,), tracer).graph_module
    weight = get_tensor(gm, "0.weight").clone()
    code = gm.code
    result = FoldBatchNorm()(gm)
    assert not result.modified and result.changes == []
    [skip] = result.skipped
    assert skip.target == "1" and reason in skip.reason and "NaN/inf weights" in skip.reason, skip
    assert gm.code == code and len(batchnorms(gm)) == 1
    assert torch.equal(get_tensor(gm, "0.weight"), weight)
    explained = FoldBatchNorm().explain(gm, PassContext())
    assert any(t.startswith("not foldable: ") and reason in t for t in explained.values()), explained


def test_statistics_on_meta_are_not_judged() -> None:
    """On ``meta`` tensors (the --meta path) the values are unknown: the check passes."""
    meta = torch.full((3,), -1.0, device="meta")
    assert bad_statistics(meta, meta, meta, meta) is None
    real = torch.tensor([1.0, -1.0, 2.0])
    assert bad_statistics(torch.zeros(3), real) == (
        "running_var has 1 negative values: not a valid BatchNorm, folding would write NaN/inf weights"
    )
    assert bad_statistics(torch.zeros(3), torch.ones(3), torch.ones(3), None) is None
    assert bad_statistics(torch.zeros(3), torch.zeros(3)) is None  # var = 0 is valid (ε > 0)


def test_convert_switches_training_model_to_eval_with_a_note() -> None:
    torch.manual_seed(0)
    model = randomize_norms(nn.Sequential(nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6)), seed=1).train()
    x = torch.randn(2, 4, 7, 7)
    result = normrewrite.convert(model, ["fold-bn"], (x,))
    assert any("training mode" in n and "1" in n for n in result.report.notes), result.report.notes
    assert result.report.passes[0].changes and batchnorms(result.graph_module) == []
    assert not model.training  # switched, as the note says
    # keep_training: traced as is, and the pass refuses
    model.train()
    kept = normrewrite.convert(model, ["fold-bn"], (x,), keep_training=True, verify=False)
    assert not any("training mode" in n for n in kept.report.notes)
    [skip] = kept.report.passes[0].skipped
    assert "training mode" in skip.reason
    assert len(batchnorms(kept.graph_module)) == 1


# --------------------------------------------------------------------------- low precision


class LowPrecision(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 16)
        self.bn1 = nn.BatchNorm1d(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x)).mean((2, 3))
        return self.bn1(self.fc(y))


class MixedHuge(nn.Module):
    """fp16 conv, fp32 BN with running_var above the fp16 maximum (65504)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 16, 3, padding=1).half()
        self.bn = nn.BatchNorm2d(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


@pytest.mark.parametrize("tracer", TRACERS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_error_within_twice_unfolded(dtype: torch.dtype, tracer: str) -> None:
    torch.manual_seed(0)
    model32 = randomize_norms(LowPrecision(), seed=1).eval()
    x32 = torch.randn(4, 8, 6, 6)
    ref = fp64_reference(model32, (x32,))
    model = copy.deepcopy(model32).to(dtype)
    x = x32.to(dtype)
    gm = trace(model, (x,), tracer).graph_module
    result = FoldBatchNorm()(gm)
    assert len(result.changes) == 2 and batchnorms(gm) == []
    assert get_tensor(gm, "conv.weight").dtype == dtype
    unfolded, folded = rel_err(ref, run(model, (x,))), rel_err(ref, run(gm, (x,)))
    assert folded <= 2 * unfolded, (folded, unfolded)


@pytest.mark.parametrize("tracer", TRACERS)
def test_fp16_conv_with_running_var_beyond_fp16_range(tracer: str) -> None:
    torch.manual_seed(0)
    model = MixedHuge().eval()
    with torch.no_grad():
        model.bn.running_var.uniform_(7e4, 2e5)  # inf if computed in fp16
        model.bn.running_mean.normal_(0, 50)
        model.bn.weight.normal_(1, 0.5)
    x = torch.randn(2, 8, 6, 6).half()
    gm = trace(model, (x,), tracer).graph_module
    result = FoldBatchNorm()(gm)
    assert result.modified and batchnorms(gm) == []
    w = get_tensor(gm, "conv.weight")
    assert w.dtype == torch.float16 and torch.isfinite(w).all()
    m64 = copy.deepcopy(model).double()
    with torch.no_grad():
        ref = m64(x.double())
    unfolded, folded = rel_err(ref, run(model, (x,))), rel_err(ref, run(gm, (x,)))
    assert torch.isfinite(run(gm, (x,))).all()
    assert folded <= 2 * unfolded, (folded, unfolded)


# --------------------------------------------------------------------------- a network, onnxruntime


def zoo(cases: list[Case]) -> nn.Module:
    """Every fold pattern side by side: one positional input and one output per block (a fixed
    signature, so symbolic_trace can trace it too)."""
    n = len(cases)
    args = ", ".join(f"x{i}" for i in range(n))
    body = ", ".join(f"self.blocks[{i}](x{i})" for i in range(n))
    namespace: dict[str, Any] = {}
    exec(f"def forward(self, {args}):\n    return ({body},)", namespace)

    def init(self: nn.Module) -> None:
        nn.Module.__init__(self)
        self.blocks = nn.ModuleList(c.model() for c in cases)

    cls = type("Zoo", (nn.Module,), {"__init__": init, "forward": namespace["forward"]})
    return cls()


@pytest.mark.parametrize("tracer", TRACERS)
def test_every_pattern_onnxruntime_parity(tracer: str, tmp_path: Any) -> None:
    import onnx
    from onnx_helpers import onnx_outputs

    cases = [c for c in FOLD_CASES if not c.id.startswith("conv3d") and "3d" not in c.id]
    model = zoo(cases).eval()
    inputs = tuple(c.inputs()[0] for c in cases)
    gm = trace(model, inputs, tracer).graph_module
    result = FoldBatchNorm()(gm)
    assert len(result.changes) == sum(c.folded for c in cases) and batchnorms(gm) == []
    path = tmp_path / "zoo.onnx"
    outs = onnx_outputs(gm, inputs, path)  # ORT optimizations off: no fusions to mask a bug
    onnx.checker.check_model(str(path), full_check=True)
    refs = fp64_reference(model, inputs)
    assert len(outs) == len(cases)
    for case, ref, out in zip(cases, refs, outs, strict=True):
        err = rel_err(ref, torch.from_numpy(out))
        assert err <= BLOCK_RTOL, f"{case.id}: onnxruntime rel err {err:.3g}"


# --------------------------------------------------------------------------- real model code


def test_hf_resnet_network_parity_both_passes_callable() -> None:
    """A small HF ResNet (export graph): every BN folds, network parity ≤ 1e-4."""
    from models import pixels, resnet

    model, x = resnet(depths=(1, 1), hidden=(8, 16)), pixels(size=32)
    gm = trace(model, (x,), "export").graph_module
    n_bn = len(batchnorms(gm))
    result = FoldBatchNorm()(gm, PassContext(example_inputs=(x,)))
    assert len(result.changes) == n_bn > 0 and not result.skipped
    assert batchnorms(gm) == []
    ref = fp64_reference(model, (x,))
    assert rel_err(ref.last_hidden_state, run(gm, (x,))[0]) <= NET_RTOL


def test_explain_names_the_target_layer() -> None:
    model = randomize_norms(
        _seq(nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.BatchNorm2d(6))()
    ).eval()
    gm = trace(model, (torch.randn(1, 4, 7, 7),), "fx").graph_module
    text = FoldBatchNorm().explain(gm, PassContext())
    assert text["_1"] == "foldable into 0 (output side)"
    assert text["_3"].startswith("not foldable: no conv/linear directly before or after")
