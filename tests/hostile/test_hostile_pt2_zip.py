"""Zip-parser differentials: Python's ``zipfile`` (the vetting) and torch's C++ reader (the
loading) must see the same entries with the same bytes, else the vetting checks one archive and
torch loads another. Every payload below is a pickle torch would unpickle."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest
from hostile_kit import (
    central_headers,
    evil_pickle,
    patch_local_headers,
    read_entries,
    refused,
    save_program,
    write_entries,
)

from normrewrite.errors import LoadError
from normrewrite.load.pt2 import check_pt2

_SAMPLE = "data/sample_inputs/model.pt"


def _with_payload(root: Path) -> Path:
    src = save_program(root / "src.pt2")
    entries = [(n, evil_pickle(root) if n.endswith(_SAMPLE) else d) for n, d in read_entries(src)]
    src.unlink()
    return write_entries(root / "evil.pt2", entries)


def _bad_crc(root: Path) -> Path:
    """The payload's CRC is wrong in both headers: zipfile cannot read it, torch reads it."""
    evil = _with_payload(root)
    raw = bytearray(evil.read_bytes())

    def patch(name: str, data: bytearray, at: int) -> None:
        if name.endswith(_SAMPLE):
            struct.pack_into("<I", data, at + 14, 0xDEADBEEF)

    patch_local_headers(evil, patch)
    raw = bytearray(evil.read_bytes())
    for at in central_headers(bytes(raw)):
        n = struct.unpack_from("<H", raw, at + 28)[0]
        if raw[at + 46 : at + 46 + n].decode().endswith(_SAMPLE):
            struct.pack_into("<I", raw, at + 16, 0xDEADBEEF)
    evil.write_bytes(bytes(raw))
    return evil


def _local_name_differs(root: Path) -> Path:
    """The local header names another file than the central directory (same length)."""
    evil = _with_payload(root)

    def patch(name: str, data: bytearray, at: int) -> None:
        if name.endswith(_SAMPLE):
            n = struct.unpack_from("<H", data, at + 26)[0]
            data[at + 30 + n - 1 : at + 30 + n] = b"x"

    patch_local_headers(evil, patch)
    return evil


def _duplicate(root: Path, payload_first: bool) -> Path:
    src = save_program(root / "src.pt2")
    entries = read_entries(src)
    src.unlink()
    name, data = next((n, d) for n, d in entries if n.endswith(_SAMPLE))
    bad = (name, evil_pickle(root))
    i = next(i for i, (n, _) in enumerate(entries) if n == name)
    entries[i : i + 1] = [bad, (name, data)] if payload_first else [(name, data), bad]
    return write_entries(root / "evil.pt2", entries)


CASES = {  # case: (build, word the refusal names)
    "bad crc": (_bad_crc, "unreadable"),
    "local name differs": (_local_name_differs, "local header"),
    "duplicate, payload first": (lambda r: _duplicate(r, True), "duplicate"),
    "duplicate, payload last": (lambda r: _duplicate(r, False), "duplicate"),
}


@pytest.mark.filterwarnings("ignore:Duplicate name")
@pytest.mark.parametrize("case", list(CASES))
def test_archive_read_differently_is_refused(tmp_path: Path, case: str) -> None:
    build, word = CASES[case]
    evil = build(tmp_path)
    line = refused(tmp_path, "convert", str(evil), "-o", str(tmp_path / "out.pt2"))
    assert word in line
    with pytest.raises(LoadError):
        check_pt2(evil)


def test_compressed_entry_with_bad_crc_is_refused(tmp_path: Path) -> None:
    """Deflated entries are checked too (the CRC is only verified by reading the whole entry)."""
    evil = _with_payload(tmp_path)
    entries = read_entries(evil)
    import zipfile

    with zipfile.ZipFile(evil, "w", zipfile.ZIP_DEFLATED) as z:
        for n, d in entries:
            z.writestr(n, d)
    raw = bytearray(evil.read_bytes())
    for at in central_headers(bytes(raw)):
        n = struct.unpack_from("<H", raw, at + 28)[0]
        if raw[at + 46 : at + 46 + n].decode().endswith(_SAMPLE):
            struct.pack_into("<I", raw, at + 16, zlib.crc32(b"other"))
    evil.write_bytes(bytes(raw))
    with pytest.raises(LoadError):
        check_pt2(evil)
