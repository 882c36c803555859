"""Nothing lost: outputs are atomic, existing outputs need --force, inputs are never modified (also
by failing commands), and an interrupted run (SIGINT/SIGTERM while writing) leaves no partial
file and no temporary files behind."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from normrewrite.cli import main

_FACTORY = """
import torch
from torch import nn

def build():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    m[1].running_var.uniform_(0.5, 2)
    return m, (torch.randn(1, 3, 8, 8),)

def big():
    torch.manual_seed(0)
    layers = [nn.Linear(4096, 4096) for _ in range({n})]
    return nn.Sequential(*layers).eval(), (torch.randn(1, 4096),)
"""


def _digest(path: Path) -> dict[str, str]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {
        str(f.relative_to(path.parent)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files
    }


def _cli(*args: str) -> tuple[int, str]:
    r = CliRunner().invoke(main, list(args))
    return r.exit_code, r.output


def _leftovers(d: Path) -> list[str]:
    return [p.name for p in d.iterdir() if ".partial" in p.name or p.name.endswith(".old")]


@pytest.fixture()
def factory(tmp_path: Path) -> Path:
    f = tmp_path / "model.py"
    f.write_text(_FACTORY.format(n=6))
    return f


def test_existing_output_needs_force(tmp_path: Path, factory: Path) -> None:
    out = tmp_path / "out.pt2"
    out.write_bytes(b"precious")
    code, msg = _cli("convert", f"{factory}:build", "-o", str(out), "-q")
    assert code == 2 and "--force" in msg  # a usage error
    assert out.read_bytes() == b"precious"
    (tmp_path / "outdir").mkdir()
    (tmp_path / "outdir" / "keep.txt").write_text("keep")
    code, msg = _cli("convert", f"{factory}:build", "-o", str(tmp_path / "outdir") + "/", "-q")
    assert code == 2 and (tmp_path / "outdir" / "keep.txt").read_text() == "keep"
    code, msg = _cli("convert", f"{factory}:build", "-o", str(out), "-q", "--force")
    assert code == 0, msg
    assert out.read_bytes()[:2] == b"PK"  # replaced by a real program
    assert not _leftovers(tmp_path)


def test_report_is_not_overwritten_without_force(tmp_path: Path, factory: Path) -> None:
    report = tmp_path / "r.json"
    report.write_text("old")
    code, _ = _cli(
        "convert", f"{factory}:build", "-o", str(tmp_path / "o.pt2"), "--report", str(report), "-q"
    )
    assert code == 2 and report.read_text() == "old" and not (tmp_path / "o.pt2").exists()


def test_inputs_never_modified(tmp_path: Path, factory: Path) -> None:
    """Every command, succeeding or failing, leaves every input byte-identical."""
    pt2 = tmp_path / "m.pt2"
    assert _cli("convert", f"{factory}:build", "-o", str(pt2), "-q")[0] == 0
    import transformers
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    hf = tmp_path / "hf"
    transformers.LlamaModel(cfg).save_pretrained(hf)
    inputs = [factory, pt2, hf]
    before = {str(p): _digest(p) for p in inputs}
    commands = [
        [
            "convert",
            f"{factory}:build",
            "-o",
            str(tmp_path / "a.onnx"),
            "-o",
            str(tmp_path / "a_dir") + "/",
            "-q",
        ],
        [
            "convert",
            f"{factory}:build",
            "-p",
            "fold-bn:shared=nope",
            "-o",
            str(tmp_path / "b.pt2"),
        ],  # bad option
        ["convert", f"{factory}:build", "-o", str(factory)],  # output = input
        ["convert", str(pt2), "-o", str(pt2), "--force"],  # output = input, even with --force
        ["convert", str(pt2), "-o", str(tmp_path / "c.pt2"), "-q"],
        ["convert", str(pt2), "--rtol", "-1", "-o", str(tmp_path / "d.pt2")],  # fails
        ["inspect", str(pt2)],
        ["inspect", f"{factory}:build"],
        ["convert", str(hf), "--meta", "-o", str(tmp_path / "e") + "/", "-q"],
        ["convert", str(hf), "--meta", "-o", str(hf) + "/", "--force"],  # onto the input dir
        ["convert", str(hf), "-o", str(hf / "x.pt2")],  # into the input dir
    ]
    codes = []
    for cmd in commands:
        codes.append(_cli(*cmd)[0])
        for p in inputs:
            assert _digest(p) == before[str(p)], f"{cmd} modified {p}"
    assert codes[0] == 0 and codes[4] == 0 and codes[8] == 0
    assert all(c != 0 for c in (codes[1], codes[2], codes[3], codes[5], codes[9], codes[10])), codes
    assert not _leftovers(tmp_path) and not _leftovers(hf)


def _interrupt_while_writing(
    cmd: list[str], out_dir: Path, prefix: str, sig: int, timeout: float = 120
) -> tuple[int, str, bool]:
    """Start ``cmd``, wait until its temporary output (``prefix``*partial*) appears, signal it.
    Returns (exit code, stderr, whether the signal was sent during the write)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    sent = False
    while time.monotonic() < deadline and proc.poll() is None:
        if any(p.name.startswith(prefix) and ".partial" in p.name for p in out_dir.iterdir()):
            time.sleep(0.02)
            proc.send_signal(sig)
            sent = True
            break
        time.sleep(0.002)
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err, sent


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_pt2_write_leaves_nothing(tmp_path: Path, sig: int) -> None:
    """A real signal, delivered to the CLI process while it writes the .pt2."""
    f = tmp_path / "big.py"
    f.write_text(_FACTORY.format(n=3))  # 3 × 64 MB of weights: writing takes a moment
    out = tmp_path / "out.pt2"
    cmd = [
        sys.executable,
        "-m",
        "normrewrite.cli",
        "convert",
        f"{f}:big",
        "--no-verify",
        "-o",
        str(out),
    ]
    code, err, sent = _interrupt_while_writing(cmd, tmp_path, ".out.pt2.", sig)
    assert sent, f"the write phase was never seen: {err[-500:]}"
    assert code != 0 and "interrupted" in err, err[-500:]
    assert not out.exists()
    assert not _leftovers(tmp_path), _leftovers(tmp_path)


