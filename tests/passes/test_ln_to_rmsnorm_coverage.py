"""ln-to-rmsnorm coverage on real architectures: pooled streams, conv-layout streams, attention
pooling heads, tables shared by two streams, and streams only an explicit mean subtraction can
centre (converted, noted as saving nothing)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import models
import torch
from torch import nn

from normrewrite.core.graph import get_tensor
from normrewrite.core.pass_infra import PassContext, PassResult
from normrewrite.passes.ln_to_rmsnorm import LnToRmsNorm
from normrewrite.trace import trace
from normrewrite.verify import compare, tensor_leaves

aten = torch.ops.aten
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
VISION = dict(TINY, image_size=32, patch_size=8)


@dataclass
class Run:
    result: PassResult
    layernorms: tuple[int, int]  # aten.layer_norm nodes before, after
    rms_norms: int  # aten.rms_norm nodes after
    converted: set[str]
    claimed: set[str]  # explain's "convertible"
    err: float  # max relative error against an fp64 run of the original
    gm: torch.fx.GraphModule


def _count(gm: torch.fx.GraphModule, target: object) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is target)


def _layernorms(gm: torch.fx.GraphModule) -> set[str]:
    return {n.name for n in gm.graph.nodes if n.target is aten.layer_norm.default}


def _run(model: nn.Module, *inputs: torch.Tensor) -> Run:
    model = models.randomize_norms(model).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # random layer scales: λ = 1 would hide a λ left out of the fold
        for name, p in model.named_parameters():
            if "lambda" in name or "layer_scale" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    with torch.no_grad():
        double = [x.double() if x.is_floating_point() else x for x in inputs]
        ref = tensor_leaves(copy.deepcopy(model).double()(*double))
    gm = trace(model, inputs, "export").graph_module
    before = _layernorms(gm)
    explained = LnToRmsNorm().explain(gm, PassContext())
    claimed = {k for k, v in explained.items() if v.startswith("convertible")}
    result = LnToRmsNorm()(gm)
    after = _layernorms(gm)
    with torch.no_grad():
        err = compare(ref, tensor_leaves(gm(*inputs))).max_rel_err
    return Run(
        result,
        (len(before), len(after)),
        _count(gm, aten.rms_norm.default),
        before - after,
        claimed,
        err,
        gm,
    )


def _no_saving(run: Run) -> list[str]:
    """The norms converted with a mean subtraction at their input (notes say: no saving)."""
    notes = [n for n in run.result.notes if " before " in n]
    assert all("no saving, it replaces the LayerNorm's own centring" in n for n in notes)
    return [n.split(" before ")[1].split(" (")[0] for n in notes]


class MeanPooled(nn.Module):
    """Pre-LN blocks, then a mean over the tokens and a final LayerNorm (a pooled head)."""

    def __init__(self, d: int = 32, layers: int = 2) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, d)
        self.lns = nn.ModuleList(nn.LayerNorm(d) for _ in range(layers))
        self.ffn = nn.ModuleList(nn.Linear(d, d) for _ in range(layers))
        self.final = nn.LayerNorm(d)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        for ln, ffn in zip(self.lns, self.ffn, strict=True):
            h = h + ffn(torch.relu(ln(h)))
        return self.final(h[:, 1:].mean(1))


def test_mean_over_tokens_commutes_with_centring() -> None:
    """The final norm reads ``h[:, 1:].mean(1)``: the walk goes through the slice and the mean,
    so the writers' surgery centres it too — no mean subtraction is inserted."""
    run = _run(MeanPooled(), models.token_ids(seq=8, vocab=50))
    assert run.layernorms == (3, 0) and run.rms_norms == 3
    assert run.converted == run.claimed and not run.result.skipped and not run.result.notes
    assert _count(run.gm, aten.mean.dim) == 1  # the model's own pooling, nothing added
    assert run.err <= 1e-5


