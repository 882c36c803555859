"""Converting checkpoints larger than memory: decide on ``meta``, apply tensor by tensor.

A model is built and traced on the ``meta`` device (shapes and dtypes only, no data), the passes
run on that graph and decide every rewrite there. Passes edit stored tensors only through
:func:`normrewrite.core.pass_infra.compute_tensors`, which logs each edit as a
:class:`~normrewrite.core.pass_infra.TensorRecipe` ``outputs = fn(*inputs)``. This module replays the
log on real data read from a ``safetensors`` checkpoint, one recipe at a time, and writes the
rewritten model's tensors straight into sharded ``safetensors`` files: the layout of every output
shard (names, dtypes, shapes, offsets) is known from the ``meta`` graph before any data is read,
so each tensor is written to its slot the moment it is computed and then dropped.

Memory: at any time the process holds the tensors of the recipe being evaluated plus recipe
outputs that a later recipe still needs (with the log replayed in the order of the output keys,
that is one layer's worth). Input tensors are read with ``readinto`` at their header offsets (no
mmap, so the input's pages are not charged to the process); the output is preallocated and
written with ``pwrite``.

Names. Graph tensors are addressed by FQN; checkpoint keys may carry a prefix (a checkpoint
saved from ``LlamaModel`` has ``layers.0...``, the graph of ``LlamaForCausalLM`` reads
``model.layers.0...``) or lack one. :func:`key_mapping` finds the one prefix rule that maps the
graph's names onto the checkpoint, and the output uses the checkpoint's convention.

Tied weights (``lm_head.weight is embed_tokens.weight``) are written once, under the first name;
non-persistent buffers (rotary ``inv_freq``) are not in checkpoints and are not written.

ONNX (:func:`convert_checkpoint_onnx`). ``torch.onnx.export`` of the rewritten ``meta`` program
works as long as nothing reads weight data: the exporter's own optimizer constant-folds
``Transpose(W)`` and so fails with "Cannot copy out of meta tensor". The program is therefore
exported unoptimized, each ``meta`` initializer is bound to an ``onnx_ir.ExternalTensor`` at the
rewritten tensor's slot in scratch safetensors (the replay above, written beside the destination),
``Transpose(W)`` becomes a lazily transposed initializer (read in row blocks), the optimizer runs
with folding of weight-reading nodes disabled, and ``onnx_ir.save`` streams the weights into
``OUT.onnx.data`` one tensor at a time (untransposed ones are copied file to file). Cost: the
scratch copy needs disk space equal to the output.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from normrewrite.core.pass_infra import Pass, PassContext, PassManager, PipelineResult, TensorRecipe
from normrewrite.errors import EmitError, LoadError, PassError, UsageError

# --------------------------------------------------------------------------- safetensors files

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit


@dataclass(frozen=True)
class TensorEntry:
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int


class SafetensorsFile:
    """A ``.safetensors`` file's header, validated, and tensors read one at a time.

    Every declared size is checked against the file before anything is allocated: a truncated or
    hostile file fails with :class:`LoadError` instead of a huge allocation or a short read."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise LoadError(f"{self.path}: not a safetensors file (shorter than 8 bytes)")
                n = int.from_bytes(head, "little")
                if n < 2 or n > MAX_HEADER or 8 + n > size:
                    raise LoadError(
                        f"{self.path}: not a safetensors file (header size {n} for a {size}-byte file)"
                    )
                raw = f.read(n)
        except OSError as e:
            raise LoadError(f"{self.path}: cannot read: {e.strerror or e}") from e
        try:
            header = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise LoadError(f"{self.path}: corrupt safetensors header ({e})") from e
        if not isinstance(header, dict):
            raise LoadError(f"{self.path}: corrupt safetensors header (not an object)")
        meta = header.pop("__metadata__", None)
        self.metadata: dict[str, str] = meta if isinstance(meta, dict) else {}
        base = 8 + n
        self.entries: dict[str, TensorEntry] = {}
        for key, info in header.items():
            self.entries[key] = self._entry(key, info, base, size)

    def _entry(self, key: str, info: Any, base: int, size: int) -> TensorEntry:
        bad = f"{self.path}: corrupt safetensors entry {key!r}"
        if not isinstance(info, dict):
            raise LoadError(bad)
        dtype = DTYPES.get(str(info.get("dtype")))
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if dtype is None:
            raise LoadError(f"{bad}: unsupported dtype {info.get('dtype')!r}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise LoadError(f"{bad}: bad shape {shape!r}")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) for o in offsets)
        ):
            raise LoadError(f"{bad}: bad data_offsets {offsets!r}")
        start, end = base + offsets[0], base + offsets[1]
        nbytes = math.prod(shape) * _itemsize(dtype)
        if offsets[0] < 0 or end - start != nbytes or end > size:
            raise LoadError(f"{bad}: declares {nbytes} bytes at {offsets} in a {size}-byte file")
        return TensorEntry(key, dtype, tuple(shape), start, end)

    def read(self, key: str) -> torch.Tensor:
        e = self.entries[key]
        buf = torch.empty(e.end - e.start, dtype=torch.uint8)
        with open(self.path, "rb") as f:
            f.seek(e.start)
            got = f.readinto(memoryview(buf.numpy()))
        if got != e.end - e.start:
            raise LoadError(f"{self.path}: {key} is truncated")
        return buf.view(e.dtype).reshape(e.shape)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class Checkpoint:
    """Key → tensor over one ``.safetensors`` file or a ``save_pretrained`` directory (single
    file or shards with ``model.safetensors.index.json``)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        path = Path(path)
        files: list[Path]
        if path.is_file():
            files = [path]
        elif (path / "model.safetensors.index.json").is_file():
            index_file = path / "model.safetensors.index.json"
            try:
                index = json.loads(index_file.read_text())
                names = sorted(set(index["weight_map"].values()))
            except (
                json.JSONDecodeError,
                UnicodeDecodeError,
                KeyError,
                TypeError,
                AttributeError,
            ) as e:
                raise LoadError(
                    f"{index_file}: not a safetensors index ({type(e).__name__})"
                ) from e
            files = []
            for name in names:
                f = (path / str(name)).resolve()
                if path.resolve() not in f.parents or not f.is_file():
                    raise LoadError(
                        f"{index_file}: shard {name!r} is missing or outside the directory"
                    )
                files.append(f)
        elif (path / "model.safetensors").is_file():
            files = [path / "model.safetensors"]
        else:
            raise LoadError(f"{path}: no safetensors checkpoint (model.safetensors or an index)")
        self.path = path
        self.files = [SafetensorsFile(f) for f in files]
        self.where: dict[str, SafetensorsFile] = {}
        for f in self.files:
            for key in f.entries:
                self.where[key] = f

    def keys(self) -> Collection[str]:
        return self.where.keys()

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def entry(self, key: str) -> TensorEntry:
        return self.where[key].entries[key]

    def read(self, key: str) -> torch.Tensor:
        return self.where[key].read(key)

    @property
    def nbytes(self) -> int:
        return sum(e.end - e.start for f in self.files for e in f.entries.values())


# --------------------------------------------------------------------------- writing shards


@dataclass
class _Slot:
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    shard: int
    offset: int = 0  # absolute, set when the shard is laid out
    written: bool = False

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _itemsize(self.dtype)


class ShardWriter:
    """Sharded safetensors whose layout is fixed up front; tensors are written to their slots in
    any order with ``pwrite``. :meth:`close` checks every slot was written."""

    def __init__(
        self,
        directory: Path,
        slots: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
        *,
        max_shard_bytes: int,
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.slots: dict[str, _Slot] = {}
        shard, used = 0, 0
        for key, dtype, shape in slots:
            slot = _Slot(key, dtype, tuple(shape), 0)
            if used and used + slot.nbytes > max_shard_bytes:
                shard, used = shard + 1, 0
            slot.shard = shard
            used += slot.nbytes
            self.slots[key] = slot
        n = shard + 1
        self.names = (
            ["model.safetensors"]
            if n == 1
            else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self.directory = directory
        self.fds: list[int] = []
        for i, name in enumerate(self.names):
            mine = sorted((s for s in self.slots.values() if s.shard == i), key=lambda s: s.key)
            header: dict[str, Any] = {"__metadata__": {"format": "pt", **(metadata or {})}}
            pos = 0
            for s in mine:
                header[s.key] = {
                    "dtype": DTYPE_NAMES[s.dtype],
                    "shape": list(s.shape),
                    "data_offsets": [pos, pos + s.nbytes],
                }
                pos += s.nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            base = 8 + len(raw)
            for s in mine:
                s.offset = base + header[s.key]["data_offsets"][0]
            fd = os.open(directory / name, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            self.fds.append(fd)
            os.pwrite(fd, len(raw).to_bytes(8, "little") + raw, 0)
            os.ftruncate(fd, base + pos)

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.slots.values())

    def write(self, key: str, value: torch.Tensor) -> int:
        slot = self.slots[key]
        if slot.written:
            raise PassError(f"tensor {key} written twice")
        if value.dtype != slot.dtype or tuple(value.shape) != slot.shape:
            raise PassError(
                f"tensor {key}: replay gave {DTYPE_NAMES.get(value.dtype, value.dtype)}{list(value.shape)}, "
                f"the meta graph planned {DTYPE_NAMES[slot.dtype]}{list(slot.shape)} (a pass's recipe is not "
                "a pure function of its inputs)"
            )
        data = value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        mv, done = memoryview(data), 0
        while done < slot.nbytes:
            done += os.pwrite(self.fds[slot.shard], mv[done:], slot.offset + done)
        slot.written = True
        return slot.nbytes

    def close(self) -> dict[str, str]:
        """fsync, close, and return the HF ``weight_map`` (key → shard file)."""
        missing = [k for k, s in self.slots.items() if not s.written]
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.fsync(fd)
            os.close(fd)
        self.fds = []
        if missing:
            raise EmitError(f"{len(missing)} tensors were never written (first: {missing[0]})")
        return {k: self.names[s.shard] for k, s in sorted(self.slots.items())}

    def abort(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = []


# --------------------------------------------------------------------------- names


@dataclass(frozen=True)
class KeyMap:
    """``key = add + name[len(strip):]`` for graph FQNs that start with ``strip``."""

    strip: str = ""
    add: str = ""

    def key(self, name: str) -> str:
        if self.strip and name.startswith(self.strip):
            name = name[len(self.strip) :]
        return self.add + name


def key_mapping(names: Iterable[str], keys: Collection[str]) -> KeyMap:
    """The prefix rule under which most graph ``names`` are checkpoint ``keys``.

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


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class _Src:
    name: str  # graph FQN of an original tensor


