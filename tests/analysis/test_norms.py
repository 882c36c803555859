"""The one norm model (normrewrite.analysis.norms): fused, written-out, 1+γ, weight norm and
unknown norms in real architectures, and inspect listing them with the passes that act."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers
from rich.console import Console
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

import normrewrite
from normrewrite.analysis.norms import find_norms
from normrewrite.cli_render import render_inspect
from normrewrite.core.graph import node_shape


def _export(model: nn.Module, *args: torch.Tensor) -> torch.fx.GraphModule:
    return torch.export.export(model.eval(), args, strict=False).module()


def _ids() -> torch.Tensor:
    return torch.randint(0, 64, (1, 8))


_SMALL = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    use_cache=False,
)


@pytest.fixture(scope="module")
def llama() -> nn.Module:
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**_SMALL)).eval()


def test_llama_rmsnorms_are_written_out_with_gamma(llama: nn.Module) -> None:
    got = find_norms(_export(llama, _ids()))
    assert [n.kind for n in got] == ["rmsnorm"] * 5
    assert all(n.form == "written" and n.scale == "gamma" and n.axes == (2,) for n in got)
    assert {n.eps for n in got} == {llama.config.rms_norm_eps}
    assert got[-1].label == "model.norm"


@pytest.mark.parametrize(
    ("config", "model", "kind", "count", "scale"),
    [
        (transformers.GemmaConfig, transformers.GemmaForCausalLM, "rmsnorm", 5, "1+gamma"),
        (transformers.NemotronConfig, transformers.NemotronForCausalLM, "layernorm", 5, "1+gamma"),
    ],
)
def test_one_plus_gamma_scale(config, model, kind: str, count: int, scale: str) -> None:
    torch.manual_seed(0)
    extra = {"head_dim": 8} if config is transformers.GemmaConfig else {}
    gm = _export(model(config(**_SMALL, **extra)), _ids())
    got = find_norms(gm)
    assert [(n.kind, n.scale) for n in got] == [(kind, scale)] * count


def test_bert_fused_layernorms() -> None:
    cfg = transformers.BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
    )
    got = find_norms(_export(transformers.BertModel(cfg), _ids()))
    assert [n.kind for n in got] == ["layernorm"] * 5
    assert all(n.form == "aten" and n.scale == "gamma" and n.shift for n in got)


def test_wav2vec2_positional_conv_weight_norm() -> None:
    cfg = transformers.Wav2Vec2Config(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(16, 16),
        conv_stride=(5, 2),
        conv_kernel=(10, 3),
        num_conv_pos_embeddings=4,
        num_conv_pos_embedding_groups=2,
    )
    got = find_norms(_export(transformers.Wav2Vec2Model(cfg), torch.randn(1, 400)))
    weight = [n for n in got if n.kind == "weightnorm"]
    assert len(weight) == 1 and weight[0].axes == (0, 1)  # ‖v‖ over all dims but dim=2


class _HandRMSNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(var + 1e-5))


class _ChannelMean(nn.Module):
    """An RMS statistic over dim 1: normalization-like but not a known pattern."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + 1e-6)


def test_symbolic_trace_hand_written_rmsnorm() -> None:
    gm = torch.fx.symbolic_trace(_HandRMSNorm())
    ShapeProp(gm).propagate(torch.randn(2, 3, 16))  # the matcher needs the feature count
    (norm,) = find_norms(gm)
    assert (norm.kind, norm.scale, norm.eps, norm.form) == ("rmsnorm", "gamma", 1e-5, "written")


class _L2(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(x, dim=-1, eps=1e-6)


@pytest.mark.parametrize("trace", ["export", "symbolic_trace"])
def test_l2_normalize(trace: str) -> None:
    x = torch.randn(2, 3, 8)
    gm = _export(_L2(), x) if trace == "export" else torch.fx.symbolic_trace(_L2())
    if trace == "symbolic_trace":
        ShapeProp(gm).propagate(x)
    (norm,) = find_norms(gm)
    assert (norm.kind, norm.axes, norm.eps) == ("l2norm", (2,), 1e-6)


def test_unknown_normalization_like_has_a_reason() -> None:
    gm = _export(_ChannelMean(), torch.randn(2, 4, 8))
    (norm,) = find_norms(gm)
    assert norm.kind == "unknown" and "not the last dim" in (norm.reason or "")


def test_inspect_promises_what_convert_does_on_llama(llama: nn.Module) -> None:
    ids = (_ids(),)
    result = normrewrite.inspect(llama, ids)
    rms = [n for n in result.norms if n.type == "rmsnorm"]
    assert len(rms) == 5 and all("fuse-norm" in n.actions for n in rms)
    promised = {n.name for n in rms if n.actions["fuse-norm"].startswith("fusable")}
    report = normrewrite.convert(llama, ["fuse-norm"], ids).report
    done = {c.target for p in report.passes for c in p.changes}
    assert promised == done and len(promised) == 5


def _resnet() -> nn.Module:
    cfg = transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic"
    )
    return transformers.ResNetModel(cfg)


