"""Scale-invariance analysis: every claim checked numerically (parameter ×2 and ×0.5), on a
model exercising each rule in both graph flavours, on HF ResNet and on HF BERT; param_groups."""

from __future__ import annotations

import json
from pathlib import Path

import models
import pytest
import torch
from click.testing import CliRunner
from torch import nn
from torch.func import functional_call

import normrewrite
from normrewrite.analysis.scale_invariance import ScaleInvariance, scale_invariant_params
from normrewrite.verify import compare, tensor_leaves

INVARIANT_TOL = 1e-4  # float32 and the norms' ε (exact when ε ≪ σ²)
CHANGED_TOL = 1e-3  # a "not invariant" claim must move the output at least this much


def _rel_change(
    model: nn.Module,
    x: tuple,
    name: str,
    factor: float,
    *,
    train: bool,
    base: list[torch.Tensor] | None = None,
) -> float:
    model.train(train)
    param = dict(model.named_parameters())[name]
    with torch.no_grad():
        if base is None:
            base = tensor_leaves(functional_call(model, {}, x))
        scaled = tensor_leaves(functional_call(model, {name: param * factor}, x))
    model.eval()
    return compare(base, scaled).max_rel_err


def _check_claims(model: nn.Module, x: tuple, si: ScaleInvariance, *, train: bool) -> None:
    """Every invariant claim holds at ×2 and ×0.5; every not-invariant claim moves the output."""
    model.train(train)  # outputs with batch statistics do not depend on the running ones
    with torch.no_grad():
        base = tensor_leaves(model(*x))
    for p in si.invariant:
        for f in (2.0, 0.5):
            err = _rel_change(model, x, p.name, f, train=train, base=base)
            assert err < INVARIANT_TOL, f"{p.name} ×{f}: output moved {err:.2g}"
    for p in si.not_invariant:
        err = _rel_change(model, x, p.name, 2.0, train=train, base=base)
        assert err > CHANGED_TOL, (
            f"{p.name} claimed not invariant but ×2 moved the output only {err:.2g}"
        )


EPS = 1e-9  # invariance holds up to the norms' ε: keep it far below the variances here


