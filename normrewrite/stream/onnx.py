"""``--meta`` to ONNX with external data: the meta program exported unoptimized, its weights bound
to the replayed tensors on disk, then the one ONNX pipeline's stages
(:mod:`normrewrite.emit.onnx.pipeline`) with weight folding kept off, and a streamed write."""


from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from normrewrite.core.pass_infra import Pass
from normrewrite.errors import EmitError, LoadError, UsageError
from normrewrite.load.checkpoint import Checkpoint, KeyMap
from normrewrite.report import OutputReport, Report
from normrewrite.stream.convert import StreamResult, convert_checkpoint, meta_report
from normrewrite.stream.meta import load_meta, non_persistent_buffers, rewrite_on_meta
from normrewrite.stream.plan import StreamPlan, make_plan
from normrewrite.stream.progress import NoProgress, Progress
from normrewrite.stream.replay import Replay
from normrewrite.stream.shards import DEFAULT_MAX_SHARD_BYTES, ShardWriter

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
    report: Report


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
            e = scratch.entry(key)
            value.const_value = ir.ExternalTensor(
                e.path.name,
                e.start,
                e.end - e.start,
                cv.dtype,
                shape=cv.shape,
                name=name,
                base_dir=e.path.parent,
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
    e = ckpt.entry(key)
    rows, cols = e.shape
    row_bytes = cols * e.dtype.itemsize
    out = torch.empty((cols, rows), dtype=e.dtype)
    step = max(1, chunk // max(row_bytes, 1))
    with open(e.path, "rb") as fh:
        for r in range(0, rows, step):
            n = min(step, rows - r)
            buf = torch.empty(n * row_bytes, dtype=torch.uint8)
            fh.seek(e.start + r * row_bytes)
            if fh.readinto(memoryview(buf.numpy())) != n * row_bytes:
                raise LoadError(f"{e.path}: {key} is truncated")
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
    progress: Progress | None = None,
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
    from normrewrite.emit.onnx import pipeline as onnx_pipeline
    from normrewrite.emit.onnx.cleanup import optimize_keeping
    from normrewrite.emit.onnx.export import export_onnx
    from normrewrite.emit.onnx.options import OnnxOptions
    from normrewrite.emit.onnx.write import atomic_pair, write_model
    from normrewrite.emit.plan import check_output
    from normrewrite.passes import REGISTRY, norm_fusions

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
    meta = load_meta(model, checkpoint, example_inputs, tracer, trust_remote_code)
    module, inputs, ckpt, src_dir = meta.module, meta.inputs, meta.ckpt, meta.src_dir
    tracer, keymap, buffers = meta.tracer, meta.keymap, meta.buffers
    sources = tuple(p for p in (src_dir, Path(checkpoint) if checkpoint else None) if p)
    check_output(out, force=force, inputs=sources)
    check_output(data, force=force, inputs=sources)
    if not isinstance(model, nn.Module):
        missing = [n for n, _ in non_persistent_buffers(module)]
        buffers = _hf_buffer_values(module, missing)

    bar = progress or NoProgress()
    notes: list[str] = []
    rw = rewrite_on_meta(module, inputs, tracer, pipeline, bar, seconds, t0)
    before, result, ctx = rw.before, rw.result, rw.ctx
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
            max_shard_bytes=DEFAULT_MAX_SHARD_BYTES,
        )
        try:
            bar.start_bytes("replaying the rewrites", writer.total_bytes)
            Replay(plan, ckpt, writer, bar.advance).run()
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
            onnx_model, norm_fusions(), options, cleanup=onnx_pipeline.Cleanup.NONE
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
    seconds = {k: round(v, 3) for k, v in seconds.items()}
    output = OutputReport(str(out), "onnx", notes=[f"opset {opset}, {nodes} nodes", *notes])
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
        seconds,
        meta_report(meta, rw, plan, [output], seconds),
    )


__all__ = [
    "NoProgress",
    "Progress",
    "ShardWriter",
    "StreamOnnxResult",
    "StreamPlan",
    "StreamResult",
    "convert_checkpoint",
    "convert_checkpoint_onnx",
    "make_plan",
]