def _qwen2() -> nn.Module:
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**_SMALL))


def _levit() -> nn.Module:
    cfg = transformers.LevitConfig(
        image_size=32,
        hidden_sizes=[16, 32],
        num_attention_heads=[1, 2],
        depths=[1, 1],
        key_dim=[8, 8],
        patch_size=16,
        down_ops=[["Subsample", 8, 2, 4, 2, 2]],
    )
    return transformers.LevitModel(cfg)


@pytest.mark.parametrize(
    ("build", "shape", "pass_name"),
    [
        (_resnet, (1, 3, 32, 32), "fold-bn"),
        (_levit, (1, 3, 32, 32), "fold-bn"),
        (_qwen2, None, "fuse-norm"),
    ],
)
def test_inspect_promises_what_convert_does(build, shape, pass_name: str) -> None:
    torch.manual_seed(0)
    model = build().eval()
    inputs = (_ids() if shape is None else torch.randn(shape),)
    result = normrewrite.inspect(model, inputs)
    promised = {
        n.name
        for n in result.norms
        if pass_name in n.actions and not n.actions[pass_name].startswith(("not", "refused"))
    }
    report = normrewrite.convert(model, [pass_name], inputs).report
    done = {c.target for p in report.passes for c in p.changes}
    assert promised == done and promised


def test_convnextv2_grn() -> None:
    cfg = transformers.ConvNextV2Config(
        patch_size=4, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, image_size=32
    )
    got = find_norms(_export(transformers.ConvNextV2Model(cfg), torch.randn(1, 3, 32, 32)))
    grn = [n for n in got if n.kind == "grn"]
    assert len(grn) == 2 and not [n for n in got if n.kind == "unknown"]
    assert all((n.axes, n.eps, n.scale, n.shift) == ((1, 2), 1e-6, "gamma", True) for n in grn)
    assert grn[0].label.endswith("grn") and len(grn[0].nodes) == 8


def _deberta_v2() -> nn.Module:
    cfg = transformers.DebertaV2Config(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64,
    )  # fmt: skip
    return transformers.DebertaV2Model(cfg)


def _t5_encoder() -> nn.Module:
    cfg = transformers.T5Config(
        vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4
    )  # fmt: skip
    return transformers.T5EncoderModel(cfg)


def _cohere() -> nn.Module:
    return transformers.CohereForCausalLM(transformers.CohereConfig(**_SMALL))


def _phi3() -> nn.Module:
    return transformers.Phi3ForCausalLM(transformers.Phi3Config(**_SMALL, pad_token_id=0))


@pytest.mark.parametrize(
    ("build", "kind", "form", "shift", "count", "last"),
    [
        # transformers 5 writes DeBERTa-v2's LayerNorm as nn.LayerNorm: a fused op, not arithmetic
        (_deberta_v2, "layernorm", "aten", True, 5, "encoder.layer.1.output.LayerNorm"),
        # CohereLayerNorm: (x − x̄)·rsqrt(var + ε)·γ written out, no β; one norm per parallel block
        (_cohere, "layernorm", "written", False, 3, "model.norm"),
        (_t5_encoder, "rmsnorm", "written", False, 5, "encoder.final_layer_norm"),
        (_phi3, "rmsnorm", "written", False, 5, "model.norm"),
    ],
)
def test_hand_written_and_module_norms(build, kind, form, shift, count, last) -> None:
    torch.manual_seed(0)
    got = find_norms(_export(build(), _ids()))
    assert [(n.kind, n.form, n.scale, n.shift, n.axes) for n in got] == [
        (kind, form, "gamma", shift, (2,))
    ] * count
    assert got[-1].label == last


def test_olmo2_qk_norm_over_all_heads() -> None:
    torch.manual_seed(0)
    got = find_norms(
        _export(transformers.Olmo2ForCausalLM(transformers.Olmo2Config(**_SMALL)), _ids())
    )
    assert [n.kind for n in got] == ["rmsnorm"] * 9
    q, k = got[0], got[1]
    assert (q.label, k.label) == (
        "model.layers.0.self_attn.q_norm",
        "model.layers.0.self_attn.k_norm",
    )
    # one RMSNorm over every head's features: 4 query heads · 8, 2 key/value heads · 8
    assert (node_shape(q.input)[-1], node_shape(k.input)[-1]) == (32, 16)
    assert q.axes == k.axes == (2,) and q.casts == ("float32",)


@pytest.mark.parametrize("old", [True, False], ids=["weight_g/weight_v hook", "parametrization"])
@pytest.mark.parametrize("trace", ["export", "symbolic_trace"])
def test_weight_norm_spellings(old: bool, trace: str) -> None:
    conv = nn.Conv1d(4, 6, 3)
    wn = nn.utils.weight_norm if old else nn.utils.parametrizations.weight_norm
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the hook form is deprecated
        model = nn.Sequential(wn(conv, dim=0))
    x = torch.randn(1, 4, 10)
    if trace == "export":
        gm = _export(model, x)
    else:
        gm = torch.fx.symbolic_trace(model)
        ShapeProp(gm).propagate(x)
    (norm,) = find_norms(gm)
    assert (norm.kind, norm.axes) == ("weightnorm", (1, 2))  # ‖v‖ over all dims but dim 0
    assert norm.form == ("aten" if trace == "export" else "module")


