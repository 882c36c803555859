"""ln-to-rmsnorm: exact LayerNorm → RMSNorm in Pre-LN transformers by re-centring the stream."""

from __future__ import annotations

import copy

import models
import pytest
import torch
from torch import nn

from normrewrite.analysis.residual_stream import residual_streams
from normrewrite.core.graph import get_tensor
from normrewrite.core.ops import norms
from normrewrite.core.pass_infra import PassContext
from normrewrite.passes.ln_to_rmsnorm import LnToRmsNorm
from normrewrite.trace import trace
from normrewrite.verify import compare, tensor_leaves

aten = torch.ops.aten


def neox(layers: int = 2, hidden: int = 32, seed: int = 0) -> nn.Module:
    """GPT-NeoX with the parallel residual: x + attn(LN1(x)) + mlp(LN2(x))."""
    import transformers as t

    torch.manual_seed(seed)
    cfg = t.GPTNeoXConfig(
        vocab_size=100,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=hidden * 2,
        max_position_embeddings=64,
        use_parallel_residual=True,
        use_cache=False,
        tie_word_embeddings=False,
    )
    return models.randomize_norms(t.GPTNeoXModel(cfg), seed).eval()


def gpt2_lm(seed: int = 0) -> nn.Module:
    """GPT-2 with its output head tied to the token embedding."""
    import transformers as t

    torch.manual_seed(seed)
    cfg = t.GPT2Config(
        vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64, use_cache=False
    )
    model = models.randomize_norms(t.GPT2LMHeadModel(cfg), seed).eval()
    assert model.lm_head.weight is model.transformer.wte.weight
    return model


class PreLN(nn.Module):
    """A hand-written Pre-LN block stack, for the symbolic_trace flavour."""

    def __init__(self, d: int = 16, layers: int = 2) -> None:
        super().__init__()
        self.emb, self.pos = nn.Embedding(50, d), nn.Parameter(torch.randn(1, 8, d))
        self.lns = nn.ModuleList(nn.LayerNorm(d) for _ in range(layers))
        self.up = nn.ModuleList(nn.Linear(d, 2 * d) for _ in range(layers))
        self.down = nn.ModuleList(nn.Linear(2 * d, d) for _ in range(layers))
        self.final = nn.LayerNorm(d, eps=1e-6)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids) + self.pos
        for ln, up, down in zip(self.lns, self.up, self.down, strict=True):
            h = h + down(torch.relu(up(ln(h))))
        return self.final(h)


CASES = {
    "gpt2": (models.gpt2, models.token_ids),
    "vit": (models.vit, models.pixels),
    "neox": (neox, models.token_ids),
}


def _ref64(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return tensor_leaves(
            copy.deepcopy(model).double()(x.double() if x.is_floating_point() else x)
        )


def _targets(gm: torch.fx.GraphModule, *targets: object) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in targets]


def _naive_swap(gm: torch.fx.GraphModule) -> None:
    """The negative control: every LayerNorm → RMSNorm(γ) + β, without re-centring."""
    for info in norms(gm):
        if info.kind != "layernorm":
            continue
        node = info.node
        with gm.graph.inserting_after(node):
            rms = gm.graph.call_function(
                aten.rms_norm.default,
                (info.input, list(info.normalized_shape), node.args[2], info.eps),
            )
        with gm.graph.inserting_after(rms):
            out = gm.graph.call_function(aten.add.Tensor, (rms, node.args[3]))
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
    gm.recompile()


@pytest.mark.parametrize("name", list(CASES))
def test_real_models_exact(name: str) -> None:
    build, inputs = CASES[name]
    model, x = build(), inputs()
    ref = _ref64(model, x)
    gm = trace(model, (x,), "export").graph_module
    n_ln = len(_targets(gm, aten.layer_norm.default))
    result = LnToRmsNorm()(gm)
    assert result.modified and not result.skipped
    assert _targets(gm, aten.layer_norm.default) == []  # no LayerNorm left
    rms = _targets(gm, aten.rms_norm.default)
    assert len(rms) == n_ln == len(result.changes) - 1  # one RMSNorm per LN (+ the writers change)
    # γ/β folded everywhere but in the final norm, which keeps γ and adds β
    assert [n.args[2] is not None for n in rms] == [False] * (n_ln - 1) + [True]
    assert compare(ref, tensor_leaves(gm(x))).max_rel_err <= 1e-5
    assert not LnToRmsNorm()(gm).modified  # idempotent


