"""recalibrate-bn: PyTorch's momentum=None semantics exactly, nothing else touched, both graph
flavours, a corrupted HF ResNet brought back, a changed input distribution measured directly."""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import models
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import normrewrite
from normrewrite.core.graph import get_tensor
from normrewrite.core.pass_infra import Pass, PassContext, PassResult
from normrewrite.errors import PassError, UsageError
from normrewrite.passes import REGISTRY
from normrewrite.passes.recalibrate_bn import RecalibrateBatchNorm, random_batches
from normrewrite.trace import trace
from normrewrite.verify import compare, run

STATS = ("running_mean", "running_var", "num_batches_tracked")


class Small(nn.Module):
    """BN2d after a biased conv, BN2d after ReLU → padded conv, BN1d on (N, C) features."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 6 * 6, 6)
        self.bn3 = nn.BatchNorm1d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        return self.bn3(self.fc(x.flatten(1)))


def _small() -> nn.Module:
    return models.randomize_norms(Small()).eval()


def _batches(
    n: int, seed: int, shape: tuple[int, ...] = (4, 3, 8, 8), scale: float = 2.0
) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) * scale + 1.0 for _ in range(n)]


def _pytorch_reference(model: nn.Module, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """What PyTorch computes: train mode, momentum=None (cumulative average), reset statistics."""
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    ref.train()
    with torch.no_grad():
        for b in batches:
            ref(b)
    return ref.state_dict()


def _run(gm: torch.fx.GraphModule, example: tuple, **options: object) -> object:
    return RecalibrateBatchNorm(**options)(gm, PassContext(example_inputs=example))


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_matches_pytorch_momentum_none_and_touches_nothing_else(
    tracer: str, tmp_path: Path
) -> None:
    model = _small()
    example = (torch.randn(4, 3, 8, 8),)
    batches = _batches(5, seed=1)
    torch.save(batches, tmp_path / "batches.pt")
    gm = trace(model, example, tracer).graph_module
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    code = gm.code

    result = _run(gm, example, data=str(tmp_path / "batches.pt"))

    assert result.modified and len(result.changes) == 3
    assert all("statistics from 5 batches" in c.detail for c in result.changes)
    expected = _pytorch_reference(model, batches)
    after = gm.state_dict()
    for name, value in after.items():
        if name.rpartition(".")[2] in STATS:
            # unbiased batch variance, equal weight per batch: PyTorch's own numbers (bn3 sees
            # 4 values per channel: a biased variance would be off by a factor 3/4)
            torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6, msg=name)
        else:
            assert torch.equal(value, before[name]), f"{name} changed"
    assert after["bn1.num_batches_tracked"].item() == 5
    assert gm.code == code  # the graph itself is untouched
    # the original model is untouched too
    assert torch.equal(model.bn1.running_var, models.randomize_norms(Small()).bn1.running_var)

    # idempotent: the same data gives the same statistics → nothing to change
    again = _run(gm, example, data=str(tmp_path / "batches.pt"))
    assert not again.modified and not again.changes


@pytest.mark.parametrize("layout", ["tensor-pt", "tensor-npz", "list-npz"])
def test_data_file_layouts(layout: str, tmp_path: Path) -> None:
    model = _small()
    example = (torch.randn(4, 3, 8, 8),)
    batches = _batches(3, seed=2)
    samples = torch.cat(batches)
    if layout == "tensor-pt":
        path = tmp_path / "d.pt"
        torch.save(samples, path)  # 12 samples → 3 batches of the example's 4
    elif layout == "tensor-npz":
        path = tmp_path / "d.npz"
        np.savez(path, samples.numpy())
    else:
        path = tmp_path / "d.npz"
        np.savez(path, x=samples.numpy())
    gm = trace(model, example, "export").graph_module
    _run(gm, example, data=str(path))
    expected = _pytorch_reference(model, batches)
    torch.testing.assert_close(
        gm.get_buffer("bn2.running_var"), expected["bn2.running_var"], rtol=1e-5, atol=1e-6
    )
    assert gm.get_buffer("bn2.num_batches_tracked").item() == 3


def _calibrated_resnet(draw, n: int) -> tuple[nn.Module, list[torch.Tensor]]:
    """A HF ResNet whose statistics were set the way training sets them: train mode,
    momentum=None, over ``n`` batches from a known distribution."""
    model = models.resnet()
    batches = [draw() for _ in range(n)]
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        for b in batches:
            model(b)
    return model.eval(), batches


def _corrupt(model: nn.Module, seed: int) -> nn.Module:
    bad = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in bad.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.add_(torch.randn(m.num_features, generator=g))
                m.running_var.mul_(torch.rand(m.num_features, generator=g) * 4 + 0.2)
    return bad


def test_hf_resnet_corrupted_statistics_come_back(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)

    def draw(n: int = 12) -> torch.Tensor:  # the data distribution: N(0.3, 1.5²) pixels
        return torch.randn(n, 3, 64, 64, generator=g) * 1.5 + 0.3

    original, seen = _calibrated_resnet(draw, 10)
    x = draw(2)
    reference = run(original, (x,))
    gm = trace(_corrupt(original, 5), (x,), "export").graph_module
    corrupted = compare(reference, run(gm, (x,)))
    assert corrupted.max_rel_err > 1.0  # the test can fail: corruption is large

    # fresh batches from the same distribution: back within sampling noise
    torch.save([draw() for _ in range(10)], tmp_path / "fresh.pt")
    result = _run(gm, (x,), data=str(tmp_path / "fresh.pt"), batches=10)
    assert result.modified and len(result.changes) == 16  # every BN of the ResNet
    # tolerance: the sampling noise of two 10×12-image estimates through 16 BNs (measured 0.20;
    # the corrupted model is off by 2.6)
    recovered = compare(reference, run(gm, (x,))).max_rel_err
    assert recovered < 0.3 and recovered < corrupted.max_rel_err / 5

    # the very batches the statistics came from: PyTorch's numbers, to float precision
    torch.save(seen, tmp_path / "seen.pt")
    _run(gm, (x,), data=str(tmp_path / "seen.pt"), batches=10)
    assert compare(reference, run(gm, (x,))).max_rel_err < 1e-5


def test_changed_input_distribution_matches_direct_measurement() -> None:
    """The layer before the first BN changed (weights ×3 plus noise): the BN's new statistics
    are those of its new input, measured directly on the same batches."""
    model = models.resnet()
    conv = model.embedder.embedder.convolution
    with torch.no_grad():
        conv.weight.mul_(3.0).add_(torch.randn_like(conv.weight))
    x = models.pixels(batch=8, size=32)
    gm = trace(model, (x,), "export").graph_module
    result = _run(gm, (x,), batches=6)
    batches = random_batches((x,), 6, None, 0)  # what the pass drew (seed 0)
    with torch.no_grad():
        outs = [conv(b[0]).double() for b in batches]
    per_batch_mean = torch.stack([o.mean((0, 2, 3)) for o in outs]).mean(0)
    per_batch_var = torch.stack([o.var((0, 2, 3), unbiased=True) for o in outs]).mean(0)
    bn = "embedder.embedder.normalization"
    got_mean, got_var = (
        gm.get_buffer(f"{bn}.running_mean").double(),
        gm.get_buffer(f"{bn}.running_var").double(),
    )
    torch.testing.assert_close(got_mean, per_batch_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_var, per_batch_var, rtol=1e-5, atol=1e-6)
    # and the pooled distribution of all 6 batches agrees to sampling precision
    pooled = torch.cat(outs)
    torch.testing.assert_close(got_var, pooled.var((0, 2, 3)), rtol=0.02, atol=0)
    old_var = model.embedder.embedder.normalization.running_var.double()
    assert (got_var / old_var).max() > 5  # it really moved, and the report says so
    first = next(c for c in result.changes if c.target == bn)
    assert "variance by a factor of up to" in first.detail


def test_integer_inputs_drawn_in_range() -> None:
    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 6)
            self.conv = nn.Conv1d(6, 6, 3)
            self.bn = nn.BatchNorm1d(6)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.bn(self.conv(self.emb(ids).transpose(1, 2)))

    model = models.randomize_norms(Tokens()).eval()
    ids = torch.tensor([[0, 3, 9, 2, 5, 7, 1, 4]])
    gm = trace(model, (ids,), "fx").graph_module
    result = _run(gm, (ids,), batches=4, batch_size=3)  # an index > 9 would crash the embedding
    assert result.modified
    drawn = random_batches((ids,), 4, 3, 0)
    assert all(b[0].shape == (3, 8) and b[0].min() >= 0 and b[0].max() <= 9 for b in drawn)
    assert gm.get_buffer("bn.num_batches_tracked").item() == 4


def test_skips_batch_statistics_bn_and_models_without_bn() -> None:
    model = _small()
    model.bn2.train()  # this BN uses batch statistics in the traced graph
    model.bn3.track_running_stats = False
    model.bn3.running_mean = model.bn3.running_var = None
    example = (torch.randn(4, 3, 8, 8),)
    gm = trace(model, example, "fx").graph_module
    result = _run(gm, example, batches=2)
    assert [c.target for c in result.changes] == ["bn1"]
    reasons = {s.target: s.reason for s in result.skipped}
    assert "training mode" in reasons["bn2"] and "track_running_stats=False" in reasons["bn3"]

    plain = trace(
        nn.Sequential(nn.Linear(4, 4), nn.ReLU()), (torch.randn(2, 4),), "fx"
    ).graph_module
    assert not _run(plain, (torch.randn(2, 4),)).modified


def test_user_errors_are_one_line(tmp_path: Path) -> None:
    model = _small()
    example = (torch.randn(4, 3, 8, 8),)
    gm = trace(model, example, "fx").graph_module
    with pytest.raises(UsageError, match="does not exist"):
        _run(gm, example, data=str(tmp_path / "missing.pt"))
    torch.save(
        {"x": argparse.Namespace(a=1)}, tmp_path / "pickle.pt"
    )  # not loadable with weights_only
    with pytest.raises(UsageError, match="weights_only"):
        _run(gm, example, data=str(tmp_path / "pickle.pt"))
    torch.save([(torch.randn(4, 3, 8, 8), torch.randn(1))], tmp_path / "two.pt")
    with pytest.raises(UsageError, match="has 2 tensors, the model takes 1"):
        _run(gm, example, data=str(tmp_path / "two.pt"))
    torch.save([torch.randint(0, 3, (4, 3, 8, 8))], tmp_path / "ints.pt")
    with pytest.raises(UsageError, match="dtype"):
        _run(gm, example, data=str(tmp_path / "ints.pt"))
    with pytest.raises(PassError, match="variance is undefined"):  # BN1d with a batch of one
        _run(gm, example, batch_size=1)
    with pytest.raises(UsageError, match="at least 1"):
        REGISTRY.create("recalibrate-bn:batches=0")
    with pytest.raises(PassError, match="meta device"):
        _run(gm, (torch.empty(4, 3, 8, 8, device="meta"),))


def test_cli_convert_runs_it_as_an_approximate_pass(tmp_path: Path) -> None:
    from normrewrite.cli import main

    factory = tmp_path / "m.py"
    factory.write_text(
        "import torch\nfrom torch import nn\n"
        "def build():\n"
        "    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()\n"
        "    return m, (torch.randn(2, 3, 8, 8),)\n"
    )
    out, report = tmp_path / "out.pt2", tmp_path / "r.json"
    res = CliRunner().invoke(
        main,
        [
            "convert",
            f"{factory}:build",
            "-p",
            "recalibrate-bn:batches=3",
            "-o",
            str(out),
            "--report",
            str(report),
            "-q",
        ],
    )
    assert res.exit_code == 0, res.output
    import json

    data = json.loads(report.read_text())
    assert data["exact"] is False and data["verify"]["passed"] is None  # measured, not judged
    assert data["passes"][0]["changes"][0]["target"] == "1"
    ep = torch.export.load(str(out))
    assert ep.module().get_buffer("1.num_batches_tracked").item() == 3


# --------------------------------------------------------------------------- other batch sizes


def _levit(image: int) -> nn.Module:
    t = models._transformers()
    torch.manual_seed(0)
    cfg = t.LevitConfig(
        hidden_sizes=[16, 32, 48],
        num_attention_heads=[1, 2, 3],
        depths=[1, 1, 1],
        key_dim=[8, 8, 8],
        image_size=image,
        patch_size=16,
    )
    return models.randomize_norms(t.LevitModel(cfg)).eval()


@pytest.mark.parametrize(("image", "batch_size"), [(128, 1), (64, 8)])
def test_levit_at_the_requested_batch_size(tmp_path: Path, image: int, batch_size: int) -> None:
    """An exported LeViT graph, traced at batch 1, recalibrated on batches of ``batch_size``: the
    statistics are PyTorch's own momentum=None average over the same batches. Batch 1 runs the
    graph; batch 8 the source model with the graph's tensors (the graph bakes in batch 1)."""
    model = _levit(image)
    example = (torch.randn(1, 3, image, image),)
    samples = torch.randn(
        4 * batch_size, 3, image, image, generator=torch.Generator().manual_seed(3)
    )
    torch.save(samples, tmp_path / "samples.pt")
    result = normrewrite.convert(
        model,
        [f"recalibrate-bn:data={tmp_path / 'samples.pt'},batch_size={batch_size}"],
        example,
        tracer="export",
    )
    (run_report,) = result.report.passes
    assert run_report.modified and all("from 4 batches" in c.detail for c in run_report.changes)
    expected = _pytorch_reference(model, list(torch.split(samples, batch_size)))
    bns = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d)]
    assert len(run_report.changes) == len(bns) > 10
    for bn in bns:
        for stat in STATS:
            got = get_tensor(result.graph_module, f"{bn}.{stat}")
            torch.testing.assert_close(got, expected[f"{bn}.{stat}"], rtol=1e-4, atol=1e-5)
    # the user's model is untouched
    assert torch.equal(
        model.state_dict()[f"{bns[0]}.running_mean"],
        _levit(image).state_dict()[f"{bns[0]}.running_mean"],
    )


