"""The pre-2.8 .pt2 layout (top-level ``version``, ``serialized_*.json``/``.pt``) reaches
torch's old-format fallback, which unpickles with ``weights_only=False``: refused without
``--trust-pickle``, however the archive dresses it up."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hostile_kit import evil_pickle, read_entries, refused, save_program, write_entries

from normrewrite.errors import LoadError
from normrewrite.load.pt2 import check_pt2


def _legacy(root: Path, *, with_new_markers: bool) -> Path:
    src = save_program(root / "src.pt2")
    program = next(d for n, d in read_entries(src) if "/models/" in n)
    src.unlink()
    entries = [
        ("version", b"8.0"),
        ("serialized_exported_program.json", program),
        ("serialized_state_dict.json", evil_pickle(root)),
        ("serialized_constants.json", evil_pickle(root)),
    ]
    if with_new_markers:  # what the old vetting looked for
        entries += [("archive_format", b"pt2"), ("archive_version", b"0")]
    return write_entries(root / "legacy.pt2", entries)


@pytest.mark.parametrize("with_new_markers", [False, True])
def test_legacy_layout_is_refused(tmp_path: Path, with_new_markers: bool) -> None:
    evil = _legacy(tmp_path, with_new_markers=with_new_markers)
    line = refused(tmp_path, "convert", str(evil), "-o", str(tmp_path / "out.pt2"))
    assert "--trust-pickle" in line and "legacy" in line
    with pytest.raises(LoadError, match="legacy"):
        check_pt2(evil)


def test_new_layout_with_a_legacy_entry_is_refused(tmp_path: Path) -> None:
    """A valid program plus a top-level ``version``: torch falls back to the old reader when
    the new one fails, so the legacy entries alone are refused."""
    src = save_program(tmp_path / "src.pt2")
    entries = read_entries(src)
    src.unlink()
    entries += [("version", b"8.0"), ("serialized_state_dict.json", evil_pickle(tmp_path))]
    evil = write_entries(tmp_path / "mixed.pt2", entries)
    with pytest.raises(LoadError, match="legacy"):
        check_pt2(evil)
    json.dumps(0)