class Rules(nn.Module):
    """One branch per rule; the expected verdict is in the comment."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(
            3, 8, 3
        )  # → BN: weight and bias invariant (BN removes a per-channel bias)
        self.bn1 = nn.BatchNorm2d(8, eps=EPS)
        self.conv2 = nn.Conv2d(
            8, 8, 3, padding=1
        )  # → GN(2 groups): the bias survives → not invariant
        self.gn2 = nn.GroupNorm(2, 8, eps=EPS)
        self.conv3 = nn.Conv2d(8, 8, 1)  # → GN(8 groups) = per channel: weight and bias invariant
        self.gn3 = nn.GroupNorm(8, 8, eps=EPS)
        self.fc1 = nn.Linear(8, 16)  # → LN: a linear bias varies along the features → not invariant
        self.ln1 = nn.LayerNorm(16, eps=EPS)
        self.fc2 = nn.Linear(
            16, 16, bias=False
        )  # → ReLU → RMSNorm: invariant (ReLU is homogeneous)
        self.rms = nn.RMSNorm(16, eps=EPS)
        self.fc3 = nn.Linear(16, 16, bias=False)  # → cumsum (no rule yet) → LN: undecided
        self.ln3 = nn.LayerNorm(16, eps=EPS)
        self.head = nn.Linear(16, 4)  # to the output: not invariant

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 2)
        x = torch.relu(self.gn2(self.conv2(x)))
        x = self.gn3(self.conv3(x)).amax((2, 3))  # (a mean would be exactly gn3.bias)
        h = self.ln1(self.fc1(x))
        h = self.rms(torch.relu(self.fc2(h)))
        side = self.ln3(torch.cumsum(self.fc3(h), -1))
        return self.head(h), side


EXPECTED = {
    "conv1.weight": ("invariant", "batch-stats"),
    "conv1.bias": ("invariant", "batch-stats"),
    "conv2.weight": ("not-invariant", None),
    "conv2.bias": ("not-invariant", None),
    "conv3.weight": ("invariant", "always"),
    "conv3.bias": ("invariant", "always"),
    "fc1.weight": ("not-invariant", None),
    "fc1.bias": ("not-invariant", None),
    "fc2.weight": ("invariant", "always"),
    "fc3.weight": ("undecided", None),
    "head.weight": ("not-invariant", None),
    "head.bias": ("not-invariant", None),
}


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_rules_model_claims_and_numbers(tracer: str) -> None:
    model = models.randomize_norms(Rules()).eval()
    x = (torch.randn(4, 3, 10, 10),)
    si = scale_invariant_params(model, x, tracer=tracer)
    got = {p.name: (p.status, p.condition) for p in si.params if not p.role.startswith("norm")}
    assert got == EXPECTED
    assert (
        "GroupNorm" in si.claim("conv2.bias").reason or "groupnorm" in si.claim("conv2.bias").reason
    )
    assert "cumsum" in si.claim("fc3.weight").reason
    assert si.claim("conv1.weight").cancelled_by == ("bn1",)
    assert {p.name for p in si.norm_params} == {
        f"{m}.{w}" for m in ("bn1", "gn2", "gn3", "ln1", "ln3") for w in ("weight", "bias")
    } | {"rms.weight"}
    # train mode: BatchNorm uses batch statistics, as during training
    _check_claims(model, x, si, train=True)
    # undecided is conservative: cumsum is linear, so fc3 is in fact invariant (no rule says so)
    assert _rel_change(model, x, "fc3.weight", 2.0, train=True) < INVARIANT_TOL


def test_batch_stats_condition_is_needed_in_eval_mode() -> None:
    """With running statistics a BN-cancelled weight is invariant only if μ, σ² scale along."""
    model = models.randomize_norms(Rules()).eval()
    x = (torch.randn(4, 3, 10, 10),)
    assert _rel_change(model, x, "conv1.weight", 2.0, train=False) > CHANGED_TOL
    bn = model.bn1
    overrides = {
        "conv1.weight": model.conv1.weight * 2,
        "conv1.bias": model.conv1.bias * 2,
        "bn1.running_mean": bn.running_mean * 2,
        "bn1.running_var": bn.running_var * 4,
    }
    with torch.no_grad():
        base, scaled = model(*x), functional_call(model, overrides, x)
    assert compare(tensor_leaves(base), tensor_leaves(scaled)).max_rel_err < INVARIANT_TOL


def test_hf_resnet() -> None:
    model = models.resnet()
    for m in model.modules():  # the identity holds up to ε; with ε = 1e-5 a ×0.5 moves it ~1e-4
        if isinstance(m, nn.BatchNorm2d):
            m.eps = EPS
    x = (models.pixels(batch=4),)
    si = scale_invariant_params(model, x, tracer="export")
    convs = {n for n, _ in model.named_parameters() if n.endswith("convolution.weight")}
    assert {p.name for p in si.invariant} == convs and len(convs) == 16
    assert all(p.condition == "batch-stats" for p in si.invariant)
    assert si.undecided == []  # every parameter decided
    assert len(si.norm_params) == 32 and all(p.status == "not-invariant" for p in si.norm_params)
    _check_claims(model, x, si, train=True)


def test_hf_bert() -> None:
    model = models.bert()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # generic weights: HF initialises biases to 0 and weights tiny, where
        for m in model.modules():  # scaling a bias can do nothing (claims assume generic values)
            if isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.2)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
    x = (models.token_ids(batch=2, seq=8),)
    si = scale_invariant_params(model, x, tracer="export")
    # post-LN BERT: every linear feeds a residual add or a non-homogeneous op before its norm
    assert si.invariant == []
    assert len(si.norm_params) == 10
    undecided = {p.name for p in si.undecided}
    assert undecided == {
        f"encoder.layer.{i}.attention.self.{w}.bias" for i in (0, 1) for w in ("key", "value")
    }
    _check_claims(model, x, si, train=False)
    # the analysis is conservative: a key bias is in fact invariant (softmax removes q·b per query)
    assert (
        _rel_change(model, x, "encoder.layer.0.attention.self.key.bias", 2.0, train=False)
        < INVARIANT_TOL
    )


def test_param_groups_feed_torch_optim() -> None:
    model = models.randomize_norms(Rules()).eval()
    x = (torch.randn(4, 3, 10, 10),)
    groups = normrewrite.param_groups(
        model, weight_decay=5e-4, example_inputs=x, scale_invariant_weight_decay=0.0
    )
    names = {id(p): n for n, p in model.named_parameters()}
    by_group = {g["name"]: {names[id(p)] for p in g["params"]} for g in groups}
    assert by_group["scale_invariant"] == {"conv1.weight", "conv3.weight", "fc2.weight"}
    assert by_group["decay"] == {"conv2.weight", "fc1.weight", "fc3.weight", "head.weight"}
    assert "conv1.bias" in by_group["no_decay"] and "bn1.weight" in by_group["no_decay"]
    everything = [n for g in by_group.values() for n in g]
    assert sorted(everything) == sorted(names.values())  # each parameter exactly once
    decay = {g["name"]: g["weight_decay"] for g in groups}
    assert decay == {"decay": 5e-4, "no_decay": 0.0, "scale_invariant": 0.0}
    assert model.training is False  # the model's mode is left as it was

    opt = torch.optim.SGD(groups, lr=0.1)
    model.train()
    loss = sum(t.sum() for t in model(*x))
    loss.backward()
    opt.step()

    resnet = models.resnet()
    groups = normrewrite.param_groups(resnet, 1e-4, (models.pixels(batch=2),), tracer="export")
    assert {g["name"] for g in groups} == {"scale_invariant", "no_decay"}  # no plain weights
    assert all(
        g["weight_decay"] == (1e-4 if g["name"] == "scale_invariant" else 0.0) for g in groups
    )


def test_inspect_reports_it(tmp_path: Path) -> None:
    from normrewrite.cli import main

    factory = tmp_path / "m.py"
    factory.write_text(
        "import torch\nfrom torch import nn\n"
        "def build():\n"
        "    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),\n"
        "                      nn.Linear(4 * 36, 5, bias=False), nn.LayerNorm(5)).eval()\n"
        "    return m, (torch.randn(2, 3, 8, 8),)\n"
    )
    res = CliRunner().invoke(main, ["inspect", f"{factory}:build", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)["scale_invariance"]
    assert {(p["name"], p["condition"]) for p in data["scale_invariant"]} == {
        ("0.weight", "batch-stats"),
        ("0.bias", "batch-stats"),
        ("4.weight", "always"),
    }
    assert data["undecided"] == [] and set(data["norm_params"]) == {
        "1.weight",
        "1.bias",
        "5.weight",
        "5.bias",
    }
    res = CliRunner().invoke(main, ["inspect", f"{factory}:build"])
    assert res.exit_code == 0, res.output
    assert "scale invariance: 3 of 7 parameters scale-invariant" in res.output


def test_example_cnn_every_claim() -> None:
    """The bundled example: grouped/depthwise/transposed convs, BN → flatten → Linear, a padded
    conv after a BN, adaptive pooling — every decided claim holds numerically."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "tiny_cnn", Path(__file__).parents[1] / "examples" / "tiny_cnn.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model, x = module.build()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eps = EPS
    si = scale_invariant_params(model, x, tracer="fx")
    assert {p.name for p in si.invariant} >= {
        "stem.0.weight",
        "mix.weight",
        "mix.bias",
        "up.0.weight",
    }
    # undecided: an additive term through a transposed / zero-padded conv or a flatten
    assert {p.name for p in si.undecided} == {
        f"{m}.{w}" for m in ("depthwise.1", "post_relu_bn", "head_bn") for w in ("weight", "bias")
    }
    _check_claims(model, x, si, train=True)


