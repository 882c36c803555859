"""Tracing: tracer choice, and --dynamic's explicit batch/sequence dims."""

from __future__ import annotations

import models
import pytest
import torch
from harness import rel_err, run
from torch import nn

from normrewrite.errors import TraceError
from normrewrite.trace import dynamic_shapes, export_dynamic, tracing_example


def test_marked_dims_batch_everywhere_sequence_for_integer_inputs() -> None:
    ids, pix = torch.zeros(1, 16, dtype=torch.int64), torch.zeros(1, 3, 8, 8)
    ids_spec, pix_spec = dynamic_shapes((ids, pix))
    dyn, auto = torch.export.Dim.DYNAMIC, torch.export.Dim.AUTO
    assert ids_spec == {0: dyn, 1: dyn}
    assert pix_spec == {0: dyn, 1: auto, 2: auto, 3: auto}
    grown = tracing_example((ids[:, :1], pix))
    assert grown[0].shape == (2, 2) and grown[1].shape == (2, 3, 8, 8)


@pytest.mark.parametrize("build", [models.bert, models.llama], ids=["bert", "llama"])
def test_size_one_example_gives_symbolic_batch_and_sequence(build) -> None:
    model = build()
    ep = export_dynamic(model, (models.token_ids(batch=1),))
    placeholder = [n for n in ep.graph.nodes if n.op == "placeholder"][-1]
    assert all(not isinstance(d, int) for d in placeholder.meta["val"].shape)
    for batch, seq in [(1, 16), (3, 5)]:
        x = models.token_ids(batch=batch, seq=seq)
        assert rel_err(run(model, x), run(ep.module(), x)) <= 1e-5


def test_model_pinning_its_batch_is_refused_in_one_line() -> None:
    class Pinned(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.reshape(2, -1)  # the batch size is baked into the model

    with pytest.raises(TraceError, match="--dynamic: the model fixes the size") as info:
        export_dynamic(Pinned(), (torch.randn(2, 4),))
    assert "\n" not in str(info.value)