def test_writers_are_centred() -> None:
    model, ids = models.gpt2(), models.token_ids()
    gm = trace(model, (ids,), "export").graph_module
    (stream,) = residual_streams(gm)
    assert [w.kind for w in stream.writers] == ["embedding", "embedding"] + ["linear"] * 4
    assert len(stream.readers) == 5
    LnToRmsNorm()(gm)
    for fqn, dim in [
        ("wte.weight", 1),
        ("wpe.weight", 1),
        ("h.0.attn.c_proj.weight", 1),
        ("h.0.attn.c_proj.bias", 0),
    ]:
        t = get_tensor(gm, fqn)
        assert t.mean(dim).abs().max() < 1e-6
        if fqn.endswith("weight"):  # the original is untouched (its biases start at zero)
            assert get_tensor(model, fqn).mean(dim).abs().max() > 1e-3


@pytest.mark.parametrize("name", list(CASES))
def test_negative_control_naive_swap_is_not_exact(name: str) -> None:
    build, inputs = CASES[name]
    model, x = build(), inputs()
    gm = trace(model, (x,), "export").graph_module
    _naive_swap(gm)
    assert _targets(gm, aten.layer_norm.default) == []
    err = compare(_ref64(model, x), tensor_leaves(gm(x)))
    assert err.max_rel_err > 1e-2, err  # far outside the 1e-4 an exact rewrite must meet


def test_post_ln_refused_embedding_ln_converted() -> None:
    model, ids = models.bert(), models.token_ids()
    ref = _ref64(model, ids)
    gm = trace(model, (ids,), "export").graph_module
    result = LnToRmsNorm()(gm)
    assert [c.target for c in result.changes][1:] == ["embeddings.LayerNorm"]
    assert len(result.skipped) == 4 and all("Post-LN" in s.reason for s in result.skipped)
    assert len(_targets(gm, aten.layer_norm.default)) == 4
    assert compare(ref, tensor_leaves(gm(ids))).max_rel_err <= 1e-5


def test_raw_stream_output_cut_or_refused() -> None:
    """Every layer's raw stream is a model output: the layers after the first restart from an
    explicitly centred copy of h.0's output (the output itself keeps the original); the first
    layer's stream is itself an output and is refused for it."""
    model, ids = models.gpt2(), models.token_ids()
    model.config.output_hidden_states = True
    ref = _ref64(model, ids)
    gm = trace(model, (ids,), "export").graph_module
    result = LnToRmsNorm()(gm)
    assert [s.target for s in result.skipped] == ["h.0.ln_1", "h.0.ln_2"]
    assert all("model output" in s.reason for s in result.skipped)
    assert [c.target for c in result.changes][1:] == ["h.1.ln_1", "h.1.ln_2", "ln_f"]
    assert len(result.notes) == 1 and "mean subtraction after h.0 (2 ops" in result.notes[0]
    assert len(_targets(gm, aten.mean.dim)) == 1
    assert compare(ref, tensor_leaves(gm(ids))).max_rel_err <= 1e-5


def test_tied_head_refused_or_untied() -> None:
    model, ids = gpt2_lm(), models.token_ids()
    gm = trace(model, (ids,), "export").graph_module
    result = LnToRmsNorm()(gm)
    assert not result.modified and "tied output head" in result.skipped[0].reason
    assert "untie=true" in result.skipped[0].reason
    result = LnToRmsNorm(untie=True)(gm)
    assert result.modified and "untied" in result.changes[0].detail
    assert _targets(gm, aten.layer_norm.default) == []
    assert compare(_ref64(model, ids), tensor_leaves(gm(ids))).max_rel_err <= 1e-5


def test_fold_off_keeps_gamma_and_beta() -> None:
    model, ids = models.gpt2(), models.token_ids()
    gm = trace(model, (ids,), "export").graph_module
    LnToRmsNorm(fold=False)(gm)
    rms = _targets(gm, aten.rms_norm.default)
    assert len(rms) == 5 and all(n.args[2] is not None for n in rms)
    assert all(next(iter(n.users)).target is aten.add.Tensor for n in rms)  # + β
    assert compare(_ref64(model, ids), tensor_leaves(gm(ids))).max_rel_err <= 1e-5


