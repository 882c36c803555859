"""Native code in a .pt2: an AOTInductor shared object inside an archive is loaded (its
constructors run) by ``torch.export.load``. Refused unless ``--trust-native-code``, wherever it
sits and whatever it is named."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from hostile_kit import MARKER, read_entries, refused, save_program, write_entries

from normrewrite.errors import LoadError
from normrewrite.load.pt2 import check_pt2


def _shared_object(root: Path) -> bytes:
    """A shared object whose constructor creates the marker (an ELF header when no compiler)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return b"\x7fELF\x02\x01\x01" + bytes(57)
    src = root / "payload.c"
    src.write_text(
        "#include <stdio.h>\n"
        f'__attribute__((constructor)) static void run(void) {{ fopen("{root / MARKER}", "w"); }}\n'
    )
    so = root / "payload.so"
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(so), str(src)], check=True)
    data = so.read_bytes()
    src.unlink()
    so.unlink()
    return data


@pytest.mark.parametrize(
    "where",
    ["data/aotinductor/model/evil.so", "data/aotinductor/model/kernel.bin", "extra/lib.dylib"],
)
def test_shared_object_in_a_program_is_refused(tmp_path: Path, where: str) -> None:
    src = save_program(tmp_path / "src.pt2")
    entries = read_entries(src)
    root = entries[0][0].split("/")[0]
    entries.insert(0, (f"{root}/{where}", _shared_object(tmp_path)))
    src.unlink()
    evil = write_entries(tmp_path / "evil.pt2", entries)
    line = refused(tmp_path, "convert", str(evil), "-o", str(tmp_path / "out.pt2"))
    assert "--trust-native-code" in line
    with pytest.raises(LoadError, match="native code"):
        check_pt2(evil)
    check_pt2(evil, trust_native_code=True)  # the explicit opt-in


def test_aoti_package_is_not_a_program(tmp_path: Path) -> None:
    """A package with compiled code and no program: refused, even with the opt-in, with a line
    that says how such a package is loaded."""
    entries = [
        ("pkg/archive_format", b"pt2"),
        ("pkg/archive_version", b"0"),
        ("pkg/.data/version", b"1"),
        ("pkg/data/aotinductor/model/model.so", _shared_object(tmp_path)),
    ]
    evil = write_entries(tmp_path / "pkg.pt2", entries)
    line = refused(tmp_path, "inspect", str(evil), "--trust-native-code")
    assert "AOTInductor" in line