def test_levit_batch_of_one_is_one_line_naming_the_bn() -> None:
    """At image 64 the last stage has one position: a batch of one gives a BN one value per
    channel. The error names it and the fix, in one line (no fx node dump, no traceback)."""
    with pytest.raises(PassError) as info:
        normrewrite.convert(
            _levit(64), ["recalibrate-bn:batches=2"], (torch.randn(1, 3, 64, 64),), tracer="export"
        )
    msg = str(info.value)
    assert "queries.batch_norm" in msg and "batch_size=N" in msg and "batch 0 (1x3x64x64)" in msg
    assert "While executing" not in msg and "Traceback" not in msg and "\n" not in msg
    assert len(msg) < 300


class _Doubled(Pass):
    """A structural rewrite before recalibration: doubles bn1's input in the graph."""

    name = "double-bn1-input"
    summary = "test"

    def call(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        bn = next(n for n in gm.graph.nodes if "batch_norm" in str(n.target))
        with gm.graph.inserting_before(bn):
            doubled = gm.graph.call_function(torch.ops.aten.mul.Tensor, (bn.args[0], 2.0))
        bn.replace_input_with(bn.args[0], doubled)
        return PassResult(gm, True)


class _BakedBatch(Small):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        return self.bn3(self.fc(x.reshape(x.shape[0], -1)))  # export bakes the batch in


def test_other_batch_size_after_a_structural_rewrite_is_refused() -> None:
    """The source model no longer computes the graph: the graph itself cannot run at batch 6
    (export baked batch 4 into a reshape), and the one-line error gives both reasons."""
    model, example = models.randomize_norms(_BakedBatch()).eval(), (torch.randn(4, 3, 8, 8),)
    gm = trace(model, example, "export").graph_module
    ctx = PassContext(example_inputs=example, reference=model)
    _Doubled()(gm, ctx)
    with pytest.raises(PassError) as info:
        RecalibrateBatchNorm(batches=2, batch_size=6)(gm, ctx)
    msg = str(info.value)
    assert "batch 0 (6x3x8x8)" in msg and "traced at 4x3x8x8" in msg, msg
    assert "bn1 does not see the graph's input" in msg and "\n" not in msg
    # at the traced batch size the graph itself runs: fine
    assert RecalibrateBatchNorm(batches=2)(gm, ctx).modified
    with pytest.raises(PassError, match="no source model"):
        RecalibrateBatchNorm(batches=2, batch_size=6)(gm, PassContext(example_inputs=example))


def test_export_graph_at_another_batch_size_matches_pytorch() -> None:
    """Random batches of 6 for a graph traced at 4: PyTorch's numbers on the same batches."""
    model, example = _small(), (torch.randn(4, 3, 8, 8),)
    gm = trace(model, example, "export").graph_module
    ctx = PassContext(example_inputs=example, reference=model)
    result = RecalibrateBatchNorm(batches=3, batch_size=6)(gm, ctx)
    assert result.modified and len(result.changes) == 3
    drawn = random_batches(example, 3, 6, 0)
    expected = _pytorch_reference(model, [b[0] for b in drawn])
    for name in ("bn1", "bn2", "bn3"):
        for stat in STATS:
            torch.testing.assert_close(
                get_tensor(gm, f"{name}.{stat}"), expected[f"{name}.{stat}"], rtol=1e-5, atol=1e-6
            )