@dataclass(frozen=True)
class _Out:
    recipe: int
    index: int


_Ref = _Src | _Out


@dataclass
class StreamPlan:
    """Which output key comes from which source tensor or recipe output."""

    outputs: dict[
        str, tuple[_Ref, torch.dtype, tuple[int, ...]]
    ]  # output key → (ref, dtype, shape)
    recipes: list[tuple[TensorRecipe, tuple[_Ref, ...]]]
    source_keys: dict[str, str]  # original graph FQN → checkpoint key
    tied: dict[str, str] = field(default_factory=dict)  # alias FQN → written key
    not_written: list[str] = field(default_factory=list)  # buffers absent from the checkpoint
    dropped: list[str] = field(
        default_factory=list
    )  # checkpoint keys the rewritten graph no longer has


def _named_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from module.named_parameters(remove_duplicate=False)
    yield from module.named_buffers(remove_duplicate=False)


def _groups(module: nn.Module) -> tuple[dict[str, torch.Tensor], dict[int, list[str]]]:
    named = dict(_named_tensors(module))
    groups: dict[int, list[str]] = {}
    for name, t in named.items():
        groups.setdefault(id(t), []).append(name)
    return named, groups


def make_plan(
    before: nn.Module,
    after: nn.Module,
    recipes: Sequence[TensorRecipe],
    checkpoint_keys: Collection[str],
    *,
    keymap: KeyMap | None = None,
) -> StreamPlan:
    """Plan the streamed conversion: ``before`` is the traced graph before the passes (its
    tensors' identities, to find tied names), ``after`` the rewritten one."""
    names_before, groups_before = _groups(before)
    keymap = keymap or key_mapping(names_before, checkpoint_keys)
    source_keys: dict[str, str] = {}
    for name, t in names_before.items():
        for alias in groups_before[id(t)]:
            if keymap.key(alias) in checkpoint_keys:
                source_keys[name] = keymap.key(alias)
                break
    current: dict[str, _Ref] = {}
    replay: list[tuple[TensorRecipe, tuple[_Ref, ...]]] = []
    for i, r in enumerate(recipes):
        ins = tuple(current.get(n, _Src(n)) for n in r.inputs)
        for ref in ins:
            if isinstance(ref, _Src) and ref.name not in source_keys:
                raise PassError(
                    f"pass {r.origin or '?'} reads {ref.name}, which the checkpoint does not hold "
                    f"(looked for {keymap.key(ref.name)!r}); it cannot be streamed"
                )
        replay.append((r, ins))
        for j, o in enumerate(r.outputs):
            current[o] = _Out(i, j)
    outputs: dict[str, tuple[_Ref, torch.dtype, tuple[int, ...]]] = {}
    tied: dict[str, str] = {}
    not_written: list[str] = []
    written_ids: dict[int, str] = {}
    for name, t in _named_tensors(after):
        if id(t) in written_ids:
            tied[name] = written_ids[id(t)]
            continue
        ref = current.get(name)
        if ref is None:
            original = names_before.get(name)
            if original is not t:
                raise PassError(
                    f"tensor {name} was changed without compute_tensors (no recipe): the pass cannot be "
                    "streamed from a checkpoint"
                )
            if name not in source_keys:
                if isinstance(t, nn.Parameter):
                    raise LoadError(
                        f"the checkpoint has no tensor for parameter {name} (looked for {keymap.key(name)!r})"
                    )
                not_written.append(name)
                continue
            ref = _Src(name)
        key = keymap.key(name)
        outputs[key] = (ref, t.dtype, tuple(t.shape))
        written_ids[id(t)] = key
    used_sources = {source_keys[n] for n in source_keys}
    dropped = sorted(k for k in used_sources if k not in outputs)
    return StreamPlan(outputs, replay, source_keys, tied, not_written, dropped)


