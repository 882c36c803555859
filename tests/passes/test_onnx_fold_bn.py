"""fold-bn on ONNX models (passes/fold_bn/onnx.py): structure, parity in onnxruntime (graph
optimizations off) against the input model and an fp64 torch run, the must-not-fold cases, idempotence,
and the CLI path ``convert in.onnx -p fold-bn -o out.onnx``."""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
import torch
from click.testing import CliRunner
from models import randomize_norms
from torch import nn

from normrewrite.cli import main
from normrewrite.core.onnx_graph import add_initializer, model_bytes
from normrewrite.load.onnx import load_onnx
from normrewrite.passes import ONNX_REGISTRY
from normrewrite.passes.fold_bn.onnx import OnnxFoldBatchNorm
from normrewrite.verify.onnxruntime import relative_error, session

RTOL = 1e-5


def to_onnx(module: nn.Module, x: torch.Tensor) -> ir.Model:
    """The unoptimized dynamo export (keeps BatchNormalization nodes)."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        return torch.onnx.export(module, (x,), dynamo=True, optimize=False, verbose=False).model


def ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


def run(model: ir.Model, x: np.ndarray) -> list[np.ndarray]:
    sess = session(model_bytes(model))
    return sess.run(None, {sess.get_inputs()[0].name: x})


def fold(model: ir.Model):
    return OnnxFoldBatchNorm()(model)


CASES = {
    "conv2d-bias": (
        lambda: nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)),
        (2, 3, 8, 8),
        "Conv",
    ),
    "conv2d-nobias": (
        lambda: nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8)),
        (2, 3, 8, 8),
        "Conv",
    ),
    "conv1d-groups": (
        lambda: nn.Sequential(nn.Conv1d(4, 8, 3, groups=2), nn.BatchNorm1d(8)),
        (2, 4, 9),
        "Conv",
    ),
    "convT-groups": (
        lambda: nn.Sequential(nn.ConvTranspose2d(8, 6, 3, groups=2), nn.BatchNorm2d(6)),
        (2, 8, 5, 5),
        "ConvTranspose",
    ),
    "gemm": (lambda: nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7)), (4, 5), "Gemm"),
    "gemm-nobias": (
        lambda: nn.Sequential(nn.Linear(5, 7, bias=False), nn.BatchNorm1d(7)),
        (4, 5),
        "Gemm",
    ),
    "bn-then-gemm": (lambda: nn.Sequential(nn.BatchNorm1d(5), nn.Linear(5, 3)), (4, 5), "Gemm"),
    "bn-then-unpadded-conv": (
        lambda: nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3)),
        (2, 3, 8, 8),
        "Conv",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_folds_and_matches(case: str) -> None:
    build, shape, layer_op = CASES[case]
    module = randomize_norms(build()).eval()
    x = torch.randn(shape)
    model = to_onnx(module, x)
    before = run(model, x.numpy())
    result = fold(model)
    assert result.modified and len(result.changes) == 1, result.skipped
    assert "BatchNormalization" not in ops(model)
    assert ops(model).count(layer_op) == 1
    after = run(model, x.numpy())
    _, rel = relative_error(before, after)
    assert rel <= RTOL
    ref64 = module.double()(x.double()).detach().numpy()
    _, rel64 = relative_error([ref64], after)
    assert rel64 <= 1e-5
    assert not fold(model).modified  # idempotent


def _matmul_bn(
    transb_gemm: bool = False, shared: bool = False, rank3: bool = False
) -> tuple[ir.Model, np.ndarray]:
    """MatMul(+Add) → BatchNormalization built with onnx_ir (what older exporters write for Linear)."""
    rng = np.random.default_rng(0)
    k, n = 5, 6
    shape = (2, 4, k) if rank3 else (4, k)
    x = ir.Value(name="x", shape=ir.Shape(shape), type=ir.TensorType(ir.DataType.FLOAT))
    graph = ir.Graph([x], [], nodes=[], opset_imports={"": 18}, name="g")

    def init(name: str, arr: np.ndarray) -> ir.Value:
        return add_initializer(graph, name, arr.astype(np.float32))

    w = init("w", rng.standard_normal((k, n)))
    b = init("b", rng.standard_normal(n))
    mm = ir.node("MatMul", [x, w], name="mm")
    add = ir.node("Add", [mm.outputs[0], b], name="add")
    c = n if not rank3 else 4
    stats = [
        init(s, v)
        for s, v in (
            ("g", rng.random(c) + 0.5),
            ("beta", rng.standard_normal(c)),
            ("mean", rng.standard_normal(c)),
            ("var", rng.random(c) + 0.1),
        )
    ]
    bn = ir.node(
        "BatchNormalization", [add.outputs[0], *stats], attributes={"epsilon": 1e-5}, name="bn"
    )
    nodes = [mm, add, bn]
    if shared:  # a second MatMul reads the same weight
        nodes.append(ir.node("MatMul", [x, w], name="mm2"))
    graph.extend(nodes)
    graph.outputs.extend(n.outputs[0] for n in nodes[2:])
    for n_ in nodes:
        for o in n_.outputs:
            o.name = o.name or f"{n_.name}_out"
            o.dtype = ir.DataType.FLOAT
    return ir.Model(graph, ir_version=10), rng.standard_normal(shape).astype(np.float32)


def test_matmul_add_folds() -> None:
    model, x = _matmul_bn()
    before = run(model, x)
    result = fold(model)
    assert result.modified, result.skipped
    assert ops(model) == ["MatMul", "Add"]
    _, rel = relative_error(before, run(model, x))
    assert rel <= RTOL


@pytest.mark.parametrize(
    ("build", "reason"),
    [
        (lambda: _matmul_bn(shared=True), "shared by 2 readers"),
        (lambda: _matmul_bn(rank3=True), "normalizes dim 1"),
    ],
)
def test_matmul_must_not_fold(build, reason: str) -> None:
    model, x = build()
    before = run(model, x)
    result = fold(model)
    assert not result.modified
    assert reason in result.skipped[0].reason
    np.testing.assert_array_equal(before[0], run(model, x)[0])


class TwoSites(nn.Module):
    """One conv called twice: its initializers are shared, folding would change the other call."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) + self.conv(x)