def test_symbolic_trace_flavour() -> None:
    model = models.randomize_norms(PreLN()).eval()
    ids = models.token_ids(batch=2, seq=8, vocab=50)
    gm = trace(model, (ids,), "fx").graph_module
    result = LnToRmsNorm()(gm)
    assert result.modified and not result.skipped
    called = [gm.get_submodule(str(n.target)) for n in gm.graph.nodes if n.op == "call_module"]
    assert called and not any(isinstance(m, nn.LayerNorm) for m in called)  # no LayerNorm call left
    rms = _targets(gm, torch.nn.functional.rms_norm)
    assert len(rms) == 3 and rms[-1].args[3] == 1e-6  # eps kept
    assert compare(_ref64(model, ids), [gm(ids)]).max_rel_err <= 1e-5


@pytest.mark.parametrize("unit_weight", [False, True])
def test_onnx_rmsnormalization(tmp_path, unit_weight: bool) -> None:
    from onnx_helpers import onnx_outputs, op_types

    model, ids = models.gpt2(), models.token_ids()
    gm = trace(model, (ids,), "export").graph_module
    LnToRmsNorm(unit_weight=unit_weight)(gm)
    rms = _targets(gm, aten.rms_norm.default)
    assert all(n.args[2] is not None for n in rms) == unit_weight
    path = tmp_path / "m.onnx"
    outs = [torch.from_numpy(o) for o in onnx_outputs(gm, (ids,), path, opset=23)]
    types = op_types(path)
    assert types.count("RMSNormalization") == 5 and "LayerNormalization" not in types
    # a missing scale is exported as a ConstantOfShape (recomputed per run); ones avoid it
    assert ("ConstantOfShape" in types) != unit_weight
    assert compare(_ref64(model, ids), outs).max_rel_err <= 1e-4


class InPlacePreLN(PreLN):
    """PreLN with the residual written in place (``h.add_``) and a LayerNorm reading ``1 + γ``
    (Nemotron's ``LayerNorm1P``) as its final norm."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids) + self.pos
        for ln, up, down in zip(self.lns, self.up, self.down, strict=True):
            h.add_(down(torch.relu(up(ln(h)))))
        return torch.nn.functional.layer_norm(
            h, self.final.normalized_shape, self.final.weight + 1, self.final.bias, 1e-6
        )


def _converted_and_claimed(gm: torch.fx.GraphModule) -> tuple[set[str], set[str]]:
    """(LayerNorms the pass converted, LayerNorms its explain called convertible)."""

    def layernorms() -> set[str]:
        return {i.node.name for i in norms(gm) if i.kind == "layernorm"}

    before = layernorms()
    claimed = {
        k
        for k, v in LnToRmsNorm().explain(gm, PassContext()).items()
        if v.startswith("convertible")
    }
    LnToRmsNorm()(gm)
    return before - layernorms(), claimed


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_in_place_adds_and_one_plus_gamma(tracer: str) -> None:
    model = models.randomize_norms(InPlacePreLN()).eval()
    ids = models.token_ids(batch=2, seq=8, vocab=50)
    ref = _ref64(model, ids)
    gm = trace(model, (ids,), tracer).graph_module
    converted, claimed = _converted_and_claimed(gm)
    assert len(converted) == 3 and converted == claimed  # explain promises what convert does
    assert not [i for i in norms(gm) if i.kind == "layernorm"]
    # the 1 + γ of the final norm is kept as computed (folding it away would be wrong)
    final = [i for i in norms(gm) if i.kind == "rmsnorm"][-1]
    assert final.weight is None and final.has_weight
    assert compare(ref, [gm(ids)]).max_rel_err <= 1e-5


def test_nemotron_layernorm1p_exact() -> None:
    import transformers as t

    torch.manual_seed(0)
    cfg = t.NemotronConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=64,
        max_position_embeddings=64,
        use_cache=False,
    )
    model = models.randomize_norms(t.NemotronModel(cfg)).eval()
    ids = models.token_ids()
    ref = _ref64(model, ids)
    gm = trace(model, (ids,), "export").graph_module
    converted, claimed = _converted_and_claimed(gm)
    assert len(converted) == 5 and converted == claimed
    assert compare(ref, tensor_leaves(gm(ids))).max_rel_err <= 1e-5


def test_layer_scale_folded_dinov2() -> None:
    """DINOv2's ``λ ⊙ F(x)``: λ folded into the branch's output linear, then re-centred."""
    import transformers as t

    torch.manual_seed(0)
    cfg = t.Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        mlp_ratio=2,
        image_size=32,
        patch_size=8,
    )
    model = models.randomize_norms(t.Dinov2Model(cfg)).eval()
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "lambda1"):
                m.lambda1.copy_(torch.randn(32))
    x = models.pixels()
    ref = _ref64(model, x)
    gm = trace(model, (x,), "export").graph_module
    n_mul = len(_targets(gm, aten.mul.Tensor))
    converted, claimed = _converted_and_claimed(gm)
    assert len(converted) == 5 and converted == claimed
    assert len(_targets(gm, aten.mul.Tensor)) == n_mul - 4  # the four layer-scale multiplies
    assert compare(ref, tensor_leaves(gm(x))).max_rel_err <= 1e-5


def _bloom() -> tuple[nn.Module, torch.Tensor]:
    """BLOOM: the stream starts at the embedding LayerNorm's output."""
    import transformers as t

    torch.manual_seed(0)
    cfg = t.BloomConfig(vocab_size=100, hidden_size=32, n_layer=2, n_head=2, use_cache=False)
    return models.randomize_norms(t.BloomModel(cfg)).eval(), models.token_ids()