# --------------------------------------------------------------------------- replay


class _Evaluator:
    """Demand-driven replay of the recipe log with reference counting: a value is kept only while
    a recipe that still has to run needs it; final outputs are written as soon as computed."""

    def __init__(
        self,
        plan: StreamPlan,
        ckpt: Checkpoint,
        writer: ShardWriter,
        on_write: Callable[[int], None],
    ) -> None:
        self.plan, self.ckpt, self.writer, self.on_write = plan, ckpt, writer, on_write
        self.final: dict[_Ref, list[str]] = {}
        for key, (ref, _, _) in plan.outputs.items():
            self.final.setdefault(ref, []).append(key)
        needed = {i for ref in self.final for i in self._closure(ref)}
        self.pending: Counter[_Ref] = Counter()
        for i in needed:
            for ref in plan.recipes[i][1]:
                self.pending[ref] += 1
        self.cache: dict[_Ref, torch.Tensor] = {}
        self.done: set[int] = set()

    def _closure(self, ref: _Ref) -> set[int]:
        out: set[int] = set()
        stack = [ref]
        while stack:
            r = stack.pop()
            if isinstance(r, _Out) and r.recipe not in out:
                out.add(r.recipe)
                stack.extend(self.plan.recipes[r.recipe][1])
        return out

    def _emit(self, ref: _Ref, value: torch.Tensor) -> None:
        for key in self.final.pop(ref, ()):
            self.on_write(self.writer.write(key, value))

    def value(self, ref: _Ref) -> torch.Tensor:
        if ref in self.cache:
            return self.cache[ref]
        if isinstance(ref, _Src):
            return self.ckpt.read(self.plan.source_keys[ref.name])
        self._run(ref.recipe)
        return self.cache[ref]

    def _release(self, ref: _Ref) -> None:
        self.pending[ref] -= 1
        if self.pending[ref] <= 0:
            self.cache.pop(ref, None)

    def _run(self, i: int) -> None:
        if i in self.done:
            raise PassError(f"recipe {i} evaluated twice (internal)")
        recipe, ins = self.plan.recipes[i]
        args = []
        for ref in ins:
            v = self.value(ref)
            if self.pending[ref] > 1 and ref not in self.cache:
                self.cache[ref] = v  # another recipe reads it too
            args.append(v)
        with torch.no_grad():
            values = recipe.fn(*args)
        if isinstance(values, torch.Tensor):
            values = (values,)
        del args
        for ref in ins:
            self._release(ref)
        self.done.add(i)
        for j, v in enumerate(values):
            out = _Out(i, j)
            if out in self.final:
                self._emit(out, v)
            if self.pending[out] > 0:
                self.cache[out] = v

    def run(self) -> None:
        for key in list(self.plan.outputs):
            ref = self.plan.outputs[key][0]
            if ref not in self.final:
                continue  # already written with its recipe
            if isinstance(ref, _Out):
                self._run(ref.recipe)
            else:
                self._emit(ref, self.value(ref))


