"""post-to-pre / pre-to-post: the architecture change on HF BERT (torch.export, through masks,
dropout, GELU, reshapes) and hand-written encoders (both graph flavours).

Checked: the graph after the pass (no norm on any residual sum, exactly one norm at the start of
every branch, one final norm), the parameters carried over (same tensors for the moved norms, a
private copy for the final norm), trainability, `inspect` reporting Pre-Norm everywhere, ONNX export
of the result, idempotence, ``pre-to-post ∘ post-to-pre`` restoring the original structure *and*
function (bit-exact: it is the same computation), refusals where there is no residual structure,
and healing reducing the output error.
"""

from __future__ import annotations

import copy
import dataclasses
import functools

import models
import pytest
import torch
from test_residual import encoder, ids, neox, placements, traced
from torch import nn
from torch.fx import GraphModule

import normrewrite
from normrewrite.analysis.residual import norm_placements, residual_adds, residual_sums, source
from normrewrite.core.graph import get_tensor
from normrewrite.core.ops import norms
from normrewrite.core.pass_infra import PassContext, Skip
from normrewrite.errors import PassError, UsageError
from normrewrite.passes import PostToPre, PreToPost
from normrewrite.verify import tensor_leaves

BERT_LAYERS = 2


@functools.cache
def bert() -> nn.Module:
    return models.bert(layers=BERT_LAYERS)


def bert_inputs() -> tuple[torch.Tensor]:
    return (models.token_ids(batch=2, seq=16),)


def bert_graph() -> GraphModule:
    return traced(bert(), bert_inputs())


def check_pre_structure(gm: GraphModule, finals: int = 1) -> None:
    """No norm on a residual sum except the final one(s); one norm at the start of every branch."""
    res = residual_adds(gm)
    assert res, "the residual structure survives the rewrite"
    sums = set(residual_sums(res))
    places = norm_placements(gm)
    on_sums = [
        p
        for p in places
        if isinstance(p.norm.input, torch.fx.Node) and source(gm, p.norm.input) in sums
    ]
    # a sum is read by the next branch's pre norm or by the final norm, never normalized in the stream
    assert {p.placement for p in on_sums} <= {"pre", "final"}
    assert [p.placement for p in places].count("final") == finals
    skips = {source(gm, r.skip) for r in res}
    assert len(sums - skips) == finals, "every sum but the last carries the stream on unnormalized"
    for s in sums:
        entries = {e for r in res if r.sum is s for e in r.entries}
        infos = [i for i in norms(gm) if i.node in entries or i.op_node in entries]
        assert len(infos) == 1 and len(entries) == 1, f"branch into {s.name} starts with one norm"
    assert all(p.placement != "post" for p in places)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / a.abs().max())


# --------------------------------------------------------------------------- post-to-pre on BERT


def test_bert_post_to_pre_structure_and_parameters() -> None:
    gm = bert_graph()
    before = placements(gm)
    n_params = sum(p.numel() for p in gm.parameters())
    original = {k: v.detach().clone() for k, v in gm.named_parameters()}
    result = PostToPre()(gm, PassContext(example_inputs=bert_inputs()))
    assert result.modified
    assert [c.target for c in result.changes] == [n for n, p in before if p == "post"]
    assert "final norm added" in result.changes[-1].detail

    check_pre_structure(gm)
    after = placements(gm)
    assert after == [
        ("embeddings.LayerNorm", "other"),  # the embedding norm stays
        ("encoder.layer.0.attention.output.LayerNorm", "pre"),
        ("encoder.layer.0.output.LayerNorm", "pre"),
        ("encoder.layer.1.attention.output.LayerNorm", "pre"),
        ("encoder.layer.1.output.LayerNorm", "pre"),
        ("final_norm", "final"),
    ]
    # every original parameter is still there, unchanged; the final norm is a private copy
    params = dict(gm.named_parameters())
    for name, value in original.items():
        assert torch.equal(params[name], value), name
    last = "encoder.layer.1.output.LayerNorm"
    for attr in ("weight", "bias"):
        final = get_tensor(gm, f"final_norm.{attr}")
        assert isinstance(final, nn.Parameter) and final.requires_grad
        assert torch.equal(final, original[f"{last}.{attr}"])
        assert final.data_ptr() != params[f"{last}.{attr}"].data_ptr()
    assert sum(p.numel() for p in gm.parameters()) == n_params + 2 * 32
    # each moved norm reads the same stored tensors as before
    for p in norm_placements(gm):
        if p.placement == "pre":
            assert p.norm.info is not None and p.norm.info.weight == f"{p.norm.label}.weight"

    # trainable: a backward pass reaches the moved and the added norms
    out = gm(*bert_inputs())
    out[0].square().mean().backward()
    assert params["encoder.layer.0.attention.output.LayerNorm.weight"].grad is not None
    assert get_tensor(gm, "final_norm.weight").grad is not None

    # idempotent
    again = PostToPre()(gm, PassContext())
    assert not again.modified and "no Post-Norm blocks" in again.notes[0]


