"""The streamed conversion driver: meta model → passes → plan → replay into sharded safetensors,
with the report."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from normrewrite.core.pass_infra import Pass
from normrewrite.errors import UsageError
from normrewrite.load.checkpoint import INDEX
from normrewrite.report import OutputReport, PassReport, Report
from normrewrite.stream.meta import MetaModel, MetaRewrite, load_meta, rewrite_on_meta
from normrewrite.stream.plan import StreamPlan, make_plan
from normrewrite.stream.progress import NoProgress, Progress
from normrewrite.stream.replay import Replay
from normrewrite.stream.shards import DEFAULT_MAX_SHARD_BYTES, ShardWriter

NOT_VERIFIED = (
    "verification not run: --meta rewrites on the meta device, where the model has no values "
    "(the written tensors are the passes' recipes replayed on the checkpoint)"
)


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
    report: Report


def convert_checkpoint(
    model: str | os.PathLike[str] | nn.Module,
    passes: Sequence[Pass],
    out_dir: str | os.PathLike[str],
    *,
    checkpoint: str | os.PathLike[str] | None = None,
    example_inputs: tuple[Any, ...] | None = None,
    tracer: str = "auto",
    max_shard_size: int = DEFAULT_MAX_SHARD_BYTES,
    force: bool = False,
    trust_remote_code: bool = False,
    progress: Progress | None = None,
) -> StreamResult:
    """Rewrite a checkpoint larger than memory with ``passes``; write sharded safetensors to
    ``out_dir``.

    ``model`` is a Hugging Face ``save_pretrained`` directory (its config builds the model on
    ``meta``, its safetensors are the checkpoint) or an ``nn.Module`` (moved to ``meta``) with
    ``checkpoint`` (a ``.safetensors`` file or directory) and ``example_inputs``. The output
    directory gets the shards, ``model.safetensors.index.json`` when sharded, the source
    directory's other files (config, tokenizer) and ``normrewrite.json`` (what was done). Memory:
    one output shard (``max_shard_size``) plus the tensors of the recipe being replayed."""
    from normrewrite.emit.files import atomic_dir
    from normrewrite.emit.plan import check_output

    bar = progress or NoProgress()
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    pipeline = list(passes)
    if max_shard_size <= 0:
        raise UsageError("max_shard_size must be positive")
    out = Path(out_dir)
    meta = load_meta(model, checkpoint, example_inputs, tracer, trust_remote_code)
    sources = tuple(p for p in (meta.src_dir, Path(checkpoint) if checkpoint else None) if p)
    check_output(out, force=force, inputs=sources)

    rw = rewrite_on_meta(meta.module, meta.inputs, meta.tracer, pipeline, bar, seconds, t0)
    plan = make_plan(
        rw.before, rw.result.graph_module, rw.ctx.recipes, meta.ckpt.keys(), keymap=meta.keymap
    )
    changes = {
        run.pass_.describe(): [f"{c.target}: {c.detail}" for c in run.result.changes]
        for run in rw.result.runs
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
            Replay(plan, meta.ckpt, writer, bar.advance).run()
            writer.close()
        except BaseException:
            writer.abort()
            raise
        if meta.src_dir is not None:
            _copy_side_files(meta.src_dir, tmp)
        manifest = {
            "model": meta.description,
            "passes": [p.describe() for p in pipeline],
            "changes": changes,
            "tied": plan.tied,
            "not_written": plan.not_written,
            "dropped": plan.dropped,
            "key_prefix": {"strip": meta.keymap.strip, "add": meta.keymap.add},
        }
        (tmp / "normrewrite.json").write_text(json.dumps(manifest, indent=2))
    seconds["write"] = time.perf_counter() - t2
    seconds["total"] = time.perf_counter() - t0
    seconds = {k: round(v, 3) for k, v in seconds.items()}
    notes = [f"{len(writer.names)} shards, {len(plan.outputs)} tensors, {writer.total_bytes} bytes"]
    output = OutputReport(str(out), "safetensors", notes=notes)
    return StreamResult(
        out,
        writer.names,
        len(plan.outputs),
        writer.total_bytes,
        meta.ckpt.nbytes,
        changes,
        plan,
        seconds,
        meta_report(meta, rw, plan, [output], seconds),
    )


def meta_report(
    meta: MetaModel,
    rw: MetaRewrite,
    plan: StreamPlan,
    outputs: list[OutputReport],
    seconds: dict[str, float],
) -> Report:
    """The conversion report of a streamed run, in the schema of the in-memory one; verification
    is not run (there are no values on ``meta``) and the notes say so."""
    from normrewrite.core.graph import count_ops
    from normrewrite.load.inputs import describe

    notes = [NOT_VERIFIED]
    if plan.tied:
        notes.append(
            f"{len(plan.tied)} tied tensors written once ({', '.join(sorted(plan.tied)[:3])})"
        )
    if plan.dropped:
        notes.append(
            f"{len(plan.dropped)} checkpoint tensors no longer in the model are not written"
        )
    if plan.not_written:
        notes.append(f"{len(plan.not_written)} buffers absent from the checkpoint are not written")
    report = Report(
        model=meta.description,
        source=meta.source,
        tracer=rw.tracer,
        inputs=describe(meta.inputs),
        input_origin=meta.input_origin,
        notes=notes,
        nodes_before=rw.nodes_before,
        nodes_after=count_ops(rw.result.graph_module),
        outputs=outputs,
        seconds=seconds,
    )
    for run in rw.result.runs:
        p, r = run.pass_, run.result
        report.passes.append(
            PassReport(
                p.name,
                p.describe(),
                p.exact,
                r.modified,
                r.changes,
                r.skipped,
                r.notes,
                round(run.seconds, 4),
            )
        )
    return report


def _copy_side_files(src: Path, dest: Path) -> None:
    for f in src.iterdir():
        if (
            f.is_file()
            and not f.is_symlink()
            and not f.name.endswith(".safetensors")
            and f.name not in (INDEX, "normrewrite.json")
        ):
            shutil.copy2(f, dest / f.name)
