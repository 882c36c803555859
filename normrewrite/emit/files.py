"""Output files: planned before any work, written under temporary names, committed together.

* :func:`read_paths` lists everything a run reads (the model in each input form, its package,
  its external data, data files named in pass options); :func:`plan_outputs` refuses, before any
  work, an output (model, report, directory, external-data companion) that is, contains or lies
  inside one of them, and outputs that coincide or nest (:class:`~normrewrite.errors.UsageError`,
  exit 2). Paths are compared resolved (symbolic links, ``..``).
* :func:`check_output` refuses an existing output without ``force`` and a missing output
  directory (:class:`~normrewrite.errors.UsageError`, exit 2: the command line names them), and an
  unwritable output directory (:class:`~normrewrite.errors.EmitError`, exit 1).
* :func:`atomic_file` / :func:`atomic_dir` write beside the destination; inside a
  :func:`transaction` they *stage* the result, and the transaction renames every staged output
  into place in one step at its end, with SIGINT/SIGTERM held back: either every output of the
  run exists, or none does (an interruption that lands during the commit is raised after it as
  :class:`InterruptedAfterCommit`). Outputs take the permissions the umask gives.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import importlib.util
import io
import os
import shutil
import signal
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from normrewrite.errors import EmitError, UsageError

# --------------------------------------------------------------------------- planning


def read_paths(model: Any, passes: Iterable[Any] = ()) -> list[Path]:
    """Every file and directory a run on ``model`` reads: a ``.pt2``/``.onnx`` file (and the
    ONNX model's external-data files), a Hugging Face folder and every file in it (what its links
    point to included), a factory's file and its package directory (or a module's package), and
    any pass option naming an existing path (``heal_data=``, ``data=``)."""
    out: list[Path] = []
    if isinstance(model, str | os.PathLike):
        text = os.fspath(model)
        path = Path(text)
        if path.exists():
            out.append(path)
            if path.is_dir():
                out += list(path.rglob("*"))
            elif path.suffix == ".onnx":
                out += _external_data(path)
        elif ":" in text:
            out += _factory_paths(text.rpartition(":")[0])
    for value in _option_values(passes):
        if isinstance(value, str | os.PathLike) and os.fspath(value):
            with contextlib.suppress(OSError, ValueError):
                if Path(value).exists():
                    out.append(Path(value))
    return out


def _option_values(passes: Iterable[Any]) -> list[Any]:
    out = []
    for p in passes:
        options = getattr(p, "options", None)
        if dataclasses.is_dataclass(options):
            out += [getattr(options, f.name) for f in dataclasses.fields(options)]
    return out


def _external_data(path: Path) -> list[Path]:
    from normrewrite.errors import LoadError
    from normrewrite.load.safety import check_external_data

    try:
        return check_external_data(path)
    except LoadError:
        return []  # loading refuses it with its own message before anything is written


def _factory_paths(target: str) -> list[Path]:
    if target.endswith(".py"):
        file = Path(target)
        top = file.parent
        while (top / "__init__.py").exists() and (top.parent / "__init__.py").exists():
            top = top.parent
        return [file, top] if (top / "__init__.py").exists() else [file]
    try:  # the top-level package only: finding it imports nothing
        spec = importlib.util.find_spec(target.partition(".")[0])
    except (ImportError, ValueError):
        return []
    if spec is None:
        return []
    found = [Path(p) for p in spec.submodule_search_locations or ()]
    return found or ([Path(spec.origin)] if spec.origin and os.path.exists(spec.origin) else [])


def companions(output: Path) -> list[Path]:
    """Files an output may write beside itself: an ONNX model's external data."""
    return [output.with_name(output.name + ".data")] if output.name.endswith(".onnx") else []


def _resolve(p: Path) -> Path:
    return Path(os.path.abspath(p)).resolve()


def _relation(a: Path, b: Path) -> str | None:
    if a == b:
        return "is"
    if a in b.parents:
        return "contains"
    if b in a.parents:
        return "lies inside"
    return None


def plan_outputs(
    outputs: Sequence[str | os.PathLike[str]],
    *,
    inputs: Iterable[Path],
    report: str | os.PathLike[str] | None = None,
) -> None:
    """Refuse (:class:`UsageError`) outputs that would destroy an input or each other."""
    dests: list[tuple[str, Path]] = []
    for o in outputs:
        dests += [(f"output {o}", Path(o))] + [
            (f"output {o}'s {c.name}", c) for c in companions(Path(o))
        ]
    if report is not None:
        dests.append((f"report {report}", Path(report)))
    sources = {_resolve(i): i for i in inputs}
    resolved = [(label, _resolve(d)) for label, d in dests]
    for label, r in resolved:
        for real, given in sources.items():
            how = _relation(r, real)
            if how:
                raise UsageError(
                    f"{label} {how} the input {given}, which the run reads; choose another output"
                )
    for i, (label, r) in enumerate(resolved):
        for other, q in resolved[i + 1 :]:
            how = _relation(r, q)
            if how:
                raise UsageError(
                    f"{label} {how} {other.partition(' ')[2]}: outputs must be distinct"
                )


def check_output(dest: Path, *, force: bool, inputs: tuple[Path, ...] = ()) -> None:
    """Refuse an output onto an input (:func:`plan_outputs`), an existing output without
    ``force`` or in a missing directory (usage errors), and an unwritable output directory."""
    if inputs:
        plan_outputs([dest], inputs=inputs)
    if dest.exists() and not force:
        raise UsageError(f"output {dest} exists; pass --force to replace it")
    parent = dest.parent if str(dest.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"output directory {parent} does not exist")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise EmitError(f"output directory {parent} is not writable ({e.strerror})") from None


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
