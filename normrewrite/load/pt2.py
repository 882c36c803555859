"""Loading a ``torch.export`` program saved as ``.pt2``, and the vetting that makes it safe.

``torch.export.load`` (torch 2.13) can run code from the archive in six ways; :func:`check_pt2`
reads the archive first and refuses each unless the caller opts in:

* **expressions** — symbolic sizes, strides, offsets and ``sym_*`` values (``expr_str``) are
  parsed with ``sympy.sympify`` (Python ``eval``), and ``guards_code`` becomes Python source that
  is ``exec``-ed by ``ExportedProgram.module()``. Every such string in every ``models/*.json`` must
  match a strict grammar (:func:`check_expression`, :func:`check_guard`), checked with :mod:`ast`
  (never evaluated); node targets must name operators (``torch.ops.*``, arithmetic); range
  constraints must be keyed by symbol names. No option lifts this.
* **native code** — an AOTInductor shared object (``data/aotinductor/**``) is ``dlopen``-ed, so
  its constructors run. Archives holding shared objects or compiled code (by name or by magic
  bytes) are refused unless ``trust_native_code``; an AOTInductor *package* (no program) is not an
  input at all: it loads with ``torch._inductor.aoti_load_package``.
* **zip-parser differentials** — Python's ``zipfile`` (this check) and torch's C++ reader must see
  the same archive: an entry that cannot be read (bad CRC, bad data), a duplicate name, a local
  header naming another file than the central directory, or a different entry list in torch's
  own reader (``torch._C.PyTorchFileReader``) is refused.
* **legacy layout** — the pre-2.8 layout (top-level ``version``, ``serialized_*``) reaches torch's
  old-format fallback, which unpickles: refused unless ``trust_pickle``.
* **pickles** — payloads flagged ``use_pickle``, ``custom_obj_*``/``opaque_obj_*`` constants,
  legacy ``.pt`` weights and any ``.pt`` artifact that does not load with ``weights_only=True``:
  refused unless ``trust_pickle``.
* **pytree specs** — the input/output specs' contexts are decoded with a hook that imports the
  module an ``__enum__`` object names: refused. Container types named by a spec that this process
  does not know (a ``transformers`` output class) get a generic stand-in, never an import
  (:mod:`normrewrite.load.specs`), so every ``.pt2`` normrewrite writes loads back.
"""

from __future__ import annotations

import io
import json
import os
import struct
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from normrewrite.errors import LoadError, first_line
from normrewrite.load.inputs import InputSpec, make_inputs
from normrewrite.load.safety import SYMBOL, check_expression, check_guard, check_target
from normrewrite.load.specs import (
    OUTPUT_NAMES_META,
    OUTPUTS_FILE,
    output_names_of,
    register_stand_ins,
    spec_types,
)

_MAX_RATIO = 200  # a compressed entry expanding more than this is treated as a zip bomb
_MAX_JSON = 256 * 1024 * 1024

_LEGACY = frozenset(
    {
        "version",
        "serialized_exported_program.json",
        "serialized_state_dict.json",
        "serialized_constants.json",
        "serialized_state_dict.pt",
        "serialized_constants.pt",
        "serialized_example_inputs.pt",
    }
)
_NATIVE_SUFFIXES = (
    ".so",
    ".dll",
    ".dylib",
    ".pyd",
    ".o",
    ".a",
    ".lib",
    ".cubin",
    ".fatbin",
    ".ptx",
    ".hsaco",
    ".spv",
    ".kernel",
    ".exe",
)
_NATIVE_MAGIC = (
    b"\x7fELF",
    b"\xcf\xfa\xed\xfe",
    b"\xce\xfa\xed\xfe",
    b"\xfe\xed\xfa\xcf",
    b"\xfe\xed\xfa\xce",
    b"\xca\xfe\xba\xbe",
    b"!<arch>\n",
    b"\x00asm",
)
_AOTI_DIR = "data/aotinductor/"


def check_program_json(data: Any, where: str) -> set[str]:
    """Every string of a serialized program that torch evaluates, wherever it sits. Returns the
    pytree type names its input/output specs use (:func:`register_stand_ins`)."""
    types: set[str] = set()
    for key, value, parent in _walk(data):
        try:
            if key in ("in_spec", "out_spec") and isinstance(value, str):
                types |= spec_types(value)
            elif key == "expr_str":
                check_expression(value)
            elif key == "range_constraints" and isinstance(value, dict):
                for name in value:
                    if not SYMBOL.match(str(name)):
                        raise LoadError(f"range constraint on {str(name)[:60]!r}, not a symbol")
            elif key == "guards_code":
                for guard in value if isinstance(value, list) else [value]:
                    check_guard(guard)
            elif key == "target" and "inputs" in parent:
                check_target(value)
        except LoadError as e:
            raise LoadError(f"{where}: {e}; refusing (torch would evaluate it as code)") from None
    return types


