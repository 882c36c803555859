"""AOTInductor packages: written by convert, loadable in a fresh process without the model's code
or normrewrite, numerically equal to the original; CUDA requests fail at once with one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from normrewrite.cli import main
from normrewrite.emit.aoti import check_compile_options, is_aoti_output, output_formats
from normrewrite.errors import EmitError, UsageError

FACTORY = """
import torch
from torch import nn
from pathlib import Path

def build():
    Path({marker!r}).write_text("called")
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 5))
    with torch.no_grad():
        m[1].running_mean.uniform_(-1, 1)
        m[1].running_var.uniform_(0.5, 2)
    return m.eval(), (torch.randn(2, 3, 8, 8),)
"""


def _factory(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "factory-ran"
    path = tmp_path / "tiny.py"
    path.write_text(FACTORY.format(marker=str(marker)))
    return path, marker


@pytest.mark.slow
def test_convert_writes_both_kinds_and_the_package_runs_alone(tmp_path: Path) -> None:
    """A Hugging Face BERT: the plain program and the AOTInductor package both load and run in a
    process with neither transformers nor normrewrite (outputs are plain tensors), and match an
    fp64 run of the original."""
    from models import bert, token_ids

    model = bert(layers=1, hidden=16)
    model.save_pretrained(tmp_path / "bert")
    plain, compiled, report = tmp_path / "m.pt2", tmp_path / "m.aoti.pt2", tmp_path / "r.json"
    res = CliRunner().invoke(
        main,
        [
            "convert",
            str(tmp_path / "bert"),
            "-p",
            "fold-bn",
            "-o",
            str(plain),
            "-o",
            str(compiled),
            "--report",
            str(report),
        ],
    )
    assert res.exit_code == 0, res.output
    outputs = json.loads(report.read_text())["outputs"]
    assert [o["format"] for o in outputs] == ["pt2", "aoti"]
    assert "compiled in" in outputs[1]["notes"][0] and "max rel err" in outputs[1]["notes"][0]
    assert "AOTInductor package for cpu" in res.output
    assert not list(tmp_path.glob(".*partial*"))  # no temporary files left behind

    x = token_ids(batch=1, seq=16, seed=1)
    with torch.no_grad():
        ref = model.double()(x)
    torch.save({"x": x}, tmp_path / "x.pt")

    # a fresh interpreter with neither transformers nor normrewrite importable
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path = [p for p in sys.path if "work" not in p]
        x = torch.load({str(tmp_path / "x.pt")!r})["x"]
        plain = torch.export.load({str(plain)!r}).module()(x)
        compiled = torch._inductor.aoti_load_package({str(compiled)!r})(x)
        torch.save({{"plain": list(plain), "compiled": list(compiled)}}, "y.pt")
        assert not any(m.split(".")[0] in ("normrewrite", "transformers") for m in sys.modules)
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = torch.load(tmp_path / "y.pt")
    for kind in ("plain", "compiled"):
        assert len(got[kind]) == 2  # last_hidden_state, pooler_output
        for want, y in zip((ref.last_hidden_state, ref.pooler_output), got[kind], strict=True):
            assert float((y.double() - want).abs().max() / want.abs().max()) <= 1e-5, kind


def test_cuda_without_toolchain_fails_in_one_line_before_loading(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the failure path does not apply (compiles for real)")
    factory, marker = _factory(tmp_path)
    res = CliRunner().invoke(
        main,
        [
            "convert",
            f"{factory}:build",
            "-o",
            str(tmp_path / "m.pt2"),
            "--compile",
            "aoti",
            "--device",
            "cuda",
        ],
    )
    assert res.exit_code == 1
    message = res.output.strip()
    assert len(message.splitlines()) == 1 and "cuda" in message.lower()
    assert not marker.exists()  # failed before the model was even built
    assert not (tmp_path / "m.pt2").exists()


def test_which_outputs_are_compiled_and_bad_options() -> None:
    assert is_aoti_output("m.aoti.pt2", None)
    assert not is_aoti_output("m.pt2", None)
    assert is_aoti_output("m.pt2", "aoti")
    assert not is_aoti_output("m.onnx", "aoti")
    with pytest.raises(UsageError, match="--compile"):
        check_compile_options("tensorrt", "cpu")
    with pytest.raises(UsageError, match="--device"):
        check_compile_options("aoti", "tpu")
    with pytest.raises(UsageError, match=r"needs a \.pt2 output"):
        output_formats([Path("m.onnx")], ["onnx"], "aoti")
    assert output_formats([Path("a.pt2"), Path("b.aoti.pt2")], ["pt2", "pt2"], None) == [
        "pt2",
        "aoti",
    ]
    if not torch.cuda.is_available():
        with pytest.raises(EmitError, match="CUDA"):
            check_compile_options("aoti", "cuda")