@pytest.mark.parametrize("existing", [False, True])
def test_interrupted_streamed_write_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, existing: bool
) -> None:
    """Ctrl-C in the middle of writing the shards (after some tensors are written): no output
    directory (or the old one intact, with --force), no temporary directory."""
    import transformers

    from normrewrite import stream
    from normrewrite.stream.shards import ShardWriter

    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    src = tmp_path / "src"
    transformers.LlamaModel(cfg).save_pretrained(src)
    out = tmp_path / "out"
    if existing:
        out.mkdir()
        (out / "old.txt").write_text("old")
    real_write, calls = ShardWriter.write, []

    def write(self: ShardWriter, key: str, value: torch.Tensor) -> int:
        calls.append(key)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_write(self, key, value)

    monkeypatch.setattr(ShardWriter, "write", write)
    with pytest.raises(KeyboardInterrupt):
        stream.convert_checkpoint(src, [], out, max_shard_size=2000, force=existing)
    assert len(calls) == 5
    if existing:
        assert sorted(os.listdir(out)) == ["old.txt"]
    else:
        assert not out.exists()
    assert not _leftovers(tmp_path), _leftovers(tmp_path)


def test_atomic_file_cleans_up_on_error(tmp_path: Path) -> None:
    from normrewrite.emit.files import atomic_dir, atomic_file

    dest = tmp_path / "x.bin"
    with pytest.raises(RuntimeError), atomic_file(dest) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("boom")
    assert not dest.exists() and not _leftovers(tmp_path)
    d = tmp_path / "d"
    d.mkdir()
    (d / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_dir(d) as tmp:
        (tmp / "new.txt").write_text("new")
        raise KeyboardInterrupt
    assert sorted(os.listdir(d)) == ["old.txt"] and not _leftovers(tmp_path)