def test_bert_post_to_pre_changes_function_and_report_says_so(tmp_path) -> None:
    result = normrewrite.convert(
        bert(),
        ["post-to-pre"],
        example_inputs=bert_inputs(),
        outputs=[tmp_path / "bert_pre.onnx", tmp_path / "bert_pre.pt2"],
    )
    v = result.report.verify
    assert v is not None and v.exact is False and v.passed is None
    assert v.max_rel_err > 0.05  # an architecture change, not an identity
    assert (tmp_path / "bert_pre.onnx").stat().st_size > 0 and (tmp_path / "bert_pre.pt2").is_file()
    onnx_out = result.report.outputs[0]
    assert (
        onnx_out.onnx_max_rel_err is not None and onnx_out.onnx_max_rel_err > 0.05
    )  # vs the *original*
    # the written program is the pre-norm model: inspect on it says so
    info = normrewrite.inspect(tmp_path / "bert_pre.pt2")
    assert [n.placement for n in info.norms] == ["other", "pre", "pre", "pre", "pre", "final"]
    # and the ONNX file computes what the rewritten graph computes
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tmp_path / "bert_pre.onnx"), providers=["CPUExecutionProvider"])
    (x,) = bert_inputs()
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    want = result.graph_module(x)[0].detach()
    assert rel(want, torch.from_numpy(got)) < 1e-4


def test_round_trip_restores_original_exactly() -> None:
    gm = bert_graph()
    (x,) = bert_inputs()
    reference = [t.detach() for t in tensor_leaves(gm(x))]
    before = placements(gm)
    PostToPre()(gm, PassContext())
    result = PreToPost()(gm, PassContext())
    assert result.modified and "final norm final_norm removed" in result.changes[-1].detail
    assert placements(gm) == before
    for a, b in zip(reference, tensor_leaves(gm(x)), strict=True):
        assert torch.equal(a, b.detach())  # the same computation on the same tensors
    assert not any(name.startswith("final_norm") for name, _ in gm.named_parameters())


# --------------------------------------------------------------------------- hand-written, both flavours


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_hand_written_post_encoder(tracer: str) -> None:
    model = encoder("post", layers=3)
    inputs = ids()
    gm = traced(model, inputs, tracer)
    reference = gm(*inputs).detach()
    before = placements(gm)
    PostToPre()(gm, PassContext())
    check_pre_structure(gm)
    assert [p for _, p in placements(gm)] == ["other"] + ["pre"] * 6 + ["final"]
    assert rel(reference, gm(*inputs).detach()) > 0.05
    PreToPost()(gm, PassContext())
    assert placements(gm) == before
    assert torch.equal(reference, gm(*inputs).detach())


def test_post_to_pre_by_hand_equals_pre_model() -> None:
    """The rewritten function is exactly ``x + F(LN(x))`` with the same weights: the hand-written
    Pre-Norm encoder given the Post-Norm encoder's weights (and its last norm as final) agrees."""
    post, pre = encoder("post", layers=2), encoder("pre", layers=2)
    state = post.state_dict()
    state["final.weight"], state["final.bias"] = (
        state["blocks.1.ln2.weight"],
        state["blocks.1.ln2.bias"],
    )
    pre.load_state_dict(state)
    inputs = ids()
    gm = traced(post, inputs, "fx")
    PostToPre()(gm, PassContext())
    with torch.no_grad():
        assert rel(pre(*inputs), gm(*inputs)) < 1e-6


def test_pre_to_post_on_gpt2() -> None:
    gm = traced(models.gpt2(layers=2), (models.token_ids(),))
    result = PreToPost()(gm, PassContext())
    assert result.modified
    assert placements(gm) == [
        ("h.0.ln_1", "post"),
        ("h.0.ln_2", "post"),
        ("h.1.ln_1", "post"),
        ("h.1.ln_2", "post"),
    ]
    assert "final norm ln_f removed" in result.changes[-1].detail
    assert not PreToPost()(gm, PassContext()).modified


def test_parallel_residual_with_two_pre_norms_is_skipped() -> None:
    gm = traced(neox(), (models.token_ids(),))
    result = PreToPost()(gm, PassContext())
    assert not result.modified
    assert len(result.skipped) == 4
    assert all("2 branches with their own pre norms" in s.reason for s in result.skipped)


