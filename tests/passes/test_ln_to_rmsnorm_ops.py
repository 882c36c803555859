"""ln-to-rmsnorm on the ops around the stream: a constant added to every feature (dropped), a
value read only for its shape (``expand_as``'s template), and LayerNorms written out as
arithmetic (fused first, or left as written with the true reason)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import models
import pytest
import torch
from torch import nn

from normrewrite.analysis.norms import find_norms
from normrewrite.core.graph import get_tensor
from normrewrite.core.pass_infra import PassContext, PassResult
from normrewrite.passes.ln_to_rmsnorm import LnToRmsNorm
from normrewrite.trace import trace
from normrewrite.verify import compare, tensor_leaves

D = 32
aten = torch.ops.aten


@dataclass
class Run:
    result: PassResult
    layernorms: tuple[int, int]  # LayerNorms (fused or written out) before, after
    rms_norms: int  # RMSNorms after
    claimed: int  # explain's "convertible"
    err: float  # max relative error against an fp64 run of the original
    gm: torch.fx.GraphModule


def _kinds(gm: torch.fx.GraphModule, kind: str) -> int:
    return sum(n.kind == kind for n in find_norms(gm))


def _run(model: nn.Module, x: torch.Tensor, tracer: str = "export") -> Run:
    model = models.randomize_norms(model).eval()
    with torch.no_grad():
        ref = tensor_leaves(copy.deepcopy(model).double()(x))
    gm = trace(model, (x,), tracer).graph_module
    before = _kinds(gm, "layernorm")
    explained = LnToRmsNorm().explain(gm, PassContext())
    claimed = sum(v.startswith("convertible") for v in explained.values())
    spans = {x.name for n in find_norms(gm) if n.kind == "layernorm" for x in n.nodes}
    assert set(explained) <= spans  # inspect finds a norm's actions by the names of its nodes
    result = LnToRmsNorm()(gm)
    with torch.no_grad():
        err = compare(ref, tensor_leaves(gm(x))).max_rel_err
    return Run(result, (before, _kinds(gm, "layernorm")), _kinds(gm, "rmsnorm"), claimed, err, gm)


class Blocks(nn.Module):
    """Two Pre-LN MLP blocks and a final LayerNorm over a stream ``x``."""

    def __init__(self) -> None:
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(D) for _ in range(2))
        self.ups = nn.ModuleList(nn.Linear(D, 2 * D) for _ in range(2))
        self.downs = nn.ModuleList(nn.Linear(2 * D, D) for _ in range(2))
        self.final = nn.LayerNorm(D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for ln, up, down in zip(self.norms, self.ups, self.downs, strict=True):
            x = x + down(torch.nn.functional.gelu(up(ln(x))))
        return self.final(x)


# --------------------------------------------------------------------------- x + c


class SummedCodebooks(nn.Module):
    """MusicGen's decoder input: ``sum()`` of codebook embeddings (it starts at ``0 +``), plus a
    constant; ``leak``: the shifted stream is also returned through a non-norm op."""

    def __init__(self, shift: float, leak: bool = False) -> None:
        super().__init__()
        self.codebooks = nn.ModuleList(nn.Embedding(50, D) for _ in range(2))
        self.blocks, self.shift, self.leak = Blocks(), shift, leak

    def forward(self, ids: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        x = sum(e(ids[:, i]) for i, e in enumerate(self.codebooks)) + self.shift
        out = self.blocks(x)
        return (out, x.amax(-1)) if self.leak else out


CODES = torch.randint(0, 50, (2, 2, 8), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("shift", [0.0, 3.5])
def test_constant_added_to_the_stream_is_dropped(shift: float) -> None:
    run = _run(SummedCodebooks(shift), CODES)
    assert run.layernorms == (3, 0) and run.rms_norms == 3 and run.claimed == 3
    assert run.err <= 1e-5
    numbers = [n for n in run.gm.graph.nodes if n.target is aten.add.Tensor]
    assert not [n for n in numbers if any(isinstance(a, int | float) for a in n.args)]
    dropped = [n for n in run.result.notes if "dropped 3.5" in n]
    assert len(dropped) == (1 if shift else 0)  # a nonzero constant dropped is noted
    assert all("only LayerNorms read the stream" in n for n in dropped)


def test_constant_on_a_stream_read_by_another_op_is_kept() -> None:
    """``x + c`` also read by ``amax``: the first walk refuses the stream (``x + c`` is read by
    another op), so ``c`` is never dropped; the retry centres the sum explicitly for the norms
    only and ``amax`` keeps the original."""
    run = _run(SummedCodebooks(3.5, leak=True), CODES)
    assert run.layernorms == (3, 0) and run.claimed == 3 and run.err <= 1e-5
    assert not [n for n in run.result.notes if "dropped" in n]
    assert run.result.notes == [
        "ln-to-rmsnorm: inserted a mean subtraction after add_2 (2 ops: mean, sub over 32 "
        "features per position), which no weight surgery can centre"
    ]
    (amax,) = [n for n in run.gm.graph.nodes if n.target is aten.amax.default]
    assert amax.args[0].target is aten.add.Tensor and amax.args[0].args[1] == 3.5


# --------------------------------------------------------------------------- expand_as


class ExpandedBias(nn.Module):
    """GPT-NeoX-Japanese's attention output: ``dense(x) + bias.expand_as(residual)`` (the
    residual read for its shape only)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.norm = nn.Embedding(50, D), nn.LayerNorm(D)
        self.dense = nn.Linear(D, D, bias=False)
        self.dense_bias = nn.Parameter(torch.randn(D))
        self.blocks = Blocks()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        x = x + (self.dense(self.norm(x)) + self.dense_bias.expand_as(x))
        return self.blocks(x)


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_expanded_bias_is_a_writer_and_shape_reads_are_not_reads(tracer: str) -> None:
    run = _run(ExpandedBias(), models.token_ids(2, 8, 50), tracer)
    assert run.layernorms == (4, 0) and run.rms_norms == 4 and run.claimed == 4
    assert run.err <= 1e-5
    assert not run.result.notes  # every writer re-centred: no explicit mean subtraction
    assert get_tensor(run.gm, "dense_bias").mean().abs() < 1e-6


