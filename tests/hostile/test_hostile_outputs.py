"""Outputs that would destroy inputs: no output (model, report, directory, external-data file)
may be, contain or lie inside anything the run reads, and all outputs must be distinct. Each
case is a usage error (exit 2) before any work, even with --force."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hostile_kit import refused, save_program

_FACTORY = """
import torch
from torch import nn

def build():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    return m, (torch.randn(1, 3, 8, 8),)
"""


def _factory(root: Path) -> str:
    proj = root / "proj"
    proj.mkdir()
    (proj / "model.py").write_text(_FACTORY)
    (proj / "notes.txt").write_text("a sibling the user keeps")
    return f"{proj / 'model.py'}:build"


def _onnx(root: Path, location: str) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((2, 2), dtype=np.float32), "W")
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        [w],
    )
    path = root / "m.onnx"
    onnx.save_model(
        helper.make_model(g),
        str(path),
        save_as_external_data=True,
        location=location,
        size_threshold=0,
    )
    return path


def _hf_with_linked_weights(root: Path) -> Path:
    """An HF folder whose weights are symbolic links into a blob store (as the hub cache has)."""
    import models

    hf = root / "hf"
    models.bert(layers=1, hidden=16).save_pretrained(hf)
    blobs = root / "blobs"
    blobs.mkdir()
    (hf / "model.safetensors").rename(blobs / "abc123")
    (hf / "model.safetensors").symlink_to(blobs / "abc123")
    return hf


Case = Callable[[Path], list[str]]


def _dir_holding_factory(root: Path) -> list[str]:
    ref = _factory(root)
    return ["convert", ref, "-o", str(root / "proj") + "/", "--force"]


def _report_onto_factory(root: Path) -> list[str]:
    ref = _factory(root)
    return [
        "convert",
        ref,
        "-o",
        str(root / "o.pt2"),
        "--report",
        str(root / "proj" / "model.py"),
        "--force",
    ]


def _report_equals_output(root: Path) -> list[str]:
    ref = _factory(root)
    return ["convert", ref, "-o", str(root / "o.pt2"), "--report", str(root / "o.pt2")]


def _two_equal_outputs(root: Path) -> list[str]:
    ref = _factory(root)
    (root / "sub").mkdir()
    return ["convert", ref, "-o", str(root / "o.pt2"), "-o", str(root / "sub" / ".." / "o.pt2")]


def _output_inside_output(root: Path) -> list[str]:
    ref = _factory(root)
    return ["convert", ref, "-o", str(root / "out") + "/", "-o", str(root / "out" / "m.pt2")]


def _onto_external_data(root: Path) -> list[str]:
    src = _onnx(root, "w.onnx")  # the data file has a model's suffix
    return ["convert", str(src), "-p", "fold-bn", "-o", str(root / "w.onnx"), "--force"]


def _companion_is_external_data(root: Path) -> list[str]:
    src = _onnx(root, "o.onnx.data")  # what an ONNX output o.onnx writes its weights to
    return ["convert", str(src), "-p", "fold-bn", "-o", str(root / "o.onnx"), "--force"]


def _symlinked_output(root: Path) -> list[str]:
    src = save_program(root / "in.pt2")
    (root / "link.pt2").symlink_to(src)
    return ["convert", str(src), "-o", str(root / "link.pt2"), "--force"]


def _into_hf_folder(root: Path) -> list[str]:
    hf = _hf_with_linked_weights(root)
    return ["convert", str(hf), "-o", str(hf / "x.pt2")]


def _onto_hf_blob_store(root: Path) -> list[str]:
    hf = _hf_with_linked_weights(root)
    return ["convert", str(hf), "-o", str(root / "blobs") + "/", "--force"]


def _meta_onto_hf_blob_store(root: Path) -> list[str]:
    hf = _hf_with_linked_weights(root)
    return ["convert", str(hf), "--meta", "-o", str(root / "blobs") + "/", "--force"]


def _onto_pass_data(root: Path) -> list[str]:
    ref = _factory(root)
    data = root / "data"
    data.mkdir()
    np.savez(data / "calib.npz", x=np.random.default_rng(0).standard_normal((4, 3, 8, 8)))
    return [
        "convert",
        ref,
        "-p",
        f"recalibrate-bn:data={data / 'calib.npz'}",
        "-o",
        str(data) + "/",
        "--force",
    ]


CASES: dict[str, Case] = {
    "dir output holds the factory": _dir_holding_factory,
    "report onto the factory": _report_onto_factory,
    "report equals an output": _report_equals_output,
    "two equal outputs": _two_equal_outputs,
    "output inside another output": _output_inside_output,
    "output onto an external-data file": _onto_external_data,
    "output's .data onto an external-data file": _companion_is_external_data,
    "symlinked output onto the input": _symlinked_output,
    "output inside the HF folder": _into_hf_folder,
    "output dir holds the HF weights (via a link)": _onto_hf_blob_store,
    "--meta output dir holds the HF weights": _meta_onto_hf_blob_store,
    "output dir holds a pass's data file": _onto_pass_data,
}


@pytest.mark.parametrize("case", list(CASES))
def test_output_overlapping_an_input_is_a_usage_error(tmp_path: Path, case: str) -> None:
    args = CASES[case](tmp_path)
    line = refused(tmp_path, *args, code=2)
    assert any(w in line for w in ("input", "output")), line


def test_distinct_outputs_beside_the_inputs_are_fine(tmp_path: Path) -> None:
    from hostile_kit import cli

    ref = _factory(tmp_path)
    r = cli(
        "convert",
        ref,
        "-o",
        str(tmp_path / "a.pt2"),
        "-o",
        str(tmp_path / "b") + "/",
        "--report",
        str(tmp_path / "r.json"),
        "-q",
    )
    assert r.exit_code == 0, r.output
    assert sorted(os.listdir(tmp_path)) == ["a.pt2", "b", "proj", "r.json"]