def test_sandwich_pre_to_post_keeps_branch_output_norms() -> None:
    gm = traced(encoder("sandwich"), ids(), "export")
    PreToPost()(gm, PassContext())
    # x + LN2(F(LN1(x))) → LN1(x + LN2(F(x))): the branch-output norm stays, now res-post
    assert placements(gm) == [
        ("emb_norm", "other"),
        ("blocks.0.ln1_out", "res-post"),
        ("blocks.0.ln1", "post"),
        ("blocks.0.ln2_out", "res-post"),
        ("blocks.0.ln2", "post"),
        ("blocks.1.ln1_out", "res-post"),
        ("blocks.1.ln1", "post"),
        ("blocks.1.ln2_out", "res-post"),
        ("blocks.1.ln2", "post"),
    ]


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("pass_cls", [PostToPre, PreToPost])
def test_refuses_without_residual_structure(pass_cls: type) -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 8)).eval()
    gm = traced(model, (torch.randn(2, 8),), "fx")
    with pytest.raises(PassError, match="no residual connections found"):
        pass_cls()(gm, PassContext())


def test_bad_options() -> None:
    with pytest.raises(UsageError):
        PostToPre(heal=-1)
    with pytest.raises(UsageError):
        PostToPre.from_strings({"lr": "0"})


# --------------------------------------------------------------------------- healing


def test_heal_reduces_output_error() -> None:
    model = bert()
    inputs = bert_inputs()
    plain = PostToPre()(traced(model, inputs), PassContext()).graph_module
    gm = traced(model, inputs)
    ctx = PassContext(example_inputs=inputs, reference=model)
    original = {k: v.detach().clone() for k, v in model.named_parameters()}
    result = PostToPre(heal=40, lr=3e-3)(gm, ctx)
    note = result.notes[-1]
    assert note.startswith("healed 40 steps")
    with torch.no_grad():
        ref = model(*inputs).last_hidden_state
        err_plain = rel(ref, plain(*inputs)[0])
        err_healed = rel(ref, gm(*inputs)[0])
    assert err_healed < 0.6 * err_plain, (err_plain, err_healed)
    # the original model is untouched; the healed weights are logged as a recipe
    for k, v in model.named_parameters():
        assert torch.equal(v, original[k]), k
    assert any(r.origin == "post-to-pre" and not r.inputs for r in ctx.recipes)


def test_heal_from_data_file(tmp_path) -> None:
    model = bert()
    inputs = bert_inputs()
    data = tmp_path / "inputs.pt"
    torch.save((torch.randint(0, 100, (16, 16)),), data)
    gm = traced(model, inputs)
    result = PostToPre(heal=5, heal_data=str(data))(
        gm, PassContext(example_inputs=inputs, reference=model)
    )
    assert f"inputs from {data}" in result.notes[-1]
    torch.save((torch.zeros(4, 16), torch.zeros(4, 16)), tmp_path / "two.pt")
    with pytest.raises(UsageError, match="holds 2 tensors"):
        PostToPre(heal=1, heal_data=str(tmp_path / "two.pt"))(
            traced(model, inputs), PassContext(example_inputs=inputs)
        )


def test_heal_int_ranges_from_embedding_table() -> None:
    from normrewrite.passes.post_to_pre.heal import int_ranges

    gm = bert_graph()
    assert int_ranges(gm, bert_inputs()) == [(0, 100)]  # BERT's vocab in tests/models.py


# --------------------------------------------------------------------------- gradient example