def test_beit_raw_output_refused_pooler_converted() -> None:
    """BEiT returns the raw stream (last_hidden_state): the block norms are refused for that,
    named truly; the pooler's norm (on the token mean) is converted with one subtraction."""
    import transformers as t

    run = _run(t.BeitModel(t.BeitConfig(**VISION, use_mask_token=False)), models.pixels())
    assert run.layernorms == (5, 4) and run.rms_norms == 1
    assert run.converted == run.claimed
    assert len(run.result.skipped) == 4
    assert all(s.reason == "the stream value add_5 is a model output" for s in run.result.skipped)
    assert _no_saving(run) == ["pooler.layernorm"]
    assert run.err <= 1e-5


def test_data2vec_vision_refusal_names_the_output() -> None:
    """The raw stream reaches the output through the last residual add, which no norm reads:
    the reason follows it there."""
    import transformers as t

    run = _run(t.Data2VecVisionModel(t.Data2VecVisionConfig(**VISION)), models.pixels())
    assert run.layernorms == (4, 3) and run.converted == run.claimed
    assert {s.reason for s in run.result.skipped} == {
        "the stream value add_2 is also read by add_3, not through a LayerNorm "
        "(add_3 → model output)"
    }
    assert _no_saving(run) == ["encoder.layer.1.layernorm_after"]
    assert run.err <= 1e-5


def test_convnext_conv_layout() -> None:
    """ConvNeXt: the NCHW stream is read raw by each block's depthwise conv, which no weight
    surgery can centre — the block and downsampling norms get a subtraction at their input (no
    saving); the embedding norm is centred by the patch conv (features = channels, through the
    permute)."""
    import transformers as t

    cfg = t.ConvNextConfig(
        hidden_sizes=[16, 32],
        depths=[1, 1],
        num_stages=2,
        layer_scale_init_value=0.5,
        image_size=32,
        patch_size=8,
    )
    run = _run(t.ConvNextModel(cfg), models.pixels())
    assert run.layernorms == (5, 0) and run.rms_norms == 5
    assert run.converted == run.claimed and not run.result.skipped
    assert run.result.changes[0].detail == "re-centred 2 tensors of 1 stream writers"
    assert _no_saving(run) == [
        "encoder.stages.0.layers.0.layernorm",
        "encoder.stages.1.downsampling_layer.0",
        "encoder.stages.1.layers.0.layernorm",
        "layernorm",
    ]
    assert run.err <= 1e-5


def test_siglip_attention_pooling_head() -> None:
    """SigLIP's pooling head adds an MLP to the attention-pooled vector and returns the sum (the
    pooler output): its norm is converted with a subtraction at its input, the others exactly."""
    import transformers as t

    run = _run(t.SiglipVisionModel(t.SiglipVisionConfig(**VISION)), models.pixels())
    assert run.layernorms == (6, 0) and run.rms_norms == 6
    assert run.converted == run.claimed and not run.result.skipped
    assert _no_saving(run) == ["head.layernorm"]
    assert run.err <= 1e-5


def test_mbart_table_shared_by_encoder_and_decoder() -> None:
    """mBART's one token table writes the encoder's and the decoder's stream (and its
    ``inputs_embeds[..., -1]``, read for the shape only, is dead): centred once, both converted."""
    import transformers as t

    cfg = t.MBartConfig(
        vocab_size=96,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
        use_cache=False,
    )
    run = _run(t.MBartModel(cfg), models.token_ids(seq=12, vocab=96))
    assert run.layernorms == (14, 0) and run.rms_norms == 14
    assert run.converted == run.claimed and not run.result.skipped
    table = get_tensor(run.gm, "decoder.embed_tokens.weight")
    assert table.mean(1).abs().max() < 1e-6
    assert run.err <= 1e-5


def test_mean_pooled_fx_flavour() -> None:
    """The same walk through ``torch.mean``/``getitem`` in a symbolic_trace graph."""
    model = models.randomize_norms(MeanPooled()).eval()
    ids = models.token_ids(seq=8, vocab=50)
    with torch.no_grad():
        ref = [copy.deepcopy(model).double()(ids)]
    gm = trace(model, (ids,), "fx").graph_module
    result = LnToRmsNorm()(gm)
    assert len(result.changes) == 4 and not result.skipped and not result.notes
    assert compare(ref, [gm(ids)]).max_rel_err <= 1e-5
