"""Hugging Face ``save_pretrained`` directories: config, model class, default input, and the check
that the config describes the checkpoint beside it.

The class is ``config.json``'s ``architectures[0]`` from ``transformers``; the network is never
used. Both the in-memory loader (:func:`load_hf`) and the streamed conversion
(:mod:`normrewrite.stream`) build the model on ``meta`` first (:func:`build_on_meta`) and compare
it with the checkpoint's tensor names and shapes before anything real is allocated, so a config
that does not match its weights (``num_hidden_layers: 100000`` next to a 2-layer checkpoint) is
refused in seconds with the first missing or unexpected tensor.

Building on ``meta`` stores nothing, but each module still costs time and Python objects; the
build is therefore bounded by the checkpoint (:data:`BUDGET_FACTOR` registered tensors per stored
tensor, plus :data:`BUDGET_SLACK`) and aborted beyond that.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from normrewrite.errors import LoadError, first_line
from normrewrite.load.checkpoint import Checkpoint, KeyMap, key_mapping
from normrewrite.load.inputs import InputSpec, make_inputs

if TYPE_CHECKING:
    from normrewrite.load import LoadedModel

BUDGET_FACTOR = 4  # registered parameters/buffers per checkpoint tensor (ties re-register)
BUDGET_SLACK = 256  # plus non-persistent buffers and other bookkeeping tensors


@dataclass
class HFModel:
    module: nn.Module
    config: Any
    cls: type  # the transformers model class
    arch: str
    keymap: KeyMap  # module FQN → checkpoint key


def read_config(path: Path, *, trust_remote_code: bool) -> tuple[Any, type, str]:
    """The ``transformers`` config (``use_cache`` off) and model class of a model directory."""
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise LoadError(
            f"{path}: a model directory needs a config.json (as written by save_pretrained)"
        )
    try:
        cfg = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoadError(f"{cfg_file}: not valid JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise LoadError(f"{cfg_file}: expected a JSON object")
    archs = cfg.get("architectures") or []
    if not archs or not isinstance(archs, list):
        raise LoadError(f"{cfg_file}: no 'architectures' entry to choose the model class from")
    if cfg.get("auto_map") and not trust_remote_code:
        raise LoadError(
            f"{cfg_file}: the model needs custom code from its directory (auto_map); "
            "refusing to run it without --trust-remote-code"
        )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import transformers
    except ImportError as e:
        raise LoadError("loading a Hugging Face directory needs the 'transformers' package") from e
    arch = str(archs[0])
    cls = model_class(transformers, arch, cfg.get("model_type"))
    if cls is None:
        raise LoadError(
            f"{cfg_file}: transformers {transformers.__version__} has no model class {arch!r}"
            + (
                f" for model_type {cfg['model_type']!r}"
                if isinstance(cfg.get("model_type"), str)
                else ""
            )
        )
    try:
        config = transformers.AutoConfig.from_pretrained(
            str(path), local_files_only=True, trust_remote_code=trust_remote_code
        )
    except Exception as e:
        raise LoadError(
            f"{cfg_file}: cannot read the config: {type(e).__name__}: {first_line(e)}"
        ) from e
    if hasattr(config, "use_cache"):
        config.use_cache = False  # no cache objects in traced outputs
    return config, cls, arch


def model_class(transformers: Any, arch: str, model_type: Any) -> type | None:
    """The ``transformers`` model class named ``arch``: exported at the top level, or else found
    through transformers' own model-type registry — ``model_type`` → the package
    ``transformers.models.<module>`` (``configuration_auto.model_type_to_module_name``) and its
    ``modeling_<module>`` module, where classes such as ``WhisperEncoder`` live. Only installed
    transformers code is imported (no remote code, no network); anything but a
    ``PreTrainedModel`` subclass is None."""
    if not arch.isidentifier():
        return None
    found = getattr(transformers, arch, None)
    if found is None and isinstance(model_type, str):
        from transformers.models.auto.configuration_auto import (
            CONFIG_MAPPING_NAMES,
            model_type_to_module_name,
        )

        if model_type in CONFIG_MAPPING_NAMES:  # a registered type: its module name is known
            name = model_type_to_module_name(model_type)
            for module in (
                f"transformers.models.{name}",
                f"transformers.models.{name}.modeling_{name}",
            ):
                try:
                    found = getattr(importlib.import_module(module), arch, None)
                except ImportError:
                    found = None
                if found is not None:
                    break
    if isinstance(found, type) and issubclass(found, transformers.PreTrainedModel):
        return found
    return None


def build_on_meta(
    path: Path, ckpt: Checkpoint | None = None, *, trust_remote_code: bool = False
) -> HFModel:
    """The model of the directory ``path`` on ``meta``, checked against ``ckpt`` (default: the
    directory's own safetensors, opened once the config is read) with
    :func:`check_against_checkpoint`; the build is bounded by the checkpoint's size."""
    config, cls, arch = read_config(path, trust_remote_code=trust_remote_code)
    ckpt = ckpt if ckpt is not None else Checkpoint(path)
    limit = BUDGET_FACTOR * len(ckpt) + BUDGET_SLACK
    try:
        with _registration_budget(limit), torch.device("meta"):
            model = cls(config)
    except _OverBudget:
        raise LoadError(_over_budget(path, config, ckpt, limit)) from None
    except Exception as e:
        raise LoadError(
            f"{path}: cannot build {arch} on the meta device: {type(e).__name__}: {first_line(e)}"
        ) from e
    model.eval()
    keymap = check_against_checkpoint(model, ckpt, where=path)
    return HFModel(model, config, cls, arch, keymap)


def check_against_checkpoint(model: nn.Module, ckpt: Checkpoint, *, where: Path) -> KeyMap:
    """Refuse (:class:`LoadError`) a checkpoint that does not hold exactly the model's tensors:
    every parameter (one name of each tied group) present with the model's shape, every
    persistent buffer present with its shape or absent, and no other tensor — except the keys the
    model class declares ignorable (``_keys_to_ignore_on_load_missing``/``_unexpected``). Returns
    the key prefix rule."""
    named: dict[str, torch.Tensor] = {}
    groups: dict[int, list[str]] = {}
    for name, t in [
        *model.named_parameters(remove_duplicate=False),
        *_persistent_buffers(model),
    ]:
        named[name] = t
        groups.setdefault(id(t), []).append(name)
    renames = _renamed_keys(model, ckpt.keys())
    if renames is None:  # the class converts (merges/splits) checkpoint tensors as it loads them
        return key_mapping(named, ckpt.keys())  # the build was bounded by the checkpoint's size
    inverse = {model_key: key for key, model_key in renames.items()}
    keymap = key_mapping(named, [renames.get(k, k) for k in ckpt])
    keymap = dataclasses.replace(keymap, renamed=inverse)
    # a non-persistent buffer saved by an older version of the class is harmless
    used = {keymap.key(n) for n, _ in model.named_buffers(remove_duplicate=False) if n not in named}
    ignore_missing = _patterns(model, "_keys_to_ignore_on_load_missing")
    ignore_unexpected = _patterns(model, "_keys_to_ignore_on_load_unexpected")
    for names in groups.values():
        t = named[names[0]]
        keys = [keymap.key(n) for n in names if keymap.key(n) in ckpt]
        if not keys:
            if isinstance(t, nn.Parameter) and not any(p.search(names[0]) for p in ignore_missing):
                raise LoadError(
                    f"{where}: config.json does not match the checkpoint: it has no tensor "
                    f"{keymap.key(names[0])} (the model's {names[0]}, {list(t.shape)})"
                )
            continue
        for key in keys:
            shape = ckpt.entry(key).shape
            if shape != tuple(t.shape):
                raise LoadError(
                    f"{where}: checkpoint tensor {key} has shape {list(shape)}, the model built "
                    f"from config.json expects {list(t.shape)}"
                )
            used.add(key)
    for key in ckpt:
        if key not in used and not any(p.search(key) for p in ignore_unexpected):
            raise LoadError(
                f"{where}: config.json does not match the checkpoint: the model has no tensor for "
                f"its {key}"
            )
    return keymap


def _renamed_keys(model: nn.Module, keys: Iterable[str]) -> dict[str, str] | None:
    """Checkpoint key → the model-side name the class loads it as, for the keys transformers
    renames on load (its own ``get_model_conversion_mapping`` / ``rename_source_key``, the code
    ``from_pretrained`` runs); None when the class also *converts* tensors (merges experts, splits
    fused projections), which a name-and-shape check cannot follow."""
    try:
        from transformers import conversion_mapping, core_model_loading
    except ImportError:  # an older transformers: names are loaded as saved
        return {}
    if not hasattr(model, "base_model_prefix"):
        return {}
    transforms = conversion_mapping.get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, core_model_loading.WeightRenaming)]
    if any(not isinstance(t, core_model_loading.WeightRenaming) for t in transforms):
        return None
    if not renamings:
        return {}
    out = {}
    for key in keys:
        renamed, _ = core_model_loading.rename_source_key(key, renamings, [], model.base_model_prefix, None)
        if renamed != key:
            out[key] = renamed
    return out