def _wav2vec2() -> tuple[nn.Module, torch.Tensor]:
    """wav2vec2 stable-LN: the stream starts at the feature projection, which the GELU'd
    positional conv also reads, and the conv's output is added in."""
    import transformers as t

    torch.manual_seed(0)
    cfg = t.Wav2Vec2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        do_stable_layer_norm=True,
        feat_extract_norm="layer",
        conv_dim=(16, 16),
        conv_stride=(5, 4),
        conv_kernel=(10, 4),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
    )
    x = torch.randn(1, 1600, generator=torch.Generator().manual_seed(0))
    return models.randomize_norms(t.Wav2Vec2Model(cfg)).eval(), x


@pytest.mark.parametrize(
    ("build", "centred_after", "no_saving"),
    [
        (_bloom, ["word_embeddings_layernorm"], []),
        (
            _wav2vec2,
            ["feature_projection.dropout", "encoder.pos_conv_embed.activation"],
            ["feature_projection.layer_norm"],
        ),
    ],
)
def test_explicit_mean_subtraction(build, centred_after: list[str], no_saving: list[str]) -> None:
    """A stream starting at a norm's output or at an op no weight surgery centres gets one
    explicit ``x - mean(x)`` there (noted with its cost); everything else is exact as before. A
    stream with no stored writer at all (wav2vec2's feature projection LayerNorm reads the conv
    features) gets the subtraction at its norm's input, noted as saving nothing."""
    model, x = build()
    ref = _ref64(model, x)
    gm = trace(model, (x,), "export").graph_module
    n_mean = len(_targets(gm, aten.mean.dim))
    before = {i.node.name for i in norms(gm) if i.kind == "layernorm"}
    claimed = {
        k
        for k, v in LnToRmsNorm().explain(gm, PassContext()).items()
        if v.startswith("convertible")
    }
    result = LnToRmsNorm()(gm)
    converted = before - {i.node.name for i in norms(gm) if i.kind == "layernorm"}
    assert converted == claimed == before and not result.skipped
    after = [n.split(" after ")[1].split(" (")[0] for n in result.notes if " after " in n]
    assert after == centred_after
    assert all("(2 ops: mean, sub" in n for n in result.notes)
    explicit = [n.split(" before ")[1].split(" (")[0] for n in result.notes if " before " in n]
    assert explicit == no_saving
    assert all("no saving" in n for n in result.notes if " before " in n)
    assert len(_targets(gm, aten.mean.dim)) == n_mean + len(centred_after) + len(no_saving)
    assert compare(ref, tensor_leaves(gm(x))).max_rel_err <= 1e-5


def test_falcon_matmul_transposed_weight_writers() -> None:
    """Falcon's bias-free ``FalconLinear`` is traced as ``x @ W.T``: each is a linear writer."""
    import transformers as t

    torch.manual_seed(0)
    cfg = t.FalconConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        new_decoder_architecture=True,
        num_kv_heads=2,
        use_cache=False,
    )
    model, ids = models.randomize_norms(t.FalconModel(cfg)).eval(), models.token_ids()
    ref = _ref64(model, ids)
    gm = trace(model, (ids,), "export").graph_module
    (stream,) = residual_streams(gm)
    assert [w.kind for w in stream.writers] == ["embedding"] + ["linear"] * 4
    assert all(w.node.target is aten.matmul.default for w in stream.writers[1:])
    converted, claimed = _converted_and_claimed(gm)
    assert len(converted) == 5 and converted == claimed
    assert get_tensor(gm, "h.0.self_attention.dense.weight").mean(0).abs().max() < 1e-6
    assert compare(ref, tensor_leaves(gm(ids))).max_rel_err <= 1e-5


