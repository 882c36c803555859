"""Safetensors checkpoints read tensor by tensor through ``safetensors.safe_open``.

A checkpoint is one ``.safetensors`` file or a ``save_pretrained`` directory (``model.safetensors``
or shards listed in ``model.safetensors.index.json``). Every file is opened once up front: the
library validates its header (sizes, dtypes, offsets that cover the data exactly once — no
overlapping tensors, no holes, no truncation) and the names, dtypes and shapes are kept. Tensors
are then read on demand, each through its own ``safe_open`` (a private, copy-on-write ``mmap``
that lives as long as the returned tensor: the process is charged for the pages of the tensors it
holds, not for the file).

Because the library refuses holes and overlaps, each tensor's byte range follows from the order
of :meth:`safe_open.offset_keys` and the sizes: no header is parsed here.

Names. Module FQNs and checkpoint keys may differ by a prefix (a checkpoint saved from
``LlamaModel`` has ``layers.0...``, ``LlamaForCausalLM`` reads ``model.layers.0...``):
:func:`key_mapping` finds the one prefix rule that maps the module's names onto the keys.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from normrewrite.errors import LoadError, first_line

INDEX = "model.safetensors.index.json"
HANDLE_WINDOW = 64 << 20  # bytes read through one safe_open handle before it is dropped (RSS bound)


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a checkpoint: where its bytes are (``path``, absolute ``start``/``end``)."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    path: Path
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


class Checkpoint:
    """Key → tensor over a ``.safetensors`` file or a ``save_pretrained`` directory."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.files = _files(self.path)
        self.entries: dict[str, TensorEntry] = {}
        self._handles: dict[Path, tuple[Any, int]] = {}  # path → (handle, bytes read with it)
        for file in self.files:
            for entry in _entries(file):
                if entry.key in self.entries:
                    raise LoadError(f"{self.path}: tensor {entry.key} is stored twice")
                self.entries[entry.key] = entry

    def keys(self) -> Collection[str]:
        return self.entries.keys()

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, key: object) -> bool:
        return key in self.entries

    def entry(self, key: str) -> TensorEntry:
        return self.entries[key]

    def read(self, key: str) -> torch.Tensor:
        """The tensor ``key`` (it outlives the file's handle)."""
        e = self.entries[key]
        return self._handle(e.path, e.nbytes).get_tensor(key)

    def read_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of the tensor ``key`` (dim 0), read with ``get_slice``."""
        e = self.entries[key]
        return self._handle(e.path, e.nbytes).get_slice(key)[start:stop]

    def _handle(self, path: Path, nbytes: int) -> Any:
        """An open ``safe_open`` handle of ``path``, reused for up to :data:`HANDLE_WINDOW` bytes
        of reads. Opening parses the file's header again (~1 ms for a shard of ~700 tensors:
        0.8 s of an 80-layer streamed conversion when every read opened its file); but the
        tensors a handle gives are views of its one mapping of the file, and the pages they
        touched stay resident while the handle lives (peak RSS grew to the checkpoint's size):
        a handle is dropped after a window of reads, its pages go with its last tensor."""
        handle, used = self._handles.get(path, (None, 0))
        if handle is None or used >= HANDLE_WINDOW:
            handle, used = _open(path), 0
        self._handles[path] = (handle, used + nbytes)
        return handle

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())


def _open(path: Path) -> Any:  # safetensors' handle has no public type
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # SafetensorError, OSError, and whatever a hostile header provokes
        raise LoadError(f"{path}: corrupt safetensors file ({first_line(e)})") from e


def _entries(path: Path) -> list[TensorEntry]:
    """The tensors of one file in offset order, with their byte ranges."""
    try:
        size = path.stat().st_size
    except OSError as e:
        raise LoadError(f"{path}: cannot read: {e.strerror or e}") from e
    with _open(path) as f:
        found = []
        for key in f.offset_keys():
            sl = f.get_slice(key)
            shape = tuple(int(d) for d in sl.get_shape())
            dtype = (sl[:0] if shape else sl[...]).dtype  # the library's own dtype mapping
            found.append((key, dtype, shape))
    nbytes = [math.prod(shape) * dtype.itemsize for _, dtype, shape in found]
    pos = size - sum(nbytes)  # the data section ends the file and is covered exactly once
    out = []
    for (key, dtype, shape), n in zip(found, nbytes, strict=True):
        out.append(TensorEntry(key, dtype, shape, path, pos, pos + n))
        pos += n
    return out


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    index_file = path / INDEX
    if index_file.is_file():
        try:
            index = json.loads(index_file.read_text())
            names = sorted(set(index["weight_map"].values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise LoadError(f"{index_file}: not a safetensors index ({type(e).__name__})") from e
        files = []
        for name in names:
            f = (path / str(name)).resolve()
            if path.resolve() not in f.parents or not f.is_file():
                raise LoadError(f"{index_file}: shard {name!r} is missing or outside the directory")
            files.append(f)
        return files
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    raise LoadError(f"{path}: no safetensors checkpoint (model.safetensors or an index)")


# --------------------------------------------------------------------------- names


@dataclass(frozen=True)
class KeyMap:
    """``key = add + name[len(strip):]`` for module FQNs that start with ``strip``; then, where the
    model class renames checkpoint keys when it loads them (transformers' weight renamings, e.g.
    ViT's ``encoder.layer.0.attention.attention.query`` → ``layers.0.attention.q_proj``), the
    checkpoint's own key for that model-side name (``renamed``)."""

    strip: str = ""
    add: str = ""
    renamed: dict[str, str] = field(default_factory=dict, hash=False, compare=False)

    def key(self, name: str) -> str:
        if self.strip and name.startswith(self.strip):
            name = name[len(self.strip) :]
        name = self.add + name
        return self.renamed.get(name, name)


def key_mapping(names: Iterable[str], keys: Collection[str]) -> KeyMap:
    """The prefix rule under which most module ``names`` are checkpoint ``keys``.

    Candidates per name: identity; a key that ends with ``.name`` (the checkpoint adds a prefix);
    a dotted suffix of the name that is a key (the checkpoint lacks the prefix)."""
    by_suffix: dict[str, list[str]] = {}
    for k in keys:
        parts = k.split(".")
        for i in range(1, len(parts)):
            by_suffix.setdefault(".".join(parts[i:]), []).append(".".join(parts[:i]) + ".")
    votes: Counter[KeyMap] = Counter()
    for name in names:
        if name in keys:
            votes[KeyMap()] += 1
            continue
        for prefix in by_suffix.get(name, ()):
            votes[KeyMap("", prefix)] += 1
        parts = name.split(".")
        for i in range(1, len(parts)):
            if ".".join(parts[i:]) in keys:
                votes[KeyMap(".".join(parts[:i]) + ".", "")] += 1
    if not votes:
        return KeyMap()
    best, _ = max(votes.items(), key=lambda kv: (kv[1], kv[0] == KeyMap()))
    return best