def _persistent_buffers(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    for prefix, sub in model.named_modules(remove_duplicate=False):
        for attr, b in sub._buffers.items():
            if b is not None and attr not in sub._non_persistent_buffers_set:
                yield (f"{prefix}.{attr}" if prefix else attr), b


def _patterns(model: nn.Module, attr: str) -> list[re.Pattern[str]]:
    found = getattr(model, attr, None) or ()
    return [re.compile(p) for p in found if isinstance(p, str)]


class _OverBudget(Exception):
    pass


@contextmanager
def _registration_budget(limit: int) -> Iterator[None]:
    """Raise :class:`_OverBudget` once more than ``limit`` parameters/buffers are registered."""
    from torch.nn.modules.module import (
        register_module_buffer_registration_hook,
        register_module_parameter_registration_hook,
    )

    count = 0

    def hook(module: nn.Module, name: str, value: Any) -> None:
        nonlocal count
        count += 1
        if count > limit:
            raise _OverBudget

    handles = [
        register_module_parameter_registration_hook(hook),
        register_module_buffer_registration_hook(hook),
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _over_budget(path: Path, config: Any, ckpt: Checkpoint, limit: int) -> str:
    """The one-line refusal for a config describing far more tensors than the checkpoint holds;
    names the first layer the checkpoint lacks when ``num_hidden_layers`` says why."""
    msg = (
        f"{path}: config.json does not match the checkpoint: it describes a model of more than "
        f"{limit} tensors, the checkpoint holds {len(ckpt)}"
    )
    layers = getattr(config, "num_hidden_layers", None)
    lists: dict[str, set[int]] = {}
    for key in ckpt:
        parts = key.split(".")
        for i, part in enumerate(parts):
            if part.isdigit():
                lists.setdefault(".".join(parts[:i]), set()).add(int(part))
    if isinstance(layers, int) and lists:
        prefix, indices = max(lists.items(), key=lambda kv: (len(kv[1]), kv[0]))
        n = max(indices) + 1
        if layers > n:
            first = sorted(k for k in ckpt if k.startswith(f"{prefix}.0."))[0]
            missing = f"{prefix}.{n}." + first[len(prefix) + 3 :]
            msg += f" (num_hidden_layers={layers}, the checkpoint has {prefix}.0-{n - 1}: no {missing})"
    return msg


def default_input(model: nn.Module, config: Any, arch: str) -> InputSpec:
    """The example input a model's config implies: token ids below the vocabulary size, or an
    image of the configured size."""
    main = getattr(model, "main_input_name", "input_ids")
    if main == "input_ids":
        vocab = getattr(config, "vocab_size", None)
        if not vocab:
            raise LoadError(f"{arch}: config has no vocab_size; pass --input 1xSEQ:int64")
        seq = min(16, int(getattr(config, "max_position_embeddings", 16) or 16))
        return InputSpec((1, seq), torch.int64, int(vocab))
    if main == "pixel_values":
        size = getattr(config, "image_size", 224) or 224
        if isinstance(size, list | tuple):
            h, w = int(size[0]), int(size[-1])
        elif isinstance(size, dict):
            h, w = int(size.get("height", 224)), int(size.get("width", 224))
        else:
            h = w = int(size)
        channels = int(getattr(config, "num_channels", 3) or 3)
        return InputSpec((1, channels, h, w), torch.float32)
    raise LoadError(
        f"{arch}: cannot guess the shape of its input {main!r}; pass --input SHAPE[:dtype]"
    )


def load_hf(
    path: Path, inputs: Sequence[InputSpec] | None, *, trust_remote_code: bool, seed: int
) -> LoadedModel:
    """Load a ``save_pretrained`` directory into memory; the config is checked against the
    checkpoint on ``meta`` first, so a mismatch is refused before any real allocation."""
    from normrewrite.load import LoadedModel

    if not (path / "config.json").is_file():
        raise LoadError(
            f"{path}: a model directory needs a config.json (as written by save_pretrained)"
        )
    if not any((path / f).exists() for f in ("model.safetensors", "model.safetensors.index.json")):
        if any((path / f).exists() for f in ("pytorch_model.bin", "pytorch_model.bin.index.json")):
            raise LoadError(
                f"{path}: only pickled pytorch_model.bin weights; refusing to unpickle them "
                "(re-save with save_pretrained(safe_serialization=True))"
            )
        raise LoadError(f"{path}: no model.safetensors weights")
    meta = build_on_meta(path, trust_remote_code=trust_remote_code)
    config, arch = meta.config, meta.arch
    try:
        model = meta.cls.from_pretrained(
            str(path), config=config, local_files_only=True, trust_remote_code=trust_remote_code
        )
    except Exception as e:
        raise LoadError(f"{path}: cannot load {arch}: {type(e).__name__}: {first_line(e)}") from e
    model.eval()
    description = f"{arch} ({path})"
    if inputs:
        high = getattr(config, "vocab_size", None)
        specs = [
            InputSpec(s.shape, s.dtype, high if not s.dtype.is_floating_point else None)
            for s in inputs
        ]
        return LoadedModel(model, make_inputs(specs, seed), "hf", description)
    spec = default_input(model, config, arch)
    return LoadedModel(model, make_inputs([spec], seed), "hf", description, input_origin="config")
