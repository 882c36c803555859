"""Writing the rewritten model: ``.pt2`` (``torch.export.load``), ``.onnx`` (checker + onnxruntime
parity with graph optimizations off) and ``DIR/`` (code + weights that load with plain
``import model; model.load()``), all atomic: a failure leaves no output, not even a partial one."""

from __future__ import annotations

import copy
import importlib
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from harness import ort_run, rel_err
from models import randomize_norms
from torch import nn

import normrewrite
from normrewrite import emit
from normrewrite.emit.files import atomic_dir, atomic_file
from normrewrite.emit.plan import check_output
from normrewrite.errors import EmitError, UsageError


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2, groups=2)
        self.bn2 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 5)
        self.bn3 = nn.BatchNorm1d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.up(torch.relu(self.bn(self.conv(x)))))
        return self.bn3(self.fc(y.mean((2, 3))))


@pytest.fixture(scope="module")
def converted(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[nn.Module, torch.Tensor, torch.Tensor, Path, object]:
    torch.manual_seed(0)
    model = randomize_norms(Net(), seed=1).eval()
    x = torch.randn(2, 3, 8, 8)
    out = tmp_path_factory.mktemp("emit")
    result = normrewrite.convert(
        model, ["fold-bn"], (x,), outputs=[out / "m.pt2", out / "m.onnx", out / "m_dir"]
    )
    with torch.no_grad():
        ref64 = copy.deepcopy(model).double()(x.double())
    return model, x, ref64, out, result




def test_all_outputs_written_and_reported(converted) -> None:
    _, _, _, out, result = converted
    assert sorted(p.name for p in out.iterdir()) == ["m.onnx", "m.pt2", "m_dir"]
    assert [(Path(o.path).name, o.format) for o in result.report.outputs] == [
        ("m.pt2", "pt2"),
        ("m.onnx", "onnx"),
        ("m_dir", "dir"),
    ]
    assert len(result.report.passes[0].changes) == 3


def test_pt2_loads_with_torch_export_load_and_matches(converted) -> None:
    _, x, ref64, out, result = converted
    ep = torch.export.load(str(out / "m.pt2"))
    assert not any("batch_norm" in str(n.target) for n in ep.graph.nodes)
    with torch.no_grad():
        y = ep.module()(x)
        torch.testing.assert_close(y, result.graph_module(x), rtol=0, atol=0)
    assert rel_err(ref64, y) <= 1e-5


def test_onnx_is_valid_and_matches_in_onnxruntime_without_optimizations(converted) -> None:
    import onnx

    _, x, ref64, out, result = converted
    onnx.checker.check_model(str(out / "m.onnx"), full_check=True)
    ops = {n.op_type for n in onnx.load(str(out / "m.onnx")).graph.node}
    assert "BatchNormalization" not in ops and "Conv" in ops and "ConvTranspose" in ops
    [y] = ort_run(out / "m.onnx", x)
    assert rel_err(ref64, torch.from_numpy(y)) <= 1e-5
    onnx_report = result.report.outputs[1]
    assert onnx_report.onnx_max_rel_err is not None and onnx_report.onnx_max_rel_err <= 1e-5


def test_dir_loads_with_plain_import(converted, monkeypatch: pytest.MonkeyPatch) -> None:
    _, x, ref64, out, result = converted
    d = out / "m_dir"
    assert {"model.py", "weights.safetensors"} <= {p.name for p in d.iterdir()}
    code = (d / "model.py").read_text()
    assert "import normrewrite" not in code and "from normrewrite" not in code
    assert "batch_norm" not in code
    monkeypatch.syspath_prepend(str(d))
    monkeypatch.delitem(sys.modules, "model", raising=False)
    model_py = importlib.import_module("model")
    try:
        m = model_py.load()
        with torch.no_grad():
            y = m(x)
        torch.testing.assert_close(y, result.graph_module(x), rtol=1e-6, atol=1e-6)
        assert rel_err(ref64, y) <= 1e-5
    finally:
        sys.modules.pop("model", None)


# --------------------------------------------------------------------------- failures and atomicity


def test_output_format() -> None:
    assert emit.output_format(Path("a.pt2")) == "pt2"
    assert emit.output_format(Path("a.onnx")) == "onnx"
    assert emit.output_format(Path("out/")) == "dir"
    with pytest.raises(EmitError, match="cannot tell the output format"):
        emit.output_format(Path("a.txt"))


def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_save(ep: object, f: Any, **_: Any) -> None:  # torch.export.save gets a file object
        f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(torch.export, "save", broken_save)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    with pytest.raises(EmitError, match="disk full"):
        normrewrite.convert(
            model, ["fold-bn"], (torch.randn(1, 3, 6, 6),), outputs=[tmp_path / "m.pt2"]
        )
    assert list(tmp_path.iterdir()) == []


def test_a_failing_later_output_removes_the_earlier_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_dir(*args: object, **kwargs: object) -> None:
        raise EmitError("writing the directory failed: simulated")

    monkeypatch.setattr(emit, "write_dir", broken_dir)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    outs = [tmp_path / "m.pt2", tmp_path / "m.onnx", tmp_path / "d"]
    with pytest.raises(EmitError, match="simulated"):
        normrewrite.convert(model, ["fold-bn"], (torch.randn(1, 3, 6, 6),), outputs=outs)
    assert list(tmp_path.iterdir()) == []


def test_atomic_file_and_dir(tmp_path: Path) -> None:
    dest = tmp_path / "f.bin"
    with pytest.raises(RuntimeError), atomic_file(dest) as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError
    assert list(tmp_path.iterdir()) == []
    with atomic_file(dest) as tmp:
        assert tmp.parent == tmp_path and tmp.name.endswith(".bin")
        tmp.write_bytes(b"done")
    assert dest.read_bytes() == b"done"
    d = tmp_path / "d"
    d.mkdir()
    (d / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(d) as tmpd:
        (tmpd / "new.txt").write_text("new")
        raise RuntimeError
    assert [p.name for p in d.iterdir()] == ["old.txt"]
    with atomic_dir(d) as tmpd:
        (tmpd / "new.txt").write_text("new")
    assert [p.name for p in d.iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "f.bin"]


def test_check_output(tmp_path: Path) -> None:
    src = tmp_path / "in.pt2"
    src.write_bytes(b"x")
    with pytest.raises(UsageError, match="is the input"):
        check_output(src, force=True, inputs=(src,))
    with pytest.raises(UsageError, match="contains the input"):
        check_output(tmp_path, force=True, inputs=(src,))  # a DIR output holding the input
    with pytest.raises(UsageError, match="exists; pass --force"):
        check_output(src, force=False)
    with pytest.raises(UsageError, match="does not exist"):
        check_output(tmp_path / "no" / "out.pt2", force=False)
    check_output(tmp_path / "new.pt2", force=False)
