"""Shared assertions for pass tests."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

import normrewrite


def assert_streamed_equals_in_memory(
    model: nn.Module, passes: list[str], example: torch.Tensor, tmp_path: Path
) -> None:
    """Converting from a safetensors checkpoint (model traced on meta, recipes replayed tensor by
    tensor) writes exactly the tensors an in-memory conversion holds, bit for bit."""
    from safetensors.torch import load_file, save_file

    from normrewrite import stream

    ckpt = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    pipeline = [normrewrite.REGISTRY.create(p) for p in passes]
    stream.convert_checkpoint(copy.deepcopy(model), pipeline, tmp_path / "out", checkpoint=ckpt,
                              example_inputs=(example,), tracer="export")
    got: dict[str, torch.Tensor] = {}
    for f in (tmp_path / "out").glob("*.safetensors"):
        got.update(load_file(str(f)))
    want = normrewrite.convert(model, passes, (example,), tracer="export").graph_module.state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