def _walk(value: Any) -> Iterator[tuple[str, Any, dict[str, Any]]]:
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            for k, x in v.items():
                yield str(k), x, v
                stack.append(x)
        elif isinstance(v, list):
            stack.extend(v)


# --------------------------------------------------------------------------- the archive


def check_pt2(
    path: str | os.PathLike[str], *, trust_pickle: bool = False, trust_native_code: bool = False
) -> set[str]:
    """Refuse a ``.pt2`` archive whose loading could run code from it (see the module docs).
    Returns the pytree type names its programs' input/output specs use."""
    types: set[str] = set()
    p = Path(path)
    try:
        zf = zipfile.ZipFile(p)
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise LoadError(f"{p}: not a torch.export program (not a valid .pt2 archive: {e})") from e
    with zf:
        infos = zf.infolist()
        _check_sizes(p, infos)
        _check_readable(p, zf, infos)
        names = [i.filename for i in infos]
        legacy = sorted(set(names) & _LEGACY)
        if legacy and not trust_pickle:
            raise LoadError(
                f"{p}: a legacy (pre-2.8) .pt2 layout ({legacy[0]}): torch loads it by unpickling; "
                "refusing (pass --trust-pickle if you trust its author, or re-save it with "
                "torch.export.save)"
            )
        if not legacy:
            _check_torch_reader(p, infos)
        programs = [n for n in names if _tail(n).startswith("models/") and n.endswith(".json")]
        programs += [n for n in names if n == "serialized_exported_program.json"]
        native = [n for n in names if _is_native(zf, n)]
        if not programs and native:
            raise LoadError(
                f"{p}: an AOTInductor package (compiled code, no program to rewrite); "
                "load it with torch._inductor.aoti_load_package"
            )
        if not legacy and not any(_tail(n) == "archive_format" for n in names):
            raise LoadError(f"{p}: not a torch.export program (no archive_format entry)")
        if native and not trust_native_code:
            raise LoadError(
                f"{p}: holds native code ({native[0]}); loading it runs that code; refusing "
                "(pass --trust-native-code if you trust its author)"
            )
        for n in programs:
            if zf.getinfo(n).file_size > _MAX_JSON:
                raise LoadError(f"{p}: {n} is larger than {_MAX_JSON} bytes")
            try:
                program = json.loads(zf.read(n))
            except (ValueError, UnicodeDecodeError) as e:
                raise LoadError(f"{p}: {n} is not valid JSON ({first_line(e)})") from None
            types |= check_program_json(program, f"{p}: {n}")
        if not trust_pickle:
            _check_pickles(p, zf, names)
    return types


def _tail(name: str) -> str:
    return "/".join(PurePosixPath(name).parts[1:])


def _check_sizes(p: Path, infos: Sequence[zipfile.ZipInfo]) -> None:
    size = max(p.stat().st_size, 1)
    seen: set[str] = set()
    for info in infos:
        if info.filename in seen:
            raise LoadError(
                f"{p}: duplicate entry {info.filename}; readers disagree on which counts"
            )
        seen.add(info.filename)
        if info.compress_size and info.file_size / max(info.compress_size, 1) > _MAX_RATIO:
            raise LoadError(
                f"{p}: entry {info.filename} declares {info.file_size} bytes from "
                f"{info.compress_size} (a zip bomb?)"
            )
        if info.compress_type == zipfile.ZIP_STORED and info.file_size > size:
            raise LoadError(
                f"{p}: entry {info.filename} declares {info.file_size} bytes, more than the file"
            )


def _check_readable(p: Path, zf: zipfile.ZipFile, infos: Sequence[zipfile.ZipInfo]) -> None:
    """Every entry reads back whole with its CRC, under the name its local header gives."""
    with open(p, "rb") as raw:
        for info in infos:
            raw.seek(info.header_offset)
            head = raw.read(30)
            if len(head) < 30 or head[:4] != b"PK\x03\x04":
                raise LoadError(f"{p}: entry {info.filename} has no local header")
            n = struct.unpack_from("<H", head, 26)[0]
            local = raw.read(n).decode("utf-8" if info.flag_bits & 0x800 else "cp437", "replace")
            if local != info.orig_filename:
                raise LoadError(
                    f"{p}: entry {info.filename} is named {local!r} in its local header; "
                    "readers disagree on which file it is"
                )
    for info in infos:
        try:
            with zf.open(info) as f:
                while f.read(1 << 20):
                    pass
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as e:
            raise LoadError(f"{p}: entry {info.filename} is unreadable ({first_line(e)})") from None


