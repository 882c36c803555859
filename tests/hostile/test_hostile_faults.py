"""Faults: a full disk, a signal while outputs are committed, a read-only output directory, a
umask, absurd input sizes. Each ends with one line, the right exit code, and either every
promised output or none."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hostile_kit import cli, refused

_FACTORY = """
import torch
from torch import nn

def build():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    return m, (torch.randn(1, 3, 8, 8),)

def big():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1024, 1024), nn.Linear(1024, 1024)).eval(), (torch.randn(1, 1024),)
"""


@pytest.fixture()
def factory(tmp_path: Path) -> Path:
    f = tmp_path / "model.py"
    f.write_text(_FACTORY)
    return f


def _mount(where: Path, options: str) -> bool:
    where.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True
    )
    return r.returncode == 0


@pytest.fixture()
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MB file system (needs the right to mount, as root in CI)."""
    d = tmp_path / "tiny"
    if not _mount(d, "size=1m"):
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield d
    finally:
        subprocess.run(["umount", str(d)], check=False)


@pytest.fixture()
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "ro"
    if os.geteuid() != 0:
        d.mkdir()
        d.chmod(0o555)
        yield d
        d.chmod(0o755)
        return
    if not _mount(d, "ro,size=1m"):
        pytest.skip("cannot mount a read-only tmpfs here")
    try:
        yield d
    finally:
        subprocess.run(["umount", str(d)], check=False)


def test_disk_full_while_writing_a_pt2_exits_1_cleanly(factory: Path, tiny_disk: Path) -> None:
    """A real ENOSPC inside torch's C++ zip writer: one line, exit 1, no abort, nothing left."""
    out = tiny_disk / "out.pt2"
    r = subprocess.run(
        [sys.executable, "-m", "normrewrite.cli", "convert", f"{factory}:big", "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 1, (r.returncode, r.stderr[-1000:])
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-1000:]
    assert "space" in lines[0], lines[0]
    assert os.listdir(tiny_disk) == []


def _outputs(tmp_path: Path) -> list[Path]:
    return [tmp_path / "a.pt2", tmp_path / "b", tmp_path / "r.json"]


def _all_or_nothing(code: int, stderr: str, outputs: list[Path], tmp_path: Path) -> None:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert code != 0, "an interrupted run must not exit 0"
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert not [p.name for p in tmp_path.iterdir() if ".partial" in p.name or ".old" in p.name]
    exist = [p.exists() for p in outputs]
    if all(exist):
        assert "written" in lines[0] and "nothing" not in lines[0], lines[0]
    else:
        assert not any(exist), f"some outputs exist: {exist}"
        assert "nothing written" in lines[0], lines[0]


def _signal_on(monkeypatch: pytest.MonkeyPatch, module: object, name: str, after: int) -> None:
    """Deliver SIGTERM to this process right after the ``after``-th call of ``module.name``."""
    real, calls = getattr(module, name), []

    def wrapped(*args: object, **kwargs: object) -> object:
        result = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == after:
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(module, name, wrapped)


@pytest.mark.parametrize("after", [1, 2, 3])
def test_signal_during_the_commit_is_all_or_nothing(
    tmp_path: Path, factory: Path, monkeypatch: pytest.MonkeyPatch, after: int
) -> None:
    """SIGTERM just after the first (second, third) file is renamed into place."""
    from normrewrite.emit import files

    _signal_on(monkeypatch, files.os, "replace", after)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        r = cli(
            "convert",
            f"{factory}:build",
            "-o",
            str(tmp_path / "a.pt2"),
            "-o",
            str(tmp_path / "b") + "/",
            "--report",
            str(tmp_path / "r.json"),
            "-q",
        )
    finally:
        signal.signal(signal.SIGTERM, previous)
    _all_or_nothing(r.exit_code, r.stderr, _outputs(tmp_path), tmp_path)


def test_signal_after_the_outputs_before_the_report(
    tmp_path: Path, factory: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM between the model outputs and the report: never an output without its report."""
    import normrewrite.cli_render

    _signal_on(monkeypatch, normrewrite.cli_render, "render_report", 1)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        r = cli(
            "convert",
            f"{factory}:build",
            "-o",
            str(tmp_path / "a.pt2"),
            "-o",
            str(tmp_path / "b") + "/",
            "--report",
            str(tmp_path / "r.json"),
        )
    finally:
        signal.signal(signal.SIGTERM, previous)
    _all_or_nothing(r.exit_code, r.stderr, _outputs(tmp_path), tmp_path)


def test_outputs_honour_the_umask(tmp_path: Path, factory: Path) -> None:
    old = os.umask(0o027)
    try:
        r = cli(
            "convert",
            f"{factory}:build",
            "-o",
            str(tmp_path / "a.pt2"),
            "-o",
            str(tmp_path / "b.onnx"),
            "-o",
            str(tmp_path / "c") + "/",
            "--report",
            str(tmp_path / "r.json"),
            "-q",
        )
    finally:
        os.umask(old)
    assert r.exit_code == 0, r.output
    modes = {
        p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir() if p.name != "model.py"
    }
    modes.update(
        {f"c/{p.name}": stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "c").iterdir()}
    )
    want = {n: (0o750 if n == "c" else 0o640) for n in modes}
    assert modes == want


def test_read_only_output_directory_is_refused_before_the_work(
    tmp_path: Path, factory: Path, read_only_dir: Path
) -> None:
    line = refused(tmp_path, "convert", f"{factory}:build", "-o", str(read_only_dir / "o.pt2"))
    assert "writ" in line and "internal error" not in line


@pytest.mark.parametrize(
    "spec, word",
    [
        ("1x3x99999999999999999999999x16", "dimension"),
        ("1x3x30000x30000", "over the limit"),
    ],
)
def test_input_sizes_are_bounded(tmp_path: Path, factory: Path, spec: str, word: str) -> None:
    args = ["convert", f"{factory}:build", "--input", spec, "-o", str(tmp_path / "o.pt2")]
    line = refused(tmp_path, *args, code=2)
    assert word in line and ("--max-input-bytes" in line or word == "dimension")


def test_the_input_limit_is_an_option(tmp_path: Path, factory: Path) -> None:
    args = ["convert", f"{factory}:build", "--input", "1x3x8x8", "-q"]
    line = refused(
        tmp_path, *args, "-o", str(tmp_path / "a.pt2"), "--max-input-bytes", "500", code=2
    )
    assert "768 bytes" in line and "over the limit of 500" in line
    r = cli(*args, "-o", str(tmp_path / "b.pt2"), "--max-input-bytes", "1000")
    assert r.exit_code == 0, r.output