# --------------------------------------------------------------------------- the API


@dataclass
class StreamResult:
    out_dir: Path
    shards: list[str]
    tensors: int
    bytes_written: int
    checkpoint_bytes: int
    changes: dict[str, list[str]]  # pass → changes
    plan: StreamPlan
    seconds: dict[str, float]


def build_meta_hf(
    model_dir: Path, *, trust_remote_code: bool = False
) -> tuple[nn.Module, tuple[Any, ...], str]:
    """The model class of a ``save_pretrained`` directory, built on ``meta`` from its config;
    with its default example input (on ``meta``)."""
    from normrewrite.load import _hf_default_input

    cfg_file = model_dir / "config.json"
    try:
        cfg = json.loads(cfg_file.read_text())
    except FileNotFoundError as e:
        raise LoadError(f"{model_dir}: a model directory needs a config.json") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoadError(f"{cfg_file}: not valid JSON ({e})") from e
    if (
        not isinstance(cfg, dict)
        or not isinstance(cfg.get("architectures"), list)
        or not cfg["architectures"]
    ):
        raise LoadError(f"{cfg_file}: no 'architectures' entry to choose the model class from")
    if cfg.get("auto_map") and not trust_remote_code:
        raise LoadError(
            f"{cfg_file}: the model needs custom code (auto_map); refusing without --trust-remote-code"
        )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import transformers

    arch = str(cfg["architectures"][0])
    cls = getattr(transformers, arch, None)
    if cls is None:
        raise LoadError(
            f"{cfg_file}: transformers {transformers.__version__} has no class {arch!r}"
        )
    try:
        config = transformers.AutoConfig.from_pretrained(
            str(model_dir), local_files_only=True, trust_remote_code=trust_remote_code
        )
        if hasattr(config, "use_cache"):
            config.use_cache = False
        with torch.device("meta"):
            model = cls(config)
    except Exception as e:
        raise LoadError(
            f"{model_dir}: cannot build {arch} on the meta device: {type(e).__name__}: {e}"
        ) from e
    model.eval()
    spec = _hf_default_input(model, config, arch)
    x = torch.empty(spec.shape, dtype=spec.dtype, device="meta")
    return model, (x,), f"{arch} ({model_dir})"


def _retype(module: nn.Module, ckpt: Checkpoint, keymap: KeyMap) -> None:
    """Give the meta module's parameters/buffers the checkpoint's dtypes (ties kept); refuse
    shape mismatches."""
    named, groups = _groups(module)
    for names in groups.values():
        t = named[names[0]]
        key = next((keymap.key(n) for n in names if keymap.key(n) in ckpt), None)
        if key is None:
            continue
        e = ckpt.entry(key)
        if tuple(t.shape) != e.shape:
            raise LoadError(
                f"checkpoint tensor {key} has shape {list(e.shape)}, the model expects {list(t.shape)}"
            )
        if t.dtype == e.dtype:
            continue
        new: torch.Tensor = torch.empty(e.shape, dtype=e.dtype, device="meta")
        if isinstance(t, nn.Parameter):  # one object for all tied names
            new = nn.Parameter(new, requires_grad=new.is_floating_point())
        for name in names:
            prefix, _, attr = name.rpartition(".")
            owner = module.get_submodule(prefix) if prefix else module
            if attr in owner._parameters:
                owner._parameters[attr] = new  # type: ignore[assignment]
            else:
                owner._buffers[attr] = new