class Fanout(nn.Module):
    """The conv output also feeds a second consumer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) * y


@pytest.mark.parametrize(
    ("build", "reason"),
    [
        (TwoSites, "shared by 2 readers"),
        (Fanout, "has 2 users: folding would change the others"),
        (
            lambda: nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1)),
            "zero-padded Conv",
        ),
        (lambda: nn.Sequential(nn.BatchNorm2d(3), nn.ConvTranspose2d(3, 4, 3)), "ConvTranspose"),
        (lambda: nn.Sequential(nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 4, 1)), "no Conv"),
    ],
)
def test_must_not_fold(build, reason: str) -> None:
    module = randomize_norms(build()).eval()
    x = torch.randn(2, 3, 6, 6)
    model = to_onnx(module, x)
    before = run(model, x.numpy())
    result = fold(model)
    assert not result.modified
    assert any(reason in s.reason for s in result.skipped), result.skipped
    assert "BatchNormalization" in ops(model)
    _, rel = relative_error(before, run(model, x.numpy()))
    assert rel <= RTOL


def test_training_mode_bn_is_not_folded() -> None:
    module = randomize_norms(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))).eval()
    model = to_onnx(module, torch.randn(2, 3, 4, 4))
    bn = next(n for n in model.graph if n.op_type == "BatchNormalization")
    bn.attributes["training_mode"] = ir.AttrInt64("training_mode", 1)
    result = fold(model)
    assert not result.modified and "training mode" in result.skipped[0].reason


def test_registered_under_the_torch_name() -> None:
    assert ONNX_REGISTRY.get("fold-bn") is OnnxFoldBatchNorm


def cli(*args: object):
    return CliRunner(env={"COLUMNS": "250"}).invoke(
        main, [str(a) for a in args], catch_exceptions=False
    )


def test_cli_onnx_in_onnx_out(tmp_path: Path) -> None:
    from models import pixels, resnet

    module = resnet()
    x = pixels()
    src = tmp_path / "in.onnx"
    ir.save(to_onnx(module, x), str(src))
    out = tmp_path / "out.onnx"
    res = cli("convert", src, "-p", "fold-bn", "-o", out)
    assert res.exit_code == 0, res.output
    folded = load_onnx(out)
    assert "BatchNormalization" not in ops(folded)
    _, rel = relative_error(
        [module(x).last_hidden_state.detach().numpy()], run(folded, x.numpy())[:1]
    )
    assert rel <= 1e-5
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "in.onnx",
        "out.onnx",
    ]  # nothing partial left
    res = cli("inspect", src)
    assert res.exit_code == 0 and "foldable into Conv" in res.output


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"PK\x03\x04junk", "zip archive"), (b"garbage!", "not an ONNX model"), (b"", "empty file")],
)
def test_bad_files_fail_in_one_line(tmp_path: Path, content: bytes, message: str) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(content)
    res = CliRunner().invoke(main, ["convert", str(bad), "-o", str(tmp_path / "o.onnx")])
    assert res.exit_code == 1
    assert message in res.output and len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "o.onnx").exists()


def test_truncated_file_fails_in_one_line(tmp_path: Path) -> None:
    module = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    good = tmp_path / "good.onnx"
    ir.save(to_onnx(module, torch.randn(1, 3, 8, 8)), str(good))
    bad = tmp_path / "trunc.onnx"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    res = CliRunner().invoke(main, ["convert", str(bad), "-o", str(tmp_path / "o.onnx")])
    assert res.exit_code == 1 and "truncated or corrupt" in res.output
    assert len(res.output.strip().splitlines()) == 1


@pytest.mark.parametrize("stat", ["negative var", "nan mean"])
def test_invalid_statistics_are_refused_like_the_torch_form(stat: str) -> None:
    """The ONNX form calls the same form-neutral condition as the fx matcher (fold_bn/conditions.py)."""
    module = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).eval()
    with torch.no_grad():
        if stat == "negative var":
            module[1].running_var[1] = -0.5
        else:
            module[1].running_mean[2] = float("nan")
    model = to_onnx(module, torch.randn(1, 3, 4, 4))
    result = fold(model)
    assert not result.modified
    assert "not a valid BatchNorm" in result.skipped[0].reason
