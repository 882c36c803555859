"""Output files: written under temporary names, committed together (planning them first is
:mod:`normrewrite.emit.plan`).

* :func:`atomic_file` / :func:`atomic_dir` write beside the destination; inside a
  :func:`transaction` they *stage* the result, and the transaction renames every staged output
  into place in one step at its end, with SIGINT/SIGTERM held back: either every output of the
  run exists, or none does (an interruption that lands during the commit is raised after it as
  :class:`InterruptedAfterCommit`). Outputs take the permissions the umask gives.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from normrewrite.errors import EmitError

# --------------------------------------------------------------------------- writing


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _honour_umask(path: Path) -> None:
    """Temporary files and directories are created 0600/0700 (and some writers, safetensors
    among them, create files 0600); outputs get what the umask says, inside directories too."""
    mask = _umask()
    for p in [path, *(path.rglob("*") if path.is_dir() else ())]:
        if not p.is_symlink():
            with contextlib.suppress(OSError):
                p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


class _Sink(io.RawIOBase):
    """A seekable file wrapper that records the first write error and swallows the rest, so a
    C++ writer (torch's zip writer aborts when its destructor fails) always finishes; the caller
    raises :attr:`error` afterwards."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.pos = f, 0
        self.error: BaseException | None = None

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        if self.error is None:
            self.pos = self.f.seek(pos, whence)
        else:
            self.pos = pos if whence == os.SEEK_SET else self.pos + pos
        return self.pos

    def tell(self) -> int:
        return self.pos

    def write(self, b: Any) -> int:
        n = len(memoryview(b))
        try:
            if self.error is None:
                self.f.write(b)
        except BaseException as e:  # an OSError, or Ctrl-C landing here: raised after the writer
            self.error = e
        self.pos += n
        return n


@contextlib.contextmanager
def guarded_writer(path: Path) -> Iterator[io.RawIOBase]:
    """A file object for a native writer; a write error (a full disk) is raised as
    :class:`EmitError` once the writer is done with it, never inside the writer."""
    f = open(path, "wb")  # noqa: SIM115 - closed below, its error kept
    sink = _Sink(f)
    try:
        yield sink
    finally:
        try:
            f.close()
        except OSError as e:
            sink.error = sink.error or e
    if sink.error is not None:
        e = sink.error
        if not isinstance(e, OSError):
            raise e
        reason = "no space left on the device" if e.errno == errno.ENOSPC else e.strerror
        raise EmitError(f"writing {path.name} failed: {reason}")


class InterruptedAfterCommit(KeyboardInterrupt):
    """SIGINT/SIGTERM arrived while the outputs were committed: they all exist, complete."""

    def __init__(self, written: Sequence[Path]) -> None:
        super().__init__()
        self.written = list(written)


_COMMITTED: list[Path] = []  # outputs committed in this process since reset_committed()
_ACTIVE: list[_Transaction] = []


def committed() -> list[Path]:
    return list(_COMMITTED)


def reset_committed() -> None:
    _COMMITTED.clear()


class _Transaction:
    def __init__(self) -> None:
        self.staged: list[tuple[Path, Path]] = []  # (temporary, destination)
        self.scratch: list[Path] = []  # directories staged files were written in

    def discard(self) -> None:
        for tmp, _ in self.staged:
            _remove(tmp)
        self.staged.clear()
        self._clean()

    def _clean(self) -> None:
        for d in self.scratch:
            shutil.rmtree(d, ignore_errors=True)
        self.scratch.clear()

    def apply(self) -> None:
        """Rename every staged output into place (an existing one is moved aside first and
        restored on failure); signals wait until the commit is complete or rolled back."""
        moved: list[tuple[Path, Path | None]] = []
        with _signals_held():
            try:
                for tmp, dest in self.staged:
                    old = _aside(dest) if dest.exists() or dest.is_symlink() else None
                    try:
                        os.replace(tmp, dest)
                    except BaseException:
                        if old is not None:
                            os.replace(old, dest)
                        raise
                    moved.append((dest, old))
            except BaseException:
                for dest, old in reversed(moved):
                    _remove(dest)
                    if old is not None:
                        os.replace(old, dest)
                self.discard()
                raise
            for _, old in moved:
                if old is not None:
                    _remove(old)
            _COMMITTED.extend(dest for _, dest in self.staged)
            self.staged.clear()
            self._clean()


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT/SIGTERM back for the block; one that arrived is raised after it as
    :class:`InterruptedAfterCommit` when the block completed."""
    held = {signal.SIGINT, signal.SIGTERM}
    try:
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    except (ValueError, OSError, AttributeError):  # not the main thread / no such call
        yield
        return
    done = False
    try:
        yield
        done = True
    finally:
        written = [d for d in _COMMITTED]
        try:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)  # a held signal lands here
        except KeyboardInterrupt:
            if done:
                raise InterruptedAfterCommit(written) from None
            raise


def _aside(dest: Path) -> Path:
    old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
    old.rmdir()
    os.replace(dest, old)
    return old


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            p.unlink()


@contextlib.contextmanager
def transaction(dests: Sequence[Path] = ()) -> Iterator[None]:
    """Outputs written in the block are committed together at its end (see the module docs).
    On failure nothing is committed; outputs in ``dests`` that a writer outside this protocol
    put in place directly, and that did not exist before, are removed."""
    new = [Path(d) for d in dests if not Path(d).exists()]
    t = _Transaction()
    _ACTIVE.append(t)
    try:
        yield
        _ACTIVE.remove(t)
        t.apply()
    except BaseException as e:
        if t in _ACTIVE:
            _ACTIVE.remove(t)
        t.discard()
        if not isinstance(e, InterruptedAfterCommit):
            for d in new:
                if d not in _COMMITTED:
                    _remove(d)
        raise


def _publish(tmp: Path, dest: Path) -> None:
    publish_together([(tmp, dest)])


def publish_together(pairs: Sequence[tuple[Path, Path]], scratch: Path | None = None) -> None:
    """Rename each written ``(temporary, destination)`` into place, all in one commit (staged in
    the current :func:`transaction` if one is open); ``scratch``, the directory they were written
    in, is removed afterwards. An ONNX model and its external data go through here."""
    t = _ACTIVE[-1] if _ACTIVE else _Transaction()
    for tmp, _ in pairs:
        _honour_umask(tmp)
    t.staged.extend(pairs)
    if scratch is not None:
        t.scratch.append(scratch)
    if not _ACTIVE:
        t.apply()


@contextlib.contextmanager
def atomic_file(dest: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; on normal exit it replaces ``dest`` (or is staged
    in the current :func:`transaction`), on any exception it is removed."""
    dest = Path(dest)
    # keep dest's suffix last: some writers (torch.export.save) check it
    fd, tmp = tempfile.mkstemp(
        prefix=f".{dest.name}.", suffix=f".partial{dest.suffix}", dir=dest.parent or "."
    )
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
    except BaseException:
        _remove(tmp_path)
        raise
    _publish(tmp_path, dest)


@contextlib.contextmanager
def atomic_dir(dest: Path) -> Iterator[Path]:
    """Like :func:`atomic_file` for a directory: built beside ``dest``, swapped in at the end."""
    dest = Path(dest)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent or "."))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _publish(tmp, dest)