# --------------------------------------------------------------------------- written out


class WrittenLayerNorm(nn.Module):
    """A LayerNorm spelled as arithmetic (Cohere's ``CohereLayerNorm`` with a β)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(D) * 0.5 + 1)
        self.bias = nn.Parameter(torch.randn(D) * 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(-1, keepdim=True)
        var = (x - mean).pow(2).mean(-1, keepdim=True)
        return (x - mean) * torch.rsqrt(var + 1e-5) * self.weight + self.bias


class Written(nn.Module):
    """Two blocks with written-out LayerNorms, Pre-LN (``x + f(ln(x))``, a final norm) or
    Post-LN (an embedding norm, ``ln(x + f(x))``)."""

    def __init__(self, post: bool) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, D)
        self.norms = nn.ModuleList(WrittenLayerNorm() for _ in range(2))
        self.fcs = nn.ModuleList(nn.Linear(D, D) for _ in range(2))
        self.final, self.post = WrittenLayerNorm(), post

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.final(self.emb(ids)) if self.post else self.emb(ids)
        for ln, fc in zip(self.norms, self.fcs, strict=True):
            x = ln(x + fc(x)) if self.post else x + fc(ln(x))
        return x if self.post else self.final(x)


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_written_out_layernorms_fused_then_converted(tracer: str) -> None:
    run = _run(Written(post=False), models.token_ids(2, 8, 50), tracer)
    assert run.layernorms == (3, 0) and run.rms_norms == 3 and run.claimed == 3
    assert run.err <= 1e-5
    assert run.result.notes[0].startswith("ln-to-rmsnorm: fused 3 written-out LayerNorms first")


def test_written_out_post_ln_is_refused_as_post_ln_and_left_as_written() -> None:
    """Post-LN: the block norms are refused as Post-LN and stay written out (not fused for
    nothing); the embedding norm, whose stream only it reads, converts — as with nn.LayerNorm."""
    run = _run(Written(post=True), models.token_ids(2, 8, 50))
    assert run.layernorms == (3, 2) and run.rms_norms == 1 and run.claimed == 1
    assert run.err <= 1e-5
    assert [s.target for s in run.result.skipped] == ["norms.0", "norms.1"]
    assert all(s.reason.endswith("(Post-LN)") for s in run.result.skipped)
    left = [n for n in find_norms(run.gm) if n.kind == "layernorm"]
    assert [n.form for n in left] == ["written", "written"]
    assert run.result.notes == [
        "ln-to-rmsnorm: fused 1 written-out LayerNorm first (fuse-norm's rewrite): final"
    ]


def test_cohere_written_layernorms_fused_first_and_converted() -> None:
    """Cohere writes its LayerNorms out (γ cast to fp32, no β): ln-to-rmsnorm fuses and
    converts all three exactly, and explain says so."""
    import transformers as t

    torch.manual_seed(0)
    cfg = t.CohereConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        use_cache=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    run = _run(t.CohereModel(cfg), models.token_ids())
    assert run.layernorms == (3, 0) and run.rms_norms == 3 and run.claimed == 3
    assert run.err <= 1e-5
    assert run.result.notes[0].startswith("ln-to-rmsnorm: fused 3 written-out LayerNorms first")
