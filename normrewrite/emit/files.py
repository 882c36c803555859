"""Atomic file output: write beside the destination, rename into place only on success."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from normrewrite.errors import EmitError


def check_output(dest: Path, *, force: bool, inputs: tuple[Path, ...] = ()) -> None:
    """Refuse to overwrite an input, or an existing output without ``force``."""
    resolved = dest.resolve()
    for src in inputs:
        try:
            inside = resolved in src.resolve().parents  # a DIR output holding the input
            if src.exists() and (resolved == src.resolve() or src.resolve() in resolved.parents or inside):
                raise EmitError(f"output {dest} would overwrite the input {src}")
        except OSError:
            continue
    if dest.exists() and not force:
        raise EmitError(f"output {dest} exists; pass --force to replace it")
    parent = dest.parent if str(dest.parent) else Path(".")
    if not parent.is_dir():
        raise EmitError(f"output directory {parent} does not exist")


@contextlib.contextmanager
def atomic_file(dest: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; on normal exit it replaces ``dest`` atomically,
    on any exception (including KeyboardInterrupt/SystemExit) it is removed."""
    dest = Path(dest)
    # keep dest's suffix last: some writers (torch.export.save) check it
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=f".partial{dest.suffix}",
                               dir=dest.parent or ".")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        raise


@contextlib.contextmanager
def atomic_dir(dest: Path) -> Iterator[Path]:
    """Like :func:`atomic_file` for a directory: built beside ``dest``, swapped in at the end."""
    dest = Path(dest)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent or "."))
    try:
        yield tmp
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent or "."))
            old.rmdir()
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def undo_on_failure(dests: list[Path] | tuple[Path, ...]) -> Iterator[None]:
    """For several outputs written one after another (each atomically): if anything fails, remove
    the ones this block created, so a failed run leaves no output behind. (An output that existed
    before and was replaced under ``--force`` cannot be restored.)"""
    new = [Path(d) for d in dests if not Path(d).exists()]
    try:
        yield
    except BaseException:
        for d in new:
            if d.is_dir() and not d.is_symlink():
                shutil.rmtree(d, ignore_errors=True)
            elif d.exists():
                with contextlib.suppress(OSError):
                    d.unlink()
        raise
