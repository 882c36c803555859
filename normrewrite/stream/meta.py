"""The model of a streamed conversion on the ``meta`` device: built (or moved), given the
checkpoint's dtypes, traced, and rewritten by the passes — shapes and dtypes only, no data."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from normrewrite.core.pass_infra import Pass, PassContext, PassManager, PipelineResult
from normrewrite.errors import LoadError, UsageError
from normrewrite.load.checkpoint import Checkpoint, KeyMap, key_mapping
from normrewrite.stream.plan import named_tensors, tensor_groups
from normrewrite.stream.progress import Progress


@dataclass
class MetaModel:
    module: nn.Module  # on meta, with the checkpoint's dtypes
    inputs: tuple[Any, ...]  # on meta
    description: str
    source: str  # "hf" | "module"
    input_origin: str  # "config" | "given"
    ckpt: Checkpoint
    src_dir: Path | None  # the Hugging Face directory (its side files are copied)
    tracer: str
    keymap: KeyMap
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)  # non-persistent, with values


def load_meta(
    model: str | os.PathLike[str] | nn.Module,
    checkpoint: str | os.PathLike[str] | None,
    example_inputs: tuple[Any, ...] | None,
    tracer: str,
    trust_remote_code: bool,
) -> MetaModel:
    """``model`` is a Hugging Face directory (built on ``meta`` from its config, after checking
    the config against the checkpoint) or an ``nn.Module`` with ``checkpoint`` and
    ``example_inputs``. For a module, the values of its non-persistent buffers are kept: they are
    in no checkpoint and ``meta`` loses them."""
    if isinstance(model, nn.Module):
        if checkpoint is None or example_inputs is None:
            raise UsageError(
                "a module needs checkpoint= and example_inputs= to be converted from a checkpoint"
            )
        buffers = {
            n: b.detach().clone()
            for n, b in non_persistent_buffers(model)
            if b.device.type != "meta"
        }
        ckpt = Checkpoint(checkpoint)
        module = model.to("meta").eval()
        keymap = key_mapping([n for n, _ in named_tensors(module)], ckpt.keys())
        meta = MetaModel(
            module,
            _on_meta(example_inputs),
            type(model).__name__,
            "module",
            "given",
            ckpt,
            None,
            tracer,
            keymap,
            buffers,
        )
    else:
        from normrewrite.load.hf import build_on_meta, default_input

        src_dir = Path(model)
        if not src_dir.is_dir():
            raise LoadError(
                f"{src_dir}: not a model directory (streamed conversion needs config.json + safetensors)"
            )
        ckpt = Checkpoint(checkpoint if checkpoint is not None else src_dir)
        hf = build_on_meta(src_dir, ckpt, trust_remote_code=trust_remote_code)
        if example_inputs is not None:
            inputs, origin = _on_meta(example_inputs), "given"
        else:
            spec = default_input(hf.module, hf.config, hf.arch)
            inputs, origin = (torch.empty(spec.shape, dtype=spec.dtype, device="meta"),), "config"
        meta = MetaModel(
            hf.module,
            inputs,
            f"{hf.arch} ({src_dir})",
            "hf",
            origin,
            ckpt,
            src_dir,
            "export" if tracer == "auto" else tracer,
            hf.keymap,
        )
    retype(meta.module, meta.ckpt, meta.keymap)
    return meta


def _on_meta(inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(x.to("meta") if isinstance(x, torch.Tensor) else x for x in inputs)


def retype(module: nn.Module, ckpt: Checkpoint, keymap: KeyMap) -> None:
    """Give the meta module's parameters/buffers the checkpoint's dtypes (ties kept); refuse
    shape mismatches."""
    named, groups = tensor_groups(module)
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


def non_persistent_buffers(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    for prefix, sub in module.named_modules(remove_duplicate=False):
        for attr in sub._non_persistent_buffers_set:
            b = sub._buffers.get(attr)
            if b is not None:
                yield (f"{prefix}.{attr}" if prefix else attr), b


@dataclass
class MetaRewrite:
    before: nn.Module  # the traced graph's tensors before the passes (see :func:`snapshot`)
    result: PipelineResult
    ctx: PassContext  # holds the recipe log
    tracer: str  # the tracer used
    nodes_before: int


def rewrite_on_meta(
    module: nn.Module,
    inputs: tuple[Any, ...],
    tracer: Any,
    pipeline: Sequence[Pass],
    progress: Progress,
    seconds: dict[str, float],
    t0: float,
) -> MetaRewrite:
    """Trace on the meta device and run the passes."""
    from normrewrite.core.graph import count_ops
    from normrewrite.trace import trace

    progress.stage("tracing on the meta device")
    traced = trace(module, inputs, tracer)  # type: ignore[arg-type]
    gm = traced.graph_module
    seconds["trace"] = time.perf_counter() - t0
    before, nodes = snapshot(gm), count_ops(gm)
    ctx = PassContext(example_inputs=inputs)
    t1 = time.perf_counter()
    manager = PassManager(
        pipeline, before_pass=lambda p: progress.stage(f"pass {p.name} (on meta)")
    )
    result = manager(gm, ctx)
    seconds["passes"] = time.perf_counter() - t1
    return MetaRewrite(before, result, ctx, traced.tracer, nodes)


def snapshot(gm: nn.Module) -> nn.Module:
    """A shell module holding the same tensor objects under the same names (passes rebind names
    on ``gm``; the snapshot keeps the original bindings for tie detection and provenance)."""
    shell = nn.Module()
    for name, t in named_tensors(gm):
        prefix, _, attr = name.rpartition(".")
        owner = shell
        for part in prefix.split(".") if prefix else ():
            if part not in owner._modules:
                owner._modules[part] = nn.Module()
            owner = owner._modules[part]  # type: ignore[assignment]
        if isinstance(t, nn.Parameter):
            owner._parameters[attr] = t
        else:
            owner._buffers[attr] = t
    return shell