def _patchtst() -> nn.Module:
    cfg = transformers.PatchTSTConfig(
        num_input_channels=2, context_length=32, patch_length=8, patch_stride=8, d_model=16,
        num_attention_heads=2, num_hidden_layers=1, ffn_dim=32, norm_type="batchnorm",
    )  # fmt: skip
    return transformers.PatchTSTModel(cfg)


_PATCHTST = {
    # (N·channels, d_model, patches): transpose of the (N, channels, patches, d_model) stream
    "encoder.layers.0.norm_sublayer1.batchnorm": ((0, 2), (1, 2, 4, 16), (0, 1, 2)),
}
_LEVIT = {
    # BatchNorm1d on (N·L, C) = flatten(0, 1) of the (N, L, C) Linear output
    "encoder.stages.0.layers.0.module.projection.batch_norm": ((0,), (2, 4, 16), (0, 1)),
    "encoder.stages.0.layers.2.queries.batch_norm": ((0,), (2, 1, 16), (0, 1)),
    # no layout op: the source is the input
    "patch_embeddings.embedding_layer_1.batch_norm": ((0, 2, 3), (2, 2, 16, 16), (0, 2, 3)),
}


@pytest.mark.parametrize(
    ("build", "x", "want"),
    [(_patchtst, (1, 32, 2), _PATCHTST), (_levit, (2, 3, 32, 32), _LEVIT)],
    ids=["patchtst", "levit"],
)
def test_axes_in_the_source_layout(build, x, want) -> None:
    torch.manual_seed(0)
    got = {n.label: n for n in find_norms(_export(build(), torch.randn(x)))}
    for label, (axes, source_shape, source_axes) in want.items():
        norm = got[label]
        assert norm.axes == axes and norm.source is not None
        assert (node_shape(norm.source), norm.source_axes) == (source_shape, source_axes)
        layout = node_shape(norm.input) != source_shape
        assert (norm.source is not norm.input) == layout


class _ChannelsLastBN(nn.Module):
    """PatchTST/CLAP style: BatchNorm1d over the features of an (N, L, C) stream."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x.transpose(1, 2)).transpose(1, 2)


def test_inspect_shows_axes_in_the_model_layout() -> None:
    result = normrewrite.inspect(_ChannelsLastBN().eval(), (torch.randn(2, 5, 8),))
    (entry,) = result.norms
    assert (entry.type, entry.axes, entry.shape) == ("batchnorm", [0, 2], [2, 8, 5])
    assert (entry.source_axes, entry.source_shape) == ([0, 1], [2, 5, 8])
    out = Console(width=200, record=True)
    render_inspect(result, out)
    assert "0,2 (= 0,1 of 2x5x8)" in out.export_text()


class _Odd(nn.Module):
    """Normalization-like arithmetic no recognizer names, and an L2 norm written without ε."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        centred = x - x.mean(1, keepdim=True)  # centring only, over the sequence
        by_mean = x / x.mean(-1, keepdim=True)  # divides by its mean
        unbiased = (x - x.mean(-1, keepdim=True)) * torch.rsqrt(x.var(-1, keepdim=True) + 1e-5)
        l2 = x / x.norm(dim=-1, keepdim=True)
        clip = x / x.pow(2).sum(-1, keepdim=True).pow(0.5)  # CLIP's embeddings
        pooled = x.mean(1)  # a plain mean: not a norm
        return centred, by_mean, unbiased, l2, clip, pooled


@pytest.mark.parametrize("trace", ["export", "symbolic_trace"])
def test_reductions_that_normalize_their_input(trace: str) -> None:
    x = torch.randn(2, 4, 8)
    gm = _export(_Odd(), x) if trace == "export" else torch.fx.symbolic_trace(_Odd())
    if trace == "symbolic_trace":
        ShapeProp(gm).propagate(x)
    got = find_norms(gm)
    assert [(n.kind, n.axes) for n in got] == [
        ("unknown", (1,)),
        ("unknown", (2,)),
        ("unknown", (2,)),
        ("l2norm", (2,)),
        ("l2norm", (2,)),
    ]
    assert [n.label for n in got[:2]] == [n.name for n in gm.graph.nodes if "mean" in n.name][:2]
    reasons = [n.reason or "" for n in got[:3]]
    assert "subtracts it from that value" in reasons[0] and "over dims [1]" in reasons[0]
    assert "divides that value by it" in reasons[1]
    assert "unbiased" in reasons[2]  # the matcher's reason: a LayerNorm but for the correction
    assert got[3].eps is got[4].eps is None
