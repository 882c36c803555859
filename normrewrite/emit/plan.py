"""Output planning, before any work: what a run reads, and which outputs it may write.

* :func:`read_paths` lists everything a run reads (the model in each input form, its package,
  its external data, data files named in pass options); :func:`plan_outputs` refuses an output
  (model, report, directory, external-data companion) that is, contains or lies inside one of
  them, and outputs that coincide or nest (:class:`~normrewrite.errors.UsageError`, exit 2).
  Paths are compared resolved (symbolic links, ``..``).
* :func:`check_output` refuses an existing output without ``force`` and a missing output
  directory (:class:`~normrewrite.errors.UsageError`, exit 2: the command line names them), and an
  unwritable output directory (:class:`~normrewrite.errors.EmitError`, exit 1).

Writing them is :mod:`normrewrite.emit.files`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

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
