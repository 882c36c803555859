"""Pass infrastructure: options from strings, the pre/post-condition protocol, the manager, the
tensor-recipe log (replayable on real weights after a pass ran on ``meta`` tensors), and the
library API (``normrewrite.convert``; every pass callable on a GraphModule)."""

from __future__ import annotations

import copy
import enum
from dataclasses import dataclass
from typing import Literal

import pytest
import torch
from harness import run
from models import randomize_norms
from torch import nn
from torch.fx import GraphModule

import normrewrite
from normrewrite.core.graph import get_tensor
from normrewrite.core.pass_help import attribute_docs, pass_help
from normrewrite.core.pass_infra import (
    Change,
    NoOptions,
    Pass,
    PassContext,
    PassManager,
    PassResult,
    Skip,
    compute_tensors,
    parse_pass_spec,
)
from normrewrite.core.rewrite import Rewrite, Sweep, explain_each, rewrite_each
from normrewrite.errors import PassError, UsageError
from normrewrite.passes import FoldBatchNorm
from normrewrite.trace import trace

# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class _Opts:
    count: int = 1
    scale: float = 1.0
    enabled: bool = True
    mode: Literal["a", "b"] = "a"
    limit: int | None = None


class _OptPass(Pass):
    name = "opt-pass"
    summary = "test pass with typed options"
    Options = _Opts

    def call(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        return PassResult(gm, False)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("fold-bn", ("fold-bn", {})),
        ("fold-bn:", ("fold-bn", {})),
        ("x:a=1,b=two", ("x", {"a": "1", "b": "two"})),
        (" x : a = 1 , b=2 ", ("x", {"a": "1", "b": "2"})),
    ],
)
def test_parse_pass_spec(spec: str, expected: tuple[str, dict[str, str]]) -> None:
    assert parse_pass_spec(spec) == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [(":a=1", "empty pass name"), ("x:a", "is not key=value"), ("x:=1", "is not key=value")],
)
def test_parse_pass_spec_errors(spec: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_pass_spec(spec)


def test_options_are_converted_to_their_declared_types() -> None:
    p = _OptPass.from_strings(
        {"count": "3", "scale": "0.5", "enabled": "off", "mode": "b", "limit": "none"}
    )
    assert p.options == _Opts(3, 0.5, False, "b", None)
    assert _OptPass.from_strings({"limit": "7"}).options.limit == 7
    assert p.describe() == "opt-pass:count=3,scale=0.5,enabled=False,mode=b"
    assert _OptPass().describe() == "opt-pass"


@pytest.mark.parametrize(
    ("opts", "message"),
    [
        ({"count": "x"}, "count='x' is not a valid int"),
        ({"scale": "big"}, "is not a valid float"),
        ({"enabled": "maybe"}, "is not a valid bool"),
        ({"mode": "c"}, "mode='c' is not one of a, b"),
        ({"colour": "red"}, "unknown option 'colour'"),
    ],
)
def test_bad_options_are_usage_errors(opts: dict[str, str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        _OptPass.from_strings(opts)


class _Kind(enum.Enum):
    UP = "up"
    DOWN = "down"


@dataclass(frozen=True)
class _KeywordOpts:
    from_: Literal["x", "y"] | None = None
    """Where from (a Python keyword: the field is from_, users type from)."""
    kind: _Kind = _Kind.UP
    """An enum option."""
    undocumented: int = 0


class _KeywordPass(_OptPass):
    name = "kw-pass"
    Options = _KeywordOpts


@pytest.mark.parametrize(
    ("opts", "message"),
    [
        ({"from": "z"}, "option from='z' is not one of x, y"),
        ({"from_": "z"}, "option from='z' is not one of x, y"),  # the field name works too
        ({"kind": "sideways"}, "option kind='sideways' is not one of up, down"),
        ({"form": "x"}, "unknown option 'form' (options: from, kind, undocumented)"),
        ({"undocumented": "1.5"}, "option undocumented='1.5' is not a valid int"),
    ],
)
def test_option_errors_name_options_as_users_type_them(opts: dict[str, str], message: str) -> None:
    with pytest.raises(UsageError) as info:
        _KeywordPass.from_strings(opts)
    assert message in str(info.value) and "from_" not in str(info.value)


def test_keyword_options_by_their_cli_name() -> None:
    p = _KeywordPass.from_strings({"from": "y", "kind": "down"})
    assert p.options == _KeywordOpts(from_="y", kind=_Kind.DOWN)
    assert p.describe() == "kw-pass:from=y,kind=down"
    assert _KeywordPass(**{"from": "x"}).options.from_ == "x"
    assert _KeywordPass(from_="x").options.from_ == "x"
    with pytest.raises(
        UsageError, match=r"unknown option 'frm' \(options: from, kind, undocumented\)"
    ):
        _KeywordPass(frm="x")
    with pytest.raises(UsageError, match=r"unknown option 'x' \(it takes none\)"):
        _NoOptionsPass(x=1)


class _NoOptionsPass(_OptPass):
    name = "no-options"
    Options = NoOptions


def test_option_help_from_attribute_docstrings() -> None:
    h = pass_help(_KeywordPass)
    assert h.name == "kw-pass" and h.exact
    assert [(o.name, o.type, o.default) for o in h.options] == [
        ("from", "x|y or none", "none"),
        ("kind", "up|down", "up"),
        ("undocumented", "int", "0"),
    ]
    assert [o.meaning for o in h.options] == [
        "Where from (a Python keyword: the field is from_, users type from).",
        "An enum option.",
        "",
    ]
    assert attribute_docs(_Opts) == {}  # fields without docstrings


def test_constructor_options() -> None:
    with pytest.raises(UsageError, match="unknown option 'nope'"):
        _OptPass(nope=1)
    with pytest.raises(UsageError, match="not both"):
        _OptPass(_Opts(), count=2)
    assert _OptPass(count=2).options.count == 2


# --------------------------------------------------------------------------- protocol


def _gm() -> GraphModule:
    return torch.fx.symbolic_trace(nn.Sequential(nn.Linear(3, 3), nn.ReLU()))


class _Breaks(Pass):
    """Produces an ill-formed graph: a node used before it is defined."""

    name = "breaks"
    summary = "test"

    def call(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        nodes = [n for n in gm.graph.nodes if n.op == "call_module"]
        nodes[0].args = (nodes[1],)
        return PassResult(gm, True)


class _Refuses(Pass):
    name = "refuses"
    summary = "test"

    def requires(self, gm: GraphModule, ctx: PassContext) -> None:
        raise PassError("precondition failed")

    def call(self, gm: GraphModule, ctx: PassContext) -> PassResult:  # pragma: no cover
        raise AssertionError("call ran although requires failed")


def test_postcondition_catches_an_invalid_graph() -> None:
    with pytest.raises(PassError, match="breaks produced an invalid graph"):
        _Breaks()(_gm())


def test_precondition_stops_the_pass() -> None:
    with pytest.raises(PassError, match="precondition failed"):
        _Refuses()(_gm())


class _Marks(Pass):
    name = "marks"
    summary = "test"
    exact = False

    def __init__(self, tag: str, modify: bool, log: list[str]) -> None:
        super().__init__()
        self.tag, self.modify, self.log = tag, modify, log

    def call(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        self.log.append(f"run {self.tag}")
        return PassResult(gm, self.modify, [Change(self.tag, "x")] if self.modify else [])


def test_manager_runs_in_order_and_calls_hooks_only_after_changes() -> None:
    log: list[str] = []
    pm = PassManager(
        [_Marks("a", False, log), _Marks("b", True, log), _Marks("c", False, log)],
        verify_each=lambda p, r: log.append(f"verify {p.tag}"),
        after_change=lambda p, r: log.append(f"print {p.tag}"),
        before_pass=lambda p: log.append(f"before {p.tag}"),
    )
    result = pm(_gm())
    assert log == [
        "before a",
        "run a",
        "before b",
        "run b",
        "print b",
        "verify b",
        "before c",
        "run c",
    ]
    assert result.modified and not result.exact
    assert [r.result.modified for r in result.runs] == [False, True, False]


# --------------------------------------------------------------------------- tensor recipes


def test_compute_tensors_sets_and_logs() -> None:
    gm, ctx = _gm(), PassContext()
    w = get_tensor(gm, "0.weight").clone()
    compute_tensors(
        gm, ctx, ["0.weight", "0.extra"], ["0.weight"], lambda t: (t * 2, t.sum(0)), "test"
    )
    assert torch.equal(get_tensor(gm, "0.weight"), w * 2)
    assert torch.equal(get_tensor(gm, "0.extra"), w.sum(0))
    assert isinstance(gm.get_submodule("0").weight, nn.Parameter)
    [recipe] = ctx.recipes
    assert (
        recipe.outputs == ("0.weight", "0.extra")
        and recipe.inputs == ("0.weight",)
        and recipe.origin == "test"
    )
    with pytest.raises(PassError, match="returned 1 tensors for 2 names"):
        compute_tensors(gm, ctx, ["a", "b"], ["0.weight"], lambda t: (t,))


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2, groups=2)
        self.bn2 = nn.BatchNorm2d(4)
        self.head_bn = nn.BatchNorm1d(4)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.up(torch.relu(self.bn(self.conv(x)))))
        return self.fc(self.head_bn(y.mean((2, 3))))


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_fold_on_meta_then_replay_recipes_on_real_weights(tracer: str) -> None:
    """The recipe log of a pass run on a meta-device trace, replayed on the real checkpoint,
    gives exactly the weights of the same pass run on real tensors."""
    torch.manual_seed(0)
    real = randomize_norms(_Net(), seed=1).eval()
    x = torch.randn(2, 3, 8, 8)
    meta_model = copy.deepcopy(real).to("meta")
    gm_meta = trace(meta_model, (x.to("meta"),), tracer).graph_module
    ctx = PassContext()
    FoldBatchNorm()(gm_meta, ctx)
    assert ctx.recipes and all(r.origin == "fold-bn" for r in ctx.recipes)

    state = {k: v for k, v in real.state_dict(keep_vars=False).items()}
    for r in ctx.recipes:
        outs = r.fn(*(state[name] for name in r.inputs))
        state.update(zip(r.outputs, outs, strict=True))

    gm_real = trace(real, (x,), tracer).graph_module
    FoldBatchNorm()(gm_real)
    expected = gm_real.state_dict()
    for name, value in expected.items():
        assert torch.equal(state[name], value), name
    # the replayed weights, loaded into the meta-traced graph, compute the folded model
    gm_meta.load_state_dict({k: state[k] for k in gm_meta.state_dict()}, assign=True)
    with torch.no_grad():
        torch.testing.assert_close(gm_meta(x), real(x), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- library API


def test_convert_returns_graph_module_and_report() -> None:
    torch.manual_seed(0)
    model = randomize_norms(_Net(), seed=1).eval()
    x = torch.randn(2, 3, 8, 8)
    result = normrewrite.convert(model, passes=["fold-bn"], example_inputs=(x,))
    assert isinstance(result.graph_module, GraphModule)
    rep = result.report
    assert rep.tracer == "fx" and rep.inputs == ["2x3x8x8:float32"] and rep.input_origin == "given"
    [p] = rep.passes
    assert p.name == "fold-bn" and p.exact and p.modified and len(p.changes) == 3 and not p.skipped
    assert rep.nodes_before - rep.nodes_after == 3
    assert rep.verify is not None and rep.verify.passed and rep.verify.max_rel_err <= 1e-5
    data = rep.to_json()
    assert {"passes", "verify", "nodes_before", "nodes_after", "inputs", "output", "exact"} <= set(
        data
    )
    assert data["output"] is None and data["passes"][0]["changes"][0]["target"] == "bn"
    with torch.no_grad():
        torch.testing.assert_close(result.graph_module(x), model(x), rtol=1e-5, atol=1e-5)


def test_passes_are_callable_on_a_graph_module_and_pass_instances_are_accepted() -> None:
    torch.manual_seed(0)
    model = randomize_norms(_Net(), seed=1).eval()
    x = torch.randn(2, 3, 8, 8)
    gm = trace(model, (x,), "export").graph_module
    r = FoldBatchNorm()(gm)  # no context needed
    assert r.graph_module is gm and r.modified and len(r.changes) == 3
    result = normrewrite.convert(model, passes=[FoldBatchNorm(shared="clone")], example_inputs=(x,))
    assert result.report.passes[0].spec == "fold-bn:shared=clone"
    with pytest.raises(UsageError, match="unknown pass"):
        normrewrite.convert(model, passes=["nope"], example_inputs=(x,))
    with pytest.raises(UsageError, match="example_inputs are needed"):
        normrewrite.convert(model)


# --------------------------------------------------------------------------- the match protocol


@dataclass(frozen=True)
class _Hit:
    item: str

    def preview(self) -> str:
        return f"would take {self.item}"


class _Letters(Rewrite[_Hit]):
    """Candidates are letters; vowels match, 'x' is skipped. ``apply`` removes the letter, and
    a candidate list listed again after a rewrite shows it."""

    refused = "left"

    def __init__(self, gm: GraphModule, letters: str) -> None:
        super().__init__(gm, PassContext())
        self.letters = list(letters)
        self.log: list[str] = []

    def candidates(self) -> list[str]:
        self.log.append("list")
        return list(self.letters)

    def key(self, candidate: str) -> str:
        return candidate

    def match(self, candidate: str) -> _Hit | Skip | None:
        if candidate == "x":
            return Skip(candidate, "an x")
        return _Hit(candidate) if candidate in "aeiou" else None

    def prepare(self, matches: list[_Hit]) -> None:
        self.log.append(f"prepare {len(matches)}")

    def apply(self, found: _Hit) -> Change:
        self.letters.remove(found.item)
        self.log.append(f"apply {found.item}")
        return Change(found.item, "taken")


def _empty_gm() -> GraphModule:
    return torch.fx.symbolic_trace(nn.Identity())


@pytest.mark.parametrize("sweep", list(Sweep))
def test_rewrite_each_sweeps(sweep: Sweep) -> None:
    rewrite = _Letters(_empty_gm(), "bxaco")
    result = rewrite_each(rewrite, sweep)
    assert [c.target for c in result.changes] == ["a", "o"] and result.modified
    assert result.skipped == [Skip("x", "an x")]
    assert rewrite.letters == ["b", "x", "c"]
    expected = {
        Sweep.IN_ORDER: ["list", "apply a", "apply o"],
        Sweep.MATCH_ALL_FIRST: ["list", "prepare 2", "apply a", "apply o"],
        Sweep.UNTIL_NONE: ["list", "apply a", "list", "apply o", "list"],
    }[sweep]
    assert rewrite.log == expected


def test_explain_each_is_the_matcher_read_only() -> None:
    rewrite = _Letters(_empty_gm(), "bxa")
    assert explain_each(rewrite) == {"x": "left: an x", "a": "would take a"}
    assert rewrite.letters == ["b", "x", "a"] and "apply a" not in rewrite.log


# --------------------------------------------------------------------------- recompiles


@pytest.mark.parametrize(
    ("make", "passes", "least"),
    [
        ("llama", ["fuse-norm", "fold-norm-affine"], 7),
        ("gpt2", ["ln-to-rmsnorm"], 5),
        ("resnet", ["fold-bn"], 10),
    ],
)
def test_each_pass_recompiles_once_whatever_its_matches(
    make: str, passes: list[str], least: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Erasing per match leaves the code stale; ``Pass.ensures`` regenerates it once per pass
    (per-match recompiles grow as layers × matches), and the final code computes the rewrite."""
    import models

    from normrewrite.passes import REGISTRY

    if make == "resnet":
        model, x = models.resnet(), models.pixels()
    else:
        model, x = getattr(models, make)(layers=3), models.token_ids()
    model = randomize_norms(model).eval()
    gm = trace(model, (x,), "export").graph_module
    calls: list[int] = []
    real = GraphModule.recompile
    monkeypatch.setattr(GraphModule, "recompile", lambda self: calls.append(1) or real(self))
    for name in passes:
        calls.clear()
        result = REGISTRY.create(name)(gm, PassContext())
        assert len(result.changes) >= least, name
        assert len(calls) == 1, (name, len(calls))
        least = 1  # fold-norm-affine folds at least one of fuse-norm's norms
    monkeypatch.undo()
    for want, got in zip(run(model, x), run(gm, x), strict=True):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_erase_unused_drops_orphaned_tensors_and_submodules(tracer: str) -> None:
    from normrewrite.core.graph import erase_unused

    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)).eval()
    gm = trace(model, (torch.randn(2, 4),), tracer).graph_module
    ln = (
        next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "1")
        if (tracer == "fx")
        else next(n for n in gm.graph.nodes if "layer_norm" in str(n.target))
    )
    ln.replace_all_uses_with(ln.args[0])
    erase_unused(gm, [ln])
    gm.recompile()
    names = {n for n, _ in gm.named_modules()}
    assert "1" not in names and "0" in names
    assert {n for n, _ in gm.named_parameters()} == {"0.weight", "0.bias"}
    x = torch.randn(2, 4)
    torch.testing.assert_close(gm(x), model[0](x))
