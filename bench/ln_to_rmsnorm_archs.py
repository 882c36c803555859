"""The models of bench/ln_to_rmsnorm_coverage.py: small ``transformers`` configs (hidden 32-64,
2 layers, no network), each a builder returning ``(model, positional inputs)``.

``ARCHS`` are Pre-LN models (the norms read a residual stream that is never normalized in place);
``POST_LN`` names the Post-LN controls among them, whose refusals must say Post-LN.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

_TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
TEXT: dict[str, Any] = dict(**_TINY, vocab_size=96, max_position_embeddings=64, use_cache=False)
_VIT = dict(**_TINY, image_size=32, patch_size=8)
_TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
# a BART-family encoder-decoder
_SEQ2SEQ = dict(
    vocab_size=96,
    d_model=32,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=2,
    decoder_attention_heads=2,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    max_position_embeddings=64,
    **_TOKENS,
    use_cache=False,
)


def _ids(*shape: int) -> torch.Tensor:
    return torch.randint(3, 96, shape, generator=torch.Generator().manual_seed(0))


def _randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


class _Keywords(nn.Module):
    """Calls ``model`` with its inputs by name (the bench passes them positionally)."""

    def __init__(self, model: nn.Module, names: tuple[str, ...]) -> None:
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *args: torch.Tensor) -> Any:
        return self.model(**dict(zip(self.names, args, strict=True)))


def _hf(
    cfg_name: str, model_name: str, inputs: Callable[[], dict], part: str = "", **kw: Any
) -> Callable:
    """Any model: ``inputs()`` gives its keyword inputs; ``part`` a getter of the submodel."""

    def build() -> tuple[nn.Module, tuple]:
        import transformers as t

        # "kosmos2.modeling_kosmos2.Kosmos2TextModel": a class only its model module exports
        path, _, cls_name = model_name.rpartition(".")
        where = importlib.import_module(f"transformers.models.{path}") if path else t
        model = getattr(where, cls_name)(getattr(t, cfg_name)(**kw))
        model = getattr(model, part)() if part else model
        named = inputs()
        return _Keywords(model, tuple(named)), tuple(named.values())

    return build


_IDS = lambda: dict(input_ids=_ids(1, 12))  # noqa: E731
_PIXELS = lambda: dict(pixel_values=_randn(1, 3, 32, 32))  # noqa: E731
_VIDEO = lambda: dict(pixel_values=_randn(1, 4, 3, 32, 32))  # noqa: E731
_WAVE = lambda: dict(input_values=_randn(1, 1600))  # noqa: E731


def _text(cfg_name: str, model_name: str = "", **kw: Any) -> Callable:
    return _hf(cfg_name, model_name or cfg_name.replace("Config", "Model"), _IDS, **TEXT | kw)


def _vision(cfg_name: str, model_name: str = "", size: int | list[int] = 32, **kw: Any) -> Callable:
    h, w = size if isinstance(size, list) else (size, size)
    model_name = model_name or cfg_name.replace("Config", "Model")
    pixels = lambda: dict(pixel_values=_randn(1, 3, h, w))  # noqa: E731
    return _hf(cfg_name, model_name, pixels, **_VIT | {"image_size": size} | kw)


def _seq2seq(cfg_name: str, model_name: str, **kw: Any) -> Callable:
    ids = lambda: dict(input_ids=_ids(1, 12), decoder_input_ids=_ids(1, 8))  # noqa: E731
    return _hf(cfg_name, model_name, ids, **_SEQ2SEQ | kw)


# ViT-MAE with its masking noise passed in, so the reference and the rewrite agree
_vit_mae = _hf(
    "ViTMAEConfig",
    "ViTMAEModel",
    lambda: dict(pixel_values=_randn(1, 3, 32, 32), noise=torch.rand(1, 16)),
    **_VIT,
    mask_ratio=0.0,
)
_whisper_enc = _hf(
    "WhisperConfig",
    "WhisperModel",
    lambda: dict(input_features=_randn(1, 16, 32)),
    "get_encoder",
    **_SEQ2SEQ | dict(num_mel_bins=16, max_source_positions=16, max_target_positions=16),
)


def _opt(**kw: Any) -> Callable:
    return _text("OPTConfig", ffn_dim=64, word_embed_proj_dim=32, do_layer_norm_before=True, **kw)


# wav2vec2-family encoders in their stable-layer-norm (Pre-LN) form, tiny
_STABLE_LN_AUDIO = dict(
    **_TINY,
    do_stable_layer_norm=True,
    feat_extract_norm="layer",
    conv_dim=(16, 16),
    conv_stride=(5, 4),
    conv_kernel=(10, 4),
    num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=2,
)


_SWIN = dict(embed_dim=16, depths=[1, 1], num_attention_heads=[2, 2], patch_size=4, window_size=4)
# a two-stage hierarchical vision backbone (Segformer / PVTv2)
_STAGES = dict(
    num_encoder_blocks=2,
    depths=[1, 1],
    sr_ratios=[2, 1],
    hidden_sizes=[24, 32],  # 24 channels: unlike 16, not the 4x4 = 16 reduced tokens
    patch_sizes=[7, 3],
    strides=[4, 2],
    num_attention_heads=[1, 2],
    mlp_ratios=[2, 2],
)


ARCHS: dict[str, Callable[[], tuple]] = {
    "gpt2": _text("GPT2Config", n_embd=32, n_layer=2, n_head=2, n_positions=64),
    "gpt_neo": _text(
        "GPTNeoConfig",
        num_layers=2,
        attention_types=[[["global", "local"], 1]],
        max_position_embeddings=64,
    ),
    "gptj": _text("GPTJConfig", n_embd=32, n_layer=2, n_head=2, n_positions=64, rotary_dim=8),
    "gpt_neox": _text("GPTNeoXConfig"),
    "gpt_neox_seq": _text("GPTNeoXConfig", use_parallel_residual=False),
    "opt": _opt(),
    "bloom": _text("BloomConfig", n_layer=2, n_head=2),
    "falcon": _text("FalconConfig", new_decoder_architecture=False, parallel_attn=True),
    "falcon_new": _text("FalconConfig", new_decoder_architecture=True, num_kv_heads=2),
    "phi": _text("PhiConfig"),
    "codegen": _text("CodeGenConfig", n_embd=32, n_layer=2, n_head=2, n_positions=64, rotary_dim=8),
    "xglm": _text("XGLMConfig", d_model=32, num_layers=2, attention_heads=2, ffn_dim=64),
    "biogpt": _text("BioGptConfig"),
    "persimmon": _text("PersimmonConfig"),
    "stablelm": _text("StableLmConfig", num_key_value_heads=2),
    "nemotron": _text("NemotronConfig", head_dim=16, num_key_value_heads=2),
    "mpt": _text("MptConfig", d_model=32, n_heads=2, n_layers=2, expansion_ratio=2),
    "gpt_bigcode": _text("GPTBigCodeConfig", n_embd=32, n_layer=2, n_head=2, n_positions=64),
    "imagegpt": _text("ImageGPTConfig", n_embd=32, n_layer=2, n_head=2, n_positions=64),
    "starcoder2": _text("Starcoder2Config", num_key_value_heads=2),
    "olmo": _text("OlmoConfig"),
    "cohere": _text("CohereConfig", num_key_value_heads=2),
    "mbart_enc": _text(
        "MBartConfig",
        "MBartModel",
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
    ),
    "xlm_roberta_xl": _text("XLMRobertaXLConfig"),
    "vit": _vision("ViTConfig"),
    "deit": _vision("DeiTConfig"),
    "beit": _vision("BeitConfig", use_mask_token=False),
    "data2vec_vision": _vision("Data2VecVisionConfig"),
    "dinov2": _vision("Dinov2Config", mlp_ratio=2),
    "dinov2_swiglu": _vision("Dinov2Config", mlp_ratio=2, use_swiglu_ffn=True),
    "vit_msn": _vision("ViTMSNConfig"),
    "vit_mae": _vit_mae,
    "swin": _vision("SwinConfig", **_SWIN),
    "donut_swin": _vision("DonutSwinConfig", **_SWIN),
    "clip_text": _text("CLIPTextConfig", "CLIPTextModel"),
    "clip_vision": _vision("CLIPVisionConfig", "CLIPVisionModel"),
    "siglip_vision": _vision("SiglipVisionConfig", "SiglipVisionModel"),
    "whisper_enc": _whisper_enc,
    "wav2vec2_stable": _hf("Wav2Vec2Config", "Wav2Vec2Model", _WAVE, **_STABLE_LN_AUDIO),
    "hubert_stable": _hf("HubertConfig", "HubertModel", _WAVE, **_STABLE_LN_AUDIO),
    "cait_like_dinov2_ls": _vision("Dinov2Config", mlp_ratio=2, layerscale_value=0.5),
    "convnext_v1": _vision(
        "ConvNextConfig",
        hidden_sizes=[16, 32],
        depths=[1, 1],
        num_stages=2,
        layer_scale_init_value=0.5,
    ),
    "pegasus": _seq2seq("PegasusConfig", "PegasusModel"),
    "m2m100": _seq2seq("M2M100Config", "M2M100Model"),
    "blenderbot": _seq2seq("BlenderbotConfig", "BlenderbotModel"),
    "bigbird_pegasus": _seq2seq(
        "BigBirdPegasusConfig", "BigBirdPegasusModel", attention_type="original_full"
    ),
    "speech2text": _hf(
        "Speech2TextConfig",
        "Speech2TextModel",
        lambda: dict(input_features=_randn(1, 32, 16), decoder_input_ids=_ids(1, 8)),
        **_SEQ2SEQ
        | dict(max_source_positions=64, max_target_positions=64, conv_kernel_sizes=(5, 5)),
        conv_channels=32,
        input_feat_per_channel=16,
    ),
    "musicgen_dec": _hf(
        "MusicgenDecoderConfig",
        "MusicgenModel",
        lambda: dict(input_ids=_ids(2, 12)),
        **TEXT | dict(ffn_dim=64, num_codebooks=2, pad_token_id=95, bos_token_id=95),
    ),
    "bark_semantic": _hf(
        "BarkSemanticConfig",
        "BarkSemanticModel",
        _IDS,
        **TEXT | dict(output_vocab_size=96, block_size=64),
    ),
    "esm": _text("EsmConfig", pad_token_id=1, mask_token_id=4, emb_layer_norm_before=False),
    "esm_rotary": _text(
        "EsmConfig", pad_token_id=1, mask_token_id=4, position_embedding_type="rotary"
    ),
    "gpt_neox_japanese": _text("GPTNeoXJapaneseConfig", intermediate_multiple_size=2),
    "kosmos2_text": _hf(
        "Kosmos2TextConfig",
        "kosmos2.modeling_kosmos2.Kosmos2TextModel",
        _IDS,
        **TEXT | dict(ffn_dim=64),
    ),
    "siglip_text": _text("SiglipTextConfig", "SiglipTextModel"),
    "modernbert": _text(
        "ModernBertConfig", **_TOKENS, cls_token_id=1, sep_token_id=2, local_attention=8
    ),
    "rwkv": _text("RwkvConfig", attention_hidden_size=32, rescale_every=0),
    "moonshine": _hf(
        "MoonshineConfig",
        "MoonshineModel",
        lambda: dict(input_values=_randn(1, 1600), decoder_input_ids=_ids(1, 8)),
        **TEXT | _TOKENS,
        encoder_num_hidden_layers=2,
        encoder_num_attention_heads=2,
    ),
    "wavlm_stable": _hf("WavLMConfig", "WavLMModel", _WAVE, **_STABLE_LN_AUDIO, num_buckets=8),
    "ast": _hf(
        "ASTConfig",
        "ASTModel",
        lambda: dict(input_values=_randn(1, 32, 32)),
        **_VIT | dict(frequency_stride=8, time_stride=8, max_length=32, num_mel_bins=32),
    ),
    "blip_vision": _vision("BlipVisionConfig", "BlipVisionModel"),
    "ijepa": _vision("IJepaConfig"),
    "dinov2_registers": _vision("Dinov2WithRegistersConfig", mlp_ratio=2, num_register_tokens=2),
    "yolos": _vision("YolosConfig", size=[32, 32], num_detection_tokens=4),
    "mgp_str": _vision("MgpstrConfig", size=[32, 64], mlp_ratio=2.0),
    "x_clip_vision": _hf(
        "XCLIPVisionConfig",
        "XCLIPVisionModel",
        lambda: dict(pixel_values=_randn(2, 3, 32, 32)),  # 2 frames
        **_VIT | dict(num_frames=2, mit_hidden_size=32, mit_intermediate_size=64),
        **dict(mit_num_hidden_layers=1, mit_num_attention_heads=2),
    ),
    "videomae": _hf(
        "VideoMAEConfig", "VideoMAEModel", _VIDEO, **_VIT, num_frames=4, use_mean_pooling=False
    ),
    "timesformer": _hf("TimesformerConfig", "TimesformerModel", _VIDEO, **_VIT, num_frames=4),
    "vivit": _hf("VivitConfig", "VivitModel", _VIDEO, **_VIT, num_frames=4, tubelet_size=[2, 8, 8]),
    "segformer": _hf("SegformerConfig", "SegformerModel", _PIXELS, **_STAGES),
    "pvt_v2": _hf("PvtV2Config", "PvtV2Model", _PIXELS, image_size=32, **_STAGES),
    "focalnet": _hf(
        "FocalNetConfig",
        "FocalNetModel",
        _PIXELS,
        **dict(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], hidden_sizes=[16, 32]),
        focal_levels=[2, 2],
        focal_windows=[3, 3],
    ),
    "hiera": _hf(
        "HieraConfig",
        "HieraModel",
        lambda: dict(pixel_values=_randn(1, 3, 64, 64)),
        **dict(embed_dim=16, image_size=[64, 64], depths=[1, 1], num_heads=[1, 2], mlp_ratio=2.0),
        **dict(masked_unit_size=[8, 8], masked_unit_attention=[True, False], num_query_pool=1),
    ),
    "sam_vision": _hf(
        "SamVisionConfig",
        "SamVisionModel",
        lambda: dict(pixel_values=_randn(1, 3, 64, 64)),
        **_VIT | dict(image_size=64, output_channels=16, mlp_dim=64, window_size=4),
        global_attn_indexes=[1],
    ),
    "perceiver": _hf(
        "PerceiverConfig",
        "PerceiverModel",
        lambda: dict(inputs=_randn(1, 12, 16)),
        **dict(num_latents=8, d_latents=32, d_model=16, num_blocks=1, num_self_attends_per_block=2),
        **dict(num_self_attention_heads=2, num_cross_attention_heads=1),
    ),
    # Post-LN controls: every refusal must say Post-LN
    "roformer_postln": _text("RoFormerConfig"),
    "bert_postln": _text("BertConfig"),
    "plbart_postln": _seq2seq("PLBartConfig", "PLBartModel"),
}

POST_LN = frozenset(name for name in ARCHS if name.endswith("_postln"))
