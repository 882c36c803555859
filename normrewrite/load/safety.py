"""Checks that make loading untrusted model files safe: nothing is unpickled, nothing outside the
model's directory is read, no declared size is trusted before it is checked.

* :func:`check_pt2` — ``torch.export.load`` (torch 2.13) unpickles with ``weights_only=False`` in
  several places: payloads flagged ``use_pickle`` (tensor subclasses), ``custom_obj_*``
  (torchbind) and ``opaque_obj_*`` (plain ``pickle.loads``) constants, legacy ``.pt`` weight and
  constant files, and — through ``deserialize_torch_artifact``'s fallback — any ``.pt`` artifact
  (the stored sample inputs) that fails to load with ``weights_only=True``. A crafted archive
  therefore runs code on load. This check reads the archive first and refuses all of these unless
  the caller trusts pickles; the remaining artifacts are proven loadable with
  ``weights_only=True``, so torch never reaches its fallback.
* :func:`check_external_data` — an ONNX model's external-data ``location`` must name a regular
  file inside the model's directory: no absolute paths, no ``..``, no symbolic links on the way,
  and ``offset + length`` within the file.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from normrewrite.errors import LoadError

# --------------------------------------------------------------------------- .pt2

_MAX_RATIO = 200  # a compressed entry expanding more than this is treated as a zip bomb
_MAX_JSON = 256 * 1024 * 1024


def check_pt2(path: str | os.PathLike[str], *, trust_pickle: bool = False) -> None:
    """Refuse a ``.pt2`` archive whose loading would unpickle arbitrary objects."""
    p = Path(path)
    try:
        zf = zipfile.ZipFile(p)
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise LoadError(f"{p}: not a torch.export program (not a valid .pt2 archive: {e})") from e
    with zf:
        infos = zf.infolist()
        size = max(p.stat().st_size, 1)
        for info in infos:
            if info.compress_size and info.file_size / max(info.compress_size, 1) > _MAX_RATIO:
                raise LoadError(
                    f"{p}: entry {info.filename} declares {info.file_size} bytes from "
                    f"{info.compress_size} (a zip bomb?)"
                )
            if info.compress_type == zipfile.ZIP_STORED and info.file_size > size:
                raise LoadError(
                    f"{p}: entry {info.filename} declares {info.file_size} bytes, more than the file"
                )
        names = [i.filename for i in infos]
        if not any(n.endswith("/archive_format") or n == "archive_format" for n in names):
            raise LoadError(f"{p}: not a torch.export program (no archive_format entry)")
        if trust_pickle:
            return
        unsafe: list[str] = []
        for n in names:
            parts = PurePosixPath(n).parts
            tail = "/".join(parts[1:])
            if tail.startswith(("data/weights/", "data/constants/")) and n.endswith(".json"):
                unsafe += _unsafe_payloads(zf, n)
            elif tail.startswith(("data/weights/", "data/constants/")) and n.endswith(".pt"):
                unsafe.append(f"{n} (legacy pickled tensors)")
            elif PurePosixPath(n).name.startswith(("custom_obj_", "opaque_obj_")):
                unsafe.append(f"{n} (pickled object)")
            elif n.endswith(".pt") and not _weights_only_loadable(zf, n):
                unsafe.append(f"{n} (needs full unpickling)")
        if unsafe:
            more = f" and {len(unsafe) - 1} more" if len(unsafe) > 1 else ""
            raise LoadError(
                f"{p}: loading it would unpickle arbitrary objects ({unsafe[0]}{more}); "
                "refusing (pass --trust-pickle if you trust its author)"
            )


def _unsafe_payloads(zf: zipfile.ZipFile, name: str) -> list[str]:
    info = zf.getinfo(name)
    if info.file_size > _MAX_JSON:
        return [f"{name} (oversized config)"]
    try:
        config = json.loads(zf.read(name))
    except (ValueError, UnicodeDecodeError, zipfile.BadZipFile, OSError):
        return []  # not a payload config torch would trust either; torch.export.load reports it
    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        return []
    out = []
    for fqn, meta in entries.items():
        if not isinstance(meta, dict):
            continue
        path_name = str(meta.get("path_name", ""))
        if meta.get("use_pickle") or path_name.startswith(("custom_obj_", "opaque_obj_")):
            out.append(f"{fqn} in {name}")
    return out


def _weights_only_loadable(zf: zipfile.ZipFile, name: str) -> bool:
    import pickle

    import torch

    try:
        data = zf.read(name)
    except (zipfile.BadZipFile, OSError, RuntimeError, ValueError):
        return True  # unreadable: torch.export.load fails on it with an error, no unpickling
    try:
        torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except pickle.UnpicklingError:
        return False
    except Exception:
        # A corrupt artifact: torch's own fallback would retry it with weights_only=False.
        return False
    return True


# --------------------------------------------------------------------------- ONNX external data


def _onnx_tensors(graph: Any) -> list[Any]:
    """Every TensorProto of a graph: initializers, sparse initializers, constant attributes,
    recursively through subgraphs."""
    from onnx import AttributeProto

    out = list(graph.initializer)
    for sp in graph.sparse_initializer:
        out += [sp.values, sp.indices]
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == AttributeProto.TENSOR:
                out.append(attr.t)
            elif attr.type == AttributeProto.TENSORS:
                out += list(attr.tensors)
            elif attr.type == AttributeProto.SPARSE_TENSOR:
                out += [attr.sparse_tensor.values, attr.sparse_tensor.indices]
            elif attr.type == AttributeProto.GRAPH:
                out += _onnx_tensors(attr.g)
            elif attr.type == AttributeProto.GRAPHS:
                for g in attr.graphs:
                    out += _onnx_tensors(g)
    return out


def _external_fields(tensor: Any) -> dict[str, str] | None:
    from onnx import TensorProto

    if tensor.data_location != TensorProto.EXTERNAL:
        return None
    return {e.key: e.value for e in tensor.external_data}


def check_location(base: Path, location: str) -> Path:
    """The file an external-data ``location`` names, if it is a regular file inside ``base``
    reached without symbolic links; else :class:`LoadError`."""
    if not location:
        raise LoadError("external data without a location")
    if "\x00" in location:
        raise LoadError(f"external data location {location!r} contains a NUL byte")
    posix, win = PurePosixPath(location), PureWindowsPath(location)
    if posix.is_absolute() or win.is_absolute() or win.drive or location.startswith(("/", "\\")):
        raise LoadError(f"external data location {location!r} is an absolute path")
    parts = [q for q in location.replace("\\", "/").split("/") if q not in ("", ".")]
    if ".." in parts:
        raise LoadError(f"external data location {location!r} leaves the model's directory (..)")
    if not parts:
        raise LoadError(f"external data location {location!r} names no file")
    current = base
    for part in parts:
        current = current / part
        if current.is_symlink():
            raise LoadError(
                f"external data location {location!r} goes through a symbolic link ({current.name})"
            )
    try:
        real, root = current.resolve(strict=True), base.resolve(strict=True)
    except (OSError, RuntimeError) as e:
        raise LoadError(f"external data file {location!r} does not exist next to the model") from e
    if root not in real.parents:
        raise LoadError(
            f"external data location {location!r} resolves outside the model's directory"
        )
    if not real.is_file():
        raise LoadError(f"external data location {location!r} is not a regular file")
    return real


def check_external_data(model_path: str | os.PathLike[str]) -> list[Path]:
    """Validate every external-data reference of an ONNX model before anything reads it.

    Returns the files the model's tensors live in (inside its directory). Raises
    :class:`LoadError` naming the first offending tensor: a location that escapes the model's
    directory (absolute, ``..``, a symbolic link), a missing file, or an ``offset``/``length``
    beyond the file's end."""
    import onnx

    p = Path(model_path)
    try:
        proto = onnx.load(str(p), load_external_data=False)
    except Exception as e:
        raise LoadError(
            f"{p}: cannot parse the ONNX model (truncated or corrupt?): {type(e).__name__}"
        ) from e
    base = p.parent if str(p.parent) else Path(".")
    graphs = [proto.graph] + [f for f in proto.functions]
    tensors: list[Any] = []
    for g in graphs:
        if hasattr(g, "initializer"):
            tensors += _onnx_tensors(g)
        else:  # FunctionProto: constants in its nodes
            from onnx import helper

            tensors += _onnx_tensors(helper.make_graph(list(g.node), "f", [], []))
    files: dict[Path, None] = {}
    for t in tensors:
        fields = _external_fields(t)
        if fields is None:
            continue
        where = f"{p}: tensor {t.name!r}"
        try:
            real = check_location(base, fields.get("location", ""))
        except LoadError as e:
            raise LoadError(f"{where}: {e}") from None
        try:
            offset = int(fields.get("offset", "0") or 0)
            length = int(fields["length"]) if fields.get("length") not in (None, "") else None
        except ValueError:
            raise LoadError(f"{where}: bad external data offset/length {fields}") from None
        size = real.stat().st_size
        if offset < 0 or (length is not None and length < 0):
            raise LoadError(f"{where}: negative external data offset/length")
        end = offset + (length if length is not None else 0)
        if offset > size or end > size:
            raise LoadError(
                f"{where}: external data [{offset}, {end}) lies beyond the end of "
                f"{fields.get('location')} ({size} bytes)"
            )
        files[real] = None
    return list(files)


__all__ = ["check_external_data", "check_location", "check_pt2"]