def test_gradient_example_direction() -> None:
    """Xiong et al.: at initialisation the last layers of a Post-LN stack get larger gradients than
    those of its Pre-LN version, and the profile leans further towards the output."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[2] / "examples" / "post_to_pre_gradients.py"
    spec = importlib.util.spec_from_file_location("post_to_pre_gradients", path)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    norms_ = example.measure(layers=12, hidden=32, batches=1, batch=4, seq=16)
    post, pre = norms_["post"], norms_["pre"]
    assert len(post) == len(pre) == 12
    assert post[-1] > 1.5 * pre[-1]
    assert post[-1] / post[0] > pre[-1] / pre[0]


def test_copy_is_not_shared_with_original() -> None:
    model = copy.deepcopy(bert())
    gm = traced(model, bert_inputs())
    PostToPre()(gm, PassContext())
    assert (
        get_tensor(gm, "final_norm.weight").data_ptr()
        != model.encoder.layer[1].output.LayerNorm.weight.data_ptr()
    )


def test_parallel_residual_with_one_shared_norm_round_trips() -> None:
    """GPT-J style ``x + attn(LN(x)) + mlp(LN(x))``: the one norm moves onto the three-term sum and
    back to the start of both branches."""
    from test_residual import MLP, SEQ, Attention

    class Parallel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln, self.attn, self.mlp = nn.LayerNorm(16), Attention(16), MLP(16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.ln(x)
            return x + self.attn(h) + self.mlp(h)

    torch.manual_seed(0)
    x = torch.randn(2, SEQ, 16)
    gm = traced(models.randomize_norms(Parallel()).eval(), (x,), "fx")
    reference = gm(x).detach()
    assert PreToPost()(gm, PassContext()).modified
    assert placements(gm) == [("ln", "post")]
    assert PostToPre()(gm, PassContext()).modified
    check_pre_structure(gm)
    assert placements(gm) == [("ln", "pre"), ("final_norm", "final")]
    # x + F(LN(x)) again, now followed by a final norm holding a copy of ln's parameters
    final = nn.functional.layer_norm(
        reference, (16,), get_tensor(gm, "final_norm.weight"), get_tensor(gm, "final_norm.bias")
    )
    assert rel(final, gm(x).detach()) < 1e-6


# --------------------------------------------------------------------------- no silent partial conversion


def _hf(name: str) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    import transformers as t

    torch.manual_seed(0)
    ids_ = models.token_ids()
    seq2seq = dict(
        vocab_size=100, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_position_embeddings=64, use_cache=False, pad_token_id=0, decoder_start_token_id=0,
    )  # fmt: skip
    if name == "bart":
        model = t.BartModel(t.BartConfig(**seq2seq))
        inputs: tuple[torch.Tensor, ...] = (ids_,)
    elif name == "marian":
        model = t.MarianModel(t.MarianConfig(**seq2seq))
        inputs = (ids_, torch.ones_like(ids_), ids_)
    elif name == "xlm":
        cfg = t.XLMConfig(vocab_size=100, emb_dim=32, n_layers=2, n_heads=2)
        model, inputs = t.XLMModel(cfg), (ids_,)
    elif name == "funnel":
        cfg = t.FunnelConfig(
            vocab_size=100, d_model=32, n_head=2, d_head=16, d_inner=64, block_sizes=[1, 1],
            num_decoder_layers=1,
        )  # fmt: skip
        model, inputs = t.FunnelModel(cfg), (ids_,)
    elif name == "swinv2":
        cfg = t.Swinv2Config(
            image_size=32,
            patch_size=4,
            embed_dim=16,
            depths=[1, 1],
            num_heads=[2, 2],
            window_size=4,
        )
        model, inputs = t.Swinv2Model(cfg), (models.pixels(),)
    elif name == "bert":
        model, inputs = models.bert(), (ids_,)
    else:
        model, inputs = models.gpt2(), (ids_,)
    return models.randomize_norms(model).eval(), inputs


@pytest.mark.parametrize(
    ("name", "moved", "note"),
    [
        ("bart", 10, None),  # the encoder's last final_layer_norm too: a post norm
        ("marian", 10, None),
        ("xlm", 4, None),  # its post norms are followed by a mask multiply
        ("funnel", 6, None),
        ("bert", 4, None),
        (
            "swinv2",
            0,
            "no Post-Norm blocks: all 4 blocks are res-post; 4 norms skipped (see skipped)",
        ),
        ("gpt2", 0, "no Post-Norm blocks: all 4 blocks are Pre-Norm; nothing to do"),
    ],
)
def test_every_post_norm_is_moved_or_skipped(name: str, moved: int, note: str | None) -> None:
    """Every norm placed ``post`` before the pass is ``pre``/``final`` after it or named in
    ``skipped`` with its reason — never left Post-Norm silently."""
    model, inputs = _hf(name)
    gm = traced(model, inputs)
    before = dict(placements(gm))
    result = PostToPre()(gm, PassContext())
    skipped = {s.target: s.reason for s in result.skipped}
    after = dict(placements(gm))
    posts = [n for n, p in before.items() if p == "post"]
    assert len(posts) == moved == len(result.changes)
    for n in posts:
        assert after.get(n) in ("pre", "final") or n in skipped, (n, after.get(n))
    assert "post" not in after.values()
    for n, p in before.items():
        if p == "res-post":  # x + N(F(x)): not a Post-Norm block, refused with the reason
            assert after[n] == "res-post" and "res-post norm" in skipped[n]
    if note is not None:
        assert result.notes == [note]
    else:
        assert result.modified


def test_written_out_post_norm_is_skipped_with_reason() -> None:
    from normrewrite.passes.post_to_pre import WRITTEN_OUT, match_post

    gm = traced(encoder("post"), ids(), "export")
    res = residual_adds(gm)
    p = next(q for q in norm_placements(gm, res) if q.placement == "post")
    written = dataclasses.replace(p, norm=dataclasses.replace(p.norm, info=None, form="written"))
    found = match_post(gm, written, res)
    assert isinstance(found, Skip) and found.reason == WRITTEN_OUT