def _check_torch_reader(p: Path, infos: Sequence[zipfile.ZipInfo]) -> None:
    """torch's C++ reader must list the same entries with the same sizes."""
    try:
        reader = torch._C.PyTorchFileReader(str(p))
        records = reader.get_all_records()
        sizes = {r: reader.get_record_size(r) for r in records}
    except Exception as e:
        raise LoadError(
            f"{p}: not a torch.export program (torch cannot read it: {first_line(e)})"
        ) from None
    ours = sorted(_tail(i.filename) for i in infos if not i.is_dir())
    mine = {_tail(i.filename): i.file_size for i in infos if not i.is_dir()}
    if sorted(records) != ours or any(sizes[r] != mine.get(r) for r in records):
        raise LoadError(f"{p}: torch's zip reader sees other entries than Python's; refusing")


def _is_native(zf: zipfile.ZipFile, name: str) -> bool:
    if _tail(name).startswith(_AOTI_DIR) or name.lower().endswith(_NATIVE_SUFFIXES):
        return True
    if _tail(name).startswith(("data/weights/", "data/constants/")):
        return False  # tensor bytes: never loaded as code
    with zf.open(name) as f:
        return f.read(8).startswith(_NATIVE_MAGIC)


def _check_pickles(p: Path, zf: zipfile.ZipFile, names: list[str]) -> None:
    unsafe: list[str] = []
    for n in names:
        tail = _tail(n)
        if tail.startswith(("data/weights/", "data/constants/")) and n.endswith(".json"):
            unsafe += _unsafe_payloads(p, zf, n)
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


def _unsafe_payloads(p: Path, zf: zipfile.ZipFile, name: str) -> list[str]:
    if zf.getinfo(name).file_size > _MAX_JSON:
        return [f"{name} (oversized config)"]
    try:
        config = json.loads(zf.read(name))
    except (ValueError, UnicodeDecodeError) as e:
        raise LoadError(f"{p}: {name} is not valid JSON ({first_line(e)})") from None
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
    try:
        torch.load(io.BytesIO(zf.read(name)), weights_only=True, map_location="cpu")
    except Exception:
        # pickle.UnpicklingError, or a corrupt artifact: torch's own fallback would retry it
        # with weights_only=False
        return False
    return True


# --------------------------------------------------------------------------- loading


def load_pt2(
    path: Path,
    inputs: Sequence[InputSpec] | None,
    *,
    seed: int,
    trust_pickle: bool = False,
    trust_native_code: bool = False,
) -> Any:
    """The vetted program as a :class:`~normrewrite.load.LoadedModel`."""
    from normrewrite.load import LoadedModel

    if not path.is_file():
        raise LoadError(f"no such file: {path}")
    if not zipfile.is_zipfile(path):
        raise LoadError(f"{path}: not a torch.export program (not a .pt2 archive)")
    types = check_pt2(path, trust_pickle=trust_pickle, trust_native_code=trust_native_code)
    register_stand_ins(types)
    extra = {OUTPUTS_FILE: ""}
    try:
        ep = torch.export.load(str(path), extra_files=extra)
    except Exception as e:
        raise LoadError(
            f"{path}: cannot load torch.export program: {type(e).__name__}: {first_line(e)}"
        ) from e
    names = output_names_of(extra[OUTPUTS_FILE], len(ep.graph_signature.user_outputs))
    if names is not None:  # kept for the next export of this program (ep.module() copies meta)
        ep.graph_module.meta[OUTPUT_NAMES_META] = names
    if inputs:
        example, origin = make_inputs(inputs, seed), "given"
    else:
        example, origin = _program_inputs(ep, seed), "program"
    return LoadedModel(ep.module(), example, "pt2", str(path), exported=ep, input_origin=origin)


def _program_inputs(ep: torch.export.ExportedProgram, seed: int) -> tuple[Any, ...]:
    stored = getattr(ep, "example_inputs", None)
    if stored:
        args, kwargs = stored
        if not kwargs and all(isinstance(a, torch.Tensor) for a in args):
            return tuple(a.clone() for a in args)
    specs = []
    user_inputs = set(ep.graph_signature.user_inputs)
    for n in ep.graph.nodes:
        if n.op == "placeholder" and n.name in user_inputs:
            val = n.meta.get("val")
            if not isinstance(val, torch.Tensor):
                raise LoadError(f"cannot derive example inputs for {n.name}; pass --input")
            shape = tuple(
                int(getattr(d, "node", d).hint if hasattr(d, "node") else d) for d in val.shape
            )
            specs.append(InputSpec(shape, val.dtype))
    return make_inputs(specs, seed)


__all__ = ["check_program_json", "check_pt2", "load_pt2"]