def _load_meta(
    model: str | os.PathLike[str] | nn.Module,
    checkpoint: str | os.PathLike[str] | None,
    example_inputs: tuple[Any, ...] | None,
    tracer: str,
    trust_remote_code: bool,
) -> tuple[
    nn.Module, tuple[Any, ...], str, Checkpoint, Path | None, str, KeyMap, dict[str, torch.Tensor]
]:
    """The model on ``meta`` with the checkpoint's dtypes, its inputs, description, checkpoint,
    source directory, tracer and key mapping; and the values of non-persistent buffers of an
    in-memory ``nn.Module`` (they are in no checkpoint and ``meta`` loses them)."""
    src_dir: Path | None = None
    buffers: dict[str, torch.Tensor] = {}
    if isinstance(model, nn.Module):
        if checkpoint is None or example_inputs is None:
            raise UsageError(
                "a module needs checkpoint= and example_inputs= to be converted from a checkpoint"
            )
        buffers = {
            n: b.detach().clone()
            for n, b in _non_persistent_buffers(model)
            if b.device.type != "meta"
        }
        module = model.to("meta").eval()
        inputs = tuple(x.to("meta") if isinstance(x, torch.Tensor) else x for x in example_inputs)
        description = type(model).__name__
        ckpt = Checkpoint(checkpoint)
    else:
        src_dir = Path(model)
        if not src_dir.is_dir():
            raise LoadError(
                f"{src_dir}: not a model directory (streamed conversion needs config.json + safetensors)"
            )
        ckpt = Checkpoint(checkpoint if checkpoint is not None else src_dir)
        module, inputs, description = build_meta_hf(src_dir, trust_remote_code=trust_remote_code)
        if example_inputs is not None:
            inputs = tuple(
                x.to("meta") if isinstance(x, torch.Tensor) else x for x in example_inputs
            )
        if tracer == "auto":
            tracer = "export"
    names_before = [n for n, _ in _named_tensors(module)]
    keymap = key_mapping(names_before, ckpt.keys())
    _retype(module, ckpt, keymap)
    return module, inputs, description, ckpt, src_dir, tracer, keymap, buffers


def _non_persistent_buffers(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    for prefix, sub in module.named_modules(remove_duplicate=False):
        for attr in sub._non_persistent_buffers_set:
            b = sub._buffers.get(attr)
            if b is not None:
                yield (f"{prefix}.{attr}" if prefix else attr), b


def convert_checkpoint(
    model: str | os.PathLike[str] | nn.Module,
    passes: Sequence[str | Pass],
    out_dir: str | os.PathLike[str],
    *,
    checkpoint: str | os.PathLike[str] | None = None,
    example_inputs: tuple[Any, ...] | None = None,
    tracer: str = "auto",
    max_shard_size: int = 1 << 30,
    force: bool = False,
    trust_remote_code: bool = False,
    progress: bool = False,
    console: Any = None,
) -> StreamResult:
    """Rewrite a checkpoint larger than memory; write sharded safetensors to ``out_dir``.

    ``model`` is a Hugging Face ``save_pretrained`` directory (its config builds the model on
    ``meta``, its safetensors are the checkpoint) or an ``nn.Module`` (moved to ``meta``) with
    ``checkpoint`` (a ``.safetensors`` file or directory) and ``example_inputs``. The output
    directory gets the shards, ``model.safetensors.index.json`` when sharded, the source
    directory's other files (config, tokenizer) and ``normrewrite.json`` (what was done)."""
    import time

    from normrewrite.emit.files import atomic_dir, check_output
    from normrewrite.passes import REGISTRY

    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    pipeline = [REGISTRY.create(p) for p in passes]
    if max_shard_size <= 0:
        raise UsageError("max_shard_size must be positive")
    out = Path(out_dir)
    module, inputs, description, ckpt, src_dir, tracer, keymap, _ = _load_meta(
        model, checkpoint, example_inputs, tracer, trust_remote_code
    )
    check_output(
        out,
        force=force,
        inputs=tuple(p for p in (src_dir, Path(checkpoint) if checkpoint else None) if p),
    )

    bar = _Progress(progress, console)
    with bar:
        before, result, ctx = _rewrite_on_meta(module, inputs, tracer, pipeline, bar, seconds, t0)
        plan = make_plan(before, result.graph_module, ctx.recipes, ckpt.keys(), keymap=keymap)
        changes = {
            run.pass_.describe(): [f"{c.target}: {c.detail}" for c in run.result.changes]
            for run in result.runs
        }

        t2 = time.perf_counter()
        slots = [(k, dt, shape) for k, (_, dt, shape) in plan.outputs.items()]
        with atomic_dir(out) as tmp:
            writer = ShardWriter(
                tmp,
                slots,
                max_shard_bytes=max_shard_size,
                metadata={"normrewrite": ",".join(p.describe() for p in pipeline)},
            )
            try:
                bar.start_bytes("writing shards", writer.total_bytes)
                _Evaluator(plan, ckpt, writer, bar.advance).run()
                weight_map = writer.close()
            except BaseException:
                writer.abort()
                raise
            if len(writer.names) > 1:
                (tmp / "model.safetensors.index.json").write_text(
                    json.dumps(
                        {"metadata": {"total_size": writer.total_bytes}, "weight_map": weight_map},
                        indent=2,
                    )
                )
            if src_dir is not None:
                _copy_side_files(src_dir, tmp)
            (tmp / "normrewrite.json").write_text(
                json.dumps(
                    {
                        "model": description,
                        "passes": [p.describe() for p in pipeline],
                        "changes": changes,
                        "tied": plan.tied,
                        "not_written": plan.not_written,
                        "dropped": plan.dropped,
                        "key_prefix": {"strip": keymap.strip, "add": keymap.add},
                    },
                    indent=2,
                )
            )
        seconds["write"] = time.perf_counter() - t2
    seconds["total"] = time.perf_counter() - t0
    return StreamResult(
        out,
        writer.names,
        len(plan.outputs),
        writer.total_bytes,
        ckpt.nbytes,
        changes,
        plan,
        {k: round(v, 3) for k, v in seconds.items()},
    )


def _rewrite_on_meta(
    module: nn.Module,
    inputs: tuple[Any, ...],
    tracer: Any,
    pipeline: Sequence[Pass],
    bar: _Progress,
    seconds: dict[str, float],
    t0: float,
) -> tuple[nn.Module, PipelineResult, PassContext]:
    """Trace on the meta device and run the passes: (graph before, pipeline result, context with
    the recipe log)."""
    import time

    from normrewrite.trace import trace

    bar.stage("tracing on the meta device")
    gm = trace(module, inputs, tracer).graph_module  # type: ignore[arg-type]
    seconds["trace"] = time.perf_counter() - t0
    before = _snapshot(gm)
    ctx = PassContext(example_inputs=inputs)
    t1 = time.perf_counter()
    result = PassManager(pipeline, before_pass=lambda p: bar.stage(f"pass {p.name} (on meta)"))(
        gm, ctx
    )
    seconds["passes"] = time.perf_counter() - t1
    return before, result, ctx


def _snapshot(gm: nn.Module) -> nn.Module:
    """A shell module holding the same tensor objects under the same names (passes rebind names
    on ``gm``; the snapshot keeps the original bindings for tie detection and provenance)."""
    shell = nn.Module()
    for name, t in _named_tensors(gm):
        prefix, _, attr = name.rpartition(".")
        owner = shell
        for part in prefix.split(".") if prefix else ():
            if part not in owner._modules:
                owner._modules[part] = nn.Module()
            owner = owner._modules[part]
        if isinstance(t, nn.Parameter):
            owner._parameters[attr] = t
        else:
            owner._buffers[attr] = t
    return shell


def _copy_side_files(src: Path, dest: Path) -> None:
    for f in src.iterdir():
        if (
            f.is_file()
            and not f.is_symlink()
            and not f.name.endswith(".safetensors")
            and f.name not in ("model.safetensors.index.json", "normrewrite.json")
        ):
            shutil.copy2(f, dest / f.name)


class _Progress:
    """A rich progress display (stderr) when enabled; a no-op otherwise."""

    def __init__(self, enabled: bool, console: Any = None) -> None:
        self.enabled = enabled
        self.console = console
        self.progress: Any = None
        self.task: Any = None

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                SpinnerColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self.progress = Progress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=self.console or Console(stderr=True),
                transient=False,
            )
            self.progress.__enter__()
            self.task = self.progress.add_task("starting", total=None)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def stage(self, text: str) -> None:
        if self.progress is not None:
            self.progress.update(self.task, description=text)

    def start_bytes(self, text: str, total: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task, description=text, total=total, completed=0)

    def advance(self, n: int) -> None:
        if self.progress is not None:
            self.progress.advance(self.task, n)