class MatmulPreLN(PreLN):
    """PreLN with its down projections written ``x @ W.T`` (symbolic_trace: ``getattr(W, "T")``)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids) + self.pos
        for ln, up, down in zip(self.lns, self.up, self.down, strict=True):
            h = h + torch.relu(up(ln(h))) @ down.weight.T
        return self.final(h)


def test_matmul_transposed_weight_fx() -> None:
    model = models.randomize_norms(MatmulPreLN()).eval()
    ids = models.token_ids(batch=2, seq=8, vocab=50)
    ref = _ref64(model, ids)
    gm = trace(model, (ids,), "fx").graph_module
    converted, claimed = _converted_and_claimed(gm)
    assert len(converted) == 3 and converted == claimed
    assert _targets(gm, torch.mean) == []  # centred by weight surgery, no mean subtraction
    assert compare(ref, [gm(ids)]).max_rel_err <= 1e-5


class TablePreLN(PreLN):
    """Position rows and a class token reach the stream through ``index_select``, ``unsqueeze``,
    slicing, ``expand``/``cat`` and a ``gather`` of whole feature vectors (ViT-MAE's masking)."""

    def __init__(self, d: int = 16) -> None:
        super().__init__(d)
        self.table = nn.Parameter(torch.randn(12, d))  # (positions, d)
        self.cls = nn.Parameter(torch.randn(1, 1, d))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        n = ids.shape[1]
        rows = torch.index_select(self.table, 0, torch.arange(n) + 1).unsqueeze(0)
        h = self.emb(ids) + rows + self.table[:1]
        keep = torch.arange(n - 1, -1, -1).expand(ids.shape[0], n)
        h = torch.gather(h, 1, keep.unsqueeze(-1).repeat(1, 1, h.shape[-1]))
        h = torch.cat([self.cls.expand(ids.shape[0], -1, -1), h], dim=1)
        for ln, up, down in zip(self.lns, self.up, self.down, strict=True):
            h = h + down(torch.relu(up(ln(h))))
        return self.final(h)


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_stored_tables_picked_and_tiled(tracer: str) -> None:
    model = models.randomize_norms(TablePreLN()).eval()
    ids = models.token_ids(batch=2, seq=8, vocab=50)
    ref = _ref64(model, ids)
    gm = trace(model, (ids,), tracer).graph_module
    (stream,) = residual_streams(gm)
    assert {fqn for w in stream.writers for fqn, _ in w.tensors} >= {"table", "cls", "emb.weight"}
    assert not any(w.kind == "centre" for w in stream.writers)  # weight surgery only
    converted, claimed = _converted_and_claimed(gm)
    assert len(converted) == 3 and converted == claimed
    assert get_tensor(gm, "table").mean(1).abs().max() < 1e-6
    assert compare(ref, [gm(ids)]).max_rel_err <= 1e-5


def test_persimmon_per_head_qk_layernorm() -> None:
    """Per-head QK-LayerNorms: each head's q and k rows of the fused projection are re-centred
    (along the head dim), the v rows are left as they are, and every norm is an RMSNorm."""
    import transformers as t

    torch.manual_seed(0)
    cfg = t.PersimmonConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        use_cache=False,
    )
    model, ids = models.randomize_norms(t.PersimmonModel(cfg)).eval(), models.token_ids()
    ref = _ref64(model, ids)
    gm = trace(model, (ids,), "export").graph_module
    parts = [w for s in residual_streams(gm) for w in s.writers if w.kind == "part"]
    assert [(w.part[1], w.part[2]) for w in parts] == [(1, 0), (1, 1)] * 2  # q, k per layer
    converted, claimed = _converted_and_claimed(gm)
    assert len(converted) == 9 and converted == claimed
    fqn = "layers.0.self_attn.query_key_value.weight"
    new, old = (
        get_tensor(gm, fqn).reshape(2, 3, 16, 32),
        get_tensor(model, fqn).reshape(2, 3, 16, 32),
    )
    assert new[:, :2].mean(2).abs().max() < 1e-6 < old[:, :2].mean(2).abs().max()
    assert new[:, 2].mean(2).abs().max() > 1e-3  # v not centred (only γ of the input norm folded)
    assert compare(ref, tensor_leaves(gm(ids))).max_rel_err <= 1e-5
