"""Shared tools of the hostile-input corpus: build hostile files in code, run the CLI on them,
and assert the one outcome every case must have — refused with one line on stderr, non-zero
exit, no traceback, nothing written, no marker, every input byte-identical."""

from __future__ import annotations

import hashlib
import io
import pickle
import struct
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from click.testing import CliRunner, Result
from torch import nn

from normrewrite.cli import main

MARKER = "PWNED"


class Evil:
    """Unpickling this creates the marker file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def evil_pickle(root: Path) -> bytes:
    return pickle.dumps(Evil(root / MARKER))


def snapshot(root: Path) -> dict[str, str]:
    """Every file and directory under ``root`` with its content hash (and mode)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "link"
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def cli(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def refused(root: Path, *args: str, code: int | None = None) -> str:
    """Run the CLI with ``args`` and assert it refuses cleanly; returns the error line."""
    before = snapshot(root)
    r = cli(*args)
    after = snapshot(root)
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert r.exit_code != 0, r.output
    if code is not None:
        assert r.exit_code == code, (r.exit_code, r.output)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.output and "internal error" not in r.output, r.output
    assert not (root / MARKER).exists(), "the payload ran"
    assert after == before, f"files changed: {set(after.items()) ^ set(before.items())}"
    return lines[0]


# --------------------------------------------------------------------------- .pt2 archives


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()


def save_program(path: Path, *, dynamic: bool = False) -> Path:
    x = torch.randn(2, 3, 8, 8)
    shapes = ({0: torch.export.Dim("batch", min=1, max=64)},) if dynamic else None
    ep = torch.export.export(small_net(), (x,), dynamic_shapes=shapes)
    torch.export.save(ep, str(path))
    return path


Entries = list[tuple[str, bytes]]


def read_entries(path: Path) -> Entries:
    with zipfile.ZipFile(path) as z:
        return [(i.filename, z.read(i)) for i in z.infolist()]


def write_entries(path: Path, entries: Sequence[tuple[str, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, data in entries:
            z.writestr(zipfile.ZipInfo(name), data)
    return path


def rewrite(src: Path, dest: Path, edit: Callable[[Entries], Entries]) -> Path:
    return write_entries(dest, edit(read_entries(src)))


def replace_entry(suffix: str, data: bytes) -> Callable[[Entries], Entries]:
    return lambda entries: [(n, data if n.endswith(suffix) else d) for n, d in entries]


def patch_local_headers(path: Path, patch: Callable[[str, bytearray, int], None]) -> None:
    """Call ``patch(name, raw, offset)`` for each entry's local header (at ``offset`` in the
    raw bytes), then write the bytes back."""
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(io.BytesIO(bytes(raw))) as z:
        infos = z.infolist()
    for info in infos:
        patch(info.filename, raw, info.header_offset)
    path.write_bytes(bytes(raw))


def central_headers(raw: bytes) -> list[int]:
    """Offsets of the central-directory headers."""
    eocd = raw.rfind(b"PK\x05\x06")
    count, _size, at = struct.unpack_from("<HII", raw, eocd + 10)
    out = []
    for _ in range(count):
        out.append(at)
        n, m, k = struct.unpack_from("<HHH", raw, at + 28)
        at += 46 + n + m + k
    return out