# --------------------------------------------------------------------------- ONNX with external data


@dataclass
class StreamOnnxResult:
    path: Path
    data_path: Path
    initializers: int
    bytes_written: int  # external data
    checkpoint_bytes: int
    changes: dict[str, list[str]]  # pass → changes
    plan: StreamPlan
    nodes: int
    opset: int
    notes: list[str]
    seconds: dict[str, float]


def _hf_buffer_values(module: nn.Module, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Values of non-persistent buffers (rotary ``inv_freq``) of a Hugging Face model built on
    ``meta``: they are in no checkpoint, so they are recomputed the way ``from_pretrained`` does,
    with the model's ``_init_weights`` on a CPU copy of the owning module. Run twice from two
    different fills: a buffer ``_init_weights`` does not set is left out (and reported later)."""
    import copy

    init = getattr(module, "_init_weights", None)
    out: dict[str, torch.Tensor] = {}
    if init is None:
        return out
    for name in names:
        prefix, _, attr = name.rpartition(".")
        owner = module.get_submodule(prefix) if prefix else module
        b = owner._buffers.get(attr)
        if b is None:
            continue
        got = []
        for fill in (0, 1):
            shell = copy.copy(owner)  # shares the (meta) parameters; own buffer dict
            shell._buffers = {
                k: (torch.full(v.shape, fill, dtype=v.dtype) if v is not None else None)
                for k, v in owner._buffers.items()
            }
            try:
                with torch.no_grad():
                    init(shell)
            except Exception:
                break
            got.append(shell._buffers[attr])
        if len(got) == 2 and torch.equal(got[0], got[1]):
            out[name] = got[0]
    return out


def _bind_initializers(
    model: Any,
    plan: StreamPlan,
    keymap: KeyMap,
    scratch: Checkpoint,
    buffers: dict[str, torch.Tensor],
) -> tuple[dict[str, str], Any]:
    """Give every ``meta`` initializer of the exported ``model`` its data: an external tensor at
    the rewritten value's slot in ``scratch`` (the streamed safetensors; ``onnx_ir.save`` copies
    it file to file), or a recomputed non-persistent buffer. Returns the names bound to
    ``scratch`` (→ their keys there) and the exporter's tensor class."""
    import onnx_ir as ir

    lazy: dict[str, str] = {}
    wrap: Any = None
    for name, value in model.graph.initializers.items():
        cv = value.const_value
        raw = getattr(cv, "raw", None)
        if not (isinstance(raw, torch.Tensor) and raw.device.type == "meta"):
            continue  # a constant with data (created in forward, or folded by the exporter)
        key = keymap.key(name)
        if key not in plan.outputs:
            key = plan.tied.get(name, "")
        if key in plan.outputs:
            _, dtype, shape = plan.outputs[key]
            if dtype != raw.dtype or shape != tuple(raw.shape):
                raise EmitError(
                    f"ONNX initializer {name} is {raw.dtype}{list(raw.shape)}, the streamed tensor "
                    f"{key} is {dtype}{list(shape)}"
                )
            wrap = type(cv)
            f = scratch.where[key]
            e = f.entries[key]
            value.const_value = ir.ExternalTensor(
                f.path.name,
                e.start,
                e.end - e.start,
                cv.dtype,
                shape=cv.shape,
                name=name,
                base_dir=f.path.parent,
            )
            lazy[name] = key
        elif name in buffers:
            v = buffers[name].to(raw.dtype)
            if tuple(v.shape) != tuple(raw.shape):
                raise EmitError(f"buffer {name}: recomputed {list(v.shape)}, graph has {list(raw.shape)}")
            value.const_value = type(cv)(v, name=name)
        else:
            raise EmitError(
                f"ONNX initializer {name} has no data on the meta device and no checkpoint tensor "
                f"(looked for {keymap.key(name)!r}); it cannot be exported with --meta"
            )
    return lazy, wrap