@pytest.mark.parametrize("act", [nn.ReLU, nn.GELU, nn.Tanh, nn.LeakyReLU])
def test_activation_modules(act: type[nn.Module]) -> None:
    """fx module flavour: homogeneous activations keep a weight invariant, others do not."""
    model = models.randomize_norms(
        nn.Sequential(nn.Linear(6, 8, bias=False), act(), nn.LayerNorm(8, eps=EPS))
    )
    x = (torch.randn(3, 6),)
    si = scale_invariant_params(model, x, tracer="fx")
    homogeneous = act in (nn.ReLU, nn.LeakyReLU)
    assert si.claim("0.weight").status == ("invariant" if homogeneous else "not-invariant")
    _check_claims(model, x, si, train=False)


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_embedding_table(tracer: str) -> None:
    """(c·W)[i] = c·W[i]: a table feeding a norm is invariant, as an nn.Embedding module (fx)
    and as aten.embedding (export); max_norm renormalizes rows, so no claim is made then."""
    model = models.randomize_norms(
        nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8, bias=False), nn.LayerNorm(8, eps=EPS))
    )
    x = (torch.tensor([[1, 2, 3, 7]]),)
    si = scale_invariant_params(model, x, tracer=tracer)
    claim = si.claim("0.weight")
    assert (claim.role, claim.status, claim.condition) == ("embedding", "invariant", "always")
    assert si.claim("1.weight").status == "invariant"
    _check_claims(model, x, si, train=False)


def test_embedding_max_norm_is_undecided() -> None:
    model = nn.Sequential(nn.Embedding(10, 8, max_norm=1.0), nn.LayerNorm(8, eps=EPS))
    si = scale_invariant_params(model, (torch.tensor([[1, 2]]),), tracer="fx")
    claim = si.claim("0.weight")
    assert claim.status == "undecided" and "max_norm" in claim.reason


def test_every_module_op_has_a_rule() -> None:
    """A module class mapped to an op name the table does not know would always be undecided."""
    from normrewrite.analysis.scale_invariance.op_table import MODULE_OPS, OP_RULES

    assert [name for _, name in MODULE_OPS if name not in OP_RULES] == []