def _read_transposed(ckpt: Checkpoint, key: str, chunk: int = 16 << 20) -> torch.Tensor:
    """``ckpt[key].T`` (2-D), contiguous, read in row blocks of about ``chunk`` bytes: the
    process holds the result and one block, not the source as well."""
    f = ckpt.where[key]
    e = f.entries[key]
    rows, cols = e.shape
    row_bytes = cols * _itemsize(e.dtype)
    out = torch.empty((cols, rows), dtype=e.dtype)
    step = max(1, chunk // max(row_bytes, 1))
    with open(f.path, "rb") as fh:
        for r in range(0, rows, step):
            n = min(step, rows - r)
            buf = torch.empty(n * row_bytes, dtype=torch.uint8)
            fh.seek(e.start + r * row_bytes)
            if fh.readinto(memoryview(buf.numpy())) != n * row_bytes:
                raise LoadError(f"{f.path}: {key} is truncated")
            out[:, r : r + n] = buf.view(e.dtype).reshape(n, cols).T
    return out


def _fold_weight_transposes(model: Any, lazy: dict[str, str], scratch: Checkpoint, wrap: Any) -> int:
    """``Transpose(W)`` of a lazily bound weight → a lazy initializer that transposes on read
    (what the exporter's constant folding does in memory: MatMul reads ``Wᵀ`` directly). The
    new initializers join ``lazy``; ``W`` is dropped by the optimizer when nothing else reads it."""
    import numpy as np
    import onnx_ir as ir

    graph = model.graph
    n = 0
    for node in list(graph):
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
            continue
        src, out = node.inputs[0], node.outputs[0]
        if src is None or src.name not in lazy or not src.is_initializer() or out.is_graph_output():
            continue
        base = src.const_value
        key = lazy[src.name]
        rank = len(base.shape)
        attr = node.attributes.get("perm")
        perm = tuple(attr.as_ints()) if attr is not None else tuple(reversed(range(rank)))
        name = f"{src.name}.T" if perm == (1, 0) else f"{src.name}.perm{''.join(map(str, perm))}"
        if name in graph.initializers:
            new = graph.initializers[name]
        else:

            def read(key: str = key, perm: tuple[int, ...] = perm, name: str = name) -> Any:
                if perm == (1, 0):
                    t = _read_transposed(scratch, key)
                else:
                    t = scratch.read(key).permute(perm).contiguous()
                if t.dtype in (torch.float32, torch.float64, torch.float16):  # tofile: no copy
                    return ir.Tensor(np.asarray(t.numpy()), name=name)
                return wrap(t, name=name)

            shape = ir.Shape([base.shape[i] for i in perm])
            new = ir.Value(name=name, shape=shape, type=ir.TensorType(base.dtype))
            new.const_value = ir.LazyTensor(read, dtype=base.dtype, shape=shape, name=name)
            graph.register_initializer(new)
            lazy[name] = key
        out.replace_all_uses_with(new)
        graph.remove(node, safe=True)
        n += 1
    for name in [k for k, v in graph.initializers.items() if k in lazy and not v.uses()]:
        graph.initializers.pop(name)
        lazy.pop(name)
    return n


def convert_checkpoint_onnx(
    model: str | os.PathLike[str] | nn.Module,
    passes: Sequence[str | Pass],
    dest: str | os.PathLike[str],
    *,
    checkpoint: str | os.PathLike[str] | None = None,
    example_inputs: tuple[Any, ...] | None = None,
    tracer: str = "auto",
    options: Any = None,
    force: bool = False,
    trust_remote_code: bool = False,
    progress: bool = False,
    console: Any = None,
) -> StreamOnnxResult:
    """Rewrite a checkpoint larger than memory into ONNX with external data (``DEST`` +
    ``DEST.data``).

    As :func:`convert_checkpoint`, the model is traced and rewritten on ``meta``; the rewritten
    ``meta`` program is exported to ONNX (``torch.onnx.export``, whose initializers are then
    ``meta`` tensors with no data) and optimized without folding any node that reads a weight.
    The recipes are replayed shard by shard into scratch safetensors beside the destination;
    each weight initializer points at its slot there (``Transpose(W)`` becomes a lazily
    transposed initializer) while ``onnx_ir.save`` streams the external data, so at most one
    tensor is in memory at a time. Non-
    persistent buffers (rotary ``inv_freq``) are recomputed (:func:`_hf_buffer_values`). The
    pair is validated (external-data locations, ``onnx.checker`` full check on the path) and
    renamed into place at the end: a failure leaves nothing behind. ``options`` is an
    :class:`~normrewrite.emit.onnx.options.OnnxOptions`; ``dtype`` and ``dynamic`` are not supported here
    (the ONNX keeps the checkpoint's dtypes)."""
    import time

    from normrewrite.core.onnx_graph import count_nodes
    from normrewrite.emit import export_program
    from normrewrite.emit.files import check_output
    from normrewrite.emit.onnx import pipeline as onnx_pipeline
    from normrewrite.emit.onnx.cleanup import optimize_keeping
    from normrewrite.emit.onnx.export import export_onnx
    from normrewrite.emit.onnx.options import OnnxOptions
    from normrewrite.emit.onnx.write import atomic_pair, write_model
    from normrewrite.passes import REGISTRY

    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    options = options or OnnxOptions()
    if options.dtype != "float32" or options.dynamic or options.keep_io_types:
        raise UsageError(
            "--meta ONNX output keeps the checkpoint's dtypes and static shapes: "
            "--dtype/--keep-io-types/--dynamic are not supported with --meta"
        )
    opset = options.resolved_opset
    if opset < 18:
        raise UsageError(f"torch.onnx.export writes opset 18 at the lowest, not {opset}")
    pipeline = [REGISTRY.create(p) for p in passes]
    if "fix-export" in REGISTRY and not any(p.name == "fix-export" for p in pipeline):
        pipeline.append(REGISTRY.create("fix-export"))  # as api.convert does before ONNX
    out = Path(dest)
    data = out.with_name(out.name + ".data")
    module, inputs, _description, ckpt, src_dir, tracer, keymap, buffers = _load_meta(
        model, checkpoint, example_inputs, tracer, trust_remote_code
    )
    sources = tuple(p for p in (src_dir, Path(checkpoint) if checkpoint else None) if p)
    check_output(out, force=force, inputs=sources)
    check_output(data, force=force, inputs=sources)
    if not isinstance(model, nn.Module):
        missing = [n for n, _ in _non_persistent_buffers(module)]
        buffers = _hf_buffer_values(module, missing)

    bar = _Progress(progress, console)
    notes: list[str] = []
    with bar:
        before, result, ctx = _rewrite_on_meta(module, inputs, tracer, pipeline, bar, seconds, t0)
        rewritten = result.graph_module
        plan = make_plan(before, rewritten, ctx.recipes, ckpt.keys(), keymap=keymap)
        changes = {
            run.pass_.describe(): [f"{c.target}: {c.detail}" for c in run.result.changes]
            for run in result.runs
        }

        t2 = time.perf_counter()
        bar.stage("exporting the meta program to ONNX")
        ep = export_program(rewritten, inputs)  # type: ignore[arg-type]
        onnx_model = export_onnx(ep, opset, optimize=False)  # optimized below, weights kept on disk
        seconds["export"] = time.perf_counter() - t2

        t3 = time.perf_counter()
        with atomic_pair(out) as tmp:
            scratch_dir = tmp.parent / "scratch-safetensors"
            scratch_dir.mkdir()
            writer = ShardWriter(
                scratch_dir,
                [(k, dt, shape) for k, (_, dt, shape) in plan.outputs.items()],
                max_shard_bytes=1 << 62,
            )
            try:
                bar.start_bytes("replaying the rewrites", writer.total_bytes)
                _Evaluator(plan, ckpt, writer, bar.advance).run()
                writer.close()
            except BaseException:
                writer.abort()
                raise
            seconds["replay"] = time.perf_counter() - t3
            scratch = Checkpoint(scratch_dir)
            lazy, wrap = _bind_initializers(onnx_model, plan, keymap, scratch, buffers)

            bar.stage("optimizing the ONNX graph (weights stay on disk)")
            _fold_weight_transposes(onnx_model, lazy, scratch, wrap)
            optimize_keeping(onnx_model, lazy)  # the export stage's optimizer, around the weights
            done = onnx_pipeline.transform(
                onnx_model, onnx_pipeline.norm_fusions(), options, cleanup=onnx_pipeline.Cleanup.NONE
            )
            notes += done.fusion_notes() + done.notes
            t4 = time.perf_counter()
            seconds["optimize"] = t4 - t3 - seconds["replay"]
            inits = onnx_model.graph.initializers
            nbytes = sum(inits[n].const_value.nbytes for n in lazy if n in inits)
            bar.start_bytes("writing ONNX external data", nbytes)

            def on_tensor(tensor: Any, info: Any) -> None:
                if tensor.name in lazy:
                    bar.advance(tensor.nbytes)

            write_model(onnx_model, tmp, threshold=0, on_tensor=on_tensor, max_in_flight_bytes=1 << 27)
            seconds["save"] = time.perf_counter() - t4
            shutil.rmtree(scratch_dir)
            bar.stage("validating")
            notes += onnx_pipeline.validate_file(tmp)  # external-data locations, checker / session
            written = (tmp.parent / data.name).stat().st_size if (tmp.parent / data.name).exists() else 0
            nodes = count_nodes(onnx_model)
    seconds["total"] = time.perf_counter() - t0
    return StreamOnnxResult(
        out,
        data,
        len(onnx_model.graph.initializers),
        written,
        ckpt.nbytes,
        changes,
        plan,
        nodes,
        opset,
        notes,
        {k: round(v, 3) for k, v in seconds.items()},
    )


__all__ = [
    "Checkpoint",
    "KeyMap",
    "SafetensorsFile",
    "ShardWriter",
    "StreamOnnxResult",
    "StreamPlan",
    "StreamResult",
    "convert_checkpoint",
    "convert_checkpoint_onnx",
    "key_mapping",
    "make_plan",
]
